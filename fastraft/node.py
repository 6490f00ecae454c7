"""``RaftNode``: runs the engine on an asyncio (uvloop) event loop.

Events (messages, proposals, reads, timer expirations, completed writes) are fed to the
engine as they happen. The first message or proposal of an idle loop iteration is acted
on at once (latency); the engine's commands for everything else that arrives in that
iteration are drained together once, so it shares one storage write and one message per
peer (batching). Timers are ``loop.call_at`` handles, re-armed lazily: resetting the
election timer on every AppendEntries costs a float store, not a cancel and a new handle.

Order of effects (Raft, Figure 2): writes run one batch at a time, in order; messages that
promise durable state (votes, acknowledgements) leave only after every write issued before
them completed. Replication messages from the leader leave at once, in parallel with its
own write (thesis §10.2.1). Committed entries are applied by a separate task, so a slow
state machine never delays replication or elections.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, BinaryIO

from fastraft import kernels
from fastraft.config import Config
from fastraft.engine import (
    AppendLog,
    Apply,
    CancelTimer,
    CompactLog,
    Engine,
    InitialState,
    PersistHardState,
    ReadFailed,
    ReadReady,
    Role,
    RoleChanged,
    Send,
    SendSnapshotChunk,
    SetTimer,
    StoreSnapshotChunk,
    Timer,
    TruncateLog,
    requires_durability,
)
from fastraft.errors import (
    AlreadyInitialized,
    CatchUpTimeout,
    NodeStopped,
    NotLeader,
    Overloaded,
    ProposalDropped,
    StorageCorruption,
)
from fastraft.messages import (
    Entry,
    EntryKind,
    InstallSnapshot,
    Membership,
    SnapshotMeta,
    decode_membership,
)
from fastraft.network import RaftNetwork
from fastraft.proposals import ProposalTracker
from fastraft.snapshots import as_stream, spool, stream_size
from fastraft.statemachine import StateMachine
from fastraft.storage import RaftStorage

log = logging.getLogger("fastraft.node")

_NORMAL = EntryKind.NORMAL


def _maybe_async(fn):
    """Call ``fn`` and await the result only if it is a coroutine function (decided once)."""
    if inspect.iscoroutinefunction(fn):
        return fn, True
    return fn, False


class _SaveSnapshot:
    """A write op: make a snapshot durable, in order with the log writes around it."""

    __slots__ = ("meta", "source", "installed", "durable", "reader", "size")

    def __init__(self, meta: SnapshotMeta, source: BinaryIO, installed: bool,
                 durable: asyncio.Future) -> None:
        self.meta = meta
        #: The data to copy into storage: the state machine's stream, or the spool of a
        #: snapshot received from the leader.
        self.source = source
        #: Received from the leader (the engine already knows) rather than taken here.
        self.installed = installed
        #: Resolved with the index once the snapshot is on disk.
        self.durable = durable
        #: Storage's copy, opened once saved: InstallSnapshot chunks are read from it.
        self.reader: BinaryIO | None = None
        self.size = 0


class _Restore:
    """An apply-queue item: replace the state machine with a received snapshot, once it
    is saved (the spool is read by the save first, then by the restore)."""

    __slots__ = ("meta", "spool", "saved")

    def __init__(self, meta: SnapshotMeta, spool: BinaryIO, saved: asyncio.Future) -> None:
        self.meta = meta
        self.spool = spool
        self.saved = saved


_SNAPSHOT_DUE = object()  # apply-queue item: take a snapshot if the policy says so


class RaftNode:
    """One member of a Raft cluster. See the module docstring and ``docs/node.md``."""

    def __init__(self, node_id: int, *, storage: RaftStorage, network: RaftNetwork,
                 state_machine: StateMachine, config: Config | None = None,
                 rng: random.Random | None = None) -> None:
        if not isinstance(node_id, int) or node_id <= 0:
            raise ValueError(f"node ids are positive ints, got {node_id!r}")
        self.id = node_id
        self.storage = storage
        self.network = network
        self.state_machine = state_machine
        self.config = config or Config()
        self._rng = rng or random.Random()
        self.engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._flush_scheduled = False

        #: Armed loop handles and when they fire; the wanted deadline may be later (a
        #: handle that fires early re-arms itself), never earlier.
        self._timer_handles: dict[Timer, asyncio.TimerHandle | None] = {}
        self._timer_fires_at: dict[Timer, float] = {}
        self._timer_deadlines: dict[Timer, float | None] = {}

        #: Write batches not yet durable, oldest first: [ops, sends held until durable].
        self._writes: deque[list] = deque()
        self._write_task: asyncio.Task | None = None

        self._apply_queue: deque[list[Entry]] = deque()
        self._apply_wakeup = asyncio.Event()
        self._apply_task: asyncio.Task | None = None
        #: The apply task is working on an item (possibly awaiting): no inline apply now.
        self._apply_busy = False
        #: Highest index the state machine has applied.
        self.applied_index = 0
        #: Highest index handed to the apply task (entries up to here are committed).
        self._committed_index = 0
        #: Replaced (and set) whenever the applied index moves or the node stops; waiters
        #: re-check their condition (a Condition would need the lock to notify).
        self._progress = asyncio.Event()
        self._progress_waiters = 0

        self._proposals = ProposalTracker()
        #: Running and leading: propose() checks this one flag on its fast path.
        self._accepting = False
        self._max_pending = self.config.max_pending_proposals
        self._capacity = asyncio.Event()
        self._capacity.set()

        #: The newest durable snapshot, and a reader of storage's copy of every snapshot
        #: the engine may still stream to a follower (``Engine.snapshots_in_use``).
        self._snapshot_index = 0
        self._snapshots: dict[int, BinaryIO] = {}
        #: A snapshot being received from the leader: (last included index, spool file).
        self._incoming: tuple[int, BinaryIO] | None = None

        self._reads: dict[int, asyncio.Future] = {}
        self._read_waiters: list[tuple[int, asyncio.Future]] = []
        #: Lease reads: loop time until which this leader may read without a round trip.
        self._lease_until = 0.0
        self._lease_renewing = False
        self._next_read_id = 0
        self._leader_known = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover from storage, rebuild the state machine, join the cluster."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        st = self.storage
        self._append, self._append_async = _maybe_async(st.append_entries)
        self._truncate, self._truncate_async = _maybe_async(st.truncate_suffix)
        self._compact, self._compact_async = _maybe_async(st.compact_prefix)
        self._snapshot_io_async = (inspect.iscoroutinefunction(st.save_snapshot)
                                   or inspect.iscoroutinefunction(st.load_snapshot))
        self._save_hs, self._save_hs_async = _maybe_async(st.save_hard_state)
        self._sync_storage = not (self._append_async or self._truncate_async
                                  or self._compact_async or self._snapshot_io_async
                                  or self._save_hs_async)
        self._sm_apply, self._sm_apply_async = _maybe_async(self.state_machine.apply)
        state = await self._call(st.load_state)
        snapshot_index = snapshot_term = 0
        snapshot_membership = Membership()
        applied = 0
        if state.snapshot is not None:
            meta = state.snapshot
            snapshot_index, snapshot_term = meta.last_included_index, meta.last_included_term
            snapshot_membership = meta.membership
        durable_applied = getattr(self.state_machine, "last_applied", None)
        if durable_applied is not None:
            applied = await self._call(durable_applied)
        if state.snapshot is not None:
            loaded = await self._call(st.load_snapshot)
            if loaded is None:
                raise StorageCorruption(f"storage reports a snapshot at {snapshot_index} "
                                        "but load_snapshot() returned none")
            self._snapshot_index = snapshot_index
            self._snapshots = {snapshot_index: loaded[1]}
            if applied < snapshot_index:
                loaded[1].seek(0)
                await self._restore(loaded[1])
                applied = snapshot_index
        entries = []
        first = max(state.first_index, snapshot_index + 1)
        if state.last_index >= first:
            entries = await self._call(st.read_entries, first, state.last_index + 1)
        self.applied_index = self._committed_index = applied
        self.engine = Engine(self.id, self.config, self._rng, InitialState(
            hard_state=state.hard_state, snapshot_index=snapshot_index,
            snapshot_term=snapshot_term, snapshot_membership=snapshot_membership,
            snapshot_size=stream_size(self._snapshots[snapshot_index]) if snapshot_index else 0,
            entries=entries,
            applied_index=applied))
        self._running = True
        self._apply_task = self._loop.create_task(self._apply_loop())
        self._peers_of = self.engine.membership
        self.network.set_peers(dict(self.engine.membership.addresses))
        await self.network.start(self)
        self._run(self.engine.start())

    async def stop(self) -> None:
        """Stop: pending operations fail with ``NodeStopped``. Storage is left open (a new
        node on the same storage object is a restart)."""
        if not self._running:
            return
        self._running = False
        self._accepting = False
        for handle in self._timer_handles.values():
            if handle is not None:
                handle.cancel()
        self._timer_handles.clear()
        await self.network.stop()
        if self._write_task is not None:
            try:
                await self._write_task  # never leave a write half done
            except Exception:  # already logged by the write loop
                pass
        if self._apply_task is not None:
            self._apply_task.cancel()
            try:
                await self._apply_task
            except asyncio.CancelledError:
                pass
        stopped = NodeStopped(f"node {self.id} stopped")
        self._proposals.fail_all(stopped)
        for fut in self._reads.values():
            _fail(fut, stopped)
        for _, fut in self._read_waiters:
            _fail(fut, stopped)
        self._reads.clear()
        self._read_waiters.clear()
        self._drop_incoming()
        for item in self._apply_queue:
            if type(item) is _Restore:
                item.spool.close()
        for reader in self._snapshots.values():
            reader.close()
        self._snapshots.clear()
        self._capacity.set()
        self._notify_progress()

    async def __aenter__(self) -> RaftNode:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------------ client API

    async def initialize(self, members: dict[int, str]) -> None:
        """Form a new cluster of ``members`` (id → address) on a fresh node.

        Idempotent: initializing again with the same members does nothing (once the log's
        start is compacted away, "the same" means the configuration now in force). Raises
        ``AlreadyInitialized`` on a node that has other state.
        """
        self._check_running()
        if not members or self.id not in members:
            raise ValueError(f"members must include this node ({self.id}), got {members!r}")
        membership = Membership(voters=frozenset(members), addresses=dict(members))
        engine = self.engine
        if engine.log.last_index or engine.term:
            if engine.log.snapshot_index == 0:
                first = engine.log.slice(1, 2)
                formed = bool(first) and first[0].kind == EntryKind.CONFIG and \
                    decode_membership(first[0].data) == membership
            else:
                # Entry 1 was compacted into a snapshot: compare with the configuration
                # in force, which is the founding one unless membership changed since.
                formed = engine.membership == membership
            if formed:
                return
            raise AlreadyInitialized(
                f"node {self.id} already has state (term {engine.term}, last index "
                f"{engine.log.last_index}); initialize only fresh nodes")
        engine.bootstrap(membership)
        self._schedule_flush()
        await self._wait_durable()

    def propose(self, data: bytes) -> Awaitable[Any]:
        """Replicate ``data``; ``await`` the result to get the state machine's result for it.

        The command is queued when ``propose`` is called (on the fast path the awaitable
        is a plain future: no coroutine per write). Raises ``NotLeader`` (with the
        leader's id and address, when known) on a follower; ``ProposalDropped`` if
        leadership was lost before the entry was known committed; in that case the entry
        may or may not be committed by a later leader.
        """
        proposals = self._proposals
        if not self._accepting or proposals.pending >= self._max_pending:
            return self._propose_admitted(data)
        fut = self._loop.create_future()
        proposals.add(data, fut)
        if not self._flush_scheduled:
            if proposals.pending == 1:
                self._flush()  # nothing else in flight: send now rather than next turn
            else:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return fut

    async def _propose_admitted(self, data: bytes) -> Any:
        await self._admit()
        return await self.propose(data)  # admitted: takes the fast path

    def propose_batch(self, datas: Sequence[bytes]) -> Awaitable[list[Any]]:
        """Replicate several commands as consecutive entries; ``await`` it for one result
        per command. Queued when called, like ``propose``."""
        if not datas or not self._accepting or self._proposals.pending >= self._max_pending:
            return self._propose_batch_admitted(datas)
        fut = self._loop.create_future()
        self._proposals.add_batch(datas, fut)
        self._schedule_flush()
        return fut

    async def _propose_batch_admitted(self, datas: Sequence[bytes]) -> list[Any]:
        if not datas:
            return []
        await self._admit()
        return await self.propose_batch(datas)  # admitted: takes the fast path

    async def read_index(self, timeout: float | None = None) -> int:
        """Linearizable read barrier (thesis §6.4): returns a commit index once this node's
        state machine has applied it; reads of the state machine after that see every write
        acknowledged before this call. On a follower the leader is asked."""
        self._check_running()
        engine = self.engine
        if self.config.lease_reads and engine.role == Role.LEADER:
            now = self._loop.time()
            if now < self._lease_until and engine.log.term_at(engine.commit_index) == engine.term:
                if self._lease_until - now < self._lease_span() / 2 and not self._lease_renewing:
                    self._lease_renewing = True
                    self._loop.create_task(self._renew_lease())
                return await self._wait_applied(engine.commit_index)
        issued = self._loop.time()
        self._next_read_id += 1
        rid = self._next_read_id
        fut = self._loop.create_future()
        self._reads[rid] = fut
        try:
            engine.read_index(rid)
        except NotLeader:
            del self._reads[rid]
            raise
        self._schedule_flush()
        if timeout is None:
            timeout = self.config.election_timeout_max * 4
        try:
            index = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise engine.not_leader() from None
        finally:
            self._reads.pop(rid, None)
        if self.config.lease_reads and engine.role == Role.LEADER:
            # a quorum heard from us after `issued`; none of them votes for another
            # candidate for election_timeout_min after that
            self._lease_until = max(self._lease_until, issued + self._lease_span())
        return index

    def _lease_span(self) -> float:
        return self.config.election_timeout_min * (1 - self.config.max_clock_drift)

    async def _renew_lease(self) -> None:
        try:
            await self.read_index()
        except Exception:  # lost leadership or stopped: the lease simply runs out
            pass
        finally:
            self._lease_renewing = False

    async def _wait_applied(self, index: int) -> int:
        if self.applied_index >= index:
            return index
        fut = self._loop.create_future()
        self._read_waiters.append((index, fut))
        return await fut

    async def wait_for_leader(self, timeout: float = 10.0) -> int:
        """Wait until a leader is known; returns its id. Raises ``TimeoutError``."""
        self._check_running()
        async def known():
            while self.engine.leader_id is None:
                self._leader_known.clear()
                await self._leader_known.wait()
            return self.engine.leader_id
        return await asyncio.wait_for(known(), timeout)

    async def committed(self, start_index: int = 1) -> AsyncIterator[Entry]:
        """Committed user entries from ``start_index`` on, following new commits live.
        Ends when the node stops."""
        nxt = start_index
        while self._running:
            engine = self.engine
            if nxt <= self._committed_index:
                if nxt <= engine.log.snapshot_index:
                    raise ValueError(f"entries up to {engine.log.snapshot_index} were compacted "
                                     "into a snapshot; start after it")
                batch = engine.log.slice(nxt, self._committed_index + 1)
                nxt = self._committed_index + 1
                for e in batch:
                    if e.kind == _NORMAL:
                        yield e
                continue
            await self._wait_progress(lambda: not self._running or self._committed_index >= nxt)

    async def snapshot(self) -> int:
        """Snapshot the state machine now and compact the log behind it (§7); returns the
        index the snapshot covers once it is durable. Also happens every
        ``Config.snapshot_interval`` entries."""
        self._check_running()
        done = self._loop.create_future()
        self._apply_queue.append(done)  # taken in the apply task, between two batches
        self._apply_wakeup.set()
        return await done

    async def add_learner(self, node_id: int, address: str, timeout: float = 30.0) -> None:
        """Add a non-voting member (§6, thesis §4.2.1): it receives the log, and snapshots,
        but neither votes nor counts for commit. Returns once the change is committed."""
        engine = await self._settled_leader(timeout)
        m = engine.membership
        if node_id in m.members:
            raise ValueError(f"node {node_id} is already a member")
        index = engine.propose_membership(m.voters, m.learners | {node_id}, {node_id: address})
        self._schedule_flush()
        await self._wait_config_committed(index, timeout)

    async def change_membership(self, voters: set[int], timeout: float = 30.0) -> None:
        """Move to the voter set ``voters`` through joint consensus (§6): C_old,new, then
        C_new. New voters must be learners already (``add_learner``); they are promoted only
        once within ``Config.max_learner_lag`` entries of the leader, else
        ``CatchUpTimeout``. Voters left out are removed; a leader left out steps down once
        C_new commits. Raises ``MembershipChangeInProgress`` if a change is under way."""
        engine = await self._settled_leader(timeout)
        voters = frozenset(voters)
        m = engine.membership
        strangers = voters - m.voters - m.learners
        if strangers:
            raise ValueError(f"nodes {sorted(strangers)} are not members: add them with "
                             "add_learner() first so they catch up before they vote")
        newcomers = voters - m.voters
        deadline = self._loop.time() + timeout

        def caught_up() -> bool:
            e = self.engine
            if e.role != Role.LEADER:
                raise e.not_leader()
            last = e.log.last_index
            return all(last - e.progress[n].match_index <= self.config.max_learner_lag
                       for n in newcomers if n in e.progress)
        while not caught_up():
            if self._loop.time() > deadline:
                lag = {n: self.engine.log.last_index - self.engine.progress[n].match_index
                       for n in newcomers if n in self.engine.progress}
                raise CatchUpTimeout(f"learners still behind after {timeout}s (entries "
                                     f"behind: {lag}); not promoted")
            try:
                await asyncio.wait_for(self._progress_wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        index = self._leader_engine().propose_membership(voters, m.learners - voters)
        self._schedule_flush()
        await self._wait_config_committed(index, timeout)

    async def transfer_leadership(self, target: int, timeout: float | None = None) -> None:
        """Make voter ``target`` the leader (thesis §3.10). Proposals are refused meanwhile
        (``NotLeader`` naming the target). Raises ``TimeoutError`` if it did not happen."""
        self._leader_engine().transfer_leadership(target)
        self._schedule_flush()
        limit = timeout if timeout is not None else self.config.election_timeout_max * 3
        deadline = self._loop.time() + limit
        while self.engine.leader_id != target:
            if self._loop.time() > deadline:
                raise TimeoutError(f"leadership did not move to node {target} in {limit}s")
            self._leader_known.clear()
            try:
                await asyncio.wait_for(self._leader_known.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    async def _settled_leader(self, timeout: float) -> Engine:
        """The engine once this leader has committed an entry of its term: until then the
        configuration it inherited may still be uncommitted, which is not a change in
        progress that the caller should be told about."""
        self._leader_engine()

        def settled() -> bool:
            e = self.engine
            return e.role != Role.LEADER or e.log.term_at(e.commit_index) == e.term
        await asyncio.wait_for(self._wait_progress(settled), timeout)
        return self._leader_engine()

    def _notify_progress(self) -> None:
        if self._progress_waiters:  # an Event per apply would cost more than the apply
            event, self._progress = self._progress, asyncio.Event()
            event.set()

    async def _progress_wait(self) -> None:
        """Until the next progress (apply, commit, stop)."""
        self._progress_waiters += 1
        try:
            await self._progress.wait()
        finally:
            self._progress_waiters -= 1

    async def _wait_progress(self, predicate) -> None:
        while not predicate():
            await self._progress_wait()

    def _leader_engine(self) -> Engine:
        self._check_running()
        if self.engine.role != Role.LEADER:
            raise self.engine.not_leader()
        return self.engine

    async def _wait_config_committed(self, index: int, timeout: float) -> None:
        """Until the change proposed at ``index`` is complete: committed, and no longer
        joint (the C_new that follows a C_old,new committed too)."""
        def complete() -> bool:
            e = self.engine
            return (not self._running or self._committed_index >= index
                    and not e.membership.joint and e._configs[-1][0] <= self._committed_index)
        await asyncio.wait_for(self._wait_progress(complete), timeout)
        self._check_running()

    def status(self) -> dict:
        """Role, term, leader, commit/applied index, membership, per-peer progress."""
        if self.engine is None:
            return {"id": self.id, "role": "stopped"}
        s = self.engine.status()
        s["applied_index"] = self.applied_index
        s["running"] = self._running
        s["leader_address"] = self.engine.membership.addresses.get(s["leader_id"])
        return s

    @property
    def is_leader(self) -> bool:
        return self.engine is not None and self.engine.role == Role.LEADER

    # ------------------------------------------------------------------ inbound

    def receive(self, from_id: int, messages: list) -> None:
        """Deliver messages from node ``from_id`` (called by the network)."""
        if not self._running:
            return
        step = self.engine.step
        try:
            for m in messages:
                step(from_id, m)
        except Exception:
            # A garbled message (the engine validates before it changes any state) must
            # not take the node down; the peer will retry.
            log.exception("node %d: dropped a message from node %d", self.id, from_id)
            for m in messages[messages.index(m) + 1:]:
                self.receive(from_id, [m])
        finally:
            # The first message of an iteration is handled at once (latency); what follows
            # in the same iteration waits for the flush scheduled here (batching).
            if not self._flush_scheduled:
                self._flush()
                self._schedule_flush()

    # ------------------------------------------------------------------ internals

    def _check_running(self) -> None:
        if not self._running:
            raise NodeStopped(f"node {self.id} is not running")

    async def _call(self, fn, *args):
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _admit(self) -> None:
        """Raise unless this node can take a proposal now; wait while too many are pending
        (back-pressure), up to ``Config.overload_wait``. On return, ``propose`` takes its
        fast path (nothing can run between this check and it)."""
        self._check_accepting()
        while self._proposals.pending >= self.config.max_pending_proposals:
            pending = self._proposals.pending
            if not self.config.overload_wait:
                raise Overloaded(f"{pending} proposals pending; retry later")
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), self.config.overload_wait)
            except asyncio.TimeoutError:
                raise Overloaded(
                    f"{pending} proposals still pending after {self.config.overload_wait}s; "
                    "the cluster is not keeping up") from None
            self._check_accepting()

    def _check_accepting(self) -> None:
        self._check_running()
        if self.engine.role != Role.LEADER:
            raise self.engine.not_leader()
        if not self._accepting:
            raise NodeStopped(f"node {self.id} is stopping after a failed hook")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._running:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._running:
            return
        proposals = self._proposals
        if proposals.buffered:
            try:
                index = self.engine.propose(proposals.take())
            except NotLeader as exc:
                proposals.fail_buffered(exc)
                self._capacity.set()
            else:
                proposals.appended(index)
        self._run(self.engine.take_commands())

    def _run(self, commands: list) -> None:
        """Execute engine commands in order (see the module docstring)."""
        if not commands:
            return  # the caller just took them: nothing can have been emitted since
        ops: list = []
        held: list = []
        outbox: dict[int, list] = {}
        apply_now: list | None = None
        for c in commands:
            t = type(c)
            if t is Send:
                if requires_durability(c.message) and (ops or self._writes):
                    held.append(c)
                else:
                    box = outbox.get(c.to)
                    if box is None:
                        outbox[c.to] = [c.message]
                    else:
                        box.append(c.message)
            elif (t is AppendLog or t is TruncateLog or t is PersistHardState or t is CompactLog
                  or t is _SaveSnapshot):
                ops.append(c)
            elif t is SendSnapshotChunk:
                m = c.message
                reader = self._snapshots.get(m.meta.last_included_index)
                if reader is not None:
                    # A page-cache read of one chunk; chunks are sent one at a time.
                    reader.seek(m.offset)
                    m.data = reader.read(c.length)
                    box = outbox.get(c.to)
                    if box is None:
                        outbox[c.to] = [m]
                    else:
                        box.append(m)
            elif t is StoreSnapshotChunk:
                save = self._store_chunk(c.frm, c.message)
                if save is not None:
                    ops.append(save)
            elif t is Apply:
                self._committed_index = c.entries[-1].index
                if apply_now is None and self._can_apply_now():
                    apply_now = c.entries
                elif apply_now is not None:
                    apply_now = apply_now + c.entries
                else:
                    self._apply_queue.append(c.entries)
                    self._apply_wakeup.set()
            elif t is SetTimer:
                self._set_timer(c.timer, c.delay)
            elif t is CancelTimer:
                self._timer_deadlines[c.timer] = None
            elif t is RoleChanged:
                self._on_role_changed(c)
            elif t is ReadReady:
                self._read_ready(c.request_id, c.read_index)
            elif t is ReadFailed:
                fut = self._reads.get(c.request_id)
                if fut is not None:
                    _fail(fut, NotLeader(c.leader_id,
                                         self.engine.membership.addresses.get(c.leader_id)))
        send = self.network.send
        for to, msgs in outbox.items():
            send(to, msgs)
        if self.engine.membership is not self._peers_of:
            self._peers_of = self.engine.membership  # in force once appended (§6)
            if self._peers_of.addresses:
                self.network.set_peers(dict(self._peers_of.addresses))
        more = self.engine.take_commands()
        if ops:
            if self._sync_storage and not self._writes:
                self._write_now(ops, held)
            else:
                self._writes.append([ops, held])
                if self._write_task is None:
                    self._write_task = self._loop.create_task(self._write_loop())
        elif held:
            self._writes[-1][1].extend(held)
        if apply_now is not None:
            self._apply_now(apply_now)  # after this turn's messages and writes are out
        if more:
            self._run(more)  # what answering a snapshot chunk emitted, after these writes

    def _store_chunk(self, frm: int, m: InstallSnapshot) -> _SaveSnapshot | None:
        """Keep a snapshot chunk from the leader; on the last one, install the snapshot:
        the state machine is restored in the apply task (after what is already queued),
        and the snapshot is saved as a write, ahead of the log changes the engine makes."""
        index = m.meta.last_included_index
        if m.offset == 0:
            self._drop_incoming()
            self._incoming = (index, spool())
        inc = self._incoming
        engine = self.engine
        if inc is None or inc[0] != index:
            engine.snapshot_chunk_stored(frm, m, 0)
            return None
        received = inc[1].tell()
        if m.offset != received:
            engine.snapshot_chunk_stored(frm, m, received)  # resume where we are
            return None
        inc[1].write(m.data)
        received += len(m.data)
        if not m.done:
            engine.snapshot_chunk_stored(frm, m, received)
            return None
        self._incoming = None
        if index <= engine.commit_index:
            inc[1].close()
            engine.snapshot_installed(frm, m.meta, received)
            return None
        inc[1].seek(0)
        saved = self._loop.create_future()
        self._apply_queue.append(_Restore(m.meta, inc[1], saved))
        self._committed_index = index
        self._apply_wakeup.set()
        engine.snapshot_installed(frm, m.meta, received)
        return _SaveSnapshot(m.meta, inc[1], installed=True, durable=saved)

    def _drop_incoming(self) -> None:
        if self._incoming is not None:
            self._incoming[1].close()
            self._incoming = None

    async def _write_loop(self) -> None:
        """Make write batches durable one at a time; batches that queue up behind a write
        in progress are merged into the next one (group commit)."""
        try:
            while self._writes:
                batch = self._writes[0]
                while len(self._writes) > 1:
                    ops, held = self._writes.pop()
                    # merge the newest into the one in front, keeping order
                    self._writes[-1][0].extend(ops)
                    self._writes[-1][1].extend(held)
                steps, last = self._plan_writes(batch[0])
                for fn, is_async, args in steps:
                    r = fn(*args)
                    if is_async:
                        await r
                self._writes.popleft()
                if not self._running:
                    return
                self._writes_done(batch, last)
        except Exception:
            self._fail_node("storage write failed")
        finally:
            self._write_task = None

    def _write_now(self, ops: list, held: list) -> None:
        """Synchronous storage with nothing queued: write in place, no task hop."""
        try:
            steps, last = self._plan_writes(ops)
            for fn, _, args in steps:
                fn(*args)
        except Exception:
            self._fail_node("storage write failed")
            return
        self._writes_done((ops, held), last)

    def _fail_node(self, what: str) -> None:
        """A hook raised: take no more proposals and stop the node (from a task, as this
        may run inside the apply task or a loop callback)."""
        log.exception("node %d: %s; stopping the node", self.id, what)
        self._accepting = False
        self._loop.create_task(self.stop())

    def _plan_writes(self, ops: list) -> tuple[list, Entry | None]:
        """The storage calls for one batch, in order, as (method, is_async, args); and the
        last entry the batch appends. Consecutive appends become one call."""
        steps: list = []
        pending: list[Entry] = []
        last_entry = None
        hard_state = None
        for op in ops:
            t = type(op)
            if t is AppendLog:
                pending.extend(op.entries)
                continue
            if pending:
                steps.append((self._append, self._append_async, (pending,)))
                last_entry = pending[-1]
                pending = []
            if t is TruncateLog:
                steps.append((self._truncate, self._truncate_async, (op.index,)))
                last_entry = None
            elif t is CompactLog:
                steps.append((self._compact, self._compact_async, (op.index,)))
            elif t is _SaveSnapshot:
                index = op.meta.last_included_index
                if index > self._snapshot_index:  # never replace a newer snapshot
                    if self._snapshot_io_async:
                        steps.append((self._persist_snapshot_async, True, (op,)))
                    else:
                        steps.append((self._persist_snapshot, False, (op,)))
                    self._snapshot_index = index
                elif not op.installed:
                    _close(op.source)
            else:
                hard_state = op.hard_state
        if pending:
            steps.append((self._append, self._append_async, (pending,)))
            last_entry = pending[-1]
        if hard_state is not None:
            steps.append((self._save_hs, self._save_hs_async, (hard_state,)))
        return steps, last_entry

    def _writes_done(self, batch, last: Entry | None) -> None:
        """A batch is durable: count it, release the replies that waited for it."""
        ops, held = batch
        engine = self.engine
        if last is not None:
            engine.log_persisted(last.index, last.term)
        for op in ops:
            if type(op) is _SaveSnapshot:
                if op.reader is not None:
                    self._snapshots[op.meta.last_included_index] = op.reader
                    if not op.installed:
                        engine.snapshot_saved(op.meta, op.size)
                in_use = engine.snapshots_in_use()
                for index in [i for i in self._snapshots if i not in in_use]:
                    self._snapshots.pop(index).close()
                if not op.durable.done():
                    op.durable.set_result(op.meta.last_included_index)
        if held:
            by_peer: dict[int, list] = {}
            for s in held:
                by_peer.setdefault(s.to, []).append(s.message)
            for to, msgs in by_peer.items():
                self.network.send(to, msgs)
        self._run(engine.take_commands())

    def _persist_snapshot(self, op: _SaveSnapshot) -> None:
        self.storage.save_snapshot(op.meta, op.source)
        self._snapshot_opened(op, self.storage.load_snapshot())

    async def _persist_snapshot_async(self, op: _SaveSnapshot) -> None:
        await self._call(self.storage.save_snapshot, op.meta, op.source)
        self._snapshot_opened(op, await self._call(self.storage.load_snapshot))

    def _snapshot_opened(self, op: _SaveSnapshot, loaded) -> None:
        if not op.installed:
            _close(op.source)  # the state machine's stream was read to its end
        index = op.meta.last_included_index
        if loaded is None or loaded[0].last_included_index != index:
            found = None if loaded is None else loaded[0].last_included_index
            raise StorageCorruption(f"storage saved the snapshot at {index} but "
                                    f"load_snapshot() returned {found}")
        op.reader = loaded[1]
        op.size = stream_size(op.reader)

    async def _wait_durable(self) -> None:
        while self._writes or self._flush_scheduled:
            await asyncio.sleep(0)
            if self._write_task is not None:
                await asyncio.shield(self._write_task)

    def _set_timer(self, timer: Timer, delay: float) -> None:
        loop = self._loop
        deadline = loop.time() + delay
        self._timer_deadlines[timer] = deadline
        handle = self._timer_handles.get(timer)
        if handle is None or self._timer_fires_at[timer] > deadline:
            if handle is not None:
                handle.cancel()
            self._timer_handles[timer] = loop.call_at(deadline, self._on_timer, timer)
            self._timer_fires_at[timer] = deadline
        # else the armed handle fires earlier and re-arms itself for the rest

    def _on_timer(self, timer: Timer) -> None:
        self._timer_handles[timer] = None
        deadline = self._timer_deadlines.get(timer)
        if deadline is None or not self._running:
            return
        loop = self._loop
        if loop.time() < deadline:
            self._timer_handles[timer] = loop.call_at(deadline, self._on_timer, timer)
            self._timer_fires_at[timer] = deadline
            return
        self._timer_deadlines[timer] = None
        self.engine.on_timer(timer)
        self._schedule_flush()

    def _on_role_changed(self, c: RoleChanged) -> None:
        self._accepting = self._running and c.role == Role.LEADER
        if c.role != Role.LEADER:
            self._lease_until = 0.0
        if c.leader_id is not None:
            self._leader_known.set()
        if c.role != Role.LEADER and (self._proposals.waiting or self._proposals.buffered):
            # Entries up to the commit index will still be applied and answered; the fate
            # of the rest is unknown (a later leader may or may not commit them).
            self._proposals.fail_after(c.commit_index, ProposalDropped(
                f"node {self.id} lost leadership (term {c.term}) before the entry committed; "
                "it may or may not be committed"))
            self._proposals.fail_buffered(NotLeader(
                c.leader_id, self.engine.membership.addresses.get(c.leader_id)))
            self._capacity.set()

    def _read_ready(self, request_id: int, read_index: int) -> None:
        fut = self._reads.get(request_id)
        if fut is None or fut.done():
            return
        if self.applied_index >= read_index:
            fut.set_result(read_index)
        else:
            self._read_waiters.append((read_index, fut))

    async def _apply_loop(self) -> None:
        queue = self._apply_queue
        while True:
            if not queue:
                self._apply_wakeup.clear()
                await self._apply_wakeup.wait()
                continue
            entries = queue.popleft()
            self._apply_busy = True
            try:
                if type(entries) is not list:
                    await self._apply_special(entries)
                    continue
                while queue and type(queue[0]) is list and len(entries) < 65536:
                    entries = entries + queue.popleft()
                await self._apply_batch(entries)
                if self._snapshot_due():
                    await self._take_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._apply_failed(entries)
                return
            finally:
                self._apply_busy = False

    def _apply_failed(self, entries) -> None:
        where = (f"entries {entries[0].index}..{entries[-1].index}"
                 if type(entries) is list else type(entries).__name__)
        self._fail_node(f"state machine failed at {where}")

    def _snapshot_due(self) -> bool:
        interval = self.config.snapshot_interval
        return bool(interval) and self.applied_index - self._snapshot_index >= interval

    async def _apply_special(self, item) -> None:
        if type(item) is _Restore:
            try:
                await item.saved
                if item.meta.last_included_index > self.applied_index:
                    item.spool.seek(0)
                    await self._restore(item.spool)
                    self.applied_index = item.meta.last_included_index
                    self._after_apply()
            finally:
                item.spool.close()
        elif item is _SNAPSHOT_DUE:
            if self._snapshot_due():
                await self._take_snapshot()
        else:  # a future from snapshot(): answer it from this point of the apply order
            try:
                item.set_result(await self._take_snapshot())
            except Exception as exc:
                _fail(item, exc)

    def _can_apply_now(self) -> bool:
        """A synchronous state machine with nothing queued before: apply in place, which
        saves the apply task's loop turn on every commit (latency)."""
        return not self._sm_apply_async and not self._apply_queue and not self._apply_busy

    def _apply_now(self, entries: list[Entry]) -> None:
        self._apply_busy = True
        try:
            user = self._user_entries(entries)
            self._applied(entries, user, self._sm_apply(user) if user else ())
        except Exception:
            self._apply_failed(entries)
            return
        finally:
            self._apply_busy = False
        if self._snapshot_due():
            self._apply_queue.append(_SNAPSHOT_DUE)  # taken by the apply task (it awaits)
            self._apply_wakeup.set()

    async def _take_snapshot(self) -> int:
        """Snapshot the state machine at the applied index (we are in the apply task, so
        nothing changes it meanwhile); the save joins the ordered write pipeline."""
        index = self.applied_index
        if index <= self._snapshot_index:
            return self._snapshot_index
        meta = self.engine.snapshot_meta(index)
        snapshot = self.state_machine.snapshot
        if inspect.iscoroutinefunction(snapshot):
            data = await snapshot()
        else:
            # The apply task waits here, so nothing changes the state meanwhile; a thread
            # keeps replication and elections running while a large snapshot is taken.
            data = await self._loop.run_in_executor(None, snapshot)
        durable = self._loop.create_future()
        # Nothing is applied until storage has read the stream to its end (a stream may
        # read the live state lazily).
        self._run([_SaveSnapshot(meta, as_stream(data), installed=False, durable=durable)])
        return await durable

    async def _restore(self, data: BinaryIO) -> None:
        restore = self.state_machine.restore
        if inspect.iscoroutinefunction(restore):
            await restore(data)
        else:
            await self._loop.run_in_executor(None, restore, data)

    @staticmethod
    def _user_entries(entries: list[Entry]) -> list[Entry]:
        if kernels.index_not_of_kind(entries, _NORMAL) >= 0:
            return [e for e in entries if e.kind == _NORMAL]
        return entries

    async def _apply_batch(self, entries: list[Entry]) -> None:
        user = self._user_entries(entries)
        results: Sequence[Any] = ()
        if user:
            results = self._sm_apply(user)
            if self._sm_apply_async:
                results = await results
        self._applied(entries, user, results)

    def _applied(self, entries: list[Entry], user: list[Entry], results: Sequence[Any]) -> None:
        if len(results) != len(user):
            raise TypeError(f"state machine returned {len(results)} results for "
                            f"{len(user)} entries")
        self.applied_index = entries[-1].index
        if self._proposals.waiting:
            if self._proposals.resolve(self.applied_index, user, results):
                self._capacity.set()
        self._after_apply()

    def _after_apply(self) -> None:
        if self._read_waiters:
            ready = [w for w in self._read_waiters if w[0] <= self.applied_index]
            self._read_waiters = [w for w in self._read_waiters if w[0] > self.applied_index]
            for read_index, fut in ready:
                if not fut.done():
                    fut.set_result(read_index)
        self._notify_progress()

def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
