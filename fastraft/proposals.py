"""Proposals waiting for their results: the leader's per-write bookkeeping, kept per run.

A client's ``propose`` buffers its command and a future until the node's next flush. The
flush appends every buffered command at once and turns the buffer into *runs*: consecutive
single proposals share one run (a list of futures, one per log index), each
``propose_batch`` gets its own (one future for all its indexes). Results are handed out
run by run as entries are applied, by a kernel loop, so the per-write Python work is one
list append going in and one ``set_result`` coming out.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from fastraft import kernels
from fastraft.asyncutil import fail_future
from fastraft.errors import BatchPartlyCommitted, BatchRestUnknown


class _Run:
    __slots__ = ("first", "last", "term", "futures", "batch", "results", "next", "records",
                 "orphan", "given_up")

    def __init__(self, first: int, last: int, term: int, futures: list[Any] | None,
                 batch: asyncio.Future[Any] | None, records: bool = False) -> None:
        self.first = first
        self.last = last
        self.term = term            # the leader's term its entries were appended in
        self.futures = futures      # singles: futures[k] answers index first + k
        self.batch = batch          # propose_batch: one future for first..last
        self.results: list[Any] = []     # batch: results gathered so far
        self.next = first           # first index not answered yet
        self.records = records      # ReplicatedLog records: answered with their indexes
        #: Nonzero: the first index of the run whose fate a leadership this node has lost
        #: left open (a later leader may commit it, or commit other entries in its place).
        self.orphan = 0
        #: A batch whose fate was given up on while its first entries, committed, were
        #: still to be applied here: why, and the batch's last index. It fails once
        #: those are applied, with their results (``_rest_unknown``).
        self.given_up: tuple[BaseException, int] | None = None


def _partly_committed(batch: _Run, last: int) -> BatchPartlyCommitted:
    """What a batch's proposer hears when a later leader committed the batch's entries
    up to ``batch.last`` (cut there) of ``batch.first .. last``, and other entries in
    place of the rest: their results, and not "not committed" (not a batch to send again
    whole)."""
    return BatchPartlyCommitted(
        f"leadership was lost before the batch committed: a later leader committed entries "
        f"{batch.first}..{batch.last} of the batch's entries {batch.first}..{last}, and "
        f"other entries in place of the rest", _committed_results(batch, batch.last))


def _committed_results(batch: _Run, last: int) -> list[Any]:
    """The results of the batch's entries up to ``last``, answered already (for
    records, their offsets)."""
    return list(range(batch.first, last + 1)) if batch.records else batch.results


def _rest_unknown(batch: _Run, exc: BaseException, last: int) -> BaseException:
    """What the proposer of a batch of entries up to ``last`` hears when its fate is
    given up on (``exc`` says why): if its first entries were committed and applied
    here, their results and "the rest may or may not be", not a "may or may not" for
    the whole batch, some of which took effect."""
    if batch.batch is None or batch.next == batch.first:
        return exc
    done = batch.next - 1
    return BatchRestUnknown(
        f"{exc} (entries {batch.first}..{done} of the batch's entries {batch.first}.."
        f"{last} were committed, and their results are the error's; the fate of "
        f"the rest is unknown)", _committed_results(batch, done))


class ProposalTracker:
    def __init__(self) -> None:
        #: Entries buffered or in the log whose proposer still waits (back-pressure).
        self.pending = 0
        self._datas: list[Any] = []
        self._segments: list[tuple[list[Any] | None, asyncio.Future[Any] | None, int, bool]] = []
        self._open: list[Any] | None = None
        #: Appended runs whose proposers still wait, oldest first: a list, the runs a
        #: batch answers cut off its front at once (an empty deque takes 700 bytes more,
        #: in every idle group of a host).
        self._runs: list[_Run] = []
        #: Some buffered segment holds records.
        self._records = False
        #: What an orphaned proposal hears when other entries were committed in its place.
        self._replaced: BaseException | None = None

    @property
    def buffered(self) -> bool:
        return bool(self._datas)

    @property
    def waiting(self) -> bool:
        return bool(self._runs)

    def add(self, data: bytes, future: asyncio.Future[Any]) -> None:
        self._datas.append(data)
        open_ = self._open
        if open_ is None:
            open_ = self._open = []
            self._segments.append((open_, None, 0, False))
        open_.append(future)
        self.pending += 1

    def add_batch(self, datas: Sequence[Any], future: asyncio.Future[Any],
                  records: bool = False) -> None:
        """``records``: ``ReplicatedLog`` records, and ``future`` gets their indexes."""
        self._datas.extend(datas)
        self._segments.append((None, future, len(datas), records))
        self._open = None
        self.pending += len(datas)
        if records:
            self._records = True

    def take(self) -> tuple[list[Any], list[tuple[int, int]]]:
        """The buffered commands, to append to the log in this order, and the
        ``(position, count)`` spans of them that are records."""
        datas = self._datas
        self._datas = []
        spans: list[tuple[int, int]] = []
        if self._records:
            self._records = False
            pos = 0
            for futures, _, n, records in self._segments:
                n = len(futures) if futures is not None else n
                if records:
                    spans.append((pos, n))
                pos += n
        return datas, spans

    def appended(self, first_index: int, term: int) -> None:
        """The commands taken last were appended from ``first_index`` on, in ``term``."""
        index = first_index
        for futures, batch, n, records in self._segments:
            if futures is not None:
                n = len(futures)
            self._runs.append(_Run(index, index + n - 1, term, futures, batch, records))
            index += n
        self._segments = []
        self._open = None

    def first_unfit(self, limit: int) -> int:
        """Position of the first buffered command that is not bytes of at most ``limit``
        bytes, or -1 (one compiled pass: ``propose`` itself checks only the type)."""
        return kernels.first_unfit_payload(self._datas, limit)

    def drop_singles(self, refusal: Callable[[Any], BaseException | None]) -> int:
        """Fail and take out the buffered single proposals whose command ``refusal``
        refuses (it returns the error); a batch was checked whole when called. Returns
        how many."""
        datas = self._datas
        kept: list[Any] = []
        dropped = pos = 0
        for futures, _, n, _ in self._segments:
            if futures is None:
                kept.extend(datas[pos:pos + n])
                pos += n
                continue
            answered = []
            for future in futures:
                data = datas[pos]
                pos += 1
                exc = refusal(data)
                if exc is None:
                    kept.append(data)
                    answered.append(future)
                else:
                    fail_future(future, exc)
                    dropped += 1
            futures[:] = answered  # in place: it may be the open run that takes the next
        self._segments = [seg for seg in self._segments if seg[0] is None or seg[0]]
        if not self._open:
            self._open = None
        self._datas = kept
        self.pending -= dropped
        return dropped

    def fail_buffered(self, exc: BaseException) -> int:
        """The commands taken last could not be appended: fail their proposers."""
        freed = 0
        for futures, batch, n, _ in self._segments:
            for f in (futures if futures is not None else (batch,)):
                if f is not None:  # a segment has futures or a batch future
                    fail_future(f, exc)
            freed += len(futures) if futures is not None else n
        self._segments = []
        self._open = None
        self._datas = []
        self._records = False
        self.pending -= freed
        return freed

    def resolve(self, entries: Sequence[Any], user: Sequence[Any],
                results: Sequence[Any]) -> int:
        """Answer the proposals of ``entries``, the batch applied just now (after the one
        before it); ``user`` are its user entries, and ``results[k]`` is the state
        machine's result for ``user[k]``. Returns how many proposals failed because
        other entries were committed in their place (orphans only)."""
        applied = entries[-1].index
        runs = self._runs
        if user and user[-1].index - user[0].index == len(user) - 1:
            position = None  # contiguous: the result of index i is results[i - base]
            base, top = user[0].index, user[-1].index
        else:
            position = {e.index: k for k, e in enumerate(user)}
            base, top = 0, -1
        freed = dropped = done = 0
        cut_term = 0
        while done < len(runs) and runs[done].first <= applied:
            run = runs[done]
            lo, hi = run.next, min(run.last, applied)
            partly = 0  # a batch committed up to its cut: failed once its results are in
            if run.orphan:
                ours = self._ours(run, lo, hi, entries)
                if ours <= hi:  # the rest of the run can never commit: the run ends before it
                    assert self._replaced is not None  # set with the orphan marks
                    if run.futures is None and ours > run.first:
                        partly = run.last
                    else:
                        self._fail_from(run, ours, self._replaced)
                    cut = run.last - ours + 1
                    dropped += cut
                    freed += cut
                    hi = run.last = ours - 1
                    cut_term = run.term
            if position is None:
                a, b = max(lo, base), min(hi, top)
                if a <= b:
                    if run.futures is not None:
                        kernels.set_results(run.futures, a - run.first, results, a - base,
                                            b - a + 1)
                    else:
                        run.results.extend(results[a - base:b - base + 1])
            else:
                for i in range(lo, hi + 1):
                    k = position.get(i)
                    if k is None:
                        continue
                    if run.futures is not None:
                        kernels.set_results(run.futures, i - run.first, results, k, 1)
                    else:
                        run.results.append(results[k])
            freed += hi - lo + 1
            run.next = hi + 1
            if partly:
                assert run.batch is not None
                fail_future(run.batch, _partly_committed(run, partly))
            if run.last > applied:
                break  # the rest of this run commits in a later batch
            done += 1
            if run.given_up is not None:
                assert run.batch is not None  # only batches wait to be given up on
                fail_future(run.batch, _rest_unknown(run, *run.given_up))
            elif run.batch is not None and not run.batch.done():
                run.batch.set_result(_committed_results(run, run.last))
        del runs[:done]
        self.pending -= freed
        if cut_term:  # the later entries of that term follow the cut one in every log
            assert self._replaced is not None
            dropped += self._fail(lambda run: run.next if run.orphan and run.term == cut_term
                                  else None, self._replaced)
        return dropped

    @staticmethod
    def _ours(run: _Run, lo: int, hi: int, entries: Sequence[Any]) -> int:
        """The first index of ``lo .. hi`` whose committed entry (in ``entries``) is not
        the run's (past ``hi``: all are). The committed entry at an index is the one
        proposed there if it has the run's term (Log Matching, §5.3); once one is not,
        none after it is, as a log holding the later one would hold the earlier too."""
        first = entries[0].index
        assert lo >= first  # runs are answered batch by batch, in order
        term = run.term
        for i in range(lo, hi + 1):
            if entries[i - first].term != term:
                return i
        return hi + 1

    def fail_through(self, index: int, exc: BaseException) -> int:
        """Fail the proposals of entries up to ``index`` (all of a batch reaching past
        it): a snapshot restored in their place, their results are not to be had."""
        runs = self._runs
        freed = done = 0
        while done < len(runs) and runs[done].next <= index:
            run = runs[done]
            stop = run.last if run.futures is None else min(run.last, index)
            # a batch given up on: what its applied entries gave, and the rest unknown
            self._fail_from(run, run.next, exc if run.given_up is None
                            else _rest_unknown(run, *run.given_up), stop)
            freed += stop - run.next + 1
            if stop < run.last:
                run.next = stop + 1
                break
            done += 1
        del runs[:done]
        self.pending -= freed
        return freed

    def fail_after(self, index: int, exc: BaseException) -> int:
        """Fail every proposal of an entry after ``index``."""
        return self._fail(lambda run: index + 1, exc)

    def orphan(self, committed: int, replaced: BaseException) -> None:
        """This node lost the leadership its waiting runs were appended under. Entries up
        to ``committed`` are applied and answered as ever; a later leader may still
        commit the others, or commit other entries in their place: their proposers get
        ``replaced`` then (``fail_orphans`` gives up before either is known)."""
        self._replaced = replaced
        for run in self._runs:
            run.orphan = max(run.next, committed + 1) if run.last > committed else 0

    def fail_orphans_through(self, index: int, exc: BaseException) -> int:
        """Fail the proposals of orphaned entries at or below ``index``: a snapshot of a
        later leader covers those indexes, and which entries it holds there is not known
        here. Orphans past it keep waiting for the entries committed there: a run of
        singles reaching past ``index`` is split at it (a batch has one future for all
        its entries, and fails whole)."""
        runs: list[_Run] = []
        for run in self._runs:
            runs.append(run)
            if run.orphan and run.futures is not None \
                    and max(run.orphan, run.next) <= index < run.last:
                cut = index + 1 - run.first
                tail = _Run(index + 1, run.last, run.term, run.futures[cut:], None)
                tail.orphan = index + 1
                run.futures, run.last = run.futures[:cut], index
                runs.append(tail)
        self._runs = runs
        return self._fail(lambda run: run.orphan if 0 < run.orphan <= index else None, exc,
                          given_up=True)

    def fail_orphans(self, exc: BaseException) -> int:
        """Fail the proposals of orphaned entries: their fate is not known."""
        return self._fail(lambda run: run.orphan or None, exc, given_up=True)

    def _fail(self, first: Callable[[_Run], int | None], exc: BaseException,
              given_up: bool = False) -> int:
        """Fail the proposals of each run from index ``first(run)`` on (None: keep it),
        with ``exc``. ``given_up`` (the fate of orphans, which ``first`` names after the
        committed entries): a batch whose first entries were committed keeps waiting
        for them to be applied, and then fails with their results."""
        keep: list[_Run] = []
        freed = 0
        for run in self._runs:
            start = first(run)
            if start is not None and max(start, run.next) <= run.last:
                start = max(start, run.next)
                if given_up and start > run.next and run.batch is not None:
                    run.given_up = (exc, run.last)
                else:
                    self._fail_from(run, start, _rest_unknown(run, exc, run.last)
                                    if given_up else exc)
                freed += run.last - start + 1
                if start == run.next:
                    continue  # nothing of it is left
                run.last = start - 1
            keep.append(run)
        self._runs = keep
        self.pending -= freed
        return freed

    @staticmethod
    def _fail_from(run: _Run, start: int, exc: BaseException, stop: int | None = None) -> None:
        """Fail the proposals of ``run``'s entries from ``start`` (to ``stop``) on; all
        of a batch."""
        if run.futures is not None:
            end = None if stop is None else stop - run.first + 1
            for f in run.futures[start - run.first:end]:
                fail_future(f, exc)
        elif run.batch is not None:
            fail_future(run.batch, exc)
