"""The simulator's disks: what survives a simulated crash, in memory or in a
``FileStorage`` directory."""
from __future__ import annotations

import io
from typing import Any

import msgspec

from fastraft.engine import AppendLog, CompactLog, TruncateLog
from fastraft.filestorage import FileStorage
from fastraft.messages import Entry, SnapshotMeta
from fastraft.storage import MemoryStorage


class SaveSnapshot(msgspec.Struct):
    meta: SnapshotMeta
    data: bytes


class Disk:
    """What survives a crash: only completed writes. They go to a ``MemoryStorage``, so
    every write the engine asks for also passes the storage contract (one it refuses is
    reported as a violation), and a restart reads the log back the way a node does."""

    __slots__ = ("store",)

    def __init__(self) -> None:
        self.store: Any = MemoryStorage()

    def write(self, cmd: Any) -> None:
        t = type(cmd)
        store = self.store
        if t is AppendLog:
            store.append_entries(cmd.entries)
        elif t is TruncateLog:
            store.truncate_suffix(cmd.index)
        elif t is CompactLog:
            store.compact_prefix(cmd.index)
        elif t is SaveSnapshot:
            store.save_snapshot(cmd.meta, io.BytesIO(cmd.data))
        else:
            store.save_hard_state(cmd.hard_state)

    def snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        loaded = self.store.load_snapshot()
        if loaded is None:
            return None
        with loaded[1] as reader:
            return loaded[0], reader.read()

    def commit_advanced(self, index: int) -> None:
        """Stamp ``index`` on the next append, where the storage records it."""
        hook = getattr(self.store, "commit_advanced", None)
        if hook is not None:
            hook(index)

    def last_entry(self) -> Entry | None:
        st = self.store.load_state()
        if st.last_index < st.first_index:
            return None
        last: Entry = self.store.read_entries(st.last_index, st.last_index + 1)[0]
        return last

    def crash(self) -> None:
        """The process died: what was written stays."""

    def reopen(self) -> None:
        """The process starts again."""

    def close(self) -> None:
        """The run is over."""


class _SyncFileStorage:
    """A ``FileStorage`` under the ``RaftStorage`` method names, calling its synchronous
    internals directly (the simulator has no event loop). Its own fsync is off: the
    simulated fsync is the durability point, and nothing unsynced ever reaches it."""

    def __init__(self, path: str) -> None:
        self.storage = st = FileStorage(path, sync=False)
        self.load_state = st.load_state
        self.append_entries = st._append_sync
        self.truncate_suffix = st._truncate_sync
        self.compact_prefix = st._compact_sync
        self.save_snapshot = st._save_snapshot_sync
        self.save_hard_state = st._save_state_sync
        self.load_snapshot = st._open_snapshot
        self.commit_advanced = st.commit_advanced

    def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return self.storage._read_sync(lo, hi, max_bytes)


class FileDisk(Disk):
    """The same on a ``FileStorage`` directory: a crash closes it, a restart opens it
    again through its recovery."""

    __slots__ = ("path", "closed")

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False
        self.store = _SyncFileStorage(path)

    def crash(self) -> None:
        self.store.storage.close()
        self.closed = True

    def reopen(self) -> None:
        if self.closed:
            self.store = _SyncFileStorage(self.path)
            self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.crash()
