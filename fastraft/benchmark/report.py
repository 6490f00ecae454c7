"""The ``fastraft bench`` command: every row, its median of ``--repeat`` runs, the
summary ratios, the JSON file and the plot."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from fastraft.asyncutil import run_loop
from fastraft.benchmark.ceiling import pump
from fastraft.benchmark.clusters import host_cluster, inprocess, node_cluster


def _run_inprocess(writers: int, seconds: float) -> dict[str, Any]:
    return run_loop(inprocess(writers, seconds))


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["writes_per_s"] for r in runs]
    best = sorted(runs, key=lambda r: r["writes_per_s"])[len(runs) // 2]
    out = dict(best)
    out["writes_per_s"] = statistics.median(rates)
    out["runs"] = rates
    out["spread_pct"] = (max(rates) - min(rates)) / statistics.median(rates) * 100 \
        if statistics.median(rates) else 0.0
    return out


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.3f}"
    return f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastraft bench")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--json", default="fastraft-bench.json", metavar="FILE",
                        help="where every figure is written (default: %(default)s)")
    parser.add_argument("--png", default="fastraft-bench.png", metavar="FILE",
                        help="where the plot is drawn, with matplotlib installed "
                             "(default: %(default)s)")
    parser.add_argument("--no-peer", action="store_true", help="skip PySyncObj")
    parser.add_argument("--sustained", type=float, default=0, metavar="SECONDS",
                        help="also run 1,024 in flight for SECONDS and "
                             "report the leader's memory at start and end")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="fastraft-bench-")
    results: list[dict[str, Any]] = []

    def measure(name: str, fn: Callable[[], dict[str, Any]], **info: Any) -> dict[str, Any]:
        runs = []
        for _ in range(args.repeat):
            runs.append(fn())
        r = {"name": name, **info, **_median(runs)}
        results.append(r)
        lost = sum(1 for x in runs if x.get("leadership_lost"))
        hosts = ("  CPU per host " + "/".join(f"{c:.0%}" for c in r["load_cpu"])
                 + f"; idle {_fmt(r['idle_messages_per_s'])} msgs/s "
                 f"{_fmt(r['idle_frames_per_s'])} frames/s, {r['idle_cpu']:.0%} of a "
                 f"core; RSS per host {max(r['rss_mib']):.0f} MiB"
                 if "idle_messages_per_s" in r else "")
        print(f"  {name:<58} {_fmt(r['writes_per_s']):>12}/s  p50 {_fmt(r.get('p50_ms'), 'ms')}"
              f" ms  p99 {_fmt(r.get('p99_ms'), 'ms')} ms  (spread {r['spread_pct']:.0f}%)"
              + hosts
              + (f"  [leadership lost in {lost} of {len(runs)} runs]" if lost else ""),
              flush=True)
        return r

    def fr(n: int, storage: str, in_flight: int, payload: int,
           batch: int = 1) -> dict[str, Any]:
        load = {"in_flight": in_flight, "payload": payload, "seconds": args.seconds,
                "batch": batch}
        sub = os.path.join(workdir, f"run-{time.monotonic_ns()}")
        os.makedirs(sub)
        try:
            return node_cluster(n, ["bench-node", "--storage", storage], load, sub)
        finally:
            shutil.rmtree(sub, ignore_errors=True)

    def groups_run(storage: str, groups: int) -> dict[str, Any]:
        load = {"groups": groups, "in_flight": 1024, "payload": 100, "seconds": args.seconds}
        sub = os.path.join(workdir, f"run-{time.monotonic_ns()}")
        os.makedirs(sub)
        try:
            return host_cluster(3, storage, load, sub)
        finally:
            shutil.rmtree(sub, ignore_errors=True)

    try:
        from fastraft import kernels
        print(f"fastraft bench: kernels.COMPILED={kernels.COMPILED}, {os.cpu_count()} cores, "
              f"{args.seconds}s per run, median of {args.repeat}")
        in_flights = [1, 1024] if args.quick else [1, 16, 128, 1024]
        for inf in in_flights:
            measure(f"fastraft 3 procs memory 100B inflight={inf}",
                    partial(fr, 3, "memory", inf, 100), system="fastraft",
                    storage="memory", in_flight=inf, payload=100, nodes=3)
        for inf in (1, 1024):
            measure(f"fastraft 3 procs FileStorage+fsync 100B inflight={inf}",
                    partial(fr, 3, "file", inf, 100), system="fastraft",
                    storage="file", in_flight=inf, payload=100, nodes=3)
        measure("fastraft 3 procs memory propose_batch(64) 100B inflight=16",
                lambda: fr(3, "memory", 16, 100, batch=64), system="fastraft",
                storage="memory", in_flight=16 * 64, payload=100, nodes=3, batch=64)
        # multi-Raft: RaftHost processes, 1,024 in flight spread over the groups
        for storage, group_counts in (("memory", (1, 16, 64) if args.quick else
                                       (1, 16, 64, 1024)), ("file", (1, 16, 64))):
            label = "memory" if storage == "memory" else "SharedWAL+fsync"
            for groups in group_counts:
                measure(f"fastraft 3 hosts {label} 100B inflight=1024 groups={groups}",
                        partial(groups_run, storage, groups), system="fastraft-groups",
                        storage=storage, in_flight=1024, payload=100, nodes=3, groups=groups)
        if not args.quick:
            measure("fastraft 3 procs memory 10KiB inflight=1024",
                    lambda: fr(3, "memory", 1024, 10240), system="fastraft",
                    storage="memory", in_flight=1024, payload=10240, nodes=3)
            measure("fastraft 5 procs memory 100B inflight=1024",
                    lambda: fr(5, "memory", 1024, 100), system="fastraft",
                    storage="memory", in_flight=1024, payload=100, nodes=5)
            for w in (1, 64, 256):
                measure(f"fastraft in-process 3 nodes, empty, writers={w}",
                        partial(_run_inprocess, w, args.seconds),
                        system="fastraft-inprocess", in_flight=w, payload=0, nodes=3)
        if not args.no_peer:
            try:
                import pysyncobj  # noqa: F401
            except ImportError:
                print("  (PySyncObj not installed: pip install 'fastraft[bench]' to compare)")
            else:
                for inf in in_flights:
                    load = {"in_flight": inf, "payload": 100, "seconds": args.seconds}
                    measure(f"PySyncObj 3 procs defaults 100B inflight={inf}",
                            partial(node_cluster, 3, ["pysyncobj-node"], load, workdir),
                            system="pysyncobj", in_flight=inf, payload=100, nodes=3)
                load = {"in_flight": 1, "payload": 100, "seconds": args.seconds,
                        "batching_off": True}
                measure("PySyncObj 3 procs batching off 100B inflight=1",
                        lambda: node_cluster(3, ["pysyncobj-node"], dict(load), workdir),
                        system="pysyncobj-nobatch", in_flight=1, payload=100, nodes=3)
        if args.sustained:
            load = {"in_flight": 1024, "payload": 100, "seconds": args.sustained}
            sub = os.path.join(workdir, "sustained")
            os.makedirs(sub)
            r = node_cluster(3, ["bench-node", "--storage", "memory"], load, sub,
                         timeout=args.sustained + 120)
            r.update(name=f"fastraft sustained {args.sustained:.0f}s memory 100B inflight=1024",
                     system="fastraft-sustained", in_flight=1024, payload=100, nodes=3,
                     runs=[r["writes_per_s"]], spread_pct=0.0)
            results.append(r)
            print(f"  {r['name']:<58} {_fmt(r['writes_per_s']):>12}/s  leader RSS "
                  f"{r['rss_start_mib']:.0f} MiB -> {r['rss_end_mib']:.0f} MiB", flush=True)
        for fsync in (False, True):
            measure(f"ceiling: raw uvloop pump 100B inflight=1024 fsync={fsync}",
                    partial(pump, 1024, 100, args.seconds, fsync, workdir),
                    system="pump-fsync" if fsync else "pump", in_flight=1024, payload=100,
                    nodes=3)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    with open(args.json, "w") as f:
        json.dump({"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
                   "results": results}, f, indent=2)
    print(f"\nwrote {args.json}")
    _summary(results)
    _plot(results, args.png)
    return 0


def _summary(results: list[dict[str, Any]]) -> None:
    by = {r["name"]: r for r in results}

    def rate(prefix: str) -> float | None:
        return next((r["writes_per_s"] for n, r in by.items() if n.startswith(prefix)), None)
    fast = rate("fastraft 3 procs memory 100B inflight=1024")
    peer_best = max((r["writes_per_s"] for r in results if r["system"] == "pysyncobj"),
                    default=None)
    raw = rate("ceiling: raw uvloop pump 100B inflight=1024 fsync=False")
    fast_fsync = rate("fastraft 3 procs FileStorage+fsync 100B inflight=1024")
    raw_fsync = rate("ceiling: raw uvloop pump 100B inflight=1024 fsync=True")
    if fast and peer_best:
        print(f"fastraft / PySyncObj's best (1,024 in flight, memory): {fast / peer_best:.1f}x")
    if fast and raw:
        print(f"fastraft / raw pump ceiling (memory): {fast / raw:.1%}")
    if fast_fsync and raw_fsync:
        print(f"fastraft / raw pump ceiling (fsync):  {fast_fsync / raw_fsync:.1%}")


def _plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'fastraft[bench]')")
        return
    fig, (ax, cdf) = plt.subplots(1, 2, figsize=(13, 4.5))
    for system, label in (("fastraft", "fastraft (memory, 100 B)"),
                          ("pysyncobj", "PySyncObj 0.3.x defaults (100 B)")):
        pts = sorted((r["in_flight"], r["writes_per_s"]) for r in results
                     if r["system"] == system and r.get("storage", "memory") == "memory"
                     and r.get("payload") == 100 and r.get("nodes") == 3
                     and r.get("batch", 1) == 1)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("writes in flight")
    ax.set_ylabel("committed writes / s")
    ax.set_title("3 processes on 127.0.0.1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    for r in results:
        if r.get("in_flight") == 1 and r.get("cdf_ms") and r.get("nodes") == 3:
            cdf.plot([p[1] for p in r["cdf_ms"]], [p[0] for p in r["cdf_ms"]],
                     label=r["name"].replace(" 100B inflight=1", ""))
    cdf.set_xscale("log")
    cdf.set_xlabel("write latency, ms (one write in flight)")
    cdf.set_ylabel("fraction of writes")
    cdf.set_title("latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


