"""A client port for a KV node: what ``fastraft node`` serves and ``fastraft demo`` drives.

Besides the KV operations, the port serves the node's ``ReplicatedLog``: ``append`` a
record (answered with its offset, on the leader) and ``records`` from an offset (on any
node: what it knows committed), so a stream can share the log with the KV store. And it
serves membership changes (on the leader): ``add_learner`` (``offset`` the node id, ``key``
its Raft address), ``remove_learner`` (``offset`` the node id), ``update_address``
(``offset`` the node id, ``key`` its new Raft address), ``change_membership``
(``value`` the msgpack list of voter ids) and ``transfer_leadership`` (``offset`` the
voter to lead).

The connection starts with the handshake of ``fastraft.transport.link`` (the same secret
and TLS options as the Raft port; clients dial as node 0). Then frames are ``u32 length |
msgpack body``, each body a list of requests (or responses); a client pipelines many
requests on one connection, each with an id echoed in its response. ``get`` is
linearizable: it waits for ``read_index`` (on a follower, the leader confirms) before
reading the local state.

Back-pressure, so that load never starves the node's heartbeats and votes: a connection
has at most ``max_in_progress`` requests being served, the whole port at most
``max_in_progress_total``; past either the server stops reading (TCP pushes back on the
client) until half are answered. It stops reading too while a client leaves its answers
unread (the connection's buffer above its high-water mark), and closes the connection
that takes the port's unread answers past ``max_unread_bytes``. A frame is split into
requests lazily (each is decoded when started), and both sides write a loop turn's
requests or answers in frames of at most ``FRAME_ITEMS`` items and about ``FRAME_BYTES``
bytes, so a pipelined burst neither outgrows ``MAX_FRAME`` nor costs the node a long loop
turn decoding it. A proposal the node cannot take in time is answered ``Overloaded``,
never dropped. A reply ``not_leader`` names the leader's id and Raft address when known,
and its client address when the server was told the members' client addresses
(``client_addresses``; ``fastraft node --clients``). ``shutdown`` closes the port for a
planned stop with a closing notice (the requests it never began). docs/client-protocol.md
describes the protocol in full.

A host of several groups (``KVServer.sharded``, ``fastraft node --groups N``) serves a KV
store per group on one port: a key belongs to group ``shard_of(key, N)``, and its
requests go to that group's replica here (a ``not_leader`` reply names that group's
leader). The stream and the membership requests name their group (``group``).
"""
from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from fastraft import kv
from fastraft.addresses import parse_address
from fastraft.errors import FastRaftError, InvalidArgument, NotLeader
from fastraft.logutil import Throttle
from fastraft.replicatedlog import ReplicatedLog
from fastraft.transport.link import (
    ConnectionLimits,
    Credentials,
    Gate,
    Link,
    TlsConfig,
    dial,
)

if TYPE_CHECKING:
    from fastraft.host import RaftHost
    from fastraft.node import RaftNode

log = logging.getLogger("fastraft.kvservice")
MAX_FRAME = 16 << 20
#: The most requests (or answers) in one frame, and about the most bytes of keys, values
#: and records (an item larger than that travels alone): the receiver decodes a frame
#: whole, in one loop turn, which holds off the node's heartbeats while it lasts.
FRAME_ITEMS = 1024
FRAME_BYTES = 1 << 20
#: An upper bound on what a request's encoding adds to its key and value: the client
#: refuses, before sending it, a request that would not fit in a frame.
REQUEST_OVERHEAD = 64
#: Most records, and about most payload bytes, in one "records" answer.
MAX_RECORDS = 10_000
RECORDS_BYTES = 4 << 20


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


#: Turns a request and what its future returned into the response.
_Answer = Callable[[Request, Any], Response]
_raw_list_dec = msgspec.msgpack.Decoder(list[msgspec.Raw])
_req_dec = msgspec.msgpack.Decoder(Request)
_voters_dec = msgspec.msgpack.Decoder(list[int])
_resp_dec = msgspec.msgpack.Decoder(list[Response])
_enc = msgspec.msgpack.Encoder()
#: Membership and leadership requests: the change each asks of its group's replica
#: (answered once done). ``change_membership`` decodes its voters when called, so a bad
#: list is refused before anything starts.
_CHANGES: dict[str, Callable[[RaftNode, Request], Coroutine[Any, Any, None]]] = {
    "add_learner": lambda node, req: node.add_learner(req.offset, req.key),
    "remove_learner": lambda node, req: node.remove_learner(req.offset),
    "update_address": lambda node, req: node.update_address(req.offset, req.key),
    "change_membership": lambda node, req: node.change_membership(
        set(_voters_dec.decode(req.value))),
    "transfer_leadership": lambda node, req: node.transfer_leadership(req.offset),
}
#: Requests of one group: a port of several serves them for the group they name.
_GROUP_OPS = frozenset({"append", "records", "status", *_CHANGES})


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


def _payload_bytes(item: Request | Response) -> int:
    if isinstance(item, Request):
        return len(item.key) + len(item.value)
    size = 0 if item.value is None else len(item.value)
    records = item.records
    return size + sum(len(r[1]) for r in records) if records else size


class _Batcher:
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
            size += _payload_bytes(item)
            if size >= FRAME_BYTES or k + 1 - start >= FRAME_ITEMS:
                write(encode(pending[start:k + 1]))
                start, size = k + 1, 0
        if start < len(pending):
            write(encode(pending[start:]))


class KVServer:
    """The client port of one node serving a ``kv.KVStore`` (or of a host serving one per
    group: ``sharded``)."""

    def __init__(self, node: RaftNode, store: kv.KVStore, listen: str, *,
                 cluster_id: str = "fastraft",
                 secret: bytes | None = None, tls: TlsConfig | None = None,
                 limits: ConnectionLimits | None = None, max_in_progress: int = 1024,
                 max_in_progress_total: int = 1024, max_unread_bytes: int = 256 << 20,
                 client_addresses: dict[int, str] | None = None) -> None:
        self.node = node
        #: Node id -> client address, for redirecting clients to the leader.
        self.client_addresses = client_addresses or {}
        self.store = store
        #: (replica, store) of each group served, by group id (``sharded``), and their host.
        self.shards: list[tuple[RaftNode, kv.KVStore]] = [(node, store)]
        self.host: RaftHost | None = None
        self.listen = listen
        self.credentials = Credentials(cluster_id, "kv", secret, tls)
        self.limits = limits or ConnectionLimits()
        self.max_in_progress = max_in_progress
        self.max_in_progress_total = max_in_progress_total
        #: Bytes of answers the port's clients may leave unread (see ``_write``), and the
        #: connections whose answers wait (their transports above the high-water mark).
        self.max_unread_bytes = max_unread_bytes
        self.unread: set[_ClientConnection] = set()
        #: Requests being served on all connections (what answers each), and the
        #: connections waiting for the port's limit to allow more.
        self.requests: set[asyncio.Future[Any]] = set()
        self.waiting: set[_ClientConnection] = set()
        self.stats: dict[str, Any] = {"refused": 0, "bad_frames": 0, "evicted": 0, "timeouts": 0}
        #: Each group's stream, made when first asked for, by group id.
        self._streams: dict[int, ReplicatedLog] = {}
        self.gate = Gate(self.limits, self.stats)
        self.throttle = Throttle(log)
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_ClientConnection] = set()

    @classmethod
    def sharded(cls, host: RaftHost, stores: list[kv.KVStore], listen: str,
                **options: Any) -> KVServer:
        """The client port of ``host``, whose groups ``0 .. len(stores) - 1`` apply to
        ``stores``: a key's requests go to group ``shard_of(key, len(stores))``. The
        ``options`` are those of a single node's port."""
        server = cls(host.group(0), stores[0], listen, **options)
        server.host = host
        server.shards = [(host.group(g), store) for g, store in enumerate(stores)]
        return server

    def group_node(self, group: int | None) -> RaftNode:
        """The replica of group ``group`` (None: the port's only group);
        ``InvalidArgument`` if this port serves no such group, or several and none is
        named."""
        return self.shards[self._group_index(group)][0]

    def stream(self, group: int | None) -> ReplicatedLog:
        """The ``ReplicatedLog`` of group ``group`` (as ``group_node``)."""
        g = self._group_index(group)
        log = self._streams.get(g)
        if log is None:
            log = self._streams[g] = ReplicatedLog(self.shards[g][0])
        return log

    def _group_index(self, group: int | None) -> int:
        n = len(self.shards)
        if group is None:
            if n > 1:
                raise InvalidArgument(f"this port serves {n} groups: name one "
                                      f"(group=0 to {n - 1})")
            return 0
        if not 0 <= group < n:
            served = f"groups 0 to {n - 1}" if n > 1 else "one group, 0"
            raise InvalidArgument(f"this port serves {served}, not group {group}")
        return group

    def route(self, key: str) -> tuple[RaftNode, kv.KVStore]:
        """The replica and store of the group ``key`` belongs to."""
        shards = self.shards
        return shards[shard_of(key, len(shards))] if len(shards) > 1 else shards[0]

    def status(self, group: int | None = None) -> dict[str, Any]:
        """The node's status; a host's adds its own (``host``), each group's leader
        (``leaders``) and keys (``kv_keys_by_group``); the first group's stands for the
        node's role and indexes. With ``group``: that group's replica's status alone
        (its role, term, membership...), with ``group`` in it."""
        if group is not None:
            return {**self.group_node(group).status(), "group": group}
        status = self.node.status()
        status["kv_keys"] = sum(len(store.data) for _, store in self.shards)
        if self.host is not None:
            status["host"] = self.host.status()
            status["leaders"] = [node.engine.leader_id for node, _ in self.shards]
            status["kv_keys_by_group"] = [len(store.data) for _, store in self.shards]
        return status

    async def start(self) -> None:
        host, port = parse_address(self.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientConnection(self), host, port)

    def close(self) -> None:
        """Stop taking connections (those open are served until the node stops)."""
        if self._server is not None:
            self._server.close()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Close the port for a planned stop, losing no request's fate: stop listening and
        reading, answer the requests already started (at most ``timeout`` seconds: the
        node must still run), then tell each client which of its requests never began
        (a closing notice: ``KVClient`` fails those with ``ClientError("closing")``, which
        may be sent to another node) and close its connection."""
        self.close()
        connections = list(self.connections)
        for conn in connections:
            conn.close_when_answered()
        await self.drain(timeout)
        for conn in connections:
            conn.say_closing()

    async def drain(self, timeout: float = 5.0) -> None:
        """Once the node stopped: until every request in progress is answered (each ends
        with the node), at most ``timeout`` seconds, so that none is left running when the
        event loop closes (``asyncio.run`` would log its failure as unhandled)."""
        if self.requests:
            await asyncio.wait(set(self.requests), timeout=timeout)


class _ClientConnection(Link):
    def __init__(self, server: KVServer) -> None:
        super().__init__(server.credentials, server.node.id, server.listen, acceptor=True,
                         max_frame=MAX_FRAME, stats=server.stats, gate=server.gate,
                         handshake_timeout=server.limits.handshake_timeout,
                         throttle=server.throttle)
        self.server = server
        self.node = server.node
        self.out = _Batcher(self)
        #: Requests read but not started (the rest of a frame when the limit was hit),
        #: still encoded: each is decoded when started.
        self.backlog: deque[msgspec.Raw] = deque()
        self.in_progress = 0
        self.paused = False
        #: The client does not read its answers as fast as they come (the transport's
        #: buffer is above its high-water mark): start none of its requests meanwhile.
        self.unread = False
        #: The port is shutting down: no request is started any more.
        self.closing = False
        #: The id of the last request started (answered, or being served): a client that
        #: numbers its requests in order learns from the closing notice which never began.
        self.last_started = 0
        server.connections.add(self)

    def frame(self, frame: memoryview) -> bool:
        try:
            requests = _raw_list_dec.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return self._malformed(exc)
        self.backlog.extend(requests)
        self._pump()
        return True

    def _malformed(self, exc: Exception) -> bool:
        self.stats["bad_frames"] += 1
        return self.refuse(f"malformed request: {exc}")

    def _pump(self) -> None:
        """Start backlog requests while the connection and the port are under their
        limits; stop reading while any wait, read again once half of the limits are
        free."""
        server = self.server
        limit, total = server.max_in_progress, server.max_in_progress_total
        backlog = self.backlog
        while backlog and not self.unread and not self.closing \
                and self.in_progress < limit and len(server.requests) < total:
            try:
                req = _req_dec.decode(backlog.popleft())
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                self._malformed(exc)
                return
            self._start(req)
        if backlog or self.in_progress >= limit or self.unread or self.closing:
            if backlog and len(server.requests) >= total:
                server.waiting.add(self)
            if not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
        elif self.paused and self.in_progress <= limit // 2 and not self.closed \
                and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.unread = True
        self.server.unread.add(self)
        self._pump()

    def resume_writing(self) -> None:
        self.unread = False
        self.server.unread.discard(self)
        if not self.closed:
            self._pump()

    def _write(self, body: bytes) -> None:
        # Reading stops once answers wait unread, but those of the requests in progress
        # still come: the connection that takes the port's unread answers past its bound
        # is closed, rather than let the node's memory grow with what clients ask and do
        # not read. Aborted: a close would keep the buffer for as long as the client keeps
        # its window shut.
        if self.closed:  # refused: the rest of the turn's answers go with the connection
            return
        super()._write(body)
        if self.unread:
            server = self.server
            unread = sum(c.transport.get_write_buffer_size() for c in server.unread
                         if c.transport is not None)
            if unread > server.max_unread_bytes:
                self.refuse(f"answers left unread: {unread} bytes on the port, more than "
                            f"{server.max_unread_bytes}")
                server.unread.discard(self)
                if self.transport is not None:
                    self.transport.abort()

    def _start(self, req: Request) -> None:
        op = req.op
        self.last_started = req.id
        if op == "put" or op == "del" or op == "get":
            node = self.server.route(req.key)[0]
            if not node.running:
                self._stopped(req, node)
            elif op == "get":
                self._track(req, asyncio.ensure_future(node.read_index()), self._read)
            else:
                data = kv.put(req.key, req.value) if op == "put" else kv.delete(req.key)
                self._track(req, asyncio.ensure_future(node.propose(data)), self._written)
        elif op in _GROUP_OPS:
            try:
                self._start_group_op(req)
            except InvalidArgument as exc:  # a group this port does not serve
                self.out.push(Response(req.id, False, error=f"InvalidArgument: {exc}"))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.out.push(Response(req.id, False, error=f"voters: {exc}"))
        else:
            self.out.push(Response(req.id, False, error=f"unknown op {op!r}"))

    def _stopped(self, req: Request, node: RaftNode) -> None:
        """A request that reaches a node that has stopped (its process on its way out) is
        answered not_leader, as on any node that takes no proposals: it never began, so a
        client may ask again elsewhere. The leader the node knew, if another, is named."""
        leader = node.engine.leader_id
        if leader == node.id:
            leader = None
        self.out.push(Response(
            req.id, False, error="not_leader", leader=leader,
            leader_address=None if leader is None
            else node.engine.membership.addresses.get(leader),
            leader_client_address=None if leader is None
            else self.server.client_addresses.get(leader)))

    def _start_group_op(self, req: Request) -> None:
        """A request of one group (``Request.group``): its stream, membership, status."""
        op, server = req.op, self.server
        if op == "append":
            self._track(req, asyncio.ensure_future(server.stream(req.group).append(
                [req.value])), self._appended)
        elif op == "records":
            limit = min(max(req.limit, 1), MAX_RECORDS)
            self._track(req, asyncio.ensure_future(server.stream(req.group).read(
                max(req.offset, 1), limit, RECORDS_BYTES)), self._records)
        elif op in _CHANGES:
            change = _CHANGES[op](server.group_node(req.group), req)
            self._track(req, asyncio.ensure_future(change), self._changed)
        else:
            self.out.push(Response(req.id, True, status=server.status(req.group)))

    def _track(self, req: Request, fut: asyncio.Future[Any], answer: _Answer) -> None:
        self.in_progress += 1
        self.server.requests.add(fut)
        fut.add_done_callback(lambda f: self._done(req, f, answer))

    def _done(self, req: Request, fut: asyncio.Future[Any], answer: _Answer) -> None:
        self.in_progress -= 1
        server = self.server
        server.requests.discard(fut)
        if server.waiting and len(server.requests) <= server.max_in_progress_total // 2:
            waiting, server.waiting = server.waiting, set()
            for conn in waiting:
                if conn is not self and not conn.closed:
                    conn._pump()
        exc = fut.exception()
        if exc is None:
            resp = answer(req, fut.result())
        elif isinstance(exc, NotLeader):
            resp = Response(req.id, False, error="not_leader", leader=exc.leader_id,
                            leader_address=exc.leader_address,
                            leader_client_address=None if exc.leader_id is None
                            else self.server.client_addresses.get(exc.leader_id))
        elif isinstance(exc, (FastRaftError, ValueError, TimeoutError)):
            # ValueError: a membership change that names a non-member, or a member twice
            resp = Response(req.id, False, error=f"{type(exc).__name__}: {exc}")
        else:
            resp = Response(req.id, False, error=f"internal error: {type(exc).__name__}")
            log.error("client request %s failed: %r", req.op, exc)
        self.out.push(resp)
        if not self.closed:
            self._pump()

    @staticmethod
    def _written(req: Request, result: Any) -> Response:
        if isinstance(result, kv.Refused):
            return Response(req.id, False, error=f"refused: {result.reason}")
        return Response(req.id, True, version=result or 0)

    @staticmethod
    def _changed(req: Request, _result: Any) -> Response:
        return Response(req.id, True)

    @staticmethod
    def _appended(req: Request, offsets: list[int]) -> Response:
        return Response(req.id, True, version=offsets[0])

    @staticmethod
    def _records(req: Request, records: list[Any]) -> Response:
        return Response(req.id, True, records=[(r.index, r.data) for r in records])

    def _read(self, req: Request, _index: int) -> Response:
        store = self.server.route(req.key)[1]
        return Response(req.id, True, store.get(req.key), store.versions.get(req.key, 0))

    def lost(self) -> None:
        self.backlog.clear()
        self.server.waiting.discard(self)
        self.server.unread.discard(self)
        self.server.connections.discard(self)

    def close_when_answered(self) -> None:
        """Shutting down: start no more requests and read no more."""
        self.closing = True
        self._pump()

    def say_closing(self) -> None:
        """Answer what is queued, then the closing notice, then close: the requests
        numbered above ``last_started`` were never begun."""
        if self.closed or not self.is_authenticated:
            self.close()
            return
        self.out.push(Response(0, False, version=self.last_started, error=CLOSING))
        self.out.flush()
        self.close()


class ClientError(Exception):
    """The node answered a request with an error: ``error`` is ``"not_leader"`` (then
    ``leader`` is the leader's id, or None, ``leader_address`` its Raft address and
    ``leader_client_address`` its client port when the node knows it), ``"refused: ..."``
    (the state machine refused the command), ``"closing"`` (the node shut down before it
    began the request: another node may be asked), or ``"<ErrorType>: message"``."""

    def __init__(self, error: str, leader: int | None = None,
                 leader_address: str | None = None,
                 leader_client_address: str | None = None, detail: str = ""):
        if detail:
            where = f": {detail}"
        elif leader is None:
            where = ""
        elif leader_client_address:
            where = f" (leader {leader} at {leader_client_address})"
        else:  # its Raft port speaks no client protocol: say which address it is
            where = f" (leader {leader}, Raft address {leader_address}; its client address " \
                "is not known to this node: list it in the node's --clients)"
        super().__init__(error + where)
        self.error = error
        self.leader = leader
        self.leader_address = leader_address
        self.leader_client_address = leader_client_address


class KVClient(Link):
    """Pipelined client of one node's client port."""

    @classmethod
    async def connect(cls, address: str, timeout: float = 5.0, *,
                      cluster_id: str = "fastraft", secret: bytes | None = None,
                      tls: TlsConfig | None = None) -> KVClient:
        """Connect and complete the handshake; ``ConnectionError`` if the node refuses."""
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        creds = Credentials(cluster_id, "kv", secret, tls)
        try:
            _, client = await dial(loop, lambda: cls(address, creds, ready, timeout),
                                   host, port, timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"{address}: no connection within {timeout}s") from None
        # The link's own handshake timer (``timeout``, armed on connecting) settles
        # ``ready`` if the server stays silent, as a refusal or a lost connection does.
        try:
            await ready
        except asyncio.CancelledError:
            client.close()  # the caller gave up: the connection is nobody's
            raise
        return client

    @classmethod
    async def connect_retrying(cls, address: str, timeout: float = 30.0,
                               **kwargs: Any) -> KVClient:
        """Connect, retrying while the node starts up, for at most ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await cls.connect(address, timeout=1.0, **kwargs)
            except (OSError, asyncio.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def __init__(self, address: str, credentials: Credentials, ready: asyncio.Future[Any],
                 timeout: float) -> None:
        super().__init__(credentials, 0, "", acceptor=False, max_frame=MAX_FRAME,
                         stats={}, handshake_timeout=timeout)
        self.server_address = address
        self.ready = ready
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.out = _Batcher(self)
        #: Why this client closed the connection, if it did.
        self.refused = ""
        #: Frames of answers received: a watcher that sees requests waiting and this
        #: count standing still knows the server has been silent since (``KVCluster``).
        self.frames_received = 0

    def authenticated(self, peer_id: int, address: str) -> bool:
        if not self.ready.done():
            self.ready.set_result(None)
        return True

    def refuse(self, why: str, count: bool = True) -> bool:
        """The server's bytes are not the protocol: the caller is told why (a client has
        no log of its own to say it in)."""
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(
                f"{self.server_address} does not answer as a fastraft client port: {why}"))
        self.refused = why
        self.close()
        return False

    def lost(self) -> None:
        err = ConnectionError(f"connection to {self.server_address} lost"
                              + (f": {self.refused}" if self.refused else ""))
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(
                f"{self.server_address} refused the connection (see its log)"))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiting.clear()

    def frame(self, frame: memoryview) -> bool:
        try:
            responses = _resp_dec.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            return self.refuse(f"malformed response: {exc}")
        self.frames_received += 1
        for resp in responses:
            fut = self.waiting.pop(resp.id, None)
            if fut is not None and not fut.done():
                fut.set_result(resp)
            elif resp.id == 0 and resp.error == CLOSING:
                self._closing(resp.version)
        return True

    def _closing(self, last_started: int) -> None:
        """The server shuts down: the requests after ``last_started`` never began, and
        the answers of the others came before this notice: the connection is done."""
        self.close()
        why = f"{self.server_address} shut down before it began the request: ask another node"
        for request_id in [i for i in self.waiting if i > last_started]:
            fut = self.waiting.pop(request_id)
            if not fut.done():
                fut.set_exception(ClientError(CLOSING, detail=why))

    async def request(self, op: str, key: str = "", value: bytes = b"", *, offset: int = 0,
                      limit: int = 0, group: int | None = None) -> Response:
        if self.closed:
            raise ConnectionError(f"connection to {self.server_address} is closed")
        check_item(op, key, value)
        size = len(key.encode()) + len(value) + REQUEST_OVERHEAD
        if size > MAX_FRAME:
            raise InvalidArgument(f"a {op} of {len(value)} bytes does not fit in a frame "
                                  f"of the client port ({MAX_FRAME} bytes at most)")
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = fut
        self.out.push(Request(self.next_id, op, key, value, offset, limit, group))
        resp: Response = await fut
        if not resp.ok:
            raise ClientError(resp.error, resp.leader, resp.leader_address,
                              resp.leader_client_address)
        return resp

    async def put(self, key: str, value: bytes) -> int:
        return (await self.request("put", key, value)).version

    async def delete(self, key: str) -> int:
        return (await self.request("del", key)).version

    async def get(self, key: str) -> bytes | None:
        return (await self.request("get", key)).value

    async def status(self, group: int | None = None) -> dict[str, Any]:
        """The node's status; with ``group``, that of its replica of the group (on a
        node of several groups, ``fastraft node --groups``)."""
        return (await self.request("status", group=group)).status or {}

    async def append(self, record: bytes, group: int | None = None) -> int:
        """Append a record to the node's ``ReplicatedLog`` (on the leader); its offset.
        ``group``: which group's, on a node of several."""
        return (await self.request("append", value=record, group=group)).version

    async def records(self, offset: int, limit: int = 1000,
                      group: int | None = None) -> list[tuple[int, bytes]]:
        """Committed records from ``offset`` on, as (offset, record) pairs: at most
        ``limit`` (and about 4 MiB); empty when none is committed yet. ``group``: which
        group's, on a node of several."""
        return (await self.request("records", offset=offset, limit=limit,
                                   group=group)).records or []

    async def add_learner(self, node_id: int, address: str, group: int | None = None) -> None:
        """Add node ``node_id`` at Raft ``address`` as a learner (on the leader); returns
        once the change is committed. See ``RaftNode.add_learner``. ``group``: which
        group, on a node of several (``fastraft node --groups``); its leader may be
        another node than a key's."""
        await self.request("add_learner", address, offset=node_id, group=group)

    async def remove_learner(self, node_id: int, group: int | None = None) -> None:
        """Remove learner ``node_id`` (on the leader); see ``RaftNode.remove_learner``.
        ``group`` as for ``add_learner``. Servers before it answer ``unknown op``."""
        await self.request("remove_learner", offset=node_id, group=group)

    async def update_address(self, node_id: int, address: str,
                             group: int | None = None) -> None:
        """Member ``node_id`` is now at Raft ``address`` (on the leader); see
        ``RaftNode.update_address``. ``group`` as for ``add_learner``."""
        await self.request("update_address", address, offset=node_id, group=group)

    async def transfer_leadership(self, target: int, group: int | None = None) -> None:
        """Make voter ``target`` the leader (on the leader); returns once it leads. See
        ``RaftNode.transfer_leadership``. ``group`` as for ``add_learner``."""
        await self.request("transfer_leadership", offset=target, group=group)

    async def change_membership(self, voters: set[int], group: int | None = None) -> None:
        """Move to the voter set ``voters`` (on the leader); see
        ``RaftNode.change_membership``. ``group`` as for ``add_learner``."""
        await self.request("change_membership", value=_enc.encode(sorted(voters)),
                           group=group)


async def find_leader(clients: dict[int, KVClient], timeout: float = 30.0,
                      exclude: frozenset[int] = frozenset(), group: int | None = None) -> int:
    """The id of the current leader (of ``group``, on nodes of several groups): of the
    nodes whose status says they lead, the one with the highest term (a deposed leader
    may not know it yet)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        leaders = []
        for i, c in list(clients.items()):
            if i in exclude or c.closed:
                continue
            try:
                status = await asyncio.wait_for(c.status(group), 1.0)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                continue
            if status["role"] == "leader":
                leaders.append((status["term"], i))
        if leaders:
            return max(leaders)[1]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no leader among nodes {sorted(clients)} after {timeout}s")
