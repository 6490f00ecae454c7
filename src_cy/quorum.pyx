# Majority and joint-majority arithmetic (Raft §5.3, §5.4, §6). Twin: fastraft/_py/quorum.py
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

MAX_INDEX = 0x7FFFFFFFFFFFFFFF
DEF MAX_INDEX_C = 0x7FFFFFFFFFFFFFFF
VOTE_PENDING = 0
VOTE_WON = 1
VOTE_LOST = 2

DEF _STACK = 16


cdef inline void _insertion_sort_desc(int64_t* a, Py_ssize_t n) noexcept nogil:
    # Clusters have a handful of voters: insertion sort beats anything fancier.
    cdef Py_ssize_t i, j
    cdef int64_t x
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and a[j] < x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


cpdef object committed_index(object match_indexes):
    """The largest index that a majority of ``match_indexes`` has reached (§5.3)."""
    cdef Py_ssize_t n = len(match_indexes)
    cdef int64_t stack[_STACK]
    cdef int64_t* buf = stack
    cdef Py_ssize_t i = 0
    cdef int64_t result
    if n == 0:
        return MAX_INDEX
    if n > _STACK:
        buf = <int64_t*>malloc(n * sizeof(int64_t))
        if buf == NULL:
            raise MemoryError()
    try:
        for v in match_indexes:
            buf[i] = v
            i += 1
        _insertion_sort_desc(buf, n)
        result = buf[n // 2]
    finally:
        if buf != stack:
            free(buf)
    return result


cpdef object joint_committed_index(object a, object b):
    """Committed index under joint consensus: both majorities must agree (§6)."""
    ca = committed_index(a)
    cb = committed_index(b)
    return ca if ca < cb else cb


cpdef int vote_result(object votes, object voters) except -1:
    """VOTE_WON once a majority of ``voters`` granted, VOTE_LOST once that is impossible."""
    cdef Py_ssize_t n = len(voters)
    cdef Py_ssize_t granted = 0, missing = 0, quorum
    if n == 0:
        return VOTE_WON
    get = votes.get
    for v in voters:
        vote = get(v)
        if vote is None:
            missing += 1
        elif vote:
            granted += 1
    quorum = n // 2 + 1
    if granted >= quorum:
        return VOTE_WON
    if granted + missing >= quorum:
        return VOTE_PENDING
    return VOTE_LOST


cpdef int joint_vote_result(object votes, object a, object b) except -1:
    """Election result under joint consensus: a majority of each configuration (§6)."""
    cdef int ra = vote_result(votes, a)
    cdef int rb = vote_result(votes, b)
    if ra == rb:
        return ra
    if ra == VOTE_LOST or rb == VOTE_LOST:
        return VOTE_LOST
    return VOTE_PENDING


cdef inline int64_t _majority_value(const int64_t* values, const Py_ssize_t* slots,
                                    Py_ssize_t n, int64_t* scratch) noexcept nogil:
    cdef Py_ssize_t i
    if n == 0:
        return MAX_INDEX_C
    for i in range(n):
        scratch[i] = values[slots[i]]
    _insertion_sort_desc(scratch, n)
    return scratch[n // 2]


cdef class QuorumTracker:
    """One value per voter (a match index, or an acknowledged heartbeat sequence) of a
    configuration that may be joint, kept in C arrays as answers arrive, so the largest
    value a quorum has reached is one call without building lists (§5.3, §6)."""

    cdef Py_ssize_t n, n_in, n_out
    cdef int64_t* ids
    cdef int64_t* values
    cdef int64_t* scratch
    cdef Py_ssize_t* slots_in
    cdef Py_ssize_t* slots_out

    def __cinit__(self, incoming, outgoing=()):
        cdef list members = list(dict.fromkeys(list(incoming) + list(outgoing)))
        cdef Py_ssize_t i, k = max(len(members), 1)
        self.n = len(members)
        self.n_in = len(incoming)
        self.n_out = len(outgoing)
        self.ids = <int64_t*>malloc(k * sizeof(int64_t))
        self.values = <int64_t*>malloc(k * sizeof(int64_t))
        self.scratch = <int64_t*>malloc(k * sizeof(int64_t))
        self.slots_in = <Py_ssize_t*>malloc(max(self.n_in, 1) * sizeof(Py_ssize_t))
        self.slots_out = <Py_ssize_t*>malloc(max(self.n_out, 1) * sizeof(Py_ssize_t))
        if (self.ids == NULL or self.values == NULL or self.scratch == NULL
                or self.slots_in == NULL or self.slots_out == NULL):
            raise MemoryError()
        for i in range(self.n):
            self.ids[i] = members[i]
            self.values[i] = 0
        for i, v in enumerate(incoming):
            self.slots_in[i] = members.index(v)
        for i, v in enumerate(outgoing):
            self.slots_out[i] = members.index(v)

    def __dealloc__(self):
        free(self.ids)
        free(self.values)
        free(self.scratch)
        free(self.slots_in)
        free(self.slots_out)

    cdef Py_ssize_t _slot(self, int64_t node_id) noexcept:
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.ids[i] == node_id:
                return i
        return -1

    cpdef void set(self, int64_t node_id, int64_t value):
        cdef Py_ssize_t i = self._slot(node_id)
        if i >= 0:
            self.values[i] = value

    def get(self, int64_t node_id):
        """The value of a voter (KeyError for a non-voter)."""
        cdef Py_ssize_t i = self._slot(node_id)
        if i < 0:
            raise KeyError(node_id)
        return self.values[i]

    cpdef int64_t committed_index(self):
        """The largest value a majority of each configuration has reached."""
        cdef int64_t a = _majority_value(self.values, self.slots_in, self.n_in, self.scratch)
        cdef int64_t b = _majority_value(self.values, self.slots_out, self.n_out, self.scratch)
        return a if a < b else b
