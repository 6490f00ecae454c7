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

from fastraft.errors import DecodeError
from fastraft.messages import Entry

_COUNT = struct.Struct("<I")
_HEAD = struct.Struct("<QQBI")
_HEAD_SIZE = _HEAD.size  # 21
_MAX_KIND = 2
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


def decode_entries(buf) -> list[Entry]:
    """Decode a frame; payloads of ``VIEW_THRESHOLD`` bytes or more are memoryview slices
    of ``buf`` (no copy), smaller ones ``bytes``.

    Raises DecodeError on a truncated buffer, trailing bytes or an unknown kind.
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
    for _ in range(count):
        if pos + _HEAD_SIZE > size:
            raise DecodeError(f"entry batch truncated at offset {pos}")
        term, index, kind, length = unpack(view, pos)
        pos += _HEAD_SIZE
        if kind > _MAX_KIND:
            raise DecodeError(f"entry batch has unknown entry kind {kind} at offset {pos - _HEAD_SIZE}")
        if term > 0x7FFFFFFFFFFFFFFF or index > 0x7FFFFFFFFFFFFFFF:
            raise DecodeError(f"entry batch has an out-of-range term or index at offset {pos - _HEAD_SIZE}")
        end = pos + length
        if end > size:
            raise DecodeError(f"entry payload at offset {pos} runs past the end of the batch")
        out.append(Entry(term, index, kind,
                         view[pos:end] if length >= VIEW_THRESHOLD else bytes(view[pos:end])))
        pos = end
    if pos != size:
        raise DecodeError(f"entry batch has {size - pos} trailing bytes")
    return out


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


def set_results(futures, fstart: int, results, rstart: int, count: int) -> None:
    """``futures[fstart + k].set_result(results[rstart + k])`` for k < count, skipping
    futures already done (cancelled by their caller)."""
    for k in range(count):
        f = futures[fstart + k]
        if not f.done():
            f.set_result(results[rstart + k])


def make_entries(term: int, first_index: int, kind: int, datas: Sequence) -> list[Entry]:
    """Entries ``first_index, first_index + 1, ...`` of ``term`` and ``kind``, one per data."""
    return [Entry(term, i, kind, d) for i, d in enumerate(datas, first_index)]


def payload_bytes(entries: Sequence[Entry]) -> int:
    """Total payload bytes of ``entries``."""
    return sum(len(e.data) for e in entries)
