"""The examples, run as their READMEs tell a user to: processes started with the
README's command lines (on free ports), driven with curl and the example's own scripts,
with the leader killed in the middle."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from waiting import wait_for

from fastraft.processes import free_ports

ROOT = pathlib.Path(__file__).resolve().parent.parent
KV = ROOT / "examples" / "kv"
STREAM = ROOT / "examples" / "stream"
CURL = "/usr/bin/curl" if os.path.exists("/usr/bin/curl") else "curl"


class Processes:
    """Processes this test started, killed by pid at the end."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = {}

    def start(self, name, args, cwd):
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(args, cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT)

    def kill(self, name):
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def curl(*args):
    done = subprocess.run([CURL, "-s", "-m", "5", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def kv_nodes(tmp_path, *args):
    """Three ``kvhttp.py`` processes as the README starts them, on free ports, with
    ``args`` added: (HTTP address by id, the Processes, ``start(i)``)."""
    ports = free_ports(6)  # one call: two calls may hand out the same port twice
    raft, http = ports[:3], ports[3:]
    r = ",".join(f"{i}=127.0.0.1:{raft[i - 1]}" for i in (1, 2, 3))
    h = ",".join(f"{i}=127.0.0.1:{http[i - 1]}" for i in (1, 2, 3))
    url = {i: f"127.0.0.1:{http[i - 1]}" for i in (1, 2, 3)}
    procs = Processes(str(tmp_path))

    def start(i):
        procs.start(i, [sys.executable, "kvhttp.py", "--id", str(i), "--cluster", r,
                        "--http", h, "--data-dir", str(tmp_path / "data" / str(i)),
                        *args], cwd=KV)
    return url, procs, start


def test_kv_example_over_http_with_a_leader_kill(tmp_path):
    url, procs, start = kv_nodes(tmp_path, "--snapshot-interval", "100")

    def status(i):
        """Node ``i``'s status, or None while its HTTP port is not up yet (curl: 0)."""
        code, body = curl(f"{url[i]}/status")
        return json.loads(body) if code == 200 else None

    def leader():
        for i in procs.procs:
            s = status(i)
            if s is not None and s["role"] == "leader":
                return i
        return None
    try:
        for i in (1, 2, 3):
            start(i)
        wait_for(lambda: leader() is not None, "leader")
        first = leader()
        follower = next(i for i in (1, 2, 3) if i != first)
        # a node that has not heard from the new leader yet answers 503 "no leader yet";
        # the follower may not even serve HTTP yet (its process started last)
        wait_for(lambda: (status(follower) or {}).get("leader_id") == first,
                 "the follower to know its leader")

        # through a follower: -L follows the 307 to the leader, keeping method and body
        code, body = curl("-L", "-X", "PUT", "--data-binary", "hello",
                          f"{url[follower]}/kv/greeting")
        assert code == 200, body
        version = json.loads(body)["version"]
        assert curl(f"{url[follower]}/kv/greeting") == (200, "hello")
        code, _ = curl("-X", "PUT", "--data-binary", "x", f"{url[follower]}/kv/greeting")
        assert code == 307  # without -L the redirect is the answer
        # compare-and-set: the wrong version conflicts, the right one wins
        code, body = curl("-L", "-X", "PUT", "--data-binary", "bye",
                          f"{url[first]}/kv/greeting?if_version={version + 1000}")
        assert code == 409 and body == f"version is {version}\n"
        code, body = curl("-L", "-X", "PUT", "--data-binary", "bye",
                          f"{url[first]}/kv/greeting?if_version={version}")
        assert code == 200 and json.loads(body)["version"] > version
        assert curl(f"{url[first]}/kv/greeting")[1] == "bye"
        wait_for(lambda: curl(f"{url[follower]}/kv/greeting?stale=1")[1] == "bye",
                 "the stale read to catch up")
        assert curl("-L", "-X", "DELETE", f"{url[follower]}/kv/greeting")[0] == 200
        assert curl(f"{url[first]}/kv/greeting")[0] == 404

        # a stream of writes, the leader killed in the middle; each write is retried
        # (with its value as its own id, a retry is harmless) until acknowledged
        acked = {}
        for k in range(200):
            if k == 80:
                procs.kill(first)
            deadline = time.monotonic() + 30
            while True:
                target = next(i for i in (1, 2, 3) if i in procs.procs and
                              (k + i) % 3 != 0) if len(procs.procs) > 1 else None
                code, body = curl("-L", "-X", "PUT", "--data-binary", f"v{k}",
                                  f"{url[target]}/kv/k{k}")
                if code == 200:
                    acked[f"k{k}"] = f"v{k}"
                    break
                # no leader yet, or outcome unknown (503); redirected to the dead leader
                # (307: curl reports the last answer it got): retry
                assert code in (0, 307, 503), body
                assert time.monotonic() < deadline, f"write k{k} never acknowledged"
                time.sleep(0.05)
        second = leader()
        assert second is not None and second != first
        start(first)  # a restart: from its log on disk, then a snapshot or the log
        for i in (1, 2, 3):
            wait_for(lambda i=i: all(curl(f"{url[i]}/kv/{key}?stale=1") == (200, value)
                                 for key, value in list(acked.items())[-20:]),
                     f"node {i} to catch up")
            for key, value in acked.items():
                assert curl(f"{url[i]}/kv/{key}?stale=1") == (200, value), (i, key)
    finally:
        procs.stop_all()


def test_sharded_kv_example_keeps_every_write_across_a_kill_and_restart(tmp_path):
    """--shards 4: four Raft groups in one RaftHost per process on one SharedWAL. Writes
    to keys of every shard through any node (307 to the shard's leader), one process
    killed (-9) in the middle and restarted: every acknowledged write on every node."""
    url, procs, start = kv_nodes(tmp_path, "--shards", "4")

    def leaders(i):
        code, body = curl(f"{url[i]}/status")
        return [s["leader_id"] for s in json.loads(body)["shards"]] if code == 200 else []
    try:
        for i in (1, 2, 3):
            start(i)
        wait_for(lambda: all(len(leaders(i)) == 4 and None not in leaders(i)
                             for i in (1, 2, 3)), "every shard to have a leader")
        acked = {}
        for k in range(60):
            if k == 20:
                procs.kill(1)
            deadline = time.monotonic() + 30
            while True:
                target = [i for i in (1, 2, 3) if i in procs.procs][k % len(procs.procs)]
                code, body = curl("-L", "-X", "PUT", "--data-binary", f"v{k}",
                                  f"{url[target]}/kv/k{k}")
                if code == 200:
                    acked[f"k{k}"] = f"v{k}"
                    break
                assert code in (0, 307, 503), body  # no leader yet, or the dead one's
                assert time.monotonic() < deadline, f"write k{k} never acknowledged"
                time.sleep(0.05)
        start(1)  # a restart: every shard from the SharedWAL
        for i in (1, 2, 3):
            wait_for(lambda i=i: all(curl(f"{url[i]}/kv/{key}?stale=1") == (200, value)
                                     for key, value in acked.items()),
                     f"node {i} to hold every write")
        assert curl(f"{url[2]}/kv/k7") == (200, "v7")  # linearizable, through the leader
        # the keys went to every shard (a few entries per shard are elections' no-ops)
        shards = json.loads(curl(f"{url[2]}/status")[1])["shards"]
        assert all(s["applied_index"] >= 8 for s in shards), shards
    finally:
        procs.stop_all()


def test_stream_example_every_record_once_in_order_across_a_leader_kill(tmp_path):
    ports = free_ports(6)  # one call: two calls may hand out the same port twice
    raft, client = ports[:3], ports[3:]
    r = ",".join(f"{i}=127.0.0.1:{raft[i - 1]}" for i in (1, 2, 3))
    c = ",".join(f"{i}=127.0.0.1:{client[i - 1]}" for i in (1, 2, 3))
    addresses = ",".join(f"127.0.0.1:{p}" for p in client)
    procs = Processes(str(tmp_path))

    def start(i):
        procs.start(f"node-{i}", [sys.executable, "-m", "fastraft", "node", "--id", str(i),
                                  "--init", "--cluster", r, "--client",
                                  f"127.0.0.1:{client[i - 1]}", "--clients", c,
                                  "--data-dir", str(tmp_path / "data" / str(i)),
                                  "--log-retention-entries", "1000000",
                                  "--snapshot-interval", "100"], cwd=STREAM)

    def leader():
        for i in (1, 2, 3):
            if f"node-{i}" not in procs.procs:
                continue
            done = subprocess.run([sys.executable, "-m", "fastraft", "status", "--address",
                                   f"127.0.0.1:{client[i - 1]}"], capture_output=True,
                                  text=True, timeout=30)
            if done.returncode == 0 and json.loads(done.stdout)["role"] == "leader":
                return i
        return None

    def consume(*more):
        return subprocess.run([sys.executable, "consumer.py", "--address", addresses,
                               "--state", str(tmp_path / "consumer.json"),
                               "--output", str(tmp_path / "consumed.txt"), *more],
                              cwd=STREAM, capture_output=True, text=True, timeout=120)

    output = tmp_path / "consumed.txt"
    try:
        for i in (1, 2, 3):
            start(i)
        wait_for(lambda: leader() is not None, "leader")
        first = leader()
        procs.start("producer", [sys.executable, "producer.py", "--address", addresses,
                                 "--name", "orders", "--count", "300"], cwd=STREAM)
        producer_log = tmp_path / "producer.log"
        wait_for(lambda: producer_log.exists() and
                 producer_log.read_text().count("\n") >= 100, "100 records produced")
        procs.kill(f"node-{first}")  # the leader, while the producer writes
        done = consume("--stop-after", "120")  # a consumer that stops part way
        assert done.returncode == 0, done.stderr
        assert len(output.read_text().splitlines()) == 120
        wait_for(lambda: procs.procs["producer"].poll() is not None, "the producer",
                 timeout=90)
        assert procs.procs["producer"].returncode == 0, producer_log.read_text()
        start(first)
        done = consume("--idle-exit", "2")  # restarted: continues where it stopped
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("180 records from offset "), done.stdout
        assert not done.stdout.startswith("180 records from offset 1;")
    finally:
        procs.stop_all()
    lines = output.read_text().splitlines()
    assert lines == [f"orders {k} orders record {k}" for k in range(300)]
