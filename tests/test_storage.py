"""The storage conformance suite against every built-in storage, and FileStorage's own
recovery, corruption and locking behaviour."""
import asyncio
import io
import os

import pytest

from fastraft.errors import ConfigError, StorageCorruption, StorageFailed
from fastraft.filestorage import FileStorage, StorageLocked
from fastraft.messages import Entry, EntryKind, HardState, Membership, SnapshotMeta
from fastraft.sharedwal import SharedWAL
from fastraft.storage import AsyncMemoryStorage, MemoryStorage
from fastraft.testing import storage_suite


class MemoryFactory:
    cls = MemoryStorage

    def new(self):
        return self.cls()

    def reopen(self, store):
        return store  # a restart in the same process keeps the object


class AsyncMemoryFactory(MemoryFactory):
    cls = AsyncMemoryStorage


class FileFactory:
    def __init__(self, tmp_path, **kw):
        self.tmp_path = tmp_path
        self.kw = kw
        self.n = 0
        self.open = []

    def new(self):
        self.n += 1
        store = FileStorage(str(self.tmp_path / f"s{self.n}"), **self.kw)
        self.open.append(store)
        return store

    def reopen(self, store):
        store.close()
        new = FileStorage(store.directory, **self.kw)
        self.open.append(new)
        return new

    def lose_hard_state(self, store):
        store.close()
        os.unlink(os.path.join(store.directory, "state"))
        return self.reopen(store)

    def close_all(self):
        for s in self.open:
            s.close()


class _Interleaved:
    """A group's view of a shared WAL whose every write shares its batch with a write of
    another group (appends, state), so the records of the two interleave."""

    def __init__(self, view, neighbour):
        self.view = view
        self.neighbour = neighbour

    def __getattr__(self, name):
        return getattr(self.view, name)

    async def _with_neighbour(self, op):
        n = self.neighbour
        last = n.load_state().last_index
        await asyncio.gather(op, n.append_entries(
            [Entry(1, last + 1, EntryKind.NORMAL, b"neighbour %d" % (last + 1))]))

    async def append_entries(self, entries):
        await self._with_neighbour(self.view.append_entries(entries))

    async def truncate_suffix(self, index):
        await self._with_neighbour(self.view.truncate_suffix(index))

    async def save_hard_state(self, hard_state):
        await self._with_neighbour(self.view.save_hard_state(hard_state))


class SharedWALFactory:
    """Every store of a check is a group of one shared WAL, next to a busy neighbour
    group (id 0); a reopen closes and reopens the whole WAL."""

    def __init__(self, tmp_path, **kw):
        self.path = str(tmp_path / "wal")
        self.kw = kw
        self.wal = SharedWAL(self.path, **kw)
        self.n = 0

    def _store(self, group_id):
        return _Interleaved(self.wal.group(group_id), self.wal.group(0))

    def new(self):
        self.n += 1
        return self._store(self.n)

    def reopen(self, store):
        neighbour = self.wal.group(0).load_state()
        self.wal.close()
        self.wal = SharedWAL(self.path, **self.kw)
        assert self.wal.group(0).load_state().last_index == neighbour.last_index
        return self._store(store.group_id)

    def close_all(self):
        self.wal.close()


@pytest.fixture(params=["memory", "async-memory", "file", "file-small-segments",
                        "shared-wal", "shared-wal-small-segments"])
def factory(request, tmp_path):
    if request.param == "memory":
        yield MemoryFactory()
    elif request.param == "async-memory":
        yield AsyncMemoryFactory()
    elif request.param.startswith("shared-wal"):
        kw = {"segment_bytes": 300, "max_segments": 2} if "small" in request.param else {}
        f = SharedWALFactory(tmp_path, **kw)
        yield f
        f.close_all()
    else:
        kw = {"segment_bytes": 300} if request.param == "file-small-segments" else {}
        f = FileFactory(tmp_path, **kw)
        yield f
        f.close_all()


@pytest.mark.parametrize("check", storage_suite.CHECKS, ids=lambda c: c.__name__)
def test_conformance(factory, check):
    asyncio.run(check(factory))


class NoTruncation(MemoryStorage):
    def truncate_suffix(self, index):
        pass  # keeps the entries it was told to cut


def test_run_all_runs_the_checks_and_fails_on_a_store_that_breaks_one():
    """The module's "run all of them" entry point passes a conforming store and fails
    one that keeps the entries it was told to cut."""
    asyncio.run(storage_suite.run_all(MemoryFactory()))
    broken = MemoryFactory()
    broken.cls = NoTruncation
    with pytest.raises(AssertionError):
        asyncio.run(storage_suite.run_all(broken))


def entries(first, last, term=1, size=20):
    return [Entry(term, i, EntryKind.NORMAL, b"%06d" % i + b"p" * size)
            for i in range(first, last + 1)]


def fill(path, batches, **kw):
    async def go():
        s = FileStorage(str(path), **kw)
        for b in batches:
            await s.append_entries(b)
        await s.save_hard_state(HardState(2, 1, 3))
        s.close()
    asyncio.run(go())


def reopen_all(path, **kw):
    async def go():
        s = FileStorage(str(path), **kw)
        try:
            st = s.load_state()
            return st, await s.read_entries(st.first_index, st.last_index + 1)
        finally:
            s.close()
    return asyncio.run(go())


def only_segment(path):
    segs = sorted(p for p in os.listdir(path) if p.endswith(".seg"))
    return os.path.join(path, segs[-1]), segs


def test_records_written_in_parts_survive_short_writes(tmp_path, monkeypatch):
    """A record's header and body (and a SharedWAL's many records) are written from their
    parts in one gathered write, not copied into one buffer first: a system that writes
    a few bytes at a time, and takes few buffers a call, still gets every byte in order."""
    import fastraft.walformat as walformat

    calls = []

    def stingy(fd, buffers, offset):
        calls.append(len(buffers))
        return os.pwrite(fd, b"".join(buffers)[:5], offset)

    monkeypatch.setattr(walformat, "_pwritev", stingy)
    monkeypatch.setattr(walformat, "_IOV_MAX", 2)
    batches = [entries(1, 3), entries(4, 4, size=0), entries(5, 9, size=7)]
    fill(tmp_path / "file", batches)
    assert reopen_all(tmp_path / "file")[1] == [e for b in batches for e in b]

    async def shared():
        wal = SharedWAL(str(tmp_path / "wal"))
        one, two = wal.group(1), wal.group(2)
        await asyncio.gather(one.append_entries(entries(1, 3)),
                             two.append_entries(entries(1, 2, size=3)))
        wal.close()
        wal = SharedWAL(str(tmp_path / "wal"))
        try:
            return [await wal.group(g).read_entries(1, 4) for g in (1, 2)]
        finally:
            wal.close()
    assert asyncio.run(shared()) == [entries(1, 3), entries(1, 2, size=3)]
    assert calls and max(calls) <= 2


def test_torn_tail_is_truncated_and_logged(tmp_path, caplog):
    fill(tmp_path, [entries(1, 10), entries(11, 20)])
    seg, _ = only_segment(tmp_path)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.truncate(size - 7)  # the last write was cut short by a crash
    st, got = reopen_all(tmp_path)
    assert st.last_index == 10 and [e.index for e in got] == list(range(1, 11))
    assert "truncating" in caplog.text and "torn" in caplog.text
    assert st.hard_state == HardState(2, 1, 3)


def test_zero_filled_tail_is_truncated(tmp_path, caplog):
    fill(tmp_path, [entries(1, 10)])
    seg, _ = only_segment(tmp_path)
    with open(seg, "ab") as f:
        f.write(b"\0" * 4096)  # preallocated space a crash left unwritten
    st, got = reopen_all(tmp_path)
    assert st.last_index == 10
    assert "zero-filled" in caplog.text
    # and appending after recovery works
    fill(tmp_path, [entries(11, 12)])
    assert reopen_all(tmp_path)[0].last_index == 12


def test_bit_flip_in_a_middle_record_stops_start_up(tmp_path):
    fill(tmp_path, [entries(1, 10), entries(11, 20), entries(21, 30)])
    seg, _ = only_segment(tmp_path)
    with open(seg, "r+b") as f:
        f.seek(60)
        b = f.read(1)
        f.seek(60)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(StorageCorruption,
                       match=r"log-0+1\.seg: a record that fails its checksum at offset 0"):
        reopen_all(tmp_path)
    # nothing was truncated: the evidence is still there
    assert os.path.getsize(seg) > 60


def test_missing_segment_stops_start_up(tmp_path):
    fill(tmp_path, [entries(k, k + 9) for k in range(1, 60, 10)], segment_bytes=400)
    _, segs = only_segment(tmp_path)
    assert len(segs) >= 3
    os.unlink(os.path.join(tmp_path, segs[1]))
    with pytest.raises(StorageCorruption, match="a segment is missing"):
        reopen_all(tmp_path, segment_bytes=400)


def test_truncated_hard_state_file_stops_start_up(tmp_path):
    fill(tmp_path, [entries(1, 3)])
    state = os.path.join(tmp_path, "state")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) - 2)
    with pytest.raises(StorageCorruption, match=r"state: truncated"):
        reopen_all(tmp_path)


def test_options_of_another_type_or_range_are_refused_before_anything_is_opened(tmp_path):
    for args, kwargs, says in (((123,), {}, "the directory is a path, not int"),
                               ((str(tmp_path / "a"),), {"segment_bytes": 0},
                                "segment_bytes must be an int of at least 1, got 0"),
                               ((str(tmp_path / "b"),), {"cache_bytes": "8M"},
                                "cache_bytes must be an int of at least 0, got '8M'")):
        with pytest.raises(ConfigError, match=says):
            FileStorage(*args, **kwargs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_second_process_cannot_open_the_directory(tmp_path):
    first = FileStorage(str(tmp_path))
    try:
        with pytest.raises(StorageLocked, match="in use by another process"):
            FileStorage(str(tmp_path))
    finally:
        first.close()
    FileStorage(str(tmp_path)).close()  # released on close


def test_segments_roll_and_reads_cross_them(tmp_path):
    fill(tmp_path, [entries(k, k + 4) for k in range(1, 200, 5)], segment_bytes=1000)
    _, segs = only_segment(tmp_path)
    assert len(segs) > 5
    st, got = reopen_all(tmp_path, segment_bytes=1000)
    assert [e.index for e in got] == list(range(1, 201))
    assert [bytes(e.data)[:6] for e in got] == [b"%06d" % i for i in range(1, 201)]


SNAP_META = SnapshotMeta(3, 1, Membership(voters=frozenset({1})))


def save_snapshot(path, data, meta=SNAP_META):
    async def go():
        s = FileStorage(str(path))
        await s.append_entries(entries(1, 3))
        await s.save_snapshot(meta, io.BytesIO(data))
        s.close()
    asyncio.run(go())


def snapshot_data_file(path):
    names = [n for n in os.listdir(path) if n.startswith("snapshot-")]
    assert len(names) == 1, names
    return os.path.join(path, names[0])


def load_snapshot(path):
    async def go():
        s = FileStorage(str(path))
        try:
            meta, reader = await s.load_snapshot()
            with reader:
                return meta, reader.read()
        finally:
            s.close()
    return asyncio.run(go())


def test_snapshot_data_bit_flip_stops_start_up(tmp_path):
    save_snapshot(tmp_path, b"s" * 5000)
    data_file = snapshot_data_file(tmp_path)
    with open(data_file, "r+b") as f:
        f.seek(4000)
        f.write(b"t")
    with pytest.raises(StorageCorruption, match=r"snapshot-3-[0-9a-f]{8}\.data: fails its "
                                                r"checksum \(offset 0, 5000 bytes\)"):
        reopen_all(tmp_path)
    assert os.path.exists(data_file)  # the evidence is kept


def test_truncated_or_missing_snapshot_data_stops_start_up(tmp_path):
    save_snapshot(tmp_path, b"s" * 5000)
    data_file = snapshot_data_file(tmp_path)
    with open(data_file, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(StorageCorruption, match=r"\.data: 4096 bytes where the snapshot "
                                                r"metadata says 5000 \(offset 4096\)"):
        reopen_all(tmp_path)
    os.unlink(data_file)
    with pytest.raises(StorageCorruption, match=r"\.data: missing"):
        reopen_all(tmp_path)


def test_a_crash_in_the_middle_of_a_snapshot_save_keeps_the_old_snapshot(tmp_path):
    save_snapshot(tmp_path, b"old" * 100)
    old_file = snapshot_data_file(tmp_path)
    # a newer snapshot's data was being streamed (or was renamed into place) when the
    # process died, before the metadata switched to it
    for leftover in ("snapshot-tmp", "snapshot-9-0badc0de.data"):
        with open(os.path.join(tmp_path, leftover), "wb") as f:
            f.write(b"partial")
    assert load_snapshot(tmp_path) == (SNAP_META, b"old" * 100)
    assert snapshot_data_file(tmp_path) == old_file  # leftovers deleted at start-up


@pytest.mark.parametrize("kind", ["file", "shared-wal"])
def test_every_call_on_a_closed_store_is_storage_failed(kind, tmp_path):
    """A node still running on a store closed under it gets ``StorageFailed`` naming
    the store, not the RuntimeError of an executor shut down."""
    async def scenario():
        wal = SharedWAL(str(tmp_path / "wal")) if kind == "shared-wal" else None
        store = wal.group(1) if wal else FileStorage(str(tmp_path / "s"))
        await store.append_entries(entries(1, 2))
        (wal or store).close()
        calls = [store.append_entries(entries(3, 3)), store.truncate_suffix(2),
                 store.compact_prefix(1), store.save_hard_state(HardState(1, 1, 1)),
                 store.read_entries(1, 3), store.load_snapshot(),
                 store.save_snapshot(SNAP_META, io.BytesIO(b"s"))]
        for call in calls:
            with pytest.raises(StorageFailed, match="is closed"):
                await call
        if wal:
            with pytest.raises(StorageFailed, match="is closed"):
                await wal.drop_group(1)
    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["file", "shared-wal"])
def test_a_log_that_starts_right_after_an_uncompacted_snapshot_opens(kind, tmp_path):
    """What an append after a snapshot past the end of the log left before the append
    compacted up to it first (a crash between saving the snapshot and compacting): the
    log starts right after the snapshot, the compaction point stayed behind. The
    snapshot covers the gap: the store opens, and goes on (it refused to open)."""
    from msgspec.structs import replace

    def entries(first, last, term):
        return [Entry(term, i, EntryKind.NORMAL, b"e%d" % i) for i in range(first, last + 1)]

    async def scenario():
        meta = SnapshotMeta(20, 2, Membership(voters=frozenset({1})))
        wal = SharedWAL(str(tmp_path / "wal")) if kind == "shared-wal" else None
        store = wal.group(1) if wal else FileStorage(str(tmp_path / "s"))
        await store.append_entries(entries(1, 10, 1))
        await store.save_snapshot(SnapshotMeta(10, 1, meta.membership), io.BytesIO(b"10"))
        await store.compact_prefix(10)
        await store.save_snapshot(meta, io.BytesIO(b"at 20"))
        await store.append_entries(entries(21, 25, 2))
        # the compaction point as such a version left it: at 10
        store._state = replace(store._state, compacted_index=10, compacted_term=1)
        if wal:
            await store.save_hard_state(HardState(2, None, 0))  # a state record says so
            wal.close()
            wal = SharedWAL(str(tmp_path / "wal"))
            store = wal.group(1)
        else:
            store._write_state()
            store.close()
            store = FileStorage(str(tmp_path / "s"))
        assert store._state.compacted_index == 10
        st = store.load_state()
        assert st.snapshot == meta and (st.first_index, st.last_index) == (21, 25)
        assert await store.read_entries(1, 30) == entries(21, 25, 2)
        await store.append_entries(entries(26, 26, 2))
        assert store._state.compacted_index == 20
        if wal:
            wal.close()
            wal = SharedWAL(str(tmp_path / "wal"))
            store = wal.group(1)
        else:
            store.close()
            store = FileStorage(str(tmp_path / "s"))
        assert await store.read_entries(1, 30) == entries(21, 26, 2)
        (wal or store).close()

    asyncio.run(scenario())
