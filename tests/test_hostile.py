"""Hostile input against a 3-node TcpNetwork cluster on loopback: every attack of issue 10
leaves every node's term, vote and leader unchanged and the cluster committing."""
import asyncio
import logging
import struct

import msgspec
import pytest

from fastraft import _py, kernels, kv
from fastraft.config import Config
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    Removed,
    RequestVote,
    TimeoutNow,
)
from fastraft.testing import NO_FAULTS, Faults, LocalCluster, Simulator, wait_until
from fastraft.transport.link import decode_hello
from fastraft.wire import decode_messages, encode_messages

from aio import run
from rawpeer import connect, frame, no_tracebacks, read_frame, send_messages

SECRET = b"hostile-test-secret-0123456789"
#: Elections only when a leader really fails: an attack must not be confused with a
#: slow test machine.
CFG = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05)


def port(cluster, i):
    return int(cluster.addresses[i].rsplit(":", 1)[1])


def snapshot_of(cluster):
    return {i: (n.engine.term, n.engine.voted_for, n.engine.leader_id)
            for i, n in cluster.nodes.items()}


def forged(cluster, leader, sender):
    """The attacks of issue 10, built from the cluster's state, as node ``sender``."""
    e = leader.engine
    term, last = e.term, e.log.last_index
    return {
        "term-2**64-1": [AppendEntriesResponse(2**64 - 1, False, 0)],
        "term-10**18": [AppendEntriesResponse(10**18, False, 0)],
        "term-2**63-1": [AppendEntriesResponse(2**63 - 1, False, 0)],
        "forged-entry": [AppendEntries(term, sender, last, term,
                                       [Entry(term, last + 1, EntryKind.NORMAL,
                                              kv.put("pwned", b"evil"))], last + 1)],
        "timeout-now": [TimeoutNow(term, sender)],
        "removed-word": [Removed(term, sender, last, last)],
        "transfer-vote": [RequestVote(term + 1, sender, last, term, leadership_transfer=True)],
        "gap": [AppendEntries(term, sender, last, term,
                              [Entry(term, last + 5, EntryKind.NORMAL, b"x")], last)],
    }


async def still_healthy(cluster, before):
    assert snapshot_of(cluster) == before
    leader = await cluster.leader()
    index = await leader.propose(kv.put("after", b"attack"))
    await wait_until(lambda: all(n.applied_index >= index for n in cluster.nodes.values()))
    for sm in cluster.state_machines.values():
        assert "pwned" not in sm.data


@run
async def test_strangers_change_nothing_anywhere(caplog):
    async with LocalCluster(3, state_machine=kv.KVStore, transport="tcp", config=CFG) as c:
        leader = await c.leader()
        await leader.propose(kv.put("a", b"1"))
        before = snapshot_of(c)
        with caplog.at_level(logging.WARNING):
            for messages in forged(c, leader, 99).values():
                for i in c.nodes:
                    await send_messages(port(c, i), 99, messages)
        await still_healthy(c, before)
        refused = sum(n.engine.refused["stranger"] for n in c.nodes.values())
        closed = sum(n.network.stats["bad_frames"] for n in c.nodes.values())
        assert refused >= 3 * 4 and closed >= 3  # strangers; 2**64-1 fails to decode
        assert no_tracebacks(caplog)


@run
async def test_a_member_id_sending_garbled_entries_costs_one_line_not_a_traceback(caplog):
    """Without authentication a member's id can be claimed: the engine still refuses
    entries that do not follow prev_log_index, in one log line."""
    async with LocalCluster(3, state_machine=kv.KVStore, transport="tcp", config=CFG) as c:
        leader = await c.leader()
        follower = next(i for i in c.nodes if i != leader.id)
        before = snapshot_of(c)
        with caplog.at_level(logging.WARNING, logger="fastraft.node"):
            await send_messages(port(c, follower), leader.id,
                                forged(c, leader, leader.id)["gap"])
            await wait_until(lambda: c.nodes[follower].engine.refused["malformed"] == 1)
        assert "does not follow prev_log_index" in caplog.text
        assert no_tracebacks(caplog)
        await still_healthy(c, before)


@run
async def test_with_a_secret_a_members_id_without_it_is_refused_at_the_door():
    async with LocalCluster(3, state_machine=kv.KVStore, transport="tcp", config=CFG,
                            tcp_options={"secret": SECRET}) as c:
        leader = await c.leader()
        await leader.propose(kv.put("a", b"1"))
        before = snapshot_of(c)
        for sender in (99, 1, 2, 3):
            for messages in forged(c, leader, sender).values():
                for i in c.nodes:
                    if i != sender:
                        await send_messages(port(c, i), sender, messages)
        await still_healthy(c, before)
        assert all(n.engine.refused == {"stranger": 0, "malformed": 0}
                   for n in c.nodes.values())  # nothing got as far as the engine
        assert sum(n.network.stats["refused"] for n in c.nodes.values()) >= 3 * 3 * 7


@pytest.mark.parametrize("payload", [
    frame(b"\x83\xa1x\xa2\xff\xfe"),  # invalid UTF-8 where the handshake wants text
    frame(b"\x96\x02\xa8fastraft\x63\x02\xa2\xff\xfe" + b"\xc4\x10" + b"n" * 16 + b"\xc4\x00"),
    struct.pack("<I", (64 << 20) - 1) + bytes(4096),  # a huge frame before a handshake
], ids=["utf8-handshake", "utf8-address", "huge-unauthenticated-frame"])
@run
async def test_bad_handshakes_are_refused_in_one_line(payload, caplog):
    async with LocalCluster(3, state_machine=kv.KVStore, transport="tcp", config=CFG) as c:
        leader = await c.leader()
        before = snapshot_of(c)
        with caplog.at_level(logging.WARNING, logger="fastraft.transport"):
            reader, writer, _ = await connect(port(c, leader.id), handshake=False)
            hello = await read_frame(reader)  # the node speaks first
            writer.write(payload)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # then closes
            assert type(decode_hello(hello)).__name__ == "ServerHello"
        assert "closing connection" in caplog.text and no_tracebacks(caplog)
        await still_healthy(c, before)


@run
async def test_a_trickled_huge_frame_is_buffered_linearly_and_within_the_limit():
    """A peer that completed the (unauthenticated) handshake announces a frame just under
    the limit and trickles it: the node keeps committing, holds no more than the frame,
    and the port's budget for incomplete frames closes the connections that exceed it."""
    from fastraft.transport.link import ConnectionLimits
    limits = ConnectionLimits(max_buffered_bytes=24 << 20)
    async with LocalCluster(3, state_machine=kv.KVStore, transport="tcp", config=CFG,
                            tcp_options={"max_frame_bytes": 16 << 20,
                                         "limits": limits}) as c:
        leader = await c.leader()
        before = snapshot_of(c)
        net = leader.network
        writers = []
        for peer in (97, 98, 99):  # ids of their own: a peer's new connection replaces its old
            reader, writer, _ = await connect(port(c, leader.id), peer)
            writer.write(struct.pack("<I", (16 << 20) - 1))
            writers.append((reader, writer))
        chunk = bytes(64 << 10)
        for k in range(160):  # 10 MiB per connection, 64 KiB at a time
            for _, writer in writers:
                if not writer.is_closing():
                    writer.write(chunk)
            await asyncio.gather(*[w.drain() for _, w in writers if not w.is_closing()],
                                 return_exceptions=True)
            if k % 16 == 0:
                await leader.propose(kv.put(f"k{k}", b"v"))  # commits meanwhile
            assert net.gate.buffered <= limits.max_buffered_bytes
        await wait_until(lambda: net.stats["refused"] >= 1, 10, "the budget to close one")
        for _, writer in writers:
            writer.close()
        await still_healthy(c, before)


@run
async def test_inline_entries_and_out_of_range_numbers_are_decode_errors():
    head = msgspec.msgpack.encode(AppendEntries(1, 1, 0, 0, [Entry(-1, -7, 200, b"x")], 0))
    batch = struct.pack("<I", len(head)) + head + struct.pack("<I", 0)
    with pytest.raises(Exception) as info:
        decode_messages(batch)
    assert type(info.value).__name__ == "DecodeError"
    head = msgspec.msgpack.encode(AppendEntries(1, 1, 0, 0, [Entry(1, 1, 0, b"x")], 0))
    with pytest.raises(Exception, match="entries inside a message head"):
        decode_messages(struct.pack("<I", len(head)) + head + struct.pack("<I", 0))
    big = encode_messages([AppendEntriesResponse(2**63 + 5, True, 1)])
    with pytest.raises(Exception, match="malformed message"):
        decode_messages(big)


def test_every_message_the_engines_send_survives_the_wire_in_both_kernel_modes(monkeypatch):
    """Whatever an honest engine emits must pass the wire's range checks (a heartbeat
    carries prev_log_term -1 when its follower is behind the snapshot, say): every
    message of a faulty simulated run with snapshots is encoded, decoded and compared."""
    checked = []
    real = Simulator._transmit

    def transmit(self, frm, to, msg):
        for impl in (kernels, _py):
            monkeypatch.setattr("fastraft.wire.kernels", impl)
            wire = encode_messages([msg])
            assert decode_messages(wire) == [msg], msg
        checked.append(type(msg).__name__)
        real(self, frm, to, msg)

    monkeypatch.setattr(Simulator, "_transmit", transmit)
    cfg = Config(snapshot_interval=0, snapshot_trailing_entries=0, snapshot_chunk_bytes=64)
    for seed in range(6):
        Simulator(seed=seed, nodes=3, faults=Faults(crash_every=0.4), config=cfg,
                  snapshot_every=25, spare_nodes=1, reconfigure_every=0.5).run(1.5)
    Simulator(seed=1, nodes=3, faults=NO_FAULTS).run(0.5)
    kinds = set(checked)
    assert {"AppendEntries", "AppendEntriesResponse", "RequestVote", "RequestVoteResponse",
            "InstallSnapshot", "InstallSnapshotResponse", "ReadIndexRequest",
            "ReadIndexResponse"} <= kinds, kinds


#: What 2,100 hostile connections may add to a node's resident memory: unauthenticated
#: connections are capped (128 per port, 32 per address, oldest closed first) and hold at
#: most one 4 KiB handshake frame each.
FLOOD_RSS_MIB = 32


@run
async def test_a_flood_of_idle_and_garbage_connections_costs_bounded_memory(tmp_path):
    import random

    from fastraft.kvclient import ClientError, find_leader
    from fastraft.processes import ProcessCluster, memory_mib

    cluster = ProcessCluster(3, str(tmp_path))
    conns = []
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        term = (await clients[leader].status())["term"]
        await clients[leader].put("warm", b"up")
        before = {i: memory_mib(p.pid) for i, p in cluster.procs.items()}
        ports = [int(a.rsplit(":", 1)[1]) for a in
                 list(cluster.raft.values()) + list(cluster.client.values())]
        acked = 0
        stop = False

        async def writer():
            nonlocal acked
            while not stop:
                try:
                    await clients[leader].put(f"k{acked}", b"v")
                    acked += 1
                except (ClientError, ConnectionError):
                    await asyncio.sleep(0.01)

        async def open_idle(n):
            for k in range(n):
                try:
                    conns.append((await asyncio.open_connection(
                        "127.0.0.1", ports[k % len(ports)]))[1])
                except OSError:
                    pass

        async def garbage(n):
            rng = random.Random(5)
            for k in range(n):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", ports[k % 6])
                except OSError:
                    continue
                if k % 2:
                    w.write(rng.randbytes(rng.randint(1, 8192)))
                else:  # the slow loris of issue 10: a huge frame announced, then zeros
                    w.write(struct.pack("<I", (64 << 20) - 1))
                    for _ in range(16):
                        w.write(bytes(256 << 10))
                        try:
                            await w.drain()
                        except ConnectionError:
                            break
                conns.append(w)

        task = asyncio.ensure_future(writer())
        await asyncio.gather(*[open_idle(100) for _ in range(20)], garbage(100))
        during = acked
        await wait_until(lambda: acked >= during + 500, 30, "writes during the flood")
        after = {i: memory_mib(p.pid) for i, p in cluster.procs.items()}
        stop = True
        await task
        assert (await clients[leader].status())["term"] == term
        for i in cluster.ids:
            assert after[i] - before[i] < FLOOD_RSS_MIB, (i, before[i], after[i])
        for c in clients.values():
            c.close()
    finally:
        for w in conns:
            w.close()
        cluster.stop_all()
