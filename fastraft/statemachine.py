"""The state-machine hook: what the replicated log drives."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol, runtime_checkable

from fastraft.messages import Entry
from fastraft.snapshots import SnapshotData


@runtime_checkable
class StateMachine(Protocol):
    """Applies committed user entries, in log order, exactly once per node lifetime.

    ``apply`` receives a batch (one call per batch of committed entries) and returns one
    result per entry; ``RaftNode.propose`` resolves with that entry's result. It must be
    deterministic: every replica applies the same entries and must reach the same state.
    It must also accept every committed entry: answer bad input with a result (as
    ``fastraft.kv.KVStore`` answers ``Refused``), never an exception. An exception is a
    bug that stops the node: pending operations fail with ``NodeFailed`` naming the entry,
    ``RaftNode.wait_stopped()`` raises it, ``fastraft node`` exits with status 3. Every
    replica meets the same entry, so fix the state machine, then restart.
    ``apply`` runs on the node's event loop (at most 4,096 entries a call): a call that
    takes longer than the election timeout holds up heartbeats and can cost the leader
    its term. Watch for single steps proportional to the state's size: a dict of a
    million keys rehashes all of them in one step when it grows (about 0.1 s; see how
    ``fastraft.kv.KVStore`` shards its dicts).
    Any method may be a coroutine; synchronous ``snapshot`` and ``restore`` run in a
    thread (the node applies nothing meanwhile); ``RaftNode.stop()`` waits for such a
    thread to return, and cancels a coroutine under way. ``entry.data`` is bytes or a
    memoryview of a received buffer; copy it (``bytes(entry.data)``) to keep it beyond
    the call.

    Optional: ``last_applied() -> int``, the highest index this state machine has
    made durable itself; a restarting node then skips re-applying up to it. Without it the
    node rebuilds the state from the last snapshot plus the log after it.
    """

    def apply(self, entries: Sequence[Entry]) -> Sequence[Any]: ...

    def snapshot(self) -> SnapshotData:
        """The whole state, for log compaction and InstallSnapshot (§7): bytes, or a
        readable binary file object for state too large to hold twice in memory. The node
        reads a stream to its end, one ``read`` per event-loop turn, then closes it; it
        applies nothing meanwhile, so a stream may read the live state lazily. Each
        ``read`` should take at most a few milliseconds (heartbeats wait for it)."""

    def restore(self, data: BinaryIO) -> None:
        """Replace the whole state with a snapshot's: ``data`` is a readable binary file
        object at its start (``data.read()`` gives it all, ``data.read(n)`` streams it)."""


class NullStateMachine:
    """Holds no state and answers None for every entry: for a node whose log is only a
    ``ReplicatedLog`` (records never reach a state machine), and for benchmarks that
    measure replication rather than a storage engine."""

    def apply(self, entries: Sequence[Entry]) -> list[None]:
        return [None] * len(entries)

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: BinaryIO) -> None:
        pass
