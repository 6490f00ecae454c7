"""Encoding of message batches for byte-stream transports.

A batch is a sequence of records ``u32 head_len | head | u32 blob_len | blob``: ``head``
is the msgspec (msgpack) encoding of one message; for an ``AppendEntries`` its entries
travel in ``blob``, encoded by the batch-codec kernel, and are decoded as slices of the
received buffer. Any malformed input raises ``DecodeError``.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import msgspec

from fastraft import kernels
from fastraft.errors import DecodeError
from fastraft.messages import AppendEntries, Message

_U32 = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_EMPTY_LEN = _U32.pack(0)


def split_frames(buffer: bytes, data: bytes,
                 max_frame: int) -> tuple[list[memoryview], bytes, str | None]:
    """Cut a byte stream of ``u32 length | body`` frames: the complete bodies (views of the
    data), the incomplete rest to keep for the next read, and an error if a header
    announces more than ``max_frame`` bytes (the frames before it are still returned)."""
    if buffer:
        data = buffer + data
    frames = []
    pos, size = 0, len(data)
    view = memoryview(data)
    unpack = _U32.unpack_from
    while size - pos >= 4:
        (n,) = unpack(data, pos)
        if n > max_frame:
            return frames, b"", f"frame of {n} bytes exceeds the limit of {max_frame}"
        if size - pos - 4 < n:
            break
        frames.append(view[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames, data[pos:] if pos < size else b"", None


class BlobCache:
    """Encoded entry batches of the last few AppendEntries, so the same entries sent to
    several followers are encoded once. Keyed by the first and last (index, term): by the
    Log Matching Property (§5.3) those fix every entry in between."""

    __slots__ = ("_blobs",)

    SIZE = 8

    def __init__(self) -> None:
        self._blobs: dict[tuple, bytes] = {}

    def encode(self, entries: list) -> bytes:
        first, last = entries[0], entries[-1]
        key = (first.index, first.term, last.index, last.term)
        blob = self._blobs.get(key)
        if blob is None:
            blob = kernels.encode_entries(entries)
            if len(self._blobs) >= self.SIZE:
                self._blobs.clear()
            self._blobs[key] = blob
        return blob


def encode_messages(messages: Sequence, blobs: BlobCache | None = None) -> bytes:
    parts = []
    append = parts.append
    pack = _U32.pack
    for m in messages:
        if type(m) is AppendEntries and m.entries:
            entries = m.entries
            m.entries = []
            try:
                head = _encoder.encode(m)
            finally:
                m.entries = entries
            blob = (kernels.encode_entries(entries) if blobs is None
                    else blobs.encode(entries))
            append(pack(len(head)))
            append(head)
            append(pack(len(blob)))
            append(blob)
        else:
            head = _encoder.encode(m)
            append(pack(len(head)))
            append(head)
            append(_EMPTY_LEN)
    return b"".join(parts)


def decode_messages(buf) -> list:
    view = memoryview(buf)
    size = len(view)
    pos = 0
    out = []
    unpack = _U32.unpack_from
    try:
        while pos < size:
            if pos + 4 > size:
                raise DecodeError(f"message batch truncated at offset {pos}")
            (n,) = unpack(view, pos)
            pos += 4
            if pos + n + 4 > size:
                raise DecodeError(f"message at offset {pos} runs past the end of the batch")
            m = _decoder.decode(view[pos:pos + n])
            pos += n
            (blob_len,) = unpack(view, pos)
            pos += 4
            if blob_len:
                if type(m) is not AppendEntries or pos + blob_len > size:
                    raise DecodeError(f"unexpected entry blob at offset {pos}")
                m.entries = kernels.decode_entries(view[pos:pos + blob_len])
                pos += blob_len
            out.append(m)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed message at offset {pos}: {exc}") from None
    return out
