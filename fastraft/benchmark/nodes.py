"""What a benchmark process runs: one RaftNode (``bench-node``) or one RaftHost of many
groups (``bench-host``) on TCP; the leaders write (``load``) and print one JSON line."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import TYPE_CHECKING

from fastraft.addresses import parse_cluster
from fastraft.benchmark.load import Latencies, rss_mib, run_load, write_back_to_back
from fastraft.gcpolicy import settle_gc
from fastraft.mallocpolicy import settle_malloc
from fastraft.statemachine import NullStateMachine

if TYPE_CHECKING:
    from fastraft.config import Config


async def bench_node(args: argparse.Namespace) -> None:
    """One process of a single-group run: a RaftNode on TCP; the leader writes once its
    term's first entry is committed, prints one JSON line and stops."""
    from fastraft.config import Config
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage, RaftStorage
    from fastraft.transport.tcp import TcpNetwork

    settle_malloc()  # as ``fastraft node`` does
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
    settle_gc()  # as ``fastraft node`` does
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


async def cpu_share(seconds: float) -> float:
    """This process's share of a core over the next ``seconds``."""
    began, t = time.process_time(), time.perf_counter()
    await asyncio.sleep(max(0.0, seconds))
    return (time.process_time() - began) / (time.perf_counter() - t)


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


async def bench_host(args: argparse.Namespace) -> None:
    """One process of a multi-group run: a RaftHost with ``groups`` groups, leaders spread
    by preferred leader; from ``start_at`` (wall time) it writes to the groups it leads,
    its share of ``in_flight``, then counts what it sends while idle, once its groups had
    the time to go quiet: Raft messages, and frames (liveness frames included). Prints one
    JSON line, then serves until stopped: no host measures another one leaving."""
    from fastraft.host import DEFAULT_MAX_CAMPAIGNS, RaftHost, preferred_leader
    from fastraft.storage import MemoryStorage, RaftStorage
    from fastraft.transport.tcp import TcpNetwork

    settle_malloc()
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
    # the groups live as long as the process (as docs/multiraft.md advises)
    settle_gc()
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
    load_cpu: list[float] = []

    async def sample_cpu() -> None:
        """Over the measured span: whether the hosts keep the cores busy, or wait on
        each other's rounds."""
        await asyncio.sleep(warmup)
        load_cpu.append(await cpu_share(stop - clock()))

    await asyncio.gather(sample_cpu(),
                         *[write_back_to_back(host.group(g).propose, data, start, stop,
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
    before, frames = sent(), host.network.stats["frames_out"]
    idle_cpu = await cpu_share(idle)  # before counting: that takes CPU too
    idle_rate = (sent() - before) / idle
    idle_frames = (host.network.stats["frames_out"] - frames) / idle
    quiet = sum(1 for node in host.groups.values() if node.engine.quiet)
    print(json.dumps({"writes": lat.n, "seconds": seconds, "writers": writers,
                      "led": len(led), "balanced": balanced, "rss_mib": rss,
                      "load_cpu": load_cpu[0],
                      "idle_messages_per_s": idle_rate, "idle_frames_per_s": idle_frames,
                      "idle_cpu": idle_cpu, "quiet": quiet,
                      "latencies_us": {us: c for us, c in enumerate(lat.counts) if c},
                      "lost": lost[:1]}), flush=True)
    await asyncio.Event().wait()  # serve the others until the orchestrator stops every host

