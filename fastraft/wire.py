"""Encoding of message batches for byte-stream transports.

A batch is a sequence of records ``u32 head_len | head | u32 blob_len | blob``: ``head``
is the msgspec (msgpack) encoding of one message; for an ``AppendEntries`` its entries
travel in ``blob``, encoded by the batch-codec kernel, and are decoded as slices of the
received buffer (entries inside the head are refused). Terms, indexes and kinds are
range-checked while decoding. Any malformed input raises ``DecodeError``; batches travel
in frames cut by ``FrameReader``.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from fastraft import kernels
from fastraft.errors import DecodeError
from fastraft.messages import AppendEntries, Message

_U32 = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_EMPTY_LEN = _U32.pack(0)


class FrameTooLarge(DecodeError):
    """A frame header announces more bytes than the connection may hold."""


class FrameReader:
    """Cuts a byte stream of ``u32 length | body`` frames.

    Linear in the bytes received: complete frames inside one read are views of that read
    (no copy); a frame split across reads is gathered once into its own buffer. A header
    announcing more than ``max_frame`` bytes raises ``FrameTooLarge`` before anything of
    that frame is buffered, so a connection never holds more than ``max_frame + 4`` bytes.
    ``max_frame`` may change between reads (raised once a peer is authenticated).
    """

    __slots__ = ("max_frame", "_head", "_body", "_need")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._head = b""  # a header cut short by the end of a read
        self._body: bytearray | None = None  # a frame gathered across reads
        self._need = 0  # bytes still missing from _body

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet complete."""
        return len(self._head) + (len(self._body) if self._body is not None else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """The frames completed by ``data``, in order (bytes-like objects)."""
        frames: list[Any] = []
        view = memoryview(data)
        size = len(view)
        pos = 0
        if self._head:
            take = 4 - len(self._head)
            self._head += bytes(view[:take])
            pos = take
            if len(self._head) < 4:
                return frames
            (n,) = _U32.unpack(self._head)
            self._head = b""
            self._start(n)
        if self._body is not None:
            take = min(self._need, size - pos)
            self._body += view[pos:pos + take]
            self._need -= take
            pos += take
            if self._need:
                return frames
            frames.append(memoryview(self._body))
            self._body = None
        unpack = _U32.unpack_from
        while size - pos >= 4:
            (n,) = unpack(view, pos)
            pos += 4
            if size - pos >= n:
                self._check(n)
                frames.append(view[pos:pos + n])
                pos += n
            else:
                self._start(n)[:] = view[pos:]
                self._need -= size - pos
                return frames
        if pos < size:
            self._head = bytes(view[pos:])
        return frames

    def _check(self, n: int) -> None:
        if n > self.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {self.max_frame}")

    def _start(self, n: int) -> bytearray:
        """Begin gathering a frame of ``n`` bytes; returns its (empty) buffer."""
        self._check(n)
        body = self._body = bytearray()
        self._need = n
        return body


class BlobCache:
    """Encoded entry batches of recent AppendEntries, so the same entries sent to several
    followers are encoded once. Keyed by the group and the first and last (index, term):
    by the Log Matching Property (§5.3) those fix every entry in between. Emptied when it
    holds ``MAX_BLOBS`` batches or ``MAX_BYTES`` bytes (cheaper than evicting one at a
    time, and a host of many groups still finds each group's batch for every peer)."""

    __slots__ = ("_blobs", "_bytes")

    MAX_BLOBS = 256
    MAX_BYTES = 8 << 20

    def __init__(self) -> None:
        self._blobs: dict[tuple[Any, ...], bytes] = {}
        self._bytes = 0

    def encode(self, entries: list[Any], group: int = 0) -> bytes:
        first, last = entries[0], entries[-1]
        key = (group, first.index, first.term, last.index, last.term)
        blob = self._blobs.get(key)
        if blob is None:
            blob = kernels.encode_entries(entries)
            if len(self._blobs) >= self.MAX_BLOBS or self._bytes >= self.MAX_BYTES:
                self._blobs.clear()
                self._bytes = 0
            self._blobs[key] = blob
            self._bytes += len(blob)
        return blob


def encode_message_parts(messages: Sequence[Any], parts: list[bytes],
                         blobs: BlobCache | None = None, group: int = 0) -> int:
    """Append the encoding of ``messages`` to ``parts``; returns its size. An
    AppendEntries's entries are one part, as ``blobs`` holds them: written as they are,
    not copied into a frame for each follower (entries of 10 KiB writes would be held
    three times)."""
    append = parts.append
    pack = _U32.pack
    size = 0
    for m in messages:
        if type(m) is AppendEntries and m.entries:
            entries = m.entries
            m.entries = []
            try:
                head = _encoder.encode(m)
            finally:
                m.entries = entries
            blob = (kernels.encode_entries(entries) if blobs is None
                    else blobs.encode(entries, group))
            append(pack(len(head)))
            append(head)
            append(pack(len(blob)))
            append(blob)
            size += 8 + len(head) + len(blob)
        else:
            head = _encoder.encode(m)
            append(pack(len(head)))
            append(head)
            append(_EMPTY_LEN)
            size += 8 + len(head)
    return size


def encode_messages(messages: Sequence[Any], blobs: BlobCache | None = None,
                    group: int = 0) -> bytes:
    """``messages`` encoded in one piece (``decode_messages`` reads it)."""
    parts: list[bytes] = []
    encode_message_parts(messages, parts, blobs, group)
    return b"".join(parts)


def decode_messages(buf: bytes | bytearray | memoryview, pos: int = 0) -> list[Any]:
    """The messages encoded in ``buf`` from offset ``pos`` to its end."""
    view = memoryview(buf)
    size = len(view)
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
            if type(m) is AppendEntries and m.entries:
                raise DecodeError(f"entries inside a message head at offset {pos}: "
                                  "they travel in the entry blob")
            pos += n
            (blob_len,) = unpack(view, pos)
            pos += 4
            if blob_len:
                if type(m) is not AppendEntries or pos + blob_len > size:
                    raise DecodeError(f"unexpected entry blob at offset {pos}")
                m.entries = kernels.decode_entries(view[pos:pos + blob_len])
                pos += blob_len
            out.append(m)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed message at offset {pos}: {exc}") from None
    return out
