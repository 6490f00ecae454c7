"""Partitions set up on purpose (not drawn by a seed as in ``test_chaos.py``): real
``fastraft node`` processes, each in a network namespace of its own (``netns``; needs
root, else skipped)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import time

import pytest

from fastraft.kvclient import KVClient, find_leader
from fastraft.processes import ProcessCluster

import netns
from aio import run, until

#: How far the kernel's resends on the leader's connection back off before the heal: the
#: 6th comes 63 retransmission timeouts (~13 s) after the first segment lost, the next
#: 64 later, so a connection kept would stay silent ~13 s after the heal.
BACKOFF = 6
#: The cut lasts until then, or this long (a connection given up never backs off so far).
CUT_AT_MOST = 16.0
#: After the heal, the follower hears its leader within this long.
HEARD_WITHIN = 6.0


def retransmit_backoff(network: netns.Network, a: int, b: int) -> int:
    """The largest retransmission backoff among ``a``'s connections to ``b``'s Raft port,
    as ``ss`` reads it in ``a``'s namespace."""
    out = subprocess.run(
        [*network.command_prefix(a), "ss", "-tin", "dst",
         f"{network.hosts[b]}:{ProcessCluster.RAFT_PORT}"],
        capture_output=True, text=True, check=True).stdout
    return max((int(n) for n in re.findall(r"\bbackoff:(\d+)", out)), default=0)


@pytest.fixture
def network():
    reason = netns.why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = netns.Network([1, 2, 3])
    yield net
    net.close()


@run
async def test_a_follower_whose_answers_were_cut_hears_its_leader_soon_after_the_heal(
        tmp_path, network):
    """The follower's packets to the leader are dropped: its acknowledgements of the
    leader's segments too, so the leader's kernel resends them ever less often (TCP's
    exponential backoff; a broken router does the same). Once the link heals, the
    follower must not wait for the next of those resends (~13 s after the heal here): the transport
    gives up a connection whose data stays unacknowledged and dials again."""
    cluster = ProcessCluster(3, str(tmp_path), hosts=network.hosts,
                             command_prefix=network.command_prefix)
    clients: dict[int, KVClient] = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        follower = min(i for i in cluster.ids if i != leader)
        await clients[leader].put("before", b"1")

        network.cut(follower, leader)
        cut_until = time.monotonic() + CUT_AT_MOST
        while retransmit_backoff(network, leader, follower) < BACKOFF and \
                time.monotonic() < cut_until:
            await asyncio.sleep(0.1)
        network.heal()
        healed = time.monotonic()

        index = await clients[leader].put("after", b"2")

        async def caught_up() -> bool:
            status = await clients[follower].status()
            return status["leader_id"] == leader and status["applied_index"] >= index
        await until(caught_up, f"node {follower} hearing its leader {leader} after the heal",
                    timeout=HEARD_WITHIN)
        print(f"heard {time.monotonic() - healed:.2f}s after the heal")
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()
