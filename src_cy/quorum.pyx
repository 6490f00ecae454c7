# Majority and joint-majority arithmetic (Raft §5.3, §5.4, §6). Twin: fastraft/_py/quorum.py
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

MAX_INDEX = 0x7FFFFFFFFFFFFFFF
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
