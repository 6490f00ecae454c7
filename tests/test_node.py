"""RaftNode end to end, in one process over the in-memory network."""
import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import pytest
from msgspec.structs import replace

from fastraft import kv
from fastraft.config import Config
from fastraft.engine import Apply, ApplyStored
from fastraft.errors import (
    AlreadyInitialized,
    ConfigError,
    EntryTooLarge,
    InvalidArgument,
    NodeFailed,
    NodeStopped,
    NotLeader,
    Overloaded,
    ProposalDropped,
)
from fastraft.messages import (
    AppendEntries,
    Entry,
    EntryKind,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
)
from fastraft.node import RaftNode
from fastraft.node.applier import MAX_APPLY_BATCH, Restore
from fastraft.replicatedlog import ReplicatedLog
from fastraft.storage import AsyncMemoryStorage, MemoryStorage
from fastraft.testing import LocalCluster, wait_until
from fastraft.transport import MemoryHub

from aio import run

FAST = Config(election_timeout_min=0.05, election_timeout_max=0.1, heartbeat_interval=0.01)
#: FAST, with snapshots only when asked for and nothing of the log kept behind them.
SNAPSHOTS_BY_HAND = replace(FAST, snapshot_interval=0, snapshot_trailing_entries=0)


class Recorder:
    """State machine that records what it applied, in order."""

    def __init__(self):
        self.applied = []

    def apply(self, entries):
        self.applied.extend((e.index, bytes(e.data)) for e in entries)
        return [e.index for e in entries]

    def snapshot(self):
        return b""

    def restore(self, data):
        self.applied = []


class AsyncRecorder(Recorder):
    async def apply(self, entries):
        await asyncio.sleep(0)
        return Recorder.apply(self, entries)


@pytest.mark.parametrize("storage", [MemoryStorage, AsyncMemoryStorage])
@pytest.mark.parametrize("sm", [Recorder, AsyncRecorder])
@run
async def test_replicates_to_every_node_sync_and_async_hooks(storage, sm):
    async with LocalCluster(3, state_machine=sm, storage=storage, config=FAST) as c:
        leader = await c.leader()
        results = await asyncio.gather(*[leader.propose(b"w%d" % k) for k in range(200)])
        assert results == sorted(results) and len(set(results)) == 200
        batch = await leader.propose_batch([b"b1", b"b2", b"b3"])
        assert batch == [results[-1] + 1, results[-1] + 2, results[-1] + 3]
        await wait_until(lambda: all(n.applied_index >= batch[-1] for n in c.nodes.values()))
        expected = [(i, b"w%d" % k) for k, i in enumerate(results)]
        for sm_ in c.state_machines.values():
            assert sm_.applied[:200] == expected
            assert [d for _, d in sm_.applied[200:]] == [b"b1", b"b2", b"b3"]


@run
async def test_follower_redirects_with_leader_address():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        await wait_until(lambda: follower.engine.leader_id == leader.id)
        with pytest.raises(NotLeader) as info:
            await follower.propose(b"x")
        assert info.value.leader_id == leader.id
        assert info.value.leader_address == f"local:{leader.id}"


@run
async def test_proposals_are_ordered_by_call_not_by_await():
    """propose() queues the command when called; awaiting only collects the result."""
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        first = leader.propose(b"first")
        second_index = await leader.propose(b"second")
        first_index = await first
        assert first_index < second_index
        data = [d for _, d in c.state_machines[leader.id].applied]
        assert data.index(b"first") < data.index(b"second")


@run
async def test_failover_keeps_every_acknowledged_write():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        acked = {}
        for k in range(50):
            acked[f"k{k}"] = await leader.propose(kv.put(f"k{k}", b"v%d" % k))
        old = leader.id
        c.hub.isolate(old)
        new = await c.leader(exclude={old})
        assert new.id != old
        for k in range(50, 100):
            acked[f"k{k}"] = await new.propose(kv.put(f"k{k}", b"v%d" % k))
        # the old leader, cut off, cannot commit anything: its proposals fail, never hang
        with pytest.raises((ProposalDropped, NotLeader)):
            await asyncio.wait_for(c.nodes[old].propose(kv.put("lost", b"x")), 5)
        c.hub.heal()
        await wait_until(lambda: c.nodes[old].applied_index >= new.applied_index)
        for sm in c.state_machines.values():
            for key, version in acked.items():
                assert sm.versions[key] == version
            assert "lost" not in sm.data


@run
async def test_restart_with_storage_rebuilds_state_machine():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        for k in range(30):
            await leader.propose(kv.put(f"k{k}", b"v"))
        follower_id = next(i for i in c.nodes if i != leader.id)
        await wait_until(lambda: c.nodes[follower_id].applied_index >= leader.applied_index)
        node = await c.restart(follower_id)
        await wait_until(lambda: node.applied_index >= leader.applied_index)
        assert c.state_machines[follower_id].data == c.state_machines[leader.id].data
        # and it keeps up with new writes after the restart
        v = await leader.propose(kv.put("after", b"restart"))
        await wait_until(lambda: node.applied_index >= v)
        assert c.state_machines[follower_id].get("after") == b"restart"


@run
async def test_restart_the_whole_cluster():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        last = 0
        for k in range(20):
            last = await leader.propose(kv.put(f"k{k}", b"v"))
        for i in list(c.nodes):
            await c.nodes[i].stop()
        for i in list(c.nodes):
            c.nodes[i] = c._make(i)
            await c.nodes[i].start()
        leader = await c.leader()
        await wait_until(lambda: leader.applied_index >= last)
        assert len(c.state_machines[leader.id].data) == 20


@run
async def test_read_index_is_linearizable_from_any_node():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        for node in c.nodes.values():
            await wait_until(lambda node=node: node.engine.leader_id == leader.id)
        for k in range(20):
            version = await leader.propose(kv.put("x", b"%d" % k))
            for node in c.nodes.values():
                # a read that starts after the write was acknowledged must see it
                index = await node.read_index()
                assert index >= version
                assert node.applied_index >= version
                assert c.state_machines[node.id].get("x") == b"%d" % k


async def lone_node(state_machine: Any = None, storage: Any = None) -> RaftNode:
    """A started node (fresh memory storage and a ``Recorder`` unless given), alone on its
    own hub."""
    node = RaftNode(1, storage=MemoryStorage() if storage is None else storage,
                    network=MemoryHub().network(1),
                    state_machine=Recorder() if state_machine is None else state_machine,
                    config=FAST)
    await node.start()
    return node


async def lone_leader(state_machine: Any = None, storage: Any = None) -> RaftNode:
    """``lone_node``, founding a cluster of one, and leading it."""
    node = await lone_node(state_machine, storage)
    await node.initialize({1: "local:1"})
    await node.wait_for_leader(5)
    return node


class SnapshotStreams(MemoryStorage):
    """Memory storage that keeps every snapshot stream it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[Any] = []

    def load_snapshot(self) -> Any:
        loaded = super().load_snapshot()
        if loaded is not None:
            self.opened.append(loaded[1])
        return loaded


class SlowToOpen(SnapshotStreams):
    """Its load_state waits while ``gate`` is clear (a disk slow to answer at start) and
    counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = open_gate()
        self.loads = 0

    async def load_state(self) -> Any:
        self.loads += 1
        await self.gate.wait()
        return MemoryStorage.load_state(self)


async def snapshotted_storage() -> SlowToOpen:
    """A lone node's storage with a snapshot (a start opens its stream)."""
    storage = SlowToOpen()
    node = await lone_leader(storage=storage)
    for k in range(5):
        await node.propose(b"%d" % k)
    await node.snapshot()
    await node.stop()
    storage.gate.clear()
    storage.loads = 0
    return storage


def refusing_network() -> Any:
    """A memory network whose start() fails, as a TCP one's does on a port in use."""
    network = MemoryHub().network(1)

    async def refuse(node: Any) -> None:
        raise OSError("address in use")
    network.start = refuse  # type: ignore[method-assign]
    return network


@run
async def test_a_start_that_fails_leaves_the_node_stopped_and_closes_what_it_opened():
    """A network that fails to start fails start(): the node is not running (a second
    start() is a start, not a no-op) and the snapshot stream it opened is closed."""
    storage = await snapshotted_storage()
    storage.gate.set()
    again = RaftNode(1, storage=storage, network=refusing_network(), state_machine=Recorder(),
                     config=FAST)
    opened = len(storage.opened)
    with pytest.raises(OSError, match="address in use"):
        await again.start()
    assert not again.running
    assert len(storage.opened) > opened and all(s.closed for s in storage.opened[opened:])
    with pytest.raises(NodeStopped, match="never started"):  # not a wait for ever
        await asyncio.wait_for(again.wait_stopped(), 5)


@run
async def test_a_stopped_node_is_not_started_again():
    """Its parts stop for good (the apply task among them): start() after stop() used to
    give a node that took proposals and never answered them. A restart is a new
    RaftNode on the same storage."""
    node = await lone_leader()
    await node.stop()
    with pytest.raises(NodeStopped, match="restart it as a new RaftNode"):
        await node.start()
    again = RaftNode(1, storage=node.storage, network=MemoryHub().network(1),
                     state_machine=Recorder(), config=FAST)
    await again.start()
    await again.wait_for_leader(5)
    assert await again.propose(b"after") is not None
    await again.stop()


@run
async def test_a_stop_while_the_node_starts_waits_for_the_start_and_stops_it():
    """stop() during start() used to return at once (a no-op: not running yet); the
    start then finished and left a node running, on storage its caller may have closed.
    The stop now waits for the start, which stops the node and raises NodeStopped."""
    storage = await snapshotted_storage()
    hub = MemoryHub()
    node = RaftNode(1, storage=storage, network=hub.network(1), state_machine=Recorder(),
                    config=FAST)
    starting = asyncio.ensure_future(node.start())
    await wait_until(lambda: storage.loads, 5, "the start reading its storage")
    opened = len(storage.opened)
    stopping = asyncio.ensure_future(node.stop())
    await wait_until(lambda: node._stop_requested, 5, "the stop to wait for the start")
    assert not stopping.done()
    storage.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert starting.done()
    with pytest.raises(NodeStopped, match="node 1 was stopped while it started"):
        await starting
    assert not node.running and node.status()["running"] is False
    assert 1 not in hub.nodes  # its network was stopped
    assert len(storage.opened) > opened and all(s.closed for s in storage.opened[opened:])
    await asyncio.wait_for(node.wait_stopped(), 5)
    with pytest.raises(NodeStopped, match="restart it as a new RaftNode"):
        await node.start()


@run
async def test_a_second_start_while_the_node_starts_waits_for_the_first():
    """It used to start the node a second time over the first (two engines, two apply
    tasks on one storage)."""
    storage = await snapshotted_storage()
    node = RaftNode(1, storage=storage, network=MemoryHub().network(1),
                    state_machine=Recorder(), config=FAST)
    first = asyncio.ensure_future(node.start())
    await wait_until(lambda: storage.loads, 5, "the first start reading its storage")
    second = asyncio.ensure_future(node.start())
    await asyncio.sleep(0)  # one loop turn: the second start reaches its wait
    assert not second.done()
    storage.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert storage.loads == 1 and node.running
    await node.wait_for_leader(5)
    assert await node.propose(b"once started") is not None
    await node.stop()


@run
async def test_a_stop_while_a_start_fails_returns_and_the_start_raises_its_own_error():
    storage = await snapshotted_storage()
    node = RaftNode(1, storage=storage, network=refusing_network(), state_machine=Recorder(),
                    config=FAST)
    starting = asyncio.ensure_future(node.start())
    await wait_until(lambda: storage.loads, 5, "the start reading its storage")
    stopping = asyncio.ensure_future(node.stop())
    await wait_until(lambda: node._stop_requested, 5, "the stop to wait for the start")
    storage.gate.set()
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError, match="address in use"):
        await starting
    assert not node.running and all(s.closed for s in storage.opened)


class HeldInThread(Recorder):
    """Its synchronous snapshot and restore (run in threads) wait until ``release`` is
    set, while ``hold_snapshots`` / ``hold_restores`` say so; ``events`` says in what
    order they went (from any thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_snapshots = self.hold_restores = False
        self.held = threading.Event()
        self.release = threading.Event()
        self.events: list[str] = []

    def _hold(self, if_: bool) -> None:
        if if_:
            self.held.set()
            self.release.wait(10)

    def snapshot(self):
        self.events.append("snapshot begun")
        self._hold(self.hold_snapshots)
        self.events.append("snapshot taken")
        return b""

    def restore(self, data):
        self._hold(self.hold_restores)
        data.read()  # the spool is still open
        Recorder.restore(self, data)
        self.events.append("restored")


class ThreadPerCall(concurrent.futures.Executor):
    """Runs each call in a thread of its own, begun at once: a call submitted is a call
    made (a pool may leave it queued, and a stop then cancels it before it runs)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def call() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
        threading.Thread(target=call, daemon=True).start()
        return future


async def stop_while_held(node: RaftNode, sm: HeldInThread) -> None:
    """Stop ``node`` while the state machine is held: the stop waits for the thread."""
    await wait_until(sm.held.is_set, 5, "the state machine's call under way")
    stopping = asyncio.ensure_future(node.stop())
    with pytest.raises(asyncio.TimeoutError):  # it waits for the thread: never done
        await asyncio.wait_for(asyncio.shield(stopping), 0.5)
    sm.release.set()
    await asyncio.wait_for(stopping, 10)
    sm.events.append("stopped")


@run
async def test_a_stop_waits_for_a_snapshot_the_state_machine_takes_in_a_thread():
    """stop() cancelled the apply task waiting on the thread that runs a synchronous
    snapshot(): the stop returned while the state machine was still being read."""
    sm = HeldInThread()
    sm.hold_snapshots = True
    node = await lone_leader(state_machine=sm)
    await node.propose(b"x")
    snapshotted = asyncio.ensure_future(node.snapshot())
    await stop_while_held(node, sm)
    assert sm.events[-2:] == ["snapshot taken", "stopped"]
    with pytest.raises(NodeStopped):
        await snapshotted
    assert node.storage.load_state().snapshot is None  # not saved: the node stopped


@run
async def test_a_stop_waits_for_a_restore_in_a_thread_and_begins_nothing_after_it():
    """A follower restoring the leader's snapshot in a thread when it stops: the stop
    used to return at once and close the snapshot's spool under the restore. It now
    waits for the restore; the entries queued behind it may be applied, but the
    snapshot they make due (one every entry here) is not begun."""
    asyncio.get_running_loop().set_default_executor(ThreadPerCall())
    async with LocalCluster(3, state_machine=HeldInThread, config=replace(
            SNAPSHOTS_BY_HAND, snapshot_interval=1)) as c:
        leader, follower = await written_to(c)
        sm = c.state_machines[follower.id]
        c.hub.isolate(follower.id)
        for k in range(20):
            await leader.propose(b"b%d" % k)
        await wait_until(lambda: leader.engine.log.snapshot_index
                         > follower.engine.log.last_index, 5, "compaction")
        sm.hold_restores = True
        c.hub.heal()
        await wait_until(sm.held.is_set, 5, "the follower restoring the leader's snapshot")
        last = max([await leader.propose(b"c%d" % k) for k in range(3)])
        await wait_until(lambda: follower._applier.committed_index >= last, 5,
                         "entries queued behind the restore")
        await stop_while_held(follower, sm)
        after = sm.events.index("restored")
        with pytest.raises(TimeoutError):  # (a thread begun would say so at once)
            await wait_until(lambda: "snapshot begun" in sm.events[after:], 0.5)
        assert sm.events[after:] == ["restored", "stopped"]
        assert follower.failure is None


@run
async def test_read_index_without_leader_raises_not_leader():
    """At once, as a proposal does: not after waiting out the read's timeout for a
    leader (the deadline here is far below the read's)."""
    node = await lone_node()
    with pytest.raises(NotLeader):
        await asyncio.wait_for(node.read_index(timeout=60), 10)
    await node.stop()


def test_a_read_the_leader_does_not_confirm_in_time_says_so_in_the_log(caplog):
    """NotLeader to the caller (it asks again), and a line for the operator: a read
    that timed out left no trace (a chaos run's final read failed so, and the logs
    could not say why)."""
    cfg = Config(election_timeout_min=1.0, election_timeout_max=2.0, heartbeat_interval=0.1)

    @run
    async def scenario():
        async with LocalCluster(3, state_machine=Recorder, config=cfg) as c:
            leader = await c.leader()
            follower = next(n for n in c.nodes.values() if n is not leader)
            c.hub.isolate(follower.id)  # it still follows the leader for a while
            with pytest.raises(NotLeader) as caught:
                await follower.read_index(timeout=0.1)
            assert caught.value.leader_id == leader.id

    with caplog.at_level(logging.WARNING, logger="fastraft"):
        scenario()
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "read_timeout"]
    assert "a read was not confirmed within 0.10s (follower, leader" in line.getMessage()


def lose_the_next(node: RaftNode, kind: type, lost: list[Any]) -> None:
    """``node`` drops the next message of type ``kind`` it sends (kept in ``lost``)."""
    send = node.network.send

    def sending(to: int, messages: list[Any]) -> None:
        for m in messages:
            if type(m) is kind and not any(type(x) is kind for x in lost):
                lost.append(m)
        kept = [m for m in messages if not any(m is x for x in lost)]
        if kept:
            send(to, kept)
    node.network.send = sending  # type: ignore[method-assign]


@run
async def test_a_follower_asks_again_for_a_read_whose_request_or_answer_was_lost():
    """As etcd's read loop: a read forwarded to the leader whose request or answer is
    lost (with a connection that broke, say) is asked again and completes, instead of
    failing with NotLeader after four election timeouts."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        await wait_until(lambda: follower.engine.leader_id == leader.id)
        lost: list[Any] = []
        version = await leader.propose(kv.put("x", b"1"))
        lose_the_next(follower, ReadIndexRequest, lost)
        assert await follower.read_index() >= version
        version = await leader.propose(kv.put("x", b"2"))
        lose_the_next(leader, ReadIndexResponse, lost)
        assert await follower.read_index() >= version
        assert [type(m) for m in lost] == [ReadIndexRequest, ReadIndexResponse]
        assert c.state_machines[follower.id].get("x") == b"2"
        assert not follower._reads._asking_again  # nothing left ticking


@run
async def test_a_read_that_a_change_of_leader_fails_is_asked_of_the_new_leader():
    """A read in flight when leadership moves (a host handing a group to its preferred
    leader, an election) completes through the new leader instead of failing NotLeader:
    the old leader never gets the follower's requests here, so only the new one can
    confirm it."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        follower, target = [n for n in c.nodes.values() if n is not leader]
        await wait_until(lambda: follower.engine.leader_id == leader.id)
        version = await leader.propose(kv.put("x", b"1"))
        send = follower.network.send
        held: list[Any] = []

        def sending(to: int, messages: list[Any]) -> None:
            if to == leader.id:
                held.extend(m for m in messages if type(m) is ReadIndexRequest)
                messages = [m for m in messages if type(m) is not ReadIndexRequest]
            if messages:
                send(to, messages)
        follower.network.send = sending  # type: ignore[method-assign]
        read = asyncio.ensure_future(follower.read_index())
        await wait_until(lambda: held)
        await leader.transfer_leadership(target.id)
        assert await read >= version
        assert follower.metrics().reads_retried == 1


@run
async def test_a_read_the_leader_refuses_is_not_asked_again():
    """The leader refuses a forwarded read (as with too many reads pending): the refusal
    reaches the caller as NotLeader naming that leader (a client backs off and
    retries), not a retry loop."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        await wait_until(lambda: follower.engine.leader_id == leader.id)
        send = leader.network.send

        def refusing(to: int, messages: list[Any]) -> None:
            send(to, [replace(m, ok=False, read_index=0) if type(m) is ReadIndexResponse
                      else m for m in messages])
        leader.network.send = refusing  # type: ignore[method-assign]
        with pytest.raises(NotLeader) as caught:
            await follower.read_index()
        assert caught.value.leader_id == leader.id
        assert follower.metrics().reads_retried == 0


@run
async def test_back_pressure_raises_overloaded_instead_of_growing():
    cfg = Config(election_timeout_min=0.05, election_timeout_max=0.1, heartbeat_interval=0.01,
                 max_pending_proposals=10, overload_wait=0.2, check_quorum=False)
    async with LocalCluster(3, state_machine=Recorder, config=cfg) as c:
        leader = await c.leader()
        others = [n.id for n in c.nodes.values() if n is not leader]
        c.hub.partition({leader.id}, set(others))  # nothing can commit
        tasks = [asyncio.ensure_future(leader.propose(b"x")) for _ in range(10)]
        await wait_until(lambda: leader._proposals.pending == 10)
        with pytest.raises(Overloaded):
            await leader.propose(b"one too many")
        assert leader._proposals.pending == 10
        c.hub.heal()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


@run
async def test_a_proposer_waiting_for_room_learns_at_once_that_leadership_is_lost():
    # cut off, the leader steps down (check-quorum) with nothing applied meanwhile: the
    # proposer waiting for room hears NotLeader then, not Overloaded a minute later
    cfg = Config(election_timeout_min=0.05, election_timeout_max=0.1, heartbeat_interval=0.01,
                 max_pending_proposals=10, overload_wait=60)
    async with LocalCluster(3, state_machine=Recorder, config=cfg) as c:
        leader = await c.leader()
        c.hub.isolate(leader.id)
        tasks = [asyncio.ensure_future(leader.propose(b"x")) for _ in range(10)]
        await wait_until(lambda: leader._proposals.pending == 10)
        waiting = asyncio.ensure_future(leader.propose(b"one too many"))
        with pytest.raises(NotLeader):
            await asyncio.wait_for(waiting, 10)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ProposalDropped) for r in results), results


@run
async def test_stop_fails_everything_pending_and_nothing_hangs():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        c.hub.isolate(leader.id)
        pending = [asyncio.ensure_future(leader.propose(b"x")) for _ in range(5)]
        await asyncio.sleep(0)
        await leader.stop()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, (NodeStopped, ProposalDropped)) for r in results)
        with pytest.raises(NodeStopped):
            await leader.propose(b"y")


@run
async def test_a_stop_tells_each_proposer_whether_its_entry_may_still_commit():
    """A leader stopped with proposals pending cannot know their fate: one whose entry is
    in its log (its followers may hold it, and a later leader commit it) hears that it
    may or may not be committed, so a retry is the caller's choice; one still buffered
    for the next flush was never appended and hears that it was not."""
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        c.hub.isolate(leader.id)  # nothing commits
        appended = leader.propose(b"in the log")
        leader._flush()  # appended now, even if a message had a flush scheduled already
        buffered = leader.propose(b"buffered")  # for the flush scheduled for next turn
        assert leader._proposals.buffered and leader._proposals.waiting
        await leader.stop()
        with pytest.raises(NodeStopped, match="it may or may not be committed") as unknown:
            await appended
        with pytest.raises(NodeStopped, match="it was not committed") as not_committed:
            await buffered
        assert unknown.value.committed is None and not_committed.value.committed is False
        assert leader._proposals.pending == 0
        for refused in (leader.propose(b"after"), leader.propose_batch([b"a", b"b"])):
            with pytest.raises(NodeStopped, match="is not running") as stopped:
                await refused
            assert stopped.value.committed is False


class FailsOn(Recorder):
    """Raises when it applies ``b"boom"``: a broken user state machine."""

    def apply(self, entries):
        if any(bytes(e.data) == b"boom" for e in entries):
            raise RuntimeError("state machine bug")
        return super().apply(entries)


@run
async def test_a_reader_of_committed_entries_learns_that_the_node_failed():
    """committed() ended as if the node had been stopped: the consumer could not tell."""
    node = await lone_leader(FailsOn())
    await node.propose(b"fine")
    seen = []

    async def read():
        async for e in node.committed():
            seen.append(bytes(e.data))
    reader = asyncio.ensure_future(read())
    await wait_until(lambda: seen == [b"fine"], 5)
    with pytest.raises(NodeStopped):
        await node.propose(b"boom")
    with pytest.raises(NodeFailed, match="state machine failed"):
        await asyncio.wait_for(reader, 5)


@run
async def test_wait_stopped_waits_for_the_stop_alone():
    """``fastraft node`` waits on every group's ``wait_stopped`` for as long as it runs:
    a waiter woken by each apply (as ``_progress`` waiters are) costs a task step per
    commit, per group."""
    node = await lone_leader()
    stopped = asyncio.ensure_future(node.wait_stopped())
    await asyncio.sleep(0)
    for k in range(3):
        await node.propose(b"%d" % k)
    await asyncio.sleep(0)  # a waiter woken by the apply has waited again by now
    assert node._progress is None  # nobody waits on progress: no wake-up per apply
    assert not stopped.done()
    await node.stop()
    await asyncio.wait_for(stopped, 5)


@run
async def test_nothing_is_applied_after_an_entry_the_state_machine_failed():
    """Entries committed after a failed one, before the node's stop has run (the same
    loop turn: another AppendEntries read with it), were applied: the state machine then
    held a later entry without the failed one, and a durable one would have recorded an
    applied index past an entry it never applied."""
    sm = FailsOn()
    node = await lone_leader(sm)
    index = await node.propose(b"fine")
    term = node.engine.term
    for k, data in enumerate((b"boom", b"after"), start=index + 1):
        # as the engine hands committed entries over, one Apply per message read
        node._runner.run([Apply([Entry(term, k, EntryKind.NORMAL, data)])])
    await wait_until(lambda: not node._running, 5, "the failed node to stop")
    assert sm.applied[-1] == (index, b"fine")


class FailsAsMoreIsCommitted(Recorder):
    """An async state machine that raises on ``b"boom"``; as it raises, the next entry
    is committed (a message read in the loop turn the apply task ends in)."""

    node: RaftNode

    async def apply(self, entries):
        if any(bytes(e.data) == b"boom" for e in entries):
            last = entries[-1]
            after = Entry(last.term, last.index + 1, EntryKind.NORMAL, b"after")
            self.node._loop.call_soon(self.node._runner.run, [Apply([after])])
            raise RuntimeError("state machine bug")
        return super().apply(entries)


@run
async def test_nothing_is_applied_after_an_entry_an_async_state_machine_failed():
    """The same through the apply task: an entry committed after the task failed and
    ended, before the node's stop reached the applier, started a new task."""
    async with LocalCluster(3, state_machine=FailsAsMoreIsCommitted, config=FAST) as c:
        for i, sm in c.state_machines.items():
            sm.node = c.nodes[i]
        leader = await c.leader()
        await leader.propose(b"fine")
        with pytest.raises(NodeStopped):
            await leader.propose(b"boom")
        # a new apply task, once started, runs until it has applied what it was given
        await wait_until(lambda: not leader._running and leader._applier._task is None, 5,
                         "the failed node to stop, with no apply task left")
        assert c.state_machines[leader.id].applied[-1][1] == b"fine"


@run
async def test_a_failing_state_machine_stops_the_node_and_proposals_fail_fast():
    async with LocalCluster(3, state_machine=FailsOn, config=FAST) as c:
        leader = await c.leader()
        await leader.propose(b"fine")
        with pytest.raises(NodeStopped):
            await leader.propose(b"boom")  # failed by the stop the failure triggers
        # until that stop has run, and after it, new proposals fail instead of queueing
        with pytest.raises(NodeStopped):
            await leader.propose(b"after")
        await wait_until(lambda: not leader._running, 5, "the failed node to stop")
        assert b"after" not in [d for _, d in c.state_machines[leader.id].applied]


class Miscounts(Recorder):
    """Returns, for an entry of ``b"none"``, None (a forgotten return); of ``b"short"``,
    one result too few."""

    def apply(self, entries):
        results = super().apply(entries)
        data = bytes(entries[-1].data)
        return None if data == b"none" else results[:-1] if data == b"short" else results


@run
@pytest.mark.parametrize("data, message", [
    (b"none", r"apply returned NoneType, not one result per entry \(a list\)"),
    (b"short", "apply returned 0 results for 1 entries")])
async def test_a_state_machine_that_miscounts_its_results_stops_the_node_saying_so(
        data, message):
    async with LocalCluster(1, state_machine=Miscounts, config=FAST) as c:
        node = await c.leader()
        with pytest.raises(NodeFailed, match=f"failed applying entry 3: TypeError.*{message}"):
            await node.propose(data)


@run
async def test_initialize_is_idempotent_and_refuses_other_state():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        node = c.nodes[1]
        await node.initialize(c.members)  # same members: nothing happens
        with pytest.raises(AlreadyInitialized):
            await node.initialize({1: "local:1"})


@run
async def test_a_founder_that_voted_before_its_initialize_still_initializes():
    """Found by tests/test_driver_faults.py: founders start, then each initializes; one
    whose storage was slow got a founder's vote request first (a term, a vote, no log)
    and its initialize() raised AlreadyInitialized, though it held nothing that could
    differ from the founding entry."""
    hub = MemoryHub()
    members = {i: f"local:{i}" for i in (1, 2, 3)}
    nodes = {i: RaftNode(i, storage=MemoryStorage(), network=hub.network(i),
                         state_machine=Recorder(), config=FAST) for i in members}
    for node in nodes.values():
        await node.start()
    try:
        nodes[2].receive(1, [RequestVote(2, 1, 1, 1)])
        await wait_until(lambda: nodes[2].engine.term == 2, 5, "the vote")
        assert nodes[2].engine.log.last_index == 0
        for node in nodes.values():
            await node.initialize(members)
        assert nodes[2].engine.term == 2 and nodes[2].engine.voted_for == 1
        deadline = time.monotonic() + 10
        while True:  # a leader elected on a loaded machine may lose its term at once
            leader = nodes[await nodes[3].wait_for_leader(5)]
            try:
                index = await leader.propose(b"formed")
                break
            except (NotLeader, ProposalDropped):
                assert time.monotonic() < deadline, "no write committed"
                await asyncio.sleep(0.01)
        await wait_until(lambda: all(n.applied_index >= index for n in nodes.values()), 5)
        with pytest.raises(AlreadyInitialized):
            await nodes[2].initialize({2: "local:2"})
    finally:
        for node in nodes.values():
            await node.stop()


@run
async def test_initialize_stays_idempotent_after_the_founding_entry_is_compacted():
    cfg = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02,
                 snapshot_interval=20, snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg) as c:
        leader = await c.leader()
        await asyncio.gather(*[leader.propose(kv.put(f"k{i}", b"v")) for i in range(100)])
        node = await c.restart(1)
        await wait_until(lambda: node.engine.log.snapshot_index > 1, 10, "compaction")
        await node.initialize(c.members)  # a restart with the founding members: no-op
        with pytest.raises(AlreadyInitialized):
            await node.initialize({1: "local:1"})


@run
async def test_single_node_cluster_and_status():
    node = await lone_node()
    await node.initialize({1: "local:1"})
    assert await node.wait_for_leader(5) == 1
    await wait_until(lambda: node.is_leader)
    assert await node.propose(b"solo") >= 2
    st = node.status()
    assert st["role"] == "leader" and st["leader_id"] == 1 and st["commit_index"] >= 3
    assert st["membership"]["voters"] == [1]
    await node.stop()


@run
async def test_committed_iterator_replays_and_follows():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        first = await leader.propose(b"a")
        follower = next(n for n in c.nodes.values() if n is not leader)
        seen = []

        async def consume():
            async for e in follower.committed(first):
                seen.append(bytes(e.data))
                if len(seen) == 3:
                    return
        task = asyncio.ensure_future(consume())
        await leader.propose(b"b")
        await leader.propose(b"c")
        await asyncio.wait_for(task, 10)
        assert seen == [b"a", b"b", b"c"]


@run
async def test_wrong_arguments_raise_invalid_argument_and_change_nothing():
    with pytest.raises(InvalidArgument, match="positive ints"):
        RaftNode(0, storage=MemoryStorage(), network=MemoryHub().network(1),
                 state_machine=Recorder(), config=FAST)
    class ApplyOnly:
        def apply(self, entries):
            return [None] * len(entries)

    for kwargs, match in (({"storage": None}, "storage must be a RaftStorage: NoneType has no "
                                              "append_entries, compact_prefix"),
                          ({"network": object()}, "network must be a RaftNetwork: object has no "
                                                  "send, set_peers, start, stop"),
                          ({"state_machine": ApplyOnly()}, "state_machine must be a "
                                                           "StateMachine: ApplyOnly has no "
                                                           "restore, snapshot$"),
                          ({"config": {"heartbeat_interval": 0.01}}, "config must be a "
                                                                     "fastraft.Config, got dict")):
        hooks = {"storage": MemoryStorage(), "network": MemoryHub().network(1),
                 "state_machine": Recorder(), "config": FAST, **kwargs}
        with pytest.raises(InvalidArgument, match=match):
            RaftNode(1, **hooks)
    async with LocalCluster(3, state_machine=Recorder, config=FAST, spares=1) as c:
        leader = await c.leader()
        with pytest.raises(InvalidArgument, match="must include this node"):
            await leader.initialize({7: "nowhere"})
        with pytest.raises(InvalidArgument, match="map node ids to addresses, got .1, 2, 3."):
            await leader.initialize([1, 2, 3])
        with pytest.raises(InvalidArgument, match="addresses are non-empty strs"):
            await leader.initialize({leader.id: "x" * 2000})
        await leader.add_learner(4, c.addresses[4])
        before = leader.engine.membership
        with pytest.raises(InvalidArgument, match="already a member"):
            await leader.add_learner(2, c.addresses[2])
        # what the wire cannot carry would leave followers a configuration they cannot
        # decode
        for bad_id in (0, True, 1 << 63, "5"):
            with pytest.raises(InvalidArgument, match="node ids are positive ints"):
                await leader.add_learner(bad_id, "somewhere:1")
        for bad_address in ("", "x" * 1025, None):
            with pytest.raises(InvalidArgument, match="addresses are non-empty strs"):
                await leader.add_learner(5, bad_address)
        with pytest.raises(InvalidArgument, match="not members"):
            await leader.change_membership({1, 2, 3, 9})
        with pytest.raises(InvalidArgument, match="at least one voter"):
            await leader.change_membership(set())
        with pytest.raises(InvalidArgument, match="only voters can lead"):
            await leader.transfer_leadership(4)
        stream = ReplicatedLog(leader)
        with pytest.raises(InvalidArgument, match="offsets start at 1"):
            stream.subscribe(0)
        with pytest.raises(InvalidArgument, match="interval must be positive"):
            await leader.watch_metrics(interval=-1).__anext__()
        with pytest.raises(InvalidArgument, match="start_index is an int of at least 1"):
            await leader.committed(0).__anext__()
        with pytest.raises(InvalidArgument, match="max_records is an int of at least 1, got 'x'"):
            await stream.read(1, "x")
        # a timeout that is no number of seconds is refused before anything is done: a
        # step-down used to hand the leadership over, then raise a TypeError
        for bad in ("1", -1, 0, float("nan"), True):
            for call in (leader.step_down, leader.hand_over,
                         lambda t: leader.transfer_leadership(2, t),
                         leader.read_index, leader.wait_for_leader,
                         lambda t: leader.remove_learner(4, t)):
                with pytest.raises(InvalidArgument, match="timeout is a positive number"):
                    await call(bad)
        assert leader.engine.membership == before and leader.is_leader
        assert await leader.propose(kv.put("k", b"v")) is not None


@run
async def test_a_payload_that_is_not_bytes_is_refused_and_the_node_goes_on():
    """Before, ``propose(123)`` was queued, raised inside the node's flush and left its
    log and storage apart: the node stopped itself with a storage error."""
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        term = leader.engine.term
        for bad in (123, "text", None, [b"x"]):
            with pytest.raises(InvalidArgument, match=f"bytes .*not {type(bad).__name__}"):
                await leader.propose(bad)
            with pytest.raises(InvalidArgument, match="entry 1 of the batch"):
                await leader.propose_batch([b"first", bad, b"third"])
        with pytest.raises(InvalidArgument, match="a list of bytes.*not one bytes"):
            await leader.propose_batch(b"bytes are not a batch")
        with pytest.raises(InvalidArgument, match="a list of bytes.*not one bytes"):
            await ReplicatedLog(leader).append(b"one record")
        # any iterable goes, a generator too
        assert len(await leader.propose_batch(b"%d" % k for k in range(3))) == 3
        index = await leader.propose(b"after")
        assert leader.is_leader and leader.engine.term == term and leader.failure is None
        await wait_until(lambda: all(sm.applied and sm.applied[-1] == (index, b"after")
                                     for sm in c.state_machines.values()))
        # nothing of a refused batch went in: the first entry of each was good
        assert all(b"first" not in dict(sm.applied).values()
                   for sm in c.state_machines.values())


@run
async def test_a_buffer_proposed_is_copied_so_changing_it_later_changes_no_entry():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        one, many = bytearray(b"one"), [bytearray(b"two"), memoryview(bytearray(b"three"))]
        pending = leader.propose(one), leader.propose_batch(many)
        one[:] = b"ONE"  # before the node's next loop turn takes the proposals
        many[0][:] = b"TWO"
        many[1][:] = b"THREE"
        index = await pending[0]
        indexes = await pending[1]
        want = [(index, b"one"), (indexes[0], b"two"), (indexes[1], b"three")]
        await wait_until(lambda: all(sm.applied[-3:] == want
                                     for sm in c.state_machines.values()))


@run
async def test_an_entry_larger_than_the_config_allows_is_refused_whole():
    config = replace(FAST, max_entry_bytes=100)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        leader = await c.leader()
        with pytest.raises(EntryTooLarge, match=r"101 bytes .*\(Config.max_entry_bytes is 100\)"):
            await leader.propose(b"x" * 101)
        with pytest.raises(EntryTooLarge, match="entry 2 of the batch: an entry of 101"):
            await leader.propose_batch([b"a", b"b", b"x" * 101])
        assert await leader.propose_batch([b"y" * 100]) == [leader.applied_index]
        assert await leader.propose(b"z" * 100) == leader.applied_index
        # propose checks a size when the node takes its loop turn's proposals: the ones
        # around a refused one go on, in order
        calls = [leader.propose(b"a"), leader.propose(b"b" * 101), leader.propose_batch([b"c"]),
                 leader.propose(b"d"), leader.propose(b"e" * 101)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results[1::3]] == [EntryTooLarge, EntryTooLarge]
        first = results[0]
        assert results[2] == [first + 1] and results[3] == first + 2
        assert [d for _, d in c.state_machines[leader.id].applied[-3:]] == [b"a", b"c", b"d"]
        assert leader._proposals.pending == 0
    with pytest.raises(ConfigError, match="max_entry_bytes must be >= 1"):
        Config(max_entry_bytes=0)


@run
async def test_an_entry_no_follower_could_receive_is_refused_and_the_leader_stays():
    """An entry larger than the followers' frames made every follower close the
    connection: the leader lost its leadership and the entry was dropped."""
    async with LocalCluster(3, state_machine=Recorder, config=FAST, transport="tcp",
                            tcp_options={"max_frame_bytes": 64 << 10}) as c:
        leader = await c.leader()
        term = leader.engine.term
        with pytest.raises(EntryTooLarge, match=r"max_frame_bytes is 65536, less 4096"):
            await leader.propose(b"x" * (64 << 10))
        # the largest entry it takes does reach every follower
        index = await leader.propose(b"y" * ((64 << 10) - 4096))
        await wait_until(lambda: all(sm.applied and sm.applied[-1][0] == index
                                     for sm in c.state_machines.values()))
        assert leader.is_leader and leader.engine.term == term


class PowerCut(MemoryStorage):
    """Memory storage whose machine loses power at the ``cut``-th write call from when
    it is armed: that call and every later one fail, what came before stays."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.cut: int | None = None

    def _write(self, name: str) -> None:
        self.calls.append(name)
        if self.cut is not None and len(self.calls) >= self.cut:
            raise OSError("power cut")

    def append_entries(self, entries: list[Any]) -> None:
        self._write("append_entries")
        super().append_entries(entries)

    def save_hard_state(self, hard_state: Any) -> None:
        self._write("save_hard_state")
        super().save_hard_state(hard_state)

    def save_snapshot(self, meta: Any, data: Any) -> None:
        self._write("save_snapshot")
        super().save_snapshot(meta, data)


class AsyncPowerCut(PowerCut):
    """The same behind coroutine methods."""

    async def append_entries(self, entries: list[Any]) -> None:
        PowerCut.append_entries(self, entries)

    async def save_hard_state(self, hard_state: Any) -> None:
        PowerCut.save_hard_state(self, hard_state)

    async def load_state(self) -> Any:
        return PowerCut.load_state(self)


@pytest.mark.parametrize("storage_class", [PowerCut, AsyncPowerCut])
@run
async def test_a_power_cut_inside_initialize_leaves_a_node_that_initializes_again(
        storage_class):
    """A batch reaches storage log first, hard state last (``write_order``): cut between
    the two, initialize() leaves the founding entry without its term, which a restart
    accepts as initialized. The other way round it would leave term 1 without the
    entry: no configuration, and initialize() refusing the node (AlreadyInitialized).
    With a coroutine storage, initialize() used to wait for ever for the failed batch."""
    storage = storage_class()
    members = {1: "local:1"}
    node = RaftNode(1, storage=storage, network=MemoryHub().network(1),
                    state_machine=Recorder(), config=FAST)
    await node.start()
    storage.calls.clear()
    storage.cut = 2  # the second write of initialize()'s batch fails
    with pytest.raises(NodeStopped):
        await asyncio.wait_for(node.initialize(members), 5)
    assert storage.calls == ["append_entries", "save_hard_state"]
    storage.cut = None
    again = RaftNode(1, storage=storage, network=MemoryHub().network(1),
                     state_machine=Recorder(), config=FAST)
    await again.start()
    await again.initialize(members)  # the same members: formed already
    await again.wait_for_leader(5)
    assert await again.propose(b"after the cut") is not None
    await again.stop()


@run
async def test_a_snapshot_storage_cannot_save_fails_snapshot_with_the_nodes_failure():
    """snapshot() waited forever when storage failed to save the snapshot: the node
    stopped itself, but nothing answered the call."""
    storage = PowerCut()
    node = await lone_leader(storage=storage)
    for k in range(5):
        await node.propose(b"%d" % k)
    storage.calls.clear()
    storage.cut = 1
    with pytest.raises(NodeFailed, match="storage write failed"):
        await asyncio.wait_for(node.snapshot(), 5)
    assert storage.calls == ["save_snapshot"]
    with pytest.raises(NodeFailed):
        await asyncio.wait_for(node.wait_stopped(), 5)
    with pytest.raises(NodeFailed, match="storage write failed"):  # says why, not just "stopped"
        await node.snapshot()


class SlowSnapshots(Recorder):
    """Its snapshot() waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.taking = asyncio.Event()

    async def snapshot(self) -> bytes:
        self.taking.set()
        await self.release.wait()
        return b""


@run
async def test_stop_fails_the_snapshot_calls_still_waiting():
    """One snapshot() being taken and one queued behind it when stop() runs: both raise
    NodeStopped, neither waits forever."""
    machine = SlowSnapshots()
    node = await lone_leader(machine)
    await node.propose(b"x")
    taking = asyncio.ensure_future(node.snapshot())
    await asyncio.wait_for(machine.taking.wait(), 5)
    queued = asyncio.ensure_future(node.snapshot())
    await asyncio.sleep(0)  # let it reach the apply queue
    await node.stop()
    for call in (taking, queued):
        with pytest.raises(NodeStopped):
            await asyncio.wait_for(call, 5)


def open_gate() -> asyncio.Event:
    gate = asyncio.Event()
    gate.set()
    return gate


class GatedApply(Recorder):
    """Its apply waits while ``gate`` is clear (open at first). ``gaps``: applies that did
    not start right after the entry applied before them (a restore starts afresh)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = open_gate()
        self.gaps: list[tuple[int, int]] = []
        self._last: int | None = None

    async def apply(self, entries):
        await self.gate.wait()
        if self._last is not None and entries[0].index != self._last + 1:
            self.gaps.append((self._last, entries[0].index))
        self._last = entries[-1].index
        return Recorder.apply(self, entries)

    def restore(self, data):
        Recorder.restore(self, data)
        self._last = None


class Gated(MemoryStorage):
    """A memory storage whose ``gate`` (open at first) its subclass's writes wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = open_gate()


class GatedAppends(Gated):
    """Its append_entries waits while ``gate`` is clear."""

    async def append_entries(self, entries):
        await self.gate.wait()
        MemoryStorage.append_entries(self, entries)


async def written_to(c: LocalCluster) -> tuple[RaftNode, RaftNode]:
    """The leader, after ten writes, and one of its followers."""
    leader = await c.leader()
    for k in range(10):
        await leader.propose(b"a%d" % k)
    follower = next(n for n in c.nodes.values() if n is not leader)
    return leader, follower


async def restored_once_the_disk_is_free(leader: RaftNode, follower: RaftNode,
                                         disk: asyncio.Event) -> None:
    """The follower's apply task reaches the Restore of the snapshot it installed, which
    waits for its save; the disk frees; the follower catches up without failing."""
    await wait_until(lambda: Restore not in map(type, follower._applier.queue)
                     or follower.failure, 5, "the apply task reaching the Restore")
    disk.set()
    await wait_until(lambda: follower.applied_index >= leader.applied_index, 5,
                     "catching up")
    assert follower.failure is None


@run
async def test_a_leader_keeps_its_quorum_and_serves_reads_while_its_followers_disks_stall():
    """Both followers' writes stall for several election timeouts (a slow disk, as a
    cloud volume's fsync can be): their answers to the leader's heartbeats and probes
    claim only what is on disk, so they leave at once, not behind the stalled write. The
    leader keeps its quorum (check-quorum, §6.2) and its term, confirms reads (§6.4),
    and commits the stalled write once the disks are back."""
    from fastraft.engine import Role

    cfg = Config(check_quorum=True)
    async with LocalCluster(3, state_machine=Recorder, storage=GatedAppends,
                            config=cfg) as c:
        leader, _ = await written_to(c)
        term, last = leader.engine.term, leader.engine.log.last_index
        followers = [n for n in c.nodes.values() if n is not leader]
        gates = [c.storages[f.id].gate for f in followers]
        try:
            for gate in gates:
                gate.clear()
            stalled = asyncio.ensure_future(leader.propose(b"stalled"))
            await wait_until(lambda: all(f.engine.log.last_index > f.engine.persisted_index
                                         for f in followers), 5, "the followers' writes stall")
            # Several election timeouts of heartbeat ticks (two followers, 12 ticks a
            # timeout), and no reads to send heartbeats of their own: the followers hear
            # only the leader's ticks (heartbeats or, once it sees no progress, probes).
            sent = leader.metrics().messages_out["AppendEntries"]
            ticks = 4 * 2 * cfg.election_timeout_max / cfg.heartbeat_interval
            await wait_until(lambda: leader.engine.role != Role.LEADER
                             or leader.metrics().messages_out["AppendEntries"] >= sent + ticks,
                             10, "ticks")
            assert leader.engine.role == Role.LEADER and leader.engine.term == term
            loop = asyncio.get_running_loop()
            until = loop.time() + 4 * cfg.election_timeout_max
            reads = 0
            while loop.time() < until:
                assert await asyncio.wait_for(leader.read_index(), 5) == last  # not stalled
                reads += 1
            assert leader.engine.role == Role.LEADER and leader.engine.term == term
            assert all(f.engine.term == term for f in followers)
            assert not stalled.done() and reads > 1
        finally:
            for gate in gates:
                gate.set()
        index = await asyncio.wait_for(stalled, 5)
        assert leader.engine.term == term and index == last + 1


@pytest.mark.parametrize("how", ["snapshot_interval", "snapshot()"])
@run
async def test_a_snapshot_due_before_an_installed_leaders_snapshot_waits_for_its_restore(how):
    """Chaos seed 138571: a follower whose state machine lagged installed the leader's
    snapshot while its disk was busy; before that snapshot's save was planned, the
    snapshot the batch it was applying made due asked the engine for a snapshot at an
    index the log no longer held, and the node stopped itself. A snapshot() call queued
    then is answered after the Restore."""
    cfg = replace(SNAPSHOTS_BY_HAND, snapshot_interval=1 if how == "snapshot_interval" else 0)
    async with LocalCluster(3, state_machine=GatedApply, storage=GatedAppends,
                            config=cfg) as c:
        leader, follower = await written_to(c)
        applies, appends = c.state_machines[follower.id].gate, c.storages[follower.id].gate
        applies.clear()
        stuck = follower.applied_index
        last = max([await leader.propose(b"b%d" % k) for k in range(45)])
        await wait_until(lambda: follower.engine.commit_index >= last, 5, "commit")
        if how == "snapshot()":
            call = asyncio.ensure_future(follower.snapshot())
        appends.clear()  # the follower's next write waits: its disk is busy
        await leader.propose(b"d")
        await wait_until(lambda: follower.engine.log.last_index > last, 5, "a write in flight")
        c.hub.isolate(follower.id)
        for k in range(100):
            await leader.propose(b"c%d" % k)
        if how == "snapshot()":
            await leader.snapshot()
        await wait_until(lambda: leader.engine.log.snapshot_index > last, 5, "compaction")
        c.hub.heal()
        await wait_until(lambda: follower.engine.log.snapshot_index > last, 5, "install")
        assert follower.applied_index == stuck  # the state machine is still behind it
        applies.set()  # the batch it was applying ends; what is queued behind is skipped
        await restored_once_the_disk_is_free(leader, follower, appends)
        if how == "snapshot()":
            assert await asyncio.wait_for(call, 5) >= follower.engine.log.snapshot_index


@run
async def test_entries_to_apply_from_storage_that_an_installed_snapshot_replaced_are_skipped():
    """A follower with a small cache applies committed entries from storage
    (ApplyStored), then newer ones from memory; its state machine lagged while it
    installed the leader's snapshot, which replaced those entries in storage: the
    Restore behind them covers them, and the newer ones too (found by
    test_driver_faults: they were applied after a gap, and reads saw that state)."""
    cfg = SNAPSHOTS_BY_HAND
    async with LocalCluster(3, state_machine=GatedApply, config=cfg) as c:
        leader, follower = await written_to(c)
        applies, storage = c.state_machines[follower.id].gate, c.storages[follower.id]
        applies.clear()
        stuck = follower.applied_index
        follower.engine.limit_cache(1)  # these leave its memory before they commit
        last = max(await asyncio.gather(*[leader.propose(b"b%d" % k) for k in range(45)]))
        await wait_until(lambda: follower.engine.commit_index >= last, 5, "commit")
        follower.engine.limit_cache(1 << 20)  # these are applied from memory
        for k in range(5):
            last = await leader.propose(b"d%d" % k)
        await wait_until(lambda: follower.engine.commit_index >= last, 5, "commit")
        queued = [type(item) for item in follower._applier.queue]
        assert ApplyStored in queued and list in queued[queued.index(ApplyStored):], queued
        c.hub.isolate(follower.id)
        for k in range(100):
            await leader.propose(b"c%d" % k)
        await leader.snapshot()
        await wait_until(lambda: leader.engine.log.snapshot_index > last, 5, "compaction")
        c.hub.heal()
        await wait_until(lambda: not storage.read_entries(stuck + 1, last + 1), 5,
                         "the installed snapshot replacing the entries in storage")
        assert follower.applied_index == stuck
        applies.set()
        await wait_until(lambda: follower.applied_index >= leader.applied_index
                         or follower.failure, 5, "catching up")
        assert follower.failure is None
        # nothing after the entries it skipped was applied before the Restore: that
        # would have left a gap in its state, read by reads at those indexes
        assert c.state_machines[follower.id].gaps == []


@run
async def test_nothing_is_applied_after_entries_skipped_behind_an_installed_snapshot():
    """Entries from memory queued before entries from storage, all committed before a
    leader's snapshot the follower installed while its disk was busy (storage still
    holds them): the ones from memory were skipped, the ones from storage then applied
    after the gap (found by test_driver_faults, after the fix above)."""
    cfg = SNAPSHOTS_BY_HAND
    async with LocalCluster(3, state_machine=GatedApply, storage=GatedAppends,
                            config=cfg) as c:
        leader, follower = await written_to(c)
        machine, appends = c.state_machines[follower.id], c.storages[follower.id].gate
        machine.gate.clear()
        for k in range(5):  # applied from memory
            last = await leader.propose(b"d%d" % k)
        await wait_until(lambda: follower.engine.commit_index >= last, 5, "commit")
        follower.engine.limit_cache(1)  # these leave its memory before they commit
        last = max(await asyncio.gather(*[leader.propose(b"b%d" % k) for k in range(45)]))
        await wait_until(lambda: follower.engine.commit_index >= last, 5, "commit")
        queued = [type(item) for item in follower._applier.queue]
        assert list in queued and ApplyStored in queued[queued.index(list):], queued
        appends.clear()  # its disk is busy: storage keeps the entries while it installs
        last = await leader.propose(b"x")
        await wait_until(lambda: follower.engine.log.last_index >= last, 5, "a write in flight")
        c.hub.isolate(follower.id)
        for k in range(100):
            await leader.propose(b"c%d" % k)
        await leader.snapshot()
        c.hub.heal()
        await wait_until(lambda: follower.engine.log.snapshot_index > last, 5, "install")
        machine.gate.set()
        await restored_once_the_disk_is_free(leader, follower, appends)
        assert machine.gaps == []


@run
async def test_a_backlog_taken_before_a_snapshot_install_is_applied_before_its_restore():
    """A commit of more than MAX_APPLY_BATCH entries and the last chunk of a leader's
    snapshot in one turn: the backlog went to the queue behind the snapshot's Restore,
    and would have been applied over the restored state (entries twice, the applied
    index going back)."""
    node = await lone_node()
    try:
        await node.initialize({1: "local:1"})
        await node.wait_for_leader(5)
        applier = node._applier
        first = applier.applied_index + 1
        backlog = [Entry(1, i, EntryKind.NORMAL, b"") for i in
                   range(first, first + MAX_APPLY_BATCH + 1)]
        assert applier.can_apply_now()  # taken now, applied at the end of the turn
        restore = object()  # what installing the snapshot queues meanwhile
        applier.enqueue(restore)
        applier.apply_now(backlog)
        assert list(applier.queue) == [backlog, restore]
        applier.queue.clear()  # (neither is real: nothing to apply)
    finally:
        await node.stop()


class GatedAsyncRecorder(Recorder):
    """An async state machine that waits while ``gate`` is clear (open at first) and
    keeps each call's entries' data."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[list[bytes]] = []

    async def apply(self, entries):
        self.calls.append([bytes(e.data) for e in entries])
        await self.gate.wait()
        return Recorder.apply(self, entries)


@run
async def test_commits_queued_behind_a_slow_apply_are_applied_once_each_in_one_call():
    """Entries committed one by one while an async apply waits queue up as separate
    items; the apply task joins them into one call, and each is applied once, in order."""
    sm = GatedAsyncRecorder()
    node = await lone_leader(sm)
    try:
        await node.propose(b"first")
        sm.gate.clear()
        held = node.propose(b"a")
        await wait_until(lambda: sm.calls[-1:] == [[b"a"]], 5, "the apply of a to begin")
        later = []
        for data in (b"b", b"c", b"d"):
            later.append(node.propose(data))
            committed = node._applier.committed_index
            await wait_until(lambda c=committed: node._applier.committed_index > c, 5)
        assert len(node._applier.queue) == 3  # one item per commit
        sm.gate.set()
        assert await asyncio.gather(held, *later) == [i for i, _ in sm.applied[-4:]]
        assert sm.calls[-2:] == [[b"a"], [b"b", b"c", b"d"]]
        assert await node.propose(b"e") == sm.applied[-1][0]
        assert [d for _, d in sm.applied] == [b"first", b"a", b"b", b"c", b"d", b"e"]
    finally:
        await node.stop()


class FailingRestore(Recorder):
    def restore(self, data):
        raise RuntimeError("disk full")


@run
async def test_a_failing_restore_stops_the_node_saying_so():
    cfg = SNAPSHOTS_BY_HAND
    async with LocalCluster(3, state_machine=FailingRestore, config=cfg) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        c.hub.isolate(follower.id)
        for k in range(20):
            await leader.propose(b"%d" % k)
        await leader.snapshot()
        c.hub.heal()
        await wait_until(lambda: follower.failure is not None, 5, "the restore failing")
        assert "restoring the leader's snapshot failed: RuntimeError('disk full')" in \
            str(follower.failure)


class GatedReads(MemoryStorage):
    """Its read_entries waits while ``gate`` is clear (open at first)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = open_gate()
        self.reading = asyncio.Event()

    async def read_entries(self, lo, hi, max_bytes=None):
        self.reading.set()
        await self.gate.wait()
        return MemoryStorage.read_entries(self, lo, hi, max_bytes)


def test_a_read_for_a_follower_that_compaction_overtook_is_no_warning(caplog):
    """The leader reads old entries for a lagging follower (ReadLog) and compacts them
    meanwhile: storage no longer has them, the follower gets a snapshot instead. That
    is no damage: it was logged as a StorageCorruption warning, alarming operators."""
    cfg = replace(SNAPSHOTS_BY_HAND, log_cache_bytes=1)

    @run
    async def scenario():
        async with LocalCluster(3, state_machine=Recorder, storage=GatedReads,
                                config=cfg) as c:
            leader = await c.leader()
            follower = next(n for n in c.nodes.values() if n is not leader)
            c.hub.isolate(follower.id)
            for k in range(20):
                await leader.propose(b"%d" % k)
            storage = c.storages[leader.id]
            storage.gate.clear()
            storage.reading.clear()
            c.hub.heal()
            await asyncio.wait_for(storage.reading.wait(), 5)  # a ReadLog for the follower
            await asyncio.wait_for(leader.snapshot(), 5)  # compacts what it reads
            storage.gate.set()
            await wait_until(lambda: follower.applied_index >= leader.applied_index, 5,
                             "the follower catching up")
            assert leader._log_reader.reads >= 1

    with caplog.at_level(logging.WARNING, logger="fastraft"):
        scenario()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@run
async def test_a_wait_for_a_leader_fails_when_the_node_stops():
    """It waited out its timeout instead (TimeoutError, here after a minute)."""
    node = RaftNode(1, storage=MemoryStorage(), network=MemoryHub().network(1),
                    state_machine=Recorder(), config=FAST)
    await node.start()
    await node.initialize({1: "local:1", 2: "local:2", 3: "local:3"})  # alone: no leader
    waiting = asyncio.ensure_future(node.wait_for_leader(60))
    await asyncio.sleep(0)  # it waits now
    await node.stop()
    with pytest.raises(NodeStopped):
        await asyncio.wait_for(waiting, 5)


@run
async def test_a_wait_for_a_leader_returns_the_leader_it_saw_when_it_is_lost_at_once():
    """The wait saw a leader; before its caller resumed, a new term began without one
    (here a transfer's election; in CI a restarted host's replica, campaigning): it took
    the leader's absence for a stop and raised ``NodeStopped`` on a running node."""
    node = RaftNode(1, storage=MemoryStorage(), network=MemoryHub().network(1),
                    state_machine=Recorder(), config=FAST)
    await node.start()
    try:
        await node.initialize({1: "local:1", 2: "local:2", 3: "local:3"})
        waiting = asyncio.ensure_future(node.wait_for_leader(60))
        await asyncio.sleep(0)  # it waits now
        node.receive(2, [AppendEntries(2, 2, 0, 0, [], 0)])  # node 2 leads term 2
        await asyncio.sleep(0)  # the wait sees it; its caller resumes a turn later
        node.receive(3, [RequestVote(3, 3, 1, 1, leadership_transfer=True)])
        assert node.engine.leader_id is None and node.engine.term == 3
        assert await asyncio.wait_for(waiting, 5) == 2
    finally:
        await node.stop()


def test_config_is_validated():
    with pytest.raises(ConfigError, match="heartbeat"):
        Config(heartbeat_interval=1.0)
    with pytest.raises(ConfigError):
        Config(election_timeout_min=0.3, election_timeout_max=0.2)
    with pytest.raises(ConfigError):
        Config(max_inflight_messages=0)
    with pytest.raises(ConfigError, match="lost_leadership_wait must be >= 0"):
        Config(lost_leadership_wait=-1)
    # msgspec checks no types when a Struct is built: a str reached the node's timers
    for kwargs, says in (({"election_timeout_min": "0.1"}, "a number, got '0.1'"),
                         ({"max_entry_bytes": 1.5}, "an int, got 1.5"),
                         ({"snapshot_interval": True}, "an int, got True"),
                         ({"pre_vote": 1}, "True or False, got 1")):
        with pytest.raises(ConfigError, match=f"{next(iter(kwargs))} must be {says}"):
            Config(**kwargs)
    assert Config(election_timeout_min=1, election_timeout_max=2).election_timeout_max == 2


@run
async def test_a_proposal_right_after_an_election_is_taken():
    """Between the engine winning an election and the node running the commands that
    say so, a proposal is taken (it was refused as "stopping after a failed hook")."""
    from fastraft.engine import Timer

    node = RaftNode(1, storage=MemoryStorage(), network=MemoryHub().network(1),
                    state_machine=Recorder(), config=FAST)
    await node.start()
    try:
        await node.initialize({1: "local:1"})
        node.engine.on_timer(Timer.ELECTION)  # a one-voter cluster elects itself at once
        assert node.is_leader and not node._flush_scheduled
        assert await node.propose(b"first") == node.engine.log.last_index
    finally:
        await node.stop()


class SlowApply(Recorder):
    """Applying takes longer than ``commit_notify_delay``, as on a busy host: the
    commit-notify timer is due before the proposers a commit answered are back."""

    def apply(self, entries):
        time.sleep(0.003)
        return Recorder.apply(self, entries)


async def commit_index_sent_alone(c: LocalCluster) -> int:
    """Empty AppendEntries the leader sent, beyond its heartbeats, while a proposer that
    proposes again as soon as it is answered made 20 writes: each one a commit index
    that went out on its own instead of with the next proposals."""
    from fastraft.messages import AppendEntries

    leader = await c.leader()
    await leader.propose(b"warm")
    engine, network = leader.engine, leader.network
    heartbeats, empty = [], []
    heartbeat, send = engine._heartbeat, network.send

    def spy_heartbeat(pr):
        heartbeats.append(pr)
        return heartbeat(pr)

    def spy(to, messages):
        empty.extend(m for m in messages if type(m) is AppendEntries and not m.entries)
        send(to, messages)
    engine._heartbeat, network.send = spy_heartbeat, spy
    for k in range(20):
        await leader.propose(b"w%d" % k)
    return len(empty) - len(heartbeats)


@run
async def test_a_new_commit_index_goes_out_with_the_next_proposals_not_alone():
    async with LocalCluster(3, state_machine=SlowApply, config=FAST) as c:
        assert await commit_index_sent_alone(c) == 0


@run
async def test_a_commit_notification_due_with_an_answer_waits_for_the_proposers():
    """The loop stalls after a follower's answer was queued (a busy host): in the next
    turn the commit-notify timer of the previous commit is overdue, and uvloop runs it
    before the callbacks, among them the delivery of that answer. The notification must
    still wait for the proposers that answer's commit resolves: their entries take the
    new commit index along."""
    from fastraft.messages import AppendEntriesResponse

    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        for node in c.nodes.values():
            if node is not leader:
                def stalling(to, messages, send=node.network.send):
                    send(to, messages)
                    if any(type(m) is AppendEntriesResponse for m in messages):
                        time.sleep(2 * FAST.commit_notify_delay)
                node.network.send = stalling
        assert await commit_index_sent_alone(c) == 0


@run
async def test_an_overdue_election_timer_runs_the_commands_of_messages_already_handled():
    """A heartbeat handled this turn moves the election deadline only when its commands
    run, at the scheduled flush; an overdue election timer that fires first (after its
    poll, ``Timers._after_a_poll``) runs that flush before deciding the leader is gone."""
    from fastraft.engine import Role, Timer
    from fastraft.messages import AppendEntries

    config = Config(election_timeout_min=0.5, election_timeout_max=1.0,
                    heartbeat_interval=0.1, pre_vote=False, check_quorum=False)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        await wait_until(lambda: follower.engine.leader_id == leader.id)
        e, timers = follower.engine, follower._timers
        term, last = e.term, e.log.last_index
        heartbeat = AppendEntries(term, leader.id, last, e.log.term_at(last), [],
                                  e.commit_index, 0)
        # no await from here on: the loop runs nothing else meanwhile
        follower.receive(leader.id, [heartbeat])  # the first of a turn runs at once
        follower.receive(leader.id, [heartbeat])  # this one's commands wait for the flush
        assert follower._flush_scheduled
        timers._deadlines[Timer.ELECTION] = follower._loop.time() - 1.0  # long overdue,
        timers._polled.add(Timer.ELECTION)  # and already given its poll
        timers._fire(Timer.ELECTION)
        assert e.role == Role.FOLLOWER and e.term == term
        assert timers._deadlines[Timer.ELECTION] > follower._loop.time()


@run
async def test_an_overdue_election_timer_reads_what_waits_in_the_sockets_before_it_acts():
    """The loop stalls in one socket's callback while the leader's heartbeat reaches
    another; the follower's election timer, overdue by then, must let the loop poll and
    read that heartbeat before it campaigns. It waited a millisecond's ``call_at``, which
    uvloop reads against its millisecond clock again: across a tick that came out as no
    wait, run before the poll (one stall in about twenty in tests/test_overload.py). The
    clock here ticks at every read, so that tick comes every time."""
    import itertools
    import socket

    from fastraft.engine import Role, Timer
    from fastraft.messages import AppendEntries

    loop = asyncio.get_running_loop()
    config = Config(election_timeout_min=5.0, election_timeout_max=10.0,
                    heartbeat_interval=1.0, pre_vote=False, check_quorum=False)
    node = RaftNode(2, storage=MemoryStorage(), network=MemoryHub().network(2),
                    state_machine=Recorder(), config=config)
    await node.start()
    await node.initialize({i: f"local:{i}" for i in (1, 2, 3)})
    e = node.engine
    last = e.log.last_index
    heartbeat = AppendEntries(e.term + 1, 1, last, e.log.term_at(last), [], 0, 0)
    node.receive(1, [heartbeat])
    await wait_until(lambda: e.leader_id == 1)
    term = e.term
    leader_end, follower_end = socket.socketpair()
    stall_in, stall_out = socket.socketpair()
    heard = []

    def on_heartbeat():
        follower_end.recv(64)
        heard.append(e.term)
        node.receive(1, [heartbeat])

    def stall():  # a long turn: the heartbeat arrives meanwhile, the timer falls due
        stall_in.recv(64)
        leader_end.send(b"heartbeat")
        time.sleep(0.05)
        ticks = itertools.count(1)
        loop.time = lambda clock=loop.time: clock() + next(ticks) * 0.001
    try:
        loop.add_reader(follower_end, on_heartbeat)
        loop.add_reader(stall_in, stall)
        node._timers.set(Timer.ELECTION, 0.01)
        stall_out.send(b"stall")
        await wait_until(lambda: heard, 5, "the heartbeat read")
        await asyncio.sleep(0)  # the timer's last callback, had it not acted yet
        await asyncio.sleep(0)
        assert heard == [term]
        assert e.role == Role.FOLLOWER and e.term == term and e.leader_id == 1
    finally:
        loop.__dict__.pop("time", None)
        for s in (leader_end, follower_end, stall_in, stall_out):
            loop.remove_reader(s)
            s.close()
        await node.stop()


class GatedHardState(Gated):
    """Its save_hard_state waits while ``gate`` is clear: a disk whose fsync outlasts the
    election timeout."""

    async def save_hard_state(self, hard_state):
        await self.gate.wait()
        MemoryStorage.save_hard_state(self, hard_state)


@run
async def test_initialize_stopped_before_its_founding_entry_is_durable_says_so():
    """A vote given before initialize() is still being written when the founding entry
    queues behind it, and the node stops: the writer finishes the vote, leaves the rest,
    and initialize() raises NodeStopped (it used to wait for ever)."""
    storage = GatedHardState()
    node = RaftNode(2, storage=storage, network=MemoryHub().network(2),
                    state_machine=Recorder(), config=FAST)
    await node.start()
    storage.gate.clear()
    node.receive(1, [RequestVote(2, 1, 1, 1)])  # a founder's: the grant waits for the disk
    await wait_until(lambda: node._writer.writes, 5, "the vote being written")
    initialized = asyncio.ensure_future(node.initialize({i: f"local:{i}" for i in (1, 2, 3)}))
    await wait_until(lambda: len(node._writer.writes) == 2, 5, "the founding entry queued")
    stopped = asyncio.ensure_future(node.stop())
    await wait_until(lambda: not node._running, 5, "the stop")
    storage.gate.set()
    with pytest.raises(NodeStopped, match="before its founding entry was durable"):
        await asyncio.wait_for(initialized, 5)
    await stopped
    assert storage.load_state().last_index == 0 and node.failure is None


@run
async def test_a_candidate_whose_vote_is_not_yet_durable_waits_for_it_to_time_out_again():
    """Its RequestVotes wait for the disk: an election timeout meanwhile starts no new
    election (``Engine.hard_state_persisted``); once the disk answers, the writer tells
    the engine, which arms the timer again, and the node campaigns on (it hears from no
    one: its peers never started)."""
    storage = GatedHardState()
    node = RaftNode(1, storage=storage, network=MemoryHub().network(1),
                    state_machine=Recorder(), config=replace(FAST, pre_vote=False))
    await node.start()
    await node.initialize({1: "local:1", 2: "local:2", 3: "local:3"})
    storage.gate.clear()
    e = node.engine
    await wait_until(lambda: e._election_deferred, 5, "a timeout while the vote is unsynced")
    term = e.term
    assert e.role.name == "CANDIDATE" and storage.hard_state.current_term < term
    storage.gate.set()
    await wait_until(lambda: e.term > term, 5, "the next election, once the vote is durable")
    await node.stop()
