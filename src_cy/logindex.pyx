# Term-by-index bookkeeping as runs of equal terms. Twin: fastraft/_py/logindex.py
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memmove


cdef class LogIndex:
    """Terms of log entries ``snapshot_index + 1 .. last_index`` (see the Python twin)."""

    # Runs of equal terms: run k covers run_starts[k] .. run_starts[k+1]-1 (the last run
    # ends at _last_index). Starts and terms are both strictly increasing; the first run
    # starts at _snapshot_index + 1 whenever the log is non-empty.
    cdef int64_t* run_starts
    cdef int64_t* run_terms
    cdef Py_ssize_t nruns
    cdef Py_ssize_t capacity
    cdef int64_t _snapshot_index
    cdef int64_t _snapshot_term
    cdef int64_t _last_index

    def __cinit__(self, int64_t snapshot_index=0, int64_t snapshot_term=0):
        self.capacity = 8
        self.nruns = 0
        self.run_starts = <int64_t*>malloc(self.capacity * sizeof(int64_t))
        self.run_terms = <int64_t*>malloc(self.capacity * sizeof(int64_t))
        if self.run_starts == NULL or self.run_terms == NULL:
            raise MemoryError()
        if snapshot_index < 0 or snapshot_term < 0:
            raise ValueError("snapshot index and term must be >= 0")
        self._snapshot_index = snapshot_index
        self._snapshot_term = snapshot_term
        self._last_index = snapshot_index

    def __dealloc__(self):
        free(self.run_starts)
        free(self.run_terms)

    cdef void _grow(self) except *:
        cdef Py_ssize_t cap = self.capacity * 2
        cdef int64_t* s = <int64_t*>realloc(self.run_starts, cap * sizeof(int64_t))
        if s == NULL:
            raise MemoryError()
        self.run_starts = s
        cdef int64_t* t = <int64_t*>realloc(self.run_terms, cap * sizeof(int64_t))
        if t == NULL:
            raise MemoryError()
        self.run_terms = t
        self.capacity = cap

    cdef void _push_run(self, int64_t start, int64_t term) except *:
        if self.nruns == self.capacity:
            self._grow()
        self.run_starts[self.nruns] = start
        self.run_terms[self.nruns] = term
        self.nruns += 1

    cdef Py_ssize_t _run_of(self, int64_t index) noexcept nogil:
        # Index of the last run starting at or before ``index`` (-1 if none).
        cdef Py_ssize_t lo = 0, hi = self.nruns, mid
        if self.nruns and self.run_starts[self.nruns - 1] <= index:
            return self.nruns - 1  # the hot case: the tail of the log
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.run_starts[mid] <= index:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef int64_t _term_at(self, int64_t index) noexcept nogil:
        if index == self._snapshot_index:
            return self._snapshot_term
        if index < self._snapshot_index or index > self._last_index:
            return -1
        return self.run_terms[self._run_of(index)]

    @property
    def snapshot_index(self):
        return self._snapshot_index

    @property
    def snapshot_term(self):
        return self._snapshot_term

    @property
    def first_index(self):
        return self._snapshot_index + 1

    @property
    def last_index(self):
        return self._last_index

    @property
    def last_term(self):
        return self.run_terms[self.nruns - 1] if self.nruns else self._snapshot_term

    def __len__(self):
        return self._last_index - self._snapshot_index

    cpdef append(self, int64_t term, int64_t count=1):
        """Append ``count`` entries of ``term`` after ``last_index``."""
        if count < 0:
            raise ValueError("count must be >= 0")
        if count == 0:
            return
        cdef int64_t last_term = self.run_terms[self.nruns - 1] if self.nruns else self._snapshot_term
        if term < last_term:
            raise ValueError(f"term {term} is older than the last term {last_term}")
        if term != last_term or self.nruns == 0:
            self._push_run(self._last_index + 1, term)
        self._last_index += count

    def extend(self, terms):
        """Append one entry per element of ``terms`` (non-decreasing)."""
        for term in terms:
            self.append(term, 1)

    cpdef int64_t term_at(self, int64_t index):
        """Term of the entry at ``index``; -1 when compacted away or beyond the end."""
        return self._term_at(index)

    cpdef truncate_from(self, int64_t index):
        """Remove entries ``index .. last_index`` (conflicting suffix, §5.3)."""
        if index <= self._snapshot_index:
            raise ValueError(f"cannot truncate from {index}: entries up to "
                             f"{self._snapshot_index} are compacted")
        if index > self._last_index:
            return
        self.nruns = self._run_of(index - 1) + 1
        self._last_index = index - 1

    cpdef compact_to(self, int64_t index):
        """Drop entries up to ``index``, keeping the term of entry ``index`` (§7)."""
        if index <= self._snapshot_index:
            return
        if index > self._last_index:
            raise ValueError(f"cannot compact to {index}: the log ends at {self._last_index}")
        cdef int64_t term = self._term_at(index)
        cdef Py_ssize_t pos
        if index == self._last_index:
            self.nruns = 0
        else:
            # The run holding index + 1 becomes the first run and starts there.
            pos = self._run_of(index + 1)
            if pos > 0:
                memmove(self.run_starts, self.run_starts + pos, (self.nruns - pos) * sizeof(int64_t))
                memmove(self.run_terms, self.run_terms + pos, (self.nruns - pos) * sizeof(int64_t))
                self.nruns -= pos
            self.run_starts[0] = index + 1
        self._snapshot_index = index
        self._snapshot_term = term

    cpdef reset(self, int64_t snapshot_index, int64_t snapshot_term):
        """Discard everything and start after a snapshot at ``snapshot_index``."""
        self._snapshot_index = snapshot_index
        self._snapshot_term = snapshot_term
        self._last_index = snapshot_index
        self.nruns = 0

    cpdef int64_t find_conflict(self, int64_t first_index, object terms) except -1:
        """First index from ``first_index`` whose term differs from ``terms``; 0 if none."""
        cdef int64_t index = first_index
        cdef int64_t term
        for t in terms:
            term = t
            if index > self._snapshot_index and self._term_at(index) != term:
                return index
            index += 1
        return 0

    cpdef int64_t find_conflict_by_term(self, int64_t index, int64_t term):
        """Largest ``j <= index`` whose term is ``<= term`` (fast log backtracking)."""
        if index > self._last_index:
            index = self._last_index
        if index <= self._snapshot_index:
            return self._snapshot_index
        cdef Py_ssize_t pos = self._run_of(index)
        while pos >= 0:
            if self.run_terms[pos] <= term:
                return index
            index = self.run_starts[pos] - 1
            pos -= 1
        return self._snapshot_index
