"""The Raft engine: a deterministic state machine from inputs to commands.

Inputs are messages (``step``), proposals (``propose``), timer expirations
(``on_timer``), read requests (``read_index``) and I/O completions (``log_persisted``,
``log_read``, the ``snapshot_*`` calls). The log's payloads are held only for its newest
entries (``RaftLog``); older ones are asked of the driver with commands (``ReadLog``,
``ApplyStored``), never read by the engine itself.
Each appends commands to an outbox that the driver drains with ``take_commands``; the
drain is also where replication is flushed, so every proposal that arrived since the last
drain travels in one AppendEntries per follower. No I/O, no clock, no global randomness:
the random source is injected, so a seed replays a run exactly.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from fastraft import kernels
from fastraft.config import Config
from fastraft.engine.checks import refusal
from fastraft.engine.commands import (
    AppendLog,
    Apply,
    ApplyStored,
    CancelTimer,
    Command,
    CompactLog,
    FollowerLostEntries,
    PersistHardState,
    QuietChanged,
    ReadFailed,
    ReadLog,
    ReadReady,
    Role,
    RoleChanged,
    Send,
    SendSnapshotChunk,
    SetTimer,
    StoreSnapshotChunk,
    Timer,
    ToldRemoved,
    TruncateLog,
)
from fastraft.engine.progress import Progress, ProgressState
from fastraft.engine.raftlog import RaftLog
from fastraft.errors import (
    AlreadyInitialized,
    InvalidArgument,
    MembershipChangeInProgress,
    NotLeader,
    SafetyViolation,
    StorageCorruption,
)
from fastraft.messages import (
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    Removed,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
    decode_membership,
    encode_membership,
)

_WON = kernels.VOTE_WON
_LOST = kernels.VOTE_LOST
#: Heartbeat intervals a ``ReadLog`` may go unanswered before the leader asks again.
READ_LOG_PATIENCE = 20
#: Heartbeat ticks skip busy followers only when the election timeout is at least this
#: many heartbeat intervals (as by default).
BUSY_HEARTBEAT_SKIP_RATIO = 3
#: The part of the election timeout range a group's preferred replica draws its first
#: timeout from (``Engine.start``); the other replicas draw from the rest.
PREFERRED_PART = 1 / 3
#: Election timeouts in a row without a leader after which a learner campaigns (from
#: this one on; ``Engine._on_election_timeout``): the voters get the ones before.
LEARNER_CAMPAIGN_TIMEOUTS = 3


class InitialState(msgspec.Struct, kw_only=True):
    """What a node recovers from its storage at start-up."""

    hard_state: HardState = msgspec.field(default_factory=HardState)
    snapshot_index: int = 0
    snapshot_term: int = 0
    snapshot_membership: Membership = msgspec.field(default_factory=Membership)
    #: Durable log entries after the snapshot, in order (or none, and the rest given to
    #: ``Engine.load_log`` in batches before ``start``).
    entries: list[Entry] = msgspec.field(default_factory=list)
    #: Size in bytes of the snapshot at snapshot_index (0: no snapshot).
    snapshot_size: int = 0
    #: Highest index the state machine already holds (>= snapshot_index when it says so).
    applied_index: int = 0


class _PendingRead(msgspec.Struct, array_like=True, gc=False):
    seq: int
    read_index: int
    request_id: int
    #: None for a read asked on this node, else the follower that forwarded it.
    origin: int | None


def _configuration(membership: Membership) -> bytes:
    """``membership`` encoded for a configuration entry, once it decodes as every node
    will decode it: ids and addresses the wire cannot carry raise ``InvalidArgument``
    here, before the entry is in the log (after, no node could read it)."""
    data = encode_membership(membership)
    try:
        decode_membership(data)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"a configuration the wire cannot carry: {exc}") from None
    return data


def _removed_after(old: Membership, members: frozenset[int]) -> frozenset[int]:
    """``Membership.removed`` of the configuration that follows ``old`` and holds
    ``members``: every node taken out so far, but those it puts back."""
    return (old.removed | old.members) - members


def _term_regression(entry: Entry, prev_index: int, prev_term: int) -> StorageCorruption:
    return StorageCorruption(
        f"the stored log goes on at entry {entry.index} with term {entry.term}, older "
        f"than term {prev_term} of entry {prev_index}: damage; restore this node from a "
        "replica")


class Engine:
    """One Raft node's logic (Figure 2 of the paper, plus thesis §6.4 reads and §9.6 pre-vote)."""

    # Slots: past 30 attributes CPython's instances stop sharing their dicts' keys, and
    # each engine would carry a dict of its own (1.2 KB more, in every idle group of a
    # host). ``__dict__`` is made only when something sets another attribute (a spy).
    __slots__ = ("id", "config", "rng", "term", "voted_for", "recovering", "_recover_term",
                 "log", "_stored_commit", "commit_index", "applied_index",
                 "persisted_index", "role", "leader_id", "_configs", "membership",
                 "_voters_in", "_voters_out", "known_ids", "refused", "_snapshot",
                 "_snapshot_size", "leader_alive", "_leaderless_timeouts", "_votes",
                 "progress", "departing", "_told_again", "_retell_wait", "told_removed",
                 "_told_commit", "told_by", "_seq",
                 "_reads", "_reads_before_commit", "_forwarded_reads", "_transfer_target",
                 "_transfer_rounds", "_timeout_now_sent", "lease_forfeited", "leaving",
                 "_vote_unsynced_term", "_term_durable", "_election_deferred", "quiet",
                 "_idle_heartbeats", "_idle_mark", "down", "_quiesce_rounds", "_farewell_rounds",
                 "_retell_rounds", "_skip_busy_heartbeats", "cache_budget", "_out",
                 "_broadcast", "_commit_timer_armed", "_heartbeat_needed", "_match",
                 "_acked", "__dict__")

    def __init__(self, node_id: int, config: Config | None = None,
                 rng: random.Random | None = None, state: InitialState | None = None) -> None:
        self.id = node_id
        self.config = config or Config()
        self.rng = rng or random.Random(node_id)
        state = state or InitialState()
        hs = state.hard_state

        # Persistent state (Figure 2), durable before any message that depends on it.
        self.term: int = hs.current_term
        self.voted_for: int | None = hs.voted_for
        #: Repaired storage (HardState.recovering): no votes, no campaigns until caught up
        #: (thesis §11.7 on disk loss; ``_check_recovered``).
        self.recovering: bool = hs.recovering
        #: Recovering: the term this node started in. Every entry it acknowledged before
        #: the damage is of that term or earlier.
        self._recover_term = hs.current_term
        self.log = RaftLog(state.snapshot_index, state.snapshot_term)

        # Volatile state. Invariant: snapshot_index <= applied_index <= commit_index <=
        # log.last_index, except transiently while a follower learns a commit index.
        self._stored_commit = hs.commit
        self.commit_index: int = state.snapshot_index
        #: Highest index handed to the driver in an Apply command.
        self.applied_index: int = max(state.applied_index, state.snapshot_index)
        #: Highest index known durable in the local log; the leader's own "match".
        self.persisted_index: int = state.snapshot_index
        self.role = Role.FOLLOWER
        self.leader_id: int | None = None

        # Configurations in the log after the snapshot (§6: in force once appended).
        self._configs: list[tuple[int, Membership]] = [
            (state.snapshot_index, state.snapshot_membership)]
        self.membership: Membership = self._configs[-1][1]
        self._voters_in: tuple[int, ...] = ()
        self._voters_out: tuple[int, ...] = ()
        #: Every node of every configuration in the log (and the snapshot's): messages
        #: from anyone else are refused (``checks.refusal``). Empty: no configuration yet.
        self.known_ids: frozenset[int] = frozenset()
        self._refresh_voters()
        #: Messages refused, by kind ("stranger", "malformed").
        self.refused: dict[str, int] = {"stranger": 0, "malformed": 0}

        #: The newest durable snapshot, which the leader sends to followers that need
        #: entries already compacted.
        self._snapshot: SnapshotMeta | None = None
        self._snapshot_size = 0
        if state.snapshot_size:
            self._snapshot = SnapshotMeta(state.snapshot_index, state.snapshot_term,
                                          state.snapshot_membership)
            self._snapshot_size = state.snapshot_size
        #: Follower: a leader was heard from less than election_timeout_min ago.
        self.leader_alive = False
        #: Election timeouts in a row with no leader's message between them (counted on
        #: learners, which campaign from ``LEARNER_CAMPAIGN_TIMEOUTS`` on).
        self._leaderless_timeouts = 0

        # Candidate state.
        self._votes: dict[int, bool] = {}
        # Leader state.
        self.progress: dict[int, Progress] = {}
        #: Nodes a configuration entry of this leader's removed, until they hold that
        #: entry and know it committed (``_say_farewells``).
        self.departing: dict[int, Progress] = {}
        #: Removed nodes that asked this leader for votes and were told again, until
        #: ``_retell_wait`` more heartbeat ticks have passed (``_tell_removed_again``) or
        #: the farewell is given up with the configuration in force uncommitted.
        self._told_again: set[int] = set()
        self._retell_wait = 0
        #: A leader's word that it is out (``Removed``): the index of the leader's
        #: configuration in force, which leaves this node out, and how far the leader's
        #: log was committed. It is out while its own configuration in force is at or
        #: before that commit index (not persisted: told again after a restart, once it
        #: asks for votes or its host comes back).
        self.told_removed = 0
        self._told_commit = 0
        #: The leader that said so (of this term or an earlier one: ``_on_stale_removed``).
        self.told_by: int | None = None
        #: Heartbeat sequence number: bumped for every read that needs a fresh quorum.
        self._seq = 0
        self._reads: list[_PendingRead] = []
        #: Reads that must wait until this leader commits an entry of its own term.
        self._reads_before_commit: list[tuple[int, int | None]] = []
        #: Read requests this follower forwarded to the leader.
        self._forwarded_reads: set[int] = set()
        #: Leadership transfer in progress (thesis §3.10): the target, and how many
        #: election-timer rounds it has been going on.
        self._transfer_target: int | None = None
        self._transfer_rounds = 0
        self._timeout_now_sent = False
        #: Leader: a ``TimeoutNow`` went out in this term. Its receiver campaigns at once,
        #: and voters grant a transfer's votes despite a live leader (thesis §3.10), so the
        #: followers' promise a read lease rests on (§6.4.1) no longer holds: no lease
        #: reads until the next term, even if the transfer is declined or abandoned (a
        #: delayed or duplicated ``TimeoutNow`` can still start that election).
        self.lease_forfeited = False
        #: The driver is stopping this node (``RaftNode.step_down``): it declines the
        #: leadership a leader hands it, so that a host balancing its groups does not
        #: give back what this node just handed over. It still votes, and still
        #: campaigns when its election timer runs out.
        self.leaving = False
        #: The term of this node's latest vote (for itself as a candidate, or granted)
        #: while it may not be durable yet, 0 once it is (``hard_state_persisted``).
        self._vote_unsynced_term = 0
        #: The latest term known durable (a hard state of it written): replies of that
        #: term promise no term the disk may lose.
        self._term_durable = hs.current_term
        #: The election timer ran out while that vote was not durable: it is armed
        #: afresh once the vote is (``_on_election_timeout``).
        self._election_deferred = False

        #: Nothing to do and told so (``Config.quiesce_after``): no timers run; any input
        #: but the quiesce heartbeat and its answers wakes it (``wake``).
        self.quiet = False
        #: Leader: consecutive heartbeats with the group ready to go quiet, and the
        #: (last index, read sequence) they saw, which any activity changes.
        self._idle_heartbeats = 0
        self._idle_mark = (0, 0)
        #: Members whose process the driver knows is down (``peers_down``).
        self.down: frozenset[int] = frozenset()
        self._quiesce_rounds = max(1, round(self.config.quiesce_after
                                            / self.config.heartbeat_interval))
        #: Heartbeat intervals a leader spends telling a removed node so: an election
        #: timeout's worth, after which that node would have campaigned anyway.
        self._farewell_rounds = max(2, math.ceil(self.config.election_timeout_max
                                                 / self.config.heartbeat_interval))
        #: Heartbeat ticks before a removed node that asks for votes again is told again:
        #: four farewells' worth, so one that cannot be told costs a farewell now and then.
        self._retell_rounds = 4 * self._farewell_rounds
        #: A busy follower (sent an AppendEntries since the last tick) gets no heartbeat
        #: from the tick: it then hears from this leader at least every two intervals,
        #: which must stay within two thirds of its election timeout (§5.6's margin).
        self._skip_busy_heartbeats = (self.config.election_timeout_min / BUSY_HEARTBEAT_SKIP_RATIO
                                      >= self.config.heartbeat_interval * (1 - 1e-9))
        #: Bytes of entries this node keeps in memory: ``Config.log_cache_bytes``, or less
        #: when a host shares one budget among its groups (``limit_cache``).
        self.cache_budget = self.config.log_cache_bytes

        self._out: list[Command] = []
        self._broadcast = False
        self._commit_timer_armed = False
        self._heartbeat_needed = False
        if state.entries:
            self.load_log(state.entries)

    # ------------------------------------------------------------------ driver API

    def load_log(self, entries: list[Entry]) -> int | None:
        """Start-up: the next batch of the durable log after the snapshot. Only the newest
        ``cache_budget`` bytes stay in memory; the rest is read back when needed.

        Returns None, or the index from which the stored log was cut: a log that goes on
        right after the snapshot with an older term than the snapshot's is one the
        snapshot replaced (left by a crash between saving a leader's snapshot and cutting
        the log past it). None of it was committed: a committed entry past the snapshot
        follows the snapshot's last entry in every later leader's log (Log Matching,
        §5.3), so its term is at least the snapshot's. ``start`` emits the cut
        (``TruncateLog``) first; the caller loads nothing more."""
        last = self.log.last_index
        if entries and entries[0].term < self.log.term_at(last):
            if last == self.log.snapshot_index and entries[0].index == last + 1:
                self._out.append(TruncateLog(last + 1))
                return last + 1
            raise _term_regression(entries[0], last, self.log.term_at(last))
        try:
            self.log.append(entries)
        except ValueError:  # the index refuses a term older than the one before it
            prev, e = next((p, e) for p, e in zip(entries, entries[1:]) if e.term < p.term)
            raise _term_regression(e, prev.index, prev.term) from None
        self._scan_configs(entries)
        self.membership = self._configs[-1][1]
        self._refresh_voters()
        self.persisted_index = self.log.last_index
        self.commit_index = max(min(self._stored_commit, self.log.last_index),
                                self.log.snapshot_index)
        self._trim_cache()
        return None

    def start(self, preferred: bool | None = None) -> list[Command]:
        """Commands to run once at start-up: re-apply committed entries, arm the timer.

        ``preferred`` (a ``RaftHost``'s replicas): whether this replica is the one its
        group's leadership is balanced to. Its first election timeout is then drawn from
        the first ``PREFERRED_PART`` of the range and the others' from the rest, so that
        when every replica starts at once the preferred one mostly campaigns first,
        and leadership need not be handed over to it afterwards. Only timing: any
        replica still wins an election it can win (§5.2)."""
        if self.recovering:
            # A leader of the term this node was repaired in may still count what it
            # acknowledged before the damage, and its commit index may lag behind that.
            # A later term deposes such a leader (its appends are answered with it); the
            # next leader's own entries then end recovery (_check_recovered).
            self.term += 1
            self.voted_for = None
            self._persist_hard_state()
        self._emit_apply()
        self._arm_election_timer(preferred)
        if self.term and self.config.check_quorum:
            # Before it stopped, this node may have answered a leader, promising no vote
            # for election_timeout_min (§4.2.3): the promise that leader's read lease
            # rests on (§6.4.1). A new process does not know when that was, so it keeps
            # the promise from its start, as if a leader had just been heard.
            self.leader_alive = True
            self._out.append(SetTimer(Timer.LEASE, self.config.election_timeout_min))
        return self.take_commands()

    def take_commands(self) -> list[Command]:
        """Flush pending replication, then hand over every command emitted so far."""
        if self.role == Role.LEADER:
            if self._broadcast:
                self._broadcast = False
                immediate = not self.config.commit_notify_delay
                for peer, pr in self.progress.items():
                    if self._replicate(peer, pr, commit_only=immediate) and \
                            not self._commit_timer_armed:
                        self._commit_timer_armed = True
                        self._out.append(SetTimer(Timer.COMMIT,
                                                  self.config.commit_notify_delay))
                if self.departing:
                    self._say_farewells()
            if self._heartbeat_needed:
                self._heartbeat_needed = False
                for peer, pr in self.progress.items():
                    if pr.acked_seq < self._seq:
                        self._send(peer, self._heartbeat(pr))
        out = self._out
        self._out = []
        return out

    def bootstrap(self, membership: Membership, preferred: bool | None = None) -> None:
        """Form a new cluster: write ``membership`` as entry 1 of term 1.

        Every founding node may be bootstrapped with the same membership (identical logs),
        or just one, the others joining empty. ``preferred``: as for ``start``, the
        election timer armed again (a host founding many groups at once).
        """
        if not self.fresh:
            raise AlreadyInitialized(
                f"node {self.id} already has state (term {self.term}, "
                f"last index {self.log.last_index}); initialize only a fresh node")
        data = _configuration(membership)
        self.term = max(self.term, 1)  # never back: a vote of a later term stands
        self._persist_hard_state()
        self._append_own([Entry(1, 1, EntryKind.CONFIG, data)])
        if preferred is not None:
            self._arm_election_timer(preferred)

    def propose(self, datas: Sequence[bytes],
                records: Sequence[tuple[int, int]] = ()) -> int:
        """Append user commands to the leader's log; returns the index of the first.
        ``records``: ``(position, count)`` spans of ``datas`` that are ``ReplicatedLog``
        records rather than state-machine commands."""
        if self.role != Role.LEADER:
            raise self.not_leader()
        if self.quiet:  # tested here: a call per proposal batch is not free
            self.wake()
        if self._transfer_target is not None:
            raise self._handing_over(self._transfer_target)
        first = self.log.last_index + 1
        if datas:
            entries = kernels.make_entries(self.term, first, EntryKind.NORMAL, datas)
            for pos, count in records:
                entries[pos:pos + count] = kernels.make_entries(
                    self.term, first + pos, EntryKind.RECORD, datas[pos:pos + count])
            self._append_own(entries, user_commands=True)
        return first

    def _handing_over(self, target: int) -> NotLeader:
        """What a leader handing over answers a proposal or a membership change: no new
        entries meanwhile (thesis §3.10), each would hold the target back from the end of
        the log; ask the target, which is about to lead (etcd drops them as well)."""
        return NotLeader(target, self.membership.addresses.get(target))

    @property
    def membership_index(self) -> int:
        """Index of the configuration entry in force (0: none in the log yet)."""
        return self._configs[-1][0]

    @property
    def membership_change_pending(self) -> bool:
        """A configuration entry is not committed yet, or the joint configuration is in
        force: the change under way has to finish before another starts (§6)."""
        return self._configs[-1][0] > self.commit_index or self.membership.joint

    def propose_membership(self, voters: frozenset[int], learners: frozenset[int] = frozenset(),
                           addresses: dict[int, str] | None = None) -> int:
        """Start a change to ``voters``/``learners`` (§6). A change of voters goes through
        the joint configuration C_old,new; the leader appends C_new once that commits.
        Returns the index of the configuration entry."""
        if self.role != Role.LEADER:
            raise self.not_leader()
        if self._transfer_target is not None:
            raise self._handing_over(self._transfer_target)
        if self.membership_change_pending:
            raise MembershipChangeInProgress(
                "a membership change is still in progress; wait for it to commit")
        if not voters:
            raise InvalidArgument("a configuration needs at least one voter")
        self.wake()
        old = self.membership
        addrs = dict(old.addresses)
        addrs.update(addresses or {})
        members = voters | learners
        addrs = {k: v for k, v in addrs.items() if k in members or k in old.voters}
        outgoing = frozenset() if voters == old.voters else old.voters
        new = Membership(voters=voters, learners=learners - voters, outgoing=outgoing,
                         addresses=addrs, removed=_removed_after(old, members | outgoing))
        data = _configuration(new)
        index = self.log.last_index + 1
        self._append_own([Entry(self.term, index, EntryKind.CONFIG, data)])
        return index

    def transfer_leadership(self, target: int) -> None:
        """Hand leadership to voter ``target`` (thesis §3.10): stop taking proposals, bring
        it up to date, then tell it to campaign at once. Abandoned after an election
        timeout; success shows as a ``RoleChanged`` to follower."""
        if self.role != Role.LEADER:
            raise self.not_leader()
        if target == self.id:
            return
        if not self.membership.is_voter(target):
            raise InvalidArgument(f"node {target} is not a voter; only voters can lead")
        self.wake()
        self._hand_over(target)

    def _hand_over(self, target: int) -> None:
        """Start handing leadership to ``target``, a voter (``transfer_leadership``)."""
        self._transfer_target = target
        self._transfer_rounds = 0
        if not self.config.check_quorum:
            self._out.append(SetTimer(Timer.ELECTION, self.config.election_timeout_max))
        self._timeout_now_sent = False
        if self.progress[target].match_index == self.log.last_index:
            self._send_timeout_now(target)
        else:
            self._broadcast = True

    def resign(self) -> list[tuple[int, Message]]:
        """The messages a leader whose node stops sends on its way out (none from other
        roles): ``TimeoutNow`` to the voter holding the most of the log, which campaigns
        at once (thesis §3.10 without waiting for it to catch up: the election
        restriction, §5.4.1, keeps a stale log from winning), and a heartbeat to every
        other member. The heartbeat matters in a quiet group: its followers run no
        election timer and would not miss a leader whose process stays up; woken, they
        elect one even if that voter is gone too. Returned rather than emitted: the node
        runs nothing else of the engine's once it stops."""
        target = self.successor()
        if target is None:
            return []
        self.lease_forfeited = True
        out: list[tuple[int, Message]] = []
        for peer, pr in self.progress.items():
            if peer != target:
                out.append((peer, self._heartbeat(pr)))
        out.append((target, TimeoutNow(self.term, self.id)))
        return out

    def successor(self) -> int | None:
        """On a leader, the other voter holding the most of the log (the lowest id of
        those tied): the one to hand over to (thesis §3.10). None on other roles, or
        with no other voter."""
        if self.role != Role.LEADER:
            return None
        voters = [p for p in self.progress if self.membership.is_voter(p)]
        if not voters:
            return None
        return max(voters, key=lambda p: (self.progress[p].match_index, -p))

    def caught_up(self, peer: int, max_lag: int) -> bool:
        """On a leader: ``peer`` has answered (a match of 0 is a node not heard from yet:
        with a log shorter than the lag it would pass) and is within ``max_lag`` entries of
        this log's end. Entries still in flight count as lag, so under a steady load even a
        healthy follower is rarely at the very end."""
        pr = self.progress.get(peer)
        return pr is not None and 0 < pr.match_index \
            and self.log.last_index - pr.match_index <= max_lag

    def _send_timeout_now(self, target: int) -> None:
        if not self._timeout_now_sent:
            self._timeout_now_sent = True
            self.lease_forfeited = True
            self._send(target, TimeoutNow(self.term, self.id))

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        """Metadata for a snapshot of the state machine at applied ``index``."""
        if not self.log.snapshot_index <= index <= self.applied_index:
            raise InvalidArgument(f"cannot snapshot at {index}: the log holds "
                                  f"{self.log.snapshot_index}..{self.log.last_index}, applied "
                                  f"{self.applied_index}")
        membership = self._configs[0][1]
        for i, m in self._configs:
            if i > index:
                break
            membership = m
        return SnapshotMeta(index, self.log.term_at(index), membership)

    def snapshot_saved(self, meta: SnapshotMeta, size: int) -> None:
        """The driver made a snapshot durable: followers too far behind get it, and the log
        is compacted behind it, keeping ``snapshot_trailing_entries`` (§7)."""
        if self._snapshot is not None and \
                meta.last_included_index <= self._snapshot.last_included_index:
            return
        self._snapshot = meta
        self._snapshot_size = size
        cfg = self.config
        target = min(meta.last_included_index - cfg.snapshot_trailing_entries,
                     self.persisted_index, self.applied_index)
        if cfg.log_retention_entries:
            target = min(target, self.log.last_index - cfg.log_retention_entries)
        if cfg.log_retention_bytes:
            target = min(target, self.log.retained_from(cfg.log_retention_bytes))
        if target > self.log.snapshot_index:
            self._compact(target)

    def snapshots_in_use(self) -> set[int]:
        """Indexes of the snapshots the driver must still be able to read chunks of: the
        newest, and any a follower is being sent."""
        used = {p.snapshot_index for p in self.progress.values()
                if p.state == ProgressState.SNAPSHOT}
        if self._snapshot is not None:
            used.add(self._snapshot.last_included_index)
        return used

    def snapshot_chunk_stored(self, frm: int, message: InstallSnapshot, next_offset: int) -> None:
        """The driver kept the chunk (or not): tell the leader where to continue."""
        self._send(frm, InstallSnapshotResponse(self.term, message.meta.last_included_index,
                                                next_offset, False))

    def snapshot_installed(self, frm: int, meta: SnapshotMeta, size: int) -> None:
        """The driver restored the state machine from a received snapshot and saved it
        durably: the log now continues after it (§7)."""
        index, term = meta.last_included_index, meta.last_included_term
        if index > self.commit_index:
            if self.log.term_at(index) == term:
                self._compact(index)  # §7: a matching entry keeps the entries after it
            else:
                if self.log.last_index > self.log.snapshot_index:
                    self._out.append(TruncateLog(self.log.snapshot_index + 1))
                self.log.reset(index, term)
                # Nothing after the snapshot is durable now (or known to be: the old
                # log's persisted index says nothing of the new one).
                self.persisted_index = index
                self._configs = [(index, meta.membership)]
                self._out.append(CompactLog(index))
                self._membership_changed()
            self.commit_index = index
            self.applied_index = max(self.applied_index, index)
            self.persisted_index = max(self.persisted_index, index)
            if self._snapshot is None or index > self._snapshot.last_included_index:
                self._snapshot = meta
                self._snapshot_size = size
        self._send(frm, InstallSnapshotResponse(self.term, index, size, True))

    def read_index(self, request_id: int) -> None:
        """Ask for a linearizable read point (thesis §6.4). Answered by a ``ReadReady`` or
        ``ReadFailed`` command; a follower forwards the request to its leader."""
        self.wake()
        if self.role == Role.LEADER:
            self._leader_read(request_id, None)
        elif self.leader_id is not None:
            self._forwarded_reads.add(request_id)
            self._send(self.leader_id, ReadIndexRequest(self.term, request_id))
        else:
            raise self.not_leader()

    def ask_again(self, request_id: int) -> None:
        """Send a read this follower forwarded to its leader again: the request or its
        answer may have been lost (with a connection that broke). Nothing once it is
        answered, or failed by a change of leader. The first answer counts; a later one
        for the same request is ignored (both are read points taken after it began)."""
        if request_id in self._forwarded_reads:  # so the leader is still the one asked
            assert self.leader_id is not None
            self._send(self.leader_id, ReadIndexRequest(self.term, request_id))

    def wake(self, leader_lost: bool = False) -> None:
        """Leave the quiet state: the leader heartbeats again (and checks its quorum, from
        scratch), a follower runs its election timer again. ``leader_lost``: the driver
        suspects the leader's process is gone, so a follower stops counting its leader as
        alive and campaigns once its election timer runs out."""
        if not self.quiet:
            return
        self.quiet = False
        self._out.append(QuietChanged(False))
        self._idle_heartbeats = 0
        cfg = self.config
        if self.role == Role.LEADER:
            for pr in self.progress.values():
                pr.recent_active = False
            self._out.append(SetTimer(Timer.HEARTBEAT, cfg.heartbeat_interval))
            if cfg.check_quorum:
                self._out.append(SetTimer(Timer.ELECTION, cfg.election_timeout_max))
            return
        self._arm_election_timer()
        if leader_lost:
            self.leader_alive = False
        else:
            self._out.append(SetTimer(Timer.LEASE, cfg.election_timeout_min))

    def log_persisted(self, index: int, term: int) -> None:
        """The driver made the log durable up to ``index`` (whose entry has ``term``)."""
        if index > self.persisted_index and self.log.term_at(index) == term:
            self.persisted_index = index
            self._trim_cache()
            if self.role == Role.LEADER:
                self._match.set(self.id, index)
                self._maybe_commit()
            elif self.recovering:
                self._check_recovered()

    def hard_state_persisted(self, term: int) -> None:
        """The driver made a hard state of ``term`` durable (the latest it was given:
        they are written in order). A vote of that term or an earlier one is now on disk,
        and the messages that waited for it have left."""
        if term > self._term_durable:
            self._term_durable = term
        if not self._vote_unsynced_term or term < self._vote_unsynced_term:
            return
        self._vote_unsynced_term = 0
        if self._election_deferred:
            self._election_deferred = False
            if self.role != Role.LEADER:
                self._arm_election_timer()

    def log_read(self, peer: int, start: int, entries: list[Entry]) -> None:
        """The driver read what a ``ReadLog`` asked for: send it, if ``peer`` still needs
        it and it is still this log (a read that raced a change of log is dropped)."""
        pr = self.progress.get(peer)
        if pr is None or self.role != Role.LEADER or pr.reading_from != start:
            return
        pr.reading_from = 0
        if pr.state == ProgressState.SNAPSHOT or pr.next_index != start or \
                not self.log.matches(entries):
            if pr.state == ProgressState.PROBE:
                pr.probe_sent = False
            self._broadcast = True  # ask again for what it needs now
            return
        self._send_entries(peer, pr, start - 1, entries)
        self._broadcast = True  # the next read, or what is cached

    def log_read_failed(self, peer: int, start: int) -> None:
        """A ``ReadLog`` failed: probe ``peer`` again on the next heartbeat."""
        pr = self.progress.get(peer)
        if pr is not None and self.role == Role.LEADER and pr.reading_from == start:
            pr.reading_from = 0
            if pr.state != ProgressState.SNAPSHOT:
                pr.become_probe()
                pr.probe_sent = True

    @property
    def removed(self) -> bool:
        """Taken out of the group: in a configuration of this log but not in the one in
        force (§6: in force once appended), or named in its ``removed`` (the entries that
        took it out compacted), or told so by a leader (``told_removed``). A node
        catching up from before the entry that adds it is in none of them yet."""
        m = self.membership
        return self.id not in m.members and (self.id in self.known_ids or self.id in m.removed) \
            or self.told_out

    @property
    def told_out(self) -> bool:
        """A leader said its configuration in force leaves this node out, its log
        committed at or past this node's configuration in force (``Removed``): the
        leader's configuration is the later one, as a committed configuration entry
        after it would be in the leader's log, and one here that is not there is an old
        leader's that never committed. This log ends before the change."""
        return 0 < self._told_commit >= self._configs[-1][0]

    @property
    def fresh(self) -> bool:
        """No log and no snapshot: a node ``bootstrap`` may form a cluster on. A term and
        a vote do not count: a founder started before its ``initialize`` may have voted
        for another founder already, and it holds nothing the founding entry could
        contradict."""
        return self.log.last_index == 0 and self.log.snapshot_index == 0

    def founding_membership(self) -> Membership | None:
        """The configuration of entry 1, if the log still holds it."""
        configs = self._configs
        if self.log.snapshot_index == 0 and len(configs) > 1 and configs[1][0] == 1:
            return configs[1][1]
        return None

    def limit_cache(self, budget: int) -> None:
        """Keep at most ``budget`` bytes of entries in memory from now on (never more than
        ``Config.log_cache_bytes``): a host sharing one budget among its groups gives each
        its share. Entries not yet durable stay whatever the budget."""
        if budget < 0:
            raise InvalidArgument(f"a cache budget is a number of bytes, got {budget!r}")
        self.cache_budget = min(budget, self.config.log_cache_bytes)
        self._trim_cache()

    def _trim_cache(self) -> None:
        log, budget = self.log, self.cache_budget
        if log.cache_bytes > budget:
            # Entries already handed to the state machine first; durable ones it has yet
            # to get only if that is not enough (they are then applied from storage).
            log.evict(min(self.persisted_index, self.applied_index), budget)
            if log.cache_bytes > budget:
                log.evict(self.persisted_index, budget)

    def _check_recovered(self) -> None:
        """A repaired node may vote again once it durably holds a committed entry of a
        term after ``_recover_term``. Each entry it acknowledged before the damage is of
        that term or earlier; if one was ever committed, by a leader of that term or
        earlier, it is in the log of every leader of a later term (§5.4.3), ahead of that
        leader's own entries, so it is held too. (The first leader's commit index is not
        enough: a leader of the repair term may commit later with an acknowledgement this
        node gave before the damage, and a new leader's commit index lags until an entry
        of its own term commits, §5.4.2.)"""
        held = min(self.commit_index, self.persisted_index)
        if self.log.term_at(held) > self._recover_term:
            self.recovering = False
            self._persist_hard_state()

    def on_timer(self, timer: Timer) -> None:
        if timer == Timer.ELECTION:
            self._on_election_timeout()
        elif timer == Timer.HEARTBEAT and self.role == Role.LEADER:
            self._on_heartbeat_timeout()
        elif timer == Timer.LEASE:
            self.leader_alive = False
        elif timer == Timer.COMMIT:
            self._commit_timer_armed = False
            if self.role == Role.LEADER:
                for peer, pr in self.progress.items():
                    self._replicate(peer, pr, commit_only=True)

    def step(self, frm: int, m: Any) -> str | None:
        """Handle message ``m`` from node ``frm``: checks first (``checks.refusal``),
        then terms (§5.1), then by role. Returns why ``m`` was refused, or None."""
        refused = refusal(self, frm, m)
        if refused is not None:
            self.refused[refused[0]] += 1
            return refused[1]
        t = type(m)
        if self.quiet and m.term >= self.term and not self._keeps_quiet(frm, t, m):
            self.wake()
        if t is RequestVote and self.role == Role.LEADER and frm not in self.progress:
            self._tell_removed_again(frm)
            if frm not in self.known_ids:
                return None  # removed before this log begins: told, and heard no further
        if m.term > self.term:
            if t is RequestVote and not m.leadership_transfer and self.config.check_quorum \
                    and (self.leader_alive or self.role == Role.LEADER):
                # A leader is alive (check-quorum would depose it otherwise): a node that
                # merely lost contact must not disrupt the cluster (thesis §4.2.3).
                return None
            if (t is AppendEntriesResponse or t is InstallSnapshotResponse) \
                    and self.role == Role.LEADER and frm not in self.progress:
                # A node out of the configuration answers its farewell in a later term:
                # without pre-vote its term rises at each of its election timeouts, with
                # pre-vote in an election a majority let it run (or on a TimeoutNow
                # whose votes were lost). Taking it would depose this leader for a node
                # that is out, and removed servers must not disrupt the cluster
                # (§4.2.3); ignoring a message is always safe. It refuses the farewell's
                # entries in that term (§5.1), so it is told in a word, which it takes
                # whatever this term.
                if frm in self.departing:
                    self._say_removed(frm)
                return None
            if t is RequestVote and m.pre_vote:
                pass  # a pre-vote never changes our term (thesis §9.6)
            elif t is RequestVoteResponse and m.pre_vote and m.vote_granted:
                pass  # a granted pre-vote echoes the term we would campaign in
            else:
                leader = m.leader_id if t in (AppendEntries, InstallSnapshot, Removed) \
                    else None
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            if t is AppendEntries:
                # Tell the stale leader about the newer term so it steps down.
                self._send(frm, AppendEntriesResponse(self.term, False, m.prev_log_index))
            elif t is RequestVote:
                self._send(frm, RequestVoteResponse(self.term, False, m.pre_vote))
            elif t is Removed and self.role != Role.LEADER:
                self._on_stale_removed(frm, m)
            return None
        handler = _HANDLERS.get(t)
        if handler is not None:
            handler(self, frm, m)
        return None

    def not_leader(self) -> NotLeader:
        leader = self.leader_id
        return NotLeader(leader, self.membership.addresses.get(leader) if leader is not None
                         else None)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id, "role": self.role.name.lower(), "term": self.term,
            "leader_id": self.leader_id, "commit_index": self.commit_index,
            "applied_index": self.applied_index, "last_index": self.log.last_index,
            "persisted_index": self.persisted_index,
            "snapshot_index": self.log.snapshot_index,
            "latest_snapshot_index": (self._snapshot.last_included_index
                                      if self._snapshot is not None else 0),
            "log_cache_bytes": self.log.cache_bytes,
            "recovering": self.recovering,
            "quiet": self.quiet,
            "removed": self.removed,
            "leaving": self.leaving,
            "transfer_target": self._transfer_target,
            "lease_forfeited": self.lease_forfeited,
            "membership": {"voters": sorted(self.membership.voters),
                           "learners": sorted(self.membership.learners),
                           "outgoing": sorted(self.membership.outgoing)},
            "addresses": dict(sorted(self.membership.addresses.items())),
            "progress": {p: pr.as_dict() for p, pr in self.progress.items()},
            "departing": sorted(self.departing),
        }

    # ------------------------------------------------------------------ elections (§5.2)

    def _on_election_timeout(self) -> None:
        if self.role == Role.LEADER:
            if self._transfer_target is not None:
                self._transfer_rounds += 1
                if self._transfer_rounds >= 2:  # a whole election timeout went by
                    self._transfer_target = None
                elif not self.config.check_quorum:
                    self._out.append(SetTimer(Timer.ELECTION, self.config.election_timeout_max))
            if self.config.check_quorum:
                self._check_quorum()
            return
        if self._vote_unsynced_term:
            # Its vote, and so the RequestVote or the grant that carries it, is still
            # waiting for the disk: the election it belongs to has not really begun (a
            # candidate's requests have not left; a voter has not granted, §5.2). A new
            # one now would be lost as well (its requests wait behind the same write)
            # and only raise the term: on a disk whose fsync outlasts the election
            # timeout, candidates and voters would time out just as the grants arrive,
            # election after election. The timeout counts from the vote's durability.
            self._election_deferred = True
            return
        if self.told_out or self.term >= MAX_TERM:
            return  # told it is out; a higher term would be refused by every peer
        learner = self.non_voter
        if learner and not self._learner_in_doubt:
            return  # removed nodes never campaign, nor ask
        campaigns = not learner
        if learner:
            # A learner may be needed too (thesis §4.1: a server outside its latest
            # configuration still starts elections, not counting its own vote): a
            # leader lost for good may have left its last entries only on learners,
            # which every voter would then accept, while the voters refuse one another
            # (one's uncommitted joint configuration needing a learner's vote, seeds
            # 91016303, 99491198 and 100526838). It gives the voters election timeouts
            # first, then always pre-votes (a learner raises no term unless a quorum of
            # voters hears no leader and would accept its log). Elected, it hands
            # leadership to a voter (``_become_leader``).
            self._leaderless_timeouts += 1
            campaigns = self._leaderless_timeouts >= LEARNER_CAMPAIGN_TIMEOUTS
        if self.recovering or not campaigns:
            # A repaired node never campaigns (it may lack entries it acknowledged), but
            # asks, as a learner does first: a leader that removed it while it was down,
            # or cut off, gave up its farewell and sends it nothing, and learns of it
            # only from a vote request (``_tell_removed_again``). A pre-vote raises no
            # one's term, and this one is never followed by a campaign.
            self._arm_election_timer()
            self._request_votes(self.term + 1, pre_vote=True)
            return
        if self.config.pre_vote or learner:
            self._campaign_pre_vote()
        else:
            self._campaign()

    @property
    def non_voter(self) -> bool:
        """A voter neither of the configuration in force nor of the one before it while
        the change is not known committed (``removal_pending``): a learner, kept or being
        taken out, or a removed node. Elected, it hands over at once (``_become_leader``)."""
        return not (self.membership.is_voter(self.id) or self.removal_pending)

    @property
    def removal_pending(self) -> bool:
        """A voter of the configuration before the latest, which leaves it out and is not
        known committed. Thesis §4.1: such a server "might still be needed until the C_new
        entry is committed", so it campaigns, not counting its own vote (the quorum
        kernels count only the configuration's voters), and once it has led C_new to
        commit it steps down (``_on_config_committed``). The others in C_old,new may need
        its vote, which it refuses them when its log holds C_new and theirs does not."""
        before = self._before_uncommitted_change()
        return before is not None and before.is_voter(self.id) \
            and not self.membership.is_voter(self.id)

    @property
    def _learner_in_doubt(self) -> bool:
        """A learner of the configuration in force, or of the one before an uncommitted
        C_new that leaves it out: it may be in the group or not, and the leader may
        have given up telling it (``_say_farewells``)."""
        if self.id in self.membership.learners:
            return True
        before = self._before_uncommitted_change()
        return before is not None and self.id in before.learners \
            and self.id not in self.membership.members

    def _before_uncommitted_change(self) -> Membership | None:
        """The configuration before the one in force, if that one is not known committed."""
        configs = self._configs
        if len(configs) > 1 and configs[-1][0] > max(self.commit_index, self._told_commit):
            return configs[-2][1]
        return None

    def _check_quorum(self) -> None:
        """Step down unless a quorum answered during the last election timeout, so a
        partitioned leader stops accepting proposals it cannot commit (thesis §6.2)."""
        votes = {self.id: True}
        for p, pr in self.progress.items():
            if pr.recent_active:
                votes[p] = True
                pr.recent_active = False
        if kernels.joint_vote_result(votes, self._voters_in, self._voters_out) != _WON:
            self._become_follower(self.term, None)
        else:
            self._out.append(SetTimer(Timer.ELECTION, self.config.election_timeout_max))

    def _campaign_pre_vote(self) -> None:
        self._set_role(Role.PRE_CANDIDATE, None)
        self._votes = {self.id: True}
        self._arm_election_timer()
        self._request_votes(self.term + 1, pre_vote=True)
        if self._vote_result() == _WON:
            self._campaign()

    def _campaign(self, transfer: bool = False) -> None:
        self.term += 1
        self.voted_for = self.id
        self._set_role(Role.CANDIDATE, None)
        self._votes = {self.id: True}
        self._persist_vote()
        self._request_votes(self.term, pre_vote=False, transfer=transfer)
        if self._vote_result() == _WON:
            self._become_leader()

    def _request_votes(self, term: int, pre_vote: bool, transfer: bool = False) -> None:
        msg = RequestVote(term, self.id, self.log.last_index, self.log.last_term, pre_vote,
                          transfer)
        for v in self._all_voters():
            if v != self.id:
                self._send(v, msg)

    def _vote_result(self) -> int:
        return kernels.joint_vote_result(self._votes, self._voters_in, self._voters_out)

    def _on_request_vote(self, frm: int, m: RequestVote) -> None:
        # §5.2 one vote per term; a known leader means no vote for anyone else this term.
        can_vote = (self.voted_for == m.candidate_id
                    or (self.voted_for is None and self.leader_id is None)
                    or (m.pre_vote and m.term > self.term))
        # A repaired node may have forgotten votes and entries: it votes for no one.
        grant = can_vote and not self.recovering and \
            self.log.is_up_to_date(m.last_log_index, m.last_log_term)
        if grant and not self.membership.is_voter(m.candidate_id) \
                and m.last_log_index == self.log.last_index \
                and m.last_log_term == self.log.last_term:
            # A learner (or a node the configuration takes out) campaigns only because it
            # may hold entries no voter has (thesis §4.1, ``_on_election_timeout``). With
            # the same log as this node's it holds none, and its configuration is this
            # one's: where this node's vote counts, this node can win whatever the
            # candidate could, and no voter's place is taken (else a learner won about
            # one fault mix in a hundred by racing the voters).
            grant = False
        if m.pre_vote:
            self._send(frm, RequestVoteResponse(m.term if grant else self.term, grant, True))
            return
        if grant:
            self.voted_for = m.candidate_id
            self._persist_vote()
        self._send(frm, RequestVoteResponse(self.term, grant, False))

    def _on_vote_response(self, frm: int, m: RequestVoteResponse) -> None:
        if m.pre_vote:
            if self.role != Role.PRE_CANDIDATE:
                return
        elif self.role != Role.CANDIDATE or m.term != self.term:
            return
        self._votes[frm] = m.vote_granted
        result = self._vote_result()
        if result == _WON:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign()
            else:
                self._become_leader()
        elif result == _LOST:
            self._become_follower(self.term, None)

    def _on_timeout_now(self, frm: int, m: TimeoutNow) -> None:
        if self.role == Role.LEADER:
            # From the target of our transfer: it declines (it is stopping); take
            # proposals again at once rather than after an election timeout.
            if frm == self._transfer_target and m.term == self.term:
                self._transfer_target = None
            return
        # Only the leader we follow, in its term, may hand us leadership (§3.10); the
        # transfer then skips pre-vote and leader stickiness.
        if frm == self.leader_id and m.term == self.term and self.role == Role.FOLLOWER \
                and self.membership.is_voter(self.id) and self.term < MAX_TERM \
                and not self.recovering:
            if self.leaving:
                self._send(frm, TimeoutNow(self.term, self.id))  # declined
            else:
                self._campaign(transfer=True)

    def _on_removed(self, frm: int, m: Removed) -> None:
        """The leader of this term says its configuration in force, the entry at
        ``m.index``, leaves this node out (``_say_farewells``: the entries that took it
        out are gone from its memory). Trusted as that leader's entries would be: this
        log ends before the change, which only those entries or a snapshot could bring."""
        if self.role == Role.LEADER:
            return  # another leader of this term: ``refusal`` drops it before this
        if self.role != Role.FOLLOWER or self.leader_id != frm:
            self._become_follower(self.term, frm)
        self._take_removal(frm, m)

    def _on_stale_removed(self, frm: int, m: Removed) -> None:
        """The word of a leader of an earlier term. What it says holds whatever that
        term: its configuration in force and its commit index are committed facts (any
        leader's log up to its commit index is the committed log, §5.4), as etcd's
        transport tells a removed member outside of Raft's terms. A removed node whose
        term passed the leader's (it campaigned on a ``TimeoutNow`` whose votes were
        lost, then was removed while down) is told only so: it refuses that leader's
        messages (§5.1), and its pre-votes never raise the leader's term. It keeps its
        term and takes the sender, a leader of an earlier term, for no leader."""
        if self._take_removal(frm, m) and self.role != Role.FOLLOWER:
            self._become_follower(self.term, None)

    def _take_removal(self, frm: int, m: Removed) -> bool:
        """Record the word (``told_out``); whether it now says this node is out."""
        if m.commit > self._told_commit:
            was_out = self.told_out
            self.told_removed, self._told_commit, self.told_by = m.index, m.commit, frm
            if self.told_out and not was_out:
                self._out.append(ToldRemoved(m.index))
        return self.told_out

    @property
    def transfer_target(self) -> int | None:
        """On a leader: the voter it is handing leadership to, if any (thesis §3.10)."""
        return self._transfer_target

    # ------------------------------------------------------------------ role changes

    def _set_role(self, role: Role, leader: int | None) -> None:
        if role != self.role or leader != self.leader_id:
            if leader != self.leader_id:
                self._fail_forwarded_reads(leader)
            self.role = role
            self.leader_id = leader
            self._out.append(RoleChanged(role, self.term, leader, self.commit_index))

    def _become_follower(self, term: int, leader: int | None) -> None:
        was_leader = self.role == Role.LEADER
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist_hard_state()
        if was_leader:
            self.progress = {}
            self.departing = {}
            self._transfer_target = None
            self._commit_timer_armed = False
            self._broadcast = self._heartbeat_needed = False
            self._fail_leader_reads()
            self._out.append(CancelTimer(Timer.HEARTBEAT))
        self._set_role(Role.FOLLOWER, leader)
        self._arm_election_timer()

    def _become_leader(self) -> None:
        self._set_role(Role.LEADER, self.id)
        self.lease_forfeited = False
        nxt = self.log.last_index + 1
        self.progress = {p: Progress(nxt) for p in self.membership.members if p != self.id}
        self._told_again = set()
        # The nodes that changes in this log removed may not have been told: their
        # leader lost leadership before it did, or was one of them and stepped down, or
        # they were down or cut off. Each is told of the latest change that removed it
        # (in a word if its entries left memory: ``_say_farewells``), those removed
        # before this log begins too (``Membership.removed``).
        for p in sorted((self.known_ids | self.membership.removed)
                        - self.membership.members - {self.id}):
            if p not in self.departing:
                removed_at = self._removed_at(p)
                self._depart(p, Progress(removed_at), removed_at)
        self._fill_trackers()
        self._out.append(SetTimer(Timer.ELECTION, self.config.election_timeout_max)
                         if self.config.check_quorum else CancelTimer(Timer.ELECTION))
        self._out.append(SetTimer(Timer.HEARTBEAT, self.config.heartbeat_interval))
        # §5.4.2 / §8: entries of earlier terms commit only beneath one of this term.
        self._append_own([Entry(self.term, nxt, EntryKind.NOOP, b"")])
        if self.non_voter:
            # A learner leads only to bring the voters its log (``_on_election_timeout``):
            # it takes no proposal and hands over (thesis §3.10) to a voter that granted
            # its vote, once that one holds the whole log. Should the transfer fail, it
            # steps down once an entry of its term commits (``_on_config_committed``).
            # (A voter that C_new demotes or removes leads until C_new commits, §4.1.)
            self._hand_over(min(p for p, granted in self._votes.items()
                                if granted and self.membership.is_voter(p)))

    # ------------------------------------------------------------------ replication (§5.3)

    def _append_own(self, entries: list[Entry], user_commands: bool = False) -> None:
        """Append entries created on this node and schedule their replication
        (``user_commands``: all NORMAL, none to scan for configurations)."""
        self.log.append(entries)
        if self.log.cache_bytes > self.cache_budget:
            self._trim_cache()
        out = self._out
        if out and type(out[-1]) is AppendLog:
            out[-1].entries.extend(entries)  # one storage write for the whole iteration
        else:
            out.append(AppendLog(list(entries)))
        if not user_commands and kernels.index_of_kind(entries, EntryKind.CONFIG) >= 0:
            self._scan_configs(entries)
            self._membership_changed()
        self._broadcast = True

    def _replicate(self, peer: int, pr: Progress, commit_only: bool = False) -> bool:
        """Send ``peer`` what it lacks, up to its in-flight window. Returns whether it is
        left with nothing in flight and an old commit index; with ``commit_only`` an empty
        AppendEntries then tells it the commit index."""
        last = self.log.last_index
        max_inflight = self.config.max_inflight_messages
        max_bytes = self.config.max_inflight_bytes
        sent = False
        while pr.next_index <= last and not pr.is_paused(max_inflight, max_bytes):
            self._send_append(peer, pr, last)
            sent = True
        stale = (not sent and not pr.inflight and pr.state == ProgressState.REPLICATE
                 and pr.commit_sent < self.commit_index)
        if stale and commit_only:
            self._send_append(peer, pr, last)
            return False
        return stale

    def _send_append(self, peer: int, pr: Progress, last: int) -> None:
        prev = pr.next_index - 1
        if prev < self.log.snapshot_index:
            # The entries it needs are compacted: only a snapshot can catch it up (§7).
            assert self._snapshot is not None  # the log was compacted behind one
            pr.become_snapshot(self._snapshot, self._snapshot_size)
            self._send_snapshot_chunk(peer, pr)
            return
        cfg = self.config
        hi = min(last, prev + cfg.max_entries_per_message)
        cache_first = self.log.cache_first
        if prev + 1 < cache_first and hi > prev:
            # Its entries left memory: read them from storage (one read per follower at
            # a time); the rest of the leader's work goes on meanwhile.
            if not pr.reading_from:
                pr.reading_from = prev + 1
                pr.read_rounds = 0
                self._out.append(ReadLog(peer, prev + 1, min(hi + 1, cache_first),
                                         cfg.max_bytes_per_message))
            if pr.state != ProgressState.REPLICATE:
                pr.probe_sent = True
            return
        entries = self.log.slice(prev + 1, hi + 1)
        if len(entries) > 1:
            n = kernels.count_within_bytes(entries, cfg.max_bytes_per_message)
            if n < len(entries):
                entries = entries[:n]
        self._send_entries(peer, pr, prev, entries)

    def _send_entries(self, peer: int, pr: Progress, prev: int, entries: list[Entry]) -> None:
        self._send(peer, AppendEntries(self.term, self.id, prev, self.log.term_at(prev),
                                       entries, self.commit_index, self._seq))
        pr.commit_sent = self.commit_index
        pr.sent_since_tick = True
        if entries:
            if pr.state == ProgressState.REPLICATE:
                pr.next_index = entries[-1].index + 1
                pr.sent(entries[-1].index, kernels.payload_bytes(entries))
            else:
                pr.probe_sent = True

    def _send_snapshot_chunk(self, peer: int, pr: Progress) -> None:
        meta = pr.snapshot_meta
        assert meta is not None  # the peer is in the snapshot state
        offset = pr.snapshot_offset
        length = min(self.config.snapshot_chunk_bytes, pr.snapshot_size - offset)
        done = offset + length >= pr.snapshot_size
        pr.probe_sent = True
        self._out.append(SendSnapshotChunk(
            peer, InstallSnapshot(self.term, self.id, meta, offset, b"", done), length))

    def _on_install_snapshot(self, frm: int, m: InstallSnapshot) -> None:
        self._heard_from_leader(frm, m.leader_id)
        if m.meta.last_included_index <= self.commit_index:
            # Everything it covers is already committed here (§7: a stale snapshot).
            self._send(frm, AppendEntriesResponse(self.term, True, self.commit_index))
            return
        index = m.meta.last_included_index
        if m.done and self.log.last_index > index and \
                self.log.term_at(index) != m.meta.last_included_term:
            # §7: the snapshot replaces this log, which disagrees with it at its last
            # entry. The entries after that one are not in the leader's log (one that
            # were would have all before it there too: Log Matching, §5.3), so none is
            # committed: cut them now, durable before the driver saves the snapshot. A
            # crash between that save and the truncation after it left them following
            # the snapshot, with older terms: the node could not load its log again.
            self._truncate(index + 1)
        self._out.append(StoreSnapshotChunk(frm, m))

    def _on_snapshot_response(self, frm: int, m: InstallSnapshotResponse) -> None:
        pr = self.progress.get(frm)
        if pr is None or self.role != Role.LEADER:
            return
        pr.recent_active = True
        if pr.state != ProgressState.SNAPSHOT or m.last_included_index != pr.snapshot_index:
            return  # an answer about a transfer we no longer run
        if m.done:
            if pr.acknowledge(m.last_included_index):
                self._match.set(frm, m.last_included_index)
            pr.become_probe()
            self._maybe_commit()
            self._broadcast = True
            return
        next_offset = min(m.next_offset, pr.snapshot_size)
        if pr.probe_sent and next_offset == pr.snapshot_offset:
            # It wants the chunk already in flight: this answers a duplicate. Resending
            # would keep one more chunk in flight for every duplicate, for good.
            return
        pr.snapshot_offset = next_offset
        pr.snapshot_progressed = True
        self._send_snapshot_chunk(frm, pr)

    def _compact(self, index: int) -> None:
        """Drop log entries up to ``index`` here and in storage; the configuration in force
        there becomes the base of the configuration history."""
        base = self._configs[0][1]
        for i, m in self._configs:
            if i > index:
                break
            base = m
        self._configs = [(index, base)] + [(i, m) for i, m in self._configs if i > index]
        self._refresh_known()
        self.log.compact_to(index)
        self._out.append(CompactLog(index))

    def _heartbeat(self, pr: Progress) -> AppendEntries:
        # prev = match_index is in the follower's durable log, so the heartbeat is accepted
        # and never rewinds a pipelined follower into probing.
        match = pr.match_index
        return AppendEntries(self.term, self.id, match, self.log.term_at(match), [],
                             min(self.commit_index, match), self._seq)

    def _on_heartbeat_timeout(self) -> None:
        last = self.log.last_index
        if self.config.quiesce_after:
            mark = (last, self._seq)
            if mark == self._idle_mark and self._ready_to_quiesce():
                self._idle_heartbeats += 1
                if self._idle_heartbeats >= self._quiesce_rounds:
                    self._quiesce()
                    return
            else:
                self._idle_heartbeats = 0
                self._idle_mark = mark
        skip_busy = self._skip_busy_heartbeats
        for peer, pr in self.progress.items():
            if pr.reading_from:
                pr.read_rounds += 1
                if pr.read_rounds > READ_LOG_PATIENCE:
                    pr.reading_from = 0  # the read is lost: ask again
            if pr.state == ProgressState.REPLICATE:
                if pr.match_index < last and pr.match_index == pr.match_at_heartbeat:
                    pr.become_probe()  # no progress for a whole interval: a message was lost
            pr.match_at_heartbeat = pr.match_index
            if pr.state == ProgressState.PROBE:
                pr.probe_sent = False  # give up on an unanswered probe and send another
                self._send_append(peer, pr, last)
            else:
                if not (pr.sent_since_tick and skip_busy and
                        pr.state == ProgressState.REPLICATE):
                    self._send(peer, self._heartbeat(pr))
                if pr.state == ProgressState.SNAPSHOT:
                    if pr.probe_sent and not pr.snapshot_progressed:
                        self._send_snapshot_chunk(peer, pr)  # unanswered for an interval
                    pr.snapshot_progressed = False
            pr.sent_since_tick = False
        if self.departing:
            self._retry_farewells()
        if self._told_again:
            self._retell_wait -= 1
            if self._retell_wait <= 0:
                self._told_again.clear()
        self._out.append(SetTimer(Timer.HEARTBEAT, self.config.heartbeat_interval))

    def _say_farewells(self) -> None:
        """Leader: send each removed node the configuration entry that removed it (and on,
        up to a message's worth), then that the entry is committed, and forget it. It
        then knows it is out (§6: a configuration is in force once appended): it never
        campaigns, and its driver can stop it. Without this, a removed voter whose log
        ends before C_new still counts itself a voter and pre-campaigns for as long as it
        runs (its votes are refused, thesis §4.2.3, but it never learns why). One that
        needs entries that left this leader's memory (no storage reads or snapshots for
        a node that is out) is told in a word instead (``Removed``), once the
        configuration in force is committed. Best effort, as in hashicorp/raft: given
        up after ``_farewell_rounds`` heartbeats."""
        cfg = self.config
        for peer, pr in list(self.departing.items()):
            last = pr.farewell
            if pr.match_index >= last:
                if self.commit_index >= last:
                    if pr.commit_sent < last:
                        self._send_entries(peer, pr, last, [])
                    del self.departing[peer]
            elif pr.next_index < self.log.cache_first:
                # The entries that took it out left this leader's memory (no storage
                # reads or snapshots for a node that is out): say it in a word, once a
                # heartbeat, as it has no answer. It names the configuration in force,
                # committed, and the commit index: a configuration in the node's log
                # at or before that index and not in this log is an old leader's that
                # never committed (``Engine.told_out``).
                if not pr.sent_since_tick:
                    pr.sent_since_tick = self._say_removed(peer)
            else:
                # On past C_new, up to a message's worth: a suffix of an old leader's
                # entries that the node holds beyond C_new (one may name it again) is cut
                # only by entries that conflict with it (§5.3).
                while pr.next_index <= last and \
                        not pr.is_paused(cfg.max_inflight_messages, cfg.max_inflight_bytes):
                    self._send_append(peer, pr, self.log.last_index)

    def _say_removed(self, peer: int) -> bool:
        """Leader: tell removed ``peer`` in a word (``Removed``) that the configuration in
        force leaves it out, once it is committed. Returns whether it did."""
        index = self._configs[-1][0]
        if self.commit_index < index:
            return False
        self._send(peer, Removed(self.term, self.id, index, self.commit_index))
        return True

    def _tell_removed_again(self, peer: int, limited: bool = True) -> bool:
        """Leader: ``peer`` asks for votes, or came back (``remind``). If a configuration
        in this log took it out of the group, it may never have learned it: it was down
        or cut off for its whole farewell (an operator removing a dead node that comes
        back later). Say farewell again: it then stops campaigning, and
        ``Config.stop_when_removed`` stops its node, as etcd tells a removed member that
        contacts it. ``limited`` (a vote request, which a removed voter sends every
        election timeout): not again for ``_retell_rounds`` heartbeat ticks (none pass
        while quiet), so one that cannot be told (it needs entries that left this
        leader's memory) costs a farewell now and then, not one per request and no
        wake-up of a quiet group per request; the driver's word that a process is back
        comes once a return, and starts a farewell under way afresh: one sent while the
        node was down may be about to be given up. Returns whether it said farewell."""
        if limited and (peer in self.departing or peer in self._told_again):
            return False
        removed_at = self._removed_at(peer)
        if not removed_at:
            return False
        if not self._told_again:
            self._retell_wait = self._retell_rounds
        self._told_again.add(peer)
        self._depart(peer, Progress(removed_at), removed_at)
        self._say_farewells()
        return True

    def _removed_at(self, peer: int) -> int:
        """The index of the latest configuration entry in this log that took ``peer``
        out of the group; 0 if none did (a member, or a node this log never held). If
        the entry that did is compacted (``Membership.removed`` names it), the first
        configuration this log holds, which leaves it out too."""
        configs = self._configs
        for k in range(len(configs) - 1, 0, -1):
            if peer in configs[k - 1][1].members:
                return 0 if peer in configs[k][1].members else configs[k][0]
        return configs[0][0] if peer in self.membership.removed else 0

    def _depart(self, peer: int, pr: Progress, farewell: int) -> None:
        """Leader: ``peer`` was removed by the configuration entry at ``farewell``: say
        farewell to it (``_say_farewells``) rather than replicate to it. A snapshot it was
        being sent is dropped: a node that is out gets none (and this leader no longer
        keeps that snapshot for it, ``snapshots_in_use``), also if it is added back."""
        if pr.state == ProgressState.SNAPSHOT:
            pr.become_probe()
        pr.farewell = farewell
        pr.farewell_rounds = 0
        pr.match_at_heartbeat = pr.match_index  # no answer by the next tick: probe
        self.departing[peer] = pr

    def _retry_farewells(self) -> None:
        """Heartbeat tick: send again what a removed node left unanswered, or give up."""
        for peer, pr in list(self.departing.items()):
            pr.farewell_rounds += 1
            if pr.farewell_rounds > self._farewell_rounds:
                del self.departing[peer]
                if self.commit_index < self._configs[-1][0]:
                    # The word waits for the configuration in force to commit, so this
                    # farewell may have told it nothing: its next request is answered.
                    self._told_again.discard(peer)
                continue
            if pr.match_index == pr.match_at_heartbeat:
                pr.become_probe()  # nothing answered for a whole interval
            pr.match_at_heartbeat = pr.match_index
            pr.sent_since_tick = False
        self._say_farewells()

    # ------------------------------------------------------------------ quiescence

    def _ready_to_quiesce(self) -> bool:
        """Leader: nothing to replicate, commit, read or hand over, and every member has
        acknowledged the whole log, but those known down (``peers_down``) while a quorum
        of the others did. An acknowledgement may come late: a loaded host answering
        heartbeats after the next one is due must not keep its groups awake (their
        heartbeats would keep it loaded). A member that never acknowledges keeps the
        group awake until the driver knows it down."""
        last = self.log.last_index
        if self.commit_index != last or self.persisted_index != last \
                or not self.committed_in_term or self._transfer_target is not None \
                or self._reads or self._reads_before_commit or self.departing:
            return False
        down = self.down
        for peer, pr in self.progress.items():
            if peer in down:
                continue
            if pr.match_index != last or pr.inflight \
                    or pr.state != ProgressState.REPLICATE or pr.reading_from:
                return False
        return not down or self._quorum_up()

    def _quorum_up(self) -> bool:
        """Leader: whether this node and the members not known down make a quorum (of
        both configurations, while joint)."""
        down = self.down
        up = {p: True for p in self.progress if p not in down}
        up[self.id] = True
        return kernels.joint_vote_result(up, self._voters_in, self._voters_out) == _WON

    def peers_down(self, peers: frozenset[int]) -> str | None:
        """The driver's word on which members' processes are down (``RaftHost``: hosts
        silent for an election timeout), replacing what it said before. A leader goes
        quiet without their answers, so a group that wakes while a host is gone does not
        heartbeat until it returns. Replication and commitment go on as Raft says.

        A quiet node runs no timer, so the change may have to wake it; returns why it
        did, or None:

        - ``"leader_lost"``: a follower whose leader went down; it campaigns once its
          election timer runs out.
        - ``"no_quorum"``: a leader left without a quorum: awake, check-quorum deposes
          it (§6.2). Cut off and quiet, it would go on calling itself leader.
        - ``"member_back"``: a leader that a member coming back has not acknowledged
          the whole log: it catches the member up. The member may have been cut off
          rather than down, or be a learner, which campaigns only when no leader comes:
          nothing else would wake the group before its next write.
        """
        gone, back = peers - self.down, self.down - peers
        self.down = peers
        if not self.quiet:
            return None
        if self.role == Role.FOLLOWER:
            if self.leader_id in gone:
                self.wake(leader_lost=True)
                return "leader_lost"
        elif self.role == Role.LEADER:
            if gone and not self._quorum_up():
                self.wake()
                return "no_quorum"
            last = self.log.last_index
            for peer in back:
                pr = self.progress.get(peer)
                if pr is not None and pr.match_index < last:
                    self.wake()
                    return "member_back"
        return None

    def _quiesce(self) -> None:
        """Leader: tell every member, with the commit index, that the group goes quiet,
        and stop ticking (check-quorum too: a quiet leader takes no proposal without
        waking first). Followers that miss this message time out and wake it."""
        self.quiet = True
        self._out.append(QuietChanged(True))
        self._idle_heartbeats = 0
        msg = self._quiesce_heartbeat()
        for peer in self.progress:
            self._send(peer, msg)
        self._out.append(CancelTimer(Timer.HEARTBEAT))
        if self.config.check_quorum:
            self._out.append(CancelTimer(Timer.ELECTION))

    def _quiesce_heartbeat(self) -> AppendEntries:
        last = self.log.last_index
        return AppendEntries(self.term, self.id, last, self.log.term_at(last), [],
                             self.commit_index, self._seq, True)

    def remind(self, peers: Iterable[int]) -> bool:
        """Leader: the driver heard the processes of ``peers`` come back (restarted, or
        reachable again after a partition). A node among them that a configuration in
        this log removed is told so again (``_tell_removed_again``, at each return): a
        removed learner, or a removed voter that would not ask this leader for its
        vote, learns it only so. A quiet leader also sends the members among them its
        quiesce heartbeat again: a replica that restarted, or woke when it lost its
        leader, knows no leader until a leader's message reaches it, and a quiet leader
        sends none: reads and proposals on it fail meanwhile, until its election timer
        runs out. This one tells it, and it goes quiet too; a member whose log is behind
        refuses it, which wakes the leader to catch it up. Returns whether anything was
        sent."""
        if self.role != Role.LEADER:
            return False
        told = False
        msg = None
        for peer in peers:
            if peer not in self.progress:
                told |= self._tell_removed_again(peer, limited=False)
            elif self.quiet:
                if msg is None:
                    msg = self._quiesce_heartbeat()
                self._send(peer, msg)
        return told or msg is not None

    def _keeps_quiet(self, frm: int, t: type, m: Any) -> bool:
        """Messages a quiet node takes without waking: the leader's quiesce heartbeat
        (again) on a follower, on the leader the answers saying the log is held, and a
        pre-vote from a node that votes in no configuration in force here. That one is a
        removed voter that never heard so (the leader stops replicating to it once C_new
        is appended, §6): it pre-campaigns for as long as it runs, a pre-vote changes
        nothing here, and waking for each would keep the group awake (thesis §4.2.3)."""
        if t is RequestVote and m.pre_vote and not self.membership.is_voter(frm):
            return True
        if self.role == Role.LEADER:
            return t is AppendEntriesResponse and m.success and m.term == self.term \
                and m.index == self.log.last_index
        return t is AppendEntries and m.quiesce and m.term == self.term \
            and frm == self.leader_id

    def _heard_from_leader(self, frm: int, leader_id: int) -> None:
        if self.role == Role.LEADER:
            raise SafetyViolation(f"two leaders in term {self.term}: {self.id} and {frm}")
        if self.role != Role.FOLLOWER or self.leader_id != leader_id:
            self._become_follower(self.term, leader_id)
        else:
            self._arm_election_timer()
        # A live leader is known until election_timeout_min passes without hearing from
        # it: votes (with check-quorum) and unknown leaders are refused meanwhile.
        self.leader_alive = True
        self._leaderless_timeouts = 0
        self._out.append(SetTimer(Timer.LEASE, self.config.election_timeout_min))

    def _on_append_entries(self, frm: int, m: AppendEntries) -> None:
        self._heard_from_leader(frm, m.leader_id)
        log = self.log
        prev, prev_term, entries = m.prev_log_index, m.prev_log_term, m.entries
        if prev < self.commit_index:
            # Committed entries are the same on every log (§5.4.3): skip them.
            entries = [e for e in entries if e.index > self.commit_index] if entries else entries
            prev = self.commit_index
            prev_term = log.term_at(prev)
        # A term of -1 says the leader no longer holds the entry (compacted): it proves
        # nothing, and -1 is also what this log says of an entry it lacks. A heartbeat
        # carries it for a follower whose acknowledged entries the leader compacted;
        # matched, a follower that lost them (repaired, or a wiped directory) would take
        # a commit index beyond its own log.
        if prev_term < 0 or log.term_at(prev) != prev_term:
            hint = log.terms.find_conflict_by_term(min(prev, log.last_index), prev_term)
            self._send(frm, AppendEntriesResponse(self.term, False, m.prev_log_index, hint,
                                                  log.term_at(hint), m.seq, self.recovering))
            return
        last_new = prev
        wrote = False
        if entries:
            last_new = prev + len(entries)  # consecutive: checks.refusal saw to it
            if log.term_at(last_new) != entries[-1].term:  # else we hold them all (§5.3)
                if prev == log.last_index:
                    conflict = prev + 1
                else:
                    conflict = log.terms.find_conflict(prev + 1, [e.term for e in entries])
                if conflict:
                    wrote = True
                    # conflict > prev >= commit_index: committed entries are never cut.
                    if conflict <= log.last_index:
                        self._truncate(conflict)
                    new = entries[conflict - prev - 1:]
                    log.append(new)
                    if log.cache_bytes > self.cache_budget:
                        self._trim_cache()
                    self._out.append(AppendLog(new))
                    if kernels.index_of_kind(new, EntryKind.CONFIG) >= 0:
                        self._scan_configs(new)
                        self._membership_changed()
        commit = min(m.leader_commit, last_new)
        if commit > self.commit_index:
            self.commit_index = commit
            self._emit_apply()
        if self.recovering:
            self._check_recovered()
        if m.quiesce and last_new == log.last_index and self.commit_index == last_new \
                and self.config.quiesce_after:
            # The leader goes quiet and this log is its log: no election timer while it
            # is (the driver wakes this node if the leader's process goes silent), and
            # the leader counts as alive, so no vote goes to a node that missed this.
            if not self.quiet:  # (the leader's quiesce heartbeat again keeps it quiet)
                self.quiet = True
                self._out.append(QuietChanged(True))
            self._out.append(CancelTimer(Timer.ELECTION))
            self._out.append(CancelTimer(Timer.LEASE))
        # The answer promises this term and the log up to its index (Figure 2). To a
        # message that brought nothing to write (a heartbeat, a probe, a duplicate of
        # entries still being written) it claims what is on disk already and leaves at
        # once, not behind the writes in flight: on a slow disk their fsync would hold up
        # the leader's quorum check, its reads and its probes (etcd answers heartbeats
        # without the disk too). A node in recovery (thesis §11.7) keeps the old order:
        # rare, and its answers are what the leader rebuilds its view of that log from.
        if wrote or self.term > self._term_durable or self.recovering:
            self._send(frm, AppendEntriesResponse(self.term, True, last_new, 0, 0, m.seq,
                                                  self.recovering))
        else:
            self._out.append(Send(frm, AppendEntriesResponse(
                self.term, True, min(last_new, self.persisted_index), 0, 0, m.seq), True))

    def _truncate(self, index: int) -> None:
        self.log.truncate_from(index)
        self._out.append(TruncateLog(index))
        if self.persisted_index >= index:
            self.persisted_index = index - 1
        if self._configs[-1][0] >= index:
            while self._configs[-1][0] >= index:
                self._configs.pop()
            self._membership_changed()

    def _on_append_response(self, frm: int, m: AppendEntriesResponse) -> None:
        pr = self.progress.get(frm)
        if pr is None:
            pr = self.departing.get(frm)
        if pr is None or self.role != Role.LEADER:
            return
        pr.recent_active = True
        if m.recovering and not m.success and m.hint_index < pr.match_index and \
                self.log.term_at(m.index) >= 0:
            # Its storage was repaired: its log does not hold what it had acknowledged.
            # Forget that (commit never moves back) and probe from here. Only on evidence:
            # a rejection of a probe this leader could still match (a term of -1 proves
            # nothing, and what it acknowledged below the compaction point counts for no
            # commit any more), and once forgotten, nothing more. Else each heartbeat's
            # rejection restarted the snapshot being streamed to it, for ever.
            pr.match_index = 0
            self._match.set(frm, 0)
            pr.become_probe()
            pr.next_index = m.index + 1
        if m.seq > pr.acked_seq:
            pr.acked_seq = m.seq
            self._acked.set(frm, m.seq)
            self._confirm_reads()
        if m.success:
            if pr.acknowledge(m.index):
                self._match.set(frm, m.index)
                if pr.state == ProgressState.PROBE:
                    pr.become_replicate()
                elif pr.state == ProgressState.SNAPSHOT and pr.match_index >= pr.snapshot_index:
                    pr.become_probe()  # it caught up some other way: no snapshot needed
                self._maybe_commit()
                self._broadcast = True
            if self._transfer_target == frm and pr.match_index == self.log.last_index:
                self._send_timeout_now(frm)
            return
        # Rejected. Ignore answers to messages we have since superseded.
        if pr.state == ProgressState.SNAPSHOT:
            return
        if m.hint_index < pr.match_index <= m.index and not m.recovering \
                and self.log.term_at(m.index) >= 0:
            # Asked of an entry at or past its match that this leader holds (its real
            # term, not -1), a follower that keeps what it acknowledged answers at or
            # above its match: this one's storage lost entries (a directory wiped or
            # replaced under the same id), and its heartbeats' rejections looked stale.
            # Forget its match (commit never moves back) and catch it up from what it
            # holds, instead of probing above its log for ever; the driver says so.
            self._out.append(FollowerLostEntries(frm, pr.match_index, m.hint_index))
            pr.match_index = 0
            self._match.set(frm, 0)
        if pr.state == ProgressState.REPLICATE:
            if m.index <= pr.match_index:
                return
        elif m.index != pr.next_index - 1:
            return
        compacted = self.log.snapshot_index
        if m.hint_index < compacted or (m.hint_index == compacted
                                        and m.hint_term != self.log.term_at(compacted)):
            # It lacks, or contradicts, entries we compacted: probing cannot go below the
            # compaction point, so _send_append must send a snapshot.
            probe = compacted - 1
        else:
            probe = self.log.terms.find_conflict_by_term(m.hint_index, m.hint_term)
        pr.become_probe()
        pr.next_index = max(pr.match_index + 1, min(probe + 1, self.log.last_index + 1))
        if pr.farewell:
            self._broadcast = True  # _say_farewells sends it what it lacks, or gives up
        else:
            self._send_append(frm, pr, self.log.last_index)

    def _maybe_commit(self) -> None:
        c = self._match.committed_index()
        # §5.4.2: only an entry of the current term commits by counting replicas (Figure 8).
        if c > self.commit_index and self.log.term_at(c) == self.term:
            self.commit_index = c
            self._emit_apply()
            self._broadcast = True
            if self._reads_before_commit:
                waiting, self._reads_before_commit = self._reads_before_commit, []
                for request_id, origin in waiting:
                    self._leader_read(request_id, origin)
            self._on_config_committed()

    def _emit_apply(self) -> None:
        if self.commit_index > self.applied_index:
            first = self.applied_index + 1
            cache_first = self.log.cache_first
            if first < cache_first:
                last = min(self.commit_index, cache_first - 1)
                self._out.append(ApplyStored(first, last))
                first = last + 1
            if first <= self.commit_index:
                self._out.append(Apply(self.log.slice(first, self.commit_index + 1)))
            self.applied_index = self.commit_index

    # ------------------------------------------------------------------ membership (§6)

    def _scan_configs(self, entries: Sequence[Entry]) -> None:
        pos = kernels.index_of_kind(entries, EntryKind.CONFIG)
        while pos >= 0:
            e = entries[pos]
            self._configs.append((e.index, decode_membership(e.data)))
            nxt = kernels.index_of_kind(entries[pos + 1:], EntryKind.CONFIG)
            pos = -1 if nxt < 0 else pos + 1 + nxt

    def _refresh_known(self) -> None:
        known: frozenset[int] = frozenset()
        for _, m in self._configs:
            known = known | m.members
        self.known_ids = known

    def _refresh_voters(self) -> None:
        self._refresh_known()
        self._voters_in = tuple(sorted(self.membership.voters))
        self._voters_out = tuple(sorted(self.membership.outgoing))
        self._match = kernels.QuorumTracker(self._voters_in, self._voters_out)
        self._acked = kernels.QuorumTracker(self._voters_in, self._voters_out)

    def _fill_trackers(self) -> None:
        """Leader: load every voter's match index and acknowledged sequence into the
        quorum trackers (after an election or a membership change)."""
        self._match.set(self.id, self.persisted_index)
        self._acked.set(self.id, self._seq)
        for peer, pr in self.progress.items():
            self._match.set(peer, pr.match_index)
            self._acked.set(peer, pr.acked_seq)

    def _all_voters(self) -> frozenset[int]:
        return self.membership.voters | self.membership.outgoing

    def _membership_changed(self) -> None:
        self.membership = self._configs[-1][1]
        self._refresh_voters()
        if self.role == Role.LEADER:
            members = self.membership.members
            nxt = self.log.last_index + 1
            for p in members:
                if p != self.id and p not in self.progress:
                    pr = self.departing.pop(p, None) or Progress(nxt)
                    pr.farewell = 0
                    self.progress[p] = pr
            for p in [p for p in self.progress if p not in members]:
                self._depart(p, self.progress.pop(p), self._configs[-1][0])
            self._fill_trackers()
            self._maybe_commit()

    def _on_config_committed(self) -> None:
        index, m = self._configs[-1]
        if index > self.commit_index or self.role != Role.LEADER:
            return
        if m.joint:
            # C_old,new is committed: move on to C_new (§6).
            new = Membership(voters=m.voters, learners=m.learners, addresses=m.addresses,
                             removed=_removed_after(m, m.voters | m.learners))
            self._append_own([Entry(self.term, self.log.last_index + 1, EntryKind.CONFIG,
                                    encode_membership(new))])
        elif self.id not in m.voters:
            # A leader outside C_new steps down once C_new commits (§6), handing over to
            # the voter holding the most of the log (thesis §3.10, as ``resign``) rather
            # than leaving the group leaderless for an election timeout; a learner that
            # led once an entry of its term commits, unless its transfer's TimeoutNow
            # left already (a second voter campaigning would split the votes).
            target = self.successor()
            if target is not None and not (self._transfer_target is not None
                                           and self._timeout_now_sent):
                self._send(target, TimeoutNow(self.term, self.id))
            self._become_follower(self.term, None)

    # ------------------------------------------------------------------ reads (thesis §6.4)

    @property
    def committed_in_term(self) -> bool:
        """An entry of the current term is committed: a new leader knows the commit index
        (thesis §6.4) and its inherited configuration is in force."""
        return self.log.term_at(self.commit_index) == self.term

    @property
    def reads_pending(self) -> int:
        """Reads this leader is confirming (its own and forwarded ones)."""
        return len(self._reads) + len(self._reads_before_commit)

    def _leader_read(self, request_id: int, origin: int | None) -> None:
        if self.reads_pending >= self.config.max_pending_reads:
            # Bounded: refuse rather than queue without end (a follower's client retries).
            if origin is None:
                self._out.append(ReadFailed(request_id, self.id))
            else:
                self._send(origin, ReadIndexResponse(self.term, request_id, 0, False))
            return
        if not self.committed_in_term:
            self._reads_before_commit.append((request_id, origin))
            return
        self._seq += 1
        self._acked.set(self.id, self._seq)
        self._reads.append(_PendingRead(self._seq, self.commit_index, request_id, origin))
        self._heartbeat_needed = True
        self._confirm_reads()

    def _confirm_reads(self) -> None:
        if not self._reads:
            return
        confirmed = self._acked.committed_index()
        reads = self._reads
        done = 0
        while done < len(reads) and reads[done].seq <= confirmed:
            r = reads[done]
            done += 1
            if r.origin is None:
                self._out.append(ReadReady(r.request_id, r.read_index))
            else:
                self._send(r.origin, ReadIndexResponse(self.term, r.request_id, r.read_index, True))
        if done:
            del reads[:done]

    def _fail_leader_reads(self) -> None:
        pending = [(r.request_id, r.origin) for r in self._reads] + self._reads_before_commit
        self._reads = []
        self._reads_before_commit = []
        for request_id, origin in pending:
            if origin is None:
                self._out.append(ReadFailed(request_id, None))
            else:
                self._send(origin, ReadIndexResponse(self.term, request_id, 0, False))

    def _fail_forwarded_reads(self, new_leader: int | None) -> None:
        for request_id in self._forwarded_reads:
            self._out.append(ReadFailed(request_id, new_leader))
        self._forwarded_reads.clear()

    def _on_read_request(self, frm: int, m: ReadIndexRequest) -> None:
        if self.role == Role.LEADER:
            self._leader_read(m.request_id, frm)
        else:
            self._send(frm, ReadIndexResponse(self.term, m.request_id, 0, False))

    def _on_read_response(self, frm: int, m: ReadIndexResponse) -> None:
        if m.request_id not in self._forwarded_reads:
            return
        self._forwarded_reads.discard(m.request_id)
        if m.ok:
            self._out.append(ReadReady(m.request_id, m.read_index))
        else:
            self._out.append(ReadFailed(m.request_id, self.leader_id))

    # ------------------------------------------------------------------ helpers

    def _send(self, to: int, message: Message) -> None:
        self._out.append(Send(to, message))

    def _persist_hard_state(self) -> None:
        self._out.append(PersistHardState(HardState(self.term, self.voted_for, self.commit_index,
                                                    self.recovering)))

    def _persist_vote(self) -> None:
        """This node votes in this term (for itself, or for a candidate): persist it,
        and start the election timer (§5.2), whose timeout counts from the vote's
        durability (``hard_state_persisted``)."""
        self._persist_hard_state()
        self._vote_unsynced_term = self.term
        self._arm_election_timer()

    def _arm_election_timer(self, preferred: bool | None = None) -> None:
        lo, hi = self.config.election_timeout_min, self.config.election_timeout_max
        if preferred is not None:  # the first timer of a host's replica (``start``)
            cut = lo + (hi - lo) * PREFERRED_PART
            lo, hi = (lo, cut) if preferred else (cut, hi)
        self._election_deferred = False
        self._out.append(SetTimer(Timer.ELECTION, lo + (hi - lo) * self.rng.random()))


_HANDLERS: dict[type, Callable[[Engine, int, Any], None]] = {
    AppendEntries: Engine._on_append_entries,
    InstallSnapshot: Engine._on_install_snapshot,
    InstallSnapshotResponse: Engine._on_snapshot_response,
    AppendEntriesResponse: Engine._on_append_response,
    RequestVote: Engine._on_request_vote,
    RequestVoteResponse: Engine._on_vote_response,
    TimeoutNow: Engine._on_timeout_now,
    ReadIndexRequest: Engine._on_read_request,
    ReadIndexResponse: Engine._on_read_response,
    Removed: Engine._on_removed,
}
