"""Memory does not grow with the log: N records of SIZE bytes through a 3-node cluster of
``fastraft node`` processes on FileStorage (fsync on, snapshots on, retention keeping the
whole log), then a subscriber reads every record back from offset 1.

Prints the write rate for every tenth of the run, each node's peak RSS (VmHWM), and the
read-back rate. The issue-12 run::

    python bench/log_memory.py --writes 1000000 --size 10240 --data-dir /var/tmp/logmem

Needs ``writes x size x 3`` of free disk (the log is kept whole, on every node).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

from fastraft.kvclient import KVClient, find_leader
from fastraft.processes import ProcessCluster, memory_mib


def record(k: int, size: int) -> bytes:
    head = b"%d:" % k
    return head + b"r" * (size - len(head))


async def run(args) -> int:
    workdir = tempfile.mkdtemp(prefix="logmem-")
    data = args.data_dir or os.path.join(workdir, "data")
    cluster = ProcessCluster(3, workdir, data_dir=data, extra_args=[
        "--log-retention-entries", str(args.writes + 1000),
        *(["--log-cache-mib", str(args.cache_mib)] if args.cache_mib else [])])
    cluster.start_all()
    try:
        clients = {i: await KVClient.connect_retrying(cluster.client[i]) for i in cluster.ids}
        leader = await find_leader(clients)
        out = clients[leader]
        tenth = max(args.writes // 10, 1)
        offsets: list[int] = [0] * args.writes
        done = 0
        next_k = 0
        t_mark = time.perf_counter()
        rates = []

        async def writer() -> None:
            # ``window`` of these: appends in flight, without a task per record
            nonlocal done, next_k, t_mark
            while next_k < args.writes:
                k = next_k
                next_k += 1
                offsets[k] = await out.append(record(k, args.size))
                done += 1
                if done % tenth == 0:
                    now = time.perf_counter()
                    rates.append(tenth / (now - t_mark))
                    t_mark = now
                    peaks = {i: round(memory_mib(p.pid, "VmHWM"))
                             for i, p in cluster.procs.items()}
                    print(f"{done:>9,} records  {rates[-1]:8,.0f} records/s  "
                          f"peak RSS MiB {peaks}", flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(args.window)))
        write_s = time.perf_counter() - t0
        follower = next(i for i in cluster.ids if i != leader)
        status = await clients[follower].status()
        while status["applied_index"] < max(offsets):
            await asyncio.sleep(0.1)
            status = await clients[follower].status()
        # a subscriber from offset 1 on a follower: every record, in order
        t1 = time.perf_counter()
        reader = clients[follower]
        nxt, seen = 1, 0
        while seen < args.writes:
            batch = await reader.records(nxt, limit=10_000)
            if not batch:
                raise SystemExit(f"read back stopped at {seen} records (offset {nxt})")
            for offset, data in batch:
                if offset != offsets[seen] or not data.startswith(b"%d:" % seen) or \
                        len(data) != args.size:
                    raise SystemExit(f"record {seen} wrong at offset {offset}")
                seen += 1
            nxt = batch[-1][0] + 1
        read_s = time.perf_counter() - t1
        peaks = {i: round(memory_mib(p.pid, "VmHWM"), 1) for i, p in cluster.procs.items()}
        print(f"wrote {args.writes:,} records of {args.size:,} bytes in {write_s:.0f}s "
              f"({args.writes / write_s:,.0f}/s; first tenth {rates[0]:,.0f}/s, last tenth "
              f"{rates[-1]:,.0f}/s); read all back in order from a follower in {read_s:.0f}s "
              f"({args.writes / read_s:,.0f}/s)")
        print(f"peak RSS MiB per node: {peaks}; latest snapshot at "
              f"{status['latest_snapshot_index']}, log kept from {status['snapshot_index'] + 1}")
        for c in clients.values():
            c.close()
        return 0 if max(peaks.values()) < args.bound_mib else 1
    finally:
        cluster.stop_all()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=100_000)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--window", type=int, default=256, help="appends in flight")
    p.add_argument("--cache-mib", type=float, help="--log-cache-mib of the nodes")
    p.add_argument("--bound-mib", type=float, default=200)
    p.add_argument("--data-dir")
    p.add_argument("--keep", action="store_true", help="keep the data directories")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
