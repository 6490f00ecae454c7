"""``TcpNetwork``: Raft messages over TCP, built on asyncio Protocols (fast on uvloop).

Each node dials every peer and sends on that connection only; it receives on the
connections its peers dialed. A connection starts with the handshake of
``fastraft.transport.link``: peers are authenticated by a cluster secret and/or mutual
TLS, and refused (logged, counted) before any Raft message is decoded. Then each frame
(``u32 length | body``) carries, per Raft group, ``u64 group | u32 length | a batch of
messages`` (``fastraft.wire``). Everything queued for a peer during one loop iteration,
of every group, leaves in one frame and one write. A frame of no section says only
that its sender is alive (``keepalive``).

One ``TcpNetwork`` serves one node (``start(node)``: group 0) or, through
``group(group_id)`` views, every group of a ``fastraft.RaftHost``: one listening port
and one connection per peer process for all of them.

A malformed, truncated or oversized frame closes that connection (one log line); the node
keeps serving. What one loop turn queues for a peer leaves in as many frames as
``max_frame_bytes`` needs (a host catching up many groups at once). A slow or unreachable
peer costs only its own bounded queue: past the bound the oldest messages are dropped,
which Raft tolerates. Unconnected, the queue is bounded in bytes as well
(``max_queue_bytes``): a leader sends a follower that does not answer a probe with up to
``Config.max_bytes_per_message`` of entries every heartbeat, and a snapshot chunk every
interval mid-transfer. Reconnects back off exponentially with jitter; a peer that dials
us is dialed back at once (it is up).

A connection whose data stays unacknowledged for ``unacked_timeout`` is given up
(``TCP_USER_TIMEOUT``) and dialed again, as is a dial not answered in ``connect_timeout``:
across a partition the kernel resends ever less often (after 12 s of loss, next in 13 s),
so without a new connection a healed link would stay silent that long one way.
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from fastraft import kernels
from fastraft.addresses import parse_address
from fastraft.errors import ConfigError, DecodeError
from fastraft.logutil import Throttle
from fastraft.messages import AppendEntries, InstallSnapshot, check_node_id
from fastraft.transport.link import (
    ConnectionLimits,
    Credentials,
    Gate,
    Link,
    TlsConfig,
    dial,
)
from fastraft.wire import BlobCache, decode_messages, encode_message_parts

log = logging.getLogger("fastraft.transport.tcp")

_LEN = struct.Struct("<I")
#: A group's section of a frame: the group id and the length of its messages.
_SECTION = struct.Struct("<QI")
#: A frame's length and its only section's header, packed at once (one group's frame).
_ONE_SECTION = struct.Struct("<IQI")
#: A frame of no section: a liveness signal (``TcpNetwork.keepalive``).
_EMPTY_FRAME = _LEN.pack(0)
#: Addresses learned from peers that dialed us, kept for at most this many ids.
MAX_LEARNED = 1024
#: A peer's queue over ``max_queue_messages`` (or ``max_queue_bytes``) is cut to this
#: share of it (oldest first).
DROP_TO = 7 / 8
#: What a message costs on the wire besides its entries' or chunk's payload, at most
#: (its fields and tag), and an entry besides its payload (``_py/codec.py``'s header).
_MESSAGE_BYTES = 64
_ENTRY_BYTES = 24


def wire_size(m: Any) -> int:
    """About how many bytes ``m`` takes in a frame, erring high."""
    t = type(m)
    if t is AppendEntries:
        entries = m.entries
        return _MESSAGE_BYTES + kernels.payload_bytes(entries) + _ENTRY_BYTES * len(entries)
    if t is InstallSnapshot:
        return _MESSAGE_BYTES + len(m.data)
    return _MESSAGE_BYTES


class TcpNetwork:
    """See the module docstring. ``listen`` is this node's ``HOST:PORT``.

    ``secret`` (at least 16 bytes) and ``tls`` authenticate peers; without either anyone
    who reaches the port takes part (a warning says so at start; docs/security.md).
    """

    def __init__(self, node_id: int, listen: str, *, cluster_id: str = "fastraft",
                 secret: bytes | None = None, tls: TlsConfig | None = None,
                 limits: ConnectionLimits | None = None,
                 max_frame_bytes: int = 64 << 20, max_queue_messages: int = 65536,
                 max_queue_bytes: int = 16 << 20,
                 max_buffer_bytes: int = 32 << 20, backoff_min: float = 0.02,
                 backoff_max: float = 1.0, unacked_timeout: float = 2.0,
                 connect_timeout: float = 2.0, rng: random.Random | None = None) -> None:
        for name, value in (("unacked_timeout", unacked_timeout),
                            ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")
        for name, size in (("max_frame_bytes", max_frame_bytes),
                           ("max_queue_messages", max_queue_messages),
                           ("max_queue_bytes", max_queue_bytes),
                           ("max_buffer_bytes", max_buffer_bytes)):
            if type(size) is not int or size <= 0:
                raise ConfigError(f"{name} must be a positive int, got {size!r}")
        check_node_id(node_id)
        self.id = node_id
        self.listen = listen
        self.host, self.port = parse_address(listen)
        self.cluster_id = cluster_id
        self.credentials = Credentials(cluster_id, "raft", secret, tls)
        self.limits = limits or ConnectionLimits()
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_messages = max_queue_messages
        self.max_queue_bytes = max_queue_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.unacked_timeout = unacked_timeout
        self.connect_timeout = connect_timeout
        self.rng = rng or random.Random()
        #: The node of each group this network delivers to.
        self.receivers: dict[int, Any] = {}
        self.addresses: dict[int, str] = {}
        #: The members' addresses each group declared (``set_peers``); ``addresses`` is
        #: their union, ``_uses`` how many groups name each node.
        self._group_addresses: dict[int, dict[int, str]] = {}
        self._uses: Counter[int] = Counter()
        #: Addresses announced by authenticated peers that dialed us, used for nodes not
        #: in ``addresses`` (a new learner answering the leader that contacted it).
        self.learned: OrderedDict[int, str] = OrderedDict()
        self._peers: dict[int, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[_Inbound] = set()
        #: Connections each peer opened to this network so far (handshake done): a new
        #: one says the peer restarted, or reconnected after losing its connection.
        self.connections_from: Counter[int] = Counter()
        #: Called with ``(group_id, peer_id, messages)`` for messages of a group not
        #: here (yet): a ``RaftHost`` keeps heartbeats for the group's creation.
        self.early: Callable[[int, int, list[Any]], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Followers at the same point get the same entries: encode them once.
        self.blobs = BlobCache()
        self.stats = {"frames_in": 0, "frames_out": 0, "bytes_in": 0, "bytes_out": 0,
                      "dropped": 0, "refused": 0, "unknown_group": 0,
                      "bad_frames": 0, "evicted": 0, "timeouts": 0, "connect_timeouts": 0}
        self.gate = Gate(self.limits, self.stats)
        self.throttle = Throttle(logging.getLogger("fastraft.transport"))

    async def start(self, node: Any) -> None:
        """Listen, and deliver to ``node`` as group 0 (the ``RaftNetwork`` hook)."""
        await self.serve()
        self.receivers[0] = node

    def group(self, group_id: int) -> GroupNetwork:
        """The ``RaftNetwork`` of one group of a host (start the network with ``serve``)."""
        return GroupNetwork(self, group_id)

    async def serve(self) -> None:
        """Listen on ``listen`` (port 0: a free one, written back to ``listen``)."""
        if self._server is not None:
            return
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
            self._server = None  # a restart on this network listens again
        for peer in list(self._peers.values()):
            peer.close()
        self._peers.clear()
        for conn in list(self._inbound):
            conn.close()
        self.receivers.clear()

    def set_peers(self, addresses: dict[int, str]) -> None:
        self.set_group_peers(0, addresses)

    def set_group_peers(self, group_id: int, addresses: dict[int, str]) -> None:
        """Group ``group_id``'s members are at ``addresses`` (replacing what it said
        before). A node stays dialable while any group names it."""
        new = {i: a for i, a in addresses.items() if i != self.id}
        old = self._group_addresses.pop(group_id, {})
        if new:
            self._group_addresses[group_id] = new
        uses = self._uses
        uses.subtract(old.keys())
        uses.update(new.keys())
        self.addresses.update(new)
        for i in old.keys() - new.keys():
            if uses[i] <= 0:
                del uses[i]
                self.addresses.pop(i, None)
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
        self.send_group(0, target, messages)

    def send_group(self, group_id: int, target: int, messages: list[Any]) -> None:
        """Queue ``messages`` of group ``group_id`` for node ``target``."""
        peer = self._peers.get(target) or self._dial(target)
        if peer is None:
            self.stats["dropped"] += len(messages)
            return
        peer.enqueue(group_id, messages)

    def _dial(self, target: int) -> _Peer | None:
        address = self.addresses.get(target) or self.learned.get(target)
        if address is None or self._loop is None:
            return None
        self._peers[target] = _Peer(self, target, address)
        return self._peers[target]

    def keepalive(self) -> None:
        """Send an empty frame to every connected peer this network sent nothing to since
        the last call: with ``frames_heard`` on the other side, one liveness exchange per
        pair of processes, whatever the number of groups (``RaftHost``)."""
        for node_id in self.addresses:
            peer = self._peers.get(node_id)
            if peer is None:
                self._dial(node_id)
            elif peer.frames_sent:
                peer.frames_sent = 0
            elif peer.transport is not None and not peer.transport.is_closing():
                peer.transport.write(_EMPTY_FRAME)
                self.stats["frames_out"] += 1
                self.stats["bytes_out"] += _LEN.size

    def frames_heard(self) -> dict[int, int]:
        """Frames received so far from each peer over its current connections (they
        grow while the peer is alive and reachable; a new connection starts over)."""
        heard: dict[int, int] = {}
        for conn in self._inbound:
            if conn.peer_id is not None:
                heard[conn.peer_id] = heard.get(conn.peer_id, 0) + conn.frames
        return heard

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
        #: Messages waiting for the next flush, per group, in the order they were sent.
        self.pending: dict[int, list[Any]] = {}
        self.queued = 0
        #: Their size (``wire_size``), counted while unconnected only: connected, the
        #: queue is flushed every loop turn.
        self.queued_bytes = 0
        #: Frames written since the last ``TcpNetwork.keepalive``.
        self.frames_sent = 0
        self.transport: asyncio.Transport | None = None
        self.flush_scheduled = False
        self.closed = False
        #: The pause before the next dial: doubled after each, up to ``backoff_max``.
        self.retry_delay = net.backoff_min
        #: Loop time the connection of this dial was authenticated (None: not yet).
        self.connected_at: float | None = None
        #: Resolved to cut the pause before the next dial short (``peer_up``).
        self._wake: asyncio.Future[None] | None = None
        #: ``peer_up`` cut a pause short since the last connection that lived.
        self.woken = False
        assert net._loop is not None  # peers are made once the network started
        self.loop = net._loop
        self.connect_task = self.loop.create_task(self._connect_loop())

    def enqueue(self, group_id: int, messages: list[Any]) -> None:
        box = self.pending.get(group_id)
        if box is None:
            self.pending[group_id] = box = []
        box.extend(messages)
        self.queued += len(messages)
        net = self.net
        if self.transport is None:
            for m in messages:
                self.queued_bytes += wire_size(m)
            if self.queued_bytes > net.max_queue_bytes:
                self._drop_oldest(0, self.queued_bytes - int(net.max_queue_bytes * DROP_TO))
        if self.queued > net.max_queue_messages:
            self._drop_oldest(self.queued - int(net.max_queue_messages * DROP_TO), 0)
        if self.transport is not None and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def _drop_oldest(self, count: int, size: int) -> None:
        """Over a queue bound: drop the oldest messages, of the groups that queued first
        (the oldest are the least useful to Raft, which resends), at least ``count`` of
        them and ``size`` bytes (``wire_size``): down to ``DROP_TO`` of the bound. A pass
        costs up to the number of groups queued, so a peer that stays away (thousands of
        groups queueing for it) costs one pass per eighth of the bound, not one per
        message sent to it."""
        counting = self.transport is None
        pending = self.pending
        emptied = []
        dropped = 0
        for group_id, box in pending.items():
            if counting:
                n = 0
                while n < len(box) and (n < count or size > 0):
                    s = wire_size(box[n])
                    self.queued_bytes -= s
                    size -= s
                    n += 1
            else:
                n = min(count, len(box))
            count -= n
            dropped += n
            if n < len(box):
                del box[:n]
                break
            emptied.append(group_id)
        for group_id in emptied:
            del pending[group_id]
        self.net.stats["dropped"] += dropped
        self.queued -= dropped

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        pending = self.pending
        # A connection lost (given up, reset) is closed before ``connection_lost`` clears
        # ``transport``, and uvloop raises on a write to it: what is queued waits for the
        # next connection.
        if transport is None or not pending or transport.is_closing():
            return
        self.pending = {}
        queued, self.queued = self.queued, 0
        self.queued_bytes = 0
        net = self.net
        if transport.get_write_buffer_size() > net.max_buffer_bytes:
            net.stats["dropped"] += queued  # the peer is not reading: drop, not grow
            return
        blobs = net.blobs
        limit = net.max_frame_bytes
        if len(pending) == 1:  # the common case, a single node's: one section
            for group_id, messages in pending.items():
                parts = [b""]
                n = encode_message_parts(messages, parts, blobs, group_id)
                size = _SECTION.size + n
                if size <= limit:
                    parts[0] = _ONE_SECTION.pack(size, group_id, n)
                    transport.writelines(parts)
                    self._sent(size)
                    return
        parts = [b""]
        size = 0
        for group_id, messages in pending.items():
            for section, n in self._encoded_sections(group_id, messages, limit - _SECTION.size):
                if size and size + _SECTION.size + n > limit:
                    parts[0] = _LEN.pack(size)
                    transport.writelines(parts)
                    self._sent(size)
                    parts, size = [b""], 0
                parts.append(_SECTION.pack(group_id, n))
                parts += section
                size += _SECTION.size + n
        parts[0] = _LEN.pack(size)
        transport.writelines(parts)
        self._sent(size)

    def _encoded_sections(self, group_id: int, messages: list[Any],
                           limit: int) -> list[tuple[list[bytes], int]]:
        """A group's messages encoded in sections (parts, size) of at most ``limit`` bytes
        each (one message larger than that alone in its section: the peer refuses it)."""
        parts: list[bytes] = []
        n = encode_message_parts(messages, parts, self.net.blobs, group_id)
        if n <= limit or len(messages) == 1:
            return [(parts, n)]
        half = len(messages) // 2
        return (self._encoded_sections(group_id, messages[:half], limit)
                + self._encoded_sections(group_id, messages[half:], limit))

    def _sent(self, size: int) -> None:
        self.frames_sent += 1
        stats = self.net.stats
        stats["frames_out"] += 1
        stats["bytes_out"] += size + _LEN.size

    async def _connect_loop(self) -> None:
        net = self.net
        loop = self.loop
        while not self.closed:
            host, port = parse_address(self.address)
            lost: asyncio.Future[None] = loop.create_future()
            self.connected_at = None
            try:
                await dial(loop, partial(_Outbound, self, lost), host, port,
                           net.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    net.stats["connect_timeouts"] += 1
                log.debug("node %d: cannot reach node %d at %s: %s", net.id, self.id,
                          self.address, exc)
            else:
                await lost
                self.transport = None
                if self.closed:
                    return
                if self.connected_at is not None and \
                        loop.time() - self.connected_at >= net.backoff_max:
                    # It lived: this is a new outage, dialed again soon, not at the pace
                    # the last one reached (a peer that drops each connection at once
                    # still backs off).
                    self.retry_delay = net.backoff_min
                    self.woken = False
            await self._pause(self.retry_delay * (0.5 + net.rng.random()))
            self.retry_delay = min(self.retry_delay * 2, net.backoff_max)

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next dial, or until ``peer_up``."""
        wake = self._wake = self.loop.create_future()
        timer = self.loop.call_later(delay, _resolve, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def peer_up(self) -> None:
        """The peer just dialed us, so it is up: a dial waiting out its backoff goes now
        (a node that starts after us hears from us at once, not up to 1.5 backoff_max
        later). Once per outage: two peers that each drop the other's connections would
        otherwise wake each other's dials back and forth with no pause at all."""
        wake = self._wake
        if wake is not None and not wake.done() and not self.woken:
            self.woken = True
            wake.set_result(None)

    def connected(self, link: _Outbound) -> None:
        """The handshake with the peer succeeded: send what is queued, from now on."""
        self.transport = link.transport
        self.connected_at = self.loop.time()
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(self.peer.net.unacked_timeout * 1000))
        super().connection_made(transport)

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
        #: Frames received from the peer (``TcpNetwork.frames_heard``).
        self.frames = 0
        net._inbound.add(self)

    def authenticated(self, peer_id: int, address: str) -> bool:
        net = self.net
        if peer_id == net.id or peer_id == 0:
            return self.refuse(f"peer claims node id {peer_id}")
        if address:
            net._learn(peer_id, address)
        # A peer dials one connection at a time, so its older ones are dead: given up
        # across a partition (``unacked_timeout``), their end gone without a word reaching
        # here, as nothing is sent on them. Kept, each partition would leave one open, up
        # to ``max_connections``, past which the peer could not connect at all.
        for conn in [c for c in net._inbound if c.peer_id == peer_id and c is not self]:
            conn.close()
        net.connections_from[peer_id] += 1
        peer = net._peers.get(peer_id)
        if peer is not None:
            peer.peer_up()
        return True

    def lost(self) -> None:
        self.net._inbound.discard(self)

    def frame(self, frame: memoryview) -> bool:
        net = self.net
        try:
            sections = _sections(frame)
        except DecodeError as exc:
            net.stats["bad_frames"] += 1
            return self.refuse(str(exc))
        stats = net.stats
        stats["frames_in"] += 1
        stats["bytes_in"] += len(frame) + _LEN.size
        peer_id = self.peer_id  # set: frames follow the handshake
        if peer_id is None or not net.receive_filter(peer_id):
            return True
        self.frames += 1
        receivers = net.receivers
        for group_id, messages in sections:
            node = receivers.get(group_id)
            if node is None:
                # not (yet, or any more) a group here: Raft resends what matters
                stats["unknown_group"] += len(messages)
                if net.early is not None:
                    net.early(group_id, peer_id, messages)
            elif messages:
                node.receive(peer_id, messages)
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _sections(frame: memoryview) -> list[tuple[int, list[Any]]]:
    """A frame's (group, messages) sections, all decoded before any is delivered."""
    size = len(frame)
    if size >= _SECTION.size:
        group_id, n = _SECTION.unpack_from(frame)
        if n == size - _SECTION.size:  # one group's frame (a single node's, always)
            return [(group_id, decode_messages(frame, _SECTION.size))]
    out = []
    pos = 0
    unpack = _SECTION.unpack_from
    while pos < size:
        if pos + _SECTION.size > size:
            raise DecodeError(f"group section header truncated at offset {pos}")
        group_id, n = unpack(frame, pos)
        pos += _SECTION.size
        if pos + n > size:
            raise DecodeError(f"group {group_id}'s messages at offset {pos} run past the "
                              "end of the frame")
        out.append((group_id, decode_messages(frame[pos:pos + n])))
        pos += n
    return out


class GroupNetwork:
    """One Raft group's ``RaftNetwork`` on a ``TcpNetwork`` it shares with the other
    groups of its host: messages carry the group id, connections and frames are shared."""

    def __init__(self, net: TcpNetwork, group_id: int) -> None:
        self.net = net
        self.group_id = group_id
        #: Set by ``RaftHost``, which wakes the group when it is quiet and its leader's
        #: process goes silent (``Config.quiesce_after`` needs that).
        self.watched = False

    @property
    def listen(self) -> str:
        return self.net.listen

    @property
    def stats(self) -> dict[str, int]:
        return self.net.stats

    @property
    def max_frame_bytes(self) -> int:
        return self.net.max_frame_bytes

    async def start(self, node: Any) -> None:
        await self.net.serve()
        self.net.receivers[self.group_id] = node

    async def stop(self) -> None:
        net = self.net
        net.receivers.pop(self.group_id, None)
        net.set_group_peers(self.group_id, {})

    def send(self, target: int, messages: list[Any]) -> None:
        self.net.send_group(self.group_id, target, messages)

    def set_peers(self, addresses: dict[int, str]) -> None:
        self.net.set_group_peers(self.group_id, addresses)
