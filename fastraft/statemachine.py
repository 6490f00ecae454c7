"""The state-machine hook: what the replicated log drives."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from fastraft.messages import Entry


@runtime_checkable
class StateMachine(Protocol):
    """Applies committed user entries, in log order, exactly once per node lifetime.

    ``apply`` receives a batch (one call per batch of committed entries) and returns one
    result per entry; ``RaftNode.propose`` resolves with that entry's result. It must be
    deterministic: every replica applies the same entries and must reach the same state.
    It may be a coroutine. ``entry.data`` is bytes or a memoryview of a received buffer;
    copy it (``bytes(entry.data)``) to keep it beyond the call.

    Optional: ``last_applied() -> int``, the highest index this state machine has
    made durable itself; a restarting node then skips re-applying up to it. Without it the
    node rebuilds the state from the last snapshot plus the log after it.
    """

    def apply(self, entries: Sequence[Entry]) -> Sequence[Any]: ...

    def snapshot(self) -> bytes:
        """The whole state as bytes (used for log compaction and InstallSnapshot)."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's ``data``."""
