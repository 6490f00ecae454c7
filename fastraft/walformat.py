"""What the files of ``FileStorage`` and ``SharedWAL`` are made of, and the few system
calls that make them durable.

A segment is a sequence of records, each one batch of entries behind a 24-byte header
(magic, body length, commit mark, the checksums of the body and of the header; the
layout is in filestorage.py). ``_record_at`` reads one back or raises ``_Damage``, which
says whether the damage is shaped like a write a crash interrupted (``torn``: only such
bytes may be dropped, and only at the end of the last segment). Small files (``state``,
``identity``) are a length and a checksum before a msgpack body, replaced atomically
(``_write_atomically``). A data directory is locked by one process at a time and holds
one kind of storage (``_lock_directory``).
"""
from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import msgspec

from fastraft.errors import ConfigError, FastRaftError, StorageCorruption, StorageOwnedElsewhere
from fastraft.messages import HardState

_MAGIC = 0x32575246  # b"FRW2", little-endian: where a record starts
_HEAD = struct.Struct("<IIQII")  # magic, body length, commit mark, crc(body), crc(head)
_HEAD_CHECKED = 20  # the header bytes its own crc covers
_FILE_HEAD = struct.Struct("<II")  # body length, crc32(body): the state and identity files
_SEG_PREFIX, _SEG_SUFFIX = "log-", ".seg"
#: A ``SharedWAL``'s segments (sharedwal.py): told apart from these in ``_lock_directory``.
_WAL_SEG_PREFIX = "wal-"
_SECTOR = 512
_MAGIC_BYTES = struct.pack("<I", _MAGIC)
#: The most buffers one ``os.pwritev`` takes (the system's IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX")
#: Where the system has no ``pwritev``, a write of the first buffer alone (``_write_at``
#: goes on with the next).
_pwritev = getattr(os, "pwritev", None) or (lambda fd, bufs, off: os.pwrite(fd, bufs[0], off))


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


_S = TypeVar("_S")


class _Damage(Exception):
    """A record that is not intact, at ``pos`` of a segment: ``what`` was found, and
    whether it is shaped like an interrupted write (``torn``)."""

    def __init__(self, pos: int, what: str, torn: bool) -> None:
        super().__init__(what)
        self.pos = pos
        self.what = what
        self.torn = torn

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_newest_first(directory: str, paths: list[str], sync: bool) -> None:
    """Delete ``paths`` (segments, oldest first) from the last, each gone for good before
    the next goes: a power cut never leaves a segment behind a gap."""
    for path in reversed(paths):
        if os.path.exists(path):
            os.unlink(path)
            if sync:
                _fsync_dir(directory)


def _write_at(fd: int, parts: Sequence[bytes], offset: int) -> None:
    """Write ``parts`` one after the other from ``offset``, all of them: gathered in one
    system call (up to ``_IOV_MAX`` at a time), not copied into one buffer first (a
    batch of big entries would be in memory twice); a short write goes on where it
    stopped."""
    views = [memoryview(p) for p in parts if p]
    i = 0
    while i < len(views):
        n = _pwritev(fd, views[i:i + _IOV_MAX], offset)
        offset += n
        while n:
            if n < len(views[i]):
                views[i] = views[i][n:]
                break
            n -= len(views[i])
            i += 1


def _cut_and_write(fd: int, offset: int, record: bytes, sync: bool) -> None:
    """Cut the file at ``offset`` and write ``record`` there (a truncation's rewrite)."""
    os.ftruncate(fd, offset)
    _write_at(fd, (record,), offset)
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

def _intact_records(data: bytes, start: int) -> Iterator[memoryview]:
    """The body of every intact record found at or after ``start``, each one that starts
    where a record's magic is (damage between them skipped)."""
    pos = data.find(_MAGIC_BYTES, start)
    while pos >= 0:
        try:
            end, body, _ = _record_at(data, pos)
        except _Damage:
            pos = data.find(_MAGIC_BYTES, pos + 1)
            continue
        yield body
        pos = data.find(_MAGIC_BYTES, end)


def _valid_record_after(data: bytes, start: int) -> bool:
    """Whether an intact record starts anywhere at or after ``start``."""
    return next(_intact_records(data, start), None) is not None


def _batch_bounds(body: memoryview, pos: int) -> tuple[int, int]:
    """(how many entries, first index) of a record's batch-codec body at ``pos``."""
    count = int.from_bytes(body[:4], "little") if len(body) >= 4 + 21 else 0
    if count == 0:
        raise _Damage(pos, "a record that holds no entries", False)
    return count, int.from_bytes(body[12:20], "little")


def _record_parts(body: Sequence[bytes], mark: int) -> tuple[list[bytes], int]:
    """A record as the parts ``_write_at`` writes, and its length: the header (with its
    checksums and the commit mark), then the parts of its body, as they are."""
    crc = length = 0
    for part in body:
        crc = zlib.crc32(part, crc)
        length += len(part)
    head = bytearray(_HEAD.pack(_MAGIC, length, mark, crc, 0))
    struct.pack_into("<I", head, _HEAD_CHECKED, zlib.crc32(head[:_HEAD_CHECKED]))
    return [bytes(head), *body], _HEAD.size + length


def _record(body: bytes, mark: int) -> bytes:
    """A record in one piece: the header, then ``body``."""
    return b"".join(_record_parts((body,), mark)[0])


def check_options(directory: object, segment_bytes: object, cache_bytes: object) -> None:
    """``ConfigError`` unless ``directory`` is a path, ``segment_bytes`` a positive int and
    ``cache_bytes`` an int of at least 0 (``FileStorage``, ``SharedWAL``)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"the directory is a path, not {type(directory).__name__}")
    for name, value, least in (("segment_bytes", segment_bytes, 1),
                               ("cache_bytes", cache_bytes, 0)):
        if type(value) is not int or value < least:
            raise ConfigError(f"{name} must be an int of at least {least}, got {value!r}")

