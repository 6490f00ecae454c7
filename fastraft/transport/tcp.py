"""``TcpNetwork``: Raft messages over TCP, built on asyncio Protocols (fast on uvloop).

Each node dials every peer and sends on that connection only; it receives on the
connections its peers dialed. A connection starts with the handshake of
``fastraft.transport.link``: peers are authenticated by a cluster secret and/or mutual
TLS, and refused (logged, counted) before any Raft message is decoded. Then each frame
(``u32 length | body``) carries a batch of messages (``fastraft.wire``). Everything queued
for a peer during one loop iteration leaves in one frame and one write.

A malformed, truncated or oversized frame closes that connection (one log line); the node
keeps serving. A slow or unreachable peer costs only its own bounded queue: past the bound
the oldest messages are dropped, which Raft tolerates. Reconnects back off exponentially
with jitter.
"""
from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import OrderedDict
from functools import partial
from typing import Any

from fastraft.addresses import parse_address
from fastraft.errors import DecodeError
from fastraft.logutil import Throttle
from fastraft.transport.link import ConnectionLimits, Credentials, Gate, Link, TlsConfig
from fastraft.wire import BlobCache, decode_messages, encode_messages

log = logging.getLogger("fastraft.transport.tcp")

_LEN = struct.Struct("<I")
#: Addresses learned from peers that dialed us, kept for at most this many ids.
MAX_LEARNED = 1024


class TcpNetwork:
    """See the module docstring. ``listen`` is this node's ``HOST:PORT``.

    ``secret`` (at least 16 bytes) and ``tls`` authenticate peers; without either anyone
    who reaches the port takes part (a warning says so at start; docs/security.md).
    """

    def __init__(self, node_id: int, listen: str, *, cluster_id: str = "fastraft",
                 secret: bytes | None = None, tls: TlsConfig | None = None,
                 limits: ConnectionLimits | None = None,
                 max_frame_bytes: int = 64 << 20, max_queue_messages: int = 65536,
                 max_buffer_bytes: int = 32 << 20, backoff_min: float = 0.02,
                 backoff_max: float = 1.0, rng: random.Random | None = None) -> None:
        self.id = node_id
        self.listen = listen
        self.host, self.port = parse_address(listen)
        self.cluster_id = cluster_id
        self.credentials = Credentials(cluster_id, "raft", secret, tls)
        self.limits = limits or ConnectionLimits()
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_messages = max_queue_messages
        self.max_buffer_bytes = max_buffer_bytes
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.rng = rng or random.Random()
        self.node: Any = None
        self.addresses: dict[int, str] = {}
        #: Addresses announced by authenticated peers that dialed us, used for nodes not
        #: in ``addresses`` (a new learner answering the leader that contacted it).
        self.learned: OrderedDict[int, str] = OrderedDict()
        self._peers: dict[int, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[_Inbound] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Followers at the same point get the same entries: encode them once.
        self.blobs = BlobCache()
        self.stats = {"frames_in": 0, "frames_out": 0, "bytes_in": 0, "bytes_out": 0,
                      "dropped": 0, "refused": 0,
                      "bad_frames": 0, "evicted": 0, "timeouts": 0}
        self.gate = Gate(self.limits, self.stats)
        self.throttle = Throttle(logging.getLogger("fastraft.transport"))

    async def start(self, node: Any) -> None:
        self.node = node
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Inbound(self), self.host,
                                                      self.port)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
            self.listen = f"{self.host}:{self.port}"
        if not self.credentials.authenticated:
            log.warning("node %d: Raft port %s accepts unauthenticated peers (no secret, no "
                        "TLS): anyone who can reach it can take part in the cluster; see "
                        "docs/security.md", self.id, self.listen)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers.values()):
            peer.close()
        self._peers.clear()
        for conn in list(self._inbound):
            conn.close()
        self.node = None

    def set_peers(self, addresses: dict[int, str]) -> None:
        self.addresses = {i: a for i, a in addresses.items() if i != self.id}
        for i in [i for i in self._peers if i not in self.addresses and i not in self.learned]:
            self._peers.pop(i).close()
        for i, peer in self._peers.items():
            address = self.addresses.get(i) or self.learned[i]
            if peer.address != address:
                peer.address = address
                peer.reconnect()

    def receive_filter(self, frm: int) -> bool:
        """Whether to deliver messages from node ``frm``; tests override it to partition."""
        return True

    def send(self, target: int, messages: list[Any]) -> None:
        peer = self._peers.get(target)
        if peer is None:
            address = self.addresses.get(target) or self.learned.get(target)
            if address is None or self._loop is None:
                self.stats["dropped"] += len(messages)
                return
            peer = self._peers[target] = _Peer(self, target, address)
        peer.enqueue(messages)

    def _learn(self, node_id: int, address: str) -> None:
        self.learned[node_id] = address
        self.learned.move_to_end(node_id)
        if len(self.learned) > MAX_LEARNED:
            self.learned.popitem(last=False)


class _Peer:
    """The outbound side towards one peer: a queue, a connection, a reconnect loop."""

    def __init__(self, net: TcpNetwork, peer_id: int, address: str) -> None:
        self.net = net
        self.id = peer_id
        self.address = address
        self.pending: list[Any] = []
        self.transport: asyncio.Transport | None = None
        self.flush_scheduled = False
        self.closed = False
        assert net._loop is not None  # peers are made once the network started
        self.loop = net._loop
        self.connect_task = self.loop.create_task(self._connect_loop())

    def enqueue(self, messages: list[Any]) -> None:
        self.pending.extend(messages)
        limit = self.net.max_queue_messages
        if len(self.pending) > limit:
            drop = len(self.pending) - limit
            del self.pending[:drop]  # the oldest are the least useful to Raft
            self.net.stats["dropped"] += drop
        if self.transport is not None and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        if transport is None or not self.pending:
            return
        if transport.get_write_buffer_size() > self.net.max_buffer_bytes:
            self.net.stats["dropped"] += len(self.pending)
            self.pending = []  # the peer is not reading: drop rather than grow
            return
        body = encode_messages(self.pending, self.net.blobs)
        self.pending = []
        transport.writelines((_LEN.pack(len(body)), body))
        stats = self.net.stats
        stats["frames_out"] += 1
        stats["bytes_out"] += len(body) + _LEN.size

    async def _connect_loop(self) -> None:
        net = self.net
        delay = net.backoff_min
        loop = self.loop
        while not self.closed:
            host, port = parse_address(self.address)
            lost: asyncio.Future[None] = loop.create_future()
            try:
                await loop.create_connection(partial(_Outbound, self, lost), host, port)
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("node %d: cannot reach node %d at %s: %s", net.id, self.id,
                          self.address, exc)
            else:
                await lost
                self.transport = None
                if self.closed:
                    return
            await asyncio.sleep(delay * (0.5 + net.rng.random()))
            delay = min(delay * 2, net.backoff_max)

    def connected(self, link: _Outbound) -> None:
        """The handshake with the peer succeeded: send what is queued, from now on."""
        self.transport = link.transport
        self.flush()

    def reconnect(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closed = True
        self.connect_task.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _Outbound(Link):
    """Dialed connection: after the handshake we only write; a peer that sends anything
    more is not speaking this protocol and is dropped."""

    def __init__(self, peer: _Peer, lost: asyncio.Future[Any]) -> None:
        net = peer.net
        super().__init__(net.credentials, net.id, net.listen, acceptor=False,
                         max_frame=0, stats=net.stats, expected_peer=peer.id,
                         handshake_timeout=net.limits.handshake_timeout,
                         throttle=net.throttle)
        self.peer = peer
        self.lost_future = lost

    def authenticated(self, peer_id: int, address: str) -> bool:
        self.peer.connected(self)
        return True

    def frame(self, frame: memoryview) -> bool:
        return self.refuse("sent data on a connection it did not dial")

    def lost(self) -> None:
        if not self.lost_future.done():
            self.lost_future.set_result(None)


class _Inbound(Link):
    """Accepted connection: the handshake, then frames of messages for the node."""

    def __init__(self, net: TcpNetwork) -> None:
        super().__init__(net.credentials, net.id, net.listen, acceptor=True,
                         max_frame=net.max_frame_bytes, stats=net.stats, gate=net.gate,
                         handshake_timeout=net.limits.handshake_timeout,
                         throttle=net.throttle)
        self.net = net
        net._inbound.add(self)

    def authenticated(self, peer_id: int, address: str) -> bool:
        net = self.net
        if peer_id == net.id or peer_id == 0:
            return self.refuse(f"peer claims node id {peer_id}")
        if address:
            net._learn(peer_id, address)
        return True

    def lost(self) -> None:
        self.net._inbound.discard(self)

    def frame(self, frame: memoryview) -> bool:
        net = self.net
        try:
            messages = decode_messages(frame)
        except DecodeError as exc:
            net.stats["bad_frames"] += 1
            return self.refuse(str(exc))
        stats = net.stats
        stats["frames_in"] += 1
        stats["bytes_in"] += len(frame) + _LEN.size
        node = net.node
        peer_id = self.peer_id  # set: frames follow the handshake
        if node is not None and messages and peer_id is not None \
                and net.receive_filter(peer_id):
            node.receive(peer_id, messages)
        return True
