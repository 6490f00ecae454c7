"""Raft's wire messages as msgspec Structs, names as in the paper (Figure 2).

Every message carries the sender's ``term`` (§5.1). The recipient learns the sender's id
from the transport (``node.receive(from_id, messages)``), so ids appear only where the
paper names them. ``Message`` is the tagged union the transports decode.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Union

import msgspec

from fastraft.errors import InvalidArgument

#: The largest term or log index a node accepts from anyone, or reaches itself. Far
#: beyond any real cluster's reach, and far enough below the wire and kernel limits
#: (u64, int64) that a node at this term can still campaign: a peer announcing a larger
#: number is malformed, never adopted.
MAX_TERM = MAX_LOG_INDEX = 1 << 62

# Bounded integers for what arrives from the network. msgspec checks them while
# decoding (at no cost when a Struct is built locally).
Term = Annotated[int, msgspec.Meta(ge=0, le=MAX_TERM)]
Index = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOG_INDEX)]
#: The term of the entry at some index: -1 when the sender no longer holds that entry
#: (compacted into a snapshot) or never had it (``LogIndex.term_at``).
LogTerm = Annotated[int, msgspec.Meta(ge=-1, le=MAX_TERM)]
#: The largest node id and the longest address the wire takes (a configuration entry
#: holding a larger one could not be decoded by the followers).
MAX_NODE_ID = (1 << 63) - 1
MAX_ADDRESS_LENGTH = 1024
#: Group ids (multi-Raft) travel as unsigned 64-bit ints.
MAX_GROUP_ID = (1 << 64) - 1
NodeId = Annotated[int, msgspec.Meta(ge=1, le=MAX_NODE_ID)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Kind = Annotated[int, msgspec.Meta(ge=0, le=3)]
Address = Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS_LENGTH)]


def check_node_id(node_id: object) -> None:
    """Raise ``InvalidArgument`` unless ``node_id`` is an int the wire takes (not a bool)."""
    if not isinstance(node_id, int) or isinstance(node_id, bool) \
            or not 1 <= node_id <= MAX_NODE_ID:
        raise InvalidArgument(f"node ids are positive ints up to 2**63 - 1, got {node_id!r}")


def check_group_id(group_id: object) -> None:
    """Raise ``InvalidArgument`` unless ``group_id`` is an int the wire takes (not a bool)."""
    if not isinstance(group_id, int) or isinstance(group_id, bool) \
            or not 0 <= group_id <= MAX_GROUP_ID:
        raise InvalidArgument(f"group ids are ints from 0 to 2**64 - 1, got {group_id!r}")


class EntryKind(IntEnum):
    NORMAL = 0  #: a user command, handed to the state machine
    CONFIG = 1  #: a membership change (data is an encoded ``Membership``)
    NOOP = 2    #: appended by each new leader to commit its predecessors' entries (§5.4.2)
    RECORD = 3  #: a record of a ``ReplicatedLog``: read by its consumers, not applied


class Entry(msgspec.Struct, array_like=True, gc=False):
    """One log entry. ``data`` is bytes, or a memoryview slice of a received buffer."""

    term: Term
    index: Index
    kind: Kind
    data: bytes


class EntryBatch(list["Entry"]):
    """Entries as the batch codec decodes them: it has checked that their indexes are
    consecutive, their terms never decrease and their kinds are known, so a receiver
    need only check the batch's ends against the message that carried it."""

    __slots__ = ()


class HardState(msgspec.Struct, array_like=True, gc=False):
    """State that must be durable before any message depending on it is sent (Figure 2).

    ``commit`` is a lower bound of the commit index, which recovery uses to tell a torn
    tail (never acknowledged) from damaged records (committed: never cut away).
    ``recovering``: this node's storage was repaired after damage and may have lost
    entries it acknowledged and votes it cast; it neither votes nor campaigns until a
    leader has caught it up (docs/storage.md, "Repairing a node").
    """

    current_term: int = 0
    voted_for: int | None = None
    commit: int = 0
    recovering: bool = False


class Membership(msgspec.Struct, array_like=True, frozen=True):
    """A cluster configuration (§6).

    ``voters`` is C_new; while a joint configuration C_old,new is in force, ``outgoing``
    holds C_old (empty otherwise). ``learners`` replicate but never vote or count for
    commit. ``addresses`` maps node ids to opaque transport addresses; the engine never
    looks inside them.
    """

    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()
    outgoing: frozenset[NodeId] = frozenset()
    addresses: dict[NodeId, Address] = {}
    removed: frozenset[NodeId] = frozenset()

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

    last_included_index: Index
    last_included_term: Term
    membership: Membership


class RequestVote(msgspec.Struct, tag=1, array_like=True, gc=False):
    """§5.2; with ``pre_vote`` the recipient only says whether it would vote (thesis §9.6).
    ``leadership_transfer`` marks an election the old leader asked for (thesis §3.10):
    voters then answer even while they still hear from that leader."""

    term: Term
    candidate_id: NodeId
    last_log_index: Index
    last_log_term: Term
    pre_vote: bool = False
    leadership_transfer: bool = False


class RequestVoteResponse(msgspec.Struct, tag=2, array_like=True, gc=False):
    term: Term
    vote_granted: bool
    pre_vote: bool = False


class AppendEntries(msgspec.Struct, tag=3, array_like=True):
    """§5.3. ``seq`` is a leader-local counter echoed back; a quorum of echoes of a ``seq``
    proves the sender was still leader when it sent it (ReadIndex, thesis §6.4).
    ``quiesce``: the leader's last heartbeat before its group goes quiet (``Engine.quiet``)."""

    term: Term
    leader_id: NodeId
    prev_log_index: Index
    prev_log_term: LogTerm
    entries: list[Entry]
    leader_commit: Index
    seq: Counter = 0
    quiesce: bool = False


class AppendEntriesResponse(msgspec.Struct, tag=4, array_like=True, gc=False):
    """On success ``index`` is the last index now known to match the leader's log; on
    reject it is the rejected ``prev_log_index`` and ``hint_index``/``hint_term`` say where
    the leader should probe next (fast backtracking)."""

    term: Term
    success: bool
    index: Index
    hint_index: Index = 0
    hint_term: LogTerm = 0
    seq: Counter = 0
    #: The follower's storage was repaired and may lack entries it acknowledged before:
    #: the leader forgets what it knew of this follower's log (HardState.recovering).
    recovering: bool = False


class InstallSnapshot(msgspec.Struct, tag=5, array_like=True, gc=False):
    """§7: one chunk of a snapshot, starting at byte ``offset``; ``done`` on the last."""

    term: Term
    leader_id: NodeId
    meta: SnapshotMeta
    offset: Counter
    data: bytes
    done: bool


class InstallSnapshotResponse(msgspec.Struct, tag=6, array_like=True, gc=False):
    """The follower holds the first ``next_offset`` bytes of snapshot
    ``last_included_index`` (all of it, and installed, when ``done``)."""

    term: Term
    last_included_index: Index
    next_offset: Counter
    done: bool = False


class TimeoutNow(msgspec.Struct, tag=7, array_like=True, gc=False):
    """Leadership transfer: start an election now, skipping pre-vote (thesis §3.10)."""

    term: Term
    leader_id: NodeId


class ReadIndexRequest(msgspec.Struct, tag=8, array_like=True, gc=False):
    """A follower asks the leader for a read index on behalf of its client."""

    term: Term
    request_id: Counter


class ReadIndexResponse(msgspec.Struct, tag=9, array_like=True, gc=False):
    """``read_index`` is valid only when ``ok``; otherwise the leader could not serve it."""

    term: Term
    request_id: Counter
    read_index: Index
    ok: bool


class Removed(msgspec.Struct, tag=10, array_like=True, gc=False):
    """The leader's word to a node that its configuration in force, the entry at
    ``index``, leaves it out (``Membership.removed``), its log committed up to ``commit``
    (at least ``index``): sent when that node asks for votes or comes back and the
    entries that took it out have left the leader's memory, so no farewell can carry
    them (thesis §4.2.3 keeps such a node from disrupting the group; this tells it why,
    as etcd's transport tells a removed member that contacts it)."""

    term: Term
    leader_id: NodeId
    index: Index
    commit: Index


Message = Union[  # noqa: UP007 (the form msgspec decodes in every supported version)
    RequestVote, RequestVoteResponse, AppendEntries, AppendEntriesResponse,
    InstallSnapshot, InstallSnapshotResponse, TimeoutNow, ReadIndexRequest, ReadIndexResponse,
    Removed,
]

membership_encoder = msgspec.msgpack.Encoder()
membership_decoder = msgspec.msgpack.Decoder(Membership)


def encode_membership(m: Membership) -> bytes:
    return membership_encoder.encode(m)


#: Configurations decoded lately, by their bytes, at most ``MEMBERSHIP_CACHE`` (oldest
#: out first): the thousands of groups of a host mostly have the same few members, and
#: share one (immutable) ``Membership`` each instead of ~1 KB of sets and dict apiece.
_decoded_memberships: dict[bytes, Membership] = {}
MEMBERSHIP_CACHE = 256


def decode_membership(data: bytes | memoryview) -> Membership:
    key = bytes(data)
    m = _decoded_memberships.get(key)
    if m is None:
        m = membership_decoder.decode(key)
        if len(_decoded_memberships) >= MEMBERSHIP_CACHE:
            del _decoded_memberships[next(iter(_decoded_memberships))]
        _decoded_memberships[key] = m
    return m
