"""Raft's wire messages as msgspec Structs, names as in the paper (Figure 2).

Every message carries the sender's ``term`` (§5.1). The recipient learns the sender's id
from the transport (``node.receive(from_id, messages)``), so ids appear only where the
paper names them. ``Message`` is the tagged union the transports decode.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Union

import msgspec


class EntryKind(IntEnum):
    NORMAL = 0  #: a user command, handed to the state machine
    CONFIG = 1  #: a membership change (data is an encoded ``Membership``)
    NOOP = 2    #: appended by each new leader to commit its predecessors' entries (§5.4.2)


class Entry(msgspec.Struct, array_like=True, gc=False):
    """One log entry. ``data`` is bytes, or a memoryview slice of a received buffer."""

    term: int
    index: int
    kind: int
    data: bytes


class HardState(msgspec.Struct, array_like=True, gc=False):
    """State that must be durable before any message depending on it is sent (Figure 2)."""

    current_term: int = 0
    voted_for: int | None = None
    commit: int = 0


class Membership(msgspec.Struct, array_like=True, frozen=True):
    """A cluster configuration (§6).

    ``voters`` is C_new; while a joint configuration C_old,new is in force, ``outgoing``
    holds C_old (empty otherwise). ``learners`` replicate but never vote or count for
    commit. ``addresses`` maps node ids to opaque transport addresses; the engine never
    looks inside them.
    """

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()
    outgoing: frozenset[int] = frozenset()
    addresses: dict[int, str] = {}

    @property
    def joint(self) -> bool:
        return bool(self.outgoing)

    @property
    def members(self) -> frozenset[int]:
        """Every node that receives the log: voters of both halves and learners."""
        return self.voters | self.outgoing | self.learners

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.voters or node_id in self.outgoing


class SnapshotMeta(msgspec.Struct, array_like=True, frozen=True):
    """What a snapshot covers: the log up to ``last_included_index`` (§7)."""

    last_included_index: int
    last_included_term: int
    membership: Membership


class RequestVote(msgspec.Struct, tag=1, array_like=True, gc=False):
    """§5.2; with ``pre_vote`` the recipient only says whether it would vote (thesis §9.6).
    ``leadership_transfer`` marks an election the old leader asked for (thesis §3.10):
    voters then answer even while they still hear from that leader."""

    term: int
    candidate_id: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    leadership_transfer: bool = False


class RequestVoteResponse(msgspec.Struct, tag=2, array_like=True, gc=False):
    term: int
    vote_granted: bool
    pre_vote: bool = False


class AppendEntries(msgspec.Struct, tag=3, array_like=True):
    """§5.3. ``seq`` is a leader-local counter echoed back; a quorum of echoes of a ``seq``
    proves the sender was still leader when it sent it (ReadIndex, thesis §6.4)."""

    term: int
    leader_id: int
    prev_log_index: int
    prev_log_term: int
    entries: list[Entry]
    leader_commit: int
    seq: int = 0


class AppendEntriesResponse(msgspec.Struct, tag=4, array_like=True, gc=False):
    """On success ``index`` is the last index now known to match the leader's log; on
    reject it is the rejected ``prev_log_index`` and ``hint_index``/``hint_term`` say where
    the leader should probe next (fast backtracking)."""

    term: int
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0
    seq: int = 0


class InstallSnapshot(msgspec.Struct, tag=5, array_like=True, gc=False):
    """§7: one chunk of a snapshot, starting at byte ``offset``; ``done`` on the last."""

    term: int
    leader_id: int
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


class InstallSnapshotResponse(msgspec.Struct, tag=6, array_like=True, gc=False):
    """The follower holds the first ``next_offset`` bytes of snapshot
    ``last_included_index`` (all of it, and installed, when ``done``)."""

    term: int
    last_included_index: int
    next_offset: int
    done: bool = False


class TimeoutNow(msgspec.Struct, tag=7, array_like=True, gc=False):
    """Leadership transfer: start an election now, skipping pre-vote (thesis §3.10)."""

    term: int
    leader_id: int


class ReadIndexRequest(msgspec.Struct, tag=8, array_like=True, gc=False):
    """A follower asks the leader for a read index on behalf of its client."""

    term: int
    request_id: int


class ReadIndexResponse(msgspec.Struct, tag=9, array_like=True, gc=False):
    """``read_index`` is valid only when ``ok``; otherwise the leader could not serve it."""

    term: int
    request_id: int
    read_index: int
    ok: bool


Message = Union[
    RequestVote, RequestVoteResponse, AppendEntries, AppendEntriesResponse,
    InstallSnapshot, InstallSnapshotResponse, TimeoutNow, ReadIndexRequest, ReadIndexResponse,
]

membership_encoder = msgspec.msgpack.Encoder()
membership_decoder = msgspec.msgpack.Decoder(Membership)
hard_state_encoder = membership_encoder
hard_state_decoder = msgspec.msgpack.Decoder(HardState)


def encode_membership(m: Membership) -> bytes:
    return membership_encoder.encode(m)


def decode_membership(data) -> Membership:
    return membership_decoder.decode(data)
