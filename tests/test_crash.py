"""kill -9 a node on FileStorage at random points: acknowledged writes survive.

Bounded: FASTRAFT_CRASH_ROUNDS rounds (default 3 here; the closing note of the storage
issue records 20+ local rounds), each a few hundred writes and one SIGKILL.
"""
import asyncio
import os
import random

import pytest

from fastraft.kvclient import ClientError, find_leader
from fastraft.processes import ProcessCluster

from aio import put_retrying, run, until_applied, until_knows_leader

ROUNDS = int(os.environ.get("FASTRAFT_CRASH_ROUNDS", "3"))


async def write_until_killed(client, acked, sent, prefix, kill, inflight=32):
    """Writers put prefix-N keys in order; ``kill`` fires at a random moment, and the
    writers stop then (at once if it cut their connection)."""
    counter = iter(range(10**9))
    killed = False

    async def writer():
        while not killed:
            n = next(counter)
            key = f"{prefix}{n:08d}"
            sent.append(key)
            try:
                acked[key] = await client.put(key, key.encode())
            except (ClientError, ConnectionError):
                return

    tasks = [asyncio.ensure_future(writer()) for _ in range(inflight)]
    await asyncio.sleep(random.uniform(0.05, 0.4))
    kill()
    killed = True
    await asyncio.gather(*tasks)


async def check_survivors(client, acked, sent):
    found = {}
    for start in range(0, len(sent), 1024):
        chunk = sent[start:start + 1024]
        for key, resp in zip(chunk, await asyncio.gather(
                *[client.request("get", key) for key in chunk])):
            if resp.value is not None:
                assert resp.value == key.encode()
                found[key] = resp.version
    for key, version in acked.items():
        assert found.get(key) == version, f"acknowledged {key} lost"
    # unacknowledged writes may or may not be there, but never out of order:
    # keys sent later on the same connection hold later log indexes
    versions = [found[key] for key in sent if key in found]
    assert versions == sorted(versions)


@pytest.mark.parametrize("snapshots", [False, True], ids=["log", "snapshotting"])
@pytest.mark.parametrize("round_", range(ROUNDS))
@run
async def test_single_node_kill_9_keeps_acknowledged_writes(tmp_path, round_, snapshots):
    """With ``snapshotting``, a snapshot is streamed to disk every 50 entries, so the kill
    lands in the middle of snapshot saves and compactions too."""
    random.seed(round_)
    extra = ["--snapshot-interval", "50"] if snapshots else []
    cluster = ProcessCluster(1, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=extra)
    acked, sent = {}, []
    try:
        for life in range(2):
            cluster.start(1)
            client = await cluster.connect(1)
            await find_leader({1: client})
            await check_survivors(client, acked, sent)
            await write_until_killed(client, acked, sent, f"r{life}-",
                                     lambda: cluster.kill(1))
            client.close()
        assert len(acked) > 10
        cluster.start(1)
        client = await cluster.connect(1)
        await find_leader({1: client})
        await check_survivors(client, acked, sent)
        client.close()
    finally:
        cluster.stop_all()


@pytest.mark.parametrize("snapshots", [False, True], ids=["log", "snapshotting"])
@run
async def test_whole_cluster_killed_together_keeps_the_committed_prefix(tmp_path, snapshots):
    extra = ["--snapshot-interval", "50"] if snapshots else []
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=extra)
    acked, sent = {}, []
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)

        def kill_all():
            for i in cluster.ids:
                cluster.kill(i)
        await write_until_killed(clients[leader], acked, sent, "c-", kill_all)
        for c in clients.values():
            c.close()
        assert len(acked) > 10
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        await check_survivors(clients[leader], acked, sent)
        # followers serve the same data through linearizable reads
        follower = next(i for i in cluster.ids if i != leader)
        await until_knows_leader(clients[follower], follower, leader)
        last = max(acked, key=acked.get)
        assert (await clients[follower].request("get", last)).version == acked[last]
        for c in clients.values():
            c.close()
    finally:
        cluster.stop_all()


@run
async def test_random_kills_in_a_snapshotting_cluster_keep_every_acknowledged_write(tmp_path):
    """Three FileStorage nodes snapshotting every 50 entries; each round kills a random
    node (the leader or not) while writes are in flight, keeps writing to whoever leads,
    then restarts it. Bounded: ROUNDS rounds. At the end every acknowledged write is on
    the leader, and every node has applied the same prefix and serves the same data."""
    rng = random.Random(7)
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--snapshot-interval", "50"])
    acked, sent = {}, []
    clients = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        for round_ in range(ROUNDS):
            leader = await find_leader(clients)
            victim = rng.choice(sorted(cluster.ids))
            await write_until_killed(clients[leader], acked, sent, f"k{round_}-",
                                     lambda victim=victim: cluster.kill(victim))
            clients.pop(victim).close()
            for n in range(100):  # written while the victim is down: it falls behind
                key = f"d{round_}-{n}"
                sent.append(key)
                acked[key] = await put_retrying(clients, key)
            cluster.start(victim)
            clients[victim] = await cluster.connect(victim)
        leader = await find_leader(clients)
        await check_survivors(clients[leader], acked, sent)
        target = (await clients[leader].status())["commit_index"]
        await until_applied(list(clients.values()), target)
        last = max(acked, key=acked.get)
        for i, c in clients.items():
            assert (await c.request("get", last)).version == acked[last], f"node {i}"
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()
