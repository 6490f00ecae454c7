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

import fcntl
import logging
import os
import threading
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from fastraft import kernels
from fastraft.errors import StorageCorruption
from fastraft.logstore import _SNAP_DATA_PREFIX, _LogStore, _RecordCache, _SegmentFiles
from fastraft.messages import Entry, HardState
from fastraft.walformat import (
    _SEG_PREFIX,
    _SEG_SUFFIX,
    StorageLocked,
    _batch_bounds,
    _checked,
    _cut_and_write,
    _Damage,
    _fsync_dir,
    _Identity,
    _lock_directory,
    _read_checked,
    _record,
    _record_at,
    _record_parts,
    _State,
    _unlink_newest_first,
    _valid_record_after,
    _write_at,
    _write_atomically,
    check_options,
)

__all__ = ["FileStorage", "StorageLocked"]

log = logging.getLogger("fastraft.filestorage")

_TRUNCATION = "truncation"


class _Truncation(msgspec.Struct, array_like=True):
    """A cut inside a record under way (``FileStorage._rewrite_tail``): segment
    ``segment`` is cut at ``offset`` and ``record`` written there."""
    segment: int
    offset: int
    record: bytes


_T = TypeVar("_T")
#: Where recovery cuts the log: (segment, offset, what was found, torn by a crash).
_CutAt = tuple[int, int, str, bool]


def _seg_name(first_index: int) -> str:
    return f"{_SEG_PREFIX}{first_index:020d}{_SEG_SUFFIX}"


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
            self._drop_damaged_snapshot(names)
            found = None
            names = []  # the log went with it
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
        # every later segment goes, and this one too when nothing of it is kept
        doomed = [s for s in firsts if s > seg or s == seg and pos == 0]
        _unlink_newest_first(self.directory, [self._path(s) for s in doomed], self.sync)
        self._segments = [s for s in self._segments if s not in doomed]
        if pos:
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())

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

    def _drop_damaged_snapshot(self, segments: list[str]) -> None:
        """Repair: a damaged snapshot cannot be kept, and the log behind it was compacted
        away, so nothing of the log is kept either; the leader sends a new snapshot. The
        recovering state is durable first, then the segments go newest first and the
        snapshot last: a power cut on the way leaves a store that refuses to open
        without repair, never one that lost its snapshot and would vote."""
        log.error("%s: REPAIR: the snapshot is damaged; dropping it and the whole log",
                  self.directory, extra={"event": "repair", "path": self.directory,
                                         "damage": "snapshot"})
        hs = self._state.hard_state
        self._state = _State(HardState(hs.current_term, hs.voted_for, 0, True))
        self._mark_durable = self._mark_wanted = 0
        self._write_state()
        _unlink_newest_first(self.directory,
                             [os.path.join(self.directory, n) for n in segments], self.sync)
        for name in sorted(os.listdir(self.directory),
                           key=lambda n: n == "snapshot"):  # its metadata last
            if name == "snapshot" or name.startswith(_SNAP_DATA_PREFIX):
                os.unlink(os.path.join(self.directory, name))
        if self.sync:
            _fsync_dir(self.directory)

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
        record, length = _record_parts((kernels.encode_entries(entries),), mark)
        new_segment = not self._segments or (
            self._tail_size > 0 and self._tail_size + length > self.segment_bytes)
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
        self._written(first, last, off, length, mark)

    def _written(self, first: int, last: int, off: int, length: int, mark: int) -> None:
        """The record of entries ``first``..``last``, ``length`` bytes, is durable at
        ``off`` of the tail."""
        self._tail_size = off + length
        with self._lock:
            self._push_record(first, last, self._segments[-1], off, length)
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
        self._written(first, last, off, len(record), mark)
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

