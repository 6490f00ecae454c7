"""Snapshot data as streams, so a snapshot never has to fit in memory (§7).

A state machine's ``snapshot()`` returns bytes or a readable binary file object; storage
copies it in chunks (``save_snapshot``) and hands back a new readable, seekable file
object for it on every ``load_snapshot()``. The leader reads InstallSnapshot chunks from
that file at their offsets; a follower spools the chunks it receives into a temporary
file that spills to disk past ``SPOOL_BYTES``, and restores the state machine from it.
"""
from __future__ import annotations

import io
import os
import tempfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["SnapshotData", "COPY_BYTES", "SPOOL_BYTES", "as_stream", "stream_size",
           "copy_stream", "close_stream", "spool"]

#: What ``StateMachine.snapshot()`` may return.
SnapshotData = bytes | bytearray | memoryview | BinaryIO

#: The most a copy of snapshot data holds in memory at once.
COPY_BYTES = 1 << 20
#: A snapshot being received stays in memory up to this size, then spills to a temp file.
SPOOL_BYTES = 8 << 20


def as_stream(data: SnapshotData) -> BinaryIO:
    """``data`` as a readable binary stream: bytes-like objects are wrapped, streams kept."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    if callable(getattr(data, "read", None)):
        return data
    raise TypeError(f"a snapshot is bytes or a readable binary file object, got "
                    f"{type(data).__name__}")


def stream_size(stream: BinaryIO) -> int:
    """Size of a seekable stream, in bytes."""
    return stream.seek(0, os.SEEK_END)


def copy_stream(src: BinaryIO, write: Callable[[bytes], object]) -> tuple[int, int]:
    """Copy ``src`` to its end through ``write``, ``COPY_BYTES`` at a time; returns
    (bytes copied, running crc32 of them)."""
    size = crc = 0
    while True:
        chunk = src.read(COPY_BYTES)
        if not chunk:
            return size, crc
        write(chunk)
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)


def close_stream(stream: object) -> None:
    """Close ``stream`` if it can be closed (a snapshot may be any readable object)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def spool() -> BinaryIO:
    """A temporary file for a snapshot being received: memory first, disk past
    ``SPOOL_BYTES``; deleted when closed."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # type: ignore[return-value]
