"""``RaftNode.stop()``: when it returns, the node is done with its storage, which is the
caller's to close (or to start a new node on)."""
import asyncio
import socket
from typing import Any

import pytest

from fastraft import Config, RaftHost, RaftNode
from fastraft.errors import NodeStopped
from fastraft.snapshots import COPY_BYTES
from fastraft.storage import MemoryStorage
from fastraft.testing import wait_until
from fastraft.transport import MemoryHub, TcpNetwork

from aio import run

FAST = Config(election_timeout_min=0.05, election_timeout_max=0.1, heartbeat_interval=0.01,
              snapshot_interval=10, snapshot_trailing_entries=0)


class Recorder:
    def __init__(self):
        self.applied = []

    def apply(self, entries):
        self.applied.extend(bytes(e.data) for e in entries)
        return [e.index for e in entries]

    def snapshot(self):
        return b""

    def restore(self, data):
        self.applied = []


async def one_node(state_machine=None, storage=None):
    node = RaftNode(1, storage=storage or MemoryStorage(), network=MemoryHub().network(1),
                    state_machine=state_machine or Recorder(), config=FAST)
    await node.start()
    await node.initialize({1: "local:1"})
    await node.wait_for_leader()
    return node


def network_stop_waits_for(node, event):
    real = node.network.stop

    async def stop():
        await event.wait()
        await real()
    node.network.stop = stop


@run
async def test_a_second_stop_returns_when_the_first_has_ended():
    """The node stopping itself after a hook failed, and its user stopping it: the
    user's call returned at once while the node's own stop still wrote, and a user who
    then closed the storage made that write fail."""
    node = await one_node()
    release = asyncio.Event()
    network_stop_waits_for(node, release)
    first = asyncio.ensure_future(node.stop())
    await wait_until(lambda: not node._running, 5, "the first stop")
    second = asyncio.ensure_future(node.stop())
    for _ in range(10):
        await asyncio.sleep(0)
        assert not second.done()  # the first one waits for the network
    release.set()
    await second
    assert node._stopped  # the whole stop is done
    await first


class SlowSnapshot(Recorder):
    """A snapshot read a chunk per loop turn (``Applier._drain``), long enough for the
    node to begin stopping while it is read; ``read_out`` is set at its end."""

    def __init__(self):
        super().__init__()
        self.node = None
        self.stop = None
        self.read_out = asyncio.Event()

    def snapshot(self):
        state = {"left": 50}
        recorder = self

        class Stream:
            def read(self, n=-1):
                if recorder.stop is None:  # the first chunk: the node stops
                    recorder.stop = asyncio.get_running_loop().create_task(recorder.node.stop())
                if state["left"] == 0:
                    recorder.read_out.set()
                    return b""
                state["left"] -= 1
                return b"s" * COPY_BYTES

        return Stream()


class SeenStopping(MemoryStorage):
    """Memory storage that records snapshot saves begun while its node stops."""

    def __init__(self):
        super().__init__()
        self.node = None
        self.saved_while_stopping = []

    def save_snapshot(self, meta, data):
        if not self.node._running:
            self.saved_while_stopping.append(meta.last_included_index)
        super().save_snapshot(meta, data)


@run
async def test_a_snapshot_read_while_the_node_stops_is_not_saved():
    """A snapshot whose stream the node still read when it began to stop went to the
    writer anyway; when the writer had already finished, that save ran after stop()
    returned, on storage its user had closed (``StorageFailed`` and a traceback)."""
    sm, storage = SlowSnapshot(), SeenStopping()
    node = sm.node = storage.node = await one_node(sm, storage)
    network_stop_waits_for(node, sm.read_out)  # the stop goes on once the stream is read
    await asyncio.gather(*(node.propose(b"w%d" % k) for k in range(12)), return_exceptions=True)
    await wait_until(lambda: sm.stop is not None, 10, "a snapshot being taken")
    await sm.stop
    assert storage.saved_while_stopping == []
    assert storage.load_snapshot() is None and node._stopped


class GatedAppends(MemoryStorage):
    """Memory storage whose appends, once ``gate`` is cleared, wait for it to be set
    again (a slow disk); ``waiting`` is set while one waits."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def append_entries(self, entries):
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        super().append_entries(entries)


@run
async def test_a_stop_whose_caller_is_cancelled_goes_on_to_its_end():
    """``asyncio.wait_for(node.stop(), t)`` timing out, or a program cancelled while it
    stops: the caller stops waiting, the stop does not stop half way. It did: the write
    under way was cancelled (its entry never stored), and the apply task, the pending
    writes and ``wait_stopped`` were left as they were, for ever."""
    storage = GatedAppends()
    node = await one_node(storage=storage)
    storage.gate.clear()
    write = asyncio.ensure_future(node.propose(b"slow"))
    await asyncio.wait_for(storage.waiting.wait(), 10)
    stop = asyncio.ensure_future(node.stop())
    await wait_until(lambda: not node._running, 5, "the stop to begin")
    for _ in range(5):
        await asyncio.sleep(0)  # into the writer's wait for the write under way
    stop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stop
    assert not node._stopped
    storage.gate.set()
    await asyncio.wait_for(node.wait_stopped(), 10)
    assert [bytes(e.data) for e in storage.read_entries(3, 4)] == [b"slow"]
    try:
        assert await asyncio.wait_for(write, 10) == 3
    except NodeStopped:
        pass  # stopped before it knew: equally an answer
    await node.stop()  # a later call returns at once


async def a_host_stop_cancelled_while_a_write_waits() -> tuple[RaftHost, GatedAppends,
                                                                 RaftNode, RaftNode, Any]:
    """A host of two groups whose stop was cancelled while group 1's write waited for
    its storage (``storage.gate``, to set): the host, that storage, the two groups and
    the write."""
    host = RaftHost(1, network=TcpNetwork(1, "127.0.0.1:0"), balance_interval=None,
                    config=FAST)
    await host.start()
    storage = GatedAppends()
    slow = await host.create_group(1, {1: host.address}, state_machine=Recorder(),
                                   storage=storage)
    other = await host.create_group(2, {1: host.address}, state_machine=Recorder())
    for node in (slow, other):
        await node.wait_for_leader(10)
    storage.gate.clear()
    write = asyncio.ensure_future(slow.propose(b"slow"))
    await asyncio.wait_for(storage.waiting.wait(), 10)
    stop = asyncio.ensure_future(host.stop())
    await wait_until(lambda: not slow._running, 5, "the stop to begin")
    stop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stop
    return host, storage, slow, other, write


@run
async def test_a_host_stop_whose_caller_is_cancelled_goes_on_to_its_end():
    """The same for ``RaftHost.stop()``: it stopped its groups one by one, and a cancel
    left the rest running and the transport serving."""
    host, storage, slow, other, write = await a_host_stop_cancelled_while_a_write_waits()
    storage.gate.set()
    await asyncio.wait_for(other.wait_stopped(), 10)
    assert slow._stopped and [bytes(e.data) for e in storage.read_entries(3, 4)] == [b"slow"]
    await wait_until(lambda: host.network._server is None, 5, "the transport to stop")
    await asyncio.gather(write, return_exceptions=True)
    await host.stop()  # a later call returns once it is done


@run
async def test_a_host_started_while_its_stop_goes_on_starts_once_that_stop_ends():
    """start() right after a stop whose caller was cancelled: it used to start at once,
    the transport still up, and the stop then went on and closed it under the started
    host, which heard no one."""
    host, storage, slow, other, write = await a_host_stop_cancelled_while_a_write_waits()
    stopping = host._stopping
    starting = asyncio.ensure_future(host.start())
    with pytest.raises(asyncio.TimeoutError):  # the stop waits for the write: never done
        await asyncio.wait_for(asyncio.shield(starting), 0.5)
    storage.gate.set()
    await asyncio.wait_for(starting, 10)
    assert stopping.done() and host._running and host.network._server.is_serving()
    await asyncio.gather(write, return_exceptions=True)
    try:
        group = await host.create_group(3, {1: host.address}, state_machine=Recorder())
        await group.wait_for_leader(10)
        assert await group.propose(b"again") is not None
    finally:
        await host.stop()


@run
async def test_a_host_started_twice_runs_its_tasks_once():
    """A second start() (``async with`` on a host started already, or two at once)
    started a second liveness loop, which doubled the host's idle traffic."""
    host = RaftHost(1, network=TcpNetwork(1, "127.0.0.1:0"), config=FAST)
    await asyncio.gather(host.start(), host.start())
    try:
        tasks = list(host._tasks)
        loops = [t.get_coro().__qualname__ for t in tasks]
        assert "RaftHost._liveness_loop" in loops and len(set(loops)) == len(loops)
        async with host:
            assert host._tasks == tasks
    finally:
        await host.stop()


@run
async def test_a_host_whose_port_was_in_use_starts_once_it_is_free():
    """A start that failed (the port in use) must leave the host stopped, so that the
    next start() starts it rather than return at once, with nothing listening and
    none of its tasks running."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    address = f"127.0.0.1:{blocker.getsockname()[1]}"
    host = RaftHost(1, network=TcpNetwork(1, address), balance_interval=None, config=FAST)
    try:
        with pytest.raises(OSError):
            await host.start()
        blocker.close()
        await host.start()
        assert host.network._server.is_serving() and host._tasks
    finally:
        blocker.close()
        await host.stop()


class SlowToListen(TcpNetwork):
    """Its serve() waits for ``gate``, and counts the calls that go on to listen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.serves = 0

    async def serve(self) -> None:
        await self.gate.wait()
        self.serves += 1
        await super().serve()


@run
async def test_a_host_starting_is_started_once_and_takes_no_group_yet():
    """Two start() calls at once: the second waits for the first (it used to listen
    and run the host's tasks a second time); a group is refused until the host runs."""
    network = SlowToListen(1, "127.0.0.1:0")
    host = RaftHost(1, network=network, balance_interval=None, config=FAST)
    first = asyncio.ensure_future(host.start())
    second = asyncio.ensure_future(host.start())
    await asyncio.sleep(0)  # one loop turn: both reach their wait
    with pytest.raises(NodeStopped, match="not running"):
        await host.create_group(1, {1: "127.0.0.1:1"}, state_machine=Recorder())
    network.gate.set()
    try:
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert network.serves == 1 and len(host._tasks) == 1  # the liveness loop
        group = await host.create_group(1, {1: host.address}, state_machine=Recorder())
        await group.wait_for_leader(10)
    finally:
        await host.stop()


@run
async def test_a_host_stopped_while_it_starts_is_stopped_once_started():
    """stop() while start() waits to listen used to find nothing to stop, and the start
    then went on: a host running, listening, after its stop returned."""
    network = SlowToListen(1, "127.0.0.1:0")
    host = RaftHost(1, network=network, balance_interval=None, config=FAST)
    starting = asyncio.ensure_future(host.start())
    await asyncio.sleep(0)  # one loop turn: the start reaches its wait
    stopping = asyncio.ensure_future(host.stop())
    await asyncio.sleep(0)
    assert not stopping.done()
    network.gate.set()
    await asyncio.wait_for(asyncio.gather(starting, stopping), 5)
    assert not host._running and network._server is None and not host._tasks
