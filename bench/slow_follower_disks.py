"""What a leader sees while its followers' disks are slow.

    python bench/slow_follower_disks.py --delay 0.1      every follower append takes 100 ms
    python bench/slow_follower_disks.py --delay 0.4      longer than an election timeout

Three in-process nodes (default ``Config``: check-quorum on, election timeouts 150-300 ms)
on the memory transport and async memory storage. Once a leader is elected, every append
on the other two nodes takes ``--delay`` seconds (the leader's disk stays fast), and for
``--seconds`` seconds 64 writers propose 100-byte puts while one reader calls
``read_index`` in a loop, each on whichever node leads. Prints the elections the stall
caused (term changes), the writes and reads done, and the reads' latency. Compare
checkouts with ``PYTHONPATH=/path/to/checkout``.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop

from fastraft import kv
from fastraft.errors import FastRaftError
from fastraft.storage import AsyncMemoryStorage
from fastraft.testing import LocalCluster


class SlowAppends(AsyncMemoryStorage):
    """Its appends take ``delay`` seconds once set."""

    delay = 0.0

    async def append_entries(self, entries):  # type: ignore[no-untyped-def]
        if self.delay:
            await asyncio.sleep(self.delay)
        await AsyncMemoryStorage.append_entries(self, entries)


async def run(delay: float, seconds: float, writers: int) -> None:
    async with LocalCluster(3, state_machine=kv.KVStore, storage=SlowAppends) as c:
        leader = await c.leader()
        for node in c.nodes.values():
            if node is not leader:
                c.storages[node.id].delay = delay
        term = leader.engine.term
        end = time.monotonic() + seconds
        writes = write_failures = read_failures = 0
        latencies: list[float] = []

        async def write() -> None:
            nonlocal writes, write_failures
            while time.monotonic() < end:
                try:
                    node = await c.leader()
                    await asyncio.wait_for(node.propose(kv.put(b"k", b"v" * 100)), 5)
                    writes += 1
                except (FastRaftError, asyncio.TimeoutError):
                    write_failures += 1

        async def read() -> None:
            nonlocal read_failures
            while time.monotonic() < end:
                started = time.perf_counter()
                try:
                    node = await c.leader()
                    await asyncio.wait_for(node.read_index(), 5)
                    latencies.append(time.perf_counter() - started)
                except (FastRaftError, asyncio.TimeoutError):
                    read_failures += 1

        await asyncio.gather(*[write() for _ in range(writers)], read())
        elections = max(n.engine.term for n in c.nodes.values()) - term
        for storage in c.storages.values():
            storage.delay = 0.0  # let the writes in flight end before the stop
        latencies.sort()
        p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
        p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
        print(f"follower appends {delay * 1000:.0f} ms, {seconds:.0f} s: elections {elections}; "
              f"writes {writes} ({write_failures} failed); reads {len(latencies)} "
              f"({read_failures} failed), p50 {p50:.2f} ms, p99 {p99:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per follower append")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--writers", type=int, default=64)
    args = parser.parse_args()
    uvloop.run(run(args.delay, args.seconds, args.writers))


if __name__ == "__main__":
    main()
