"""Term-by-index bookkeeping for a Raft log, stored as runs of equal terms.

Terms change rarely (once per leader), so the log is a short list of runs
``(first index, term)``: appending a batch costs O(1), ``term_at`` a bisection over
the runs, and the fast-backtracking hint needs no scan of entries.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence


class LogIndex:
    """Terms of log entries ``snapshot_index + 1 .. last_index``.

    Invariants: ``_run_starts`` is strictly increasing, every start lies in
    ``first_index .. last_index``, ``_run_terms`` is strictly increasing (terms in a Raft
    log never decrease), and the first run starts at ``first_index`` when the log is
    non-empty.
    """

    __slots__ = ("_run_starts", "_run_terms", "_snapshot_index", "_snapshot_term", "_last_index")

    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0) -> None:
        if snapshot_index < 0 or snapshot_term < 0:
            raise ValueError("snapshot index and term must be >= 0")
        self._snapshot_index = snapshot_index
        self._snapshot_term = snapshot_term
        self._last_index = snapshot_index
        self._run_starts: list[int] = []
        self._run_terms: list[int] = []

    @property
    def snapshot_index(self) -> int:
        """Index of the last compacted entry (0 when nothing was compacted)."""
        return self._snapshot_index

    @property
    def snapshot_term(self) -> int:
        """Term of the last compacted entry, kept so the §5.3 check works at the boundary."""
        return self._snapshot_term

    @property
    def first_index(self) -> int:
        return self._snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def last_term(self) -> int:
        return self._run_terms[-1] if self._run_terms else self._snapshot_term

    def __len__(self) -> int:
        return self._last_index - self._snapshot_index

    def append(self, term: int, count: int = 1) -> None:
        """Append ``count`` entries of ``term`` after ``last_index``."""
        if count < 0:
            raise ValueError("count must be >= 0")
        if count == 0:
            return
        last_term = self.last_term
        if term < last_term:
            raise ValueError(f"term {term} is older than the last term {last_term}")
        if term != last_term or not self._run_terms:
            self._run_starts.append(self._last_index + 1)
            self._run_terms.append(term)
        self._last_index += count

    def extend(self, terms: Sequence[int]) -> None:
        """Append one entry per element of ``terms`` (non-decreasing)."""
        for term in terms:
            self.append(term, 1)

    def term_at(self, index: int) -> int:
        """Term of the entry at ``index``; -1 when compacted away or beyond the end."""
        if index == self._snapshot_index:
            return self._snapshot_term
        if index < self._snapshot_index or index > self._last_index:
            return -1
        pos = bisect_right(self._run_starts, index) - 1
        return self._run_terms[pos]

    def truncate_from(self, index: int) -> None:
        """Remove entries ``index .. last_index`` (conflicting suffix, §5.3)."""
        if index <= self._snapshot_index:
            raise ValueError(f"cannot truncate from {index}: entries up to "
                             f"{self._snapshot_index} are compacted")
        if index > self._last_index:
            return
        pos = bisect_right(self._run_starts, index - 1)
        del self._run_starts[pos:]
        del self._run_terms[pos:]
        self._last_index = index - 1

    def compact_to(self, index: int) -> None:
        """Drop entries up to ``index``, keeping the term of entry ``index`` (§7)."""
        if index <= self._snapshot_index:
            return
        if index > self._last_index:
            raise ValueError(f"cannot compact to {index}: the log ends at {self._last_index}")
        term = self.term_at(index)
        if index == self._last_index:
            self._run_starts.clear()
            self._run_terms.clear()
        else:
            # The run holding index + 1 becomes the first run and starts there.
            pos = bisect_right(self._run_starts, index + 1) - 1
            del self._run_starts[:pos]
            del self._run_terms[:pos]
            self._run_starts[0] = index + 1
        self._snapshot_index = index
        self._snapshot_term = term

    def reset(self, snapshot_index: int, snapshot_term: int) -> None:
        """Discard everything and start after a snapshot at ``snapshot_index``."""
        self._snapshot_index = snapshot_index
        self._snapshot_term = snapshot_term
        self._last_index = snapshot_index
        self._run_starts.clear()
        self._run_terms.clear()

    def find_conflict(self, first_index: int, terms: Sequence[int]) -> int:
        """First index from ``first_index`` whose term differs from ``terms`` (§5.3).

        Returns 0 when every given entry is already present with the same term. Indexes
        at or below ``snapshot_index`` are committed and treated as matching.
        """
        index = first_index
        for term in terms:
            if index > self._snapshot_index and self.term_at(index) != term:
                return index
            index += 1
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest ``j <= index`` whose term is ``<= term`` (fast log backtracking).

        Bounded below by ``snapshot_index``. A follower rejecting ``(index, term)`` sends
        this as its hint; the leader applies it again to its own log to skip every entry of
        a term the follower cannot share, in one round trip per term rather than per entry.
        """
        if index > self._last_index:
            index = self._last_index
        if index <= self._snapshot_index:
            return self._snapshot_index
        pos = bisect_right(self._run_starts, index) - 1
        while pos >= 0:
            if self._run_terms[pos] <= term:
                return index
            index = self._run_starts[pos] - 1
            pos -= 1
        return self._snapshot_index
