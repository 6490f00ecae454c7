"""The log store ``FileStorage`` and ``SharedWAL`` share: per log, the hard state and
compaction point, the snapshot files, and an index of the log's records (where each one
is) with a cache of decoded records; each subclass keeps the segments the records are in.
"""
from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import msgspec

from fastraft import kernels
from fastraft.errors import DecodeError, StorageCorruption, StorageFailed
from fastraft.messages import Entry, HardState
from fastraft.snapshots import copy_stream
from fastraft.storage import SnapshotMeta, StorageState
from fastraft.walformat import (
    _Damage,
    _fsync_dir,
    _Identity,
    _record_at,
    _State,
    _write_atomically,
)

_SNAP_HEAD = struct.Struct("<IIQI")  # meta length, crc(meta), data length, crc(data)
_SNAP_DATA_PREFIX = "snapshot-"

_T = TypeVar("_T")


def _discard(_: bytes) -> None:
    pass


class _RecordCache:
    """Decoded records, least recently used first, within ``limit`` bytes (counted as
    the records they were decoded from; one record may exceed it). Keys are (owner,
    first index): the groups of a SharedWAL share one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[tuple[int, int], tuple[list[Entry], int]] = OrderedDict()

    def get(self, key: tuple[int, int]) -> list[Entry] | None:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[0]

    def put(self, key: tuple[int, int], entries: list[Entry], length: int) -> None:
        self._items[key] = (entries, length)
        self.size += length
        while self.size > self.limit and len(self._items) > 1:
            self.size -= self._items.popitem(last=False)[1][1]

    def forget(self, owner: int) -> None:
        for key in [k for k in self._items if k[0] == owner]:
            self.size -= self._items.pop(key)[1]


class _SegmentFiles:
    """Open segment files by segment, opened when first used."""

    _fds: dict[int, int]

    def _path(self, seg: int) -> str:
        raise NotImplementedError

    def _fd(self, seg: int) -> int:
        fd = self._fds.get(seg)
        if fd is None:
            fd = self._fds[seg] = os.open(self._path(seg), os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _delete_segment(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        os.unlink(self._path(seg))

    def _recover(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _open(self) -> None:
        """Recover; on failure release everything opened (the directory lock too)."""
        self._recovered = False
        try:
            self._recover()
        except BaseException:
            self.close()
            raise
        self._recovered = True

    def _close_segments(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _LogStore:
    """What a file-backed log store is made of, whatever holds its records: the hard
    state and compaction point (``_State``), the owner, the snapshot files in
    ``directory``, and an index of the log's records (one slot per record: first and
    last index, segment, offset, length) with a cache of decoded records. A subclass
    keeps the segments: ``FileStorage`` its own, ``SharedWAL`` one set for many groups.
    """

    #: Bytes at the start of a record's body that are not entries (a group's tag).
    _BODY_TAG = 0
    #: The thread reads run on (never behind a write or an fsync).
    _reader: ThreadPoolExecutor

    def __init__(self, directory: str, sync: bool, cache: _RecordCache, cache_owner: int,
                 lock: threading.RLock) -> None:
        self.directory = directory
        self.sync = sync
        self._lock = lock
        # Records of the live log, in order: parallel arrays, one slot per record.
        self._rec_first = array("q")
        self._rec_last = array("q")
        self._rec_seg = array("q")  # the segment holding the record
        self._rec_off = array("q")
        self._rec_len = array("q")
        self._cache = cache
        self._cache_owner = cache_owner
        self._state = _State(HardState())
        self._identity: _Identity | None = None
        self._snapshot: SnapshotMeta | None = None
        self._snapshot_path: str | None = None
        self._snapshot_replaces_log = False
        #: The commit index to stamp on the next record (``commit_advanced``), and the
        #: highest one that is durable (stamped on a record, or in ``state``).
        self._mark_wanted = 0
        self._mark_durable = 0

    def _fd(self, seg: int) -> int:
        raise NotImplementedError

    def _path(self, seg: int) -> str:
        raise NotImplementedError

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        raise NotImplementedError

    def _is_closed(self) -> bool:
        raise NotImplementedError

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        if self._is_closed():  # the executor's RuntimeError would not say what happened
            raise StorageFailed(f"{self.directory}: the storage is closed")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _read_snapshot(self) -> tuple[SnapshotMeta, str] | None:
        """The snapshot's metadata and data file, both checked; stray data files left by a
        crash in the middle of a save are deleted."""
        path = os.path.join(self.directory, "snapshot")
        try:
            with open(path, "rb") as f:
                head = f.read(_SNAP_HEAD.size)
                if len(head) < _SNAP_HEAD.size:
                    raise StorageCorruption(f"{path}: truncated header (offset 0)")
                meta_len, meta_crc, data_len, data_crc = _SNAP_HEAD.unpack(head)
                meta = f.read(meta_len)
        except FileNotFoundError:
            found = None
        else:
            if len(meta) != meta_len or zlib.crc32(meta) != meta_crc:
                raise StorageCorruption(f"{path}: metadata fails its checksum "
                                        f"(offset {_SNAP_HEAD.size})")
            try:
                snap_meta = msgspec.msgpack.decode(meta, type=SnapshotMeta)
            except (msgspec.MsgspecError, ValueError) as exc:
                raise StorageCorruption(f"{path}: unreadable metadata (offset "
                                        f"{_SNAP_HEAD.size}): {exc}") from None
            data_path = self._snapshot_data_path(snap_meta.last_included_index, data_crc)
            self._check_snapshot_data(data_path, data_len, data_crc)
            found = snap_meta, data_path
        keep = os.path.basename(found[1]) if found else None
        for name in os.listdir(self.directory):
            if name.startswith(_SNAP_DATA_PREFIX) and name != keep:
                os.unlink(os.path.join(self.directory, name))
        return found

    @staticmethod
    def _check_snapshot_data(path: str, size: int, crc: int) -> None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise StorageCorruption(f"{path}: missing; the snapshot metadata names it "
                                    "(offset 0)") from None
        with f:
            copied, actual = copy_stream(f, _discard)
        if copied != size:
            raise StorageCorruption(f"{path}: {copied} bytes where the snapshot metadata says "
                                    f"{size} (offset {min(copied, size)})")
        if actual != crc:
            raise StorageCorruption(f"{path}: fails its checksum (offset 0, {size} bytes)")

    def _snapshot_data_path(self, index: int, crc: int) -> str:
        # Named by content: saving the same snapshot twice rewrites the same bytes.
        return os.path.join(self.directory, f"{_SNAP_DATA_PREFIX}{index}-{crc:08x}.data")

    def load_state(self) -> StorageState:
        floor = self._floor()
        last = self._rec_last[-1] if self._rec_last else floor
        ident = self._identity
        hs = self._state.hard_state
        if self._mark_durable > hs.commit:  # the records know a later commit index
            hs = HardState(hs.current_term, hs.voted_for, self._mark_durable, hs.recovering)
        return StorageState(hard_state=hs, snapshot=self._snapshot,
                            first_index=floor + 1, last_index=max(last, floor),
                            node_id=ident.node_id if ident else 0,
                            cluster_id=ident.cluster_id if ident else "")

    def _floor(self) -> int:
        """The last index compacted, or replaced by the snapshot: the log starts after it."""
        if self._snapshot_replaces_log and self._snapshot is not None:
            return max(self._state.compacted_index, self._snapshot.last_included_index)
        return self._state.compacted_index

    def _last(self) -> int:
        """The last index the records hold (the floor when there are none)."""
        return self._rec_last[-1] if self._rec_last else self._floor()

    def _mark_recovering(self) -> int:
        """Repair: this store may have lost entries it acknowledged. It keeps its term and
        vote, its commit mark goes back to what its log holds (returned), and it does not
        vote until a leader has caught it up."""
        held = max(self._last(), self._floor())
        hs = self._state.hard_state
        self._state = _State(HardState(hs.current_term, hs.voted_for, min(hs.commit, held),
                                       True),
                             self._state.compacted_index, self._state.compacted_term)
        return held

    def _compaction_due(self) -> bool:
        """Whether an append must compact up to the floor first: a snapshot saved after
        the records replaced them, or the log ended before it (a crash came between
        saving it and compacting). Else the log would have a gap, or would start after a
        compaction point its recovery refuses ("entries after it were never compacted")."""
        return self._floor() > self._state.compacted_index

    def _covered_index(self) -> int:
        """The last index the log need not hold: compacted, or in the snapshot. A log may
        start right after a snapshot its compaction point never reached: an append after a
        crash between saving it and compacting left it so, before appends compacted up to
        the snapshot first."""
        snap = self._snapshot
        compacted = self._state.compacted_index
        return max(compacted, snap.last_included_index) if snap is not None else compacted

    def _refresh_floor(self) -> None:
        """Whether the snapshot replaces the records up to it. Not when the log holds the
        snapshot's last entry with its term (§7: the log matches it; those records stay
        the log until compacted, which retention may put off); but a snapshot installed
        over a log that ends before it or disagrees with it does, even before the
        compaction that follows it (a crash may come in between)."""
        snap = self._snapshot
        replaces = False
        if snap is not None and snap.last_included_index > self._state.compacted_index:
            index = snap.last_included_index
            held = bool(self._rec_first) and self._rec_first[0] <= index <= self._rec_last[-1]
            replaces = not held or self._entry_term(index) != snap.last_included_term
        self._snapshot_replaces_log = replaces

    def commit_advanced(self, index: int) -> None:
        """The commit index reached ``index``: stamped on the next record written."""
        if index > self._mark_wanted:
            self._mark_wanted = index

    async def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return await self._on(self._reader, self._read_sync, lo, hi, max_bytes)

    async def save_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        await self._run(self._save_snapshot_sync, meta, data)

    async def load_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        return await self._run(self._open_snapshot)

    def _push_record(self, first: int, last: int, seg: int, off: int, length: int) -> None:
        self._rec_first.append(first)
        self._rec_last.append(last)
        self._rec_seg.append(seg)
        self._rec_off.append(off)
        self._rec_len.append(length)

    def _drop_records_from(self, k: int) -> None:
        for arr in (self._rec_first, self._rec_last, self._rec_seg, self._rec_off,
                    self._rec_len):
            del arr[k:]
        self._clear_cache()

    def _clear_cache(self) -> None:
        self._cache.forget(self._cache_owner)

    def _entry_term(self, index: int) -> int:
        k = bisect_right(self._rec_first, index) - 1
        return self._record_entries(k)[index - self._rec_first[k]].term

    def _read_sync(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        with self._lock:
            return self._read_locked(lo, hi, max_bytes)

    def _read_locked(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        lo = max(lo, self._floor() + 1)
        out: list[Entry] = []
        if not self._rec_first or lo >= hi:
            return out
        k = max(bisect_right(self._rec_first, lo) - 1, 0)
        left = max_bytes
        while k < len(self._rec_first) and self._rec_first[k] < hi:
            first = self._rec_first[k]
            part = self._record_entries(k)[max(lo - first, 0):hi - first]
            if left is not None:
                n = kernels.count_within_bytes(part, left)
                if out and n == 1 and len(part[0].data) > left:
                    n = 0  # the first entry is always returned, never one past the budget
                if n < len(part):
                    out.extend(part[:n])
                    return out
                left -= sum(len(e.data) for e in part)
            out.extend(part)
            k += 1
        return out

    def _record_entries(self, k: int) -> list[Entry]:
        first = self._rec_first[k]
        cached = self._cache.get((self._cache_owner, first))
        if cached is not None:
            return cached
        seg, off, length = self._rec_seg[k], self._rec_off[k], self._rec_len[k]
        data = os.pread(self._fd(seg), length, off)
        if len(data) != length:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off} is short")
        try:
            _, body, _ = _record_at(data, 0)
            entries: list[Entry] = kernels.decode_entries(body[self._BODY_TAG:])
        except _Damage as damage:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off}: "
                                    f"{damage.what}") from None
        except DecodeError as exc:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off}: {exc}") \
                from None
        held = self._rec_last[k] - first + 1
        if len(entries) > held:  # a record a later truncation cut (a shared WAL's)
            entries = entries[:held]
        self._cache.put((self._cache_owner, first), entries, length)
        return entries

    def _truncation_start(self, index: int) -> int | None:
        """Where a truncation from ``index`` starts cutting (None: nothing held there);
        StorageCorruption if it would cut compacted or committed entries."""
        if index <= self._state.compacted_index:
            raise StorageCorruption(f"cannot truncate from {index}: compacted up to "
                                    f"{self._state.compacted_index}")
        # Records a newer snapshot covers are not part of the log any more (a snapshot
        # installed over a conflicting log truncates from below it): they are compacted
        # later, only what follows the snapshot is cut here.
        index = max(index, self._floor() + 1)
        if not self._rec_last or index > self._rec_last[-1]:
            return None
        if index <= self._mark_durable:
            raise StorageCorruption(f"{self.directory}: truncation from {index} would cut "
                                    f"entries up to {self._mark_durable}, which were committed")
        return index

    def _compacts(self, index: int) -> bool:
        """Whether compacting up to ``index`` moves the compaction point or forgets
        records."""
        covered = bool(self._rec_first) and self._rec_first[0] <= index
        return index > self._state.compacted_index or covered

    def _compacted_state(self, index: int) -> _State | None:
        """The state once compacted up to ``index`` (None: the point does not move)."""
        if index <= self._state.compacted_index:
            return None
        term = 0
        if self._rec_first and self._rec_first[0] <= index <= self._rec_last[-1]:
            term = self._entry_term(index)
        elif self._snapshot is not None and self._snapshot.last_included_index == index:
            term = self._snapshot.last_included_term
        hs = self._state.hard_state
        # The records that held the commit mark may go: the state keeps it.
        return _State(HardState(hs.current_term, hs.voted_for,
                                max(hs.commit, self._mark_durable), hs.recovering),
                      index, term)

    def _forget_records_to(self, index: int) -> None:
        """Forget the records wholly at or below ``index`` (compacted)."""
        k = 0
        while k < len(self._rec_last) and self._rec_last[k] <= index:
            k += 1
        for arr in (self._rec_first, self._rec_last, self._rec_seg, self._rec_off,
                    self._rec_len):
            del arr[:k]
        self._clear_cache()

    def _save_snapshot_sync(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Stream the data into its own file, then switch the ``snapshot`` metadata to it
        atomically; a crash in between leaves the old snapshot in force."""
        tmp = os.path.join(self.directory, _SNAP_DATA_PREFIX + "tmp")
        with open(tmp, "wb") as f:
            size, crc = copy_stream(data, f.write)
            f.flush()
            if self.sync:
                os.fsync(f.fileno())
        data_path = self._snapshot_data_path(meta.last_included_index, crc)
        os.replace(tmp, data_path)
        if self.sync:  # the data's name, durable before the metadata naming it
            _fsync_dir(self.directory)
        m = msgspec.msgpack.encode(meta)
        _write_atomically(self.directory, "snapshot",
                          _SNAP_HEAD.pack(len(m), zlib.crc32(m), size, crc) + m, self.sync)
        old = self._snapshot_path
        with self._lock:
            self._snapshot, self._snapshot_path = meta, data_path
            self._refresh_floor()
        if old is not None and old != data_path:
            os.unlink(old)

    def _open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        if self._snapshot is None or self._snapshot_path is None:
            return None
        return self._snapshot, open(self._snapshot_path, "rb")

