"""A raw TCP peer for attacking a node's port: the handshake done by hand (or not at all),
then whatever frames a test wants to send."""
import asyncio
import os
import socket
import struct

import msgspec

from fastraft.transport.link import (
    PROTOCOL_VERSIONS,
    ClientHello,
    Credentials,
    ServerHello,
    Welcome,
    decode_hello,
)
from fastraft.wire import encode_messages

_enc = msgspec.msgpack.Encoder()


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def section(body: bytes, group: int = 0) -> bytes:
    """One group's part of a Raft frame: ``u64 group | u32 length | body``."""
    return struct.pack("<QI", group, len(body)) + body


def raft_frame(messages: list, group: int = 0) -> bytes:
    """A Raft port's frame carrying ``messages`` of one group."""
    return frame(section(encode_messages(messages), group))


async def read_frame(reader) -> bytes:
    (n,) = struct.unpack("<I", await reader.readexactly(4))
    return await reader.readexactly(n)


async def connect(port: int, node_id: int = 99, *, cluster_id: str = "fastraft",
                  secret: bytes | None = None, purpose: str = "raft", handshake: bool = True,
                  address: str = ""):
    """Open a connection to 127.0.0.1:``port`` as ``node_id``; with ``handshake`` complete
    it (proving ``secret`` if given). Returns (reader, writer, welcome or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    welcome = None
    if handshake:
        hello = decode_hello(await read_frame(reader))
        assert type(hello) is ServerHello
        creds = Credentials(cluster_id, purpose, secret)
        nonce = os.urandom(16)
        writer.write(frame(_enc.encode(ClientHello(
            cluster_id, node_id, PROTOCOL_VERSIONS[purpose], address, nonce,
            creds.proof("dial", node_id, address, hello.nonce, nonce)))))
        try:
            welcome = decode_hello(await asyncio.wait_for(read_frame(reader), 5))
            assert type(welcome) is Welcome
        except (asyncio.IncompleteReadError, ConnectionError):
            welcome = None  # refused
    return reader, writer, welcome


async def send_messages(port: int, node_id: int, messages: list, **kw) -> None:
    """One connection as ``node_id``: handshake, one frame of ``messages``, close once
    the node has read it."""
    reader, writer, _ = await connect(port, node_id, **kw)
    writer.write(raft_frame(messages))
    await writer.drain()
    writer.write_eof()
    try:
        await asyncio.wait_for(reader.read(), 5)  # the node closes or we time out
    except (asyncio.TimeoutError, ConnectionError):
        pass
    writer.close()


def no_tracebacks(caplog) -> bool:
    """fastraft logged its refusals without a traceback (one line each)."""
    return not any(r.exc_info for r in caplog.records if r.name.startswith("fastraft"))


def unused_port():
    """A loopback port nobody listens on (yet)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
