"""A real cluster: ``fastraft node`` processes on 127.0.0.1 over TcpNetwork."""
import asyncio
import subprocess
import sys
import time

import pytest

from fastraft.kvservice import ClientError, KVClient
from fastraft.testing.processes import ProcessCluster

from aio import run


@pytest.fixture
def cluster(tmp_path):
    c = ProcessCluster(3, str(tmp_path))
    c.start_all()
    yield c
    c.stop_all()


async def connect_all(cluster):
    clients = {}
    deadline = time.monotonic() + 30
    for i in cluster.ids:
        while True:
            try:
                clients[i] = await KVClient.connect(cluster.client[i], timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    return clients


async def leader_of(clients, exclude=()):
    found = {}

    async def probe():
        for i, c in clients.items():
            if i in exclude or c.closed:
                continue
            try:
                s = await asyncio.wait_for(c.status(), 1)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                continue
            if s["role"] == "leader":
                found["id"] = i
                return True
        return False

    deadline = time.monotonic() + 30
    while not await probe():
        assert time.monotonic() < deadline, "no leader elected"
    return found["id"]


@run
async def test_process_cluster_failover_restart_and_linearizable_reads(cluster):
    clients = await connect_all(cluster)
    leader = await leader_of(clients)
    acked = {}
    for k in range(200):
        acked[f"a{k}"] = await clients[leader].put(f"a{k}", b"A%d" % k)
    # a write from a follower is redirected to the leader
    follower = next(i for i in cluster.ids if i != leader)
    with pytest.raises(ClientError) as info:
        await clients[follower].put("x", b"y")
    assert info.value.error == "not_leader" and info.value.leader == leader

    cluster.kill(leader)
    clients.pop(leader).close()
    new = await leader_of(clients)
    assert new != leader
    for k in range(200):
        acked[f"b{k}"] = await clients[new].put(f"b{k}", b"B%d" % k)
    # reads from any node (a follower forwards to the leader) see every acknowledged write
    for i, c in clients.items():
        for key in ("a199", "b199", "a0"):
            resp = await c.request("get", key)
            assert resp.version == acked[key] and resp.value[:1] == key[:1].upper().encode()

    cluster.start(leader)  # restart the crashed node: it catches up from the leader
    clients.update({leader: (await connect_all_one(cluster, leader))})
    target = (await clients[new].status())["commit_index"]

    async def caught_up():
        while (await clients[leader].status())["applied_index"] < target:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(caught_up(), 30)
    assert (await clients[leader].request("get", "b199")).version == acked["b199"]
    for c in clients.values():
        c.close()


async def connect_all_one(cluster, i):
    deadline = time.monotonic() + 30
    while True:
        try:
            return await KVClient.connect(cluster.client[i], timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_status_command_prints_a_nodes_status(cluster):
    async def wait_leader():
        clients = await connect_all(cluster)
        leader = await leader_of(clients)
        for c in clients.values():
            c.close()
        return leader
    leader = asyncio.run(wait_leader())
    out = subprocess.run([sys.executable, "-m", "fastraft", "status", "--address",
                          cluster.client[leader]], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"role": "leader"' in out.stdout and f'"leader_id": {leader}' in out.stdout


def test_demo_runs_and_loses_nothing():
    out = subprocess.run([sys.executable, "-m", "fastraft", "demo", "--seconds", "3",
                          "--inflight", "64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "acknowledged lost   : 0 of" in out.stdout
    assert "OK: nothing acknowledged was lost" in out.stdout
