"""A client port for a KV node: what ``fastraft node`` serves and ``fastraft demo`` drives.

Frames are ``u32 length | msgpack body``; a client pipelines many requests on one
connection, each with an id echoed in its response. ``get`` is linearizable: it waits for
``read_index`` (on a follower, the leader confirms) before reading the local state.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import msgspec

from fastraft import kv
from fastraft.addresses import parse_address
from fastraft.errors import FastRaftError, NotLeader
from fastraft.wire import split_frames

log = logging.getLogger("fastraft.kvservice")
_LEN = struct.Struct("<I")
MAX_FRAME = 16 << 20


class Request(msgspec.Struct, array_like=True):
    id: int
    op: str  # "put" | "get" | "status"
    key: str = ""
    value: bytes = b""


class Response(msgspec.Struct, array_like=True):
    id: int
    ok: bool
    value: bytes | None = None
    version: int = 0
    error: str = ""
    leader: int | None = None
    status: dict[str, Any] | None = None


_req_dec = msgspec.msgpack.Decoder(list[Request])
_resp_dec = msgspec.msgpack.Decoder(list[Response])
_enc = msgspec.msgpack.Encoder()


class _Writer:
    """Coalesces responses (or requests) of one loop iteration into one frame."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.pending: list = []
        self.scheduled = False

    def push(self, item) -> None:
        self.pending.append(item)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.pending and not self.transport.is_closing():
            body = _enc.encode(self.pending)
            self.transport.writelines((_LEN.pack(len(body)), body))
        self.pending = []


class KVServer(asyncio.Protocol):
    def __init__(self, node, store: kv.KVStore) -> None:
        self.node = node
        self.store = store
        self.buffer = b""
        self.writer: _Writer | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.writer = _Writer(transport)

    def data_received(self, data: bytes) -> None:
        frames, self.buffer, error = split_frames(self.buffer, data, MAX_FRAME)
        try:
            for frame in frames:
                for req in _req_dec.decode(frame):
                    asyncio.ensure_future(self._handle(req))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = str(exc)
        if error is not None:
            log.warning("closing client connection: %s", error)
            self.transport.close()

    async def _handle(self, req: Request) -> None:
        try:
            if req.op == "put":
                version = await self.node.propose(kv.put(req.key, req.value))
                resp = Response(req.id, True, version=version)
            elif req.op == "get":
                await self.node.read_index()
                resp = Response(req.id, True, self.store.get(req.key),
                                self.store.versions.get(req.key, 0))
            elif req.op == "status":
                status = self.node.status()
                status["kv_keys"] = len(self.store.data)
                resp = Response(req.id, True, status=status)
            else:
                resp = Response(req.id, False, error=f"unknown op {req.op!r}")
        except NotLeader as exc:
            resp = Response(req.id, False, error="not_leader", leader=exc.leader_id)
        except FastRaftError as exc:
            resp = Response(req.id, False, error=f"{type(exc).__name__}: {exc}")
        self.writer.push(resp)


class ClientError(Exception):
    def __init__(self, error: str, leader: int | None = None):
        super().__init__(error if leader is None else f"{error} (leader {leader})")
        self.error = error
        self.leader = leader


class KVClient(asyncio.Protocol):
    """Pipelined client of one node's client port."""

    @classmethod
    async def connect(cls, address: str, timeout: float = 5.0) -> KVClient:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        _, client = await asyncio.wait_for(loop.create_connection(cls, host, port), timeout)
        client.address = address
        return client

    @classmethod
    async def connect_retrying(cls, address: str, timeout: float = 30.0) -> KVClient:
        """Connect, retrying while the node starts up, for at most ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await cls.connect(address, timeout=1.0)
            except (OSError, asyncio.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def __init__(self) -> None:
        self.address = ""
        self.buffer = b""
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future] = {}
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.writer = _Writer(transport)

    def connection_lost(self, exc) -> None:
        self.closed = True
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.address} lost"))
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        frames, self.buffer, error = split_frames(self.buffer, data, MAX_FRAME)
        if error is not None:
            log.warning("closing connection to %s: %s", self.address, error)
            self.transport.close()
        for frame in frames:
            for resp in _resp_dec.decode(frame):
                fut = self.waiting.pop(resp.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)

    async def request(self, op: str, key: str = "", value: bytes = b"") -> Response:
        if self.closed:
            raise ConnectionError(f"connection to {self.address} is closed")
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = fut
        self.writer.push(Request(self.next_id, op, key, value))
        resp = await fut
        if not resp.ok:
            raise ClientError(resp.error, resp.leader)
        return resp

    async def put(self, key: str, value: bytes) -> int:
        return (await self.request("put", key, value)).version

    async def get(self, key: str) -> bytes | None:
        return (await self.request("get", key)).value

    async def status(self) -> dict:
        return (await self.request("status")).status

    def close(self) -> None:
        self.transport.close()


async def find_leader(clients: dict[int, KVClient], timeout: float = 30.0,
                      exclude: frozenset[int] = frozenset()) -> int:
    """The id of the current leader: of the nodes whose status says they lead, the one
    with the highest term (a deposed leader may not know it yet)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        leaders = []
        for i, c in list(clients.items()):
            if i in exclude or c.closed:
                continue
            try:
                status = await asyncio.wait_for(c.status(), 1.0)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                continue
            if status["role"] == "leader":
                leaders.append((status["term"], i))
        if leaders:
            return max(leaders)[1]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no leader among nodes {sorted(clients)} after {timeout}s")
