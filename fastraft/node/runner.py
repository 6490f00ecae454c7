"""The command runner: executes the engine's commands in order, and its timers.

One call of ``run`` takes every command the engine emitted for what happened since the
last drain: messages are grouped into one batch per peer, persistence commands into one
write batch (``LogWriter``), committed entries go to the ``Applier``. Messages that
promise durable state (votes, acknowledgements) are held until every write issued before
them is durable (Raft, Figure 2), unless what they promise is durable already (a
heartbeat's answer); the leader's replication messages leave at once, in
parallel with its own write (thesis §10.2.1).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from fastraft.engine import (
    AppendLog,
    Apply,
    ApplyStored,
    CancelTimer,
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
    waits_for_writes,
)
from fastraft.errors import ConfigError
from fastraft.node.writer import SaveSnapshot

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode

_WRITES = (AppendLog, TruncateLog, PersistHardState, CompactLog, SaveSnapshot)


#: Timers that decide whether the leader is gone. One that fires this late (seconds) was
#: held up by a stalled loop (a long turn, a GC pause, a starved CPU) while the leader's
#: messages may be waiting unread: the event loop runs due timers before it polls
#: sockets. Such a timer waits for one poll first (``Timers._after_a_poll``).
_LEADER_TIMERS = frozenset({Timer.ELECTION, Timer.LEASE})
OVERDUE = 0.005
_CAMPAIGNING = frozenset({Role.PRE_CANDIDATE, Role.CANDIDATE})


class CampaignLimit:
    """At most ``limit`` of a host's groups campaign at once (``RaftHost``).

    Thousands of groups that lose their leaders together (a whole cluster starts, a host
    that led them is gone) would all campaign within one election timeout: their votes
    queue behind each other for longer than the spread of the timeouts, so every
    election outlives its timer and they collide again, a livelock (§5.6 wants the
    broadcast time well under the election timeout). A group whose election timer runs
    out with the limit reached waits in line, at no cost (no timer, no message), and
    campaigns when a place frees up, unless it heard from a leader meanwhile. A group
    holds its place from the start of its campaign until it leads, follows, stops, or
    its election timer runs out again. Only timing changes: safety never rests on it."""

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"max_campaigns must be a positive int (or None: no limit), "
                              f"got {limit!r}")
        self.limit = limit
        #: The groups campaigning now.
        self.holders: set[RaftNode] = set()
        #: Groups waiting for a place, first come first served (one whose timer was
        #: armed again meanwhile is skipped: ``Timers.waiting``).
        self.line: deque[RaftNode] = deque()
        #: Election timers that ran out with the limit reached, so far.
        self.postponed = 0

    def ask(self, node: RaftNode) -> None:
        """``node``'s election timer ran out: campaign now, or wait in line."""
        self.release(node)  # its last attempt (if any) is over; a waiting group goes first
        if len(self.holders) < self.limit:
            self._campaign(node)
        else:
            self.postponed += 1
            node._timers.waiting = True
            self.line.append(node)

    def release(self, node: RaftNode) -> None:
        """``node`` no longer campaigns: its place goes to the first group in line."""
        if node in self.holders:
            self.holders.discard(node)
            line = self.line
            while line and len(self.holders) < self.limit:
                waiting = line.popleft()
                if waiting._running and waiting._flush_scheduled:
                    waiting._flush()  # messages read this turn may be a leader's
                if waiting._timers.waiting:
                    waiting._timers.waiting = False
                    self._campaign(waiting)

    def _campaign(self, node: RaftNode) -> None:
        engine = node.engine
        if not node._running or engine.role == Role.LEADER:
            return
        engine.on_timer(Timer.ELECTION)
        if engine.role in _CAMPAIGNING:
            self.holders.add(node)
        node._schedule_flush()


class HeartbeatClock:
    """One timer for the heartbeats of every awake group a host leads (``RaftHost``).

    Each interval, every group whose heartbeat falls due within the next half interval
    beats, all in one loop turn: their messages for a peer host leave in one frame, one
    heartbeat exchange per pair of hosts per interval however many groups are awake (as
    TiKV's and CockroachDB's coalesced heartbeats). Groups with their own timers would
    each beat in a turn of their own, a frame per group and peer. A group's first beat
    after it starts leading comes up to half an interval early or late; from then on it
    beats on the clock, every interval. With no group armed the clock stops."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        #: Groups whose heartbeat timer is set, in the order they armed it.
        self.armed: dict[RaftNode, None] = {}
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, node: RaftNode) -> None:
        self.armed[node] = None
        if self._handle is None:
            self._handle = self.loop.call_at(self.loop.time() + self.interval, self._tick)

    @property
    def ticking(self) -> bool:
        return self._handle is not None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.armed.clear()

    def _tick(self) -> None:
        now = self.loop.time()
        horizon = now + self.interval / 2
        armed = self.armed
        due = []
        for node in list(armed):
            deadlines = node._timers._deadlines
            deadline = deadlines.get(Timer.HEARTBEAT)
            if deadline is None or not node._running:
                del armed[node]  # cancelled (or stopped) since it was armed
            elif deadline <= horizon:
                del armed[node]
                deadlines[Timer.HEARTBEAT] = None
                due.append(node)
        for node in due:
            node.engine.on_timer(Timer.HEARTBEAT)  # a leader arms it again: ``arm``
            node._flush()  # now, so every group's messages leave in this turn's frames
        # the handle stays set while ticking: groups armed meanwhile need no other
        self._handle = (self.loop.call_at(now + self.interval, self._tick) if armed
                        else None)


class Timers:
    """The engine's timers as ``loop.call_at`` handles, re-armed lazily: resetting the
    election timer on every AppendEntries costs a float store, not a cancel and a new
    handle. A handle that fires before its (moved) deadline re-arms itself.

    Load never costs leadership through a stall of the follower's own loop: an election
    or lease timer that fires more than ``OVERDUE`` late lets the loop read what arrived
    meanwhile (a heartbeat moves the deadline) before it acts, and runs the commands of
    messages already read first."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self._handles: dict[Timer, asyncio.Handle | None] = {}
        self._fires_at: dict[Timer, float] = {}
        self._deadlines: dict[Timer, float | None] = {}
        #: Overdue timers already given their poll.
        self._polled: set[Timer] = set()
        #: The election timer ran out and waits in its ``CampaignLimit``'s line.
        self.waiting = False
        #: (commit index, applied index) when the commit-notify timer fired.
        self._notify_mark = (0, 0)

    def set(self, timer: Timer, delay: float) -> None:
        if timer is Timer.ELECTION:
            self.waiting = False  # a leader was heard, or the engine moved on
        loop = self.node._loop
        deadline = loop.time() + delay
        self._deadlines[timer] = deadline
        if timer is Timer.HEARTBEAT and self.node.heartbeat_clock is not None:
            self.node.heartbeat_clock.arm(self.node)
            return
        self._polled.discard(timer)  # a new deadline gets its own poll when overdue
        handle = self._handles.get(timer)
        if handle is None or self._fires_at[timer] > deadline:
            if handle is not None:
                handle.cancel()
            self._handles[timer] = loop.call_at(deadline, self._fire, timer)
            self._fires_at[timer] = deadline
        # else the armed handle fires earlier and re-arms itself for the rest

    def cancel(self, timer: Timer) -> None:
        self._deadlines[timer] = None
        if timer is Timer.ELECTION:
            self.waiting = False

    def cancel_all(self) -> None:
        self.waiting = False
        for handle in self._handles.values():
            if handle is not None:
                handle.cancel()
        self._handles.clear()

    def _fire(self, timer: Timer) -> None:
        self._handles[timer] = None
        deadline = self._deadlines.get(timer)
        node = self.node
        if deadline is None or not node._running:
            return
        loop = node._loop
        if loop.time() < deadline:
            self._handles[timer] = loop.call_at(deadline, self._fire, timer)
            self._fires_at[timer] = deadline
            return
        if timer in _LEADER_TIMERS and loop.time() - deadline > OVERDUE \
                and timer not in self._polled:
            self._polled.add(timer)
            self._handles[timer] = loop.call_soon(self._after_a_poll, timer)
            self._fires_at[timer] = loop.time()
            return
        self._polled.discard(timer)
        if timer in _LEADER_TIMERS and node._flush_scheduled:
            # Messages handled this turn may have moved the deadline, but their commands
            # wait for the scheduled flush: run it first.
            node._flush()
            if self._deadlines.get(timer) != deadline:
                return  # moved (and armed again by the flush) or cancelled
        self._deadlines[timer] = None
        limit = node.campaign_limit
        if timer is Timer.ELECTION and limit is not None and node.engine.role != Role.LEADER:
            limit.ask(node)
            return
        if timer is Timer.COMMIT:
            # The commit notification waits for the callbacks already due: the proposers
            # its commit answered propose again there, and (flushed first) their entries
            # take the commit index to the followers, not an empty AppendEntries.
            self._notify_mark = (node.engine.commit_index, node._applier.applied_index)
            loop.call_soon(self._notify_commit)
            return
        node.engine.on_timer(timer)
        node._schedule_flush()

    def _after_a_poll(self, timer: Timer) -> None:
        """The second of the two callbacks an overdue timer waits for. A callback queued
        by another runs on the loop's next turn, and the loop polls its sockets between
        two turns; the first may still run before the next poll (uvloop runs callbacks
        before libuv polls, and a timer's after), the second cannot. Not a short
        ``call_at``: uvloop's clock ticks in milliseconds and ``call_at`` reads it again,
        so a delay of one millisecond can come out as none, which uvloop runs as
        ``call_soon``, before the poll."""
        self._handles[timer] = self.node._loop.call_soon(self._fire, timer)

    def _notify_commit(self) -> None:
        node = self.node
        if not node._running or self._deadlines.get(Timer.COMMIT) is not None:
            return  # stopped, or armed again meanwhile: that one will fire
        if (node.engine.commit_index, node._applier.applied_index) != self._notify_mark:
            # More was committed or applied since the timer fired, by callbacks that ran
            # before this one (uvloop runs due timers first, then the callbacks queued
            # before them, such as a message delivered in memory): the flush that applies
            # it and the wake-ups of the proposers it answers come after this. Wait
            # another delay for their entries, which carry the commit index along.
            self.set(Timer.COMMIT, node.config.commit_notify_delay)
            return
        if node._proposals.buffered:
            node._flush()
        node.engine.on_timer(Timer.COMMIT)
        node._schedule_flush()


class CommandRunner:
    """Runs engine commands (see the module docstring)."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node

    def run(self, commands: list[Any]) -> None:
        if not commands:
            return  # the caller just took them: nothing can have been emitted since
        node = self.node
        writer = node._writer
        applier = node._applier
        recorder = node._recorder
        sent = recorder.messages_out
        # Every command the engine emitted is in hand (the caller just took them), so
        # every entry up to this commit index is in these writes or earlier ones.
        commit_index = node.engine.commit_index
        ops: list[Any] = []
        held: list[Any] = []
        outbox: dict[int, list[Any]] = {}
        apply_now: list[Any] | None = None
        for c in commands:
            t = type(c)
            if t is Send:
                if waits_for_writes(c) and (ops or writer.writes):
                    held.append(c)
                else:
                    sent[type(c.message)] += 1
                    box = outbox.get(c.to)
                    if box is None:
                        outbox[c.to] = [c.message]
                    else:
                        box.append(c.message)
            elif t in _WRITES:
                ops.append(c)
            elif t is SendSnapshotChunk:
                m = node._transfer.fill_chunk(c)
                if m is not None:
                    sent[type(m)] += 1
                    box = outbox.get(c.to)
                    if box is None:
                        outbox[c.to] = [m]
                    else:
                        box.append(m)
            elif t is StoreSnapshotChunk:
                save = node._transfer.store_chunk(c.frm, c.message)
                if save is not None:
                    ops.append(save)
            elif t is Apply:
                applier.committed_index = c.entries[-1].index
                if recorder.awaiting_commit:
                    recorder.committed(applier.committed_index)
                if apply_now is None and applier.can_apply_now():
                    apply_now = c.entries
                elif apply_now is not None:
                    apply_now = apply_now + c.entries
                else:
                    applier.enqueue(c.entries)
            elif t is ApplyStored:
                applier.committed_index = c.last
                if apply_now is not None:
                    applier.enqueue(apply_now)
                    apply_now = None
                applier.enqueue(c)
            elif t is ReadLog:
                node._log_reader.serve(c)
            elif t is SetTimer:
                node._timers.set(c.timer, c.delay)
            elif t is CancelTimer:
                node._timers.cancel(c.timer)
            elif t is RoleChanged:
                node._on_role_changed(c)
            elif t is ReadReady:
                node._reads.ready(c.request_id, c.read_index)
            elif t is ReadFailed:
                node._reads.failed(c.request_id, c.leader_id)
            elif t is QuietChanged:
                if node.quiet_changed is not None:
                    node.quiet_changed(node, c.quiet)
            elif t is FollowerLostEntries:
                node._follower_lost_entries(c)
            elif t is ToldRemoved:
                node._told_removed(c)
        send = node.network.send
        for to, msgs in outbox.items():
            send(to, msgs)
        node._membership_seen()
        more = node.engine.take_commands()
        if ops:
            writer.submit(ops, held, commit_index)
        elif held:
            writer.hold(held)
        if apply_now is not None:
            applier.apply_now(apply_now)  # after this turn's messages and writes are out
        if more:
            self.run(more)  # what answering a snapshot chunk emitted, after these writes
