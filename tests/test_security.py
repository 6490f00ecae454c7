"""Peer authentication in TcpNetwork: a cluster secret (HMAC challenge-response both ways)
and mutual TLS, each tested accepting the right peer and refusing the wrong one before
any Raft message is decoded."""
import asyncio
import logging
import os

import msgspec
import pytest

from fastraft.errors import ConfigError
from fastraft.messages import RequestVote
from fastraft.testing import wait_until
from fastraft.transport.link import PROTOCOL_VERSION, ServerHello, Welcome, decode_hello
from fastraft.transport.tcp import TcpNetwork

from aio import run
from certs import CA
from rawpeer import connect, frame, no_tracebacks, raft_frame, read_frame

SECRET = b"s" * 32
VOTE = RequestVote(1, 1, 0, 0)


class Sink:
    def __init__(self):
        self.got = []

    def receive(self, frm, messages):
        self.got.extend((frm, m) for m in messages)


async def pair(a_opts, b_opts):
    """Node 1 (``a_opts``) dials node 2 (``b_opts``); returns both and node 2's sink."""
    a = TcpNetwork(1, "127.0.0.1:0", **a_opts)
    b = TcpNetwork(2, "127.0.0.1:0", **b_opts)
    sb = Sink()
    await a.start(Sink())
    await b.start(sb)
    a.set_peers({2: b.listen})
    return a, b, sb


def refusals(net: TcpNetwork) -> int:
    return net.stats["refused"] + net.stats["bad_frames"] + net.stats["timeouts"]


async def delivered(a_opts, b_opts) -> tuple[bool, TcpNetwork, TcpNetwork]:
    """Whether a message from node 1 reaches node 2 before node 2 refuses a connection."""
    a, b, sb = await pair(a_opts, b_opts)
    try:
        a.send(2, [VOTE])
        try:
            await wait_until(lambda: sb.got or refusals(b), 10)
        except TimeoutError:
            pass
        await asyncio.sleep(0)
        return bool(sb.got), a, b
    finally:
        await a.stop()
        await b.stop()


@run
async def test_the_same_secret_is_accepted():
    ok, _, _ = await delivered({"secret": SECRET}, {"secret": SECRET})
    assert ok


@pytest.mark.parametrize("a_secret, b_secret", [
    (b"x" * 32, SECRET), (None, SECRET), (SECRET, None)],
    ids=["other-secret", "dialer-without", "acceptor-without"])
@run
async def test_a_peer_without_the_secret_is_refused(a_secret, b_secret, caplog):
    with caplog.at_level(logging.WARNING, logger="fastraft.transport"):
        ok, a, b = await delivered({"secret": a_secret}, {"secret": b_secret})
    assert not ok
    assert b.stats["refused"] >= 1
    assert "secret" in caplog.text and no_tracebacks(caplog)


def test_a_short_secret_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 16"):
        TcpNetwork(1, "127.0.0.1:0", secret=b"short")


@run
async def test_a_members_id_without_the_secret_never_reaches_the_node():
    b = TcpNetwork(2, "127.0.0.1:0", secret=SECRET)
    sink = Sink()
    await b.start(sink)
    reader, writer, welcome = await connect(b.port, 1)  # node 1's id, no proof
    assert welcome is None
    writer.write(raft_frame([VOTE]))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node
    assert sink.got == [] and b.stats["refused"] == 1
    await b.stop()


@run
async def test_a_recorded_handshake_cannot_be_replayed():
    """The proof covers the acceptor's fresh nonce: an answer recorded on one connection
    is worthless on the next."""
    b = TcpNetwork(2, "127.0.0.1:0", secret=SECRET)
    await b.start(Sink())
    _, _, welcome = await connect(b.port, 1, secret=SECRET)
    assert welcome is not None
    from fastraft.transport.link import ClientHello, Credentials
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    first = decode_hello(await read_frame(reader))
    creds = Credentials("fastraft", "raft", SECRET)
    stale_nonce = os.urandom(16)  # the proof is for another acceptor nonce
    hello = ClientHello("fastraft", 1, PROTOCOL_VERSION, "", os.urandom(16),
                        creds.proof("dial", 1, "", stale_nonce, os.urandom(16)))
    assert first.nonce != stale_nonce
    writer.write(frame(msgspec.msgpack.encode(hello)))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert b.stats["refused"] == 1
    await b.stop()


@run
async def test_a_dialer_refuses_an_acceptor_that_does_not_prove_the_secret():
    """An impostor listening at a member's address gets no Raft message."""
    got_after_welcome = []

    async def impostor(reader, writer):
        writer.write(frame(msgspec.msgpack.encode(ServerHello(PROTOCOL_VERSION,
                                                              os.urandom(16)))))
        await read_frame(reader)  # the ClientHello
        writer.write(frame(msgspec.msgpack.encode(Welcome(2, b"\0" * 32))))
        got_after_welcome.append(await reader.read())

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a = TcpNetwork(1, "127.0.0.1:0", secret=SECRET)
    await a.start(Sink())
    a.set_peers({2: f"127.0.0.1:{port}"})
    a.send(2, [VOTE])
    await wait_until(lambda: a.stats["refused"] >= 1, 10)
    await wait_until(lambda: got_after_welcome, 10)
    assert got_after_welcome[0] == b""  # closed without a frame
    await a.stop()
    server.close()


# ---------------------------------------------------------------- mutual TLS

@pytest.fixture
def ca(tmp_path):
    return CA(str(tmp_path))


@run
async def test_tls_peers_signed_by_the_cluster_ca_are_accepted(ca):
    ok, _, _ = await delivered({"tls": ca.issue("node-1")}, {"tls": ca.issue("node-2")})
    assert ok


@run
async def test_a_tls_client_that_speaks_at_once_is_served(ca):
    """A TLS client sends its hello as soon as it connects (openssl, asyncio's ``ssl=``).
    uvloop reads a connection once ``connection_made`` returns, whatever it asked, and the
    TLS layer was put in place a loop turn later: those bytes reached the plain frame
    reader and the connection was refused ("frame of 33620758 bytes exceeds the limit"):
    every time within a process, 2-5% of TLS connections between processes."""
    import types

    from fastraft.addresses import parse_address
    from fastraft.kvservice import KVServer

    net = TcpNetwork(2, "127.0.0.1:0", tls=ca.issue("node-2"))
    await net.start(Sink())
    # the handshake is all that is asked of it: a node id, no node
    port = KVServer(types.SimpleNamespace(id=2), None, "127.0.0.1:0", tls=ca.issue("node-2"))
    await port.start()
    client = ca.issue("node-1").context(server_side=False)
    try:
        for address in (net.listen, f"127.0.0.1:{port._server.sockets[0].getsockname()[1]}"):
            host, number = parse_address(address)
            for _ in range(10):
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, number, ssl=client, server_hostname="fastraft"), 5)
                try:
                    n = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 5),
                                       "little")
                    assert isinstance(decode_hello(await reader.readexactly(n)), ServerHello)
                finally:
                    writer.close()
        assert refusals(net) == 0
    finally:
        port.close()
        await net.stop()


@pytest.mark.parametrize("case", ["other-ca", "expired", "no-tls"])
@run
async def test_tls_refuses_the_wrong_certificate(case, ca, tmp_path, caplog):
    if case == "other-ca":
        dialer = {"tls": CA(str(tmp_path), "another CA").issue("node-1", trust=ca)}
    elif case == "expired":
        dialer = {"tls": ca.issue("node-1", expired=True)}
    else:
        dialer = {}
    with caplog.at_level(logging.WARNING, logger="fastraft.transport"):
        ok, a, b = await delivered(dialer, {"tls": ca.issue("node-2")})
    assert not ok
    assert refusals(b) >= 1
    assert no_tracebacks(caplog)


@run
async def test_tls_node_names_bind_a_certificate_to_its_node_id(ca):
    ok, _, _ = await delivered({"tls": ca.issue("node-1", node_names=True)},
                               {"tls": ca.issue("node-2", node_names=True)})
    assert ok
    # node 1 presenting node 3's certificate is refused
    ok, _, b = await delivered({"tls": ca.issue("node-3", node_names=True)},
                               {"tls": ca.issue("node-2", node_names=True)})
    assert not ok and b.stats["refused"] == 1


@run
async def test_tls_and_secret_together(ca):
    ok, _, _ = await delivered({"tls": ca.issue("node-1"), "secret": SECRET},
                               {"tls": ca.issue("node-2"), "secret": SECRET})
    assert ok
    ok, _, _ = await delivered({"tls": ca.issue("node-1")},
                               {"tls": ca.issue("node-2"), "secret": SECRET})
    assert not ok


def test_unreadable_tls_files_are_a_config_error(tmp_path):
    from fastraft.transport.link import TlsConfig
    tls = TlsConfig(certfile=str(tmp_path / "missing.crt"), keyfile="k", cafile="c")
    with pytest.raises(ConfigError, match="cannot load certificate"):
        TcpNetwork(1, "127.0.0.1:0", tls=tls)


@run
async def test_cli_nodes_and_status_with_a_secret_file(tmp_path):
    import subprocess
    import sys

    from fastraft.kvclient import find_leader
    from fastraft.processes import ProcessCluster

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")  # a trailing newline is not part of it
    cluster = ProcessCluster(3, str(tmp_path), extra_args=["--secret-file", str(secret_file)])
    try:
        cluster.start_all()
        clients = await cluster.connect_all(secret=SECRET)
        leader = await find_leader(clients)
        assert await clients[leader].put("k", b"v") > 0
        for c in clients.values():
            c.close()
        status = [sys.executable, "-m", "fastraft", "status", "--address", cluster.client[1],
                  "--cluster-id", cluster.cluster_id]
        ok = await asyncio.to_thread(subprocess.run, status + ["--secret-file",
                                     str(secret_file)], capture_output=True, text=True)
        assert ok.returncode == 0 and '"role"' in ok.stdout
        bad = await asyncio.to_thread(subprocess.run, status, capture_output=True, text=True)
        assert bad.returncode != 0
        assert bad.stderr.count("\n") == 1 and "refused the connection" in bad.stderr
        assert "secret" in cluster.log(1)  # the node says why, in its log
    finally:
        cluster.stop_all()
