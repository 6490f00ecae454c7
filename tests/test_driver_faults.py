"""The node's driver (apply task, writer, snapshot transfer, log reader) under slow hooks
and faults, in one process: a state machine and a storage that sometimes take their
time, caches and snapshot intervals small enough that entries are applied from storage
and snapshots are installed while older work is still queued, and a nemesis that cuts
nodes off, partitions and restarts them, hands leadership over and asks for snapshots.
The simulator checks the engine's rules with instant hooks; this is where the driver's
interleavings are tried (it found three bugs: a snapshot taken, or entries read from
storage, behind a leader's snapshot being installed; a founder that had voted before
its ``initialize()``).

The same with three ``RaftHost``s on loopback whose groups go quiet between sparse
writes, a host cut off or restarted now and then.

Meanwhile every read (``read_index`` on a random node) sees the last write acknowledged
before it began; afterwards no node stopped itself, and every acknowledged write was
applied once, in the same order, on every node. Timing is real, so a run is not
replayable; the seed picks the configuration and the faults (``FASTRAFT_DRIVER_SEED``),
``FASTRAFT_DRIVER_SECONDS`` how long they last (default 4).
"""
from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from fastraft.asyncutil import wait_within
from fastraft.config import Config
from fastraft.errors import FastRaftError, NotLeader, ProposalDropped
from fastraft.node import RaftNode
from fastraft.sharedwal import SharedWAL
from fastraft.storage import AsyncMemoryStorage, MemoryStorage
from fastraft.testing import LocalCluster, wait_until

from aio import run
from test_host import GROUPS, Hosts, all_quiet

SECONDS = float(os.environ.get("FASTRAFT_DRIVER_SECONDS", "4"))
BASE_SEED = int(os.environ.get("FASTRAFT_DRIVER_SEED", str(random.randrange(10**6))))


class SlowValues:
    """The values applied, in order; applying sometimes takes a few milliseconds, and
    rarely stalls for longer than a partition lasts."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.values: list[bytes] = []

    async def apply(self, entries):
        roll = self.rng.random()
        if roll < 0.1:  # now and then a few ms, rarely a stall longer than a partition
            await asyncio.sleep(self.rng.uniform(0.001, 0.01) if roll > 0.01 else
                                self.rng.uniform(0.1, 0.5))
        self.values.extend(bytes(e.data) for e in entries)
        return [e.index for e in entries]

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.values)

    def restore(self, data) -> None:
        self.values = msgspec.msgpack.decode(data.read())


class SlowStorage(AsyncMemoryStorage):
    """Appends and snapshot saves sometimes take a few milliseconds (a busy disk), and
    rarely stall."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    async def _busy(self, chance: float, most: float) -> None:
        roll = self.rng.random()
        if roll < chance:
            await asyncio.sleep(self.rng.uniform(0.0005, most) if roll > chance / 10 else
                                self.rng.uniform(0.05, 0.3))

    async def append_entries(self, entries) -> None:  # type: ignore[override]
        await self._busy(0.1, 0.005)
        MemoryStorage.append_entries(self, entries)

    async def save_snapshot(self, meta, data) -> None:  # type: ignore[override]
        await self._busy(0.5, 0.02)
        MemoryStorage.save_snapshot(self, meta, data)


#: ``pick()`` for a writer: a replica that leads and the list its group's acknowledged
#: writes go to; for a reader: any replica and that list. None: nothing to pick now.
Pick = Callable[[], "tuple[RaftNode, list[bytes]] | None"]


async def writer(pick: Pick, name: str, stop: asyncio.Event,
                 pause: Callable[[], float] | None = None) -> None:
    """Proposes new values one after another to the leader ``pick`` gives; a value whose
    proposal failed is never proposed again (its outcome is unknown)."""
    n = 0
    while not stop.is_set():
        picked = pick()
        if picked is None:
            await asyncio.sleep(0.005)
            continue
        leader, acked = picked
        value = b"%s-%d" % (name.encode(), n)
        n += 1
        try:
            await wait_within(leader.propose(value), 1.0)
            acked.append(value)
        except (FastRaftError, asyncio.TimeoutError):
            await asyncio.sleep(0.005)
        if pause is not None:
            await asyncio.sleep(pause())


async def reader(pick: Pick, stop: asyncio.Event, every: float) -> int:
    """Linearizable reads: once ``read_index()`` returns, the replica's state machine
    holds the last write its group acknowledged before the read began."""
    reads = 0
    while not stop.is_set():
        await asyncio.sleep(every)
        picked = pick()
        if picked is None or not picked[1]:
            continue
        node, acked = picked
        before = acked[-1]
        try:
            await wait_within(node.read_index(), 1.0)
        except (FastRaftError, asyncio.TimeoutError):
            continue
        assert before in node.state_machine.values, f"a stale read on node {node.id}"
        reads += 1
    return reads


async def for_a_while(stop: asyncio.Event, writers: list[asyncio.Future],
                      readers: list[asyncio.Future],
                      faults: asyncio.Future) -> tuple[int, list[str]]:
    """Let them run for ``SECONDS``, then stop them: the reads done, the faults made.
    Stopped also when the test is cancelled (its deadline): the writers' and readers'
    loops end only on ``stop``, and would hang the loop's close."""
    try:
        await asyncio.sleep(SECONDS)
    finally:
        stop.set()
    await asyncio.gather(*writers)
    return sum(await asyncio.gather(*readers)), await faults


async def last_write(find_leader: Callable[[], Awaitable[RaftNode]]) -> int:
    """A write through whichever node leads, once the faults are over; retried (with a
    new value) while leadership still moves. Returns its index."""
    tries = 0
    while True:
        try:
            return int(await (await find_leader()).propose(b"last-%d" % tries))
        except (NotLeader, ProposalDropped):
            tries += 1
            await asyncio.sleep(0.01)


async def change_members(c: LocalCluster, leader: RaftNode, node_id: int) -> None:
    """Membership moves one step (§6): a node outside becomes a learner, learners are
    promoted, or, with more than three voters, ``node_id`` is removed."""
    m = leader.engine.membership
    if node_id not in m.members:
        await leader.add_learner(node_id, c.addresses[node_id], timeout=1.0)
    elif m.learners:
        await leader.change_membership(set(m.voters | m.learners), timeout=1.0)
    elif len(m.voters) > 3 and node_id in m.voters:
        await leader.change_membership(set(m.voters - {node_id}), timeout=1.0)


async def nemesis(c: LocalCluster, rng: random.Random, stop: asyncio.Event) -> list[str]:
    done = []
    background: list[asyncio.Future] = []
    ids = sorted(c.nodes)
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.05, 0.3))
        fault = rng.choice(["isolate", "partition", "heal", "heal", "restart", "transfer",
                            "snapshot", "membership"])
        victim = rng.choice(ids)
        leader = next((n for n in c.nodes.values() if n._running and n.is_leader), None)
        if fault == "transfer" and leader is not None and leader.id != victim:
            # in the background: it may wait for the target to catch up
            background.append(asyncio.ensure_future(leader.transfer_leadership(victim, 0.5)))
        elif fault == "membership" and leader is not None:
            background.append(asyncio.ensure_future(change_members(c, leader, victim)))
        elif fault == "snapshot":
            background.append(asyncio.ensure_future(c.nodes[victim].snapshot()))
        elif fault == "isolate":
            c.hub.isolate(victim)
        elif fault == "partition":
            c.hub.partition({victim}, set(ids) - {victim})
        elif fault == "heal":
            c.hub.heal()
        elif fault == "restart":
            await c.restart(victim)
        else:
            continue
        done.append(f"{fault} {victim}")
    c.hub.heal()
    # their outcome does not matter (a transfer may time out, a snapshot call meet a
    # restart), only that none leaves a node stopped or a write lost
    await asyncio.gather(*background, return_exceptions=True)
    return done


@pytest.mark.parametrize("k", range(2))
@run(deadline=56 + SECONDS)
async def test_slow_hooks_small_caches_and_snapshots_under_faults_lose_nothing(k,
                                                                            file_storage):
    seed = BASE_SEED + k
    print(f"driver seed {seed} (FASTRAFT_DRIVER_SEED={BASE_SEED} to pick the same faults)")
    rng = random.Random(seed)
    config = Config(election_timeout_min=0.05, election_timeout_max=0.1,
                    heartbeat_interval=0.01,
                    snapshot_interval=rng.choice([20, 50, 200]),
                    snapshot_trailing_entries=rng.choice([0, 5, 50]),
                    log_cache_bytes=rng.choice([1, 2_000, 50_000]),
                    max_entries_per_message=rng.choice([4, 64, 1024]),
                    lease_reads=rng.choice([False, True]))
    # a third of the runs on FileStorage: its own threads, fsync, segments and compaction
    on_files = rng.random() < 1 / 3
    async with LocalCluster(rng.choice([3, 5]), spares=rng.choice([0, 2]), config=config,
                            state_machine=lambda: SlowValues(random.Random(rng.random())),
                            storage=file_storage if on_files else
                            lambda: SlowStorage(random.Random(rng.random())),
                            seed=seed) as c:
        acked: list[bytes] = []
        stop = asyncio.Event()
        def leading() -> tuple[RaftNode, list[bytes]] | None:
            node = next((n for n in c.nodes.values() if n._running and n.is_leader), None)
            return None if node is None else (node, acked)

        def replica(rng: random.Random) -> Pick:
            def pick() -> tuple[RaftNode, list[bytes]] | None:
                running = [n for n in c.nodes.values() if n._running]
                return (rng.choice(running), acked) if running else None
            return pick

        writers = [asyncio.ensure_future(writer(leading, f"w{i}", stop)) for i in range(4)]
        readers = [asyncio.ensure_future(reader(replica(random.Random(rng.random())), stop,
                                                0.002)) for _ in range(2)]
        faults = asyncio.ensure_future(nemesis(c, rng, stop))
        reads, done = await for_a_while(stop, writers, readers, faults)
        installs = sum(n._recorder.snapshot_install_seconds.count for n in c.nodes.values())
        print(f"{c.size} + {len(c.nodes) - c.size} nodes on "
              f"{'files' if on_files else 'slow memory'}, lease "
              f"reads {config.lease_reads}, snapshot_interval "
              f"{config.snapshot_interval}, trailing "
              f"{config.snapshot_trailing_entries}, log_cache_bytes {config.log_cache_bytes}"
              f": {len(acked)} acknowledged, {reads} reads, {installs} snapshots installed; "
              "faults: "
              + ", ".join(done))
        assert not [n.failure for n in c.nodes.values() if n.failure], done
        last = await last_write(lambda: c.leader(20))
        leader = await c.leader(20)
        m = leader.engine.membership
        print(f"at the end: voters {sorted(m.voters)}, learners {sorted(m.learners)}")
        members = [c.nodes[i] for i in m.members]
        await wait_until(lambda: all(n.applied_index >= last for n in members), 20,
                         "every member applying the last write")
        histories = {n.id: c.state_machines[n.id].values for n in members}
        first = histories[leader.id]
        assert len(set(first)) == len(first), "a value applied twice"
        assert set(acked) <= set(first), "an acknowledged write lost"
        for i, h in histories.items():
            assert h == first, f"node {i} applied another history"


async def host_nemesis(hosts: Hosts, rng: random.Random, stop: asyncio.Event,
                       reopen: Callable[[int], None] | None = None) -> list[str]:
    """Cuts a host off (its frames dropped both ways), heals, restarts a host on its
    storages (its groups initialize again: a no-op); ``reopen(host_id)`` between the
    stop and the start, if given (a SharedWAL closed and recovered from its files)."""
    done = []
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        quiet = sum(h.status()["quiet"] for h in hosts.hosts.values())
        fault, victim = rng.choice(["cut", "heal", "heal", "restart"]), rng.choice([1, 2, 3])
        if fault == "cut":
            for i, h in hosts.hosts.items():
                h.network.receive_filter = lambda frm, i=i, v=victim: (frm == v) == (i == v)
        elif fault == "heal":
            for h in hosts.hosts.values():
                h.network.__dict__.pop("receive_filter", None)
        else:
            await hosts.hosts[victim].stop()
            if reopen is not None:
                reopen(victim)
            await hosts.start(victim)
        done.append(f"{fault} {victim} ({quiet} quiet)")
    for h in hosts.hosts.values():
        h.network.__dict__.pop("receive_filter", None)
    return done


@run(deadline=56 + SECONDS)
async def test_hosts_of_quiet_groups_under_faults_lose_nothing(tmp_path):
    """Three RaftHosts on loopback, groups that go quiet between sparse writes, slow
    state machines, small snapshot intervals and a shared cache budget; a host cut off
    or restarted now and then; in a third of the runs every host's groups share one
    SharedWAL, recovered from its files at each restart. Same checks, per group."""
    seed = BASE_SEED + 100
    print(f"host seed {seed} (FASTRAFT_DRIVER_SEED={BASE_SEED} to pick the same faults)")
    rng = random.Random(seed)
    config = Config(election_timeout_min=0.15, election_timeout_max=0.3,
                    heartbeat_interval=0.03, quiesce_after=0.1,
                    snapshot_interval=rng.choice([20, 100]), snapshot_trailing_entries=5)
    on_wal = rng.random() < 1 / 3
    wals = {i: SharedWAL(str(tmp_path / f"host{i}")) for i in (1, 2, 3)} if on_wal else {}

    def reopen(host_id: int) -> None:
        wals[host_id].close()
        wals[host_id] = SharedWAL(str(tmp_path / f"host{host_id}"))

    hosts = Hosts(config=config, log_cache_bytes=rng.choice([None, 16_000]),
                  state_machine=lambda: SlowValues(random.Random(rng.random())),
                  storage=(lambda host_id: lambda g: wals[host_id].group(g)) if on_wal else None)
    try:
        await soak_hosts(hosts, rng, reopen if on_wal else None)
    finally:
        for wal in wals.values():
            wal.close()


async def soak_hosts(hosts: Hosts, rng: random.Random,
                     reopen: Callable[[int], None] | None) -> None:
    async with hosts:
        acked: dict[int, list[bytes]] = {g: [] for g in GROUPS}
        stop = asyncio.Event()
        def replica(rng: random.Random, leading: bool) -> Pick:
            def pick() -> tuple[RaftNode, list[bytes]] | None:
                g = rng.choice(GROUPS)
                found = [h.group(g) for h in list(hosts.hosts.values())
                         if h._running and g in h.groups
                         and (h.group(g).is_leader or not leading)]
                return (rng.choice(found), acked[g]) if found else None
            return pick

        # sparse writes: a group hears from the writers a few times a second, so it goes
        # quiet between writes and wakes for the next
        writers = [asyncio.ensure_future(writer(
            replica(random.Random(rng.random()), True), f"w{i}", stop,
            pause=lambda: rng.uniform(0, 0.3))) for i in range(8)]
        readers = [asyncio.ensure_future(reader(replica(random.Random(rng.random()), False),
                                                stop, 0.005)) for _ in range(2)]
        faults = asyncio.ensure_future(host_nemesis(hosts, rng, stop, reopen))
        reads, done = await for_a_while(stop, writers, readers, faults)
        print(f"{sum(map(len, acked.values()))} acknowledged, {reads} reads, cache budget "
              f"{hosts.log_cache_bytes}, SharedWAL {reopen is not None}; faults: "
              + ", ".join(done))
        assert not [h.status()["failed"] for h in hosts.hosts.values()
                    if h.status()["failed"]], done
        for g in GROUPS:
            last = await last_write(lambda g=g: hosts.leader(g))
            leader = await hosts.leader(g)
            replicas = [h.group(g) for h in hosts.hosts.values()]
            await wait_until(lambda last=last, replicas=replicas: all(
                n.applied_index >= last for n in replicas), 20,
                f"group {g} applying its last write everywhere")
            first = leader.state_machine.values
            assert len(set(first)) == len(first), f"group {g}: a value applied twice"
            assert set(acked[g]) <= set(first), f"group {g}: an acknowledged write lost"
            for n in replicas:
                assert n.state_machine.values == first, f"group {g} differs on {n.id}"
        if hosts.log_cache_bytes is not None:
            # quiet groups keep no entries in memory, and the host counts none awake
            # nor holding a part of the budget
            await wait_until(lambda: all_quiet(hosts), 20, "every group quiet")
            assert all(h.metrics().log_cache_bytes == 0 and not h._cache_budget.awake and
                       not h._cache_budget.load_share for h in hosts.hosts.values()), done
