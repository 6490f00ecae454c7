"""The load generator: writers proposing back to back, and the latency histogram they
fill (constant memory, so the load does not distort the memory it measures)."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastraft.errors import FastRaftError

if TYPE_CHECKING:
    from fastraft.node import RaftNode

_CDF_POINTS = [k / 100 for k in range(1, 100)] + [0.995, 0.999]
_MAX_US = 2_000_000


class Latencies:
    """A histogram of latencies in whole microseconds (up to 2 s): constant memory however
    long the run, so the load generator does not distort the memory it is measuring."""

    def __init__(self) -> None:
        from array import array
        #: counts[us]: how many latencies of ``us`` whole microseconds (the last slot:
        #: that or more). Hot loops update it in place rather than call ``add``.
        self.counts = array("q", bytes(8 * (_MAX_US + 1)))

    @property
    def n(self) -> int:
        return sum(self.counts)

    def add(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        self.counts[us if us < _MAX_US else _MAX_US] += 1

    def quantiles(self, qs: list[float]) -> list[float]:
        """Latency (ms) at each quantile in ascending ``qs``."""
        out, seen, k = [], 0, 0
        n = self.n
        targets = [max(1, int(q * n)) for q in qs]
        for us, c in enumerate(self.counts):
            seen += c
            while k < len(targets) and seen >= targets[k]:
                out.append(us / 1000)
                k += 1
            if k == len(targets):
                break
        return out


def percentiles(lat: Latencies) -> dict[str, Any]:
    if not lat.n:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None}
    p50, p99, p999 = lat.quantiles([0.5, 0.99, 0.999])
    cdf = lat.quantiles(_CDF_POINTS)
    return {"p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
            "cdf_ms": [[q, v] for q, v in zip(_CDF_POINTS, cdf)]}


def rss_mib() -> float | None:
    """Resident memory of this process (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return None


async def write_back_to_back(propose: Callable[[Any], Awaitable[Any]], arg: Any,
                              start: float, stop: float, counts: Any, lost: list[str],
                              what: str = "") -> None:
    """Await ``propose(arg)`` again and again until ``stop`` (``time.perf_counter``),
    counting each write's latency in whole µs in ``counts`` from ``start`` on. A
    ``FastRaftError`` ends the writer, noted in ``lost``: overload can cost the leader its
    leadership (an election), and what was measured until then is still reported."""
    clock = time.perf_counter
    t = clock()
    while True:
        try:
            await propose(arg)
        except FastRaftError as exc:
            lost.append(f"{what}{type(exc).__name__}: {exc}")
            return
        now = clock()
        if now >= stop:
            return
        if now >= start:
            us = int((now - t) * 1e6)
            counts[us if us < _MAX_US else _MAX_US] += 1
        t = now


async def run_load(node: RaftNode, in_flight: int, payload: int, seconds: float, batch: int = 1,
                   warmup: float = 0.3) -> dict[str, Any]:
    """``in_flight`` writers, each proposing ``payload``-byte commands back to back (or
    batches of ``batch``) for ``seconds``; latency of every write, after a warm-up."""
    data = os.urandom(payload)
    clock = time.perf_counter
    start = clock() + warmup
    stop = start + seconds
    lat = Latencies()
    lost: list[str] = []
    propose: Callable[[Any], Awaitable[Any]]
    arg: Any
    if batch == 1:
        propose, arg = node.propose, data
    else:
        propose, arg = node.propose_batch, [data] * batch

    rss: list[Any] = []

    async def sample_rss() -> None:
        await asyncio.sleep(warmup)
        rss.append(rss_mib())
        while clock() < stop - 0.05 and not lost:
            await asyncio.sleep(0.05)
        rss.append(rss_mib())

    await asyncio.gather(sample_rss(), *[write_back_to_back(propose, arg, start, stop,
                                                             lat.counts, lost)
                                         for _ in range(in_flight)])
    writes = lat.n * batch
    out = {"writes": writes, "seconds": seconds, "writes_per_s": writes / seconds,
           "rss_start_mib": rss[0], "rss_end_mib": rss[-1], **percentiles(lat)}
    if lost:
        out["leadership_lost"] = lost[0]
    return out

