# Batch codec: one contiguous frame, payloads decoded as slices. Twin: fastraft/_py/codec.py
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from endian cimport get_u32 as _get_u32, get_u64 as _get_u64, put_u32 as _put_u32, put_u64 as _put_u64

from types import MemberDescriptorType

from fastraft.errors import DecodeError
from fastraft.messages import Entry, EntryBatch

DEF HEAD_SIZE = 21
DEF MAX_KIND = 3
DEF MAX_TERM = 0x4000000000000000  # fastraft.messages.MAX_TERM == MAX_LOG_INDEX
DEF VIEW_THRESHOLD = 512

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    int T_OBJECT_EX

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member


# An Entry (a msgspec Struct) keeps its fields in slots, each an object pointer at a fixed
# offset that its member descriptor states. The kernels read them there: a generic
# attribute lookup costs ~30 ns, more than the rest of the work on an entry. Anything
# else (a subclass, a field that is not such a slot) goes through getattr.
cdef Py_ssize_t _slot_offset(str name) except -2:
    d = Entry.__dict__.get(name)
    if type(d) is not MemberDescriptorType:
        return -1
    cdef PyMemberDef* m = (<PyMemberDescrObject*><PyObject*>d).d_member
    return m.offset if m.type == T_OBJECT_EX else -1

cdef Py_ssize_t _TERM = _slot_offset("term")
cdef Py_ssize_t _INDEX = _slot_offset("index")
cdef Py_ssize_t _KIND = _slot_offset("kind")
cdef Py_ssize_t _DATA = _slot_offset("data")
cdef object _ENTRY = Entry if min(_TERM, _INDEX, _KIND, _DATA) >= 0 else None


cdef inline object _field(object e, Py_ssize_t offset, str name):
    """Field ``name`` of ``e``, from its slot when ``e`` is an Entry."""
    cdef PyObject* p
    if type(e) is _ENTRY:
        p = (<PyObject**>((<char*><PyObject*>e) + offset))[0]
        if p is not NULL:
            return <object>p
    return getattr(e, name)


def encode_entries(entries):
    """Encode ``entries`` (objects with term, index, kind, data) into one frame."""
    cdef Py_ssize_t n = len(entries)
    cdef Py_ssize_t total = 4
    cdef Py_buffer view
    datas = []
    for e in entries:
        d = _field(e, _DATA, "data")
        datas.append(d)
        total += HEAD_SIZE + len(d)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    _put_u32(p, <uint32_t>n)
    p += 4
    cdef Py_ssize_t i = 0
    for e in entries:
        d = datas[i]
        i += 1
        PyObject_GetBuffer(d, &view, PyBUF_SIMPLE)
        try:
            _put_u64(p, <uint64_t>_field(e, _TERM, "term"))
            _put_u64(p + 8, <uint64_t>_field(e, _INDEX, "index"))
            p[16] = <char><uint8_t>_field(e, _KIND, "kind")
            _put_u32(p + 17, <uint32_t>view.len)
            memcpy(p + HEAD_SIZE, view.buf, view.len)
            p += HEAD_SIZE + view.len
        finally:
            PyBuffer_Release(&view)
    return out


def decode_entries(buf):
    """Decode a frame into an ``EntryBatch`` (consecutive indexes, non-decreasing terms,
    known kinds: checked here); payloads of VIEW_THRESHOLD bytes or more are memoryview
    slices of ``buf`` (no copy), smaller ones ``bytes`` (cheaper than a view)."""
    mv = memoryview(buf).cast("B")
    cdef const uint8_t[::1] data = mv
    cdef Py_ssize_t size = data.shape[0]
    cdef const uint8_t* base
    cdef uint32_t count, length, i
    cdef uint64_t term, index
    cdef uint8_t kind
    cdef Py_ssize_t pos, end
    if size < 4:
        raise DecodeError(f"entry batch truncated: {size} bytes, need at least 4")
    base = &data[0]
    count = _get_u32(base)
    if count > (size - 4) // HEAD_SIZE:
        raise DecodeError(f"entry batch claims {count} entries but holds only {size} bytes")
    pos = 4
    out = []
    cdef uint64_t last_term = 0, next_index = 0
    for i in range(count):
        if pos + HEAD_SIZE > size:
            raise DecodeError(f"entry batch truncated at offset {pos}")
        term = _get_u64(base + pos)
        index = _get_u64(base + pos + 8)
        kind = base[pos + 16]
        length = _get_u32(base + pos + 17)
        if kind > MAX_KIND:
            raise DecodeError(f"entry batch has unknown entry kind {kind} at offset {pos}")
        if term > MAX_TERM or index > MAX_TERM:
            raise DecodeError(f"entry batch has an out-of-range term or index at offset {pos}")
        if i and (index != next_index or term < last_term):
            raise DecodeError(f"entry batch is not consecutive at offset {pos}")
        last_term = term
        next_index = index + 1
        pos += HEAD_SIZE
        end = pos + length
        if end > size:
            raise DecodeError(f"entry payload at offset {pos} runs past the end of the batch")
        if length >= VIEW_THRESHOLD:
            out.append(Entry(term, index, kind, mv[pos:end]))
        else:
            out.append(Entry(term, index, kind,
                             PyBytes_FromStringAndSize(<const char*>(base + pos), length)))
        pos = end
    if pos != size:
        raise DecodeError(f"entry batch has {size - pos} trailing bytes")
    return EntryBatch(out)


def index_of_kind(entries, long kind):
    """Position of the first entry of ``kind`` in ``entries``, or -1."""
    cdef Py_ssize_t pos = 0
    for e in entries:
        if _field(e, _KIND, "kind") == kind:
            return pos
        pos += 1
    return -1


def index_not_of_kind(entries, long kind):
    """Position of the first entry NOT of ``kind`` in ``entries``, or -1."""
    cdef Py_ssize_t pos = 0
    for e in entries:
        if _field(e, _KIND, "kind") != kind:
            return pos
        pos += 1
    return -1


def count_within_bytes(entries, Py_ssize_t budget):
    """How many leading entries fit in ``budget`` payload bytes (at least 1 if any)."""
    cdef Py_ssize_t total = 0, n = 0
    for e in entries:
        total += len(_field(e, _DATA, "data"))
        if total > budget and n:
            break
        n += 1
    return n


def set_results(list futures, Py_ssize_t fstart, results, Py_ssize_t rstart, Py_ssize_t count):
    """``futures[fstart + k].set_result(results[rstart + k])`` for k < count, skipping
    futures already done (cancelled by their caller)."""
    cdef Py_ssize_t k
    for k in range(count):
        f = futures[fstart + k]
        if not f.done():
            f.set_result(results[rstart + k])


def entries_follow(entries, prev_index, prev_term, max_term):
    """Position of the first entry that breaks the shape of an AppendEntries batch, or
    -1: entry k must have index ``prev_index + 1 + k``, a term not below the one before it
    (``prev_term`` for the first) and not above ``max_term``, and a known kind."""
    cdef long long expected = prev_index + 1, last = prev_term, top = max_term
    cdef long long t, idx, kind
    cdef Py_ssize_t pos = 0
    for e in entries:
        try:
            t = _field(e, _TERM, "term")
            idx = _field(e, _INDEX, "index")
            kind = _field(e, _KIND, "kind")
        except OverflowError:  # beyond int64: certainly out of range
            return pos
        if idx != expected or t < last or t > top or kind < 0 or kind > MAX_KIND:
            return pos
        last = t
        expected += 1
        pos += 1
    return -1


def make_entries(term, first_index, kind, datas):
    """Entries ``first_index, first_index + 1, ...`` of ``term`` and ``kind``, one per data."""
    cdef Py_ssize_t n = len(datas), k
    out = [None] * n
    for k in range(n):
        out[k] = Entry(term, first_index + k, kind, datas[k])
    return out


def first_unfit_payload(datas, Py_ssize_t limit):
    """Position of the first of ``datas`` that is not ``bytes`` or is longer than
    ``limit``, or -1."""
    cdef Py_ssize_t pos = 0
    for d in datas:
        if type(d) is not bytes or PyBytes_GET_SIZE(d) > limit:
            return pos
        pos += 1
    return -1


def payload_bytes(entries):
    """Total payload bytes of ``entries``."""
    cdef Py_ssize_t total = 0
    for e in entries:
        total += len(_field(e, _DATA, "data"))
    return total
