"""ProposalTracker: every proposer gets exactly its own entry's result, or a failure."""
import asyncio

import pytest

from fastraft.errors import BatchPartlyCommitted, BatchRestUnknown, ProposalDropped
from fastraft.messages import Entry, EntryKind
from fastraft.proposals import ProposalTracker


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def entries(lo, hi, term=1):
    return [Entry(term, i, 0, b"") for i in range(lo, hi + 1)]


def apply(t, batch, results):
    """Tell ``t`` that ``batch`` was applied, ``results`` for its user entries."""
    return t.resolve(batch, [e for e in batch if e.kind == EntryKind.NORMAL], results)


def singles_appended(loop, n):
    """A tracker whose ``n`` single proposals were appended at indexes 1..n; their futures."""
    t = ProposalTracker()
    futs = [loop.create_future() for _ in range(n)]
    for f in futs:
        t.add(b"x", f)
    t.take()
    t.appended(1, 1)
    return t, futs


def test_runs_answered_across_apply_batches_and_kinds(loop):
    t = ProposalTracker()
    singles = [loop.create_future() for _ in range(3)]
    batch = loop.create_future()
    tail = loop.create_future()
    for f in singles:
        t.add(b"s", f)
    t.add_batch([b"b1", b"b2"], batch)
    t.add(b"t", tail)
    assert t.pending == 6 and t.take() == ([b"s"] * 3 + [b"b1", b"b2", b"t"], [])
    t.appended(10, 1)  # indexes 10..15
    # first apply batch ends in the middle of the propose_batch
    assert apply(t, entries(10, 13), [100, 101, 102, 103]) == 0  # none dropped
    assert [f.result() for f in singles] == [100, 101, 102] and not batch.done()
    assert t.pending == 2
    apply(t, entries(14, 15), [104, 105])
    assert batch.result() == [103, 104] and tail.result() == 105 and t.pending == 0


def test_non_contiguous_user_entries(loop):
    t = ProposalTracker()
    a, b = loop.create_future(), loop.create_future()
    t.add(b"a", a)
    t.add_batch([b"x", b"y"], b)
    t.take()
    t.appended(5, 1)  # 5, then 6..7
    user = [Entry(1, 5, 0, b""), Entry(1, 6, 0, b""), Entry(1, 7, 0, b"")]
    apply(t, user, ["r5", "r6", "r7"])
    assert a.result() == "r5" and b.result() == ["r6", "r7"] and t.pending == 0
    # contiguous path again with a gap-free batch
    c = loop.create_future()
    t.add(b"c", c)
    t.take()
    t.appended(8, 1)
    apply(t, [Entry(1, 8, 2, b""), Entry(1, 9, 0, b"")], ["r9"])  # 8: a no-op, no result
    assert not c.done()


def test_losing_leadership_fails_only_what_is_not_committed(loop):
    t, futs = singles_appended(loop, 5)  # 1..5
    t.fail_after(3, ProposalDropped("lost"))
    assert [f.done() for f in futs] == [False, False, False, True, True]
    assert t.pending == 3
    apply(t, entries(1, 3), [1, 2, 3])
    assert [f.result() for f in futs[:3]] == [1, 2, 3] and t.pending == 0
    for dropped in futs[3:]:
        with pytest.raises(ProposalDropped):
            dropped.result()


def test_cancelled_proposer_is_skipped(loop):
    t = ProposalTracker()
    f1, f2 = loop.create_future(), loop.create_future()
    t.add(b"1", f1)
    t.add(b"2", f2)
    f1.cancel()
    t.take()
    t.appended(1, 1)
    apply(t, entries(1, 2), ["a", "b"])
    assert f1.cancelled() and f2.result() == "b"


def singles_and_a_batch_appended(loop, term):
    """A tracker with four single proposals at 1..4 and a batch at 5..6, of ``term``."""
    t = ProposalTracker()
    singles = [loop.create_future() for _ in range(4)]
    batch = loop.create_future()
    for f in singles:
        t.add(b"s", f)
    t.add_batch([b"b1", b"b2"], batch)
    t.take()
    t.appended(1, term)
    return t, singles, batch


def test_a_lost_leadership_leaves_open_only_what_is_not_committed(loop):
    t, singles, batch = singles_and_a_batch_appended(loop, 1)
    t.orphan(2, ProposalDropped("replaced"))  # lost with 1..2 committed
    apply(t, entries(1, 1), [1])  # applied after the loss: answered as ever
    assert singles[0].result() == 1
    # a later leader commits 3; this node learns it and applies it
    apply(t, entries(2, 3), [2, 3])
    assert [f.result() for f in singles[:3]] == [1, 2, 3] and t.pending == 3
    # the wait ends with 4..6 open: entry 2 (committed at the loss) was answered
    assert t.fail_orphans(ProposalDropped("unknown")) == 3
    with pytest.raises(ProposalDropped):
        singles[3].result()
    with pytest.raises(ProposalDropped):
        batch.result()
    assert t.pending == 0 and not t.waiting


def test_orphans_whose_indexes_commit_other_entries_fail_and_only_they(loop):
    t, singles, batch = singles_and_a_batch_appended(loop, 3)
    t.orphan(0, ProposalDropped("replaced"))
    # a later leader commits 1..2 as they are (term 3), then its own term-4 entries
    assert apply(t, entries(1, 2, term=3), ["r1", "r2"]) == 0
    assert [f.result() for f in singles[:2]] == ["r1", "r2"]
    # at 3 a no-op of term 4 (not a user entry), at 4 a write of term 4: from 3 on none
    # of the run can ever commit, the batch's 5..6 neither (a log holding them holds 3)
    assert apply(t, [Entry(4, 3, 2, b""), Entry(4, 4, 0, b"")], ["theirs"]) == 4
    assert [str(f.exception()) for f in singles[2:]] == ["replaced"] * 2
    assert str(batch.exception()) == "replaced"
    assert t.pending == 0 and not t.waiting


def orphaned_batch(loop, records=False, committed=6):
    """A tracker with a batch at 7..9 of term 2 (of records: ``ReplicatedLog.append``),
    whose leadership was lost with ``committed`` committed."""
    t = ProposalTracker()
    batch = loop.create_future()
    t.add_batch([b"b1", b"b2", b"b3"], batch, records=records)
    t.take()
    t.appended(7, 2)
    t.orphan(committed, ProposalDropped("replaced"))
    return t, batch


def test_an_orphaned_batch_answered_across_apply_batches(loop):
    t, batch = orphaned_batch(loop)
    assert apply(t, entries(7, 8, term=2), ["r7", "r8"]) == 0 and not batch.done()
    assert apply(t, entries(9, 9, term=2), ["r9"]) == 0
    assert batch.result() == ["r7", "r8", "r9"] and t.pending == 0


def test_an_orphaned_batch_committed_in_part_fails_saying_which_part(loop):
    """Its first entries committed in one apply batch, the next replaced in a later one:
    the batch's proposer hears which entries were committed, with their results, not
    "replaced" (not committed), which would make sending the whole batch again look
    safe."""
    t, batch = orphaned_batch(loop)
    assert apply(t, entries(7, 8, term=2), ["r7", "r8"]) == 0 and not batch.done()
    assert apply(t, entries(9, 9, term=3), ["theirs"]) == 1
    failed = batch.exception()
    assert isinstance(failed, BatchPartlyCommitted) and failed.committed is None
    assert failed.results == ["r7", "r8"]
    says = "committed entries 7..8 of the batch's entries 7..9, and other entries in place"
    assert says in str(failed)
    assert t.pending == 0 and not t.waiting


@pytest.mark.parametrize("records", [False, True])
@pytest.mark.parametrize("give_up", ["fail_orphans", "fail_orphans_through"])
def test_an_orphaned_batch_given_up_on_after_its_first_entries_applied_keeps_their_results(
        loop, records, give_up):
    """A lost leadership's batch, its first entries committed and applied, then its fate
    given up on (``lost_leadership_wait`` ran out, or a later leader's snapshot covers
    it): its proposer hears those entries' results and that the rest's fate is unknown,
    not a "may or may not" for the whole batch, some of which took effect."""
    t, batch = orphaned_batch(loop, records)
    kind = EntryKind.RECORD if records else EntryKind.NORMAL
    assert apply(t, [Entry(2, 7, kind, b""), Entry(2, 8, kind, b"")],
                 [] if records else ["r7", "r8"]) == 0
    unknown = ProposalDropped("lost leadership; it may or may not be committed")
    assert (t.fail_orphans(unknown) if give_up == "fail_orphans"
            else t.fail_orphans_through(9, unknown)) == 1
    failed = batch.exception()
    assert isinstance(failed, BatchRestUnknown) and failed.committed is None
    assert not isinstance(failed, BatchPartlyCommitted)  # the rest is not safe to resend
    assert failed.results == ([7, 8] if records else ["r7", "r8"])
    assert str(failed) == ("lost leadership; it may or may not be committed (entries 7..8 "
                           "of the batch's entries 7..9 were committed, and their results "
                           "are the error's; the fate of the rest is unknown)")
    assert t.pending == 0 and not t.waiting


@pytest.mark.parametrize("records", [False, True])
@pytest.mark.parametrize("give_up", ["fail_orphans", "fail_orphans_through"])
def test_an_orphaned_batch_given_up_on_before_its_committed_entries_applied_waits_for_them(
        loop, records, give_up):
    """Its first entries committed when leadership was lost, not yet applied here (a
    slow state machine) when its fate is given up on: the batch fails once they are
    applied, with their results, and not before with a "may or may not" for all."""
    t, batch = orphaned_batch(loop, records, committed=8)
    unknown = ProposalDropped("lost leadership; it may or may not be committed")
    assert (t.fail_orphans(unknown) if give_up == "fail_orphans"
            else t.fail_orphans_through(9, unknown)) == 1
    assert not batch.done() and t.pending == 2 and t.waiting
    kind = EntryKind.RECORD if records else EntryKind.NORMAL
    assert apply(t, [Entry(2, 7, kind, b"")], [] if records else ["r7"]) == 0
    assert not batch.done()
    assert apply(t, [Entry(2, 8, kind, b"")], [] if records else ["r8"]) == 0
    failed = batch.exception()
    assert isinstance(failed, BatchRestUnknown) and failed.committed is None
    assert failed.results == ([7, 8] if records else ["r7", "r8"])
    assert "entries 7..8 of the batch's entries 7..9 were committed" in str(failed)
    assert t.pending == 0 and not t.waiting


def test_a_batch_given_up_on_whose_committed_entries_a_snapshot_covers_is_not_all_committed(
        loop):
    """Given up on with 7..8 committed and 7 applied, then a later leader's snapshot
    covers 8: the proposer hears 7's result and that the rest's fate is unknown, not
    that the batch (9 too) was committed."""
    t, batch = orphaned_batch(loop, committed=8)
    unknown = ProposalDropped("lost leadership; it may or may not be committed")
    assert t.fail_orphans(unknown) == 1
    assert apply(t, entries(7, 7, term=2), ["r7"]) == 0
    assert t.fail_through(8, ProposalDropped("restored", committed=True)) == 1
    failed = batch.exception()
    assert isinstance(failed, BatchRestUnknown) and failed.committed is None
    assert failed.results == ["r7"]
    assert t.pending == 0 and not t.waiting


def test_an_orphaned_batch_given_up_on_before_any_entry_applied_may_or_may_not_commit(loop):
    t, batch = orphaned_batch(loop)
    unknown = ProposalDropped("lost leadership; it may or may not be committed")
    assert t.fail_orphans(unknown) == 3
    assert batch.exception() is unknown
    assert t.pending == 0 and not t.waiting


@pytest.mark.parametrize("records", [False, True])
def test_a_batch_cut_within_one_apply_batch_fails_with_the_results_before_the_cut(
        loop, records):
    """The committed prefix and the replacing entries in the same apply batch: the
    results of the prefix, applied in that batch, are the error's (for records, their
    offsets)."""
    t, batch = orphaned_batch(loop, records)
    kind = EntryKind.RECORD if records else EntryKind.NORMAL
    applied = [Entry(2, 7, kind, b""), Entry(2, 8, kind, b""), Entry(3, 9, 0, b"")]
    assert apply(t, applied, ["theirs"] if records else ["r7", "r8", "theirs"]) == 1
    failed = batch.exception()
    assert isinstance(failed, BatchPartlyCommitted)
    assert failed.results == ([7, 8] if records else ["r7", "r8"])
    assert t.pending == 0 and not t.waiting


def test_orphaned_records_are_answered_with_their_indexes(loop):
    t = ProposalTracker()
    f = loop.create_future()
    t.add_batch([b"r1", b"r2"], f, records=True)
    t.take()
    t.appended(3, 2)
    t.orphan(2, ProposalDropped("replaced"))
    records = [Entry(2, i, EntryKind.RECORD, b"") for i in (3, 4)]  # no user entry
    assert apply(t, records, []) == 0
    assert f.result() == [3, 4] and t.pending == 0


def test_a_restored_snapshot_fails_what_it_skipped_and_only_that(loop):
    t, singles, batch = singles_and_a_batch_appended(loop, 1)  # 1..4, batch 5..6
    apply(t, entries(1, 1), ["r1"])
    assert t.fail_through(2, ProposalDropped("skipped")) == 1  # 2: 3.. are applied later
    assert str(singles[1].exception()) == "skipped" and not singles[2].done()
    apply(t, entries(3, 4), ["r3", "r4"])
    assert [f.result() for f in singles[2:]] == ["r3", "r4"]
    assert t.fail_through(5, ProposalDropped("skipped")) == 2  # a batch: all of it
    assert str(batch.exception()) == "skipped" and t.pending == 0 and not t.waiting


def test_a_second_loss_leaves_open_what_the_new_commit_index_does_not_cover(loop):
    t, futs = singles_appended(loop, 4)  # 1..4
    t.orphan(0, ProposalDropped("replaced"))  # lost with nothing committed
    t.orphan(2, ProposalDropped("replaced"))  # elected again, commits 1..2, lost again
    assert t.fail_orphans(ProposalDropped("unknown")) == 2  # 3..4 only
    assert [str(f.exception()) for f in futs[2:]] == ["unknown", "unknown"]
    apply(t, entries(1, 2), ["r1", "r2"])
    assert [f.result() for f in futs[:2]] == ["r1", "r2"] and t.pending == 0


def test_a_received_snapshot_fails_the_orphans_it_covers_and_only_those(loop):
    t, futs = singles_appended(loop, 4)  # 1..4, term 1
    t.orphan(1, ProposalDropped("replaced"))  # lost with 1 committed, 2..4 open
    covered = ProposalDropped("covered")
    # the new leader's snapshot ends at 2: whose entry 2 is is not known here; 3..4 may
    # still be answered
    assert t.fail_orphans_through(2, covered) == 1
    assert futs[1].exception() is covered and t.pending == 3
    assert not any(f.done() for f in (futs[0], futs[2], futs[3]))
    # 1 was committed before the loss: the restore fails it as skipped (not "covered")
    assert t.fail_through(2, ProposalDropped("skipped")) == 1
    assert str(futs[0].exception()) == "skipped"
    # past the snapshot the new leader commits this node's entry 3, then one of its own
    assert apply(t, [Entry(1, 3, 0, b""), Entry(3, 4, 0, b"")], ["r3", "theirs"]) == 1
    assert futs[2].result() == "r3" and str(futs[3].exception()) == "replaced"
    assert t.pending == 0 and not t.waiting


def test_a_received_snapshot_fails_a_batch_it_reaches_into_whole(loop):
    t, singles, batch = singles_and_a_batch_appended(loop, 2)  # 1..4, batch 5..6
    t.orphan(1, ProposalDropped("replaced"))
    covered = ProposalDropped("covered")
    assert t.fail_orphans_through(5, covered) == 5  # 2..4, and 5..6: one future
    assert all(f.exception() is covered for f in singles[1:]) and batch.exception() is covered
    assert not singles[0].done() and t.pending == 1


def test_a_received_snapshot_below_the_orphans_leaves_them_waiting(loop):
    t, futs = singles_appended(loop, 4)  # 1..4
    t.orphan(2, ProposalDropped("replaced"))  # 3..4 open
    assert t.fail_orphans_through(2, ProposalDropped("covered")) == 0
    assert not any(f.done() for f in futs) and t.pending == 4
