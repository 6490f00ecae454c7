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

import inspect
import io
from typing import Any, Protocol

from fastraft.errors import StorageCorruption
from fastraft.messages import Entry, EntryKind, HardState, Membership
from fastraft.storage import SnapshotMeta


class StorageFactory(Protocol):
    def new(self) -> Any: ...

    def reopen(self, store: Any) -> Any: ...


async def _do(result):
    if inspect.isawaitable(result):
        return await result
    return result


def _entries(first: int, last: int, term: int, size: int = 10) -> list[Entry]:
    return [Entry(term, i, EntryKind.NORMAL, b"%d:" % i + b"x" * size)
            for i in range(first, last + 1)]


def _plain(entries) -> list[tuple]:
    return [(e.term, e.index, int(e.kind), bytes(e.data)) for e in entries]


async def _read_all(store) -> list[tuple]:
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


async def _snapshot_bytes(store) -> tuple[SnapshotMeta, bytes] | None:
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
    membership = Membership(voters=frozenset({1, 2, 3}), addresses={1: "a:1"})
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


CHECKS = [check_empty_store, check_append_and_read_ranges, check_truncate_and_reappend,
          check_hard_state_round_trip, check_hard_state_never_older_than_the_log,
          check_identity, check_snapshot_and_compaction, check_snapshot_streams,
          check_snapshot_past_the_end_of_the_log, check_reopen_preserves_everything]


async def run_all(factory: StorageFactory) -> None:
    for check in CHECKS:
        await check(factory)
