"""The client port's framing: a loop turn's pipelined requests (or answers) leave in frames
the other side accepts and decodes in short turns, whatever their number and size."""
import asyncio

import msgspec
import pytest

from fastraft import kv, kvservice
from fastraft.config import Config
from fastraft.errors import InvalidArgument, NodeStopped, ProposalDropped
from fastraft.kvclient import ClientError, KVClient
from fastraft.kvprotocol import FRAME_BYTES, FRAME_ITEMS, MAX_FRAME
from fastraft.kvservice import KVServer
from fastraft.processes import free_ports
from fastraft.testing import LocalCluster, wait_until

from aio import run
from rawpeer import unused_port

CONFIG = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02)


class _Port:
    """One node's client port, a client connected to it, and the sizes (in items) of the
    frames the server received."""

    def __init__(self, monkeypatch, **server_options) -> None:
        self.server_options = server_options
        self.frames: list[int] = []
        frame = kvservice._ClientConnection.frame

        def counted(conn, body):
            self.frames.append(len(msgspec.msgpack.decode(body)))
            return frame(conn, body)
        monkeypatch.setattr(kvservice._ClientConnection, "frame", counted)

    async def __aenter__(self):
        self.cluster = LocalCluster(1, state_machine=kv.KVStore, config=CONFIG)
        c = await self.cluster.__aenter__()
        leader = await c.leader()
        address = f"127.0.0.1:{free_ports(1)[0]}"
        self.server = KVServer(leader, c.state_machines[leader.id], address,
                               **self.server_options)
        await self.server.start()
        self.client = await KVClient.connect(address)
        return self

    async def __aexit__(self, *exc):
        self.client.close()
        self.server.close()
        await self.cluster.__aexit__(*exc)


@run
async def test_a_burst_of_small_requests_travels_in_frames_of_bounded_count(monkeypatch):
    async with _Port(monkeypatch) as port:
        versions = await asyncio.wait_for(asyncio.gather(
            *(port.client.put(f"k{i}", b"v") for i in range(3 * FRAME_ITEMS + 5))), 30)
        assert len(set(versions)) == 3 * FRAME_ITEMS + 5
        assert port.frames == [FRAME_ITEMS] * 3 + [5]


@run
async def test_a_burst_larger_than_a_frame_is_answered_on_the_same_connection(monkeypatch):
    """200 puts of 100 KB written in one loop turn: 20 MB, past ``MAX_FRAME`` in one
    frame (the server closed the connection and every put failed)."""
    async with _Port(monkeypatch) as port:
        value = b"x" * 100_000
        puts = [port.client.put(f"k{i}", value) for i in range(200)]
        assert 200 * len(value) > MAX_FRAME
        await asyncio.wait_for(asyncio.gather(*puts), 30)
        assert len(port.frames) >= 200 * len(value) // FRAME_BYTES
        assert await port.client.get("k199") == value


@run
async def test_answers_larger_than_a_frame_reach_the_client(monkeypatch):
    """Records answers of 1 MB each, asked for at once: the server's answers of one loop
    turn outgrew a frame, and the client closed the connection."""
    async with _Port(monkeypatch) as port:
        record = b"r" * 1_000_000
        offsets = [await port.client.append(record) for _ in range(20)]
        got = await asyncio.wait_for(asyncio.gather(
            *(port.client.records(o, limit=1) for o in offsets)), 30)
        assert got == [[(o, record)] for o in offsets]


@run
async def test_a_request_too_large_for_any_frame_is_refused_before_it_is_sent(monkeypatch):
    async with _Port(monkeypatch) as port:
        with pytest.raises(InvalidArgument, match="does not fit in a frame"):
            await port.client.put("big", b"x" * MAX_FRAME)
        assert port.frames == []
        assert await port.client.put("small", b"v") > 0  # the connection still serves


@run
async def test_a_key_or_value_of_another_type_is_refused_and_the_others_are_served(
        monkeypatch):
    """Sent, a str value made the node close the connection as malformed input: every
    other request on it failed with ConnectionError."""
    async with _Port(monkeypatch) as port:
        others = [asyncio.ensure_future(port.client.put(f"k{i}", b"v")) for i in range(20)]
        for call, match in ((lambda: port.client.put("k", "text"), "put's value is bytes, "
                                                                   "not str"),
                            (lambda: port.client.put(b"k", b"v"), "put's key is a str, not "
                                                                  "bytes"),
                            (lambda: port.client.get(7), "get's key is a str, not int"),
                            (lambda: port.client.delete(None), "del's key is a str")):
            with pytest.raises(InvalidArgument, match=match):
                await call()
        assert len(set(await asyncio.wait_for(asyncio.gather(*others), 30))) == 20
        assert await port.client.put("ok", bytearray(b"v")) > 0


@run
async def test_a_connect_cancelled_at_any_moment_is_cancelled():
    # asyncio.wait_for (up to Python 3.11) lost a cancellation that came as the dial
    # failed, and uvloop refuses a dead port at once: the caller got the refusal instead.
    dead = f"127.0.0.1:{unused_port()}"
    for turns in range(12):
        connecting = asyncio.ensure_future(KVClient.connect(dead))
        for _ in range(turns):
            await asyncio.sleep(0)
        if connecting.done():  # refused before the cancellation came: nothing to test
            assert isinstance(connecting.exception(), ConnectionRefusedError)
            continue
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=5)
        assert connecting.cancelled(), f"not cancelled after {turns} loop turns"


@run
async def test_a_connect_cancelled_during_the_handshake_closes_its_connection():
    gone = asyncio.Event()
    accepted = asyncio.Event()

    async def silent(reader, writer):
        accepted.set()
        await reader.read()  # b"" once the client closes
        gone.set()
        writer.close()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        connecting = asyncio.ensure_future(KVClient.connect(f"127.0.0.1:{port}", timeout=30))
        await asyncio.wait_for(accepted.wait(), 5)
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=5)
        assert connecting.cancelled()
        await asyncio.wait_for(gone.wait(), 5)  # long before the handshake timeout
    finally:
        server.close()


@run
async def test_a_redirect_names_the_leaders_client_port_or_says_it_is_not_known():
    """A follower's not_leader reply names the leader's client address when the node was
    given it, and otherwise says that the address it has is the leader's Raft port, which
    a client cannot use (a node added later, not in this node's --clients)."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=CONFIG) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n.id != leader.id)
        await wait_until(lambda: follower.engine.leader_id == leader.id, 10.0,
                         "the follower knowing its leader")
        told, untold = f"127.0.0.1:{free_ports(1)[0]}", f"127.0.0.1:{free_ports(1)[0]}"
        servers = [KVServer(follower, c.state_machines[follower.id], told,
                            client_addresses={leader.id: "10.0.0.1:7001"}),
                   KVServer(follower, c.state_machines[follower.id], untold)]
        for server in servers:
            await server.start()
        try:
            answers = []
            for address in (told, untold):
                client = await KVClient.connect(address)
                with pytest.raises(ClientError) as info:
                    await client.put("k", b"v")
                client.close()
                answers.append(info.value)
        finally:
            for server in servers:
                server.close()
        raft_address = c.members[leader.id]
        assert answers[0].leader_client_address == "10.0.0.1:7001"
        assert str(answers[0]) == f"not_leader (leader {leader.id} at 10.0.0.1:7001)"
        assert answers[1].leader == leader.id and answers[1].leader_client_address is None
        assert answers[1].leader_address == raft_address
        assert f"at {raft_address}" not in str(answers[1])
        assert f"Raft address {raft_address}" in str(answers[1])
        assert "not known to this node" in str(answers[1])


class _Unread(_Port):
    """A one-node cluster's client port with ``max_unread_bytes``, a 256 KiB value in it,
    a client that has stopped reading, and the number of requests the server started."""

    VALUE = b"v" * (256 << 10)

    def __init__(self, monkeypatch, max_unread_bytes: int) -> None:
        super().__init__(monkeypatch, max_unread_bytes=max_unread_bytes)
        self.started = 0
        start = kvservice._ClientConnection._start

        def counted(conn, req):
            self.started += 1
            return start(conn, req)
        monkeypatch.setattr(kvservice._ClientConnection, "_start", counted)

    async def __aenter__(self):
        await super().__aenter__()
        await self.client.put("big", self.VALUE)
        self.client.transport.pause_reading()
        return self

    def unread_bytes(self) -> int:
        return sum(c.transport.get_write_buffer_size() for c in self.server.unread
                   if c.transport is not None)


@pytest.mark.parametrize("failure, answer", [
    (ProposalDropped("replaced", committed=False), "not_committed"),
    (NodeStopped("not appended", committed=False), "not_committed"),
    (ProposalDropped("may or may not"), "ProposalDropped: may or may not"),
    (ProposalDropped("committed", committed=True), "ProposalDropped: committed"),
    (NodeStopped("may or may not"), "NodeStopped: may or may not"),
])
@run
async def test_a_write_known_not_committed_is_answered_so_and_only_such_a_write(
        monkeypatch, failure, answer):
    """A write that certainly never takes effect is answered not_committed, which a
    client may send again; one whose fate is unknown, or that was committed, is answered
    with the node's error as it is."""
    async with _Port(monkeypatch) as port:
        async def failing(data):
            raise failure
        monkeypatch.setattr(port.server.shards[0][0], "propose", failing)
        with pytest.raises(ClientError) as answered:
            await port.client.put("k", b"v")
        assert answered.value.error == answer


@run
async def test_a_client_that_leaves_its_answers_unread_is_served_no_more(monkeypatch):
    """Once a client's answers pile up unread (its connection's buffer above the high-water
    mark), the port starts none of its requests, however many it sends: the node's memory
    does not grow with what a client asks and does not read."""
    async with _Unread(monkeypatch, max_unread_bytes=256 << 20) as port:
        gets = []

        def batch_answered_or_unread() -> bool:
            return bool(port.server.unread) or (not port.server.requests
                                                and port.started == len(gets) + 1)
        for _ in range(100):  # 800 answers of 256 KiB if all were served
            gets += [asyncio.ensure_future(port.client.get("big")) for _ in range(8)]
            await wait_until(batch_answered_or_unread, 10.0, "the batch answered")
            if port.server.unread:
                break
        assert port.server.unread, "200 MiB of answers were all taken in by the kernel"
        started = port.started
        for _ in range(20):  # more requests, and a second client's round trips meanwhile
            gets += [asyncio.ensure_future(port.client.get("big")) for _ in range(8)]
            other = await KVClient.connect(port.server.listen)
            assert await other.put("small", b"s") > 0
            other.close()
        # the other client's 20 puts, none of the silent one's
        assert port.started == started + 20, "started more of the silent client's requests"
        assert port.unread_bytes() <= started * len(port.VALUE)
        for get in gets:
            get.cancel()
        await asyncio.gather(*gets, return_exceptions=True)


@run
async def test_the_connection_that_takes_the_unread_answers_past_the_bound_is_closed(
        monkeypatch):
    """Answers of requests already in progress still come once reading stopped: the
    connection that takes the port's unread bytes past ``max_unread_bytes`` is closed
    (aborted: its buffer freed), and the port serves others as before."""
    async with _Unread(monkeypatch, max_unread_bytes=4 << 20) as port:
        gets = [asyncio.ensure_future(port.client.get("big")) for _ in range(128)]  # 32 MiB
        await wait_until(lambda: port.server.stats["refused"] == 1, 10.0,
                         "the connection closed")
        assert not port.server.unread
        port.client.transport.resume_reading()  # now it sees what came, then the reset
        answers = await asyncio.gather(*gets, return_exceptions=True)
        assert all(a == port.VALUE or isinstance(a, ConnectionError) for a in answers)
        assert isinstance(answers[-1], ConnectionError)
        other = await KVClient.connect(port.server.listen)
        assert await other.get("big") == port.VALUE
        other.close()


@run
async def test_a_port_shut_down_answers_what_it_began_and_names_what_it_never_began(
        monkeypatch):
    """``KVServer.shutdown``: the requests it started are answered, then its closing
    notice fails the rest with ``ClientError("closing")``; none is left to a lost
    connection, and none of those it named was applied."""
    async with _Port(monkeypatch) as port:
        puts = [asyncio.ensure_future(port.client.put(f"k{n}", b"v")) for n in range(5000)]
        conn = next(iter(port.server.connections))
        await wait_until(lambda: conn.backlog and conn.in_progress, 10,
                         "requests started and more read")
        await port.server.shutdown()
        results = await asyncio.gather(*puts, return_exceptions=True)
        answered = [n for n, r in enumerate(results) if isinstance(r, int)]
        never = [n for n, r in enumerate(results)
                 if isinstance(r, ClientError) and r.error == "closing"]
        assert answered and never and len(answered) + len(never) == len(puts), results[-1]
        assert max(answered) < min(never)  # in the order sent
        store = port.cluster.state_machines[port.server.node.id]
        assert all(store.get(f"k{n}") == b"v" for n in answered)
        assert not any(store.get(f"k{n}") is not None for n in never)
        assert "shut down before it began the request" in str(results[never[0]])
        assert port.client.closed
