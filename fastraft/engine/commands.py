"""What the engine asks its driver to do. Plain values; the driver runs them in order.

Ordering contract: the persistence commands (``PersistHardState``, ``TruncateLog``,
``AppendLog``, ``CompactLog``) are applied in order, batch after batch, except that within
a batch the hard state is written after the log (``write_order``). A ``Send`` whose message
``requires_durability`` is released only after every persistence command emitted before
it is durable (votes and acknowledgements promise what is on disk, Figure 2), unless the
engine marks it ``durable`` (what it promises is on disk already); other sends go out at
once (a leader may replicate before its own append is durable, thesis
§10.2.1).
"""
from __future__ import annotations

import enum
from typing import Any

import msgspec

from fastraft.messages import (
    AppendEntriesResponse,
    Entry,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    RequestVote,
    RequestVoteResponse,
)


class Timer(enum.IntEnum):
    ELECTION = 0
    HEARTBEAT = 1
    #: Followers: ``election_timeout_min`` after the leader was last heard from. While it
    #: runs, votes for other candidates are refused (thesis §4.2.3, with check-quorum).
    LEASE = 2
    #: Leader: tell caught-up followers a new commit index no AppendEntries carried yet.
    COMMIT = 3


class Role(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


class PersistHardState(msgspec.Struct, gc=False):
    """Make ``hard_state`` durable. The driver reports durability with
    ``Engine.hard_state_persisted`` (a vote's election timeout counts from then)."""

    hard_state: HardState


class TruncateLog(msgspec.Struct, gc=False):
    """Delete log entries from ``index`` on (a conflicting suffix, §5.3)."""

    index: int


class AppendLog(msgspec.Struct):
    """Append ``entries`` (consecutive, following the current last entry) to the log.
    The driver reports durability with ``Engine.log_persisted``."""

    entries: list[Entry]


class Send(msgspec.Struct, gc=False):
    to: int
    message: object
    #: What the message promises is durable already (an acknowledgement of entries and
    #: a term on disk): it leaves at once, even if it ``requires_durability``.
    durable: bool = False


class CompactLog(msgspec.Struct, gc=False):
    """Delete log entries up to ``index``: a durable snapshot covers them (§7)."""

    index: int


class SendSnapshotChunk(msgspec.Struct, gc=False):
    """Fill ``message.data`` with ``length`` bytes of the snapshot
    ``message.meta.last_included_index`` from ``message.offset`` and send it to ``to``.
    Drop it if the driver's current snapshot is another one (the engine resends)."""

    to: int
    message: InstallSnapshot
    length: int


class StoreSnapshotChunk(msgspec.Struct, gc=False):
    """A chunk arrived from leader ``frm``. Keep it if ``message.offset`` is where the
    snapshot being received ends (0 starts over), then call
    ``Engine.snapshot_chunk_stored``; on the last chunk first restore the state machine
    from the whole snapshot, save it durably and call ``Engine.snapshot_installed``."""

    frm: int
    message: InstallSnapshot


class Apply(msgspec.Struct):
    """Committed entries, in order, to hand to the state machine."""

    entries: list[Entry]


class ApplyStored(msgspec.Struct, gc=False):
    """Committed entries ``first .. last`` to hand to the state machine, in order with the
    ``Apply`` commands around it; they are durable, and no longer in the engine's memory:
    read them from storage (in batches: there may be many)."""

    first: int
    last: int


class ReadLog(msgspec.Struct, gc=False):
    """Read entries ``start .. stop - 1`` from storage, at most ``max_bytes`` of payload
    (at least one entry), for follower ``peer``: they are durable and no longer in the
    engine's memory. Answer with ``Engine.log_read(peer, start, entries)``, or
    ``Engine.log_read_failed(peer, start)``. The leader goes on meanwhile."""

    peer: int
    start: int
    stop: int
    max_bytes: int


class SetTimer(msgspec.Struct, gc=False):
    """(Re)arm ``timer`` to fire ``delay`` seconds from now; replaces any earlier arming."""

    timer: Timer
    delay: float


class CancelTimer(msgspec.Struct, gc=False):
    timer: Timer


class RoleChanged(msgspec.Struct, gc=False):
    """Role, term or known leader changed. ``commit_index`` tells which pending proposals
    may still complete when leadership is lost."""

    role: Role
    term: int
    leader_id: int | None
    commit_index: int


class QuietChanged(msgspec.Struct, gc=False):
    """The group went quiet (``Config.quiesce_after``: no ticks, nothing to replicate) or
    woke. A host uses it to give the memory of quiet groups' log caches to awake ones."""

    quiet: bool


class FollowerLostEntries(msgspec.Struct, gc=False):
    """Follower ``peer`` says its log ends at ``holds``, below the ``acknowledged`` index
    it had acknowledged to this leader: its storage lost entries (a data directory wiped
    or replaced under the same id). The leader catches it up again; the driver tells
    the operator, as such a node may also have forgotten a vote (thesis §11.7)."""

    peer: int
    acknowledged: int
    holds: int


class ToldRemoved(msgspec.Struct, gc=False):
    """A leader told this node that its configuration entry at ``index``, committed,
    leaves it out (``messages.Removed``): out of the group although its own log ends
    before the change (``Engine.removed``). The driver may stop it
    (``Config.stop_when_removed``)."""

    index: int


class ReadReady(msgspec.Struct, gc=False):
    """Read ``request_id`` is linearizable once the state machine has applied ``read_index``."""

    request_id: int
    read_index: int


class ReadFailed(msgspec.Struct, gc=False):
    """Read ``request_id`` could not be confirmed; retry on ``leader_id`` (if known)."""

    request_id: int
    leader_id: int | None


Command = (PersistHardState | TruncateLog | AppendLog | CompactLog | Send | SendSnapshotChunk
           | StoreSnapshotChunk | Apply | ApplyStored | ReadLog | SetTimer | CancelTimer
           | RoleChanged | QuietChanged | FollowerLostEntries | ToldRemoved | ReadReady
           | ReadFailed)

_DURABLE_REPLIES = (RequestVote, RequestVoteResponse, AppendEntriesResponse,
                    InstallSnapshotResponse)


def write_order(ops: list[Any]) -> tuple[list[Any], int]:
    """The order in which a driver makes one batch of persistence commands durable: the
    log's writes (appends, truncations, compactions, snapshots) as the engine emitted
    them, then the batch's last hard state. A crash partway through may leave the log
    ahead of the term it came with, never a term without its entries: a founding node
    whose term reached the disk without its first entry would hold no configuration, so
    it could neither campaign nor be initialized again. Entries of a term the disk does
    not record are safe: the node voted in no such term, or that vote's batch, durable
    before the vote was sent, would have recorded it (Figure 2).

    Returns the ops in that order and the position of the append that may carry the
    commit mark (``commit_advanced``): the last one, unless a truncation follows it,
    which may replace entries the mark would claim (-1 then, or with no append)."""
    ordered: list[Any] = []
    hard_state = None
    marked = -1
    for op in ops:
        t = type(op)
        if t is PersistHardState:
            hard_state = op
            continue
        if t is AppendLog:
            marked = len(ordered)
        elif t is TruncateLog:
            marked = -1
        ordered.append(op)
    if hard_state is not None:
        ordered.append(hard_state)
    return ordered, marked


def requires_durability(message: object) -> bool:
    """True if ``message`` promises state that must be on disk before it leaves the node."""
    return isinstance(message, _DURABLE_REPLIES)


def waits_for_writes(send: Send) -> bool:
    """True if ``send`` leaves only once every write emitted before it is durable: its
    message ``requires_durability`` and the engine did not mark what it promises as on
    disk already (``Send.durable``). The one rule every driver applies."""
    return not send.durable and isinstance(send.message, _DURABLE_REPLIES)
