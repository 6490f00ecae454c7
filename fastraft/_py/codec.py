"""Batch codec: many entries in one contiguous frame, decoded as slices of the buffer.

Frame layout, little-endian::

    u32 count
    count x ( u64 term | u64 index | u8 kind | u32 length | payload[length] )

The compiled twin produces and accepts exactly the same bytes. Decoded payloads of at
least ``VIEW_THRESHOLD`` bytes are memoryview slices of the buffer (no copy); smaller
ones are copied into ``bytes``, which is cheaper than creating a view.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, cast

from fastraft.errors import DecodeError
from fastraft.messages import Entry, EntryBatch

_COUNT = struct.Struct("<I")
_HEAD = struct.Struct("<QQBI")
_HEAD_SIZE = _HEAD.size  # 21
_MAX_KIND = 3
_MAX_TERM = 1 << 62  # fastraft.messages.MAX_TERM == MAX_LOG_INDEX
VIEW_THRESHOLD = 512


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """Encode ``entries`` (objects with term, index, kind, data) into one frame."""
    parts = [_COUNT.pack(len(entries))]
    pack = _HEAD.pack
    for e in entries:
        data = e.data
        parts.append(pack(e.term, e.index, e.kind, len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_entries(buf: bytes | bytearray | memoryview) -> EntryBatch:
    """Decode a frame; payloads of ``VIEW_THRESHOLD`` bytes or more are memoryview slices
    of ``buf`` (no copy), smaller ones ``bytes``.

    Raises DecodeError on a truncated buffer, trailing bytes, an unknown kind, or entries
    whose indexes are not consecutive or whose terms decrease.
    """
    view = memoryview(buf).cast("B")
    size = len(view)
    if size < 4:
        raise DecodeError(f"entry batch truncated: {size} bytes, need at least 4")
    (count,) = _COUNT.unpack_from(view, 0)
    if count > (size - 4) // _HEAD_SIZE:
        raise DecodeError(f"entry batch claims {count} entries but holds only {size} bytes")
    pos = 4
    out = []
    unpack = _HEAD.unpack_from
    last_term = next_index = 0
    for i in range(count):
        if pos + _HEAD_SIZE > size:
            raise DecodeError(f"entry batch truncated at offset {pos}")
        term, index, kind, length = unpack(view, pos)
        pos += _HEAD_SIZE
        if kind > _MAX_KIND:
            raise DecodeError(f"entry batch has unknown entry kind {kind} at offset "
                              f"{pos - _HEAD_SIZE}")
        if term > _MAX_TERM or index > _MAX_TERM:
            raise DecodeError("entry batch has an out-of-range term or index at offset "
                              f"{pos - _HEAD_SIZE}")
        if i and (index != next_index or term < last_term):
            raise DecodeError(f"entry batch is not consecutive at offset {pos - _HEAD_SIZE}")
        last_term, next_index = term, index + 1
        end = pos + length
        if end > size:
            raise DecodeError(f"entry payload at offset {pos} runs past the end of the batch")
        # a large payload stays a view of the frame (bytes-like; Entry.data documents it)
        data = view[pos:end] if length >= VIEW_THRESHOLD else bytes(view[pos:end])
        out.append(Entry(term, index, kind, cast(bytes, data)))
        pos = end
    if pos != size:
        raise DecodeError(f"entry batch has {size - pos} trailing bytes")
    return EntryBatch(out)


def index_of_kind(entries: Sequence[Entry], kind: int) -> int:
    """Position of the first entry of ``kind`` in ``entries``, or -1."""
    for pos, e in enumerate(entries):
        if e.kind == kind:
            return pos
    return -1


def index_not_of_kind(entries: Sequence[Entry], kind: int) -> int:
    """Position of the first entry NOT of ``kind`` in ``entries``, or -1."""
    for pos, e in enumerate(entries):
        if e.kind != kind:
            return pos
    return -1


def count_within_bytes(entries: Sequence[Entry], budget: int) -> int:
    """How many leading entries fit in ``budget`` payload bytes (at least 1 if any)."""
    total = 0
    n = 0
    for e in entries:
        total += len(e.data)
        if total > budget and n:
            break
        n += 1
    return n


def set_results(futures: list[Any], fstart: int, results: Sequence[Any], rstart: int,
                count: int) -> None:
    """``futures[fstart + k].set_result(results[rstart + k])`` for k < count, skipping
    futures already done (cancelled by their caller)."""
    for k in range(count):
        f = futures[fstart + k]
        if not f.done():
            f.set_result(results[rstart + k])


def entries_follow(entries: Sequence[Entry], prev_index: int, prev_term: int,
                   max_term: int) -> int:
    """Position of the first entry that breaks the shape of an AppendEntries batch, or
    -1: entry k must have index ``prev_index + 1 + k``, a term not below the one before it
    (``prev_term`` for the first) and not above ``max_term``, and a known kind."""
    expected, last = prev_index + 1, prev_term
    for pos, e in enumerate(entries):
        t = e.term
        if e.index != expected or t < last or t > max_term or not 0 <= e.kind <= _MAX_KIND:
            return pos
        last = t
        expected += 1
    return -1


def make_entries(term: int, first_index: int, kind: int,
                 datas: Sequence[bytes]) -> list[Entry]:
    """Entries ``first_index, first_index + 1, ...`` of ``term`` and ``kind``, one per data."""
    return [Entry(term, i, kind, d) for i, d in enumerate(datas, first_index)]


def first_unfit_payload(datas: Sequence[Any], limit: int) -> int:
    """Position of the first of ``datas`` that is not ``bytes`` or is longer than
    ``limit``, or -1."""
    for pos, d in enumerate(datas):
        if type(d) is not bytes or len(d) > limit:
            return pos
    return -1


def payload_bytes(entries: Sequence[Entry]) -> int:
    """Total payload bytes of ``entries``."""
    return sum(len(e.data) for e in entries)
