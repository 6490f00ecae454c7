"""How long restarted hosts' replicas of quiet groups take to know their leaders again.

    python bench/restart_leaders.py 3000            host 3 crashes and restarts
    python bench/restart_leaders.py 3000 --all      all three crash and restart at once

Three in-process ``RaftHost`` s on loopback (heartbeats 0.25 s, election timeouts 1.5-3 s,
as the benchmark's hosts of many groups) found ``N`` groups on ``MemoryStorage`` (prints
how long until every group had a leader, and how many were first led by their preferred
replica) and wait until all are quiet;
the hosts crash (send nothing on their way out) and restart on their storages. One host:
prints how long its replicas of groups led on hosts 1 and 2 took to know their leader
alive, from the restart. All three: how long until every group had a leader, how many
terms each group's election took (more than one: replicas campaigned at once and split
the votes), and how long until the hosts' balancing had handed every group to its
preferred leader. Compare checkouts with ``PYTHONPATH=/path/to/checkout``.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import uvloop

from fastraft import Config, MemoryStorage, RaftHost
from fastraft.engine import Role
from fastraft.host.balance import preferred_leader
from fastraft.processes import free_ports
from fastraft.transport import TcpNetwork

CONFIG = Config(heartbeat_interval=0.25, election_timeout_min=1.5, election_timeout_max=3.0,
                quiesce_after=1.0)


class Null:
    def apply(self, entries):
        return [None] * len(entries)

    def snapshot(self):
        return b""

    def restore(self, data):
        pass


async def main(n: int, whole: bool, wait: float = 60.0) -> None:
    ports = free_ports(3)
    addresses = {i: f"127.0.0.1:{ports[i - 1]}" for i in (1, 2, 3)}
    storages: dict[tuple[int, int], MemoryStorage] = {}
    hosts: dict[int, RaftHost] = {}

    async def start(i: int, found: bool) -> RaftHost:
        host = RaftHost(i, network=TcpNetwork(i, addresses[i]), config=CONFIG,
                        storage=lambda g: storages.setdefault((i, g), MemoryStorage()))
        hosts[i] = await host.start()
        for g in range(n):
            await host.create_group(g, addresses if found else None, state_machine=Null())
        return host

    async def crash(i: int) -> None:
        hosts[i].network.send_group = lambda *args: None  # no word to the others
        await hosts[i].stop()

    started = time.monotonic()
    for i in (1, 2, 3):
        await start(i, True)
    preferred = {g: preferred_leader(g, {1, 2, 3}) for g in range(n)}
    first: dict[int, int] = {}  # group: its first leader
    led_at = None
    for _ in range(6000):  # up to 120 s for every group to elect a leader and go quiet
        for i, h in hosts.items():
            for g in h.leaders():
                first.setdefault(g, i)
        if led_at is None and len(first) == n:
            led_at = time.monotonic() - started
        if sum(len(h.leaders()) for h in hosts.values()) == n and \
                all(node.engine.quiet for h in hosts.values() for node in h.groups.values()):
            break
        await asyncio.sleep(0.02)
    print(f"{n} groups founded: every group had a leader after {led_at:.2f}s, "
          f"{sum(1 for g, i in first.items() if i == preferred[g])} first led by their "
          "preferred replica")
    if whole:
        await whole_cluster(n, hosts, start, crash, wait)
    else:
        await one_host(n, hosts, start, crash, wait)
    for host in hosts.values():
        await host.stop()


async def one_host(n, hosts, start, crash, wait) -> None:
    led_here = set(hosts[3].leaders())
    await crash(3)
    started = time.monotonic()
    restarted = await start(3, False)
    created = time.monotonic() - started
    others = [g for g in range(n) if g not in led_here]
    knew: dict[int, float] = {}
    while len(knew) < len(others) and time.monotonic() - started < wait:
        now = time.monotonic() - started
        for g in others:
            e = restarted.group(g).engine
            if g not in knew and e.leader_id is not None and e.leader_alive:
                knew[g] = now
        await asyncio.sleep(0.01)
    times = sorted(knew.values())
    print(f"{n} groups: host 3 restarted, its {n} groups created in {created:.2f}s; "
          f"{len(times)} of its {len(others)} replicas of groups led elsewhere knew their "
          f"leader within {wait:.0f}s" + (f", p50 {times[len(times) // 2]:.2f}s, last "
                                          f"{times[-1]:.2f}s" if times else ""))


async def whole_cluster(n, hosts, start, crash, wait) -> None:
    terms_before = {g: hosts[1].group(g).engine.term for g in range(n)}
    preferred = {g: preferred_leader(g, {1, 2, 3}) for g in range(n)}
    for i in (1, 2, 3):
        await crash(i)
    started = time.monotonic()
    for i in (1, 2, 3):
        await start(i, False)
    created = time.monotonic() - started
    first: dict[int, tuple[int, int]] = {}  # group: its first leader since, and its term
    led_at = balanced_at = None
    while balanced_at is None and time.monotonic() - started < wait:
        for i, h in hosts.items():
            for g in h.leaders():
                if g not in first:
                    first[g] = (i, h.group(g).engine.term - terms_before[g])
        if led_at is None and len(first) == n:
            led_at = time.monotonic() - started
            per_host = [len(hosts[i].leaders()) for i in (1, 2, 3)]
        if led_at is not None and all(
                hosts[i].group(g).engine.role == Role.LEADER for g, i in preferred.items()):
            balanced_at = time.monotonic() - started
        await asyncio.sleep(0.02)
    if led_at is None:
        print(f"{n} groups: not every group had a leader within {wait:.0f}s")
        return
    terms = Counter(term for _, term in first.values())
    first_preferred = sum(1 for g, (i, _) in first.items() if i == preferred[g])
    print(f"{n} groups: all three hosts restarted, their groups created in {created:.2f}s; "
          f"every group had a leader after {led_at:.2f}s (terms its first election took: "
          f"{', '.join(f'{k}: {v} groups' for k, v in sorted(terms.items()))}; "
          f"{first_preferred} first led by their preferred replica; leaders per host then "
          f"{per_host}); every group led by its "
          "preferred replica " + (f"after {balanced_at:.2f}s" if balanced_at is not None
                                  else f"not within {wait:.0f}s"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=1000, help="groups")
    parser.add_argument("--all", action="store_true", help="restart all three hosts")
    args = parser.parse_args()
    uvloop.run(main(args.n, args.all))
