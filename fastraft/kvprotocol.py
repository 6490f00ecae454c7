"""The client port's wire format, shared by ``fastraft.kvservice`` (the node's side) and
``fastraft.kvclient`` (the client's): frames of ``u32 length | msgpack body``, each body a
list of ``Request`` (client to node) or ``Response`` (node to client), after the handshake
of ``fastraft.transport.link``. docs/client-protocol.md describes it in full."""
from __future__ import annotations

import asyncio
import zlib
from typing import Any

import msgspec

from fastraft.errors import InvalidArgument
from fastraft.transport.link import Link

MAX_FRAME = 16 << 20
#: The most requests (or answers) in one frame, and about the most bytes of keys, values
#: and records (an item larger than that travels alone): the receiver decodes a frame
#: whole, in one loop turn, which holds off the node's heartbeats while it lasts.
FRAME_ITEMS = 1024
FRAME_BYTES = 1 << 20
#: An upper bound on what a request's encoding adds to its key and value: the client
#: refuses, before sending it, a request that would not fit in a frame.
REQUEST_OVERHEAD = 64
class Request(msgspec.Struct, array_like=True):
    id: int
    #: put get del status append records add_learner remove_learner update_address
    #: change_membership transfer_leadership
    op: str
    key: str = ""
    value: bytes = b""
    #: "records": the first offset wanted, and at most how many records.
    offset: int = 0
    limit: int = 0
    #: "append", "records", the membership requests, "status" on a port of
    #: several groups: the group's id (None: the port's only group; for "status", the
    #: node's). Earlier servers ignore it.
    group: int | None = None


#: The error of a server's closing notice (a response of id 0), and of the requests it
#: names as never begun.
CLOSING = "closing"
#: The error of a write whose entry a later leader replaced with another it committed: it
#: never took effect and never will, so it may be sent again (to the leader the answer
#: names, as for "not_leader").
NOT_COMMITTED = "not_committed"


class Response(msgspec.Struct, array_like=True):
    id: int
    ok: bool
    value: bytes | None = None
    version: int = 0
    error: str = ""
    leader: int | None = None
    status: dict[str, Any] | None = None
    leader_address: str | None = None
    #: "records": (offset, record) pairs, in order.
    records: list[tuple[int, bytes]] | None = None
    #: "not_leader": the leader's client port, when the server knows it.
    leader_client_address: str | None = None


_enc = msgspec.msgpack.Encoder()


def shard_of(key: str, shards: int) -> int:
    """The group of ``key`` among ``shards`` groups: ``crc32`` of its UTF-8 bytes, modulo
    ``shards`` (clients route with it; so does a sharded ``KVServer``)."""
    return zlib.crc32(key.encode()) % shards


def check_item(op: str, key: object, value: object = b"") -> None:
    """Raise ``InvalidArgument`` unless ``key`` is a str and ``value`` bytes (or a
    bytearray or memoryview): what else a request carried would make the node close the
    connection, failing every other request on it."""
    if not isinstance(key, str):
        raise InvalidArgument(f"a {op}'s key is a str, not {type(key).__name__}")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a {op}'s value is bytes, not {type(value).__name__}")


def payload_bytes(item: Request | Response) -> int:
    if isinstance(item, Request):
        return len(item.key) + len(item.value)
    size = 0 if item.value is None else len(item.value)
    records = item.records
    return size + sum(len(r[1]) for r in records) if records else size


class Batcher:
    """Coalesces the responses (or requests) of one loop iteration into as few frames as
    ``FRAME_ITEMS`` and ``FRAME_BYTES`` allow."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.pending: list[Any] = []
        self.scheduled = False

    def push(self, item: Request | Response) -> None:
        self.pending.append(item)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        transport = self.link.transport
        if not pending or transport is None or transport.is_closing():
            return
        write, encode = self.link._write, _enc.encode
        start = size = 0
        for k, item in enumerate(pending):
            size += payload_bytes(item)
            if size >= FRAME_BYTES or k + 1 - start >= FRAME_ITEMS:
                write(encode(pending[start:k + 1]))
                start, size = k + 1, 0
        if start < len(pending):
            write(encode(pending[start:]))
