"""A small replicated key-value state machine: the demo's, and an example to copy.

Commands are msgspec Structs (``Put``, ``Delete``) encoded as msgpack. ``apply`` returns,
per entry, the log index that wrote it (a version a client can compare), or ``Refused``
for a command it could not decode (every replica refuses the same bytes the same way).
It never raises on data it did not write: an exception from ``apply`` stops the node.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from itertools import islice
from typing import Any, BinaryIO, cast

import msgspec

from fastraft.messages import Entry


class Put(msgspec.Struct, tag="put", array_like=True):
    key: str
    value: bytes


class Delete(msgspec.Struct, tag="del", array_like=True):
    key: str


class Refused(msgspec.Struct, frozen=True):
    """The result for a committed command the store could not decode."""

    reason: str


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Put | Delete)


def put(key: str, value: bytes) -> bytes:
    return _enc.encode(Put(key, value))


def delete(key: str) -> bytes:
    return _enc.encode(Delete(key))


def decode(data: bytes | memoryview) -> Put | Delete:
    """The command in an entry's data; ``msgspec.MsgspecError`` or ``ValueError`` (bad
    UTF-8) for anything that is not one."""
    command: Put | Delete = _dec.decode(data)
    return command


class KVStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.versions: dict[str, int] = {}
        self.bad_commands = 0

    def apply(self, entries: Sequence[Entry]) -> list[int | Refused]:
        data, versions = self.data, self.versions
        out: list[int | Refused] = []
        for e in entries:
            try:
                cmd = decode(e.data)
            except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: bad UTF-8
                self.bad_commands += 1
                out.append(Refused(f"entry {e.index} is not a KV command: {exc}"))
                continue
            if type(cmd) is Put:
                data[cmd.key] = cmd.value
                versions[cmd.key] = e.index
            else:
                data.pop(cmd.key, None)
                versions.pop(cmd.key, None)
            out.append(e.index)
        return out

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def snapshot(self) -> BinaryIO:
        """The store as a stream of chunks, encoded as it is read: no copy of the whole
        store is ever held, and no single step holds the GIL for long (the node reads
        it in a thread while replication goes on)."""
        return cast(BinaryIO, _SnapshotStream(self))  # a raw binary stream: read() works

    def restore(self, data: BinaryIO) -> None:
        store, versions = {}, {}
        while head := data.read(_LEN.size):
            (n,) = _LEN.unpack(head)
            for key, value, version in _chunk_dec.decode(data.read(n)):
                store[key] = value
                versions[key] = version
        self.data, self.versions = store, versions


_LEN = struct.Struct("<I")
_chunk_dec = msgspec.msgpack.Decoder(list[tuple[str, bytes, int]])
#: Keys per snapshot chunk: a millisecond or so of encoding.
CHUNK_KEYS = 4096


class _SnapshotStream(io.RawIOBase):
    """``u32 length | msgpack [[key, value, version], ...]`` chunks, made on demand."""

    def __init__(self, store: KVStore) -> None:
        self._items = iter(store.data.items())
        self._versions = store.versions
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            chunk = list(islice(self._items, CHUNK_KEYS))
            if not chunk:
                return 0
            versions = self._versions
            body = _enc.encode([(k, v, versions[k]) for k, v in chunk])
            self._pending = memoryview(_LEN.pack(len(body)) + body)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
