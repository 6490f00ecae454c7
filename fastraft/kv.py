"""A small replicated key-value state machine: the demo's, and an example to copy.

Commands are msgspec Structs (``Put``, ``Delete``) encoded as msgpack. ``apply`` returns,
per entry, the log index that wrote it (a version a client can compare), or ``Refused``
for a command it could not decode (every replica refuses the same bytes the same way).
It never raises on data it did not write: an exception from ``apply`` stops the node.
"""
from __future__ import annotations

import io
import struct
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate, chain, islice
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
        self._table = _Table()

    @property
    def data(self) -> Mapping[str, bytes]:
        """The store's values by key (read-only)."""
        return _View(self._table, 0)

    @property
    def versions(self) -> Mapping[str, int]:
        """The index of the entry that wrote each key (read-only)."""
        return _View(self._table, 1)

    def apply(self, entries: Sequence[Entry]) -> list[int | Refused]:
        table = self._table
        out: list[int | Refused] = []
        for e in entries:
            try:
                cmd = decode(e.data)
            except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: bad UTF-8
                out.append(Refused(f"entry {e.index} is not a KV command: {exc}"))
                continue
            if type(cmd) is Put:
                table.put(cmd.key, cmd.value, e.index)
            else:
                table.delete(cmd.key)
            out.append(e.index)
        return out

    def get(self, key: str) -> bytes | None:
        shard = self._table.find(key)
        return None if shard is None else shard[0].get(key)

    def snapshot(self) -> BinaryIO:
        """The store as a stream of chunks, encoded as it is read: no copy of the whole
        store is ever held, and each ``read`` encodes ``CHUNK_KEYS`` keys, a few
        milliseconds (the node reads it on its event loop)."""
        return cast(BinaryIO, _SnapshotStream(self._table))  # a raw binary stream

    def restore(self, data: BinaryIO) -> None:
        table = _Table()
        put = table.put
        while head := data.read(_LEN.size):
            (n,) = _LEN.unpack(head)
            for key, value, version in _chunk_dec.decode(data.read(n)):
                put(key, value, version)
        self._table = table


_LEN = struct.Struct("<I")
_chunk_dec = msgspec.msgpack.Decoder(list[tuple[str, bytes, int]])
#: The store is split over this many pairs of dicts by key hash (made as keys arrive).
SHARDS = 64
#: Keys per snapshot chunk: a millisecond or so of encoding.
CHUNK_KEYS = 4096


class _Table:
    """Keys to values and versions, in ``SHARDS`` pairs of dicts. A single dict doubles
    its table in one step when it fills: 185 ms at 1.4 million keys on the 2-core test
    machine, and ``apply`` runs on the node's event loop, so that one step outlasts a
    150 ms election timeout and costs the leader its term. Sharded, a step rehashes one
    shard. Shard ``i`` takes a share of the keys proportional to 2**(i/SHARDS): the
    shard sizes are spread evenly over one doubling, so while the store doubles, each
    shard grows once and at its own moment (with equal shares they would all grow
    within a few ``apply`` calls of each other). The largest share is 1.4/SHARDS."""

    def __init__(self) -> None:
        #: (values, versions) by shard number.
        self.shards: dict[int, tuple[dict[str, bytes], dict[str, int]]] = {}

    def find(self, key: str) -> tuple[dict[str, bytes], dict[str, int]] | None:
        """The (values, versions) shard of ``key``; None if it has none yet."""
        return self.shards.get(_SHARD_OF[hash(key) & _HASH_MASK])

    def put(self, key: str, value: bytes, version: int) -> None:
        n = _SHARD_OF[hash(key) & _HASH_MASK]  # ``find``, inline: once per put
        values, versions = self.shards.get(n) or self.shards.setdefault(n, ({}, {}))
        values[key] = value
        versions[key] = version

    def delete(self, key: str) -> None:
        shard = self.find(key)
        if shard is not None and key in shard[0]:
            del shard[0][key]
            del shard[1][key]

    def items(self) -> Iterator[tuple[str, bytes, int]]:
        """Every (key, value, version). The two dicts of a shard hold their keys in the
        same order (``put`` and ``delete`` change both alike), so zipping them pairs
        each value with its version, in C loops."""
        return chain.from_iterable(zip(values.keys(), values.values(), versions.values())
                                   for values, versions in self.shards.values())


def _shard_table(bits: int) -> bytes:
    """The shard of each value of a hash's low ``bits`` bits: shard ``i`` gets a share
    proportional to 2**(i/SHARDS)."""
    weights = [2 ** (i / SHARDS) for i in range(SHARDS)]
    total = sum(weights)
    bounds = list(accumulate(w / total for w in weights))
    slots = 1 << bits
    return bytes(min(bisect_right(bounds, (h + 0.5) / slots), SHARDS - 1)
                 for h in range(slots))


_HASH_BITS = 16
_HASH_MASK = (1 << _HASH_BITS) - 1
_SHARD_OF = _shard_table(_HASH_BITS)


class _View(Mapping[str, Any]):
    """One side of a ``_Table`` as a read-only mapping: its values (``side`` 0) or its
    versions (1)."""

    def __init__(self, table: _Table, side: int) -> None:
        self._table = table
        self._side = side

    def __getitem__(self, key: str) -> Any:
        shard = self._table.find(key)
        if shard is None:
            raise KeyError(key)
        return shard[self._side][key]

    def __iter__(self) -> Iterator[str]:
        return chain.from_iterable(shard[0] for shard in self._table.shards.values())

    def __len__(self) -> int:
        return sum(len(shard[0]) for shard in self._table.shards.values())


class _SnapshotStream(io.RawIOBase):
    """``u32 length | msgpack [[key, value, version], ...]`` chunks, made on demand."""

    def __init__(self, table: _Table) -> None:
        self._items = table.items()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            chunk = list(islice(self._items, CHUNK_KEYS))
            if not chunk:
                return 0
            body = _enc.encode(chunk)
            self._pending = memoryview(_LEN.pack(len(body)) + body)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
