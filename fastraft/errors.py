"""Typed exceptions. Every error a user can see is one of these, with a message they can act on."""
from __future__ import annotations

from typing import Any


class FastRaftError(Exception):
    """Base class of every fastraft error."""


class DecodeError(FastRaftError, ValueError):
    """A buffer from the network or disk is truncated or malformed."""


class ConfigError(FastRaftError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class InvalidArgument(FastRaftError, ValueError):
    """An argument of a call is out of range or names something that does not fit (a node
    that is not a member, a group id too large); the message says what is accepted.
    Nothing changed: fix the argument and call again."""


class EntryTooLarge(InvalidArgument):
    """A proposed entry is larger than the node replicates (``Config.max_entry_bytes``, or
    what the network's frames carry); nothing was proposed. Split it, or raise the limit
    on every node."""


class NotLeader(FastRaftError):
    """This node is not the leader; retry on ``leader_id`` (None when no leader is known)."""

    def __init__(self, leader_id: int | None, leader_address: str | None = None) -> None:
        self.leader_id = leader_id
        self.leader_address = leader_address
        where = "no leader is known yet" if leader_id is None else (
            f"the leader is node {leader_id} at {leader_address!r}")
        super().__init__(f"this node is not the leader; {where}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its arguments, not its message
        return type(self), (self.leader_id, self.leader_address)


class ProposalDropped(FastRaftError):
    """Leadership was lost before this node learned the entry's result.

    ``committed`` says what is known of the entry. None (most often): a later leader may
    commit it or not, the outcome is unknown; retry only if the command is idempotent,
    or read back to find out. False: a later leader committed another entry at its
    index, so it never will be; asking the leader again is safe. True: it was committed
    (it takes effect), but its result is not known here.
    """

    def __init__(self, message: str, committed: bool | None = None) -> None:
        super().__init__(message)
        self.committed = committed


class BatchPartlyCommitted(ProposalDropped):
    """A later leader committed the first entries of a ``propose_batch`` (or of an
    ``append`` of records) and other entries in place of the rest. ``results`` holds the
    first entries' results (their offsets, for records), in order; the rest never will be
    committed: sending ``datas[len(results):]`` again is safe, sending the whole batch is
    not (``committed`` is None: the batch as a whole was neither committed nor not)."""

    def __init__(self, message: str, results: list[Any]) -> None:
        super().__init__(message)
        self.results = results

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.results)


class BatchRestUnknown(ProposalDropped):
    """Leadership was lost after the first entries of a ``propose_batch`` (or of an
    ``append`` of records) were committed, and before this node learned the fate of the
    rest; raised once those entries are applied here. ``results`` holds the first
    entries' results (their offsets, for records), in order: those took effect. The rest
    **may or may not** be committed by a later leader (``committed`` is None): send
    ``datas[len(results):]`` again only if applying them twice is harmless, or read back
    first; never the whole batch."""

    def __init__(self, message: str, results: list[Any]) -> None:
        super().__init__(message)
        self.results = results

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.results)


class NodeStopped(FastRaftError):
    """The node was stopped (or never started); the operation did not complete.

    For a proposal ``committed`` is False when the node stopped before it appended the
    entry (it never will be committed: sending it again is safe), None otherwise (an
    entry in the log may still be committed by the rest of the cluster).
    """

    def __init__(self, message: str, committed: bool | None = None) -> None:
        super().__init__(message)
        self.committed = committed


class Overloaded(FastRaftError):
    """Too many proposals are pending; back off and retry."""


class StorageCorruption(FastRaftError):
    """Data on disk failed a checksum or is inconsistent; names the file and offset."""


class StorageFailed(FastRaftError, OSError):
    """Storage refuses a write because an earlier one failed (disk full, I/O error) or it
    was closed. What was reported written before is intact: fix the cause and restart
    the node, which cuts a torn tail and catches up. An ``OSError``, as the first failed
    write's own error is."""


class StorageOwnedElsewhere(FastRaftError):
    """The storage belongs to another node id or cluster id than the node opening it, or
    the directory holds the other kind of storage (a ``SharedWAL``'s for a
    ``FileStorage``, or the reverse)."""


class NodeFailed(NodeStopped):
    """The node stopped itself because a hook failed: the state machine raised on a
    committed entry (a bug: ``apply`` must be deterministic and accept every entry), or
    storage could not write. ``RaftNode.failure`` says which; the node stays stopped, and
    a restart meets the same entry again until the state machine is fixed."""


class SafetyViolation(FastRaftError, AssertionError):
    """A Raft invariant was about to be broken. This is a bug in fastraft or in a hook."""


class AlreadyInitialized(FastRaftError):
    """``initialize()`` was called on a node that already has state."""


class MembershipChangeInProgress(FastRaftError):
    """Another membership change has not committed yet; wait for it, then retry."""


class CatchUpTimeout(FastRaftError, TimeoutError):
    """A learner did not catch up with the leader in time, so it was not promoted."""


class OffsetCompacted(FastRaftError, ValueError):
    """The entries asked for are no longer in this node's log: compacted behind a snapshot
    and the retention bound (``Config.log_retention_entries`` / ``log_retention_bytes``),
    or before a snapshot this node installed. Start from the offset the message names."""


class GroupExists(FastRaftError, ValueError):
    """``RaftHost.create_group`` for a group that already runs on that host."""


class UnknownGroup(FastRaftError, KeyError):
    """A group id that does not run on that host."""
