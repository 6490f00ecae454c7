"""Benchmark clusters: the processes of ``nodes`` (or PySyncObj's) started on loopback
ports, stopped by pid once they reported, their reports merged; and three nodes in one
process (openraft's "minimal" method)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from fastraft.benchmark.load import Latencies, percentiles, run_load
from fastraft.processes import free_ports
from fastraft.statemachine import NullStateMachine

# FASTRAFT_BENCH_ENTRY=wrapper.py runs every node through a wrapper script (one that turns
# on cProfile, say) instead of ``python -m fastraft.benchmark``: one that calls
# ``fastraft.benchmark.__main__.main()`` when done.
_ENTRY = ([os.environ["FASTRAFT_BENCH_ENTRY"]] if os.environ.get("FASTRAFT_BENCH_ENTRY")
          else ["-m", "fastraft.benchmark"])


def _loopback_cluster(n: int) -> str:
    """A ``--cluster`` of ``n`` nodes on free ports of 127.0.0.1."""
    ports = free_ports(n)
    return ",".join(f"{i}=127.0.0.1:{ports[i - 1]}" for i in range(1, n + 1))


def _kill(procs: list[subprocess.Popen[str]]) -> None:
    """End the processes this run started (by pid), those still running by SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def node_cluster(n: int, module_args: list[str], load: dict[str, Any], workdir: str,
                 timeout: float = 120) -> dict[str, Any]:
    """Start n processes of ``python -m fastraft.benchmark <module_args>``; return the one
    JSON line the leader prints."""
    spec = _loopback_cluster(n)
    procs = []
    try:
        for i in range(1, n + 1):
            cmd = [sys.executable, *_ENTRY, *module_args, "--id", str(i),
                   "--cluster", spec, "--load", json.dumps(load), "--data-dir", workdir]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    out = p.stdout.read().strip().splitlines() if p.stdout else []
                    if out:
                        result: dict[str, Any] = json.loads(out[-1])
                        return result
            if all(p.poll() is not None for p in procs):
                raise RuntimeError("every node exited without a result")
            time.sleep(0.05)
        raise TimeoutError("no leader reported a result")
    finally:
        _kill(procs)


def host_cluster(n: int, storage: str, load: dict[str, Any], workdir: str,
                 timeout: float = 180) -> dict[str, Any]:
    """``n`` bench-host processes; their results merged: writes summed, latencies of
    every write (one histogram), RSS and idle messages per host."""
    spec = _loopback_cluster(n)
    # time to create the groups and elect their leaders (slower when created in batches)
    per_s = 50 if load.get("create_batch") else 100
    load = dict(load, start_at=time.time() + 4 + load["groups"] / per_s)
    procs = [subprocess.Popen([sys.executable, *_ENTRY, "bench-host", "--storage", storage,
                               "--id", str(i), "--cluster", spec, "--load", json.dumps(load),
                               "--data-dir", workdir],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(1, n + 1)]
    # each host prints one line and serves on: read every line, then stop them all
    pool = ThreadPoolExecutor(n)
    try:
        reports = [pool.submit(p.stdout.readline) for p in procs]  # type: ignore[union-attr]
        done, _ = wait(reports, timeout)
    finally:
        _kill(procs)
        pool.shutdown()
    outs = [r.result() if r in done else "" for r in reports]
    hosts = [json.loads(o) for o in outs if o.strip()]
    if len(hosts) != n:
        raise RuntimeError(f"{n - len(hosts)} of {n} hosts reported nothing")
    lat = Latencies()
    for h in hosts:
        for us, c in h.pop("latencies_us").items():
            lat.counts[int(us)] += c
    writes = sum(h["writes"] for h in hosts)
    lost = [x for h in hosts for x in h["lost"]]
    return {"writes": writes, "seconds": load["seconds"],
            "writes_per_s": writes / load["seconds"], **percentiles(lat),
            "idle_messages_per_s": sum(h["idle_messages_per_s"] for h in hosts),
            "idle_frames_per_s": sum(h["idle_frames_per_s"] for h in hosts),
            "quiet_groups": sum(h["quiet"] for h in hosts) / n,
            # the busiest host's share of a core while idle
            "idle_cpu": max(h["idle_cpu"] for h in hosts),
            "rss_mib": [h["rss_mib"] for h in hosts],
            # each host's share of a core while the load was measured
            "load_cpu": [h["load_cpu"] for h in hosts],
            "balanced": all(h["balanced"] for h in hosts),
            "leaders": [h["led"] for h in hosts],
            **({"leadership_lost": lost[0]} if lost else {})}


async def inprocess(writers: int, seconds: float) -> dict[str, Any]:
    """openraft's "minimal" method: 3 nodes in one process, memory network and storage,
    empty payloads."""
    from fastraft.config import Config
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage
    from fastraft.transport.memory import MemoryHub

    cfg = Config(max_pending_proposals=1 << 20)
    hub = MemoryHub()
    members = {i: f"local:{i}" for i in (1, 2, 3)}
    nodes = [RaftNode(i, storage=MemoryStorage(), network=hub.network(i),
                      state_machine=NullStateMachine(), config=cfg) for i in members]
    try:
        for node in nodes:
            await node.start()
        for node in nodes:
            await node.initialize(members)
        while not any(n.is_leader and n.engine.log.term_at(n.engine.commit_index)
                      == n.engine.term for n in nodes):
            await asyncio.sleep(0.01)
        leader = next(n for n in nodes if n.is_leader)
        return await run_load(leader, writers, 0, seconds)
    finally:
        for node in nodes:
            await node.stop()
