"""A small replicated key-value state machine: the demo's, and an example to copy.

Commands are msgspec Structs (``Put``, ``Delete``) encoded as msgpack. ``apply`` returns,
per entry, the log index that wrote it (a version a client can compare), or ``Refused``
for a command it could not decode (every replica refuses the same bytes the same way).
It never raises on data it did not write: an exception from ``apply`` stops the node.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import msgspec


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


class KVStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.versions: dict[str, int] = {}
        self.bad_commands = 0

    def apply(self, entries: Sequence) -> list[int | Refused]:
        data, versions = self.data, self.versions
        out: list[int | Refused] = []
        for e in entries:
            try:
                cmd = _dec.decode(e.data)
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

    def snapshot(self) -> bytes:
        return _enc.encode((self.data, self.versions))

    def restore(self, data: BinaryIO) -> None:
        self.data, self.versions = msgspec.msgpack.decode(
            data.read(), type=tuple[dict[str, bytes], dict[str, int]])
