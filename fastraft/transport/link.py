"""Authenticated, framed connections: what the Raft port and the client port share.

Every connection starts with a handshake before any message is decoded::

    acceptor → dialer   ServerHello(version, nonce_a)
    dialer → acceptor   ClientHello(cluster_id, node_id, address, version, nonce_d, proof_d)
    acceptor → dialer   Welcome(node_id, proof_a)

With a cluster secret, ``proof_d`` and ``proof_a`` are HMAC-SHA256 over both fresh nonces
and what each side claims, keyed by the secret: each side proves it holds the secret to the
other, a recorded handshake cannot be replayed, and the secret never crosses the wire.
Comparisons are constant-time. With TLS (``TlsConfig``) both sides first complete a TLS
handshake that verifies the other's certificate against the cluster's CA (mutual TLS), and
optionally that the certificate names the node id the peer claims. Without either, the
handshake only checks the cluster id and protocol version: peers are not authenticated.

Until a peer is authenticated it may send at most ``HANDSHAKE_BYTES`` and must finish
within ``ConnectionLimits.handshake_timeout``; an acceptor keeps at most
``max_unauthenticated`` such connections (``max_unauthenticated_per_host`` per address),
closing the oldest to make room, and at most ``max_connections`` authenticated ones. A
frame's announced length is checked before it is buffered (``FrameReader``), and frames
still incomplete may hold ``max_buffered_bytes`` over the whole port.
Anything refused is closed, counted and logged in one line (throttled per peer address).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import os
import ssl
import struct
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar, cast

import msgspec

from fastraft.errors import ConfigError, DecodeError
from fastraft.logutil import Throttle
from fastraft.wire import FrameReader

log = logging.getLogger("fastraft.transport")

#: What each port speaks after the handshake: the Raft port's frames carry one section
#: per group since version 3 (multi-Raft); the client port's are as they were in 2.
PROTOCOL_VERSIONS = {"raft": 3, "kv": 2}
PROTOCOL_VERSION = PROTOCOL_VERSIONS["raft"]
#: The most an unauthenticated peer may send: one handshake frame.
HANDSHAKE_BYTES = 4096
#: A cluster secret shorter than this is refused (brute force).
MIN_SECRET_BYTES = 16

_LEN = struct.Struct("<I")
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
Proof = Annotated[bytes, msgspec.Meta(max_length=64)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]
Id = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


class ServerHello(msgspec.Struct, tag=1, array_like=True):
    version: int
    nonce: Nonce


class ClientHello(msgspec.Struct, tag=2, array_like=True):
    cluster_id: Short
    #: The dialer's node id; 0 for a client of the client port.
    node_id: Id
    version: int
    #: Where the dialer listens: lets a node that is not yet told the membership (a new
    #: learner) answer the leader that contacted it.
    address: Short
    nonce: Nonce
    proof: Proof = b""


class Welcome(msgspec.Struct, tag=3, array_like=True):
    node_id: Id
    proof: Proof = b""


_hello_decoder = msgspec.msgpack.Decoder(ServerHello | ClientHello | Welcome)
_encoder = msgspec.msgpack.Encoder()


def decode_hello(frame: bytes | memoryview) -> ServerHello | ClientHello | Welcome:
    """One handshake frame; ``DecodeError`` for anything else."""
    try:
        hello: ServerHello | ClientHello | Welcome = _hello_decoder.decode(frame)
        return hello
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"bad handshake: {exc}") from None


class TlsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Mutual TLS: this node's certificate and key, and the CA that signs every member's.

    With ``node_names`` a peer's certificate must also name the node id it claims, as
    ``node-<id>`` in its subject's common name or a DNS subject-alternative name, so a
    member's stolen key cannot speak for another member.
    """

    certfile: str
    keyfile: str
    cafile: str
    node_names: bool = False

    def context(self, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Peers are named by node id, not host name: the CA and (optionally) the node
        # name in the certificate identify them.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
            ctx.load_verify_locations(self.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS: cannot load certificate {self.certfile!r}, key "
                              f"{self.keyfile!r} or CA {self.cafile!r}: {exc}") from None
        return ctx


def certificate_names(cert: dict[str, Any]) -> set[str]:
    """The common names and DNS alternative names of a peer certificate."""
    names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    names.update(v for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    return names


class ConnectionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one listening port accepts (see the module docstring)."""

    max_connections: int = 1024
    max_unauthenticated: int = 128
    max_unauthenticated_per_host: int = 32
    handshake_timeout: float = 5.0
    #: Bytes of frames not yet complete, over all connections of the port: a connection
    #: that would go beyond it is closed (a real peer's frames complete at once; slowly
    #: trickled ones are what fills this).
    max_buffered_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_unauthenticated",
                     "max_unauthenticated_per_host", "max_buffered_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.handshake_timeout <= 0:
            raise ConfigError(f"handshake_timeout must be > 0, got {self.handshake_timeout}")


class Credentials:
    """What one endpoint proves and checks: cluster id, purpose of the port, secret, TLS."""

    def __init__(self, cluster_id: str, purpose: str, secret: bytes | None = None,
                 tls: TlsConfig | None = None) -> None:
        if secret is not None and not isinstance(secret, bytes):
            raise ConfigError(f"the cluster secret is bytes, not {type(secret).__name__}")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the cluster secret has {len(secret)} bytes; use at least "
                              f"{MIN_SECRET_BYTES} random bytes")
        self.cluster_id = cluster_id
        self.purpose = purpose
        self.secret = secret
        self.tls = tls
        self.server_ssl = tls.context(server_side=True) if tls else None
        self.client_ssl = tls.context(server_side=False) if tls else None

    @property
    def authenticated(self) -> bool:
        return self.secret is not None or self.tls is not None

    def proof(self, role: str, node_id: int, address: str, first: bytes,
              second: bytes) -> bytes:
        if self.secret is None:
            return b""
        msg = _encoder.encode((role, self.purpose, self.cluster_id, node_id, address,
                               first, second))
        return hmac.new(self.secret, msg, hashlib.sha256).digest()


class Gate:
    """Connection limits of one listening port (``ConnectionLimits``)."""

    def __init__(self, limits: ConnectionLimits, stats: dict[str, Any]) -> None:
        self.limits = limits
        self.stats = stats
        self.unauthenticated: OrderedDict[Link, str] = OrderedDict()
        self.per_host: dict[str, int] = {}
        self.authenticated: set[Link] = set()
        #: Bytes of incomplete frames held by all connections.
        self.buffered = 0

    def admit(self, link: Link, host: str) -> None:
        """A new connection: make room among the unauthenticated ones, oldest first, so a
        flood of idle connections never locks a real peer out."""
        limits = self.limits
        if self.per_host.get(host, 0) >= limits.max_unauthenticated_per_host:
            oldest = next(k for k, h in self.unauthenticated.items() if h == host)
            self._evict(oldest, f"more than {limits.max_unauthenticated_per_host} "
                                "unauthenticated connections from this address")
        if len(self.unauthenticated) >= limits.max_unauthenticated:
            self._evict(next(iter(self.unauthenticated)),
                        f"more than {limits.max_unauthenticated} unauthenticated connections")
        self.unauthenticated[link] = host
        self.per_host[host] = self.per_host.get(host, 0) + 1

    def _evict(self, link: Link, why: str) -> None:
        self.stats["evicted"] = self.stats.get("evicted", 0) + 1
        link.refuse(why, count=False)

    def promote(self, link: Link) -> bool:
        """The peer authenticated: False if the port holds all it may."""
        self._forget_unauthenticated(link)
        if len(self.authenticated) >= self.limits.max_connections:
            return False
        self.authenticated.add(link)
        return True

    def closed(self, link: Link) -> None:
        self._forget_unauthenticated(link)
        self.authenticated.discard(link)
        self.buffered -= link.reader.buffered

    def _forget_unauthenticated(self, link: Link) -> None:
        host = self.unauthenticated.pop(link, None)
        if host is not None:
            left = self.per_host[host] - 1
            if left:
                self.per_host[host] = left
            else:
                del self.per_host[host]


_L = TypeVar("_L", bound="Link")


def _step_now(coro: Coroutine[Any, Any, Any],
              done: Callable[[Any, BaseException | None], None]) -> None:
    """Run ``coro`` as a task would, but its first step in this call, not a loop turn
    later; ``done(result, None)`` or ``done(None, exception)`` when it ends."""
    def step(value: Any = None, exc: BaseException | None = None) -> None:
        try:
            awaited = coro.throw(exc) if exc is not None else coro.send(value)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as failure:  # its caller's to judge, as a task's awaiter
            done(None, failure)
            return
        if awaited is None:  # a bare yield (sleep(0)): go on next turn
            asyncio.get_running_loop().call_soon(step)
        else:
            awaited.add_done_callback(resume)

    def resume(awaited: asyncio.Future[Any]) -> None:
        if awaited.cancelled():
            step(exc=asyncio.CancelledError())
        elif awaited.exception() is not None:
            step(exc=awaited.exception())
        else:
            step(awaited.result())
    step()


async def dial(loop: asyncio.AbstractEventLoop, factory: Callable[[], _L], host: str,
               port: int, timeout: float) -> tuple[asyncio.BaseTransport, _L]:
    """``loop.create_connection`` within ``timeout`` seconds (``asyncio.TimeoutError``
    after it). Not ``asyncio.wait_for``: up to Python 3.11 it can lose a cancellation
    that comes as the dial fails (uvloop refuses a dead port at once), and the caller
    then goes on in a task already cancelled. Cancelled, the dial is cancelled too, and a
    connection made that instant is closed: it is nobody's."""
    connecting = loop.create_task(loop.create_connection(factory, host, port))
    try:
        done, _ = await asyncio.wait((connecting,), timeout=timeout)
    except asyncio.CancelledError:
        if not connecting.done():
            connecting.cancel()
        elif not connecting.cancelled() and connecting.exception() is None:
            connecting.result()[0].close()
        raise
    if not done:
        connecting.cancel()
        raise asyncio.TimeoutError
    return connecting.result()


class Link(asyncio.Protocol):
    """One connection: the handshake (as acceptor or dialer), then frames.

    Subclasses implement ``authenticated(peer_id, address)`` (return False to refuse),
    ``frame(frame)`` (return False after refusing) and ``lost()``.
    """

    def __init__(self, credentials: Credentials, local_id: int, address: str, *,
                 acceptor: bool, max_frame: int, stats: dict[str, Any], gate: Gate | None = None,
                 handshake_timeout: float = 5.0, expected_peer: int | None = None,
                 throttle: Throttle | None = None) -> None:
        self.credentials = credentials
        self.version = PROTOCOL_VERSIONS[credentials.purpose]
        #: Refusals are logged through this, one line per peer address per second.
        self.throttle = throttle or Throttle(log)
        self.local_id = local_id
        self.address = address
        self.acceptor = acceptor
        self.max_frame = max_frame
        self.stats = stats
        self.gate = gate
        self.handshake_timeout = handshake_timeout
        #: Dialer: the node we meant to reach (checked against its TLS certificate).
        self.expected_peer = expected_peer
        self.reader = FrameReader(HANDSHAKE_BYTES)
        self.transport: asyncio.Transport | None = None
        self.peer_id: int | None = None
        self.is_authenticated = False
        self.closed = False
        self._nonce = os.urandom(16)
        self._peer_nonce = b""
        self._timer: asyncio.TimerHandle | None = None
        self._peername: Any = None

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses: no isinstance)
        stream = self.transport = cast(asyncio.Transport, transport)
        self._peername = stream.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.handshake_timeout, self._timed_out)
        if self.gate is not None:
            host = self._peername[0] if self._peername else "?"
            self.gate.admit(self, host)
            if self.closed:
                return
        ctx = self.credentials.server_ssl if self.acceptor else self.credentials.client_ssl
        if ctx is None:
            self._begin()
        else:
            # Its first step now: it puts the TLS protocol in place before the peer's
            # first bytes can reach this plain one (uvloop reads a connection once
            # connection_made returns, pause_reading or not).
            _step_now(loop.start_tls(stream, self, ctx, server_side=self.acceptor,
                                     server_hostname=None if self.acceptor else "fastraft",
                                     ssl_handshake_timeout=self.handshake_timeout),
                      functools.partial(self._tls_started, stream))

    def _tls_started(self, raw: asyncio.Transport, transport: Any,
                     exc: BaseException | None) -> None:
        if exc is not None:
            self.refuse(f"TLS handshake failed: {exc or type(exc).__name__}")
            return
        if self.transport is None:  # closed meanwhile
            raw.close()
            return
        self.transport = transport
        self._begin()

    def _begin(self) -> None:
        if self.closed:
            return
        if self.acceptor:
            self._write(_encoder.encode(ServerHello(self.version, self._nonce)))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        reader = self.reader
        before = reader.buffered
        try:
            frames = reader.feed(data)
        except DecodeError as exc:
            self.stats["bad_frames"] = self.stats.get("bad_frames", 0) + 1
            self.refuse(str(exc))
            return
        gate = self.gate
        if gate is not None and reader.buffered != before:
            gate.buffered += reader.buffered - before
            if gate.buffered > gate.limits.max_buffered_bytes:
                self.refuse(f"the port holds {gate.buffered} bytes of incomplete frames, "
                            f"more than {gate.limits.max_buffered_bytes}")
                return
        for frame in frames:
            if self.is_authenticated:
                if not self.frame(frame):
                    return
            elif not self._handshake(frame):
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.gate is not None:
            self.gate.closed(self)
        self.lost()

    # ------------------------------------------------------------------ handshake

    def _handshake(self, frame: memoryview) -> bool:
        try:
            msg = decode_hello(frame)
        except DecodeError as exc:
            self.stats["bad_frames"] = self.stats.get("bad_frames", 0) + 1
            return self.refuse(str(exc))
        creds = self.credentials
        if self.acceptor and isinstance(msg, ClientHello):
            if msg.version != self.version:
                return self.refuse(f"peer speaks protocol {msg.version}, "
                                   f"not {self.version}")
            if msg.cluster_id != creds.cluster_id:
                return self.refuse(f"peer belongs to cluster {msg.cluster_id!r}, "
                                   f"not {creds.cluster_id!r}")
            expected = creds.proof("dial", msg.node_id, msg.address, self._nonce, msg.nonce)
            if not hmac.compare_digest(expected, msg.proof):
                return self.refuse("peer does not hold the cluster secret"
                                   if creds.secret is not None else
                                   "peer sent a secret proof, this node has no secret")
            if not self._certificate_names(msg.node_id):
                return False
            self._peer_nonce = msg.nonce
            self._write(_encoder.encode(Welcome(self.local_id, creds.proof(
                "accept", self.local_id, "", msg.nonce, self._nonce))))
            return self._authenticated(msg.node_id, msg.address)
        if not self.acceptor and isinstance(msg, ServerHello) and not self._peer_nonce:
            if msg.version != self.version:
                return self.refuse(f"peer speaks protocol {msg.version}, "
                                   f"not {self.version}")
            self._peer_nonce = msg.nonce
            self._write(_encoder.encode(ClientHello(
                creds.cluster_id, self.local_id, self.version, self.address,
                self._nonce, creds.proof("dial", self.local_id, self.address, msg.nonce,
                                         self._nonce))))
            return True
        if not self.acceptor and isinstance(msg, Welcome) and self._peer_nonce:
            expected = creds.proof("accept", msg.node_id, "", self._nonce, self._peer_nonce)
            if not hmac.compare_digest(expected, msg.proof):
                return self.refuse("peer does not hold the cluster secret"
                                   if creds.secret is not None else
                                   "peer sent a secret proof, this node has no secret")
            if self.expected_peer is not None and msg.node_id != self.expected_peer:
                return self.refuse(f"dialed node {self.expected_peer}, "
                                   f"node {msg.node_id} answered")
            if not self._certificate_names(msg.node_id):
                return False
            return self._authenticated(msg.node_id, "")
        return self.refuse(f"unexpected {type(msg).__name__} in the handshake")

    def _certificate_names(self, node_id: int) -> bool:
        tls = self.credentials.tls
        if tls is None or not tls.node_names:
            return True
        cert = self.transport.get_extra_info("peercert") if self.transport else None
        names = certificate_names(cert or {})
        if f"node-{node_id}" not in names:
            return self.refuse(f"peer claims node {node_id} but its certificate names "
                               f"{sorted(names) or 'nothing'}")
        return True

    def _authenticated(self, peer_id: int, address: str) -> bool:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.gate is not None and not self.gate.promote(self):
            return self.refuse(f"more than {self.gate.limits.max_connections} connections")
        self.peer_id = peer_id
        self.is_authenticated = True
        self.reader.max_frame = self.max_frame
        return self.authenticated(peer_id, address)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.is_authenticated and not self.closed:
            self.stats["timeouts"] = self.stats.get("timeouts", 0) + 1
            why = f"no handshake within {self.handshake_timeout}s"
            if not self.acceptor and self.credentials.tls is None and not self._peer_nonce \
                    and not self.reader.buffered:
                why += " (not one byte: a port with TLS waits for its client to begin; " \
                       "give the TLS options)"
            self.refuse(why, count=False)

    # ------------------------------------------------------------------ helpers

    def _write(self, body: bytes) -> None:
        if self.transport is not None:
            self.transport.writelines((_LEN.pack(len(body)), body))

    def refuse(self, why: str, count: bool = True) -> bool:
        """Close this connection, and say why in one (throttled) log line. False."""
        if self.closed:
            return False
        self.closed = True
        if count:
            self.stats["refused"] = self.stats.get("refused", 0) + 1
        who = f"node {self.peer_id}" if self.peer_id is not None else "peer"
        host = self._peername[0] if self._peername else "?"
        self.throttle.warning(host, "%s port of node %d: closing connection from %s (%s): %s",
                              self.credentials.purpose, self.local_id, self._peername, who,
                              why, extra={"event": "connection_refused",
                                          "node": self.local_id, "port": self.credentials.purpose,
                                          "host": host, "peer": self.peer_id, "reason": why})
        if self.transport is not None:
            self.transport.close()
        return False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ for subclasses

    def authenticated(self, peer_id: int, address: str) -> bool:
        return True

    def frame(self, frame: memoryview) -> bool:
        return True

    def lost(self) -> None:
        pass
