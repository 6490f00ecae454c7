"""``python -m fastraft.benchmark ROLE``: one process of a benchmark cluster (started by
``clusters``; a wrapper script named by ``FASTRAFT_BENCH_ENTRY`` calls ``main``)."""
from __future__ import annotations

import argparse

from fastraft.asyncutil import run_loop
from fastraft.benchmark.ceiling import pump_receiver
from fastraft.benchmark.nodes import bench_host, bench_node
from fastraft.benchmark.peer import pysyncobj_node


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fastraft.benchmark")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("bench-node", "bench-host", "pysyncobj-node"):
        p = sub.add_parser(role)
        p.add_argument("--id", type=int, required=True)
        p.add_argument("--cluster", required=True)
        p.add_argument("--load", required=True)
        p.add_argument("--data-dir", required=True)
        if role != "pysyncobj-node":
            p.add_argument("--storage", choices=("memory", "file", "file-nosync"),
                           default="memory")
    p = sub.add_parser("pump-recv")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    if args.role == "bench-node":
        run_loop(bench_node(args))
    elif args.role == "bench-host":
        run_loop(bench_host(args))
    elif args.role == "pysyncobj-node":
        pysyncobj_node(args)
    else:
        run_loop(pump_receiver(args.port, args.fsync, args.data_dir))


if __name__ == "__main__":
    main()
