"""``FileStorage``: a durable ``RaftStorage`` on local disk.

Layout of the directory::

    LOCK                         flock()ed while open: one process per directory
    state                        hard state + compaction point, replaced atomically
    snapshot                     the last snapshot's metadata, replaced atomically
    snapshot-<index>-<crc>.data  its data, streamed in; the name is set by ``snapshot``
    log-<first index>.seg        the log, append-only segments rolled at ``segment_bytes``

A segment is a sequence of records ``u32 length | u32 crc32(body) | body``, ``body`` being
one batch of consecutive entries in the batch-codec format. Each ``append_entries`` call
writes one record with one ``write`` and makes it durable with one ``fdatasync`` (the node
calls it once per event-loop iteration: group commit). All file work runs on one dedicated
thread, so the event loop keeps serving while the disk syncs.

Start-up scans the segments and checks every record. A torn or zero-filled record at the
very end of the last segment is what a crash mid-write leaves: it is truncated and logged.
A bad record anywhere else, a gap between segments, or an unreadable state or snapshot file
is corruption of acknowledged data: start-up stops with ``StorageCorruption`` naming the
file and offset, and nothing is truncated.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import msgspec

from fastraft import kernels
from fastraft.errors import DecodeError, FastRaftError, StorageCorruption
from fastraft.messages import Entry, HardState
from fastraft.snapshots import copy_stream
from fastraft.storage import SnapshotMeta, StorageState

log = logging.getLogger("fastraft.filestorage")

_HEAD = struct.Struct("<II")  # body length, crc32(body)
_SNAP_HEAD = struct.Struct("<IIQI")  # meta length, crc(meta), data length, crc(data)
_SEG_PREFIX, _SEG_SUFFIX = "log-", ".seg"
_SNAP_DATA_PREFIX = "snapshot-"


class StorageLocked(FastRaftError):
    """Another process has this storage directory open."""


class _State(msgspec.Struct, array_like=True):
    hard_state: HardState
    #: Entries up to here were compacted away (covered by a snapshot).
    compacted_index: int = 0
    compacted_term: int = 0


def _seg_name(first_index: int) -> str:
    return f"{_SEG_PREFIX}{first_index:020d}{_SEG_SUFFIX}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(_: bytes) -> None:
    pass


def _write_atomically(directory: str, name: str, data: bytes) -> None:
    """Replace ``name`` with ``data``: temp file, fsync, rename, fsync the directory."""
    tmp = os.path.join(directory, name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)


class FileStorage:
    """See the module docstring.

    ``sync=False`` skips every fsync. UNSAFE: a crash of the machine (not just the process)
    can then lose acknowledged writes and break Raft's guarantees. For benchmarks only.
    """

    def __init__(self, directory: str, *, segment_bytes: int = 64 << 20, sync: bool = True,
                 cache_records: int = 512) -> None:
        self.directory = os.path.abspath(directory)
        self.segment_bytes = segment_bytes
        self.sync = sync
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.directory, "LOCK"), os.O_RDWR | os.O_CREAT,
                                0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StorageLocked(f"{self.directory} is in use by another process; one "
                                "data directory per node") from None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal")
        # Records of the live log, in order: parallel arrays, one slot per record.
        self._rec_first = array("q")
        self._rec_last = array("q")
        self._rec_seg = array("q")  # first index of the segment holding the record
        self._rec_off = array("q")
        self._rec_len = array("q")
        self._segments: list[int] = []  # first index of each segment, ascending
        self._fds: dict[int, int] = {}
        self._tail_fd = -1
        self._tail_size = 0
        self._cache: OrderedDict[int, list[Entry]] = OrderedDict()
        self._cache_records = cache_records
        self._state = _State(HardState())
        self._snapshot: SnapshotMeta | None = None
        self._snapshot_path: str | None = None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        self._state = self._read_state()
        found = self._read_snapshot()
        if found is not None:
            self._snapshot, self._snapshot_path = found
        names = sorted(n for n in os.listdir(self.directory)
                       if n.startswith(_SEG_PREFIX) and n.endswith(_SEG_SUFFIX))
        firsts = []
        for n in names:
            try:
                firsts.append(int(n[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]))
            except ValueError:
                raise StorageCorruption(f"{os.path.join(self.directory, n)}: "
                                        "not a segment name") from None
        compacted = self._state.compacted_index
        # Segments wholly below the compaction point may survive a crash during compaction.
        while len(firsts) > 1 and firsts[1] <= compacted + 1:
            os.unlink(self._path(firsts.pop(0)))
        expected = None
        for k, first in enumerate(firsts):
            if expected is not None and first != expected:
                raise StorageCorruption(
                    f"{self._path(first)}: segment starts at index {first} but the previous "
                    f"one ends at {expected - 1}: a segment is missing")
            expected = self._scan_segment(first, last_segment=(k == len(firsts) - 1))
            self._segments.append(first)
        if self._segments:
            self._open_tail(self._segments[-1])
        if self._rec_first and self._rec_first[0] > compacted + 1:
            raise StorageCorruption(
                f"{self._path(self._segments[0])}: the log starts at index "
                f"{self._rec_first[0]} but entries after {compacted} were never compacted")

    def _scan_segment(self, first: int, last_segment: bool) -> int:
        """Index the records of one segment; returns the index after its last entry."""
        path = self._path(first)
        with open(path, "rb") as f:
            data = f.read()
        size = len(data)
        pos = 0
        expected = first
        while pos < size:
            torn = None
            if size - pos < _HEAD.size:
                torn = "a partial record header"
            else:
                length, crc = _HEAD.unpack_from(data, pos)
                end = pos + _HEAD.size + length
                if length == 0 and not any(data[pos:]):
                    torn = "zero-filled bytes"
                elif end > size:
                    torn = f"a record of {length} bytes cut short at {size - pos - _HEAD.size}"
                elif zlib.crc32(data[pos + _HEAD.size:end]) != crc:
                    if end == size:
                        torn = "a last record with a bad checksum"
                    else:
                        raise StorageCorruption(
                            f"{path}: record at offset {pos} fails its checksum; the log is "
                            "corrupt before its tail (restore this node from a replica)")
            if torn is not None:
                if not last_segment:
                    raise StorageCorruption(
                        f"{path}: {torn} at offset {pos} in a segment that is not the last")
                log.warning("%s: truncating %s at offset %d (%d bytes): a write that was "
                            "torn by a crash, never acknowledged", path, torn, pos, size - pos)
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                break
            body = memoryview(data)[pos + _HEAD.size:end]
            count, rec_first = self._batch_bounds(body, path, pos)
            if rec_first != expected:
                raise StorageCorruption(
                    f"{path}: record at offset {pos} starts at index {rec_first}, "
                    f"expected {expected}")
            self._push_record(rec_first, rec_first + count - 1, first, pos, end - pos)
            expected = rec_first + count
            pos = end
        return expected

    @staticmethod
    def _batch_bounds(body: memoryview, path: str, pos: int) -> tuple[int, int]:
        if len(body) < 4 + 21:
            raise StorageCorruption(f"{path}: record at offset {pos} holds no entries")
        count = int.from_bytes(body[:4], "little")
        rec_first = int.from_bytes(body[12:20], "little")
        if count == 0:
            raise StorageCorruption(f"{path}: record at offset {pos} holds no entries")
        return count, rec_first

    def _read_state(self) -> _State:
        path = os.path.join(self.directory, "state")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _State(HardState())
        if len(data) < _HEAD.size:
            raise StorageCorruption(f"{path}: truncated at {len(data)} bytes (offset 0)")
        length, crc = _HEAD.unpack_from(data)
        body = data[_HEAD.size:]
        if len(body) != length or zlib.crc32(body) != crc:
            raise StorageCorruption(f"{path}: truncated or fails its checksum (offset 0, "
                                    f"{len(data)} bytes)")
        return msgspec.msgpack.decode(body, type=_State)

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
            snap_meta = msgspec.msgpack.decode(meta, type=SnapshotMeta)
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

    # ------------------------------------------------------------------ the hook

    def load_state(self) -> StorageState:
        floor = self._floor()
        last = self._rec_last[-1] if self._rec_last else floor
        return StorageState(hard_state=self._state.hard_state, snapshot=self._snapshot,
                            first_index=floor + 1, last_index=max(last, floor))

    def _floor(self) -> int:
        """The last index compacted or covered by the snapshot: the log starts after it."""
        covered = self._snapshot.last_included_index if self._snapshot is not None else 0
        return max(self._state.compacted_index, covered)

    async def append_entries(self, entries: list[Entry]) -> None:
        if entries:
            await self._run(self._append_sync, entries)

    async def truncate_suffix(self, index: int) -> None:
        await self._run(self._truncate_sync, index)

    async def compact_prefix(self, index: int) -> None:
        await self._run(self._compact_sync, index)

    async def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return await self._run(self._read_sync, lo, hi, max_bytes)

    async def save_hard_state(self, hard_state: HardState) -> None:
        await self._run(self._save_state_sync, hard_state)

    async def save_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        await self._run(self._save_snapshot_sync, meta, data)

    async def load_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        return await self._run(self._open_snapshot)

    def close(self) -> None:
        """Close files and release the directory lock. Not done by ``RaftNode.stop()``."""
        self._executor.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ file work

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _path(self, seg_first: int) -> str:
        return os.path.join(self.directory, _seg_name(seg_first))

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
        self._cache.clear()

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

    def _open_tail(self, seg: int) -> None:
        self._tail_fd = self._fd(seg)
        self._tail_size = os.fstat(self._tail_fd).st_size

    def _append_sync(self, entries: list[Entry]) -> None:
        first, last = entries[0].index, entries[-1].index
        floor = self._floor()
        if self._rec_last and self._rec_last[-1] < floor:
            # Every record is covered by a snapshot saved after them (a crash came between
            # saving it and compacting): compact them away, or the log would have a gap.
            self._compact_sync(floor)
        expected = self._rec_last[-1] + 1 if self._rec_last else floor + 1
        if first != expected:
            raise StorageCorruption(
                f"{self.directory}: append of entry {first} to a log that ends at "
                f"{expected - 1}")
        body = kernels.encode_entries(entries)
        record = _HEAD.pack(len(body), zlib.crc32(body)) + body
        new_segment = not self._segments or (
            self._tail_size > 0 and self._tail_size + len(record) > self.segment_bytes)
        if new_segment:
            self._segments.append(first)
            self._open_tail(first)
            if self.sync:
                _fsync_dir(self.directory)
        off = self._tail_size
        view = memoryview(record)
        while view:
            view = view[os.pwrite(self._tail_fd, view, off + len(record) - len(view)):]
        if self.sync:
            os.fdatasync(self._tail_fd)
        self._tail_size += len(record)
        self._push_record(first, last, self._segments[-1], off, len(record))

    def _truncate_sync(self, index: int) -> None:
        if index <= self._state.compacted_index:
            raise StorageCorruption(f"cannot truncate from {index}: compacted up to "
                                    f"{self._state.compacted_index}")
        # Records a newer snapshot covers are not part of the log any more (a snapshot
        # installed over a conflicting log truncates from below it): they are compacted
        # later, only what follows the snapshot is cut here.
        first_live = self._floor() + 1
        index = max(index, first_live)
        if not self._rec_last or index > self._rec_last[-1]:
            return
        k = bisect_right(self._rec_first, index) - 1
        keep: list[Entry] = []
        if k >= 0 and self._rec_first[k] < index:
            first = self._rec_first[k]
            keep = self._record_entries(k)[max(first_live - first, 0):index - first]
        k = max(k, 0)
        seg, off = self._rec_seg[k], self._rec_off[k]
        for later in [s for s in self._segments if s > seg]:
            self._delete_segment(later)
            self._segments.remove(later)
        self._drop_records_from(k)
        self._open_tail(seg)
        os.ftruncate(self._tail_fd, off)
        self._tail_size = off
        if keep:
            self._append_sync(keep)  # rewrites the surviving head of the cut record
        elif self.sync:
            os.fsync(self._tail_fd)
        if self.sync:
            _fsync_dir(self.directory)

    def _compact_sync(self, index: int) -> None:
        covered = bool(self._rec_first) and self._rec_first[0] <= index
        if index <= self._state.compacted_index and not covered:
            return
        if index > self._state.compacted_index:
            term = 0
            if covered and index <= self._rec_last[-1]:
                term = self._entry_term(index)
            elif self._snapshot is not None and self._snapshot.last_included_index == index:
                term = self._snapshot.last_included_term
            self._state = _State(self._state.hard_state, index, term)
            self._write_state()
        while len(self._segments) > 1 and self._segments[1] <= index + 1:
            self._delete_segment(self._segments.pop(0))
        k = 0
        while k < len(self._rec_last) and self._rec_last[k] <= index:
            k += 1
        for arr in (self._rec_first, self._rec_last, self._rec_seg, self._rec_off,
                    self._rec_len):
            del arr[:k]
        self._cache.clear()
        if not self._rec_first and self._segments:
            # Compacted past the end of the log (a snapshot beyond it): the log goes on
            # after ``index`` in a new segment, so no segment ever holds a gap.
            for seg in self._segments:
                self._delete_segment(seg)
            self._segments = []
            self._tail_fd, self._tail_size = -1, 0
            if self.sync:
                _fsync_dir(self.directory)

    def _entry_term(self, index: int) -> int:
        k = bisect_right(self._rec_first, index) - 1
        return self._record_entries(k)[index - self._rec_first[k]].term

    def _read_sync(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
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
        cached = self._cache.get(first)
        if cached is not None:
            self._cache.move_to_end(first)
            return cached
        seg, off, length = self._rec_seg[k], self._rec_off[k], self._rec_len[k]
        data = os.pread(self._fd(seg), length, off)
        if len(data) != length:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off} is short")
        body_len, crc = _HEAD.unpack_from(data)
        body = memoryview(data)[_HEAD.size:]
        if body_len != len(body) or zlib.crc32(body) != crc:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off} fails its "
                                    "checksum")
        try:
            entries = kernels.decode_entries(body)
        except DecodeError as exc:
            raise StorageCorruption(f"{self._path(seg)}: record at offset {off}: {exc}") \
                from None
        self._cache[first] = entries
        if len(self._cache) > self._cache_records:
            self._cache.popitem(last=False)
        return entries

    def _write_state(self) -> None:
        body = msgspec.msgpack.encode(self._state)
        data = _HEAD.pack(len(body), zlib.crc32(body)) + body
        if self.sync:
            _write_atomically(self.directory, "state", data)
        else:
            with open(os.path.join(self.directory, "state"), "wb") as f:
                f.write(data)

    def _save_state_sync(self, hard_state: HardState) -> None:
        self._state = _State(hard_state, self._state.compacted_index,
                             self._state.compacted_term)
        self._write_state()

    def _save_snapshot_sync(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Stream the data into its own file, then switch the ``snapshot`` metadata to it
        atomically; a crash in between leaves the old snapshot in force."""
        tmp = os.path.join(self.directory, _SNAP_DATA_PREFIX + "tmp")
        with open(tmp, "wb") as f:
            size, crc = copy_stream(data, f.write)
            f.flush()
            os.fsync(f.fileno())
        data_path = self._snapshot_data_path(meta.last_included_index, crc)
        os.replace(tmp, data_path)
        m = msgspec.msgpack.encode(meta)
        _write_atomically(self.directory, "snapshot",
                          _SNAP_HEAD.pack(len(m), zlib.crc32(m), size, crc) + m)
        old = self._snapshot_path
        self._snapshot, self._snapshot_path = meta, data_path
        if old is not None and old != data_path:
            os.unlink(old)

    def _open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        if self._snapshot is None or self._snapshot_path is None:
            return None
        return self._snapshot, open(self._snapshot_path, "rb")
