"""SharedWAL: many groups' logs in one set of segments. Group commit across groups,
recovery and damage, per-group compaction and the bound on segments kept, a failed sync,
and RaftHost groups on one WAL across a restart. (The storage conformance suite runs
against its group views in test_storage.py.)"""
import asyncio
import io
import logging
import os
import struct
import threading
import time

import msgspec
import pytest

from fastraft import walformat
from fastraft.config import Config
from fastraft.errors import ConfigError, InvalidArgument, StorageCorruption, StorageFailed
from fastraft.messages import Entry, EntryKind, HardState, Membership, SnapshotMeta
from fastraft.sharedwal import TERM_MARGIN, SharedWAL
from fastraft.testing import wait_until

from test_host import Hosts


def drive(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def entries(first, last, term=1, size=20, tag=b""):
    return [Entry(term, i, EntryKind.NORMAL, tag + b"%d:" % i + b"x" * size)
            for i in range(first, last + 1)]


def read_all(view):
    st = view.load_state()
    return [(e.term, e.index, bytes(e.data))
            for e in view._read_sync(st.first_index, st.last_index + 1, None)]


def plain(batch):
    return [(e.term, e.index, bytes(e.data)) for e in batch]


def test_writes_of_many_groups_in_one_loop_turn_share_one_batch(tmp_path):
    wal = SharedWAL(str(tmp_path / "wal"))

    async def main():
        await asyncio.gather(*(wal.group(g).append_entries(entries(1, 5, tag=b"g%d " % g))
                               for g in range(50)))
        assert (wal.batches, wal.ops) == (1, 50)
        # a second turn: state and entries of different groups, one batch again
        await asyncio.gather(wal.group(3).save_hard_state(HardState(2, 1, 0)),
                             wal.group(4).append_entries(entries(6, 6, tag=b"g4 ")))
        assert (wal.batches, wal.ops) == (2, 52)
    drive(main())
    wal.close()
    wal = SharedWAL(str(tmp_path / "wal"))
    try:
        assert wal.group_ids() == list(range(50))
        for g in range(50):
            want = entries(1, 6 if g == 4 else 5, tag=b"g%d " % g)
            assert read_all(wal.group(g)) == plain(want)
        assert wal.group(3).load_state().hard_state == HardState(2, 1, 0)
        assert len(wal.segments()) == 1
    finally:
        wal.close()


def test_two_writes_of_one_group_in_a_turn_stay_in_order(tmp_path):
    """A storage user that does not wait for one write before the next still gets them
    in order: the second goes in the next batch."""
    wal = SharedWAL(str(tmp_path / "wal"))

    async def main():
        view = wal.group(1)
        await asyncio.gather(view.append_entries(entries(1, 3)),
                             view.append_entries(entries(4, 6)))
        assert wal.batches == 2
    drive(main())
    assert read_all(wal.group(1)) == plain(entries(1, 6))
    wal.close()


def test_a_truncation_on_its_own_survives_a_reopen(tmp_path):
    wal = SharedWAL(str(tmp_path / "wal"))

    async def main():
        await wal.group(1).append_entries(entries(1, 10))
        await wal.group(2).append_entries(entries(1, 10))
        await wal.group(1).truncate_suffix(6)
    drive(main())
    wal.close()
    wal = SharedWAL(str(tmp_path / "wal"))
    try:
        assert read_all(wal.group(1)) == plain(entries(1, 5))
        assert read_all(wal.group(2)) == plain(entries(1, 10))
    finally:
        wal.close()


def segments(path):
    return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".seg")]


def write_two_groups(path, **kw):
    wal = SharedWAL(path, **kw)

    async def main():
        for k in range(4):
            await asyncio.gather(wal.group(1).append_entries(entries(k * 5 + 1, k * 5 + 5)),
                                 wal.group(2).append_entries(entries(k * 5 + 1, k * 5 + 5,
                                                                     term=2)))
    drive(main())
    wal.close()


def test_a_torn_tail_is_cut_and_logged_and_every_group_keeps_its_records(tmp_path, caplog):
    path = str(tmp_path / "wal")
    write_two_groups(path)
    seg = segments(path)[-1]
    with open(seg, "rb") as f:
        data = f.read()
    with open(seg, "ab") as f:  # the start of a record that never completed
        f.write(data[:30])
    wal = SharedWAL(path)
    try:
        assert read_all(wal.group(1)) == plain(entries(1, 20))
        assert read_all(wal.group(2)) == plain(entries(1, 20, term=2))
        assert "torn by a crash" in caplog.text
        assert os.path.getsize(seg) == len(data)
    finally:
        wal.close()


def test_a_bit_flip_in_an_earlier_record_stops_start_up(tmp_path):
    path = str(tmp_path / "wal")
    write_two_groups(path)
    seg = segments(path)[-1]
    with open(seg, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(StorageCorruption, match=r"wal-0+1\.seg: a record that fails its "
                                                r"checksum at offset 0"):
        SharedWAL(path)


def test_a_missing_segment_stops_start_up(tmp_path):
    path = str(tmp_path / "wal")
    write_two_groups(path, segment_bytes=300, max_segments=100)
    segs = sorted(n for n in os.listdir(path) if n.endswith(".seg"))
    assert len(segs) >= 3
    os.unlink(os.path.join(path, segs[1]))
    with pytest.raises(StorageCorruption, match="a segment is missing"):
        SharedWAL(path)


def test_a_lost_oldest_segment_is_caught_by_the_commit_mark(tmp_path):
    """Deleting the oldest segment looks like the WAL's own clean-up; the commit mark
    each group's state carries says committed entries went with it."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path, segment_bytes=300, max_segments=100)

    async def main():
        view = wal.group(7)
        await view.save_hard_state(HardState(1, 0, 0))
        await view.append_entries(entries(1, 5))
        view.commit_advanced(5)
        for k in range(10):  # another group fills later segments
            await wal.group(8).append_entries(entries(k + 1, k + 1, size=200))
    drive(main())
    wal.close()  # records group 7's commit mark in a STATE record at the tail
    os.unlink(segments(path)[0])
    with pytest.raises(StorageCorruption, match="group 7: the log ends at index 0 but "
                                                "entries up to 5 were committed"):
        SharedWAL(path)


def test_segments_stay_bounded_while_an_idle_group_holds_the_oldest(tmp_path):
    """A busy group compacts; an idle one wrote once, long ago. Its small log is written
    again at the tail, so old segments go and the count stays bounded."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path, segment_bytes=4096, max_segments=3)
    most = 0

    async def main():
        nonlocal most
        idle, busy = wal.group(1), wal.group(2)
        await idle.save_identity(1, "c/1")
        await idle.save_hard_state(HardState(4, 1, 0))
        await idle.append_entries(entries(1, 3, term=4))
        idle.commit_advanced(3)
        for k in range(300):
            await busy.append_entries(entries(k * 4 + 1, k * 4 + 4, size=100))
            busy.commit_advanced(k * 4 + 4)
            if k % 10 == 9:
                await busy.compact_prefix(k * 4)
            most = max(most, len(wal.segments()))
    drive(main())
    assert most <= 4, most
    assert os.path.basename(wal.segments()[0]) != "wal-00000000000000000001.seg"
    wal.close()
    wal = SharedWAL(path, segment_bytes=4096, max_segments=3)
    try:
        st = wal.group(1).load_state()
        assert (st.node_id, st.cluster_id) == (1, "c/1")
        assert st.hard_state == HardState(4, 1, 3)
        assert read_all(wal.group(1)) == plain(entries(1, 3, term=4))
        st = wal.group(2).load_state()
        assert (st.first_index, st.last_index) == (1197, 1200)
        assert read_all(wal.group(2)) == plain(entries(1197, 1200, size=100))
    finally:
        wal.close()


def test_a_group_written_again_at_the_tail_keeps_the_entries_behind_its_snapshot(tmp_path):
    """An idle group's snapshot covers entries it keeps (``snapshot_trailing_entries``,
    a follower behind catches up from them, §7). Written again at the tail to free the
    oldest segment, its log was cut and written anew, and the cut, holding no record of
    the snapshot's last entry for that moment, took the snapshot for one that replaces
    the log: until the next start, those entries were gone (a read of them returned
    only what follows the snapshot, which the node's log reader refuses). Found by
    tests/test_storage_model.py."""
    path = str(tmp_path / "wal")
    membership = Membership(voters=frozenset({1, 2, 3}))

    def opened():
        return SharedWAL(path, segment_bytes=2000, sync=False, max_segments=2)

    async def main():
        wal = opened()
        idle, busy = wal.group(2), wal.group(1)
        await idle.append_entries(entries(1, 3))
        await busy.append_entries(entries(1, 6, size=400))
        await idle.save_snapshot(SnapshotMeta(2, 1, membership), io.BytesIO(b"at 2"))
        first_segment = wal.segments()[0]
        await busy.save_snapshot(SnapshotMeta(6, 1, membership), io.BytesIO(b"at 6"))
        await busy.compact_prefix(6)  # the oldest segment goes: the idle group moves
        assert first_segment not in wal.segments()
        held_now = idle.load_state(), read_all(idle)
        wal.close()
        wal = opened()
        try:
            held_after_a_restart = wal.group(2).load_state(), read_all(wal.group(2))
        finally:
            wal.close()
        return held_now, held_after_a_restart

    for st, held in drive(main()):
        assert (st.first_index, st.last_index) == (1, 3)
        assert held == plain(entries(1, 3))


def test_a_failed_sync_fails_the_batch_and_every_later_write(tmp_path, monkeypatch):
    wal = SharedWAL(str(tmp_path / "wal"))
    real = os.fdatasync

    def failing(fd):
        raise OSError(5, "Input/output error")

    async def main():
        await wal.group(1).append_entries(entries(1, 2))
        monkeypatch.setattr(os, "fdatasync", failing)
        results = await asyncio.gather(wal.group(1).append_entries(entries(3, 3)),
                                       wal.group(2).append_entries(entries(1, 1)),
                                       return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results), results
        monkeypatch.setattr(os, "fdatasync", real)
        with pytest.raises(StorageFailed, match="a write failed earlier"):
            await wal.group(3).append_entries(entries(1, 1))
    drive(main())
    assert wal.group(1).load_state().last_index == 2  # never reported written
    wal.close()


async def writes_behind_a_sync(wal, monkeypatch, sync, meanwhile):
    """Group 1's write in a batch whose sync (``sync`` in place of ``os.fdatasync``) has
    begun, groups 2 and 3's submitted behind it; then ``meanwhile()``. Returns the three
    writes' results."""
    syncing = threading.Event()

    def started(fd):
        syncing.set()
        return sync(fd)
    monkeypatch.setattr(os, "fdatasync", started)
    first = asyncio.ensure_future(wal.group(1).append_entries(entries(1, 1)))
    await asyncio.to_thread(syncing.wait, 10)
    waiting = [asyncio.ensure_future(wal.group(g).append_entries(entries(1, 1)))
               for g in (2, 3)]
    await asyncio.sleep(0)
    meanwhile()
    return await asyncio.wait_for(asyncio.gather(first, *waiting, return_exceptions=True), 10)


def test_writes_waiting_behind_a_failed_batch_fail_with_it(tmp_path, monkeypatch):
    # Writes submitted while a batch is being written wait for the next batch. When the
    # batch fails there is none: they must fail too, else a node stopping after the
    # failure waits for them for ever (fastraft node never exited on a full disk).
    wal = SharedWAL(str(tmp_path / "wal"))
    release = threading.Event()

    def failing(fd):
        release.wait(10)
        raise OSError(28, "No space left on device")

    async def main():
        results = await writes_behind_a_sync(wal, monkeypatch, failing, release.set)
        assert isinstance(results[0], OSError), results
        assert all(isinstance(r, StorageFailed) and "No space left" in str(r)
                   for r in results[1:]), results
    try:
        drive(main())
    finally:
        release.set()
        wal.close()


def test_writes_waiting_when_the_wal_is_closed_fail_rather_than_hang(tmp_path, monkeypatch,
                                                                      caplog):
    # close() finishes the batch being written; the writes waiting for the next batch
    # (nodes still running: a shutdown in the wrong order) had no batch to go in, and
    # waited for ever, so a node awaiting one never stopped.
    wal = SharedWAL(str(tmp_path / "wal"))
    release = threading.Event()
    real = os.fdatasync

    def blocking(fd):
        release.wait(10)
        real(fd)

    def release_once_closing():
        wait_closing = time.monotonic() + 10
        while not wal._closed and time.monotonic() < wait_closing:
            time.sleep(0.001)
        release.set()

    def close():
        threading.Thread(target=release_once_closing).start()
        wal.close()  # waits for the batch being written

    async def main():
        results = await writes_behind_a_sync(wal, monkeypatch, blocking, close)
        assert results[0] is None, results  # the batch being written was finished
        assert all(isinstance(r, StorageFailed) and "the WAL is closed" in str(r)
                   for r in results[1:]), results
        with pytest.raises(StorageFailed, match="the WAL is closed"):
            await wal.group(4).append_entries(entries(1, 1))
    try:
        drive(main())
    finally:
        release.set()
        wal.close()
    monkeypatch.setattr(os, "fdatasync", real)
    reopened = SharedWAL(str(tmp_path / "wal"))
    try:
        assert reopened.group_ids() == [1]
        assert read_all(reopened.group(1)) == plain(entries(1, 1))
    finally:
        reopened.close()

    # closed in the loop turn the writes were made, before their batch started
    quick = SharedWAL(str(tmp_path / "quick"))

    async def closed_at_once():
        waiting = [asyncio.ensure_future(quick.group(g).append_entries(entries(1, 1)))
                   for g in (1, 2)]
        await asyncio.sleep(0)  # both submitted; their batch would start next turn
        quick.close()
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True),
                                         10)
        assert all(isinstance(r, StorageFailed) for r in results), results
    drive(closed_at_once())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_group_ids_and_segment_settings_are_checked(tmp_path):
    for bad, says in (({"segment_bytes": 0}, "segment_bytes must be an int of at least 1"),
                      ({"segment_bytes": "x"}, "segment_bytes must be an int of at least 1"),
                      ({"cache_bytes": -1}, "cache_bytes must be an int of at least 0"),
                      ({"max_segments": 1}, "max_segments must be an int of at least 2")):
        with pytest.raises(ConfigError, match=says):
            SharedWAL(str(tmp_path / "wal"), **bad)
    with pytest.raises(ConfigError, match="the directory is a path, not int"):
        SharedWAL(123)
    wal = SharedWAL(str(tmp_path / "wal"))
    try:
        for bad in (-1, 1 << 64, "3", False):
            with pytest.raises(InvalidArgument, match="group ids are ints"):
                wal.group(bad)
    finally:
        wal.close()


def test_raft_groups_on_one_wal_per_host_survive_a_restart_of_every_host(tmp_path):
    """Three hosts, eight groups, one SharedWAL per host: writes, a stop of everything,
    the WALs reopened, hosts restarted: every acknowledged write is there on every host,
    and the groups take writes again."""
    groups = range(8)
    wals = {}
    # Every write must be there once: an election in the middle (a starved process, with
    # two test workers on two cores; or two campaigns at once after the restart, the
    # loser's higher term deposing the winner) drops a write, which ``Hosts.propose``
    # looks for before writing it again. Elections wait well beyond such a stall.
    hosts = Hosts(balance_interval=None, storage=lambda i: wals[i].group,
                  config=Config(election_timeout_min=0.5, election_timeout_max=1.0,
                                heartbeat_interval=0.05))
    want = {g: [b"%d:%d" % (g, k) for k in range(5)] + [b"%d:after" % g] for g in groups}

    async def start(found):
        wals.update((i, SharedWAL(str(tmp_path / f"host{i}"))) for i in (1, 2, 3))
        for i in (1, 2, 3):
            await hosts.start(i, groups, found=found)

    async def stop():
        await hosts.stop()
        for w in wals.values():
            w.close()

    def converged():
        return all(hosts.logs[i, g].items == want[g] for i in (1, 2, 3) for g in groups)

    async def main():
        await start(found=True)
        for k in range(5):
            await asyncio.gather(*(hosts.propose(g, b"%d:%d" % (g, k)) for g in groups))
        await stop()
        await start(found=False)  # a restart: every group from its host's reopened WAL
        assert all(w.group_ids() == list(groups) for w in wals.values())
        await asyncio.gather(*(hosts.propose(g, b"%d:after" % g) for g in groups))
        await wait_until(converged, 30, "every replica to hold every write")
        await stop()
    drive(main())


def cached(wal):
    """Bytes of decoded records held by every cache of the WAL's groups."""
    caches = {id(v._cache): v._cache for v in wal._groups.values()}
    return sum(c.size for c in caches.values())


def test_the_record_cache_is_one_budget_for_every_group(tmp_path):
    """Reads of 40 groups' logs keep decoded records within the WAL's ``cache_bytes``
    together (not per group: 10,000 groups would multiply it)."""
    budget = 64 << 10
    wal = SharedWAL(str(tmp_path / "wal"), cache_bytes=budget)

    async def main():
        for k in range(10):
            await asyncio.gather(*(wal.group(g).append_entries(
                entries(k * 10 + 1, k * 10 + 10, size=300)) for g in range(40)))
        # 40 groups x 100 entries x ~300 bytes: ~1.2 MB of records, read back in full
        for g in range(40):
            got = await wal.group(g).read_entries(1, 101)
            assert [e.index for e in got] == list(range(1, 101))
            held = cached(wal)
            assert held <= budget + (4 << 10), held
    drive(main())
    assert cached(wal) > budget // 2  # it was used
    wal.close()


def dirs_of(path):
    return [os.path.join(path, n) for n in os.listdir(path) if n.startswith("group-")]


def test_a_dropped_group_is_gone_and_its_segments_are_freed(tmp_path):
    path = str(tmp_path / "wal")
    membership = Membership(voters=frozenset({1}))

    def reopened(wal):
        wal.close()
        return SharedWAL(path, segment_bytes=2048, max_segments=100)  # no relocation

    def gone_here(wal):
        st = wal.group(1).load_state()
        assert (st.last_index, st.node_id, st.snapshot) == (0, 0, None), st
        assert wal.group_ids() == [2] and dirs_of(path) == []

    async def write(wal):
        gone, kept = wal.group(1), wal.group(2)
        await gone.save_identity(1, "c/1")
        await gone.append_entries(entries(1, 20))
        await gone.save_snapshot(SnapshotMeta(10, 1, membership), io.BytesIO(b"state"))
        assert dirs_of(path) == [gone.directory]
        for k in range(20):
            await kept.append_entries(entries(k * 5 + 1, k * 5 + 5, size=100))
        await wal.drop_group(1)
        gone_here(wal)

    async def compact(wal):
        first = wal.segments()[0]  # group 1 wrote there, and group 2 still needs it
        await wal.group(2).compact_prefix(95)
        assert first not in wal.segments()  # nothing needs it now

    wal = SharedWAL(path, segment_bytes=2048, max_segments=100)
    drive(write(wal))
    wal = reopened(wal)  # group 1's records are still in the segments: the drop holds
    gone_here(wal)
    drive(compact(wal))
    wal = reopened(wal)
    try:
        gone_here(wal)
        assert read_all(wal.group(2)) == plain(entries(96, 100, size=100))
    finally:
        wal.close()


def test_a_crash_at_any_byte_keeps_every_whole_record_and_nothing_torn(tmp_path):
    """The last segment cut at every record boundary, next to it, and every 151 bytes
    (a crash in the middle of a batch's write), or zero-filled from a sector boundary on
    (sectors that never reached the disk, as a file system may leave them): each group
    reopens with exactly the records wholly written before the damage."""
    import random
    import shutil

    rng = random.Random(5)
    path = str(tmp_path / "wal")
    wal = SharedWAL(path)
    ends = []  # (end offset of a record, group, its entries), in file order
    next_index = {1: 1, 2: 1, 3: 1}

    async def main():
        for _ in range(16):
            batch = {}
            for g in rng.sample([1, 2, 3], rng.randint(1, 3)):
                n = rng.randint(1, 6)
                batch[g] = entries(next_index[g], next_index[g] + n - 1,
                                   size=rng.randint(1, 300), tag=b"g%d " % g)
                next_index[g] += n
            await asyncio.gather(*(wal.group(g).append_entries(b) for g, b in batch.items()))
            # one batch: its records in the order the groups' ops were submitted
            for g, b in batch.items():
                ends.append((wal.group(g)._rec_off[-1] + wal.group(g)._rec_len[-1], g, b))
    drive(main())
    wal.close()
    seg = segments(path)[0]
    size = os.path.getsize(seg)
    assert ends[-1][0] == size
    cuts = sorted({c for end, _, _ in ends for c in (end - 1, end, end + 1)} |
                  set(range(0, size, 151)))
    damage = [(c, 0) for c in cuts if 0 <= c <= size] + \
        [(c, size - c) for c in range(0, size, 512)]  # (cut, zeros after it)
    for cut, zeros in damage:
        copy = str(tmp_path / "copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        with open(segments(copy)[0], "r+b") as f:
            f.truncate(cut)
            f.seek(cut)
            f.write(b"\0" * zeros)
        reopened = SharedWAL(copy)
        try:
            for g in (1, 2, 3):
                want = [e for end, h, b in ends if h == g and end <= cut for e in b]
                assert read_all(reopened.group(g)) == plain(want), (cut, zeros, g)
        finally:
            reopened.close()


@pytest.mark.parametrize("damage", ["bit flip", "missing segment"])
def test_repair_keeps_what_precedes_the_damage_and_every_group_recovers(tmp_path, caplog,
                                                                         damage):
    """A bit flip in an earlier segment, or a missing one: refused; with repair=True the
    WAL keeps what precedes the damage, and every group starts past the WAL's term
    ceiling with no vote, has its commit mark cut back to what it holds and is marked
    recovering (it will not vote until a leader catches it up), durably: a plain reopen
    then works. The repair's line names the groups with records in what it dropped;
    group 3 wrote only there, and is recovering all the same, with nothing left."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path, segment_bytes=600, max_segments=100)

    async def main():
        for g in (1, 2):
            await wal.group(g).save_hard_state(HardState(3, g, 0))
        for k in range(12):
            for g in (1, 2):
                wal.group(g).commit_advanced(k * 2 + 2)
            await asyncio.gather(*(wal.group(g).append_entries(
                entries(k * 2 + 1, k * 2 + 2, size=60, tag=b"g%d " % g)) for g in (1, 2)))
        await wal.group(3).save_hard_state(HardState(5, 3, 0))
    drive(main())
    wal.close()
    segs = segments(path)
    assert len(segs) >= 5
    if damage == "bit flip":
        with open(segs[2], "r+b") as f:
            f.seek(40)
            byte = f.read(1)
            f.seek(40)
            f.write(bytes([byte[0] ^ 1]))
    else:
        os.unlink(segs[2])
    with pytest.raises(StorageCorruption, match="Repairing a host"):
        SharedWAL(path, segment_bytes=600, max_segments=100)
    repaired = SharedWAL(path, segment_bytes=600, max_segments=100, repair=True)
    repaired.close()
    assert len(segments(path)) <= 3  # what followed the damage is gone
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "repair"]
    assert line.groups == [1, 2, 3]
    assert "had records in what is dropped: 1, 2, 3 (" in line.getMessage()
    wal = SharedWAL(path, segment_bytes=600, max_segments=100)
    try:
        for g in (1, 2):
            st = wal.group(g).load_state()
            held = read_all(wal.group(g))
            assert held == plain(entries(1, st.last_index, size=60, tag=b"g%d " % g))
            assert 0 < st.last_index < 24
            hs = st.hard_state
            # past every term a group may have had (its latest STATE may be among what
            # the repair dropped), so with no vote cast in it
            assert (hs.current_term, hs.voted_for, hs.recovering) == (TERM_MARGIN + 1,
                                                                      None, True)
            assert hs.commit <= st.last_index
        st = wal.group(3).load_state()
        assert st.last_index == 0
        hs = st.hard_state
        assert (hs.current_term, hs.voted_for, hs.recovering) == (TERM_MARGIN + 1, None, True)
    finally:
        wal.close()


def registry(path):
    with open(os.path.join(path, "registry"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("damage", ["its record", "its segment"])
def test_a_group_whose_every_record_is_unreadable_comes_back_recovering(tmp_path, damage):
    """Group 3 wrote one record, in the middle of the WAL; the damage is that record (a
    bit flipped in it) or the segment holding it (missing): nothing the repair can read
    names group 3, but the registry does, so it comes back recovering, past the
    term ceiling with no vote, rather than as a new replica that would vote again in a
    term it voted in and count as holding entries it acknowledged. Group 4, written and
    dropped just before it, stays dropped."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path, segment_bytes=600, max_segments=100)

    async def main():
        for k in range(12):
            await wal.group(1).append_entries(entries(k * 2 + 1, k * 2 + 2, size=60))
            if k == 5:
                await wal.group(4).save_hard_state(HardState(2, 4, 0))
                await wal.drop_group(4)
                await wal.group(3).save_hard_state(HardState(7, 3, 0))
    drive(main())
    seg = wal.group(3)._state_seg
    wal.close()
    with open(wal._path(seg), "rb") as f:
        held = f.read()
    assert all(struct.pack("<QB", 4, kind) in held for kind in (3, 4))  # group 4's too
    segs = segments(path)
    assert segs.index(wal._path(seg)) not in (0, len(segs) - 1)
    if damage == "its record":
        with open(wal._path(seg), "rb") as f:
            data = f.read()
        at = data.index(struct.pack("<QB", 3, 3)) + 12  # in group 3's STATE body
        with open(wal._path(seg), "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 1]))
    else:
        os.unlink(wal._path(seg))
    repaired = SharedWAL(path, segment_bytes=600, max_segments=100, repair=True)
    try:
        assert repaired.group_ids() == [1, 3]
        hs = repaired.group(3).load_state().hard_state
        assert (hs.current_term, hs.voted_for, hs.recovering) == (TERM_MARGIN + 1, None, True)
    finally:
        repaired.close()


def test_the_registry_names_every_group_and_is_rewritten_at_each_start(tmp_path, caplog):
    """A new group is appended before its first record, a dropped one taken off once
    its DROP record is durable (a new group of its id is appended again); a start
    rewrites the file as one record of the groups held, also when it is missing (a WAL
    of an earlier version) or damaged (logged)."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path)

    async def write(groups):
        await asyncio.gather(*(wal.group(g).save_hard_state(HardState(1, None, 0))
                               for g in groups))
    drive(write([1, 2]))
    drive(write([3]))
    drive(write([1, 2, 3]))  # no group new: nothing appended
    assert sorted(wal._registry.read()) == [1, 2, 3]
    drive(wal.drop_group(2))
    assert sorted(wal._registry.read()) == [1, 3]
    drive(wal.drop_group(3))
    drive(write([3]))  # a new group 3
    assert sorted(wal._registry.read()) == [1, 3]
    appended = registry(path)
    drive(wal.drop_group(3))
    wal.close()
    wal = SharedWAL(path)
    wal.close()
    rewritten = registry(path)
    assert len(rewritten) < len(appended) and sorted(wal._registry.read()) == [1]
    os.unlink(os.path.join(path, "registry"))
    wal = SharedWAL(path)
    wal.close()
    assert registry(path) == rewritten
    two = [walformat._record(msgspec.msgpack.encode([ids, []]), 0) for ids in ([1], [3])]
    with open(os.path.join(path, "registry"), "wb") as f:  # a bit flipped in the first
        f.write(bytes([two[0][0] ^ 1]) + two[0][1:] + two[1])
    wal = SharedWAL(path)
    wal.close()
    assert registry(path) == rewritten
    assert [r.event for r in caplog.records
            if getattr(r, "event", None) == "registry_damaged"] == ["registry_damaged"]


def test_a_drop_cut_short_after_its_record_is_finished_at_the_next_start(tmp_path, caplog,
                                                                          monkeypatch):
    """A group is dropped once its DROP record is durable: a crash before its snapshot
    is deleted leaves the snapshot, which the next start deletes (one line), so a new
    group of that id starts empty rather than from it; the other groups keep theirs."""
    path = str(tmp_path / "wal")
    wal = SharedWAL(path)
    membership = Membership(voters=frozenset({1}))

    async def write():
        for g in (1, 2):
            await wal.group(g).save_identity(1, "c/1")
            await wal.group(g).append_entries(entries(1, 10))
            await wal.group(g).save_snapshot(SnapshotMeta(5, 1, membership),
                                             io.BytesIO(b"state %d" % g))
            await wal.group(g).compact_prefix(5)

    async def crash_in_drop():
        with monkeypatch.context() as m:
            m.setattr("shutil.rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError("cut")))
            with pytest.raises(OSError, match="cut"):
                await wal.drop_group(1)
    drive(write())
    drive(crash_in_drop())
    wal.close()
    assert sorted(dirs_of(path)) == [os.path.join(path, f"group-{g}") for g in (1, 2)]
    wal = SharedWAL(path)
    try:
        assert dirs_of(path) == [os.path.join(path, "group-2")]
        assert [r.event for r in caplog.records
                if getattr(r, "event", None) == "drop_finished"] == ["drop_finished"]
        st = wal.group(1).load_state()
        assert (st.last_index, st.node_id, st.snapshot) == (0, 0, None)
        assert wal.group_ids() == [2]
        meta, data = drive(wal.group(2).load_snapshot())
        with data:
            assert (meta.last_included_index, data.read()) == (5, b"state 2")
    finally:
        wal.close()
