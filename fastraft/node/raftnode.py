"""The public ``RaftNode``: lifecycle, the client API, and inbound messages."""
from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastraft import kernels
from fastraft.asyncutil import call_hook, wait_within
from fastraft.config import ENTRY_ENVELOPE_BYTES, Config
from fastraft.engine import (
    Engine,
    FollowerLostEntries,
    InitialState,
    Role,
    RoleChanged,
    ToldRemoved,
)
from fastraft.errors import (
    AlreadyInitialized,
    ConfigError,
    FastRaftError,
    InvalidArgument,
    NodeFailed,
    NodeStopped,
    NotLeader,
    Overloaded,
    ProposalDropped,
    StorageCorruption,
    StorageOwnedElsewhere,
)
from fastraft.logutil import Throttle
from fastraft.messages import Entry, EntryKind, Membership, check_node_id
from fastraft.network import RaftNetwork
from fastraft.node import observe
from fastraft.node.applier import Applier
from fastraft.node.arguments import (
    check_count,
    check_hooks,
    check_members,
    check_timeout,
    payload,
)
from fastraft.node.logreader import LogReader
from fastraft.node.membership import MembershipChanges
from fastraft.node.metrics import Metrics, Recorder
from fastraft.node.reads import Reads
from fastraft.node.runner import CampaignLimit, CommandRunner, HeartbeatClock, Timers
from fastraft.node.transfer import SnapshotTransfer
from fastraft.node.writer import LogWriter
from fastraft.proposals import ProposalTracker
from fastraft.snapshots import stream_size
from fastraft.statemachine import StateMachine
from fastraft.storage import RaftStorage, StorageState

log = logging.getLogger("fastraft.node")
_refusals = Throttle(log)

_NORMAL = EntryKind.NORMAL


class RaftNode:
    """One member of a Raft cluster. See the package docstring and ``docs/node.md``."""

    # Slots: past 30 attributes CPython's instances stop sharing their dicts' keys, and
    # each node would carry a dict of its own (1.2 KB more, in every idle group of a
    # host). ``__dict__`` is made only when something sets another attribute (a user's
    # own, a subclass's, a test's spy).
    __slots__ = ("id", "cluster_id", "group_id", "storage", "network", "state_machine",
                 "config", "_rng", "engine", "_loop", "_running", "_flush_scheduled",
                 "failure", "_stopped", "_stopped_event", "_stopping", "_starting",
                 "_stop_requested", "membership_calls", "campaign_limit", "preferred",
                 "heartbeat_clock", "log_cache_share", "quiet_changed", "on_removed",
                 "_removal_index", "_timers", "_runner", "_writer", "_applier",
                 "_transfer", "_reads", "_log_reader", "_membership", "_progress",
                 "_proposals", "_orphan_wait", "_fate_waits", "_fate_wait_expired",
                 "_accepting", "_max_pending", "_max_entry_bytes", "_recorder",
                 "_role_seen", "_leader_seen", "_last_heard", "_peers_of", "__dict__")

    def __init__(self, node_id: int, *, storage: RaftStorage, network: RaftNetwork,
                 state_machine: StateMachine, config: Config | None = None,
                 rng: random.Random | None = None, cluster_id: str = "fastraft") -> None:
        check_node_id(node_id)
        check_hooks(config, storage=storage, network=network, state_machine=state_machine)
        self.id = node_id
        #: Recorded in storage on first start; a storage of another cluster is refused.
        self.cluster_id = cluster_id
        #: The group this node is the replica of, in a ``RaftHost`` (None: a node on its
        #: own); its log lines name it.
        self.group_id: int | None = None
        self.storage = storage
        self.network = network
        self.state_machine = state_machine
        self.config = config or Config()
        if self.config.quiesce_after and not getattr(network, "watched", False):
            raise ConfigError(
                "Config.quiesce_after needs a RaftHost: quiet followers hear no heartbeat, "
                "and only a host's liveness exchange tells them their leader is gone; set "
                "it to 0 for a RaftNode on its own")
        self._rng = rng or random.Random()
        # Both are set by start() and used by every method but the few that report a node
        # not started yet (status, metrics, health), which check for None: typing them
        # as never None keeps a None check out of every hot path.
        self.engine: Engine = None  # type: ignore[assignment]
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._running = False
        self._flush_scheduled = False
        #: Why the node stopped itself (a hook failed), or None.
        self.failure: NodeFailed | None = None
        #: None until started; True once stop() is done.
        self._stopped: bool | None = None
        #: Made by the first ``wait_stopped`` (a group of a host nobody waits on keeps
        #: none); not ``_progress``, which every apply sets: its waiters wake each time.
        self._stopped_event: asyncio.Event | None = None
        #: The stop under way, or done (None until ``stop()``): every ``stop()`` call
        #: waits for it, shielded from the caller's cancellation.
        self._stopping: asyncio.Task[None] | None = None
        #: Resolved when the start under way ends, either way (None: none under way): a
        #: second start() and a stop() wait for it.
        self._starting: asyncio.Future[None] | None = None
        #: stop() was called while the node started: start() stops it when done.
        self._stop_requested = False

        #: add_learner / remove_learner / change_membership calls under way on this node:
        #: a ``RaftHost`` does not move the leadership of such a group to balance load.
        self.membership_calls = 0

        #: Set by a ``RaftHost``: how many of its groups may campaign at once.
        self.campaign_limit: CampaignLimit | None = None
        #: Set by a ``RaftHost``: whether this replica is the one its group's leadership
        #: is balanced to, given the voters (``Engine.start``: it campaigns first).
        self.preferred: Callable[[frozenset[int]], bool] | None = None
        #: Drives this node's heartbeats with its host's other groups' (``RaftHost``);
        #: None: a timer of its own.
        self.heartbeat_clock: HeartbeatClock | None = None
        #: Set by a ``RaftHost`` with a log cache budget: this group's share of it, for the
        #: engine made at start (``Engine.cache_budget`` holds it from then on).
        self.log_cache_share: int | None = None
        #: Set by a ``RaftHost`` with a log cache budget: called with this node and True
        #: when its group goes quiet, False when it wakes (``QuietChanged``).
        self.quiet_changed: Callable[[RaftNode, bool], None] | None = None
        #: Set by a ``RaftHost``: called with this node when it stops itself because it
        #: was removed from its group (``Config.stop_when_removed``).
        self.on_removed: Callable[[RaftNode], None] | None = None
        #: ``Config.stop_when_removed``: the index of the configuration entry that takes
        #: this node out of the group, the node stopping once it is applied (0: none).
        self._removal_index = 0
        self._timers = Timers(self)
        self._runner = CommandRunner(self)
        self._writer = LogWriter(self)
        self._applier = Applier(self)
        self._transfer = SnapshotTransfer(self)
        self._reads = Reads(self)
        self._log_reader = LogReader(self)
        self._membership = MembershipChanges(self)

        #: Set and dropped whenever something a waiter may wait for happens (an apply, a
        #: change of role or leader, proposals failed, the stop); waiters re-check their
        #: condition (a Condition would need the lock to notify). Made by the first
        #: waiter: an idle group of a host keeps no Event.
        self._progress: asyncio.Event | None = None

        self._proposals = ProposalTracker()
        #: Ends the wait for the fate of what a lost leadership left open: proposals and
        #: a membership change (``Config.lost_leadership_wait``).
        self._orphan_wait: asyncio.TimerHandle | None = None
        #: Such waits begun, and the number of the last that ran out: a membership call
        #: gives up once one begun after its proposal has.
        self._fate_waits = 0
        self._fate_wait_expired = 0
        #: Running and leading: propose() checks this one flag on its fast path.
        self._accepting = False
        self._max_pending = self.config.max_pending_proposals
        #: The largest entry payload proposals may carry: the config's bound, or less
        #: when the network's frames are smaller.
        self._max_entry_bytes = self.config.max_entry_bytes
        frame = getattr(network, "max_frame_bytes", None)
        if isinstance(frame, int) and frame - ENTRY_ENVELOPE_BYTES < self._max_entry_bytes:
            self._max_entry_bytes = max(frame - ENTRY_ENVELOPE_BYTES, 0)
        self._recorder = Recorder(timing=self.config.measure_durations)
        self._role_seen = Role.FOLLOWER
        self._leader_seen: int | None = None
        #: Loop time a message last arrived from each peer ("last contact").
        self._last_heard: dict[int, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover from storage, rebuild the state machine, join the cluster. If it
        raises (damaged storage, a port in use), the node is left as it was, and
        ``start()`` may be called again; after ``stop()`` it raises ``NodeStopped``
        (a restart is a new ``RaftNode`` on the same storage), as it does when
        ``stop()`` is called while it starts. A second call while it starts waits
        for the first."""
        if self._starting is not None:
            await asyncio.shield(self._starting)
            if not self._running:
                raise NodeStopped(f"node {self.id} did not start: its first start() "
                                  "failed or it was stopped meanwhile")
            return
        if self._running:
            return
        if self._stopping is not None:
            raise self.failure or NodeStopped(
                f"node {self.id} was stopped, and a RaftNode starts once: restart it as a "
                "new RaftNode on the same storage")
        starting = self._starting = asyncio.get_running_loop().create_future()
        self._stop_requested = False
        try:
            try:
                await self._start()
            except BaseException:
                # A start that failed once the node counted as running (its network
                # did not start) would make the next start() return at once, with
                # nothing listening and no timer armed.
                self._running = False
                self._stopped = None
                self._transfer.close()
                raise
            finally:
                self._starting = None
            if self._stop_requested:
                await self.stop()
                raise self.failure or NodeStopped(
                    f"node {self.id} was stopped while it started")
        finally:
            # Those waiting for this start (a stop() called meanwhile) go on once it has
            # ended, its own stop too.
            starting.set_result(None)

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        st = self.storage
        self._writer.bind(st)
        self._stopped = False
        state = await call_hook(st.load_state)
        await self._check_owner(st, state)
        snapshot_index = snapshot_term = 0
        snapshot_membership = Membership()
        applied = 0
        if state.snapshot is not None:
            meta = state.snapshot
            snapshot_index, snapshot_term = meta.last_included_index, meta.last_included_term
            snapshot_membership = meta.membership
        durable_applied = getattr(self.state_machine, "last_applied", None)
        if durable_applied is not None:
            applied = await call_hook(durable_applied)
        snapshot_size = 0
        if state.snapshot is not None:
            loaded = await call_hook(st.load_snapshot)
            if loaded is None:
                raise StorageCorruption(f"storage reports a snapshot at {snapshot_index} "
                                        "but load_snapshot() returned none")
            self._writer.snapshot_index = snapshot_index
            self._transfer.readers = {snapshot_index: loaded[1]}
            snapshot_size = stream_size(loaded[1])
            if applied < snapshot_index:
                loaded[1].seek(0)
                await self._applier.restore(loaded[1])
                applied = snapshot_index
        engine = Engine(self.id, self.config, self._rng, InitialState(
            hard_state=state.hard_state, snapshot_index=snapshot_index,
            snapshot_term=snapshot_term, snapshot_membership=snapshot_membership,
            snapshot_size=snapshot_size, applied_index=applied))
        if self.log_cache_share is not None:
            engine.limit_cache(self.log_cache_share)
        # The whole log passes through once (terms, configurations), in bounded batches;
        # only the newest Config.log_cache_bytes (or the host's share) stay in memory.
        self.engine = engine
        first = max(state.first_index, snapshot_index + 1)
        async for batch in self._log_reader.batches(first, state.last_index + 1):
            cut = engine.load_log(batch)
            if cut is not None:
                log.warning("node %d: entries %d..%d of term %d follow the snapshot of "
                            "term %d at %d: a log the snapshot replaced, never committed; "
                            "cutting them", self.id, cut, state.last_index, batch[0].term,
                            snapshot_term, snapshot_index)
                break
        self._running = True
        self._applier.start(applied)
        self._peers_of = self.engine.membership
        self.network.set_peers(dict(self.engine.membership.addresses))
        await self.network.start(self)
        self._runner.run(self.engine.start(self._is_preferred(self.engine.membership)))
        if self.config.stop_when_removed:
            # Restarted out of the group: it stops once a leader tells it the removal
            # committed (a farewell under way, or said again: ``Engine._tell_removed_again``).
            self._note_removal()

    def _is_preferred(self, membership: Membership) -> bool | None:
        """Whether this replica is the one its host balances the group's leadership to
        (None: no host, or not a voter): its first election timeout comes first."""
        voters = membership.voters
        return self.preferred(voters) if self.preferred and self.id in voters else None

    async def _check_owner(self, storage: RaftStorage, state: StorageState) -> None:
        if state.node_id == 0:
            await call_hook(storage.save_identity, self.id, self.cluster_id)
        elif (state.node_id, state.cluster_id) != (self.id, self.cluster_id):
            where = getattr(storage, "directory", type(storage).__name__)
            raise StorageOwnedElsewhere(
                f"{where} belongs to node {state.node_id} of cluster {state.cluster_id!r}, "
                f"not node {self.id} of cluster {self.cluster_id!r}")

    async def stop(self) -> None:
        """Stop: pending operations fail with ``NodeStopped`` (``NodeFailed`` when the node
        stops itself after a hook failed). Storage is left open (a new node on the same
        storage object is a restart). A leader tells a voter to campaign at once and
        wakes the other members on its way out (``Engine.resign``). A call while the node
        stops (the node's own stop after a hook failed, say) returns when that stop ends:
        the storage is the caller's to close then; so does a call while the node starts,
        once the start has ended and stopped the node. A caller cancelled while it waits
        (``asyncio.wait_for(node.stop(), ...)`` timing out) stops waiting; the stop goes
        on to its end: a write under way is never left half done, nor the apply task
        running, nor a pending operation unanswered."""
        if self._starting is not None:
            # The start stops the node once it has ended; returning before would leave
            # a node starting, and then running, on storage its caller may close.
            self._stop_requested = True
            await asyncio.shield(self._starting)
        if self._stopping is None:
            if not self._running:
                return
            self._running = False
            self._accepting = False
            self._timers.cancel_all()
            if self.campaign_limit is not None:
                self.campaign_limit.release(self)
            farewell = self.engine.resign()
            for to, message in farewell:
                self.network.send(to, [message])
            self._stopping = self._loop.create_task(self._stop(bool(farewell)))
        await asyncio.shield(self._stopping)

    async def _stop(self, farewell_sent: bool) -> None:
        if farewell_sent:
            await asyncio.sleep(0)  # a transport that sends at the end of the loop turn
        await self.network.stop()
        await self._writer.stop()
        stopped = self.failure or NodeStopped(f"node {self.id} stopped")
        await self._applier.stop(stopped)
        await self._log_reader.stop()
        self._cancel_orphan_wait()
        self._fail_proposals_at_stop()
        self._reads.fail_all(stopped)
        self._transfer.close()
        self._stopped = True
        self._notify_progress()  # waiters (wait_for_leader, back-pressure) see the stop
        if self._stopped_event is not None:
            self._stopped_event.set()

    def _fail_proposals_at_stop(self) -> None:
        """What a proposer hears when the node stops before answering: an entry in the
        log may still be committed by the cluster (its followers may hold it), so a
        retry could apply it twice; one not appended yet was not."""
        proposals = self._proposals
        failure = self.failure
        proposals.fail_after(-1, failure or NodeStopped(
            f"node {self.id} stopped before it knew whether the entry commits: it may or "
            "may not be committed"))
        proposals.fail_buffered(failure or NodeStopped(
            f"node {self.id} stopped before it appended the entry: it was not committed",
            committed=False))

    async def wait_stopped(self) -> None:
        """Until the node stops; raises ``NodeFailed`` if it stopped itself because a hook
        failed (what a supervisor, or ``fastraft node``, waits on)."""
        if self._stopped is None:
            raise NodeStopped(f"node {self.id} was never started")
        if not self._stopped:
            if self._stopped_event is None:
                self._stopped_event = asyncio.Event()
            await self._stopped_event.wait()
        if self.failure is not None:
            raise self.failure

    async def __aenter__(self) -> RaftNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def applied_index(self) -> int:
        """Highest index the state machine has applied."""
        return self._applier.applied_index

    # ------------------------------------------------------------------ client API

    async def initialize(self, members: dict[int, str]) -> None:
        """Form a new cluster of ``members`` (id → address) on a fresh node (one with no
        log yet: a vote it gave another founder meanwhile does not count).

        Idempotent: initializing again with the same members does nothing (once the log's
        start is compacted away, "the same" means the configuration now in force), also
        after a crash inside it. Returns once the founding entry is durable. Raises
        ``AlreadyInitialized`` on a node that has other state, ``NodeFailed`` if
        storage failed to write (the node stops; initialize it again after a restart),
        and ``NodeStopped`` if the node was stopped first.
        """
        self._check_running()
        members = check_members(self.id, members)
        membership = Membership(voters=frozenset(members), addresses=dict(members))
        engine = self.engine
        if not engine.fresh:
            if engine.log.snapshot_index == 0:
                formed = engine.founding_membership() == membership
            else:
                # Entry 1 was compacted into a snapshot: compare with the configuration
                # in force, which is the founding one unless membership changed since.
                formed = engine.membership == membership
            if formed:
                return
            raise AlreadyInitialized(
                f"node {self.id} already has state (term {engine.term}, last index "
                f"{engine.log.last_index}); initialize only fresh nodes")
        engine.bootstrap(membership, self._is_preferred(membership))
        self._schedule_flush()
        durable = await self._writer.drain()
        if self.failure is not None:
            raise self.failure  # the founding entry may not be durable: say so
        if not durable:
            raise NodeStopped(f"node {self.id} stopped before its founding entry was "
                              "durable: initialize it again after a restart")

    def propose(self, data: bytes) -> Awaitable[Any]:
        """Replicate ``data``; ``await`` the result to get the state machine's result for it.

        The command is queued when ``propose`` is called (on the fast path the awaitable
        is a plain future: no coroutine per write). Raises ``NotLeader`` (with the
        leader's id and address, when known) on a follower; ``ProposalDropped`` if
        leadership was lost before the entry was known committed; in that case the entry
        may or may not be committed by a later leader, unless the error's ``committed``
        says (False: safe to propose again). ``data`` is bytes (a bytearray or
        memoryview is copied at the call; anything else raises ``InvalidArgument``) of at
        most ``Config.max_entry_bytes`` (less for a network of smaller frames): a larger
        one fails with ``EntryTooLarge`` when awaited, and the others go on.
        """
        if data.__class__ is not bytes:  # its size is checked at the flush, in one pass
            data = payload(data, self._max_entry_bytes, self.config.max_entry_bytes)
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
        per command. Queued when called, like ``propose``, and fails as it does; a batch
        a later leader committed only in part fails with ``BatchPartlyCommitted`` (the
        results of its committed entries), one whose first entries were committed and
        the rest's fate is unknown with ``BatchRestUnknown`` (the same results, once
        those entries are applied here).
        ``datas``: a list (or any iterable) of bytes, checked whole at the call."""
        return self._propose_many(datas, False)

    def _propose_many(self, datas: Sequence[bytes], records: bool) -> Awaitable[list[Any]]:
        """``propose_batch``, or with ``records`` ``ReplicatedLog.append`` (entries of kind
        RECORD, answered with their indexes)."""
        if datas.__class__ is not list and not isinstance(datas, Sequence):
            datas = list(datas)  # a generator: taken whole, now
        if kernels.first_unfit_payload(datas, self._max_entry_bytes) >= 0:
            if isinstance(datas, (bytes, bytearray, memoryview, str)):
                raise InvalidArgument(f"a batch is a sequence of payloads (a list of bytes), "
                                      f"not one {type(datas).__name__}")
            limit, bound = self._max_entry_bytes, self.config.max_entry_bytes
            datas = [payload(d, limit, bound, k) for k, d in enumerate(datas)]
        if not datas or not self._accepting or self._proposals.pending >= self._max_pending:
            return self._propose_many_admitted(datas, records)
        fut = self._loop.create_future()
        self._proposals.add_batch(datas, fut, records)
        self._schedule_flush()
        return fut

    async def _propose_many_admitted(self, datas: Sequence[bytes], records: bool) -> list[Any]:
        if not datas:
            return []
        await self._admit()
        return await self._propose_many(datas, records)  # admitted: takes the fast path

    async def read_index(self, timeout: float | None = None) -> int:
        """Linearizable read barrier (thesis §6.4): returns a commit index once this node's
        state machine has applied it; reads of the state machine after that see every write
        acknowledged before this call. On a follower the leader is asked (again every
        ``election_timeout_min`` while it does not answer); a read that a change of leader
        fails is asked of the new leader. ``NotLeader`` when no leader is known at the
        call, when the leader refuses it (too many reads), or when none confirmed it
        within ``timeout`` (default: four ``election_timeout_max``)."""
        self._check_running()
        if timeout is not None:
            check_timeout(timeout)
        return await self._reads.read_index(timeout)

    async def wait_for_leader(self, timeout: float | None = 10.0) -> int:
        """Wait until a leader is known; returns its id. Raises ``TimeoutError`` (None:
        waits as long as it takes), or ``NodeStopped`` if the node stops meanwhile."""
        self._check_running()
        if timeout is not None:
            check_timeout(timeout)

        async def seen() -> int | None:
            # The leader as seen here: wait_for runs this in a task of its own, and by
            # the time the caller resumes a new term may have begun without a leader.
            while self._running:
                leader = self.engine.leader_id
                if leader is not None:
                    return leader
                await self._progress_wait()
            return None
        leader = await wait_within(seen(), timeout)
        if leader is None:
            raise self.failure or NodeStopped(f"node {self.id} is not running")
        return leader

    async def committed(self, start_index: int = 1) -> AsyncIterator[Entry]:
        """Committed user entries (state-machine commands) from ``start_index`` on: read
        from memory or storage, then following new commits live. Ends when the node
        stops (raises its ``NodeFailed`` if it stopped itself); raises ``OffsetCompacted``
        for entries no longer in the log."""
        check_count(start_index, "start_index")
        async for batch in self._log_reader.follow(start_index, _NORMAL):
            for e in batch:
                yield e

    async def snapshot(self) -> int:
        """Snapshot the state machine now and compact the log behind it (§7); returns the
        index the snapshot covers once it is durable. Also happens every
        ``Config.snapshot_interval`` entries."""
        self._check_running()
        done: asyncio.Future[int] = self._loop.create_future()
        self._applier.enqueue(done)  # taken in the apply task, between two batches
        return await done

    async def add_learner(self, node_id: int, address: str, timeout: float = 30.0) -> None:
        """Add a non-voting member (§6, thesis §4.2.1): it receives the log, and snapshots,
        but neither votes nor counts for commit. Returns once the change is committed."""
        check_timeout(timeout)
        await self._membership.add_learner(node_id, address, timeout)

    async def remove_learner(self, node_id: int, timeout: float = 30.0) -> None:
        """Remove learner ``node_id`` (one added by mistake, or no longer wanted): a change
        of learners only, so no joint configuration (§6); the leader stops replicating to
        it. Returns once the change is committed. A voter leaves through
        ``change_membership``."""
        check_timeout(timeout)
        await self._membership.remove_learner(node_id, timeout)

    async def update_address(self, node_id: int, address: str, timeout: float = 30.0) -> None:
        """Member ``node_id`` is now at ``address`` (it moved; restart it there on its
        data first). A configuration entry with the same members (§6: in force on every
        node once appended, so the leader dials the new address at once); no joint
        configuration, as no vote moves. Returns once it is committed; a no-op if the
        address is already that. Raises as ``add_learner`` does."""
        check_timeout(timeout)
        await self._membership.update_address(node_id, address, timeout)

    async def change_membership(self, voters: set[int], timeout: float = 30.0) -> None:
        """Move to the voter set ``voters`` through joint consensus (§6): C_old,new, then
        C_new. New voters must be learners already (``add_learner``); they are promoted only
        once they have answered the leader and are within ``Config.max_learner_lag``
        entries of it, else ``CatchUpTimeout``. Voters left out are removed; a leader left
        out steps down once C_new commits, handing leadership to the voter holding the
        most of the log (thesis §3.10). Raises ``MembershipChangeInProgress`` if a
        change is under way; ``ProposalDropped`` if this node loses leadership before the
        change commits and then learns that a later leader committed another entry in
        its place, or learns nothing for ``Config.lost_leadership_wait`` (read the
        membership before trying again), as ``add_learner`` and ``remove_learner`` do."""
        check_timeout(timeout)
        await self._membership.change_membership(voters, timeout)

    async def transfer_leadership(self, target: int, timeout: float | None = None) -> None:
        """Make voter ``target`` the leader (thesis §3.10). Proposals and membership changes
        are refused meanwhile (``NotLeader`` naming the target). Raises ``TimeoutError``
        if it did not happen."""
        if timeout is not None:
            check_timeout(timeout)
        self._leader_engine().transfer_leadership(target)
        self._schedule_flush()
        limit = timeout if timeout is not None else self.config.election_timeout_max * 3
        deadline = self._loop.time() + limit
        while self.engine.leader_id != target:
            self._check_running()
            e = self.engine
            if e.role == Role.LEADER and e.transfer_target != target:
                raise TimeoutError(f"leadership did not move to node {target}: the transfer "
                                   "was given up (the node declined it, as one that is "
                                   "stopping does; or it did not campaign within an "
                                   "election timeout; or another transfer replaced it)")
            if self._loop.time() > deadline:
                raise TimeoutError(f"leadership did not move to node {target} in {limit}s")
            try:
                await wait_within(self._progress_wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    async def step_down(self, timeout: float | None = None) -> None:
        """Before a planned stop (a rolling restart): hand leadership to the voter that
        holds the most of the log (thesis §3.10), then wait until the proposals this node
        took learn their fate from the new leader's commits, so that the stop answers
        none of them "may or may not"; new proposals meanwhile hear ``NotLeader`` naming
        the new leader. Nothing to do on a node that does not lead, or leads alone.
        ``timeout`` (default: three election timeouts) bounds each of the two waits; a
        transfer that does not happen in time is logged, and the stop then resigns as it
        always does (``Engine.resign``). From then on, leader or not, the node declines
        leadership handed to it (``Engine.leaving``: a ``RaftHost`` balancing its groups
        would give it back) until it stops; it still votes, and campaigns if its
        election timer runs out."""
        failure = await self.hand_over(timeout)
        if failure is not None:
            log.warning("%s: stepping down: %s", self.label, failure,
                        extra={"event": "step_down_failed", **self.log_fields})

    async def hand_over(self, timeout: float | None = None) -> str | None:
        """``step_down`` without its log line: why the handover or the wait failed, None
        if neither did. For a caller that reports many groups' at once (a ``RaftHost``
        stopping its thousand groups while the other hosts stop too)."""
        if timeout is not None:
            check_timeout(timeout)
        if self._running:
            self.engine.leaving = True
        target = self.engine.successor() if self._running else None
        if target is None:
            return None
        limit = timeout if timeout is not None else self.config.election_timeout_max * 3
        try:
            await self.transfer_leadership(target, limit)
            await wait_within(self._wait_progress(
                lambda: not self._proposals.waiting or not self._running), limit)
        except (FastRaftError, TimeoutError, asyncio.TimeoutError) as exc:
            # asyncio.TimeoutError: another class than the builtin before Python 3.11; the
            # wait's, the one without a message
            return str(exc) or f"the writes in flight did not learn their fate in {limit}s"
        return None

    def _notify_progress(self) -> None:
        event = self._progress
        if event is not None:  # someone waits
            self._progress = None
            event.set()

    async def _progress_wait(self) -> None:
        """Until the next progress (apply, change of role or leader, stop)."""
        event = self._progress
        if event is None:
            event = self._progress = asyncio.Event()
        await event.wait()

    async def _wait_progress(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._progress_wait()

    def _leader_engine(self) -> Engine:
        self._check_running()
        if self.engine.role != Role.LEADER:
            raise self.engine.not_leader()
        return self.engine

    def status(self) -> dict[str, Any]:
        """Role, term, leader, commit/applied index, membership, per-peer progress."""
        return observe.status(self)

    def metrics(self) -> Metrics:
        """The node's state and counters now (``docs/operations.md`` lists them); cheap
        enough to call often. ``fastraft.metrics`` serves them to Prometheus."""
        return observe.metrics(self)

    def watch_metrics(self, interval: float = 0.1) -> AsyncIterator[Metrics]:
        """``metrics()`` now, then again whenever the role, term, leader, an index or the
        membership changed, checked on every apply and at least every ``interval``
        seconds. Ends after the value that shows the node stopped."""
        return observe.watch_metrics(self, interval)

    def health(self, max_apply_lag: int = 1000) -> str | None:
        """Why this node is unhealthy, or None: healthy means running, a member of the
        configuration in force, a leader known (or being it), and the applied index
        within ``max_apply_lag`` of the commit index."""
        return observe.health(self, max_apply_lag)

    def peers_down(self, peers: frozenset[int]) -> str | None:
        """Which members' processes are down (``RaftHost``: hosts it suspects); returns
        why this quiet node woke, or None (``Engine.peers_down``)."""
        if not self._running:
            return None
        woke = self.engine.peers_down(peers)
        if woke is not None:
            self._schedule_flush()
        return woke

    def peers_back(self, peers: frozenset[int]) -> bool:
        """Members whose processes were heard coming back (``RaftHost``: a host heard
        again, or one that connected anew: restarted); a quiet leader tells them it
        leads, and a leader tells those its group removed that they are out
        (``Engine.remind``). Returns whether it did."""
        if not self._running or not self.engine.remind(peers):
            return False
        self._schedule_flush()
        return True

    @property
    def label(self) -> str:
        """How this node's log lines name it: ``node 1``, in a host ``node 1 group 7``."""
        if self.group_id is None:
            return f"node {self.id}"
        return f"node {self.id} group {self.group_id}"

    @property
    def log_fields(self) -> dict[str, int]:
        """The same for a log record's ``extra``: ``node``, and ``group`` in a host."""
        if self.group_id is None:
            return {"node": self.id}
        return {"node": self.id, "group": self.group_id}

    @property
    def running(self) -> bool:
        """Between ``start()`` and ``stop()``."""
        return self._running

    @property
    def is_leader(self) -> bool:
        """Running and leading (a stopped leader's engine keeps its last role)."""
        return self._running and self.engine.role == Role.LEADER

    @property
    def role_name(self) -> str:
        """"follower", "pre_candidate", "candidate", "leader", or "stopped" (not running:
        a stopped node's engine keeps its last role)."""
        e = self.engine
        return e.role.name.lower() if e is not None and self._running else "stopped"

    # ------------------------------------------------------------------ inbound

    def receive(self, from_id: int, messages: list[Any]) -> None:
        """Deliver messages from node ``from_id`` (called by the network). A message the
        engine refuses (a stranger's, or malformed: ``engine.checks``) is dropped, counted
        in ``status()["refused"]`` and logged in one line; the others are handled."""
        if not self._running:
            return
        step = self.engine.step
        counts = self._recorder.messages_in
        refused: str | None = "nothing handled"
        try:
            for m in messages:
                t = type(m)
                counts[t] += 1
                try:
                    refused = step(from_id, m)
                except Exception:  # a bug, not bad input (that is refused): say where
                    log.exception("%s: handling a %s from node %d failed", self.label,
                                  type(m).__name__, from_id)
                    continue
                if refused is not None:
                    _refusals.warning(from_id, "%s: dropped a %s from node %d: %s",
                                      self.label, t.__name__, from_id, refused,
                                      extra={"event": "message_refused", **self.log_fields,
                                             "peer": from_id, "type": t.__name__,
                                             "reason": refused})
        finally:
            # Remembered for members and the leader only: a stranger's messages, even
            # those taken (checks.refusal), cost no memory however many ids they claim.
            if refused is None and (from_id in self.engine.known_ids
                                    or from_id == self.engine.leader_id):
                self._last_heard[from_id] = self._loop.time()
            # The first message of an iteration is handled at once (latency); what follows
            # in the same iteration waits for the flush scheduled here (batching).
            if not self._flush_scheduled:
                self._flush()
                self._schedule_flush()

    # ------------------------------------------------------------------ internals

    def _check_running(self) -> None:
        """Raise unless the node runs; a call refused here did nothing (a proposal was
        not appended: ``committed`` False)."""
        if not self._running:
            raise self.failure or NodeStopped(f"node {self.id} is not running",
                                              committed=False)

    async def _admit(self) -> None:
        """Raise unless this node can take a proposal now; wait while too many are pending
        (back-pressure), up to ``Config.overload_wait``. On return, ``propose`` takes its
        fast path (nothing can run between this check and it)."""
        self._check_accepting()
        proposals, limit = self._proposals, self.config.max_pending_proposals

        def room() -> bool:
            # a stop or a lost leadership ends the wait too: _check_accepting says which
            return proposals.pending < limit or not self._accepting
        while not room():
            pending = proposals.pending
            if not self.config.overload_wait:
                self._recorder.proposals_overloaded += 1
                raise Overloaded(f"{pending} proposals pending; retry later")
            try:
                await wait_within(self._wait_progress(room), self.config.overload_wait)
            except asyncio.TimeoutError:
                self._recorder.proposals_overloaded += 1
                raise Overloaded(
                    f"{pending} proposals still pending after {self.config.overload_wait}s; "
                    "the cluster is not keeping up") from None
            self._check_accepting()

    def _check_accepting(self) -> None:
        """Raise unless a proposal can be taken: what is refused here is not appended."""
        self._check_running()
        if self.engine.role != Role.LEADER:
            raise self.engine.not_leader()
        if not self._accepting and self.failure is None:
            # Just elected: the engine leads, but the commands that say so (RoleChanged)
            # wait for the scheduled flush. Run them now rather than refuse.
            self._flush()
            if self.engine.role != Role.LEADER:
                raise self.engine.not_leader()
        if not self._accepting:
            raise NodeStopped(f"node {self.id} is stopping after a failed hook",
                              committed=False)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._running:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._running:
            return
        proposals = self._proposals
        if proposals.buffered and proposals.first_unfit(self._max_entry_bytes) >= 0:
            proposals.drop_singles(self._refusal)
        if proposals.buffered:
            datas, segments = proposals.take()
            engine = self.engine
            try:
                index = engine.propose(datas, segments)
            except NotLeader as exc:
                self._recorder.proposals_dropped += proposals.fail_buffered(exc)
                self._notify_progress()
            else:
                proposals.appended(index, engine.term)
                recorder = self._recorder
                recorder.proposals_accepted += len(datas)
                if recorder.timing:
                    recorder.flushed(engine.log.last_index)
        self._runner.run(self.engine.take_commands())

    def _refusal(self, data: bytes) -> InvalidArgument | None:
        """Why ``data`` cannot be an entry (too large), or None."""
        try:
            payload(data, self._max_entry_bytes, self.config.max_entry_bytes)
        except InvalidArgument as exc:
            return exc
        return None

    def _fail_node(self, what: str) -> None:
        """A hook raised: take no more proposals and stop the node (from a task, as this
        may run inside the apply task or a loop callback); pending operations and
        ``wait_stopped`` fail with ``NodeFailed`` saying what."""
        exc = sys.exc_info()[1]
        log.exception("%s: %s; stopping the node", self.label, what)
        if self.failure is None:
            self.failure = NodeFailed(f"node {self.id} stopped: {what}: {exc!r}")
        self._accepting = False
        self._loop.create_task(self.stop())

    def _membership_seen(self) -> None:
        """Tell the network the members' addresses once a configuration is in force (§6:
        on append, not on commit)."""
        membership = self.engine.membership
        if membership is not self._peers_of:
            self._peers_of = membership
            log.info("%s: membership voters %s learners %s%s", self.label,
                     sorted(membership.voters), sorted(membership.learners),
                     f" (joint with {sorted(membership.outgoing)})" if membership.outgoing
                     else "", extra={"event": "membership", **self.log_fields,
                                     "voters": sorted(membership.voters),
                                     "learners": sorted(membership.learners)})
            if membership.addresses:
                self.network.set_peers(dict(membership.addresses))
            if self.config.stop_when_removed:
                self._note_removal()

    def _note_removal(self) -> None:
        """``Config.stop_when_removed``: note the configuration entry that takes this node
        out of the group (none: 0; a new leader may have cut an uncommitted one), and
        stop if it is applied already (committed: until then the node may have to lead
        the change to commit, thesis §4.1)."""
        e = self.engine
        if not e.removed:
            self._removal_index = 0
        elif e.told_out:  # a leader's word: this log ends before the change
            self._removal_index = e.told_removed
        else:
            self._removal_index = e.membership_index
        self._stop_if_removed()

    def _stop_if_removed(self) -> None:
        """Once the configuration entry that took this node out of the group is applied,
        or a leader said it is committed (``Engine.told_out``: this log ends before it):
        stop (from a task, as this runs inside the apply path), ``wait_stopped``
        returning."""
        if not self._running or not self._removal_index or (
                self._applier.applied_index < self._removal_index
                and not self.engine.told_out):
            return
        log.warning("%s: removed from the cluster by the configuration entry at %d, "
                    "committed (voters %s): stopping (Config.stop_when_removed)",
                    self.label, self._removal_index, sorted(self.engine.membership.voters),
                    extra={"event": "removed", **self.log_fields,
                           "index": self._removal_index})
        self._removal_index = 0
        self._accepting = False
        if self.on_removed is not None:
            self.on_removed(self)
        self._loop.create_task(self.stop())

    def _end_orphan_wait(self) -> None:
        self._orphan_wait = None
        self._fate_wait_expired = self._fate_waits
        self._drop_orphans(self._unknown_fate("it may or may not be committed"))
        self._notify_progress()  # a membership call gives up

    def _unknown_fate(self, what: str) -> str:
        return (f"it did not learn its fate in {self.config.lost_leadership_wait:g} election "
                f"timeouts: {what}")

    def _cancel_orphan_wait(self) -> None:
        if self._orphan_wait is not None:
            self._orphan_wait.cancel()
            self._orphan_wait = None

    def _drop_orphans(self, why: str) -> None:
        """Fail the proposals of entries a lost leadership left open."""
        self._recorder.proposals_dropped += self._proposals.fail_orphans(self._orphan_error(why))

    def _orphan_error(self, why: str, committed: bool | None = None) -> ProposalDropped:
        return ProposalDropped(f"node {self.id} lost leadership before the entry committed; "
                               f"{why}", committed)

    def _told_removed(self, c: ToldRemoved) -> None:
        log.warning("%s: node %s says its configuration entry at %d, committed, leaves this "
                    "node out of the group; its log ends before that entry (removed while "
                    "down or cut off, long ago)", self.label, self.engine.told_by, c.index,
                    extra={"event": "told_removed", **self.log_fields, "index": c.index})
        if self.config.stop_when_removed:
            self._note_removal()

    def _follower_lost_entries(self, c: FollowerLostEntries) -> None:
        log.warning("%s: node %d had acknowledged entries up to %d but its log now ends at "
                    "%d: its storage lost them (a data directory wiped or replaced under "
                    "the same id?); catching it up again, but it may also have forgotten "
                    "a vote: replace such a node (docs/storage.md, \"Repairing a node\")",
                    self.label, c.peer, c.acknowledged, c.holds,
                    extra={"event": "follower_lost_entries", **self.log_fields,
                           "peer": c.peer, "acknowledged": c.acknowledged, "holds": c.holds})

    def _on_role_changed(self, c: RoleChanged) -> None:
        e = self.engine
        recorder = self._recorder
        was_leader = self._role_seen == Role.LEADER
        if c.role == Role.CANDIDATE:
            recorder.elections_started += 1
        elif c.role == Role.LEADER and not was_leader:
            recorder.elections_won += 1
        if c.leader_id is not None and c.leader_id != self._leader_seen:
            recorder.leader_changes += 1
            self._leader_seen = c.leader_id
        self._role_seen = c.role
        if self.campaign_limit is not None and c.role not in (Role.PRE_CANDIDATE,
                                                              Role.CANDIDATE):
            self.campaign_limit.release(self)  # the campaign is over, won or not
        if c.role != Role.LEADER:
            recorder.awaiting_commit.clear()  # their fate is no longer this node's to time
        log.info("%s: %s in term %d, leader %s, commit %d, last %d", self.label,
                 c.role.name.lower(), c.term, c.leader_id, e.commit_index, e.log.last_index,
                 extra={"event": "role", **self.log_fields, "role": c.role.name.lower(),
                        "term": c.term, "leader": c.leader_id})
        self._accepting = self._running and c.role == Role.LEADER
        if c.role != Role.LEADER:
            self._reads.lost_leadership()
        proposals = self._proposals
        if c.role == Role.LEADER:
            # Elected again: the entries of its earlier terms still in its log commit
            # with its new term's first entry (§5.4.2), and their proposers wait on.
            self._cancel_orphan_wait()
        else:
            if was_leader and (proposals.waiting or self.membership_calls):
                # Entries past the commit index are in this node's log, and a later
                # leader may commit them (a transfer's target holds them all, thesis
                # §3.10), even after one that lacked them cut them from this log: their
                # proposers wait, for a while, to learn which entries commit there.
                proposals.orphan(c.commit_index, self._orphan_error(
                    "a later leader committed other entries in its place: it was not "
                    "committed", committed=False))
                self._cancel_orphan_wait()
                self._fate_waits += 1
                config = self.config
                self._orphan_wait = self._loop.call_later(
                    config.lost_leadership_wait * config.election_timeout_max,
                    self._end_orphan_wait)
            if proposals.buffered:
                recorder.proposals_dropped += proposals.fail_buffered(NotLeader(
                    c.leader_id, e.membership.addresses.get(c.leader_id)
                    if c.leader_id is not None else None))
        self._notify_progress()  # wait_for_leader, transfer_leadership, back-pressure
