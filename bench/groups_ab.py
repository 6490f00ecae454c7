"""Side-by-side (A/B) of the multi-group rows of two checkouts, interleaved.

    python bench/groups_ab.py --a /path/to/old/checkout --b . --storage file 1 16 64

Each round runs 3 ``RaftHost`` processes (``fastraft.benchmark.clusters.host_cluster``: 1,024
writes in flight over the groups, 100-byte writes, 3 s) for every group count, on A and
then on B; a checkout is used through ``PYTHONPATH`` (build its extension in place
first), so both run on the same interpreter. Prints each run, then the medians and B/A.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r"""
import json, shutil, sys, tempfile
try:
    from fastraft.benchmark.clusters import host_cluster
except ImportError:  # a checkout from before the benchmark package (2026-12-01)
    from fastraft.benchmark import _host_cluster as host_cluster
storage, groups, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
workdir = tempfile.mkdtemp(prefix="fastraft-groups-ab-")
try:
    r = host_cluster(3, storage, {"groups": groups, "in_flight": 1024,
                                  "payload": 100, "seconds": seconds}, workdir)
finally:
    shutil.rmtree(workdir, ignore_errors=True)
print(json.dumps({k: r.get(k) for k in ("writes_per_s", "p50_ms", "p99_ms")}))
"""


def run(checkout: str, storage: str, groups: int, seconds: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    done = subprocess.run([sys.executable, "-c", RUN, storage, str(groups), str(seconds)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{checkout}: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout A (before)")
    p.add_argument("--b", default=".", help="checkout B (after)")
    p.add_argument("--storage", default="memory", choices=("memory", "file"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("groups", type=int, nargs="+")
    args = p.parse_args()
    rates: dict[tuple[int, str], list[float]] = {}
    for k in range(args.rounds):
        for groups in args.groups:
            order = (("A", args.a), ("B", args.b)) if k % 2 == 0 else \
                (("B", args.b), ("A", args.a))
            for name, checkout in order:
                r = run(checkout, args.storage, groups, args.seconds)
                rates.setdefault((groups, name), []).append(r["writes_per_s"])
                print(f"round {k + 1} groups={groups} {name}: {r['writes_per_s']:,.0f}/s "
                      f"p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms", flush=True)
    print(f"\nmedians ({args.storage}, B/A):")
    for groups in args.groups:
        a = statistics.median(rates[groups, "A"])
        b = statistics.median(rates[groups, "B"])
        print(f"  groups={groups:<5} A {a:>10,.0f}/s | B {b:>10,.0f}/s | B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
