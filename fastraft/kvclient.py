"""A client of one node's client port (``KVClient``), as ``fastraft kv``, ``fastraft
demo`` and programs use it; ``fastraft.kvcluster.KVCluster`` routes over one per node.
Requests are pipelined on one connection, each answered by id."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from fastraft.addresses import parse_address
from fastraft.asyncutil import wait_within
from fastraft.errors import InvalidArgument
from fastraft.kvprotocol import (
    CLOSING,
    MAX_FRAME,
    REQUEST_OVERHEAD,
    Batcher,
    Request,
    Response,
    check_item,
)
from fastraft.transport.link import Credentials, Link, TlsConfig, dial

_resp_dec = msgspec.msgpack.Decoder(list[Response])
_enc = msgspec.msgpack.Encoder()


class ClientError(Exception):
    """The node answered a request with an error: ``error`` is ``"not_leader"`` (then
    ``leader`` is the leader's id, or None, ``leader_address`` its Raft address and
    ``leader_client_address`` its client port when the node knows it),
    ``"not_committed"`` (a write a later leader committed another entry in place of: it
    never took effect; the leader is named as for ``"not_leader"``), ``"refused: ..."``
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
        self.out = Batcher(self)
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
                status = await wait_within(c.status(group), 1.0)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                continue
            if status["role"] == "leader":
                leaders.append((status["term"], i))
        if leaders:
            return max(leaders)[1]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no leader among nodes {sorted(clients)} after {timeout}s")
