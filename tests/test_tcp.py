"""TcpNetwork on 127.0.0.1: delivery, coalescing, and hostile input closing only the bad
connection while the node keeps serving."""
import asyncio
import logging
import socket
import struct

import pytest

from fastraft import kv
from fastraft.config import Config
from fastraft.errors import ConfigError
from fastraft.messages import AppendEntries, Entry, RequestVote
from fastraft.node import RaftNode
from fastraft.processes import free_ports
from fastraft.storage import MemoryStorage
from fastraft.testing import wait_until
from fastraft.transport.tcp import TcpNetwork
from fastraft.wire import BlobCache, decode_messages, encode_messages

from aio import run
from rawpeer import connect, frame, section, unused_port

# Three nodes share one event loop with 500 proposals in flight: a loop turn long enough to
# pass a 100-200 ms election timeout deposed the leader once in CI, and the test asks every
# node for a read at the end. Timeouts as the other one-leader tests use.
STEADY = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05)


class Sink:
    def __init__(self):
        self.got = []

    def receive(self, frm, messages):
        self.got.extend((frm, m) for m in messages)


async def pair(cluster_b="fastraft"):
    a = TcpNetwork(1, "127.0.0.1:0")
    b = TcpNetwork(2, "127.0.0.1:0", cluster_id=cluster_b)
    sa, sb = Sink(), Sink()
    await a.start(sa)
    await b.start(sb)
    a.set_peers({2: b.listen})
    b.set_peers({1: a.listen})
    return a, b, sa, sb


@run
async def test_messages_arrive_coalesced_with_entries_as_views():
    a, b, sa, sb = await pair()
    msgs = [AppendEntries(1, 1, 0, 0, [Entry(1, 1, 0, b"x" * 100), Entry(1, 2, 0, b"y" * 1000)],
                          0), RequestVote(1, 1, 0, 0)]
    for _ in range(50):
        a.send(2, msgs)
    await wait_until(lambda: len(sb.got) == 100)
    assert a.stats["frames_out"] <= 3  # everything queued in one loop turn: one frame
    frm, first = sb.got[0]
    assert frm == 1 and first == msgs[0]
    # a large payload is a view of the received frame; a small one a (cheaper) copy
    assert isinstance(first.entries[1].data, memoryview)
    assert isinstance(first.entries[0].data, bytes)
    await a.stop()
    await b.stop()


@pytest.mark.parametrize("payload", [
    b"\x00\x00\x00\x05garbage-bytes-that-are-not-msgpack",
    frame(b"\xc1\xc1\xc1"),  # shorter than a group section's header
    frame(section(b"\xc1\xc1\xc1")),
    frame(section(struct.pack("<I", 3) + b"\x93\x01\x02" + struct.pack("<I", 99))),  # blob cut
    frame(section(b"") + struct.pack("<QI", 1, 50) + b"short"),  # a section runs past the end
    struct.pack("<I", 1 << 30),  # oversized
])
@run
async def test_malformed_frames_close_only_that_connection(payload, caplog):
    a, b, sa, sb = await pair()
    _, writer, _ = await connect(b.port, 9)
    writer.write(payload)
    await writer.drain()
    with caplog.at_level(logging.WARNING, logger="fastraft.transport"):
        await wait_until(lambda: b.stats["bad_frames"] == 1)
    assert "closing connection" in caplog.text
    # the node keeps serving its real peer
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: len(sb.got) == 1)
    assert sb.got == [(1, RequestVote(1, 1, 0, 0))]
    writer.close()
    await a.stop()
    await b.stop()


@run
async def test_truncated_frame_then_disconnect_delivers_nothing():
    a, b, sa, sb = await pair()
    _, writer, _ = await connect(b.port, 9)
    body = encode_messages([RequestVote(1, 1, 0, 0)])
    writer.write(struct.pack("<I", len(body)) + body[:-3])
    await writer.drain()
    writer.close()
    a.send(2, [RequestVote(7, 1, 0, 0)])
    await wait_until(lambda: len(sb.got) == 1)
    assert sb.got == [(1, RequestVote(7, 1, 0, 0))]
    await a.stop()
    await b.stop()


@run
async def test_peer_of_another_cluster_is_refused(caplog):
    a, b, sa, sb = await pair(cluster_b="other")
    with caplog.at_level(logging.WARNING, logger="fastraft.transport"):
        a.send(2, [RequestVote(1, 1, 0, 0)])
        await wait_until(lambda: b.stats["refused"] >= 1)
    assert "cluster 'fastraft', not 'other'" in caplog.text
    assert sb.got == []
    await a.stop()
    await b.stop()


@run
async def test_a_node_whose_port_was_in_use_starts_once_it_is_free():
    """start() raised on a port in use but left the node counted as running, so the next
    start() returned at once: nothing listening, no timer armed, never a leader."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    address = f"127.0.0.1:{blocker.getsockname()[1]}"
    node = RaftNode(1, storage=MemoryStorage(), network=TcpNetwork(1, address),
                    state_machine=kv.KVStore(), config=STEADY)
    try:
        with pytest.raises(OSError):
            await node.start()
        assert not node.running
        blocker.close()
        await node.start()
        await node.initialize({1: address})
        await node.wait_for_leader(10)
        assert node.is_leader and await node.propose(kv.put("k", b"v")) is not None
    finally:
        blocker.close()
        await node.stop()


@run
async def test_reconnects_after_peer_restart():
    a, b, sa, sb = await pair()
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: len(sb.got) == 1)
    port = b.port
    await b.stop()
    b2 = TcpNetwork(2, f"127.0.0.1:{port}")
    sb2 = Sink()
    await b2.start(sb2)
    await heard_again(a, sb2)
    await a.stop()
    await b2.stop()


async def heard_again(a: TcpNetwork, sink: Sink) -> None:
    """Node 2, restarted, hears node 1 (whose dials back off meanwhile)."""
    async def keep_sending():
        while not sink.got:
            a.send(2, [RequestVote(2, 1, 0, 0)])
            await asyncio.sleep(0.01)
    await asyncio.wait_for(keep_sending(), 20)
    assert sink.got[0] == (1, RequestVote(2, 1, 0, 0))


@run
async def test_a_network_started_again_after_its_stop_listens_again():
    """A restart reusing the TcpNetwork object (a new RaftNode on the same storage and
    network): its stop closed the listening socket but kept it, and serve() then
    returned at once, so the restarted node heard no one (its own dials still went
    out)."""
    a, b, sa, sb = await pair()
    await b.stop()
    sb2 = Sink()
    await b.start(sb2)
    try:
        await heard_again(a, sb2)
    finally:
        await a.stop()
        await b.stop()


@run
async def test_unreachable_peer_costs_only_a_bounded_queue():
    a = TcpNetwork(1, "127.0.0.1:0", max_queue_messages=100)
    await a.start(Sink())
    dead = unused_port()
    a.set_peers({2: f"127.0.0.1:{dead}"})
    sent = []

    def send(group, message):
        sent.append(message)
        a.send_group(group, 2, [message])
    for k in range(1000):
        send(0, RequestVote(1, 1, k, 0))
    peer = a._peers[2]
    passes = 0
    drop_oldest = peer._drop_oldest

    def counted(count, size):
        nonlocal passes
        passes += 1
        drop_oldest(count, size)
    peer._drop_oldest = counted

    def kept():
        queued = [m for box in peer.pending.values() for m in box]
        assert len(queued) == peer.queued and a.stats["dropped"] + peer.queued == len(sent)
        return queued
    # the newest stay: cut to 7/8 of the bound whenever it is passed
    assert 87 <= peer.queued <= 100 and kept() == sent[-peer.queued:]
    # the bound is per peer, across groups: the oldest go first, whichever group sent them
    for k in range(30):
        send(7, RequestVote(2, 1, k, 0))
    assert 87 <= peer.queued <= 100 and kept() == sent[-peer.queued:]
    assert peer.pending[7] == sent[1000:]
    for k in range(100):
        send(8, RequestVote(3, 1, k, 0))
    assert 87 <= peer.queued <= 100 and kept() == sent[-peer.queued:]
    assert list(peer.pending) == [8]
    # one pass per 13 messages over the bound, not one per message
    assert passes <= 130 // 13 + 1
    await a.stop()


def _commits(got):
    """The commit index of each message, the probes' tags."""
    return [m.leader_commit for _, m in got]


def _probe(k, entry):
    """What a leader sends a follower that does not answer, once a heartbeat: the
    same entries again (a probe, §5.3)."""
    return AppendEntries(1, 1, 0, 0, [entry], k)


@run
async def test_what_waits_for_an_unreachable_peer_is_bounded_in_bytes_too():
    # A follower down behind a backlog is sent a probe of up to max_bytes_per_message
    # each heartbeat, and one mid-snapshot a chunk (a new copy) each: few messages, many
    # bytes. They wait within max_queue_bytes, the newest kept; once the peer is up they
    # arrive, and no frame exceeds its max_frame_bytes.
    port = unused_port()
    a = TcpNetwork(1, "127.0.0.1:0", max_queue_bytes=600_000, max_frame_bytes=1 << 20)
    b = TcpNetwork(2, f"127.0.0.1:{port}", max_frame_bytes=1 << 20)
    await a.start(Sink())
    try:
        a.set_peers({2: f"127.0.0.1:{port}"})
        entry = Entry(1, 1, 0, b"x" * 100_000)
        sent = [_probe(k, entry) for k in range(50)]  # 5 MB on the wire
        for m in sent:
            a.send(2, [m])
        peer = a._peers[2]
        queued = peer.pending[0]
        assert 4 <= len(queued) <= 6 and queued == sent[-len(queued):]
        assert a.stats["dropped"] == len(sent) - len(queued)
        sb = Sink()
        await b.start(sb)
        await wait_until(lambda: len(sb.got) == len(queued), 10)
        assert _commits(sb.got) == _commits((1, m) for m in queued)
        assert b.stats["bad_frames"] == 0
    finally:
        await a.stop()
        await b.stop()


@run
async def test_a_loop_turn_of_many_groups_leaves_in_frames_the_peer_accepts():
    # A host catching up many groups at once (after a restart) queues more for a peer in
    # one loop turn than one frame may carry: several frames, each within the limit.
    a = TcpNetwork(1, "127.0.0.1:0", max_frame_bytes=1 << 20)
    b = TcpNetwork(2, "127.0.0.1:0", max_frame_bytes=1 << 20)
    await a.serve()
    await b.serve()
    sinks = {g: Sink() for g in range(30)}
    for g, sink in sinks.items():
        await b.group(g).start(sink)
        a.group(g).set_peers({2: b.listen})
    try:
        a.send_group(0, 2, [RequestVote(1, 1, 0, 0)])
        await wait_until(lambda: len(sinks[0].got) == 1, 10)
        entry = Entry(1, 1, 0, b"y" * 100_000)
        frames = a.stats["frames_out"]
        for g in sinks:  # 6 MB in one turn
            a.send_group(g, 2, [_probe(g, entry), _probe(g + 100, entry)])
        await wait_until(lambda: sum(len(s.got) for s in sinks.values()) == 61, 10)
        assert b.stats["bad_frames"] == 0 and a.stats["frames_out"] - frames >= 6
        assert all(_commits(sink.got[-2:]) == [g, g + 100] for g, sink in sinks.items())
    finally:
        await a.stop()
        await b.stop()


@run
async def test_one_groups_loop_turn_larger_than_a_frame_leaves_in_frames_the_peer_accepts():
    # A single group queues more in one loop turn than one frame may carry (a leader
    # catching up a follower with big entries): its messages are split over frames.
    a = TcpNetwork(1, "127.0.0.1:0", max_frame_bytes=1 << 20)
    b = TcpNetwork(2, "127.0.0.1:0", max_frame_bytes=1 << 20)
    await a.serve()
    sink = Sink()
    await b.start(sink)
    a.set_peers({2: b.listen})
    try:
        a.send(2, [RequestVote(1, 1, 0, 0)])
        await wait_until(lambda: len(sink.got) == 1, 10)
        entry = Entry(1, 1, 0, b"z" * 100_000)
        frames = a.stats["frames_out"]
        a.send(2, [_probe(k, entry) for k in range(15)])  # 1.5 MB in one turn
        await wait_until(lambda: len(sink.got) == 16, 10)
        assert b.stats["bad_frames"] == 0 and a.stats["frames_out"] - frames >= 2
        assert _commits(sink.got[1:]) == list(range(15))
    finally:
        await a.stop()
        await b.stop()


@run
async def test_a_dialer_cancelled_at_any_moment_stops():
    # asyncio.run cancels what is left of a program that did not stop its network: the
    # dialer must end, whatever it was doing (asyncio.wait_for, up to Python 3.11, lost
    # a cancellation that came as a dial failed, and uvloop's refusals come at once).
    dead = unused_port()
    for turns in range(12):
        a = TcpNetwork(1, "127.0.0.1:0")
        await a.start(Sink())
        try:
            a.set_peers({2: f"127.0.0.1:{dead}"})
            a.send(2, [RequestVote(1, 1, 0, 0)])
            dialer = a._peers[2].connect_task
            for _ in range(turns):
                await asyncio.sleep(0)
            dialer.cancel()
            done, _ = await asyncio.wait({dialer}, timeout=5)
            assert done and dialer.cancelled(), f"dials on after {turns} loop turns"
        finally:
            await a.stop()


@run
async def test_three_nodes_over_tcp_in_one_loop():
    nets = {i: TcpNetwork(i, "127.0.0.1:0") for i in (1, 2, 3)}
    for net in nets.values():
        await net.start(None)
    members = {i: net.listen for i, net in nets.items()}
    for net in nets.values():
        await net.stop()
    stores = {i: kv.KVStore() for i in nets}
    nodes = {i: RaftNode(i, storage=MemoryStorage(), state_machine=stores[i], config=STEADY,
                         network=TcpNetwork(i, members[i])) for i in nets}
    for n in nodes.values():
        await n.start()
    for n in nodes.values():
        await n.initialize(members)
    lid = await nodes[1].wait_for_leader(10)
    leader = nodes[lid]
    await wait_until(lambda: leader.is_leader, 10)
    versions = await asyncio.gather(*[leader.propose(kv.put(f"k{k}", b"v")) for k in range(500)])
    for n in nodes.values():
        await n.read_index()
        assert stores[n.id].versions["k499"] == versions[-1]
    for n in nodes.values():
        await n.stop()


def test_entries_sent_to_several_followers_are_encoded_once():
    blobs = BlobCache()
    entries = [Entry(2, i, 0, b"x%d" % i) for i in range(5, 9)]
    to_a = AppendEntries(2, 1, 4, 2, entries, 3)
    to_b = AppendEntries(2, 1, 4, 2, list(entries), 4)  # same entries, another follower
    frame_a = encode_messages([to_a], blobs)
    frame_b = encode_messages([to_b], blobs)
    assert blobs.encode(entries) is blobs.encode(list(entries))  # one encoding, reused
    assert decode_messages(frame_a) == [to_a] and decode_messages(frame_b) == [to_b]
    # a different term at the same indexes is another log: never served from the cache
    other = [Entry(3, e.index, 0, b"y") for e in entries]
    assert decode_messages(encode_messages([AppendEntries(3, 1, 4, 2, other, 3)], blobs)) \
        == [AppendEntries(3, 1, 4, 2, other, 3)]
    # another group's log at the same indexes and terms is another log too
    mine = blobs.encode(entries, group=7)
    assert mine is not blobs.encode(entries) and mine == blobs.encode(entries)
    for k in range(BlobCache.MAX_BLOBS + 1):  # bounded in number
        blobs.encode([Entry(4, 100 + k, 0, b"")])
    assert len(blobs._blobs) <= BlobCache.MAX_BLOBS
    for k in range(3):  # and in bytes
        blobs.encode([Entry(5, 1000 + k, 0, bytes(BlobCache.MAX_BYTES // 2))])
    assert sum(map(len, blobs._blobs.values())) <= BlobCache.MAX_BYTES


@run
async def test_groups_share_one_connection_and_one_frame_per_loop_turn():
    a = TcpNetwork(1, "127.0.0.1:0")
    b = TcpNetwork(2, "127.0.0.1:0")
    await a.serve()
    await b.serve()
    sinks = {g: Sink() for g in (1, 2)}
    views = {g: b.group(g) for g in (1, 2)}
    for g, view in views.items():
        await view.start(sinks[g])
        view.set_peers({1: a.listen, 2: b.listen})
    a_views = {g: a.group(g) for g in (1, 2, 3)}
    for view in a_views.values():
        view.set_peers({1: a.listen, 2: b.listen})
    for k in range(10):  # one loop turn: three groups' messages for node 2
        for g, view in a_views.items():
            view.send(2, [RequestVote(g, 1, k, 0)])
    await wait_until(lambda: len(sinks[1].got) == 10 and len(sinks[2].got) == 10)
    await wait_until(lambda: b.stats["unknown_group"] == 10)  # group 3 is not on node 2
    assert sinks[1].got == [(1, RequestVote(1, 1, k, 0)) for k in range(10)]
    assert sinks[2].got == [(1, RequestVote(2, 1, k, 0)) for k in range(10)]
    assert a.stats["frames_out"] == 1 and b.stats["frames_in"] == 1
    assert len(b._inbound) == 1  # one connection for every group
    # a group that stops takes its peers with it only when no other group names them
    await views[1].stop()
    assert b.addresses == {1: a.listen}
    await views[2].stop()
    assert b.addresses == {}
    await a.stop()
    await b.stop()


@run
async def test_a_dial_nobody_answers_is_given_up_and_made_again():
    """A peer whose SYNs are dropped (here: a listener with a full accept queue; across a
    partition: any) would hold a dial for minutes, the kernel resending the SYN after 1,
    3, 7, ... s: the dial is given up after ``connect_timeout`` and made again, so the
    peer is reached soon after it can be."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    address = f"{host}:{port}"
    filler = socket.create_connection(listener.getsockname())  # the queue's one place
    a = TcpNetwork(1, "127.0.0.1:0", connect_timeout=0.2)
    await a.start(Sink())
    a.set_peers({2: address})
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: a.stats["connect_timeouts"] >= 2, timeout=10)
    filler.close()
    listener.close()
    b = TcpNetwork(2, address)
    sb = Sink()
    await b.start(sb)
    await wait_until(lambda: sb.got == [(1, RequestVote(1, 1, 0, 0))], timeout=10)
    await a.stop()
    await b.stop()


def test_transport_timeouts_must_be_positive():
    for name in ("unacked_timeout", "connect_timeout"):
        with pytest.raises(ConfigError, match=f"{name} must be > 0"):
            TcpNetwork(1, "127.0.0.1:0", **{name: 0})


@run
async def test_a_peers_new_connection_closes_its_older_ones():
    """A connection a peer gave up across a partition stays open on this side (nothing
    is sent on it from here, so nothing tells): the peer's next one replaces it, or every
    partition would leave one behind until ``max_connections`` locks the peer out."""
    b = TcpNetwork(2, "127.0.0.1:0")
    await b.start(Sink())
    old_reader, old_writer, welcome = await connect(b.port, 1)
    assert welcome is not None
    other_reader, other_writer, _ = await connect(b.port, 3)
    new_reader, new_writer, _ = await connect(b.port, 1)
    assert await asyncio.wait_for(old_reader.read(), 10) == b""  # closed by the node
    await wait_until(lambda: sorted(c.peer_id for c in b._inbound) == [1, 3])
    assert b.connections_from[1] == 2
    for writer in (old_writer, other_writer, new_writer):
        writer.close()
    await b.stop()


class ClosedTransport:
    """A connection the kernel gave up, before its ``connection_lost`` ran: uvloop raises
    on any write to it."""

    def is_closing(self):
        return True

    def get_write_buffer_size(self):
        return 0

    def write(self, data):
        raise RuntimeError("unable to perform operation: the handler is closed")

    writelines = write


@run
async def test_nothing_is_written_to_a_connection_lost_but_not_yet_reported():
    a, b, sa, sb = await pair()
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: len(sb.got) == 1)
    peer = a._peers[2]
    live, peer.transport = peer.transport, ClosedTransport()
    a.send(2, [RequestVote(1, 1, 1, 0)])
    peer.flush()
    a.keepalive()
    a.keepalive()  # the second one would send an empty frame
    assert peer.queued == 1  # kept for the next connection
    peer.transport = live
    peer.flush()
    await wait_until(lambda: len(sb.got) == 2)
    assert sb.got[1] == (1, RequestVote(1, 1, 1, 0))
    await a.stop()
    await b.stop()


def close_each_connection_after_its_handshake(monkeypatch):
    """Every network here closes each connection dialed to it a moment after the dialer
    saw its welcome: authenticated, then dropped."""
    from fastraft.transport import tcp
    authenticated = tcp._Inbound.authenticated

    def then_close(self, peer_id, address):
        asyncio.get_running_loop().call_later(0.02, self.close)
        return authenticated(self, peer_id, address)
    monkeypatch.setattr(tcp._Inbound, "authenticated", then_close)


async def dialing_a_peer_not_up(**backoff):
    """Node 1's network, sending to node 2 at a free port nobody listens on yet."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    a = TcpNetwork(1, "127.0.0.1:0", **backoff)
    await a.start(Sink())
    a.set_peers({2: address})
    a.send(2, [RequestVote(1, 1, 0, 0)])
    return a, a._peers[2], address


@run
async def test_a_connection_that_lived_starts_the_next_outage_at_the_shortest_backoff():
    """Dials to a peer that is down back off to ``backoff_max``; once a connection lived
    that long, the outage after it starts again from ``backoff_min`` (a peer back after a
    restart is reached at once, not up to 1.5 backoff_max later)."""
    a, peer, address = await dialing_a_peer_not_up(backoff_min=0.001, backoff_max=1.0)
    await wait_until(lambda: peer.retry_delay == 1.0, timeout=10)  # refused, doubling
    b = TcpNetwork(2, address)
    await b.start(Sink())
    await wait_until(lambda: peer.connected_at is not None, timeout=10)
    loop = asyncio.get_running_loop()
    await wait_until(lambda: loop.time() - peer.connected_at >= 1.0, timeout=10)
    first = peer.connected_at
    await b.stop()  # a restart: down, then back on the same port
    b = TcpNetwork(2, address)
    await b.start(Sink())
    await wait_until(lambda: peer.transport is not None and (peer.connected_at or 0) > first,
                     timeout=10)
    assert peer.retry_delay < 1.0  # the dials since the loss started from backoff_min
    await a.stop()
    await b.stop()


@run
async def test_a_peer_that_dials_us_is_dialed_at_once_not_after_the_backoff():
    """A node that starts after us dials us: we dial it back then, not when our backoff
    runs out (here 15 to 45 s: the deadline below is far shorter)."""
    a, peer, address = await dialing_a_peer_not_up(backoff_min=30.0, backoff_max=30.0)
    await wait_until(lambda: peer._wake is not None)  # refused, waiting out its backoff
    b = TcpNetwork(2, address)
    sb = Sink()
    await b.start(sb)
    b.set_peers({1: a.listen})
    b.send(1, [RequestVote(2, 2, 0, 0)])
    await wait_until(lambda: sb.got == [(1, RequestVote(1, 1, 0, 0))], timeout=5)
    await a.stop()
    await b.stop()


@run
async def test_peers_that_drop_each_others_connections_do_not_wake_each_others_dials(
        monkeypatch):
    """A dial from the peer cuts our backoff short once per outage, not on every one of
    its dials: two peers that each close the other's connections at once would otherwise
    dial back and forth with no pause."""
    close_each_connection_after_its_handshake(monkeypatch)
    a = TcpNetwork(1, "127.0.0.1:0", backoff_min=30.0, backoff_max=30.0)
    b = TcpNetwork(2, "127.0.0.1:0", backoff_min=0.001, backoff_max=0.05)
    await a.start(Sink())
    await b.start(Sink())
    a.set_peers({2: b.listen})
    b.set_peers({1: a.listen})
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: b.connections_from[1] == 1)
    b.send(1, [RequestVote(2, 2, 0, 0)])  # b dials a again and again, backing off to 50 ms
    await wait_until(lambda: a.connections_from[2] >= 8, timeout=10)
    assert b.connections_from[1] == 2  # a's first dial, and the one b's first dial woke
    await a.stop()
    await b.stop()


@run
async def test_a_peer_that_drops_each_connection_at_once_is_dialed_ever_less_often(
        monkeypatch):
    """Connections that authenticate and are closed at once do not start over from
    ``backoff_min`` each time: the dials keep backing off."""
    close_each_connection_after_its_handshake(monkeypatch)
    b = TcpNetwork(2, "127.0.0.1:0")
    await b.start(Sink())
    a = TcpNetwork(1, "127.0.0.1:0", backoff_min=0.001, backoff_max=1.0)
    await a.start(Sink())
    a.set_peers({2: b.listen})
    a.send(2, [RequestVote(1, 1, 0, 0)])
    await wait_until(lambda: b.connections_from[1] >= 6, timeout=10)
    assert a._peers[2].retry_delay >= 0.001 * 2 ** 4
    await a.stop()
    await b.stop()


@run
async def test_a_peer_that_refuses_the_handshake_after_a_lived_connection_is_backed_off():
    """A connection that lived, then dials whose handshake fails (the peer came back with
    another secret): only an authenticated connection counts as having lived, so the
    failed ones back off."""
    secret = b"s" * 16
    b = TcpNetwork(2, "127.0.0.1:0", secret=secret)
    await b.start(Sink())
    a = TcpNetwork(1, "127.0.0.1:0", secret=secret, backoff_min=0.001, backoff_max=0.05)
    await a.start(Sink())
    a.set_peers({2: b.listen})
    a.send(2, [RequestVote(1, 1, 0, 0)])
    peer = a._peers[2]
    await wait_until(lambda: peer.connected_at is not None)
    loop = asyncio.get_running_loop()
    await wait_until(lambda: loop.time() - peer.connected_at >= 0.05)
    await b.stop()
    b = TcpNetwork(2, b.listen, secret=b"t" * 16)
    await b.start(Sink())
    await wait_until(lambda: b.stats["refused"] >= 6, timeout=10)
    assert peer.retry_delay >= 0.001 * 2 ** 4
    await a.stop()
    await b.stop()
