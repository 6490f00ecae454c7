"""The storage hook: where a node keeps its hard state, log and snapshots.

Implement ``RaftStorage`` to put fastraft's log in your own storage engine. Every method
may be a plain function or a coroutine; the node checks each once at start-up. A mutating
method's effect must be durable when it returns (or its awaitable completes): the node
sends votes and acknowledgements only after that (Raft, Figure 2). The node issues one
``append_entries`` per event-loop iteration covering every entry that arrived in it, so
one durable write serves many proposals (group commit).

``MemoryStorage`` is the built-in for tests and benchmarks: nothing survives the process,
but it survives ``RaftNode.stop()`` and a new node on the same object is a restart.
"""
from __future__ import annotations

import io
from collections.abc import Awaitable
from typing import BinaryIO, Protocol, TypeVar, Union, runtime_checkable

import msgspec

from fastraft import kernels
from fastraft.errors import StorageCorruption
from fastraft.messages import Entry, HardState, SnapshotMeta
from fastraft.snapshots import COPY_BYTES

__all__ = ["RaftStorage", "MemoryStorage", "AsyncMemoryStorage", "SnapshotMeta",
           "StorageState"]


class StorageState(msgspec.Struct, kw_only=True):
    """What ``RaftStorage.load_state`` returns. ``first_index .. last_index`` are the log
    entries held (``last_index < first_index`` when there are none). ``node_id`` and
    ``cluster_id`` are the owner recorded by ``save_identity`` (0 and "" until then)."""

    hard_state: HardState = msgspec.field(default_factory=HardState)
    snapshot: SnapshotMeta | None = None
    first_index: int = 1
    last_index: int = 0
    node_id: int = 0
    cluster_id: str = ""


T = TypeVar("T")
#: What a hook method returns: the value, or (a coroutine method) an awaitable of it.
MaybeAwaitable = Union[T, Awaitable[T]]  # noqa: UP007 (an alias evaluated at runtime)


@runtime_checkable
class RaftStorage(Protocol):
    def load_state(self) -> MaybeAwaitable[StorageState]: ...

    def append_entries(self, entries: list[Entry]) -> MaybeAwaitable[None]:
        """Append ``entries``; the first follows the current last entry."""

    def truncate_suffix(self, index: int) -> MaybeAwaitable[None]:
        """Delete entries ``index`` and after (a conflicting suffix)."""

    def compact_prefix(self, index: int) -> MaybeAwaitable[None]:
        """Delete entries up to ``index`` (covered by a snapshot)."""

    def read_entries(self, lo: int, hi: int,
                     max_bytes: int | None = None) -> MaybeAwaitable[list[Entry]]:
        """Entries ``lo .. hi - 1``, stopping early (after at least one) past ``max_bytes``
        of payload. Entries compacted away are not the log: a range that starts before
        the first entry held starts there. Called concurrently with the writes (a reader
        must see every entry whose append completed, and never a torn one)."""

    def save_hard_state(self, hard_state: HardState) -> MaybeAwaitable[None]:
        """Make the term, vote and ``recovering`` flag durable. ``hard_state.commit`` may
        be kept lazily (it only helps recovery tell torn from damaged)."""

    def save_identity(self, node_id: int, cluster_id: str) -> MaybeAwaitable[None]:
        """Record, durably, which node of which cluster owns this storage. Called once, on
        a storage whose ``load_state`` reports no owner; the node refuses to start on a
        storage owned by another node or cluster."""

    def save_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> MaybeAwaitable[None]:
        """Make the snapshot durable, replacing the previous one. ``data`` is a readable
        binary stream: read it to its end in chunks (it may be larger than memory)."""

    def load_snapshot(self) -> MaybeAwaitable[tuple[SnapshotMeta, BinaryIO] | None]:
        """The last saved snapshot, with a NEW readable, seekable binary file object for
        its data on each call (the node reads chunks at offsets, and closes it). A reader
        keeps reading its snapshot even after a newer one is saved."""

    # Optional: ``commit_advanced(index)`` (a plain function, never a coroutine) is told
    # the commit index before each write batch that appends entries; a storage may record
    # it with the next append so its recovery never drops committed entries (FileStorage
    # stamps it on each record).


class MemoryStorage:
    """``RaftStorage`` in memory. Not durable across processes; for tests and benchmarks."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.identity = (0, "")
        self._entries: list[Entry] = []
        self._offset = 0  # index of the entry before _entries[0]
        self._snapshot: tuple[SnapshotMeta, bytes] | None = None

    def _floor(self) -> int:
        """The last index compacted, or replaced by the snapshot: a snapshot whose last
        entry the log holds with its term leaves the log as it is (§7); any other
        replaces the log up to it."""
        if self._snapshot is None:
            return self._offset
        meta = self._snapshot[0]
        index = meta.last_included_index
        if index <= self._offset:
            return self._offset
        if index <= self._offset + len(self._entries) and \
                self._entries[index - self._offset - 1].term == meta.last_included_term:
            return self._offset
        return index

    def load_state(self) -> StorageState:
        floor = self._floor()
        return StorageState(hard_state=self.hard_state,
                            snapshot=self._snapshot[0] if self._snapshot else None,
                            first_index=floor + 1,
                            last_index=max(self._offset + len(self._entries), floor),
                            node_id=self.identity[0], cluster_id=self.identity[1])

    def save_identity(self, node_id: int, cluster_id: str) -> None:
        self.identity = (node_id, cluster_id)

    def append_entries(self, entries: list[Entry]) -> None:
        floor = self._floor()
        if floor > self._offset:
            # Entries the snapshot replaced are not the log (a crash came between its save
            # and the cut after it): gone for good before the log goes on, or a later
            # snapshot that the new entries match would bring them back.
            self.compact_prefix(floor)
        expected = self._offset + len(self._entries) + 1
        if entries and entries[0].index != expected:
            raise StorageCorruption(
                f"append of entry {entries[0].index} to a log that ends at {expected - 1}")
        self._entries.extend(entries)

    def truncate_suffix(self, index: int) -> None:
        del self._entries[max(0, index - self._offset - 1):]

    def compact_prefix(self, index: int) -> None:
        if index > self._offset:
            del self._entries[:index - self._offset]
            self._offset = index

    def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        lo = max(lo, self._floor() + 1)  # compacted entries are not the log any more
        out = self._entries[lo - self._offset - 1:max(hi - self._offset - 1, 0)]
        if max_bytes is not None and len(out) > 1:
            out = out[:kernels.count_within_bytes(out, max_bytes)]
        return out

    def save_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def save_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        self._snapshot = (meta, b"".join(iter(lambda: data.read(COPY_BYTES), b"")))

    def load_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        if self._snapshot is None:
            return None
        return self._snapshot[0], io.BytesIO(self._snapshot[1])


class AsyncMemoryStorage(MemoryStorage):
    """The same store behind coroutine methods: what an async storage engine looks like."""

    async def append_entries(self, entries: list[Entry]) -> None:  # type: ignore[override]
        MemoryStorage.append_entries(self, entries)

    async def truncate_suffix(self, index: int) -> None:  # type: ignore[override]
        MemoryStorage.truncate_suffix(self, index)

    async def save_hard_state(self, hard_state: HardState) -> None:  # type: ignore[override]
        MemoryStorage.save_hard_state(self, hard_state)

    async def read_entries(self, lo: int, hi: int,  # type: ignore[override]
                           max_bytes: int | None = None) -> list[Entry]:
        return MemoryStorage.read_entries(self, lo, hi, max_bytes)

    async def load_state(self) -> StorageState:  # type: ignore[override]
        return MemoryStorage.load_state(self)

    async def save_identity(self, node_id: int, cluster_id: str) -> None:  # type: ignore[override]
        MemoryStorage.save_identity(self, node_id, cluster_id)


