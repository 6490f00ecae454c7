"""PySyncObj under the same load, for the side-by-side rows (the bench extra)."""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from fastraft.addresses import parse_cluster
from fastraft.benchmark.load import Latencies, percentiles


def pysyncobj_node(args: argparse.Namespace) -> None:
    """A PySyncObj node with a replicated counter; the leader runs the same load."""
    import threading

    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Counter(SyncObj):  # type: ignore[misc]  # pysyncobj ships no type hints
        def __init__(self, me: str, partners: list[str], conf: Any) -> None:
            super().__init__(me, partners, conf)
            self.count = 0

        @replicated  # type: ignore[untyped-decorator]
        def add(self, data: bytes) -> int:
            self.count += 1
            return self.count

    cluster = parse_cluster(args.cluster)
    me = cluster[args.id]
    partners = [a for i, a in cluster.items() if i != args.id]
    spec = json.loads(args.load)
    conf = SyncObjConf()
    if spec.pop("batching_off", False):
        conf.appendEntriesUseBatch = False
    obj = Counter(me, partners, conf)
    while not obj._getLeader():
        time.sleep(0.01)
    time.sleep(0.5)
    if not obj._isLeader():
        while True:
            time.sleep(1)
    in_flight, seconds = spec["in_flight"], spec["seconds"]
    data = os.urandom(spec["payload"])
    sem = threading.Semaphore(in_flight)
    lat = Latencies()
    lock = threading.Lock()
    warm_until = time.perf_counter() + spec.get("warmup", 0.3)
    stop_at = warm_until + seconds

    def callback(t0: float) -> Callable[[Any, Any], None]:
        def cb(result: Any, error: Any) -> None:
            now = time.perf_counter()
            with lock:
                if warm_until <= now < stop_at:
                    lat.add(now - t0)
            sem.release()
        return cb

    while time.perf_counter() < stop_at:
        sem.acquire()
        obj.add(data, callback=callback(time.perf_counter()))
    for _ in range(in_flight):
        sem.acquire(timeout=5)
    print(json.dumps({"writes": lat.n, "seconds": seconds,
                      "writes_per_s": lat.n / seconds, **percentiles(lat)}), flush=True)
    os._exit(0)


