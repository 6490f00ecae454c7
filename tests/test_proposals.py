"""ProposalTracker: every proposer gets exactly its own entry's result, or a failure."""
import asyncio

import pytest

from fastraft.errors import ProposalDropped
from fastraft.messages import Entry
from fastraft.proposals import ProposalTracker


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def entries(lo, hi):
    return [Entry(1, i, 0, b"") for i in range(lo, hi + 1)]


def singles_appended(loop, n):
    """A tracker whose ``n`` single proposals were appended at indexes 1..n; their futures."""
    t = ProposalTracker()
    futs = [loop.create_future() for _ in range(n)]
    for f in futs:
        t.add(b"x", f)
    t.take()
    t.appended(1)
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
    t.appended(10)  # indexes 10..15
    # first apply batch ends in the middle of the propose_batch
    assert t.resolve(13, entries(10, 13), [100, 101, 102, 103]) == 4
    assert [f.result() for f in singles] == [100, 101, 102] and not batch.done()
    t.resolve(15, entries(14, 15), [104, 105])
    assert batch.result() == [103, 104] and tail.result() == 105 and t.pending == 0


def test_non_contiguous_user_entries(loop):
    t = ProposalTracker()
    a, b = loop.create_future(), loop.create_future()
    t.add(b"a", a)
    t.add_batch([b"x", b"y"], b)
    t.take()
    t.appended(5)  # 5, then 6..7
    user = [Entry(1, 5, 0, b""), Entry(1, 6, 0, b""), Entry(1, 7, 0, b"")]
    t.resolve(7, user, ["r5", "r6", "r7"])
    assert a.result() == "r5" and b.result() == ["r6", "r7"] and t.pending == 0
    # contiguous path again with a gap-free batch
    c = loop.create_future()
    t.add(b"c", c)
    t.take()
    t.appended(8)
    t.resolve(9, [Entry(1, 9, 0, b"")], ["r9"])  # 8 was a no-op: no user result
    assert not c.done()


def test_losing_leadership_fails_only_what_is_not_committed(loop):
    t, futs = singles_appended(loop, 5)  # 1..5
    t.fail_after(3, ProposalDropped("lost"))
    assert [f.done() for f in futs] == [False, False, False, True, True]
    assert t.pending == 3
    t.resolve(3, entries(1, 3), [1, 2, 3])
    assert [f.result() for f in futs[:3]] == [1, 2, 3] and t.pending == 0
    with pytest.raises(ProposalDropped):
        futs[4].result()


def test_cancelled_proposer_is_skipped(loop):
    t = ProposalTracker()
    f1, f2 = loop.create_future(), loop.create_future()
    t.add(b"1", f1)
    t.add(b"2", f2)
    f1.cancel()
    t.take()
    t.appended(1)
    t.resolve(2, entries(1, 2), ["a", "b"])
    assert f1.cancelled() and f2.result() == "b"


def test_a_lost_leadership_leaves_open_only_what_is_not_committed(loop):
    t = ProposalTracker()
    singles = [loop.create_future() for _ in range(4)]
    batch = loop.create_future()
    for f in singles:
        t.add(b"s", f)
    t.add_batch([b"b1", b"b2"], batch)
    t.take()
    t.appended(1)  # singles 1..4, the batch 5..6
    t.orphan(2)  # lost with 1..2 committed
    t.resolve(1, entries(1, 1), [1])  # applied after the loss: answered as ever
    assert singles[0].result() == 1
    # a later leader commits 3; this node learns it and applies it
    t.resolve(3, entries(2, 3), [2, 3])
    assert [f.result() for f in singles[:3]] == [1, 2, 3] and t.pending == 3
    # the wait ends with 4..6 open: entry 2 (committed at the loss) was answered
    assert t.fail_orphans(ProposalDropped("unknown")) == 3
    with pytest.raises(ProposalDropped):
        singles[3].result()
    with pytest.raises(ProposalDropped):
        batch.result()
    assert t.pending == 0 and not t.waiting


def test_orphans_cut_by_a_truncation_are_not_failed_twice(loop):
    t, futs = singles_appended(loop, 6)  # 1..6
    t.orphan(1)
    assert t.fail_after(3, ProposalDropped("replaced")) == 3  # 4..6 cut
    assert t.fail_orphans(ProposalDropped("unknown")) == 2  # 2..3: the rest
    assert not futs[0].done()
    assert [str(f.exception()) for f in futs[1:]] == ["unknown"] * 2 + ["replaced"] * 3
    assert t.pending == 1  # entry 1, committed before the loss, waits to be applied
    t.resolve(1, entries(1, 1), ["r1"])
    assert futs[0].result() == "r1" and t.pending == 0


def test_a_second_loss_leaves_open_what_the_new_commit_index_does_not_cover(loop):
    t, futs = singles_appended(loop, 4)  # 1..4
    t.orphan(0)  # lost with nothing committed; elected again, it commits up to 2
    t.orphan(2)  # and loses the leadership again before applying them
    assert t.fail_orphans(ProposalDropped("unknown")) == 2  # 3..4 only
    t.resolve(2, entries(1, 2), ["r1", "r2"])
    assert [f.result() for f in futs[:2]] == ["r1", "r2"] and t.pending == 0
