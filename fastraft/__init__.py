"""fastraft: a fast Raft consensus engine for Python."""
from fastraft.config import Config
from fastraft.errors import (
    AlreadyInitialized,
    BatchPartlyCommitted,
    BatchRestUnknown,
    ConfigError,
    DecodeError,
    EntryTooLarge,
    FastRaftError,
    GroupExists,
    InvalidArgument,
    MembershipChangeInProgress,
    NodeFailed,
    NodeStopped,
    NotLeader,
    OffsetCompacted,
    Overloaded,
    ProposalDropped,
    StorageCorruption,
    StorageFailed,
    StorageOwnedElsewhere,
    UnknownGroup,
)
from fastraft.host import RaftHost
from fastraft.messages import Entry, EntryKind, HardState, Membership
from fastraft.node import RaftNode
from fastraft.replicatedlog import ReplicatedLog
from fastraft.statemachine import NullStateMachine, StateMachine
from fastraft.storage import MemoryStorage, RaftStorage

__version__ = "0.1.0"

__all__ = [
    "Config", "RaftNode", "RaftHost", "ReplicatedLog", "RaftStorage", "MemoryStorage",
    "StateMachine", "NullStateMachine",
    "Entry", "EntryKind", "HardState", "Membership",
    "FastRaftError", "AlreadyInitialized", "ConfigError", "DecodeError", "InvalidArgument",
    "EntryTooLarge",
    "MembershipChangeInProgress", "NodeFailed", "NodeStopped", "NotLeader", "OffsetCompacted",
    "Overloaded",
    "ProposalDropped", "BatchPartlyCommitted", "BatchRestUnknown", "StorageCorruption",
    "StorageFailed",
    "StorageOwnedElsewhere", "GroupExists",
    "UnknownGroup",
]
