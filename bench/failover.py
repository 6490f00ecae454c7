"""How long writes stop when a loaded leader is killed.

    python bench/failover.py --runs 100                 memory storage
    python bench/failover.py --runs 50 --storage file   FileStorage, fsync on every node

Each run starts three ``fastraft node`` processes on loopback (default ``Config``:
election timeouts 150-300 ms, pre-vote, check-quorum), puts 100-byte values through the
leader's client port from ``--writers`` writers for ``--load`` seconds, then kills the
leader with SIGKILL. It measures the time from the kill until a write issued after it
is acknowledged (the failover ``fastraft demo`` prints, one sample a run), and how many
terms the election took: more than one means a second round (two followers' timers
fired together and split the votes, or the first to campaign lacked an entry the
other held). Prints the distribution over the runs. Compare checkouts by running each
with ``PYTHONPATH=/path/to/checkout``, interleaved.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time

from fastraft.asyncutil import run_loop, wait_within
from fastraft.kvclient import ClientError, find_leader
from fastraft.processes import ProcessCluster


async def one_failover(workdir: str, storage: str, writers: int,
                       load: float) -> tuple[float, int]:
    """(seconds from the kill to the first write acknowledged after it, terms the
    election took)."""
    cluster = ProcessCluster(3, workdir, f"{workdir}/data" if storage == "file" else None)
    cluster.start_all()
    try:
        clients = await cluster.connect_all()
        leader = await find_leader(clients, 30)
        term = (await clients[leader].status())["term"]
        killed: float | None = None
        failover: float | None = None
        keys = iter(range(10**9))
        value = b"v" * 100

        async def writer() -> None:
            nonlocal failover
            while failover is None:
                client = clients.get(leader)
                if client is None or client.closed:
                    await asyncio.sleep(0.01)  # until the new leader is found
                    continue
                issued = time.monotonic()
                try:
                    await wait_within(client.put(f"k{next(keys)}", value), 2.0)
                except (ClientError, ConnectionError, asyncio.TimeoutError):
                    await asyncio.sleep(0.01)
                    continue
                # only a write issued after the kill proves a new leader took over
                if killed is not None and issued > killed and failover is None:
                    failover = time.monotonic() - killed

        async def kill_the_leader() -> None:
            nonlocal leader, killed
            await asyncio.sleep(load)
            clients.pop(leader).close()
            killed = time.monotonic()
            cluster.kill(leader)
            leader = await find_leader(clients, 30)

        await wait_within(asyncio.gather(kill_the_leader(),
                                         *[writer() for _ in range(writers)]), load + 30)
        new_term = (await clients[leader].status())["term"]
        for c in clients.values():
            c.close()
        assert failover is not None
        return failover, new_term - term
    finally:
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--storage", choices=("memory", "file"), default="memory")
    parser.add_argument("--writers", type=int, default=256)
    parser.add_argument("--load", type=float, default=1.5,
                        help="seconds of writes before the kill")
    args = parser.parse_args()
    times: list[float] = []
    rounds: list[int] = []
    for run in range(args.runs):
        workdir = tempfile.mkdtemp(prefix="fastraft-failover-")
        try:
            took, terms = run_loop(one_failover(workdir, args.storage, args.writers,
                                                args.load))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        times.append(took * 1000)
        rounds.append(terms)
        print(f"run {run + 1}: {took * 1000:.0f} ms, {terms} term(s)", flush=True)
    ordered = sorted(times)
    print(f"{args.runs} runs, {args.storage}: failover median {statistics.median(ordered):.0f} ms, "
          f"mean {statistics.mean(ordered):.0f}, p90 {ordered[int(0.9 * len(ordered))]:.0f}, "
          f"max {ordered[-1]:.0f}; elections of more than one term: "
          f"{sum(t > 1 for t in rounds)}")


if __name__ == "__main__":
    main()
