"""Memory as a tested promise: a node's memory does not grow with its log.

A scaled-down run of the issue-12 benchmark (``python bench/log_memory.py`` runs the full
one): three ``fastraft node`` processes on FileStorage, 10 KiB writes to 100 keys (the
KV state stays about 1 MiB), a snapshot every 5,000 entries with 5,000 kept behind it,
so each node's log holds 5,000 to 10,000 entries (50 to 100 MiB of payload). With the
whole log in memory, as before, each node's peak RSS was 147 to 205 MiB; with the log on
disk and an 8 MiB cache, about 60 MiB.
"""
import asyncio
import os

import pytest

from fastraft.kvclient import KVClient, find_leader
from fastraft.processes import ProcessCluster, memory_mib

from aio import run, until_applied

WRITES = int(os.environ.get("FASTRAFT_MEMORY_WRITES", "20000"))
VALUE = b"m" * 10240
BOUND_MIB = 100


async def write_all(client: KVClient, n: int, window: int = 256) -> int:
    last = 0
    sem = asyncio.Semaphore(window)

    async def one(k: int) -> None:
        nonlocal last
        async with sem:
            last = max(last, await client.put(f"key{k % 100}", VALUE))
    await asyncio.gather(*(one(k) for k in range(n)))
    return last


@pytest.mark.alone
@run
async def test_node_memory_stays_bounded_whatever_the_log_length(tmp_path):
    # 200 MiB of fsynced writes keep a slow machine's two cores busy for long stretches:
    # an election timeout well above such a stall keeps one leader (CI lost it once at
    # the default 150 ms), and the test is about memory, not elections.
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--snapshot-interval", "5000",
                                         "--log-cache-mib", "8",
                                         "--election-timeout", "1"])
    cluster.start_all()
    try:
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        last = await write_all(clients[leader], WRITES)
        await until_applied(list(clients.values()), last, timeout=60)
        status = await clients[leader].status()
        assert status["snapshot_index"] > 0  # snapshots happened and the log was compacted
        peaks = {i: memory_mib(p.pid, "VmHWM") for i, p in cluster.procs.items()}
        assert all(v < BOUND_MIB for v in peaks.values()), peaks
        for c in clients.values():
            c.close()
    finally:
        cluster.stop_all()
