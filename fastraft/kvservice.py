"""The client port of a KV node: what ``fastraft node`` serves, and ``fastraft demo`` and
``fastraft kv`` drive through ``fastraft.kvclient.KVClient``.

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
(``client_addresses``; ``fastraft node --clients``); so does ``not_committed``, the reply
to a write whose entry a later leader replaced. ``shutdown`` closes the port for a
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
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from fastraft import kv
from fastraft.addresses import parse_address
from fastraft.errors import (
    FastRaftError,
    InvalidArgument,
    NodeStopped,
    NotLeader,
    ProposalDropped,
)
from fastraft.kvprotocol import (
    CLOSING,
    MAX_FRAME,
    NOT_COMMITTED,
    Batcher,
    Request,
    Response,
    shard_of,
)
from fastraft.logutil import Throttle
from fastraft.replicatedlog import ReplicatedLog
from fastraft.transport.link import (
    ConnectionLimits,
    Credentials,
    Gate,
    Link,
    TlsConfig,
)

if TYPE_CHECKING:
    from fastraft.host import RaftHost
    from fastraft.node import RaftNode

log = logging.getLogger("fastraft.kvservice")
#: Most records, and about most payload bytes, in one "records" answer.
MAX_RECORDS = 10_000
RECORDS_BYTES = 4 << 20
#: Turns a request and what its future returned into the response.
_Answer = Callable[[Request, Any], Response]
_raw_list_dec = msgspec.msgpack.Decoder(list[msgspec.Raw])
_req_dec = msgspec.msgpack.Decoder(Request)
_voters_dec = msgspec.msgpack.Decoder(list[int])
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
        self.out = Batcher(self)
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
        client may ask again elsewhere."""
        self.out.push(self._redirect(req, node, "not_leader"))

    def _redirect(self, req: Request, node: RaftNode, error: str) -> Response:
        """A refusal that sends the client to the leader ``node`` knows, if another."""
        leader = node.engine.leader_id
        if leader == node.id:
            leader = None
        return Response(
            req.id, False, error=error, leader=leader,
            leader_address=None if leader is None
            else node.engine.membership.addresses.get(leader),
            leader_client_address=None if leader is None
            else self.server.client_addresses.get(leader))

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
        elif isinstance(exc, (ProposalDropped, NodeStopped)) and exc.committed is False:
            # a later leader committed another entry in its place, or the node stopped
            # before it appended it: as a not_leader, it never took effect, so the
            # client may send it to the leader named
            node = self.server.group_node(req.group) if req.op in _GROUP_OPS \
                else self.server.route(req.key)[0]
            resp = self._redirect(req, node, NOT_COMMITTED)
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
