"""Side-by-side (A/B) measurement of two checkouts, interleaved, in one run.

    python bench/ab.py --a /path/to/old/checkout --b . [--rounds 3] [--seconds 3]

Each round runs every figure on A and on B (A first in odd rounds, B first in even
ones), so drift of the machine (another process, thermal state) hits both alike. A
checkout is used through ``PYTHONPATH`` (build its extension in place first: ``python
setup.py build_ext --inplace``, with ``setuptools>=77`` and ``Cython>=3.0`` installed,
CONTRIBUTING.md), so both run on the same interpreter and packages. Only
the stable command line of the benchmark nodes (``python -m fastraft.benchmark bench-node
...``) is used, so an old checkout works too.

The figures are the brief's bar: 1,024 in flight in memory and with fsync on every node,
one write in flight (p50), and ``propose_batch(64)`` with 16 batches in flight.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

FIGURES = {
    "memory inflight=1024": ("memory", {"in_flight": 1024, "payload": 100}),
    "fsync inflight=1024": ("file", {"in_flight": 1024, "payload": 100}),
    "memory inflight=1": ("memory", {"in_flight": 1, "payload": 100}),
    "memory propose_batch(64) x16": ("memory", {"in_flight": 16, "payload": 100, "batch": 64}),
}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_cluster(checkout: str, storage: str, load: dict, timeout: float = 120) -> dict:
    ports = free_ports(3)
    spec = ",".join(f"{i}=127.0.0.1:{ports[i - 1]}" for i in (1, 2, 3))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    workdir = tempfile.mkdtemp(prefix="fastraft-ab-")
    procs = []
    try:
        for i in (1, 2, 3):
            cmd = [sys.executable, "-m", "fastraft.benchmark", "bench-node", "--storage",
                   storage, "--id", str(i), "--cluster", spec, "--load", json.dumps(load),
                   "--data-dir", workdir]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=workdir,
                                          stderr=subprocess.DEVNULL, text=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    out = p.stdout.read().strip().splitlines()
                    if out:
                        return json.loads(out[-1])
            if all(p.poll() is not None for p in procs):
                raise RuntimeError(f"{checkout}: every node exited without a result")
            time.sleep(0.05)
        raise TimeoutError(f"{checkout}: no result")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="checkout A (before)")
    parser.add_argument("--b", default=".", help="checkout B (after)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", action="append", help="figure names to run (substring)")
    args = parser.parse_args()
    figures = {k: v for k, v in FIGURES.items()
               if not args.only or any(o in k for o in args.only)}
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for name, (storage, load) in figures.items():
            # A then B in odd rounds, B then A in even ones: whichever runs second in a
            # round (a warmer cache, a machine settling) is favoured equally often.
            order = (("A", args.a), ("B", args.b))
            for side, checkout in order if r % 2 == 0 else order[::-1]:
                res = run_cluster(checkout, storage, dict(load, seconds=args.seconds))
                got.setdefault((name, side), []).append(res)
                print(f"round {r + 1} {name:<30} {side}: {res['writes_per_s']:>12,.0f}/s "
                      f"p50 {res['p50_ms']:.3f} ms p99 {res['p99_ms']:.3f} ms", flush=True)
    print("\nmedians (B/A):")
    for name in figures:
        a, b = got[(name, "A")], got[(name, "B")]
        ra = statistics.median(x["writes_per_s"] for x in a)
        rb = statistics.median(x["writes_per_s"] for x in b)
        pa = statistics.median(x["p50_ms"] for x in a)
        pb = statistics.median(x["p50_ms"] for x in b)
        print(f"  {name:<30} A {ra:>10,.0f}/s p50 {pa:.3f} ms | B {rb:>10,.0f}/s "
              f"p50 {pb:.3f} ms | B/A {rb / ra:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
