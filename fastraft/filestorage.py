"""``FileStorage``: a durable ``RaftStorage`` on local disk.

Layout of the directory::

    LOCK                         flock()ed while open: one process per directory
    identity                     node id and cluster id, written once (``save_identity``)
    state                        hard state (term, vote, commit mark, recovering) and the
                                 compaction point, replaced atomically; exists from creation
    snapshot                     the last snapshot's metadata, replaced atomically
    snapshot-<index>-<crc>.data  its data, streamed in; the name is set by ``snapshot``
    log-<first index>.seg        the log, append-only segments rolled at ``segment_bytes``
    truncation                   only while a truncation rewrites the head of a record

A segment is a sequence of records, each one batch of consecutive entries (batch-codec
``body``) behind a 24-byte header::

    u32 magic | u32 len(body) | u64 commit mark | u32 crc32(body) | u32 crc32(header[:20])

Each ``append_entries`` call writes one record with one ``write`` and makes it durable
with one ``fdatasync`` before the next is written (the node calls it once per event-loop
iteration: group commit). All file work runs on one dedicated thread. The commit mark is
the commit index the node knew when it wrote the record (``commit_advanced``): every entry
up to it was committed, so recovery may never lose it.

Recovery (etcd's WAL rules; see docs/storage.md): every record is checked. Only the last
write can have been interrupted — each record is fsynced before the next is written — so
only bytes at the very end of the last segment may be dropped, and only when they look
like an interrupted write: a header cut short, zeros to the end of the file, a body cut
short by the end of the file, or a record whose bad checksum is explained by a 512-byte
sector that never reached the disk (all zeros) with nothing written after it. No valid
record may follow, and no entry up to the commit mark may be lost. Anything else —
a bad length or checksum anywhere else, a missing segment, a missing or damaged ``state``
or snapshot file, a log shorter than its commit mark — stops start-up with
``StorageCorruption`` naming the file, the offset and what was expected; nothing is
changed on disk. ``FileStorage(..., repair=True)`` instead keeps the log up to the last
intact record and marks the node ``recovering`` (docs/storage.md, "Repairing a node").
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
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
from fastraft.errors import (
    ConfigError,
    DecodeError,
    FastRaftError,
    StorageCorruption,
    StorageFailed,
    StorageOwnedElsewhere,
)
from fastraft.messages import Entry, HardState
from fastraft.snapshots import copy_stream
from fastraft.storage import SnapshotMeta, StorageState

log = logging.getLogger("fastraft.filestorage")

_MAGIC = 0x32575246  # b"FRW2", little-endian: where a record starts
_HEAD = struct.Struct("<IIQII")  # magic, body length, commit mark, crc(body), crc(head)
_HEAD_CHECKED = 20  # the header bytes its own crc covers
_FILE_HEAD = struct.Struct("<II")  # body length, crc32(body): the state and identity files
_SNAP_HEAD = struct.Struct("<IIQI")  # meta length, crc(meta), data length, crc(data)
_SEG_PREFIX, _SEG_SUFFIX = "log-", ".seg"
#: A ``SharedWAL``'s segments (sharedwal.py): told apart from these in ``_lock_directory``.
_WAL_SEG_PREFIX = "wal-"
_SNAP_DATA_PREFIX = "snapshot-"
_TRUNCATION = "truncation"
_SECTOR = 512
_MAGIC_BYTES = struct.pack("<I", _MAGIC)


class StorageLocked(FastRaftError):
    """Another process has this storage directory open."""


class _State(msgspec.Struct, array_like=True):
    hard_state: HardState
    #: Entries up to here were compacted away (covered by a snapshot).
    compacted_index: int = 0
    compacted_term: int = 0


class _Identity(msgspec.Struct, array_like=True):
    node_id: int
    cluster_id: str


class _Truncation(msgspec.Struct, array_like=True):
    """A cut inside a record under way (``FileStorage._rewrite_tail``): segment
    ``segment`` is cut at ``offset`` and ``record`` written there."""
    segment: int
    offset: int
    record: bytes


_S = TypeVar("_S")
_T = TypeVar("_T")
#: Where recovery cuts the log: (segment, offset, what was found, torn by a crash).
_CutAt = tuple[int, int, str, bool]


class _Damage(Exception):
    """A record that is not intact, at ``pos`` of a segment: ``what`` was found, and
    whether it is shaped like an interrupted write (``torn``)."""

    def __init__(self, pos: int, what: str, torn: bool) -> None:
        super().__init__(what)
        self.pos = pos
        self.what = what
        self.torn = torn


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


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]


def _cut_and_write(fd: int, offset: int, record: bytes, sync: bool) -> None:
    """Cut the file at ``offset`` and write ``record`` there (a truncation's rewrite)."""
    os.ftruncate(fd, offset)
    _write_at(fd, record, offset)
    if sync:
        os.fdatasync(fd)


def _write_atomically(directory: str, name: str, data: bytes, sync: bool = True) -> None:
    """Replace ``name`` with ``data``: temp file, fsync, rename, fsync the directory."""
    tmp = os.path.join(directory, name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, name))
    if sync:
        _fsync_dir(directory)


def _read_checked(path: str, struct_type: type[_S]) -> _S | None:
    """A small file written by ``_write_checked``; None if missing, StorageCorruption if
    damaged."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _FILE_HEAD.size:
        raise StorageCorruption(f"{path}: truncated at {len(data)} bytes (offset 0)")
    length, crc = _FILE_HEAD.unpack_from(data)
    body = data[_FILE_HEAD.size:]
    if len(body) != length or zlib.crc32(body) != crc:
        raise StorageCorruption(f"{path}: truncated or fails its checksum (offset 0, "
                                f"{len(data)} bytes, expected {length + _FILE_HEAD.size})")
    try:
        return msgspec.msgpack.decode(body, type=struct_type)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise StorageCorruption(f"{path}: unreadable (offset {_FILE_HEAD.size}): {exc}") \
            from None


def _checked(value: object) -> bytes:
    body = msgspec.msgpack.encode(value)
    return _FILE_HEAD.pack(len(body), zlib.crc32(body)) + body


def _zero_sector_within(data: bytes, lo: int, hi: int) -> bool:
    """Whether some 512-byte-aligned sector overlapping ``[lo, hi)`` holds only zeros
    (as far as the file goes): the mark of a write that did not reach the disk whole."""
    start = lo - lo % _SECTOR
    while start < hi and start < len(data):
        chunk = data[start:min(start + _SECTOR, len(data))]
        if chunk.count(0) == len(chunk):
            return True
        start += _SECTOR
    return False


#: How a node on each kind of storage is started.
_STARTED = {"FileStorage": "the log of a node of one group: fastraft node without --groups",
            "SharedWAL": "the logs of a node of several groups: fastraft node --groups N"}


def _storage_kind(name: str) -> str | None:
    """The kind of storage a file of a data directory belongs to, if only one has it."""
    if name == "state" or name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX):
        return "FileStorage"
    if name.startswith(_WAL_SEG_PREFIX) and name.endswith(_SEG_SUFFIX):
        return "SharedWAL"
    return None


def _make_directory(directory: str, sync: bool) -> None:
    """Create ``directory`` and any missing parent, each new name synced in its parent:
    a power cut must not take away a node's directory and all it acknowledged."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent != directory:
        _make_directory(parent, sync)
    try:
        os.mkdir(directory)
    except FileExistsError:  # made meanwhile, or not a directory (os.open says so next)
        return
    if sync:
        _fsync_dir(parent)


def _lock_directory(directory: str, kind: str, sync: bool) -> int:
    """Create ``directory`` if needed and flock its LOCK file: one process at a time. A
    directory of the other kind of storage is refused: opened, it would look empty, and
    its node would start afresh (with --init, founding a new cluster)."""
    _make_directory(directory, sync)
    fd = os.open(os.path.join(directory, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageLocked(f"{directory} is in use by another process; one "
                            "data directory per node") from None
    for name in sorted(os.listdir(directory)):
        other = _storage_kind(name)
        if other is not None and other != kind:
            os.close(fd)
            raise StorageOwnedElsewhere(
                f"{directory} holds a {other} ({name}: {_STARTED[other]}), not a {kind}; "
                "start the node as before")
    return fd


def _record_at(data: bytes, pos: int) -> tuple[int, memoryview, int]:
    """The record at ``pos``: (end, body, commit mark), or ``_Damage``."""
    size = len(data)
    if size - pos < _HEAD.size:
        raise _Damage(pos, f"a record header cut short ({size - pos} bytes)", True)
    magic, length, mark, crc, head_crc = _HEAD.unpack_from(data, pos)
    if zlib.crc32(data[pos:pos + _HEAD_CHECKED]) != head_crc or magic != _MAGIC:
        if data.count(0, pos) == size - pos:
            raise _Damage(pos, f"zero-filled bytes to the end of the file ({size - pos} "
                          "bytes)", True)
        torn = _zero_sector_within(data, pos, pos + _HEAD.size)
        raise _Damage(pos, "a record header that fails its checksum", torn)
    end = pos + _HEAD.size + length
    if end > size:
        raise _Damage(pos, f"a record of {length} bytes cut short at "
                           f"{size - pos - _HEAD.size}", True)
    body = memoryview(data)[pos + _HEAD.size:end]
    if zlib.crc32(body) != crc:
        torn = (_zero_sector_within(data, pos + _HEAD.size, end)
                and data.count(0, end) == size - end)
        raise _Damage(pos, "a record that fails its checksum", torn)
    return end, body, mark

def _valid_record_after(data: bytes, start: int) -> bool:
    """Whether an intact record starts anywhere at or after ``start``."""
    pos = data.find(_MAGIC_BYTES, start)
    while pos >= 0:
        try:
            _record_at(data, pos)
            return True
        except _Damage:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    return False


def _batch_bounds(body: memoryview, pos: int) -> tuple[int, int]:
    """(how many entries, first index) of a record's batch-codec body at ``pos``."""
    count = int.from_bytes(body[:4], "little") if len(body) >= 4 + 21 else 0
    if count == 0:
        raise _Damage(pos, "a record that holds no entries", False)
    return count, int.from_bytes(body[12:20], "little")


def _record(body: bytes, mark: int) -> bytes:
    """A record: the header (with its checksums and the commit mark), then ``body``."""
    head = bytearray(_HEAD.pack(_MAGIC, len(body), mark, zlib.crc32(body), 0))
    struct.pack_into("<I", head, _HEAD_CHECKED, zlib.crc32(head[:_HEAD_CHECKED]))
    return bytes(head) + body


def check_options(directory: object, segment_bytes: object, cache_bytes: object) -> None:
    """``ConfigError`` unless ``directory`` is a path, ``segment_bytes`` a positive int and
    ``cache_bytes`` an int of at least 0 (``FileStorage``, ``SharedWAL``)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"the directory is a path, not {type(directory).__name__}")
    for name, value, least in (("segment_bytes", segment_bytes, 1),
                               ("cache_bytes", cache_bytes, 0)):
        if type(value) is not int or value < least:
            raise ConfigError(f"{name} must be an int of at least {least}, got {value!r}")


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


class FileStorage(_SegmentFiles, _LogStore):
    """See the module docstring.

    ``sync=False`` skips every fsync. UNSAFE: a crash of the machine (not just the process)
    can then lose acknowledged writes and break Raft's guarantees. For benchmarks only.
    ``repair=True`` opens a damaged directory by keeping what is intact (see the module
    docstring); use it only as docs/storage.md says.
    """

    def __init__(self, directory: str, *, segment_bytes: int = 64 << 20, sync: bool = True,
                 cache_bytes: int = 8 << 20, repair: bool = False) -> None:
        check_options(directory, segment_bytes, cache_bytes)
        directory = os.path.abspath(directory)
        self._lock_fd = _lock_directory(directory, "FileStorage", sync)
        super().__init__(directory, sync, _RecordCache(cache_bytes), 0, threading.RLock())
        self.segment_bytes = segment_bytes
        self.repair = repair
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal")
        self._closed = False
        # Reads run on a thread of their own, so a follower's catch-up never waits behind
        # an fsync, nor an fsync behind a long read; the lock covers the record index,
        # the file descriptors and the cache, never a write or an fsync.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal-read")
        self._segments: list[int] = []  # first index of each segment, ascending
        self._fds: dict[int, int] = {}
        self._tail_fd = -1
        self._tail_size = 0
        self._open()

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        self._finish_truncation()
        names = sorted(n for n in os.listdir(self.directory)
                       if n.startswith(_SEG_PREFIX) and n.endswith(_SEG_SUFFIX))
        state_path = os.path.join(self.directory, "state")
        state = _read_checked(state_path, _State)
        snapshot_exists = os.path.exists(os.path.join(self.directory, "snapshot"))
        if state is None:
            if names or snapshot_exists:
                raise StorageCorruption(
                    f"{state_path}: missing next to a non-empty log; the term and vote it "
                    "held are lost (this node must not vote: see docs/storage.md, "
                    "\"Repairing a node\")")
            state = _State(HardState())
            _write_atomically(self.directory, "state", _checked(state), self.sync)
        self._state = state
        self._mark_durable = self._mark_wanted = state.hard_state.commit
        self._identity = _read_checked(os.path.join(self.directory, "identity"), _Identity)
        try:
            found = self._read_snapshot()
        except StorageCorruption:
            if not self.repair:
                raise
            self._drop_damaged_snapshot()
            found = None
        if found is not None:
            self._snapshot, self._snapshot_path = found
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
        # (segment, offset, why, torn) to drop, once every check passed
        cut: _CutAt | None = None
        expected = None
        for k, first in enumerate(firsts):
            if expected is not None and first != expected:
                if self.repair:
                    cut = (first, 0, f"segment starts at {first}, expected {expected}", False)
                    break
                raise StorageCorruption(
                    f"{self._path(first)}: segment starts at index {first} but the previous "
                    f"one ends at {expected - 1}: a segment is missing")
            expected, damage = self._scan_segment(first)
            self._segments.append(first)
            if damage is not None:
                last = k == len(firsts) - 1
                if not (last and damage.torn) and not self.repair:
                    where = "" if last else " in a segment that is not the last"
                    raise StorageCorruption(
                        f"{self._path(first)}: {damage.what} at offset {damage.pos}{where}; "
                        "expected an intact record (restore this node from a replica, or "
                        "see docs/storage.md, \"Repairing a node\")")
                cut = (first, damage.pos, damage.what, damage.torn)
                break
        covered = self._covered_index()
        if self._rec_first and self._rec_first[0] > covered + 1:
            raise StorageCorruption(
                f"{self._path(self._segments[0])}: the log starts at index "
                f"{self._rec_first[0]} but entries after {covered} were never compacted")
        self._refresh_floor()
        self._check_commit_mark(cut)
        if cut is not None:
            self._cut(cut, firsts)
            self._refresh_floor()
        if self._segments:
            self._open_tail(self._segments[-1])

    def _finish_truncation(self) -> None:
        """A cut inside a record that a crash interrupted (``_rewrite_tail``): done again
        from the start, as nothing was written after it."""
        path = os.path.join(self.directory, _TRUNCATION)
        pending = _read_checked(path, _Truncation)
        if pending is None:
            return
        seg = self._path(pending.segment)
        log.warning("%s: finishing a truncation at offset %d that a crash interrupted", seg,
                    pending.offset, extra={"event": "truncation_finished", "path": seg,
                                           "offset": pending.offset})
        try:
            fd = os.open(seg, os.O_RDWR)
        except FileNotFoundError:
            raise StorageCorruption(f"{path}: a truncation of {seg} was under way, but that "
                                    "segment is missing") from None
        try:
            _cut_and_write(fd, pending.offset, pending.record, self.sync)
        finally:
            os.close(fd)
        os.unlink(path)
        if self.sync:
            _fsync_dir(self.directory)

    def _check_commit_mark(self, cut: _CutAt | None) -> None:
        last = self._last()
        mark = self._mark_durable
        if mark <= max(last, self._floor()) or self.repair:
            return
        where = (f"{self._path(cut[0])} offset {cut[1]} ({cut[2]})" if cut is not None
                 else f"{self._path(self._segments[-1])}" if self._segments
                 else self.directory)
        raise StorageCorruption(
            f"{where}: the log ends at index {max(last, self._floor())} but entries up to "
            f"{mark} were committed: acknowledged entries are missing (restore this node "
            "from a replica, or see docs/storage.md, \"Repairing a node\")")

    def _cut(self, cut: _CutAt, firsts: list[int]) -> None:
        """Drop what follows the last intact record: a torn write, or (repair) damage."""
        seg, pos, what, torn = cut
        path = self._path(seg)
        if torn and seg == firsts[-1]:
            log.warning("%s: truncating %s at offset %d: a write torn by a crash, never "
                        "acknowledged", path, what, pos,
                        extra={"event": "torn_write", "path": path, "offset": pos})
        else:
            log.error("%s: REPAIR: dropping everything from offset %d (%s) and every later "
                      "segment; this node may have lost entries it acknowledged and will "
                      "not vote until a leader has caught it up", path, pos, what,
                      extra={"event": "repair", "path": path, "offset": pos,
                             "damage": str(what)})
            self._mark_recovering()
            self._mark_durable = self._mark_wanted = self._state.hard_state.commit
            self._write_state()
        for later in [s for s in firsts if s > seg]:
            if os.path.exists(self._path(later)):
                os.unlink(self._path(later))
            if later in self._segments:
                self._segments.remove(later)
        if pos == 0:  # nothing of this segment is kept
            if os.path.exists(path):
                os.unlink(path)
            if seg in self._segments:
                self._segments.remove(seg)
        else:
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        if self.sync:
            _fsync_dir(self.directory)

    def _scan_segment(self, first: int) -> tuple[int, _Damage | None]:
        """Index the intact records of one segment; returns the index after its last
        entry, and the damage that stopped the scan (None: the whole file is intact)."""
        path = self._path(first)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        expected = first
        while pos < len(data):
            try:
                end, body, mark = _record_at(data, pos)
                count, rec_first = _batch_bounds(body, pos)
                if rec_first != expected:
                    raise _Damage(pos, f"a record of index {rec_first} where {expected} "
                                       "was expected", False)
            except _Damage as damage:
                if damage.torn and _valid_record_after(data, pos + 1):
                    damage.torn = False  # something was written after it: it was synced
                    damage.what += " followed by intact records"
                return expected, damage
            self._push_record(rec_first, rec_first + count - 1, first, pos, end - pos)
            self._mark_durable = max(self._mark_durable, mark)
            expected = rec_first + count
            pos = end
        return expected, None

    def _drop_damaged_snapshot(self) -> None:
        """Repair: a damaged snapshot cannot be kept, and the log behind it was compacted
        away, so nothing of the log is kept either; the leader sends a new snapshot."""
        log.error("%s: REPAIR: the snapshot is damaged; dropping it and the whole log",
                  self.directory, extra={"event": "repair", "path": self.directory,
                                         "damage": "snapshot"})
        for name in os.listdir(self.directory):
            if name == "snapshot" or name.startswith((_SNAP_DATA_PREFIX, _SEG_PREFIX)):
                os.unlink(os.path.join(self.directory, name))
        hs = self._state.hard_state
        self._state = _State(HardState(hs.current_term, hs.voted_for, 0, True))
        self._mark_durable = self._mark_wanted = 0
        self._write_state()
        return None

    # ------------------------------------------------------------------ the hook

    def save_identity(self, node_id: int, cluster_id: str) -> None:
        """Record whose directory this is (once; the node checks it at every start)."""
        self._identity = _Identity(node_id, cluster_id)
        _write_atomically(self.directory, "identity", _checked(self._identity), self.sync)

    async def append_entries(self, entries: list[Entry]) -> None:
        if entries:
            await self._run(self._append_sync, entries, self._mark_wanted)

    async def truncate_suffix(self, index: int) -> None:
        await self._run(self._truncate_sync, index)

    async def compact_prefix(self, index: int) -> None:
        await self._run(self._compact_sync, index)

    async def save_hard_state(self, hard_state: HardState) -> None:
        await self._run(self._save_state_sync, hard_state)

    def close(self) -> None:
        """Record the commit mark, close files and release the directory lock. Not done
        by ``RaftNode.stop()``; later calls raise ``StorageFailed``."""
        self._closed = True
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        # A clean stop: the commit mark goes to ``state`` too, so a log later cut at a
        # record boundary (which the records alone cannot tell) is refused. Every record
        # written is durable now, so a mark announced for them holds.
        last = self._rec_last[-1] if self._rec_last else 0
        self._mark_durable = max(self._mark_durable, min(self._mark_wanted, last))
        if self._recovered and self._lock_fd >= 0 \
                and self._mark_durable > self._state.hard_state.commit:
            try:
                self._save_state_sync(self._state.hard_state)
            except OSError:
                log.exception("%s: could not record the commit mark at close",
                              self.directory)
        self._close_segments()
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ file work

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self._on(self._executor, fn, *args)

    def _is_closed(self) -> bool:
        return self._closed

    def _path(self, seg_first: int) -> str:
        return os.path.join(self.directory, _seg_name(seg_first))

    def _open_tail(self, seg: int) -> None:
        self._tail_fd = self._fd(seg)
        self._tail_size = os.fstat(self._tail_fd).st_size

    def _append_sync(self, entries: list[Entry], mark: int | None = None) -> None:
        first, last = entries[0].index, entries[-1].index
        floor = self._floor()
        if self._compaction_due():
            self._compact_sync(floor)
        expected = self._rec_last[-1] + 1 if self._rec_last else floor + 1
        if first != expected:
            raise StorageCorruption(
                f"{self.directory}: append of entry {first} to a log that ends at "
                f"{expected - 1}")
        # The mark never names an entry this record does not make durable.
        mark = min(self._mark_wanted if mark is None else mark, last)
        body = kernels.encode_entries(entries)
        record = _record(body, mark)
        new_segment = not self._segments or (
            self._tail_size > 0 and self._tail_size + len(record) > self.segment_bytes)
        if new_segment:
            with self._lock:
                self._segments.append(first)
                self._open_tail(first)
            if self.sync:
                _fsync_dir(self.directory)
        off = self._tail_size
        _write_at(self._tail_fd, record, off)
        if self.sync:
            os.fdatasync(self._tail_fd)
        self._written(first, last, off, record, mark)

    def _written(self, first: int, last: int, off: int, record: bytes, mark: int) -> None:
        """``record`` (entries ``first``..``last``) is durable at ``off`` of the tail."""
        self._tail_size = off + len(record)
        with self._lock:
            self._push_record(first, last, self._segments[-1], off, len(record))
        if mark > self._mark_durable:
            self._mark_durable = mark

    def _truncate_sync(self, index: int) -> None:
        with self._lock:
            self._truncate_locked(index)

    def _truncate_locked(self, index: int) -> None:
        start = self._truncation_start(index)
        if start is None:
            return
        index = start
        k = bisect_right(self._rec_first, index) - 1
        keep: list[Entry] = []
        if k >= 0 and self._rec_first[k] < index:
            # All of the record's head stays, compacted entries too: the next record
            # written starts where it ends, as recovery expects.
            keep = self._record_entries(k)[:index - self._rec_first[k]]
        k = max(k, 0)
        seg, off = self._rec_seg[k], self._rec_off[k]
        # Newest first, each gone for good before the next goes and before the cut: a
        # crash never leaves a segment behind a gap.
        for later in [s for s in reversed(self._segments) if s > seg]:
            self._delete_segment(later)
            self._segments.remove(later)
            if self.sync:
                _fsync_dir(self.directory)
        self._drop_records_from(k)
        self._open_tail(seg)
        if keep:
            self._rewrite_tail(seg, off, keep)
        else:
            os.ftruncate(self._tail_fd, off)
            self._tail_size = off
            if self.sync:
                os.fsync(self._tail_fd)
        self._refresh_floor()

    def _rewrite_tail(self, seg: int, off: int, keep: list[Entry]) -> None:
        """Cut the tail at ``off``, the start of a record, and write there the entries of
        it that stay: one step no crash splits. Those entries were acknowledged; a cut
        that reached the disk before them would lose them (the size of a file can be
        journaled before the data written after it). The new record goes to the
        ``truncation`` file first, and recovery finishes a rewrite it finds there."""
        first, last = keep[0].index, keep[-1].index
        mark = min(self._mark_wanted, last)
        record = _record(kernels.encode_entries(keep), mark)
        _write_atomically(self.directory, _TRUNCATION, _checked(_Truncation(seg, off, record)),
                          self.sync)
        _cut_and_write(self._tail_fd, off, record, self.sync)
        self._written(first, last, off, record, mark)
        os.unlink(os.path.join(self.directory, _TRUNCATION))
        if self.sync:  # gone before the next write: found later, it would undo that one
            _fsync_dir(self.directory)

    def _compact_sync(self, index: int) -> None:
        with self._lock:
            self._compact_locked(index)

    def _compact_locked(self, index: int) -> None:
        if not self._compacts(index):
            return
        state = self._compacted_state(index)
        if state is not None:
            self._state = state
            self._write_state()
        while len(self._segments) > 1 and self._segments[1] <= index + 1:
            self._delete_segment(self._segments.pop(0))
        self._forget_records_to(index)
        if not self._rec_first and self._segments:
            # Compacted past the end of the log (a snapshot beyond it): the log goes on
            # after ``index`` in a new segment, so no segment ever holds a gap.
            for seg in self._segments:
                self._delete_segment(seg)
            self._segments = []
            self._tail_fd, self._tail_size = -1, 0
            if self.sync:
                _fsync_dir(self.directory)
        self._refresh_floor()

    def _write_state(self) -> None:
        _write_atomically(self.directory, "state", _checked(self._state), self.sync)

    def _save_state_sync(self, hard_state: HardState) -> None:
        mark = max(hard_state.commit, self._mark_durable)
        self._state = _State(HardState(hard_state.current_term, hard_state.voted_for, mark,
                                       hard_state.recovering),
                             self._state.compacted_index, self._state.compacted_term)
        self._write_state()
        self._mark_durable = mark

