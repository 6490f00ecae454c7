"""A conformance suite for ``RaftStorage`` implementations (yours and ours).

Each check is a coroutine function ``check(factory)`` where ``factory`` is a
``StorageFactory``: ``new()`` returns an empty store and ``reopen(store)`` returns the same
data as a restarted process would see it (close and open again; for an in-memory store, the
same object). Optionally ``lose_hard_state(store)`` destroys the durable hard state the way
a failing disk would (for a file-based store, delete the file) and returns the store as a
restart would open it, or raises: losing the hard state under a non-empty log must be
``StorageCorruption``, never a silent term 0. Sync and async storage methods are both
accepted. Run all of them::

    import asyncio
    from fastraft.testing import storage_suite

    asyncio.run(storage_suite.run_all(MyFactory()))

or one pytest test per check::

    @pytest.mark.parametrize("check", storage_suite.CHECKS, ids=lambda c: c.__name__)
    def test_storage(check):
        asyncio.run(check(MyFactory()))
"""
from __future__ import annotations

import asyncio
import inspect
import io
from typing import Any, Protocol

from fastraft.errors import StorageCorruption
from fastraft.messages import Entry, EntryKind, HardState, Membership
from fastraft.storage import SnapshotMeta


class StorageFactory(Protocol):
    def new(self) -> Any: ...

    def reopen(self, store: Any) -> Any: ...


async def _do(result: Any) -> Any:
    """A storage method's result: awaited if the method is a coroutine (the store under
    test may have either kind, method by method)."""
    if inspect.isawaitable(result):
        return await result
    return result


def _entries(first: int, last: int, term: int, size: int = 10) -> list[Entry]:
    return [Entry(term, i, EntryKind.NORMAL, b"%d:" % i + b"x" * size)
            for i in range(first, last + 1)]


def _plain(entries: list[Entry]) -> list[tuple[Any, ...]]:
    return [(e.term, e.index, int(e.kind), bytes(e.data)) for e in entries]


async def _read_all(store: Any) -> list[tuple[Any, ...]]:
    st = await _do(store.load_state())
    return _plain(await _do(store.read_entries(st.first_index, st.last_index + 1)))


async def check_empty_store(factory: StorageFactory) -> None:
    store = factory.new()
    st = await _do(store.load_state())
    assert st.hard_state == HardState(), st.hard_state
    assert st.snapshot is None
    assert (st.first_index, st.last_index) == (1, 0), (st.first_index, st.last_index)
    assert await _do(store.load_snapshot()) is None
    assert await _do(store.read_entries(1, 1)) == []


async def check_append_and_read_ranges(factory: StorageFactory) -> None:
    store = factory.new()
    await _do(store.append_entries(_entries(1, 5, 1)))
    await _do(store.append_entries(_entries(6, 6, 2)))
    await _do(store.append_entries(_entries(7, 20, 3)))
    st = await _do(store.load_state())
    assert (st.first_index, st.last_index) == (1, 20)
    assert await _read_all(store) == _plain(_entries(1, 5, 1) + _entries(6, 6, 2)
                                            + _entries(7, 20, 3))
    middle = await _do(store.read_entries(4, 9))
    assert [e.index for e in middle] == [4, 5, 6, 7, 8]
    assert [e.term for e in middle] == [1, 1, 2, 3, 3]
    # a byte budget returns a prefix, and always at least one entry
    entry_bytes = len(_entries(1, 1, 1)[0].data)
    some = await _do(store.read_entries(1, 21, entry_bytes * 3))
    assert [e.index for e in some] == [1, 2, 3]
    one = await _do(store.read_entries(1, 21, 1))
    assert [e.index for e in one] == [1]


async def check_truncate_and_reappend(factory: StorageFactory) -> None:
    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    await _do(store.truncate_suffix(7))  # in the middle of a batch
    st = await _do(store.load_state())
    assert st.last_index == 6
    await _do(store.append_entries(_entries(7, 8, 2)))
    await _do(store.truncate_suffix(20))  # beyond the end: nothing happens
    assert await _read_all(store) == _plain(_entries(1, 6, 1) + _entries(7, 8, 2))
    await _do(store.truncate_suffix(1))
    assert (await _do(store.load_state())).last_index == 0
    await _do(store.append_entries(_entries(1, 2, 3)))
    assert await _read_all(store) == _plain(_entries(1, 2, 3))
    store = factory.reopen(store)
    assert await _read_all(store) == _plain(_entries(1, 2, 3))


async def check_truncate_right_after_the_compaction_point(factory: StorageFactory) -> None:
    """A follower compacts up to its snapshot in the middle of a batch it wrote, then a
    new leader cuts the entries after it: the log goes on from there, and opens again
    (it was refused: "a record of index 9 where 5 was expected")."""
    store = factory.new()
    await _do(store.append_entries(_entries(1, 4, 1)))
    await _do(store.append_entries(_entries(5, 10, 1)))
    membership = Membership(voters=frozenset({1, 2, 3}))
    await _do(store.save_snapshot(SnapshotMeta(8, 1, membership), io.BytesIO(b"at 8")))
    await _do(store.compact_prefix(8))
    await _do(store.truncate_suffix(9))
    await _do(store.append_entries(_entries(9, 12, 2)))
    for _ in range(2):
        store = factory.reopen(store)
        st = await _do(store.load_state())
        assert (st.first_index, st.last_index) == (9, 12), (st.first_index, st.last_index)
        assert await _read_all(store) == _plain(_entries(9, 12, 2))


async def check_hard_state_round_trip(factory: StorageFactory) -> None:
    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    for hs in (HardState(1, None, 0), HardState(5, 3, 2), HardState(6, None, 9),
               HardState(6, 2, 9, True)):
        await _do(store.save_hard_state(hs))
        assert (await _do(store.load_state())).hard_state == hs
    store = factory.reopen(store)
    assert (await _do(store.load_state())).hard_state == HardState(6, 2, 9, True)


async def check_hard_state_never_older_than_the_log(factory: StorageFactory) -> None:
    """The term and vote survive a reopen whatever was appended after them; a store that
    lost them refuses to open (a term 0 under a log of term 3 would allow a second vote
    in a term, §5.2)."""
    store = factory.new()
    await _do(store.save_hard_state(HardState(3, 2, 0)))
    await _do(store.append_entries(_entries(1, 5, 3)))
    store = factory.reopen(store)
    st = await _do(store.load_state())
    assert (st.hard_state.current_term, st.hard_state.voted_for) == (3, 2), st.hard_state
    lose = getattr(factory, "lose_hard_state", None)
    if lose is not None:
        try:
            store = lose(store)
        except StorageCorruption:
            return
        st = await _do(store.load_state())
        raise AssertionError(f"a store that lost its hard state opened at term "
                             f"{st.hard_state.current_term} over a log of term 3")


async def check_identity(factory: StorageFactory) -> None:
    """The owner is recorded once and survives a reopen (the node refuses a storage
    owned by another node or cluster)."""
    store = factory.new()
    st = await _do(store.load_state())
    assert (st.node_id, st.cluster_id) == (0, ""), (st.node_id, st.cluster_id)
    await _do(store.save_identity(3, "beta"))
    await _do(store.append_entries(_entries(1, 2, 1)))
    store = factory.reopen(store)
    st = await _do(store.load_state())
    assert (st.node_id, st.cluster_id) == (3, "beta"), (st.node_id, st.cluster_id)


async def _snapshot_bytes(store: Any) -> tuple[SnapshotMeta, bytes] | None:
    loaded = await _do(store.load_snapshot())
    if loaded is None:
        return None
    meta, reader = loaded
    try:
        return meta, reader.read()
    finally:
        reader.close()


class _ChunkedSource(io.RawIOBase):
    """A snapshot stream that refuses to be read whole: storage must copy it in chunks."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert size is not None and size >= 0, "storage read a snapshot stream whole"
        self.reads += 1
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += len(chunk)
        return chunk


async def check_snapshot_and_compaction(factory: StorageFactory) -> None:
    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    await _do(store.append_entries(_entries(11, 30, 2)))
    # every field of the configuration comes back: the nodes it names as removed too
    # (a removed node knows it is out after a restart only from them)
    membership = Membership(voters=frozenset({1, 2, 3}), learners=frozenset({5}),
                            addresses={1: "a:1"}, removed=frozenset({4}))
    meta = SnapshotMeta(12, 2, membership)
    data = b"state-machine-bytes" * 100
    await _do(store.save_snapshot(meta, io.BytesIO(data)))
    await _do(store.compact_prefix(12))
    st = await _do(store.load_state())
    # the compacted boundary keeps its term through the snapshot metadata
    assert st.snapshot == meta and st.snapshot.last_included_term == 2
    assert (st.first_index, st.last_index) == (13, 30)
    assert [e.index for e in await _do(store.read_entries(13, 16))] == [13, 14, 15]
    assert await _snapshot_bytes(store) == (meta, data)
    await _do(store.append_entries(_entries(31, 31, 3)))
    store = factory.reopen(store)
    st = await _do(store.load_state())
    assert (st.first_index, st.last_index) == (13, 31) and st.snapshot == meta
    assert await _read_all(store) == _plain(_entries(13, 30, 2) + _entries(31, 31, 3))
    assert await _snapshot_bytes(store) == (meta, data)


async def check_snapshot_streams(factory: StorageFactory) -> None:
    """Snapshot data goes in as a stream read in chunks, and comes out as independent,
    seekable readers; a reader opened before a newer snapshot is saved still reads the
    old one to its end (the node may be sending it to a follower)."""
    store = factory.new()
    old_meta = SnapshotMeta(5, 1, Membership(voters=frozenset({1})))
    old = bytes(range(256)) * 12289  # a little over 3 MiB
    source = _ChunkedSource(old)
    await _do(store.save_snapshot(old_meta, source))
    assert source.reads > 1
    meta, first = await _do(store.load_snapshot())
    _, second = await _do(store.load_snapshot())
    try:
        assert meta == old_meta
        assert first.read(1000) == old[:1000]
        second.seek(len(old) - 10)
        assert second.read() == old[-10:]
        first.seek(2_000_000)
        new_meta = SnapshotMeta(9, 2, Membership(voters=frozenset({1})))
        await _do(store.save_snapshot(new_meta, io.BytesIO(b"newer")))
        assert first.read() == old[2_000_000:]
    finally:
        first.close()
        second.close()
    assert await _snapshot_bytes(store) == (new_meta, b"newer")
    store = factory.reopen(store)
    assert await _snapshot_bytes(store) == (new_meta, b"newer")


async def check_snapshot_past_the_end_of_the_log(factory: StorageFactory) -> None:
    """A snapshot from the leader that reaches past this log: what the node does (save it,
    cut the conflicting log, compact), and what a crash right after the save leaves (the
    snapshot and the old records): either way the log goes on right after the snapshot."""
    meta = SnapshotMeta(20, 2, Membership(voters=frozenset({1, 2, 3})))
    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    await _do(store.save_snapshot(meta, io.BytesIO(b"state at 20")))
    await _do(store.truncate_suffix(1))
    await _do(store.compact_prefix(20))
    await _do(store.append_entries(_entries(21, 25, 2)))
    st = await _do(store.load_state())
    assert (st.first_index, st.last_index) == (21, 25), (st.first_index, st.last_index)
    assert await _read_all(store) == _plain(_entries(21, 25, 2))
    store = factory.reopen(store)
    assert await _read_all(store) == _plain(_entries(21, 25, 2))

    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    await _do(store.save_snapshot(meta, io.BytesIO(b"state at 20")))
    store = factory.reopen(store)  # the crash: nothing after the save happened
    st = await _do(store.load_state())
    assert st.snapshot == meta and (st.first_index, st.last_index) == (21, 20)
    await _do(store.append_entries(_entries(21, 25, 2)))
    store = factory.reopen(store)
    assert await _read_all(store) == _plain(_entries(21, 25, 2))
    await _do(store.truncate_suffix(23))
    await _do(store.append_entries(_entries(23, 24, 3)))
    store = factory.reopen(store)
    assert await _read_all(store) == _plain(_entries(21, 22, 2) + _entries(23, 24, 3))

    # the same over a log compacted to its end (no entry held): after the crash the log
    # goes on after the snapshot, and opens again (it was refused: "the log starts at
    # index 21 but entries after 10 were never compacted")
    store = factory.new()
    await _do(store.append_entries(_entries(1, 10, 1)))
    await _do(store.save_snapshot(SnapshotMeta(10, 1, meta.membership), io.BytesIO(b"at 10")))
    await _do(store.compact_prefix(10))
    await _do(store.save_snapshot(meta, io.BytesIO(b"state at 20")))
    store = factory.reopen(store)  # the crash: nothing after the save happened
    await _do(store.append_entries(_entries(21, 25, 2)))
    for _ in range(2):
        store = factory.reopen(store)
        st = await _do(store.load_state())
        assert st.snapshot == meta and (st.first_index, st.last_index) == (21, 25)
        assert await _read_all(store) == _plain(_entries(21, 25, 2))


async def check_reopen_preserves_everything(factory: StorageFactory) -> None:
    store = factory.new()
    await _do(store.save_hard_state(HardState(3, 2, 7)))
    batches = [_entries(1, 1, 1), _entries(2, 50, 2, size=100), _entries(51, 51, 3)]
    for b in batches:
        await _do(store.append_entries(b))
    store = factory.reopen(store)
    st = await _do(store.load_state())
    assert st.hard_state == HardState(3, 2, 7)
    assert await _read_all(store) == _plain([e for b in batches for e in b])
    # and it keeps working after the reopen
    await _do(store.append_entries(_entries(52, 52, 3)))
    store = factory.reopen(store)
    assert (await _do(store.load_state())).last_index == 52


async def check_snapshot_within_the_log_keeps_it(factory: StorageFactory) -> None:
    """A snapshot whose last entry the log holds with its term does not replace the log:
    what it covers is read until compacted (retention keeps records behind snapshots)."""
    store = factory.new()
    await _do(store.append_entries(_entries(1, 30, 1)))
    membership = Membership(voters=frozenset({1}))
    await _do(store.save_snapshot(SnapshotMeta(20, 1, membership), io.BytesIO(b"s")))
    for _ in range(2):
        st = await _do(store.load_state())
        assert (st.first_index, st.last_index) == (1, 30), (st.first_index, st.last_index)
        assert await _read_all(store) == _plain(_entries(1, 30, 1))
        store = factory.reopen(store)
    await _do(store.compact_prefix(10))
    await _do(store.append_entries(_entries(31, 31, 2)))
    store = factory.reopen(store)
    st = await _do(store.load_state())
    assert (st.first_index, st.last_index) == (11, 31)
    assert await _read_all(store) == _plain(_entries(11, 30, 1) + _entries(31, 31, 2))


async def check_entries_a_snapshot_replaced_stay_gone(factory: StorageFactory) -> None:
    """A leader's snapshot at an entry this log holds in another term replaces the log
    up to it; a crash right after the save leaves that entry in storage. The log goes on
    after the snapshot, and a later snapshot that the new entries match, which keeps the
    log it covers, does not bring the replaced entry back."""
    membership = Membership(voters=frozenset({1, 2, 3}))
    store = factory.new()
    await _do(store.append_entries(_entries(1, 3, 1)))
    await _do(store.save_snapshot(SnapshotMeta(3, 2, membership), io.BytesIO(b"leader's")))
    store = factory.reopen(store)  # the crash: nothing after the save happened
    await _do(store.append_entries(_entries(4, 6, 2)))
    await _do(store.save_snapshot(SnapshotMeta(5, 2, membership), io.BytesIO(b"own")))
    for _ in range(2):
        st = await _do(store.load_state())
        assert (st.first_index, st.last_index) == (4, 6), (st.first_index, st.last_index)
        assert await _read_all(store) == _plain(_entries(4, 6, 2))
        assert _plain(await _do(store.read_entries(1, 7))) == _plain(_entries(4, 6, 2))
        store = factory.reopen(store)


def _varied(first: int, last: int, term: int) -> list[Entry]:
    """Entries with payloads of 1 to about 3,000 bytes (sizes a byte budget must see)."""
    return [Entry(term, i, EntryKind.NORMAL, b"%d:" % i + b"v" * (i * 37 % 3001))
            for i in range(first, last + 1)]


async def _check_range(store: Any, expected: dict[int, tuple[Any, ...]], lo: int, hi: int,
                       max_bytes: int | None = None) -> None:
    got = await _do(store.read_entries(lo, hi, max_bytes))
    want = [expected[i] for i in range(lo, hi)]
    if max_bytes is None:
        assert _plain(got) == want, (lo, hi, [e.index for e in got])
        return
    # a prefix, at least one entry, within the budget unless it is one entry, and as
    # long as the budget allows
    assert got and _plain(got) == want[:len(got)], (lo, hi, max_bytes)
    size = sum(len(e.data) for e in got)
    assert len(got) == 1 or size <= max_bytes, (lo, hi, max_bytes, size)
    if len(got) < len(want):
        assert size + len(want[len(got)][3]) > max_bytes, (lo, hi, max_bytes)


async def check_reads(factory: StorageFactory) -> None:
    """Ranges of every shape: across records and segments, under byte budgets, across a
    truncation and after compaction; reads while appends run."""
    store = factory.new()
    expected: dict[int, tuple[Any, ...]] = {}
    index = 1
    for k, size in enumerate([1, 7, 50, 3, 1, 90, 20, 28]):
        batch = _varied(index, index + size - 1, 1 + k // 3)
        await _do(store.append_entries(batch))
        expected.update((e[1], e) for e in _plain(batch))
        index += size
    last = index - 1  # 200
    for lo, hi in [(1, 201), (1, 2), (2, 9), (8, 9), (9, 60), (55, 150), (199, 201), (150, 151)]:
        await _check_range(store, expected, lo, hi)
        for budget in (1, 100, 2_000, 10_000, 100_000):
            await _check_range(store, expected, lo, hi, budget)
    # a truncation inside a record, then entries of a later term in its place
    await _do(store.truncate_suffix(120))
    newer = _varied(120, 160, 9)
    await _do(store.append_entries(newer))
    for e in _plain(newer):
        expected[e[1]] = e
    for k in range(161, last + 1):
        del expected[k]
    await _check_range(store, expected, 100, 161)
    await _check_range(store, expected, 118, 125, 3_000)
    # compaction: what follows the compaction point reads as before; what it covered is
    # not the log any more: a range that starts before it starts at the first entry held
    membership = Membership(voters=frozenset({1}))
    await _do(store.save_snapshot(SnapshotMeta(70, expected[70][0], membership),
                                  io.BytesIO(b"s")))
    await _do(store.compact_prefix(70))
    await _check_range(store, expected, 71, 161)
    await _check_range(store, expected, 71, 161, 5_000)
    early = await _do(store.read_entries(60, 75))
    assert [e.index for e in early] == [71, 72, 73, 74], [e.index for e in early]
    store = factory.reopen(store)
    await _check_range(store, expected, 71, 161)

    # reads while appends run: every entry read is the one appended at its index
    appended = [_varied(k, k + 9, 10) for k in range(161, 361, 10)]

    async def appends() -> None:
        for batch in appended:
            await _do(store.append_entries(batch))

    async def reads() -> int:
        seen = 0
        for k in range(60):
            st = await _do(store.load_state())
            lo = 71 + (k * 13) % max(st.last_index - 71, 1)
            got = await _do(store.read_entries(lo, st.last_index + 1, 20_000))
            for e in got:
                want = expected.get(e.index) or _plain(appended[(e.index - 161) // 10])[
                    (e.index - 161) % 10]
                assert _plain([e])[0] == want, e.index
            seen += len(got)
        return seen

    _, seen = await asyncio.gather(appends(), reads())
    assert seen > 0
    for batch in appended:
        expected.update((e[1], e) for e in _plain(batch))
    await _check_range(store, expected, 71, 361)


CHECKS = [check_empty_store, check_append_and_read_ranges, check_truncate_and_reappend,
          check_truncate_right_after_the_compaction_point, check_hard_state_round_trip,
          check_hard_state_never_older_than_the_log, check_identity,
          check_snapshot_and_compaction, check_snapshot_streams,
          check_snapshot_past_the_end_of_the_log, check_reopen_preserves_everything,
          check_snapshot_within_the_log_keeps_it, check_entries_a_snapshot_replaced_stay_gone,
          check_reads]


async def run_all(factory: StorageFactory) -> None:
    for check in CHECKS:
        await check(factory)
