"""``fastraft bench``: throughput and latency, side by side with PySyncObj and the ceiling.

Every cluster benchmark starts real processes on 127.0.0.1. Each process runs one node;
the node that becomes leader generates the load in its own process (as the issue
specifies), prints one JSON line with the result and exits; the orchestrator then stops
every process it started, by pid. Each figure is the median of ``--repeat`` runs, with the
spread reported. Nothing here is a test: tests check behaviour, this measures.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from fastraft.addresses import parse_cluster
from fastraft.asyncutil import run_loop
from fastraft.errors import FastRaftError
from fastraft.processes import free_ports
from fastraft.statemachine import NullStateMachine

if TYPE_CHECKING:
    from fastraft.config import Config
    from fastraft.node import RaftNode

# ----------------------------------------------------------------------------- load


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


def _percentiles(lat: Latencies) -> dict[str, Any]:
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


async def _write_back_to_back(propose: Callable[[Any], Awaitable[Any]], arg: Any,
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

    await asyncio.gather(sample_rss(), *[_write_back_to_back(propose, arg, start, stop,
                                                             lat.counts, lost)
                                         for _ in range(in_flight)])
    writes = lat.n * batch
    out = {"writes": writes, "seconds": seconds, "writes_per_s": writes / seconds,
           "rss_start_mib": rss[0], "rss_end_mib": rss[-1], **_percentiles(lat)}
    if lost:
        out["leadership_lost"] = lost[0]
    return out


async def _bench_node(args: argparse.Namespace) -> None:
    from fastraft.config import Config
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage, RaftStorage
    from fastraft.transport.tcp import TcpNetwork

    cluster = parse_cluster(args.cluster)
    storage: RaftStorage
    if args.storage == "memory":
        storage = MemoryStorage()
    else:
        from fastraft.filestorage import FileStorage
        storage = FileStorage(os.path.join(args.data_dir, f"node-{args.id}"),
                              sync=args.storage == "file")
    spec = json.loads(args.load)
    # The default snapshot policy, as deployed: compaction keeps memory bounded (without
    # it the growing log costs page faults, half the CPU time of a propose_batch run).
    node = RaftNode(args.id, storage=storage, state_machine=NullStateMachine(),
                    network=TcpNetwork(args.id, cluster[args.id]),
                    config=Config(max_pending_proposals=1 << 20))
    await node.start()
    await node.initialize(cluster)
    await node.wait_for_leader(30)
    while node.engine.leader_id is None or (node.is_leader and
                                            node.engine.log.term_at(node.engine.commit_index)
                                            != node.engine.term):
        await asyncio.sleep(0.01)
    if node.is_leader:
        result = await run_load(node, **spec)
        print(json.dumps(result), flush=True)
        await node.stop()
        return
    await asyncio.Event().wait()  # followers serve until the orchestrator stops them


#: Seconds a bench host waits for its groups to go quiet before it measures idle traffic.
IDLE_SETTLE = 30.0


def host_config(groups: int) -> Config:
    """Every group's Config in the multi-group rows: idle groups go quiet (as by default
    in a RaftHost); with many groups per process, slower ticks, as every awake group
    that is not replicating sends each follower a heartbeat message per interval."""
    from fastraft.config import Config
    from fastraft.host import DEFAULT_QUIESCE_AFTER
    if groups <= 64:
        return Config(max_pending_proposals=1 << 20, quiesce_after=DEFAULT_QUIESCE_AFTER)
    return Config(max_pending_proposals=1 << 20, heartbeat_interval=0.25,
                  election_timeout_min=1.5, election_timeout_max=3.0,
                  quiesce_after=DEFAULT_QUIESCE_AFTER)


async def _bench_host(args: argparse.Namespace) -> None:
    """One process of a multi-group run: a RaftHost with ``groups`` groups, leaders spread
    by preferred leader; from ``start_at`` (wall time) it writes to the groups it leads,
    its share of ``in_flight``, then counts what it sends while idle, once its groups had
    the time to go quiet: Raft messages, and frames (liveness frames included). Prints one
    JSON line, then serves until stopped: no host measures another one leaving."""
    from fastraft.host import DEFAULT_MAX_CAMPAIGNS, RaftHost, preferred_leader
    from fastraft.storage import MemoryStorage, RaftStorage
    from fastraft.transport.tcp import TcpNetwork

    cluster = parse_cluster(args.cluster)
    spec = json.loads(args.load)
    groups, seconds = spec["groups"], spec["seconds"]
    warmup, idle = spec.get("warmup", 0.3), spec.get("idle_seconds", 1.0)

    from fastraft.sharedwal import SharedWAL
    # every group's log in one WAL: one fsync per write batch for all of them
    wal = None if args.storage == "memory" else SharedWAL(
        os.path.join(args.data_dir, f"node-{args.id}"), sync=args.storage == "file")

    def storage(group_id: int) -> RaftStorage:
        return MemoryStorage() if wal is None else wal.group(group_id)

    from fastraft.config import Config
    config = Config(**spec["config"]) if "config" in spec else host_config(groups)
    host = RaftHost(args.id, network=TcpNetwork(args.id, cluster[args.id]), storage=storage,
                    config=config, balance_interval=0.2,
                    max_campaigns=spec.get("max_campaigns", DEFAULT_MAX_CAMPAIGNS))
    await host.start()
    # ``create_batch``: that many groups at a time, each batch given up to 60 s to go
    # quiet before the next, as a storage engine adds shards (thousands electing and
    # heartbeating at once would swamp two cores before they could go quiet)
    batch = spec.get("create_batch") or groups

    async def until_quiet(seconds: float) -> None:
        settled_by = time.monotonic() + seconds
        while time.monotonic() < settled_by and \
                not all(node.engine.quiet for node in host.groups.values()):
            await asyncio.sleep(0.1)

    for g in range(groups):
        await host.create_group(g, cluster, state_machine=NullStateMachine())
        if (g + 1) % batch == 0 and g + 1 < groups:
            await until_quiet(60)
    # the groups live as long as the process: keep full collections from walking them
    # (as docs/multiraft.md advises)
    gc.freeze()
    mine = [g for g in range(groups) if preferred_leader(g, set(cluster)) == args.id]
    while sorted(host.leaders()) != mine and time.time() < spec["start_at"]:
        await asyncio.sleep(max(0.05, groups / 20_000))  # a look at 10,000 groups: ~2 ms
    balanced = sorted(host.leaders()) == mine
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    led = host.leaders()
    writers = round(spec["in_flight"] * len(led) / groups)
    data = os.urandom(spec["payload"])
    clock = time.perf_counter
    start = clock() + warmup
    stop = start + seconds
    lat = Latencies()
    lost: list[str] = []
    groups_written = [led[k % len(led)] for k in range(writers)] if led else []
    await asyncio.gather(*[_write_back_to_back(host.group(g).propose, data, start, stop,
                                               lat.counts, lost, f"group {g}: ")
                           for g in groups_written])
    rss = rss_mib()
    # idle: a second to settle, and up to IDLE_SETTLE for every group here to go quiet
    # (when they do), then what the host sends in ``idle`` seconds
    await asyncio.sleep(max(0.0, stop + 1.0 - clock()))
    if host.config.quiesce_after:
        await until_quiet(IDLE_SETTLE)

    def sent() -> int:
        return sum(sum(node.metrics().messages_out.values()) for node in host.groups.values())
    before, frames, cpu = sent(), host.network.stats["frames_out"], time.process_time()
    await asyncio.sleep(idle)
    idle_cpu = (time.process_time() - cpu) / idle  # before counting: that takes CPU too
    idle_rate = (sent() - before) / idle
    idle_frames = (host.network.stats["frames_out"] - frames) / idle
    quiet = sum(1 for node in host.groups.values() if node.engine.quiet)
    print(json.dumps({"writes": lat.n, "seconds": seconds, "writers": writers,
                      "led": len(led), "balanced": balanced, "rss_mib": rss,
                      "idle_messages_per_s": idle_rate, "idle_frames_per_s": idle_frames,
                      "idle_cpu": idle_cpu, "quiet": quiet,
                      "latencies_us": {us: c for us, c in enumerate(lat.counts) if c},
                      "lost": lost[:1]}), flush=True)
    await asyncio.Event().wait()  # serve the others until the orchestrator stops every host


def _host_cluster(n: int, storage: str, load: dict[str, Any], workdir: str,
                  timeout: float = 180) -> dict[str, Any]:
    """``n`` bench-host processes; their results merged: writes summed, latencies of
    every write (one histogram), RSS and idle messages per host."""
    ports = free_ports(n)
    spec = ",".join(f"{i}=127.0.0.1:{ports[i - 1]}" for i in range(1, n + 1))
    # time to create the groups and elect their leaders (slower when created in batches)
    per_s = 50 if load.get("create_batch") else 100
    load = dict(load, start_at=time.time() + 4 + load["groups"] / per_s)
    procs = [subprocess.Popen([sys.executable, *_ENTRY, "bench-host", "--storage", storage,
                               "--id", str(i), "--cluster", spec, "--load", json.dumps(load),
                               "--data-dir", workdir],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(1, n + 1)]
    # each host prints one line and serves on: read every line, then stop them all
    pool = ThreadPoolExecutor(n)
    try:
        reports = [pool.submit(p.stdout.readline) for p in procs]  # type: ignore[union-attr]
        done, _ = wait(reports, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        pool.shutdown()
    outs = [r.result() if r in done else "" for r in reports]
    hosts = [json.loads(o) for o in outs if o.strip()]
    if len(hosts) != n:
        raise RuntimeError(f"{n - len(hosts)} of {n} hosts reported nothing")
    lat = Latencies()
    for h in hosts:
        for us, c in h.pop("latencies_us").items():
            lat.counts[int(us)] += c
    writes = sum(h["writes"] for h in hosts)
    lost = [x for h in hosts for x in h["lost"]]
    return {"writes": writes, "seconds": load["seconds"],
            "writes_per_s": writes / load["seconds"], **_percentiles(lat),
            "idle_messages_per_s": sum(h["idle_messages_per_s"] for h in hosts),
            "idle_frames_per_s": sum(h["idle_frames_per_s"] for h in hosts),
            "quiet_groups": sum(h["quiet"] for h in hosts) / n,
            # the busiest host's share of a core while idle
            "idle_cpu": max(h["idle_cpu"] for h in hosts),
            "rss_mib": [h["rss_mib"] for h in hosts],
            "balanced": all(h["balanced"] for h in hosts),
            "leaders": [h["led"] for h in hosts],
            **({"leadership_lost": lost[0]} if lost else {})}


# FASTRAFT_BENCH_ENTRY=wrapper.py runs every node through a wrapper script (one that turns
# on cProfile, say) instead of ``python -m fastraft.benchmark``.
_ENTRY = ([os.environ["FASTRAFT_BENCH_ENTRY"]] if os.environ.get("FASTRAFT_BENCH_ENTRY")
          else ["-m", "fastraft.benchmark"])


def _cluster(n: int, module_args: list[str], load: dict[str, Any], workdir: str,
             timeout: float = 120) -> dict[str, Any]:
    """Start n processes of ``python -m fastraft.benchmark <module_args>``; return the one
    JSON line the leader prints."""
    ports = free_ports(n)
    spec = ",".join(f"{i}=127.0.0.1:{ports[i - 1]}" for i in range(1, n + 1))
    procs = []
    try:
        for i in range(1, n + 1):
            cmd = [sys.executable, *_ENTRY, *module_args, "--id", str(i),
                   "--cluster", spec, "--load", json.dumps(load), "--data-dir", workdir]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    out = p.stdout.read().strip().splitlines() if p.stdout else []
                    if out:
                        result: dict[str, Any] = json.loads(out[-1])
                        return result
            if all(p.poll() is not None for p in procs):
                raise RuntimeError("every node exited without a result")
            time.sleep(0.05)
        raise TimeoutError("no leader reported a result")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


# ----------------------------------------------------------------------------- peer

def _pysyncobj_node(args: argparse.Namespace) -> None:
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
                      "writes_per_s": lat.n / seconds, **_percentiles(lat)}), flush=True)
    os._exit(0)


# ----------------------------------------------------------------------------- ceiling

async def _pump_receiver(port: int, fsync: bool, workdir: str) -> None:
    """Receive framed record batches; acknowledge each (after fdatasync when asked)."""
    import struct
    fd = os.open(os.path.join(workdir, f"pump-{port}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if fsync else -1
    hdr = struct.Struct("<IQ")  # body length, batch number

    class Receiver(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            data = self.buffer + data if self.buffer else data
            pos, acks = 0, []
            while len(data) - pos >= hdr.size:
                n, batch = hdr.unpack_from(data, pos)
                if len(data) - pos - hdr.size < n:
                    break
                if fd >= 0:
                    os.write(fd, data[pos + hdr.size:pos + hdr.size + n])
                acks.append(batch)
                pos += hdr.size + n
            self.buffer = data[pos:]
            if acks:
                if fd >= 0:
                    os.fdatasync(fd)
                self.transport.write(struct.pack("<Q", acks[-1]))

    server = await asyncio.get_running_loop().create_server(Receiver, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _pump_sender(ports: list[int], in_flight: int, payload: int, seconds: float,
                       batch: int = 256) -> dict[str, Any]:
    """Send records to every receiver; a record counts once a majority (self plus half of
    the receivers) acknowledged its batch. No consensus logic: the ceiling."""
    import struct
    loop = asyncio.get_running_loop()
    hdr = struct.Struct("<IQ")
    record = os.urandom(payload)
    need = (1 + len(ports)) // 2  # a majority of the sender plus the receivers, minus self
    acked = {p: 0 for p in ports}
    sent_batches: dict[int, int] = {}
    state = {"next": 1, "committed_batch": 0, "outstanding": 0, "committed": 0}
    wake = asyncio.Event()

    class Sender(asyncio.Protocol):
        def __init__(self, port: int) -> None:
            self.port = port
            self.buffer = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            data = self.buffer + data
            k = len(data) // 8
            if k:
                acked[self.port] = struct.unpack_from("<Q", data, (k - 1) * 8)[0]
                self.buffer = data[k * 8:]
                quorum = sorted(acked.values(), reverse=True)[need - 1]
                while state["committed_batch"] < quorum:
                    state["committed_batch"] += 1
                    n = sent_batches.pop(state["committed_batch"])
                    state["outstanding"] -= n
                    state["committed"] += n
                wake.set()

    conns: list[Sender] = []
    for p in ports:
        _, proto = await loop.create_connection(partial(Sender, p), "127.0.0.1", p)
        conns.append(proto)
    t0 = loop.time()
    stop = t0 + seconds
    while loop.time() < stop:
        room = in_flight - state["outstanding"]
        if room <= 0:
            wake.clear()
            await wake.wait()
            continue
        n = min(room, batch)
        b = state["next"]
        state["next"] += 1
        body = record * n
        frame = hdr.pack(len(body), b) + body
        sent_batches[b] = n
        state["outstanding"] += n
        for c in conns:
            c.transport.write(frame)
        await asyncio.sleep(0)
    elapsed = loop.time() - t0
    return {"writes": state["committed"], "seconds": elapsed,
            "writes_per_s": state["committed"] / elapsed}


def _pump(in_flight: int, payload: int, seconds: float, fsync: bool,
          workdir: str) -> dict[str, Any]:
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, "-m", "fastraft.benchmark", "pump-recv",
                               "--port", str(p), "--data-dir", workdir]
                              + (["--fsync"] if fsync else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ports]
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                return run_loop(_pump_sender(ports, in_flight, payload, seconds))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- in-process

async def _inprocess(writers: int, seconds: float) -> dict[str, Any]:
    """openraft's "minimal" method: 3 nodes in one process, memory network and storage,
    empty payloads."""
    from fastraft.config import Config
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage
    from fastraft.transport.memory import MemoryHub

    cfg = Config(max_pending_proposals=1 << 20)
    hub = MemoryHub()
    members = {i: f"local:{i}" for i in (1, 2, 3)}
    nodes = [RaftNode(i, storage=MemoryStorage(), network=hub.network(i),
                      state_machine=NullStateMachine(), config=cfg) for i in members]
    try:
        for node in nodes:
            await node.start()
        for node in nodes:
            await node.initialize(members)
        while not any(n.is_leader and n.engine.log.term_at(n.engine.commit_index)
                      == n.engine.term for n in nodes):
            await asyncio.sleep(0.01)
        leader = next(n for n in nodes if n.is_leader)
        return await run_load(leader, writers, 0, seconds)
    finally:
        for node in nodes:
            await node.stop()


# ----------------------------------------------------------------------------- report

def _run_inprocess(writers: int, seconds: float) -> dict[str, Any]:
    return run_loop(_inprocess(writers, seconds))


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
    parser.add_argument("--json", default="fastraft-bench.json")
    parser.add_argument("--png", default="fastraft-bench.png")
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
        hosts = (f"  idle {_fmt(r['idle_messages_per_s'])} msgs/s "
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
            return _cluster(n, ["bench-node", "--storage", storage], load, sub)
        finally:
            shutil.rmtree(sub, ignore_errors=True)

    def groups_run(storage: str, groups: int) -> dict[str, Any]:
        load = {"groups": groups, "in_flight": 1024, "payload": 100, "seconds": args.seconds}
        sub = os.path.join(workdir, f"run-{time.monotonic_ns()}")
        os.makedirs(sub)
        try:
            return _host_cluster(3, storage, load, sub)
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
                            partial(_cluster, 3, ["pysyncobj-node"], load, workdir),
                            system="pysyncobj", in_flight=inf, payload=100, nodes=3)
                load = {"in_flight": 1, "payload": 100, "seconds": args.seconds,
                        "batching_off": True}
                measure("PySyncObj 3 procs batching off 100B inflight=1",
                        lambda: _cluster(3, ["pysyncobj-node"], dict(load), workdir),
                        system="pysyncobj-nobatch", in_flight=1, payload=100, nodes=3)
        if args.sustained:
            load = {"in_flight": 1024, "payload": 100, "seconds": args.sustained}
            sub = os.path.join(workdir, "sustained")
            os.makedirs(sub)
            r = _cluster(3, ["bench-node", "--storage", "memory"], load, sub,
                         timeout=args.sustained + 120)
            r.update(name=f"fastraft sustained {args.sustained:.0f}s memory 100B inflight=1024",
                     system="fastraft-sustained", in_flight=1024, payload=100, nodes=3,
                     runs=[r["writes_per_s"]], spread_pct=0.0)
            results.append(r)
            print(f"  {r['name']:<58} {_fmt(r['writes_per_s']):>12}/s  leader RSS "
                  f"{r['rss_start_mib']:.0f} MiB -> {r['rss_end_mib']:.0f} MiB", flush=True)
        for fsync in (False, True):
            measure(f"ceiling: raw uvloop pump 100B inflight=1024 fsync={fsync}",
                    partial(_pump, 1024, 100, args.seconds, fsync, workdir),
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
    pump = rate("ceiling: raw uvloop pump 100B inflight=1024 fsync=False")
    fast_fsync = rate("fastraft 3 procs FileStorage+fsync 100B inflight=1024")
    pump_fsync = rate("ceiling: raw uvloop pump 100B inflight=1024 fsync=True")
    if fast and peer_best:
        print(f"fastraft / PySyncObj's best (1,024 in flight, memory): {fast / peer_best:.1f}x")
    if fast and pump:
        print(f"fastraft / raw pump ceiling (memory): {fast / pump:.1%}")
    if fast_fsync and pump_fsync:
        print(f"fastraft / raw pump ceiling (fsync):  {fast_fsync / pump_fsync:.1%}")


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


def _module_main() -> None:
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
        run_loop(_bench_node(args))
    elif args.role == "bench-host":
        run_loop(_bench_host(args))
    elif args.role == "pysyncobj-node":
        _pysyncobj_node(args)
    else:
        run_loop(_pump_receiver(args.port, args.fsync, args.data_dir))


if __name__ == "__main__":
    _module_main()
