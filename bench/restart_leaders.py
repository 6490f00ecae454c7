"""How long a restarted host's replicas of quiet groups take to learn who leads them.

    python bench/restart_leaders.py 3000

Three in-process ``RaftHost`` s on loopback (heartbeats 0.25 s, election timeouts 1.5-3 s,
as the benchmark's hosts of many groups), ``N`` groups on ``MemoryStorage``, all quiet;
host 3 crashes (sends nothing on its way out) and restarts on its storages. Prints how
long its replicas of groups led on hosts 1 and 2 took to know their leader alive, from
the restart. Compare checkouts with ``PYTHONPATH=/path/to/checkout``.
"""
from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from fastraft import Config, MemoryStorage, RaftHost
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


async def main(n: int, wait: float = 60.0) -> None:
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

    for i in (1, 2, 3):
        await start(i, True)
    for _ in range(600):  # up to 120 s for every group to elect a leader and go quiet
        if sum(len(h.leaders()) for h in hosts.values()) == n and \
                all(node.engine.quiet for h in hosts.values() for node in h.groups.values()):
            break
        await asyncio.sleep(0.2)
    led_here = set(hosts[3].leaders())
    hosts[3].network.send_group = lambda *args: None  # a crash: no word to the others
    await hosts[3].stop()
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
    for host in hosts.values():
        await host.stop()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
