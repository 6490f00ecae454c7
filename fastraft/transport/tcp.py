"""``TcpNetwork``: Raft messages over TCP, built on asyncio Protocols (fast on uvloop).

Each node dials every peer and sends on that connection only; it receives on the
connections its peers dialed. A connection starts with a handshake frame naming the
cluster and the dialing node; a peer from another cluster is refused and logged. Then
each frame (``u32 length | body``) carries a batch of messages (``fastraft.wire``).
Everything queued for a peer during one loop iteration leaves in one frame and one write.

A malformed, truncated or oversized frame closes that connection (and is logged); the node
keeps serving. A slow or unreachable peer costs only its own bounded queue: past the bound
the oldest messages are dropped, which Raft tolerates. Reconnects back off exponentially
with jitter.
"""
from __future__ import annotations

import asyncio
import logging
import random
import struct
from typing import Any

import msgspec

from fastraft.addresses import parse_address
from fastraft.errors import DecodeError
from fastraft.wire import BlobCache, decode_messages, encode_messages, split_frames

log = logging.getLogger("fastraft.transport.tcp")

_LEN = struct.Struct("<I")
PROTOCOL_VERSION = 1


class Hello(msgspec.Struct, array_like=True):
    cluster_id: str
    node_id: int
    version: int = PROTOCOL_VERSION
    #: Where the dialer listens: lets a node that is not yet told the membership (a new
    #: learner) answer the leader that contacted it.
    address: str = ""


_hello_decoder = msgspec.msgpack.Decoder(Hello)
_hello_encoder = msgspec.msgpack.Encoder()


class TcpNetwork:
    """See the module docstring. ``listen`` is this node's ``HOST:PORT``."""

    def __init__(self, node_id: int, listen: str, *, cluster_id: str = "fastraft",
                 max_frame_bytes: int = 64 << 20, max_queue_messages: int = 65536,
                 max_buffer_bytes: int = 32 << 20, backoff_min: float = 0.02,
                 backoff_max: float = 1.0, rng: random.Random | None = None) -> None:
        self.id = node_id
        self.listen = listen
        self.host, self.port = parse_address(listen)
        self.cluster_id = cluster_id
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_messages = max_queue_messages
        self.max_buffer_bytes = max_buffer_bytes
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.rng = rng or random.Random()
        self.node: Any = None
        self.addresses: dict[int, str] = {}
        #: Addresses announced by peers that dialed us, used for nodes not in ``addresses``.
        self.learned: dict[int, str] = {}
        self._peers: dict[int, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[_Inbound] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Followers at the same point get the same entries: encode them once.
        self.blobs = BlobCache()
        self.stats = {"frames_in": 0, "frames_out": 0, "dropped": 0, "refused": 0,
                      "bad_frames": 0}

    async def start(self, node: Any) -> None:
        self.node = node
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Inbound(self), self.host,
                                                      self.port)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
            self.listen = f"{self.host}:{self.port}"

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

    def send(self, target: int, messages: list) -> None:
        peer = self._peers.get(target)
        if peer is None:
            address = self.addresses.get(target) or self.learned.get(target)
            if address is None or self._loop is None:
                self.stats["dropped"] += len(messages)
                return
            peer = self._peers[target] = _Peer(self, target, address)
        peer.enqueue(messages)


class _Peer:
    """The outbound side towards one peer: a queue, a connection, a reconnect loop."""

    def __init__(self, net: TcpNetwork, peer_id: int, address: str) -> None:
        self.net = net
        self.id = peer_id
        self.address = address
        self.pending: list = []
        self.transport: asyncio.Transport | None = None
        self.flush_scheduled = False
        self.closed = False
        self.paused = False
        self.connect_task = net._loop.create_task(self._connect_loop())

    def enqueue(self, messages: list) -> None:
        self.pending.extend(messages)
        limit = self.net.max_queue_messages
        if len(self.pending) > limit:
            drop = len(self.pending) - limit
            del self.pending[:drop]  # the oldest are the least useful to Raft
            self.net.stats["dropped"] += drop
        if self.transport is not None and not self.flush_scheduled:
            self.flush_scheduled = True
            self.net._loop.call_soon(self.flush)

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
        self.net.stats["frames_out"] += 1

    async def _connect_loop(self) -> None:
        net = self.net
        delay = net.backoff_min
        loop = net._loop
        while not self.closed:
            host, port = parse_address(self.address)
            lost = loop.create_future()
            try:
                transport, _ = await loop.create_connection(
                    lambda: _Outbound(self, lost), host, port)
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("node %d: cannot reach node %d at %s: %s", net.id, self.id,
                          self.address, exc)
            else:
                hello = _hello_encoder.encode(Hello(net.cluster_id, net.id,
                                                    address=net.listen))
                transport.writelines((_LEN.pack(len(hello)), hello))
                self.transport = transport
                delay = net.backoff_min
                self.flush()
                await lost
                self.transport = None
                if self.closed:
                    return
            await asyncio.sleep(delay * (0.5 + self.net.rng.random()))
            delay = min(delay * 2, net.backoff_max)

    def reconnect(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self.closed = True
        self.connect_task.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _Outbound(asyncio.Protocol):
    """Dialed connection: we only write. Anything the peer sends back is ignored."""

    def __init__(self, peer: _Peer, lost: asyncio.Future) -> None:
        self.peer = peer
        self.lost = lost

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        pass


class _Inbound(asyncio.Protocol):
    """Accepted connection: parse frames, check the handshake, hand messages to the node."""

    def __init__(self, net: TcpNetwork) -> None:
        self.net = net
        self.buffer = b""
        self.peer_id: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.net._inbound.add(self)

    def connection_lost(self, exc) -> None:
        self.net._inbound.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _reject(self, why: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning("node %d: closing connection from %s (node %s): %s", self.net.id, peer,
                    self.peer_id, why)
        self.net.stats["bad_frames"] += 1
        self.buffer = b""
        self.close()

    def data_received(self, data: bytes) -> None:
        frames, self.buffer, error = split_frames(self.buffer, data, self.net.max_frame_bytes)
        for frame in frames:
            if not self._frame(frame):
                return
        if error is not None:
            self._reject(error)

    def _frame(self, frame: memoryview) -> bool:
        net = self.net
        if self.peer_id is None:
            try:
                hello = _hello_decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._reject(f"bad handshake: {exc}")
                return False
            if hello.cluster_id != net.cluster_id:
                net.stats["refused"] += 1
                self._reject(f"peer belongs to cluster {hello.cluster_id!r}, "
                             f"not {net.cluster_id!r}")
                return False
            if hello.version != PROTOCOL_VERSION:
                self._reject(f"peer speaks protocol {hello.version}, not {PROTOCOL_VERSION}")
                return False
            self.peer_id = hello.node_id
            if hello.address and hello.node_id != net.id:
                net.learned[hello.node_id] = hello.address
            return True
        try:
            messages = decode_messages(frame)
        except DecodeError as exc:
            self._reject(str(exc))
            return False
        net.stats["frames_in"] += 1
        node = net.node
        if node is not None and messages and net.receive_filter(self.peer_id):
            try:
                node.receive(self.peer_id, messages)
            except Exception as exc:  # a message the engine refuses must not kill the node
                log.exception("node %d: message from node %s rejected", net.id, self.peer_id)
                self._reject(f"message rejected: {exc!r}")
                return False
        return True
