"""What a user meets on the command line: wrong arguments get one clear line and exit 2,
never a traceback."""
import json
import subprocess
import sys

import pytest

import fastraft
from fastraft import cli
from fastraft.config import Config
from fastraft.host import DEFAULT_QUIESCE_AFTER

NODE = ["node", "--client", "127.0.0.1:1"]


@pytest.mark.parametrize("args, says", [
    (NODE + ["--id", "0", "--cluster", "1=127.0.0.1:2"], "--id: must be above 0"),
    (NODE + ["--id", "2", "--cluster", "1=127.0.0.1:2"], "--id 2 is not in --cluster"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--log-level", "bogus"],
     "invalid choice: 'BOGUS'"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:99999"], "port 99999 is out of range"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2,1=127.0.0.1:3"],
     "--cluster: node 1 appears twice"),
    (NODE + ["--id", "1", "--cluster", "1=nowhere"], "--cluster: bad member '1=nowhere': "
                                                     "expected ID=HOST:PORT"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--clients", "1=bad"],
     "--clients: bad member '1=bad'"),
    (["demo", "--inflight", "0"], "--inflight: must be above 0"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--heartbeat-interval", "0.3"],
     "heartbeat_interval (0.3) must be positive and below election_timeout_min (0.15)"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--election-timeout", "0.04"],
     "heartbeat_interval (0.05) must be positive and below election_timeout_min (0.04)"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--unacked-timeout", "0"],
     "--unacked-timeout: must be above 0"),
    (["demo", "--nodes", "x"], "'x' is not a number"),
], ids=["id-0", "id-not-member", "log-level", "port", "duplicate-id", "bad-member",
        "bad-client",
        "inflight-0", "heartbeat-over-election", "election-under-heartbeat",
        "unacked-0", "nodes-nan"])
def test_wrong_arguments_get_one_clear_line(args, says):
    done = subprocess.run([sys.executable, "-m", "fastraft", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1]


def test_timing_flags_reach_the_config_and_the_transport():
    args = cli.build_parser().parse_args(
        NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--groups", "4",
                "--heartbeat-interval", "1.5", "--election-timeout", "5",
                "--unacked-timeout", "7", "--connect-timeout", "3"])
    config = cli._host_config(args)
    assert (config.heartbeat_interval, config.election_timeout_min,
            config.election_timeout_max) == (1.5, 5.0, 10.0)
    # a host's groups go quiet after as many heartbeats as by default (1 s of 0.05 s)
    assert config.quiesce_after == pytest.approx(30.0)
    network = cli.node_network(args, {1: "127.0.0.1:2"}, {"secret": None, "tls": None})
    assert (network.unacked_timeout, network.connect_timeout) == (7.0, 3.0)

    defaults = cli.build_parser().parse_args(NODE + ["--id", "1", "--cluster", "1=x:2"])
    assert cli._host_config(defaults) == Config(quiesce_after=DEFAULT_QUIESCE_AFTER)
    network = cli.node_network(defaults, {1: "x:2"}, {"secret": None, "tls": None})
    assert (network.unacked_timeout, network.connect_timeout) == (2.0, 2.0)


def test_version():
    done = subprocess.run([sys.executable, "-m", "fastraft", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"fastraft {fastraft.__version__}"


def test_help_is_plain_text_and_names_every_command():
    done = subprocess.run([sys.executable, "-m", "fastraft", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "``" not in done.stdout
    for command in ("demo", "node", "status", "bench"):
        assert command in done.stdout


def _node_on(data_dir, *more):
    return subprocess.run([sys.executable, "-m", "fastraft", *NODE, "--id", "1", "--cluster",
                           "1=127.0.0.1:2", "--data-dir", str(data_dir), *more],
                          capture_output=True, text=True, timeout=60)


def _one_line(done, says):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr


def test_a_data_dir_in_use_or_corrupt_is_one_line(tmp_path):
    import asyncio

    from fastraft.filestorage import FileStorage
    from fastraft.messages import Entry, EntryKind

    held = FileStorage(str(tmp_path / "held"))
    try:
        _one_line(_node_on(tmp_path / "held"), "is in use by another process")
    finally:
        held.close()

    async def write():
        fs = FileStorage(str(tmp_path / "bad"))
        fs.save_identity(1, "fastraft")
        await fs.append_entries([Entry(index=i, term=1, kind=EntryKind.NORMAL, data=b"x" * 100)
                                 for i in range(1, 100)])
        fs.commit_advanced(99)
        fs.close()
    asyncio.run(write())
    segment = next((tmp_path / "bad").glob("log-*.seg"))
    damaged = bytearray(segment.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    _one_line(_node_on(tmp_path / "bad"), "fails its checksum")


def test_status_against_a_port_that_is_not_fastraft_says_so():
    import socket
    import threading

    banner = socket.create_server(("127.0.0.1", 0))
    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve(sock, greeting):
        # every connection (the banner is asked twice), until the test closes the socket
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)
            if greeting:
                conn.sendall(greeting)
    threading.Thread(target=serve, args=(banner, b"SSH-2.0-OpenSSH_9.6\r\n"), daemon=True).start()
    threading.Thread(target=serve, args=(silent, b""), daemon=True).start()
    try:
        for sock, says in ((banner, "does not answer as a fastraft client port"),
                           (silent, "does not answer as a fastraft client port: no "
                                    "handshake within 2.0s (not one byte: a port with TLS")):
            address = f"127.0.0.1:{sock.getsockname()[1]}"
            done = subprocess.run([sys.executable, "-m", "fastraft", "status", "--cluster",
                                   address], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert "unreachable" in done.stdout and says in done.stdout, done.stdout
            # the banner is told apart by its bytes, not by a handshake timing out
            assert sock is silent or "handshake" not in done.stdout, done.stdout
        done = subprocess.run([sys.executable, "-m", "fastraft", "status", "--address",
                               f"127.0.0.1:{banner.getsockname()[1]}"],
                              capture_output=True, text=True, timeout=60)
        _one_line(done, "does not answer as a fastraft client port")
        assert "handshake" not in done.stderr, done.stderr
    finally:
        for s in [banner, silent, *accepted]:
            s.close()


def test_a_data_dir_is_served_as_it_was_first(tmp_path):
    """A key belongs to group crc32(key) % N: a node restarted with another --groups
    looked for most keys in the wrong group, and one restarted without --groups opened
    its SharedWAL as an empty FileStorage (with --init: a new cluster). Both refused.
    On the way: --log-cache-mib is one budget for all the groups."""
    import signal

    from fastraft.filestorage import FileStorage
    from fastraft.processes import free_ports

    raft, client = free_ports(2)
    node = subprocess.Popen(
        [sys.executable, "-m", "fastraft", "node", "--id", "1", "--cluster",
         f"1=127.0.0.1:{raft}", "--client", f"127.0.0.1:{client}", "--data-dir",
         str(tmp_path / "groups"), "--groups", "4", "--init", "--log-cache-mib", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in node.stdout:  # ends if the node exits: never hangs
            said.append(line)
            if " ready: " in line:
                break
        assert " ready: " in said[-1], said
        # its groups share one log cache budget: memory that does not grow with --groups
        status = subprocess.run([sys.executable, "-m", "fastraft", "status", "--address",
                                 f"127.0.0.1:{client}"], capture_output=True, text=True,
                                timeout=60)
        host = json.loads(status.stdout)["host"]
        assert host["log_cache_budget"] == 8 << 20 and host["log_cache_bytes"] > 0, host
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    for other in ("2", "8"):
        _one_line(_node_on(tmp_path / "groups", "--groups", other),
                  "was served with --groups 4 (a key belongs to group crc32(key) % N")
    _one_line(_node_on(tmp_path / "groups"), "holds a SharedWAL (wal-")
    assert not (tmp_path / "groups" / "state").exists()  # left as it was
    FileStorage(str(tmp_path / "one")).close()
    _one_line(_node_on(tmp_path / "one", "--groups", "4"), "holds a FileStorage (state")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["LOCK", "state"]
