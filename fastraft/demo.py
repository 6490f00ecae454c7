"""``fastraft demo``: a real cluster of local processes, a leader crash, and the proof.

Starts N ``fastraft node`` processes on 127.0.0.1, writes with many requests in flight while
reading back through linearizable reads, kills the leader with SIGKILL, measures how long
until writes succeed again, restarts the killed node, and finally reads back every
acknowledged write. Every process it started is stopped before it returns.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from typing import Any

from fastraft.asyncutil import run_loop, wait_within
from fastraft.kvclient import ClientError, KVClient, find_leader
from fastraft.processes import ProcessCluster


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.acked: dict[str, int] = {}
        self.reads = 0
        self.stale_reads = 0
        self.errors = 0


async def _statuses(clients: dict[int, KVClient]) -> dict[int, dict[str, Any]]:
    out = {}
    for i, c in list(clients.items()):
        try:
            out[i] = await wait_within(c.status(), 1.0)
        except (ConnectionError, ClientError, asyncio.TimeoutError):
            pass
    return out


def _bar(fraction: float, width: int = 24) -> str:
    full = int(fraction * width)
    return "[" + "#" * full + "." * (width - full) + "]"


async def _demo(args: argparse.Namespace, cluster: ProcessCluster) -> int:
    out = sys.stdout
    tty = out.isatty()
    n = len(cluster.ids)
    print(f"fastraft demo: {n} nodes on 127.0.0.1, {args.inflight} writes in flight, "
          f"{'FileStorage in ' + args.data_dir if args.data_dir else 'memory storage'}")
    cluster.start_all()
    clients = await cluster.connect_all()
    t0 = time.monotonic()
    leader = await find_leader(clients, 30)
    print(f"  leader elected: node {leader} after {time.monotonic() - t0:.2f}s "
          f"(pids {', '.join(str(p.pid) for p in cluster.procs.values())})")
    found = (await _statuses({leader: clients[leader]}))[leader]
    if found["kv_keys"]:
        await clients[leader].request("get", "")  # a read barrier: the leader is caught up
        found = (await _statuses({leader: clients[leader]}))[leader]
        print(f"  recovered from {args.data_dir}: {found['kv_keys']:,} keys, "
              f"commit index {found['commit_index']:,}")

    stats = _Stats()
    state: dict[str, Any] = {"leader": leader, "phase": "before crash",
                             "unavailable_since": None, "failover": None}
    stop_at = time.monotonic() + args.seconds
    run_tag = f"{int(time.time() * 1000) % 10**9:09d}"  # keys of earlier runs stay apart
    counter = iter(range(10**9))

    async def writer() -> None:
        while time.monotonic() < stop_at:
            key = f"{run_tag}-{next(counter)}"
            client = clients.get(state["leader"])
            if client is None or client.closed:
                await asyncio.sleep(0.01)
                continue
            t = time.perf_counter()
            issued = time.monotonic()
            try:
                version = await wait_within(client.put(key, b"v-" + key.encode()), 2.0)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                stats.errors += 1
                await asyncio.sleep(0.01)
                continue
            stats.latencies.append(time.perf_counter() - t)
            stats.acked[key] = version
            down = state["unavailable_since"]
            # only a write issued after the crash proves a new leader took over
            if down is not None and issued > down and state["failover"] is None:
                state["failover"] = time.monotonic() - down

    async def reader() -> None:
        # A linearizable read, from a random node, of a write already acknowledged.
        while time.monotonic() < stop_at:
            await asyncio.sleep(0.01)
            if not stats.acked:
                continue
            key = next(reversed(stats.acked))
            version = stats.acked[key]
            i = random.choice([i for i, c in clients.items() if not c.closed])
            try:
                resp = await wait_within(clients[i].request("get", key), 2.0)
            except (ClientError, ConnectionError, asyncio.TimeoutError):
                continue
            stats.reads += 1
            if resp.value != b"v-" + key.encode() or resp.version < version:
                stats.stale_reads += 1

    printed_eighth = -1  # without a terminal, a line per eighth of the run

    async def watcher() -> None:
        nonlocal printed_eighth
        while time.monotonic() < stop_at:
            await asyncio.sleep(0.25)
            statuses = await _statuses(clients)
            for i, s in statuses.items():
                if s["role"] == "leader" and i != state["leader"] and i in clients:
                    state["leader"] = i
            commits = " ".join(f"{i}:{s['commit_index']}" for i, s in sorted(statuses.items()))
            lead = statuses.get(state["leader"], {})
            done = 1 - max(0.0, stop_at - time.monotonic()) / args.seconds
            line = (f"  {_bar(done)} {len(stats.acked):>8,} writes  leader {state['leader']} "
                    f"term {lead.get('term', '?')}  commit {commits}  ({state['phase']})")
            if tty:
                out.write("\r" + line.ljust(110))
                out.flush()
            elif int(done * 8) != printed_eighth:
                printed_eighth = int(done * 8)
                print(line)

    async def chaos() -> None:
        await asyncio.sleep(args.seconds / 2)
        victim = state["leader"] = await find_leader(clients, 30)  # the leader right now
        state["phase"] = f"killed leader {victim}"
        clients.pop(victim).close()
        state["unavailable_since"] = time.monotonic()
        cluster.kill(victim)
        state["leader"] = await find_leader(clients, 30)
        state["victim"] = victim
        await asyncio.sleep(max(0.0, (stop_at - time.monotonic()) / 3))
        state["phase"] = f"restarted node {victim}"
        cluster.start(victim)
        clients[victim] = await cluster.connect(victim)

    started = time.monotonic()
    await asyncio.gather(watcher(), chaos(), *[reader() for _ in range(4)],
                         *[writer() for _ in range(args.inflight)])
    elapsed = time.monotonic() - started
    if tty:
        print()

    # Every acknowledged write must be readable, linearizably, from the new leader.
    leader = await find_leader(clients, 30)
    client = clients[leader]
    keys = list(stats.acked)
    missing = 0
    for start in range(0, len(keys), 2048):
        chunk = keys[start:start + 2048]
        values = await asyncio.gather(*[client.get(k) for k in chunk])
        missing += sum(1 for k, v in zip(chunk, values) if v != b"v-" + k.encode())
    # The restarted node catches up with the leader.
    victim = state.get("victim")
    caught_up = None
    if victim is not None and victim in clients:
        target = (await clients[leader].status())["commit_index"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s = (await _statuses({victim: clients[victim]})).get(victim)
            if s and s["applied_index"] >= target:
                caught_up = s["applied_index"]
                break
            await asyncio.sleep(0.05)

    lat = sorted(stats.latencies)

    def pct(p: float) -> str:
        return f"{lat[min(len(lat) - 1, int(p * len(lat)))] * 1000:.2f} ms" if lat else "-"

    print(f"\n  writes acknowledged : {len(keys):,} in {elapsed:.1f}s "
          f"({len(keys) / elapsed:,.0f}/s through the client port)")
    print(f"  write latency       : p50 {pct(0.5)}  p90 {pct(0.9)}  p99 {pct(0.99)}  "
          f"p99.9 {pct(0.999)}")
    fo = state["failover"]
    print(f"  leader failover     : node {state.get('victim')} killed with SIGKILL; writes "
          f"resumed on node {leader} after {fo * 1000:.0f} ms" if fo is not None
          else "  leader failover     : writes did not resume")
    print(f"  linearizable reads  : {stats.reads:,} checked, {stats.stale_reads} stale")
    print(f"  acknowledged lost   : {missing} of {len(keys):,} (read back from the new leader)")
    print("  restarted node      : " + (f"node {victim} caught up to index {caught_up}"
                                        if caught_up else "did not catch up"))
    ok = missing == 0 and stats.stale_reads == 0 and fo is not None and caught_up is not None
    print("  result              : " + ("OK: nothing acknowledged was lost" if ok else "FAILED"))
    for c in clients.values():
        c.close()
    return 0 if ok else 1


def run_demo(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        print("fastraft demo needs --nodes >= 3 to survive a leader crash", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="fastraft-demo-")
    cluster = ProcessCluster(args.nodes, workdir, args.data_dir)
    try:
        code = run_loop(_demo(args, cluster))
    except (TimeoutError, asyncio.TimeoutError, OSError) as exc:  # two classes before 3.11
        print(f"\nfastraft demo failed: {exc}; node logs are in {workdir}", file=sys.stderr)
        return 1
    finally:
        cluster.stop_all()
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"  node logs kept in {workdir}")
    return code
