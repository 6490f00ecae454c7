"""The deterministic Raft engine and the commands it emits."""
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
    requires_durability,
    waits_for_writes,
    write_order,
)
from fastraft.engine.core import Engine, InitialState
from fastraft.engine.progress import Progress, ProgressState
from fastraft.errors import MembershipChangeInProgress

__all__ = [
    "Engine", "InitialState", "MembershipChangeInProgress", "Progress", "ProgressState",
    "AppendLog", "Apply", "ApplyStored", "CancelTimer", "Command", "FollowerLostEntries",
    "PersistHardState", "QuietChanged", "ReadFailed", "ReadLog", "ReadReady", "Role",
    "RoleChanged", "Send", "SetTimer", "Timer", "TruncateLog", "CompactLog", "SendSnapshotChunk",
    "StoreSnapshotChunk", "ToldRemoved", "requires_durability", "waits_for_writes",
    "write_order",
]
