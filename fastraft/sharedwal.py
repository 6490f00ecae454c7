"""``SharedWAL``: one write-ahead log for many Raft groups (multi-Raft).

A host with thousands of groups cannot afford a log directory, a writer thread and an
fsync per group. A ``SharedWAL`` is one directory whose segments hold the records of every
group, interleaved; ``wal.group(group_id)`` is that group's ``RaftStorage``. Writes of all
groups that arrive in one event-loop turn, or while the previous batch is being synced,
go out as one batch: one ``write`` and one ``fdatasync`` per segment touched (group commit
across groups). Layout of the directory::

    LOCK                 flock()ed while open: one process per directory
    wal-<seq>.seg        the shared segments, numbered in order, rolled at segment_bytes
    group-<id>/          a group's snapshot (``snapshot``, ``snapshot-<index>-<crc>.data``)
    terms                a term no group's exceeds (raised before a group's term passes it)
    registry             every group that may have records here (``walregistry``: a
                         group goes in before its first record, out once dropped)
    repairing            only while a repair cuts the WAL and marks the groups recovering

A record is ``FileStorage``'s (24-byte header with checksums and the group's commit mark)
whose body starts with the group id (u64) and a kind (u8):

    ENTRIES   batch-codec entries; one whose first index the group's log already holds
              replaces the log from there (what a truncation and an append write)
    TRUNCATE  u64 index: the group's entries from there on are void
    STATE     the group's hard state, compaction point and owner (msgpack)
    DROP      everything of the group before it is gone (``drop_group``)

Recovery replays the segments in order, each group's records into its own index: a
group's state is its last STATE record, its log what its ENTRIES, TRUNCATE and STATE
records leave. The damage rules are ``FileStorage``'s: only the end of the last segment
may hold a torn write (dropped, logged); any other bad record, a missing segment, or a
group whose log ends before its commit mark stops start-up with ``StorageCorruption``.
``repair=True`` keeps what precedes the damage and marks every group recovering, also
those the ``registry`` names and nothing left names (their records lay in the damage).

Compaction is per group (``compact_prefix`` writes a STATE record and forgets records).
A segment is deleted once no group needs it, oldest first: no group holds a live record
in it or an older one, and no group's latest STATE record is there. An idle group would
hold the oldest segment forever, so when more than ``max_segments`` are kept, the groups
holding the oldest one whose logs are small (at most ``segment_bytes // 8``) are written
again at the tail (their STATE and their live entries), and the segment goes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, BinaryIO, TypeVar

import msgspec

from fastraft import kernels
from fastraft.errors import ConfigError, StorageCorruption, StorageFailed
from fastraft.logstore import _LogStore, _RecordCache, _SegmentFiles
from fastraft.messages import Entry, HardState, SnapshotMeta, check_group_id
from fastraft.walformat import (
    _SEG_SUFFIX,
    _WAL_SEG_PREFIX,
    _batch_bounds,
    _checked,
    _Damage,
    _fsync_dir,
    _Identity,
    _intact_records,
    _lock_directory,
    _read_checked,
    _record_at,
    _record_parts,
    _State,
    _unlink_newest_first,
    _valid_record_after,
    _write_at,
    _write_atomically,
    check_options,
)
from fastraft.walregistry import GroupRegistry

log = logging.getLogger("fastraft.sharedwal")

_T = TypeVar("_T")
_SEG_PREFIX = _WAL_SEG_PREFIX
_TAG = struct.Struct("<QB")  # group id, kind
_REPAIRING = "repairing"
_TERMS = "terms"
_GROUP_DIR = "group-"  # and the group id: its snapshot
_INDEX = struct.Struct("<Q")
ENTRIES, TRUNCATE, STATE, DROP = 1, 2, 3, 4
#: The op kinds of a write batch besides the record kinds.
_COMPACT, _IDENTITY, _RELOCATE = 10, 11, 12
#: Marks an op left for the next batch (its group already has one in this batch).
_LATER = object()


#: The ``terms`` file is kept this far above the highest term any group has written.
TERM_MARGIN = 1 << 16


class _TermCeiling(msgspec.Struct, array_like=True):
    """No group of this WAL has a term above ``ceiling``: a repair, which may drop a
    group's latest STATE record, starts the groups it marks recovering past it."""
    ceiling: int


class _Repairing(msgspec.Struct, array_like=True):
    """A repair under way: the groups with records in what it drops (marked recovering
    even if nothing of them is left)."""
    groups: list[int]


class _GroupState(msgspec.Struct, array_like=True):
    state: _State
    identity: _Identity | None = None


def _seg_name(seq: int) -> str:
    return f"{_SEG_PREFIX}{seq:020d}{_SEG_SUFFIX}"


class _Batch:
    """Records placed in the segments, before they are written: the segment, the
    offset where its run of new records starts, and their parts (``_record_parts``)."""

    def __init__(self, wal: SharedWAL) -> None:
        self.wal = wal
        self.runs: list[tuple[int, int, list[bytes]]] = []
        self.seq = wal._segments[-1] if wal._segments else 0
        self.size = wal._tail_size
        self.new_segments: list[int] = []
        #: Whether a group compacted: segments may have become free.
        self.compacted = False

    def place(self, record: Sequence[bytes], length: int) -> tuple[int, int]:
        """Where ``record``, in parts of ``length`` bytes together, goes: (segment,
        offset)."""
        wal = self.wal
        if not self.seq or (self.size > 0 and self.size + length > wal.segment_bytes):
            self.seq += 1
            self.size = 0
            self.new_segments.append(self.seq)
        if not self.runs or self.runs[-1][0] != self.seq:
            self.runs.append((self.seq, self.size, []))
        self.runs[-1][2].extend(record)
        off = self.size
        self.size += length
        return self.seq, off


def _snapshot_dirs(names: list[str]) -> list[int]:
    """The groups with a snapshot directory among ``names`` (a listing of the WAL's)."""
    return [int(name[len(_GROUP_DIR):]) for name in names
            if name.startswith(_GROUP_DIR) and name[len(_GROUP_DIR):].isdigit()]


class WalGroup(_LogStore):
    """One group's view of a ``SharedWAL``: its ``RaftStorage`` (``wal.group(id)``)."""

    _BODY_TAG = _TAG.size

    def __init__(self, wal: SharedWAL, group_id: int) -> None:
        super().__init__(os.path.join(wal.directory, f"{_GROUP_DIR}{group_id}"), wal.sync,
                         wal._cache, group_id, wal._lock)
        self.wal = wal
        self.group_id = group_id
        self._tag = _TAG.pack(group_id, ENTRIES)
        #: Whether the ``registry`` names this group (before its first record).
        self._registered = group_id in wal._registry.ids
        self._reader = wal._reader
        #: The segment holding this group's latest STATE record (0: none yet).
        self._state_seg = 0
        if os.path.isdir(self.directory):
            found = self._read_snapshot()
            if found is not None:
                self._snapshot, self._snapshot_path = found

    # ------------------------------------------------------------------ the hook

    async def append_entries(self, entries: list[Entry]) -> None:
        if entries:
            await self.wal._submit(self, ENTRIES, (entries, self._mark_wanted))

    async def truncate_suffix(self, index: int) -> None:
        await self.wal._submit(self, TRUNCATE, index)

    async def compact_prefix(self, index: int) -> None:
        await self.wal._submit(self, _COMPACT, index)

    async def save_hard_state(self, hard_state: HardState) -> None:
        await self.wal._submit(self, STATE, hard_state)

    async def save_identity(self, node_id: int, cluster_id: str) -> None:
        await self.wal._submit(self, _IDENTITY, _Identity(node_id, cluster_id))

    # ------------------------------------------------------------------ file work

    def _fd(self, seg: int) -> int:
        return self.wal._fd(seg)

    def _path(self, seg: int) -> str:
        return self.wal._path(seg)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        # snapshots are copied on a thread of their own: never behind, or in front of,
        # the log writes of every group
        return await self._on(self.wal._snapshots, fn, *args)

    def _is_closed(self) -> bool:
        return self.wal._closed

    def _save_snapshot_sync(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            if self.sync:
                _fsync_dir(self.wal.directory)
        super()._save_snapshot_sync(meta, data)

    def _oldest_segment(self) -> int:
        """The oldest segment this group needs (0: none)."""
        segs = [s for s in (self._rec_seg[0] if self._rec_seg else 0, self._state_seg) if s]
        return min(segs) if segs else 0

    def _state_record(self, batch: _Batch, state: _State,
                      identity: _Identity | None) -> Callable[[], None]:
        body = _TAG.pack(self.group_id, STATE) + msgspec.msgpack.encode(
            _GroupState(state, identity))
        seg, _ = batch.place(*_record_parts((body,), 0))

        def apply() -> None:
            self._state, self._identity, self._state_seg = state, identity, seg
            self._mark_durable = max(self._mark_durable, state.hard_state.commit)
        return apply

    def _entries_record(self, batch: _Batch, entries: list[Entry],
                        mark: int) -> Callable[[], None]:
        first, last = entries[0].index, entries[-1].index
        record, length = _record_parts((self._tag, kernels.encode_entries(entries)),
                                       min(mark, last))
        seg, off = batch.place(record, length)

        def apply() -> None:
            rewritten = bool(self._rec_last) and first <= self._rec_last[-1]
            if rewritten:
                self._cut_from(first)  # a relocation writes the log again
            self._push_record(first, last, seg, off, length)
            if rewritten:
                # The cut left no record of the snapshot's last entry, so it took the
                # snapshot for one that replaces the log: the log holds that entry again.
                self._refresh_floor()
            self._mark_durable = max(self._mark_durable, min(mark, last))
        return apply

    def _plan(self, kind: int, arg: Any, batch: _Batch) -> list[Callable[[], None]]:
        """Check one op against this group's log, place its records in ``batch`` and
        return what updates the index once they are durable (``StorageCorruption``: the
        op is refused, nothing placed)."""
        if kind == ENTRIES:
            entries, mark = arg
            floor = self._floor()
            stale = bool(self._rec_last) and self._rec_last[-1] < floor
            last = self._rec_last[-1] if self._rec_last and not stale else floor
            if entries[0].index != last + 1:
                raise StorageCorruption(
                    f"{self.wal.directory}: group {self.group_id}: append of entry "
                    f"{entries[0].index} to a log that ends at {last}")
            applies = self._plan(_COMPACT, floor, batch) if self._compaction_due() else []
            return [*applies, self._entries_record(batch, entries, mark)]
        if kind == STATE:
            hs: HardState = arg
            mark = max(hs.commit, self._mark_durable)
            state = _State(HardState(hs.current_term, hs.voted_for, mark, hs.recovering),
                           self._state.compacted_index, self._state.compacted_term)
            return [self._state_record(batch, state, self._identity)]
        if kind == _IDENTITY:
            return [self._state_record(batch, self._state, arg)]
        if kind == TRUNCATE:
            return self._plan_truncate(arg, batch)
        if kind == _COMPACT:
            return self._plan_compact(arg, batch)
        if kind == DROP:
            batch.place(*_record_parts((_TAG.pack(self.group_id, DROP),), 0))
            batch.compacted = True  # its segments may be free now
            return [self._forget_group]
        return self._plan_relocate(batch)

    def _forget_group(self) -> None:
        """Dropped: out of the WAL's groups, nothing held (``wal.group(id)`` is a new,
        empty one from now on)."""
        self.wal._groups.pop(self.group_id, None)
        self._drop_records_from(0)
        self._state, self._identity, self._state_seg = _State(HardState()), None, 0
        self._mark_durable = self._mark_wanted = 0

    def _plan_truncate(self, index: int, batch: _Batch) -> list[Callable[[], None]]:
        start = self._truncation_start(index)
        if start is None:
            return []
        index = start
        batch.place(*_record_parts((_TAG.pack(self.group_id, TRUNCATE), _INDEX.pack(index)), 0))
        return [partial(self._cut_from, index)]

    def _plan_compact(self, index: int, batch: _Batch) -> list[Callable[[], None]]:
        applies: list[Callable[[], None]] = []
        if not self._compacts(index):
            return applies
        state = self._compacted_state(index)
        if state is not None:
            applies.append(self._state_record(batch, state, self._identity))
        applies.append(partial(self._forget_to, index))
        batch.compacted = True
        return applies

    def _plan_relocate(self, batch: _Batch) -> list[Callable[[], None]]:
        """Write this group's state and live records again at the tail, so the oldest
        segment no longer holds anything it needs."""
        applies = [self._state_record(batch, self._state, self._identity)]
        if self._rec_first:
            entries = [e for k in range(len(self._rec_first)) for e in self._record_entries(k)]
            applies.append(self._entries_record(batch, entries, self._mark_durable))
        return applies

    # ------------------------------------------------------------------ the index

    def _cut_from(self, index: int) -> None:
        """Forget entries ``index`` and after (a record that holds some before it keeps
        those: its last index is lowered)."""
        k = bisect_right(self._rec_first, index) - 1
        if k >= 0 and self._rec_first[k] < index:
            self._rec_last[k] = min(self._rec_last[k], index - 1)
            k += 1
        self._drop_records_from(max(k, 0))
        self._refresh_floor()

    def _forget_to(self, index: int) -> None:
        self._forget_records_to(index)
        self._refresh_floor()

    def _replay(self, kind: int, payload: memoryview, mark: int, seg: int, off: int,
                length: int) -> None:
        """Recovery: one record of this group, in log order."""
        if kind == ENTRIES:
            count, first = _batch_bounds(payload, off)
            if self._rec_last and first <= self._rec_last[-1]:
                self._cut_from(first)
            elif self._rec_last and first != self._rec_last[-1] + 1:
                raise _Damage(off, f"a record of group {self.group_id} starting at "
                                   f"{first} after its log ends at {self._rec_last[-1]}",
                              False)
            self._push_record(first, first + count - 1, seg, off, length)
            self._mark_durable = max(self._mark_durable, mark)
        elif kind == TRUNCATE and len(payload) == _INDEX.size:
            self._cut_from(_INDEX.unpack(payload)[0])
        elif kind == DROP:
            self.wal._replayed_drops.add(self.group_id)
            self._forget_group()
        elif kind == STATE:
            try:
                found = msgspec.msgpack.decode(payload, type=_GroupState)
            except (msgspec.MsgspecError, ValueError) as exc:
                raise _Damage(off, f"an unreadable state record: {exc}", False) from None
            self._state, self._identity, self._state_seg = found.state, found.identity, seg
            self._mark_durable = max(self._mark_durable, found.state.hard_state.commit)
            self._forget_to(found.state.compacted_index)
        else:
            raise _Damage(off, f"a record of unknown kind {kind}", False)

    def _mark_recovering(self) -> int:
        self._refresh_floor()
        held = super()._mark_recovering()
        self._mark_durable = min(self._mark_durable, held)
        return held

    def _start_past(self, term: int) -> None:
        """Repair: this group's latest STATE record may be among those dropped, so its
        term and vote are unknown beyond ``term``, the WAL's ceiling. Past it, no vote
        was ever cast, and every entry it acknowledged is of an earlier term (recovery
        ends on a committed entry of a later one)."""
        hs = self._state.hard_state
        self._state = _State(HardState(max(term, hs.current_term) + 1, None, hs.commit,
                                       hs.recovering),
                             self._state.compacted_index, self._state.compacted_term)

    def _check_recovered(self) -> None:
        self._refresh_floor()
        self._mark_wanted = self._mark_durable
        where = f"{self.wal.directory}: group {self.group_id}"
        covered = self._covered_index()
        if self._rec_first and self._rec_first[0] > covered + 1:
            raise StorageCorruption(f"{where}: the log starts at index {self._rec_first[0]}"
                                    f" but entries after {covered} were never compacted")
        last = max(self._last(), self._floor())
        if self._mark_durable > last:
            raise StorageCorruption(
                f"{where}: the log ends at index {last} but entries up to "
                f"{self._mark_durable} were committed: acknowledged entries are missing "
                "(a segment was lost or cut; restore this host from a replica)")


class SharedWAL(_SegmentFiles):
    """See the module docstring. ``sync=False`` skips every fsync (UNSAFE: benchmarks
    only, as ``FileStorage``'s). ``group(group_id)`` is a group's storage; the WAL is
    closed by whoever opened it (``close()``), never by a node or host. ``repair=True``
    opens a damaged WAL by keeping what precedes the damage: every group is marked
    recovering (docs/multiraft.md, "Repairing a host")."""

    def __init__(self, directory: str, *, segment_bytes: int = 64 << 20, sync: bool = True,
                 cache_bytes: int = 8 << 20, max_segments: int = 4,
                 repair: bool = False) -> None:
        check_options(directory, segment_bytes, cache_bytes)
        if type(max_segments) is not int or max_segments < 2:
            raise ConfigError(f"max_segments must be an int of at least 2, got {max_segments!r}")
        self.directory = os.path.abspath(directory)
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.max_segments = max_segments
        self.repair = repair
        self._lock_fd = _lock_directory(self.directory, "SharedWAL", sync)
        self._lock = threading.RLock()
        #: Decoded records of every group, within ``cache_bytes`` together.
        self._cache = _RecordCache(cache_bytes)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal-read")
        self._snapshots = ThreadPoolExecutor(1, thread_name_prefix="fastraft-wal-snap")
        self._groups: dict[int, WalGroup] = {}
        self._segments: list[int] = []
        self._fds: dict[int, int] = {}
        self._tail_size = 0
        self._pending: list[tuple[WalGroup, int, Any, asyncio.Future[None]]] = []
        self._writing = False
        self._broken: BaseException | None = None
        #: What the ``terms`` file says (read by recovery, which writes it if missing).
        self._term_ceiling = 0
        self._registry = GroupRegistry(self.directory, sync)
        #: Recovery: the groups it replayed a DROP record of.
        self._replayed_drops: set[int] = set()
        #: Write batches made durable, and the ops they carried (their ratio is the
        #: group commit at work).
        self.batches = 0
        self.ops = 0
        self._closed = False
        self._open()

    def group(self, group_id: int) -> WalGroup:
        """Group ``group_id``'s storage (the same object on every call)."""
        view = self._groups.get(group_id)
        if view is None:
            check_group_id(group_id)
            view = self._groups[group_id] = WalGroup(self, group_id)
        return view

    def group_ids(self) -> list[int]:
        """The groups this WAL holds anything of, in id order."""
        return sorted(g for g, v in self._groups.items() if v._oldest_segment())

    async def drop_group(self, group_id: int) -> None:
        """Delete everything of ``group_id``: its snapshot now, its records as their
        segments are freed. Its replica must be stopped first (``RaftHost.remove_group``,
        once a membership change took this host out of the group). The group is gone
        once its DROP record is durable; a snapshot a crash left behind after it is
        deleted at the next start."""
        view = self.group(group_id)
        await self._submit(view, DROP, None)
        await view._on(self._snapshots, self._remove_snapshot, view)

    def _remove_snapshot(self, view: WalGroup) -> None:
        with self._lock:
            view._snapshot = view._snapshot_path = None
            view._refresh_floor()
        self._delete_snapshot_dir(view.directory)

    def _delete_snapshot_dir(self, directory: str) -> None:
        if not os.path.isdir(directory):
            return
        meta = os.path.join(directory, "snapshot")
        if os.path.exists(meta):  # first: no metadata left naming a deleted data file
            os.unlink(meta)
            if self.sync:
                _fsync_dir(directory)
        shutil.rmtree(directory)
        if self.sync:
            _fsync_dir(self.directory)

    def segments(self) -> list[str]:
        """The segment files, oldest first."""
        return [self._path(s) for s in self._segments]

    def close(self) -> None:
        """Finish the write in progress, record each group's commit mark (one batch),
        close the files and release the directory. Writes still waiting for a batch (the
        groups' nodes should be stopped first) fail with ``StorageFailed``, rather than
        wait for ever. Call it on the event loop's thread."""
        if self._closed:
            return
        self._closed = True
        for executor in (self._writer, self._reader, self._snapshots):
            executor.shutdown(wait=True)
        self._fail_pending(self._closed_error())
        if self._recovered and self._broken is None:
            marks = [v for v in self._groups.values()
                     if min(v._mark_wanted, v._last()) > v._mark_durable]
            for v in marks:
                v._mark_durable = min(v._mark_wanted, v._last())
            try:
                self._write_batch([(v, STATE, v._state.hard_state, None) for v in marks])
            except OSError:
                log.exception("%s: could not record the commit marks at close",
                              self.directory)
        self._close_segments()
        self._registry.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing it releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ group commit

    def _submit(self, view: WalGroup, kind: int, arg: Any) -> asyncio.Future[None]:
        if self._broken is not None:
            raise self._refusal()
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((view, kind, arg, future))
        if not self._writing:
            self._writing = True
            # after the rest of this loop turn: every group's writes of the turn join
            loop.call_soon(self._start_batch, loop)
        return future

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed:  # after close() in the same loop turn: it failed the ops
            self._writing = False
            return
        ops, self._pending = self._pending, []
        job = loop.run_in_executor(self._writer, self._write_batch, ops)
        job.add_done_callback(partial(self._batch_done, loop, ops))

    def _batch_done(self, loop: asyncio.AbstractEventLoop, ops: list[Any],
                    job: asyncio.Future[list[Any]]) -> None:
        failed = job.exception()
        if failed is not None:
            # an fsync that failed may have lost the data it was to sync (the kernel
            # drops the dirty pages): nothing written after it can be trusted
            self._broken = failed
            log.error("%s: a write failed: %r; no more writes", self.directory, failed)
        later = []
        for op, result in zip(ops, [failed] * len(ops) if failed else job.result()):
            future = op[3]
            if result is _LATER:
                later.append(op)
            elif not future.done():
                if result is None:
                    future.set_result(None)
                else:
                    future.set_exception(result)
        self._pending[:0] = later
        if self._pending and failed is None and not self._closed:
            self._start_batch(loop)  # what came during the sync: the next batch
            return
        self._writing = False
        if failed is not None:
            # What came during the failed write has no batch to go in: it fails as a
            # write submitted from now on does (a node stopping awaits its writes).
            self._fail_pending(self._refusal())
        elif self._closed:
            self._fail_pending(self._closed_error())

    def _fail_pending(self, error: StorageFailed) -> None:
        waiting, self._pending = self._pending, []
        for _, _, _, future in waiting:
            if not future.done():
                future.set_exception(error)

    def _closed_error(self) -> StorageFailed:
        return StorageFailed(f"{self.directory}: the WAL is closed")

    def _refusal(self) -> StorageFailed:
        return StorageFailed(f"{self.directory}: a write failed earlier "
                             f"({self._broken!r}); the WAL takes no more writes")

    def _write_batch(self, ops: list[Any]) -> list[Any]:
        """On the writer thread: place every op's records, write them, sync once, then
        update the groups' indexes. One op per group per batch, in order."""
        batch = _Batch(self)
        results: list[Any] = []
        applies: list[Callable[[], None]] = []
        seen: set[int] = set()
        top = 0  # the highest term this batch makes durable
        new: list[WalGroup] = []  # groups whose first records this batch holds
        dropped: list[WalGroup] = []  # groups this batch drops
        for view, kind, arg, _ in ops:
            if view.group_id in seen:
                results.append(_LATER)
                continue
            seen.add(view.group_id)
            if kind == DROP:
                if view._registered:
                    dropped.append(view)
            elif not view._registered:
                new.append(view)
            if kind == STATE and arg.current_term > top:
                top = arg.current_term
            try:
                with self._lock:
                    applies.extend(view._plan(kind, arg, batch))
            except StorageCorruption as exc:
                results.append(exc)
            else:
                results.append(None)
        if top > self._term_ceiling:
            self._raise_term_ceiling(top)
        if new:
            self._register(new, [])
        self._write(batch, applies)
        if dropped:
            self._register([], dropped)
        if batch.compacted or batch.new_segments:
            self._collect()
        self.batches += 1
        self.ops += len(ops)
        return results

    def _raise_term_ceiling(self, term: int) -> None:
        """Durably, before any STATE record of ``term``: no group's term exceeds the
        ceiling (rare: once per ``TERM_MARGIN`` terms of the busiest group)."""
        ceiling = term + TERM_MARGIN
        _write_atomically(self.directory, _TERMS, _checked(_TermCeiling(ceiling)), self.sync)
        self._term_ceiling = ceiling

    def _register(self, added: list[WalGroup], dropped: list[WalGroup]) -> None:
        """``added``'s groups into the registry before their first records, ``dropped``'s
        out of it once their DROP records are durable (``GroupRegistry.change``)."""
        self._registry.change([v.group_id for v in added], [v.group_id for v in dropped])
        for view in added:
            view._registered = True
        for view in dropped:  # a new group of that id is registered again
            view._registered = False

    def _write(self, batch: _Batch, applies: list[Callable[[], None]]) -> None:
        new = batch.new_segments
        for seq, off, records in batch.runs:
            if seq in new:
                # A segment comes into being once the one before it is durable, and its
                # name is durable before its records are written: a power cut never
                # leaves a segment behind a torn one, or after a missing one.
                with self._lock:
                    self._segments.append(seq)
                    fd = self._fd(seq)
                os.ftruncate(fd, 0)
                if self.sync:
                    _fsync_dir(self.directory)
            fd = self._fd(seq)
            _write_at(fd, records, off)
            if self.sync:
                os.fdatasync(fd)
        self._tail_size = batch.size
        with self._lock:
            for apply in applies:
                apply()

    def _collect(self) -> None:
        """Delete the oldest segments no group needs; when too many are kept, write the
        small groups that hold the oldest one again at the tail first."""
        for _ in range(len(self._segments)):
            needed = [s for s in (v._oldest_segment() for v in self._groups.values()) if s]
            oldest = min(needed, default=self._segments[-1])
            doomed = [s for s in self._segments[:-1] if s < oldest]
            for seq in doomed:  # oldest first, each gone for good before the next goes:
                with self._lock:  # a crash never leaves a gap between segments
                    self._segments.remove(seq)
                    self._delete_segment(seq)
                if self.sync:
                    _fsync_dir(self.directory)
            if len(self._segments) <= self.max_segments:
                return
            first = self._segments[0]
            holders = [v for v in self._groups.values() if v._oldest_segment() == first]
            small = self.segment_bytes // 8
            if any(sum(v._rec_len) > small for v in holders):
                return  # a large log holds it: its own compaction will free it
            batch = _Batch(self)
            applies: list[Callable[[], None]] = []
            with self._lock:
                for v in holders:
                    applies.extend(v._plan(_RELOCATE, None, batch))
            self._write(batch, applies)

    # ------------------------------------------------------------------ files

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, _seg_name(seq))

    def _recover(self) -> None:
        # None: a WAL of before 2026-12-04, whose groups' terms no ceiling bounds
        terms = _read_checked(os.path.join(self.directory, _TERMS), _TermCeiling)
        registered = self._registry.read()
        names = os.listdir(self.directory)  # once: thousands of groups, thousands of dirs
        seqs = []
        for name in sorted(names):
            if name.startswith(_SEG_PREFIX) and name.endswith(_SEG_SUFFIX):
                try:
                    seqs.append(int(name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]))
                except ValueError:
                    raise StorageCorruption(f"{os.path.join(self.directory, name)}: not a "
                                            "segment name") from None
        damaged = None
        for k, seq in enumerate(seqs):
            if k and seq != seqs[k - 1] + 1:
                damaged = self._damaged(seq, 0, f"follows segment {seqs[k - 1]}: a segment "
                                        "is missing", seqs[k:])
                break
            self._segments.append(seq)
            damaged = self._scan(seq, seqs[k + 1:])
            if damaged:
                break
        marker = os.path.join(self.directory, _REPAIRING)
        repairing = _read_checked(marker, _Repairing)
        if not damaged and repairing is not None:
            log.warning("%s: finishing a repair that a crash interrupted: every group is "
                        "marked recovering", self.directory,
                        extra={"event": "repair_finished", "path": self.directory})
            damaged = True
        if damaged and self._segments:  # the cut segment, or the one before the gap
            self._tail_size = os.path.getsize(self._path(self._segments[-1]))
        snapshots = _snapshot_dirs(names)  # recovery creates none, deletes none
        if repairing is not None:  # a group the cut took every record of is known by
            for group_id in repairing.groups + snapshots:  # what it dropped, or by its
                self.group(group_id)  # snapshot
        if damaged:  # a group the registry names and no record read does: all of its
            for group_id in registered:  # records lay in the damage
                self.group(group_id)
        else:
            snapshots = self._remove_dropped_snapshots(snapshots)
        if damaged and terms is None:
            log.error("%s: REPAIR: no terms file (a WAL written before 2026-12-04): the "
                      "groups keep the terms of their last STATE records kept, which may "
                      "be older than they were", self.directory,
                      extra={"event": "repair", "path": self.directory})
        for view in self._groups.values():
            if damaged:
                view._mark_recovering()
                if terms is not None:
                    view._start_past(terms.ceiling)
            view._check_recovered()
        if terms is None:
            self._raise_term_ceiling(max((v._state.hard_state.current_term
                                          for v in self._groups.values()), default=0))
        else:
            self._term_ceiling = terms.ceiling
        self._registry.rewrite(set(self._groups).union(snapshots))
        for view in self._groups.values():
            view._registered = True
        if damaged:  # every group's clamped state, durable before anything else
            self._write_batch([(v, STATE, v._state.hard_state, None)
                               for v in self._groups.values()])
            os.unlink(marker)
            if self.sync:
                _fsync_dir(self.directory)

    def _remove_dropped_snapshots(self, snapshots: list[int]) -> list[int]:
        """A start of an undamaged WAL: the snapshot directory of a group whose last
        record is its DROP is one that a crash kept ``drop_group`` from deleting. It
        goes, so that a new group of that id does not start from it. Returns the groups
        of the ``snapshots`` kept."""
        kept = []
        for group_id in snapshots:
            if group_id not in self._replayed_drops or group_id in self._groups:
                kept.append(group_id)
            else:
                path = os.path.join(self.directory, f"{_GROUP_DIR}{group_id}")
                log.warning("%s: deleting the snapshot of group %d, which the WAL no longer "
                            "holds (a drop_group a crash interrupted)", path, group_id,
                            extra={"event": "drop_finished", "path": path})
                self._delete_snapshot_dir(path)
        return kept

    def _damaged(self, seq: int, pos: int, what: str, later: list[int]) -> bool:
        """Damage that no crash explains, at ``pos`` of segment ``seq``: with ``repair``
        everything from there on is dropped (True), else StorageCorruption."""
        path = self._path(seq)
        if not self.repair:
            raise StorageCorruption(
                f"{path}: {what} at offset {pos}; expected an intact record (restore this "
                "host from a replica, or see docs/multiraft.md, \"Repairing a host\")")
        written = self._groups_in([(seq, pos)] + [(s, 0) for s in later])
        log.error("%s: REPAIR: dropping everything from offset %d (%s) and every later "
                  "segment; every group here may have lost entries it acknowledged and "
                  "will not vote until its leader has caught it up, also these, which "
                  "had records in what is dropped: %s (and every group the registry "
                  "names; docs/multiraft.md, \"Repairing a host\")", path,
                  pos, what, ", ".join(map(str, written)) or "none",
                  extra={"event": "repair", "path": path, "offset": pos, "damage": what,
                         "groups": written})
        # Until every group's recovering mark is durable (written after the cut, at the
        # new end of the WAL), the marker says that a repair is under way, and which
        # groups it drops records of (a repair done again after a power cut finds fewer):
        # a power cut in between must not leave groups that lost entries and would vote.
        before = _read_checked(os.path.join(self.directory, _REPAIRING), _Repairing)
        groups = sorted(set(written) | set(before.groups if before else ()))
        _write_atomically(self.directory, _REPAIRING, _checked(_Repairing(groups)), self.sync)
        # The later segments go before the cut: a cut segment followed by one of them
        # would be replayed as one log, without what the cut dropped.
        _unlink_newest_first(self.directory, [self._path(s) for s in later], self.sync)
        if os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return True

    def _groups_in(self, spans: list[tuple[int, int]]) -> list[int]:
        """The groups with an intact record in the given (segment, from offset) spans."""
        found: set[int] = set()
        for seq, start in spans:
            with open(self._path(seq), "rb") as f:
                data = f.read()
            found.update(_TAG.unpack_from(body)[0] for body in _intact_records(data, start)
                         if len(body) >= _TAG.size)
        return sorted(found)

    def _scan(self, seq: int, later: list[int]) -> bool:
        """Replay one segment; True if repair cut the WAL in it (see ``_damaged``)."""
        path = self._path(seq)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            try:
                end, body, mark = _record_at(data, pos)
                if len(body) < _TAG.size:
                    raise _Damage(pos, "a record too short for its group tag", False)
                group_id, kind = _TAG.unpack_from(body)
                self.group(group_id)._replay(kind, body[_TAG.size:], mark, seq, pos,
                                             end - pos)
            except _Damage as damage:
                if damage.torn and _valid_record_after(data, pos + 1):
                    damage.torn = False
                    damage.what += " followed by intact records"
                if later or not damage.torn:
                    where = " in a segment that is not the last" if later else ""
                    return self._damaged(seq, damage.pos, damage.what + where, later)
                log.warning("%s: truncating %s at offset %d: a write torn by a crash, never "
                            "acknowledged", path, damage.what, pos,
                            extra={"event": "torn_write", "path": path, "offset": pos})
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                break
            pos = end
        if not later:
            self._tail_size = pos
        return False
