"""Real-process chaos, Jepsen style: a 5-node KV cluster of ``fastraft node`` processes on
FileStorage (fsync on), clients recording a history through the client port, and a
nemesis that kills (-9, or SIGTERM to the leader) and restarts nodes, pauses them
(SIGSTOP past the election timeout), cuts the network (each node in its own network
namespace: majority/minority, an isolated leader, a bridge, one-way cuts) and changes
membership meanwhile.

Afterwards: the history is linearizable (``fastraft.testing.linearizability``), every
acknowledged write is there, all nodes converge, and no node logged a traceback. Without
root (no namespaces) the nodes run on loopback and the nemesis does everything but
partitions.

The same with every node a host of four groups (``fastraft node --groups 4``: a group
per shard of the keys, one WAL per node, quiet groups, leaders balanced across the
hosts); each fault picks a group, whose leader is the one a fault may single out and
whose membership changes (``group=`` on the client's requests).

Bounded: ``FASTRAFT_CHAOS_SECONDS`` of faults (default 35); ``pytest tests/test_chaos.py
--long`` runs 30 minutes. A summary (operations, faults, unknown outcomes, checker time)
is printed and written to ``chaos-summary.json`` in the test's directory.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
import warnings

from fastraft.kvclient import ClientError, KVClient, find_leader
from fastraft.kvprotocol import shard_of
from fastraft.processes import ProcessCluster
from fastraft.testing.linearizability import History, check

import netns
from nodelogs import tracebacks

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

NODES = 5
KEYS = [f"k{i}" for i in range(8)]
#: A request not answered in this long has an unknown outcome.
OP_TIMEOUT = 1.0
WORKERS = 6


class Connections:
    """One worker's connections to every node, opened again after a loss."""

    def __init__(self, addresses: dict[int, str], cluster_id: str) -> None:
        self.addresses = addresses
        self.cluster_id = cluster_id
        self.open: dict[int, KVClient] = {}

    async def to(self, i: int) -> KVClient:
        c = self.open.get(i)
        if c is None or c.closed:
            c = self.open[i] = await KVClient.connect(self.addresses[i], timeout=0.5,
                                                        cluster_id=self.cluster_id)
        return c

    def close(self) -> None:
        for c in self.open.values():
            c.close()


class Workload:
    """Workers put unique values to a few shared keys (and to keys of their own, written
    once, for the durability check) and read them back from any node."""

    def __init__(self, addresses: dict[int, str], cluster_id: str, seed: int,
                 groups: int = 1) -> None:
        self.addresses = addresses
        self.cluster_id = cluster_id
        self.groups = groups
        self.history = History()
        self.rng = random.Random(seed)
        self.acked_unique: dict[str, bytes] = {}
        #: Once-written keys whose put certainly failed: no node may hold them.
        self.failed_unique: list[str] = []
        self.stats = {"ok": 0, "fail": 0, "unknown": 0}
        self.errors: dict[str, int] = {}
        self.stop = asyncio.Event()

    async def worker(self, w: int) -> None:
        rng = random.Random(self.rng.random())
        conns = Connections(self.addresses, self.cluster_id)
        ids = sorted(self.addresses)
        process = w * 1_000_000
        #: Where to send the writes of each group (the shard of a key).
        leaders = [rng.choice(ids) for _ in range(self.groups)]
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                r = rng.random()
                if r < 0.15:
                    kind, key = "put", f"u{w}-{n}"
                elif r < 0.55:
                    kind, key = "put", rng.choice(KEYS)
                else:
                    kind, key = "get", rng.choice(KEYS)
                shard = shard_of(key, self.groups)
                target = leaders[shard] if kind == "put" else rng.choice(ids)
                try:
                    conn = await conns.to(target)
                except (OSError, asyncio.TimeoutError):
                    leaders[shard] = rng.choice(ids)
                    await asyncio.sleep(0.02)
                    continue
                value = f"{w}-{n}".encode()
                op = self.history.invoke(process, kind, key, value if kind == "put" else None)
                outcome = await self._request(conn, kind, key, value)
                if len(outcome) == 3:
                    self.errors[outcome[2]] = self.errors.get(outcome[2], 0) + 1
                if outcome[0] == "ok":
                    self.stats["ok"] += 1
                    if kind == "put":
                        self.history.ok(op)
                        if key.startswith("u"):
                            self.acked_unique[key] = value
                    else:
                        self.history.ok(op, output=outcome[1])
                elif outcome[0] == "fail" or kind == "get":
                    self.stats["fail"] += 1  # certainly not done (a read changes nothing)
                    self.history.fail(op)
                    if kind == "put" and key.startswith("u"):
                        self.failed_unique.append(key)
                    if outcome[1] is not None:
                        leaders[shard] = outcome[1]
                    else:  # no leader known there: ask another node, a moment later
                        leaders[shard] = rng.choice(ids)
                        await asyncio.sleep(0.01)
                else:
                    # Unknown: it may take effect at any time, or never. The client's next
                    # operation comes from a new process, as in Jepsen.
                    self.stats["unknown"] += 1
                    self.history.info(op)
                    process += 1
                    leaders[shard] = rng.choice(ids)
        finally:
            conns.close()

    @staticmethod
    async def _request(conn: KVClient, kind: str, key: str, value: bytes):
        """("ok", value read) | ("fail", leader to try, error) | ("unknown", None, error)."""
        try:
            resp = await asyncio.wait_for(
                conn.request(kind, key, value if kind == "put" else b""), OP_TIMEOUT)
        except asyncio.TimeoutError:
            return "unknown", None, "timeout"
        except ConnectionError:
            return "unknown", None, "connection lost"
        except ClientError as exc:
            error = exc.error.split(":")[0]
            # not_leader and Overloaded are refusals before the entry entered any log;
            # not_committed (a later leader committed other entries in its place, or a
            # stopping node had not appended it) is a claim the checker and the final
            # reads hold the node to
            if exc.error == "not_leader" or exc.error == "not_committed":
                return "fail", exc.leader, error
            if exc.error.startswith("Overloaded"):
                return "fail", None, error
            return "unknown", None, error
        return "ok", resp.value


class Nemesis:
    def __init__(self, cluster: ProcessCluster, network: netns.Network | None,
                 rng: random.Random, timeline: str, groups: int = 1) -> None:
        self.timeline = open(timeline, "a", buffering=1)
        self.cluster = cluster
        self.network = network
        self.rng = rng
        self.down: set[int] = set()
        self.paused: set[int] = set()
        self.faults: dict[str, int] = {}
        self.voters = set(cluster.ids)
        #: Nodes of several groups: each fault picks one, whose leader is "the leader"
        #: and whose membership changes (None: the nodes' only group).
        self.groups = groups
        self.group: int | None = None
        self.admin = Connections(cluster.client, cluster.cluster_id)

    async def leader(self) -> int | None:
        clients = {}
        for i in self.cluster.ids:
            if i in self.down or i in self.paused:
                continue
            try:
                clients[i] = await asyncio.wait_for(self.admin.to(i), 0.5)
            except (OSError, asyncio.TimeoutError):
                pass
        try:
            return await find_leader(clients, timeout=0.5, group=self.group)
        except TimeoutError:
            return None

    def _count(self, name: str, what: str = "") -> None:
        self.faults[name] = self.faults.get(name, 0) + 1
        self.note(f"{name} {what}")

    def note(self, what: str) -> None:
        """The timeline (nemesis.log beside the node logs, whose times it shares)."""
        now = time.time()
        self.timeline.write(time.strftime("%H:%M:%S", time.localtime(now))
                            + f",{int(now % 1 * 1000):03d} {what}\n")

    async def one_fault(self) -> None:
        """Inject one fault, hold it a while, heal it."""
        rng, ids = self.rng, self.cluster.ids
        if self.groups > 1:
            self.group = rng.randrange(self.groups)
        choices = ["kill", "pause", "membership"]
        if self.network is not None:
            choices += ["majority-minority", "isolate-leader", "bridge", "one-way"]
        name = rng.choice(choices)
        if name == "kill" and rng.random() < 0.3:
            # SIGTERM to the leader, as a rolling restart does: it answers its writes in
            # flight before it exits
            name = "stop"
        leader = await self.leader()
        victim = leader if leader is not None and (name == "stop" or rng.random() < 0.5) \
            else rng.choice(ids)
        hold = rng.uniform(1.0, 3.0)
        of = "" if self.group is None else f" of group {self.group}"
        self._count(name, f"victim {victim} leader {leader}{of} for {hold:.1f}s")
        if name in ("kill", "stop"):
            if name == "kill":
                self.cluster.kill(victim)
            else:  # the clients go on meanwhile: the node answers them as it stops
                await asyncio.get_running_loop().run_in_executor(
                    None, self.cluster.terminate, victim)
            self.down.add(victim)
            await asyncio.sleep(hold)
            self.cluster.start(victim)
            self.down.discard(victim)
        elif name == "pause":
            self.cluster.pause(victim)
            self.paused.add(victim)
            await asyncio.sleep(hold)
            self.cluster.resume(victim)
            self.paused.discard(victim)
        elif name == "membership":
            await self.remove(victim)
            await asyncio.sleep(hold)
            await self.restore_membership()
        else:
            net = self.network
            others = [i for i in ids if i != victim]
            if name == "majority-minority":
                shuffled = rng.sample(ids, len(ids))
                net.split(set(shuffled[:2]), set(shuffled[2:]))
            elif name == "isolate-leader":
                net.split({victim}, set(others))
            elif name == "bridge":
                # the victim sees both halves; the halves do not see each other
                rng.shuffle(others)
                net.split(set(others[:2]), set(others[2:]))
            else:  # one-way: the victim's packets to the others are lost, not theirs
                for o in others:
                    net.cut(victim, o)
            # a membership change during a partition
            removing = rng.random() < 0.3
            if removing:
                await self.remove(rng.choice(ids))
            await asyncio.sleep(hold)
            net.heal()
            if removing:
                # added back once healed: a node cut off cannot catch up to be promoted
                await self.restore_membership()
        self.note(f"healed {name}")

    async def _on_leader(self, op: str, *args) -> bool:
        leader = await self.leader()
        if leader is None:
            return False
        try:
            conn = await asyncio.wait_for(self.admin.to(leader), 0.5)
            await asyncio.wait_for(getattr(conn, op)(*args, group=self.group), 5.0)
            return True
        except (ClientError, ConnectionError, OSError, asyncio.TimeoutError):
            return False

    async def remove(self, node: int) -> None:
        """Remove voter ``node`` (maybe the leader); ``restore_membership`` adds it back
        as a learner and promotes it."""
        if await self._on_leader("change_membership", self.voters - {node}):
            self._count("removed", f"node {node}")

    async def restore_every_membership(self, attempts: int) -> bool:
        """``restore_membership`` of every group."""
        for group in range(self.groups) if self.groups > 1 else [None]:
            self.group = group
            if not await self.restore_membership(attempts):
                return False
        return True

    async def restore_membership(self, attempts: int = 3) -> bool:
        for _ in range(attempts):
            status = await self._leader_status()
            if status is None:
                await asyncio.sleep(0.2)
                continue
            m = status["membership"]
            if m["outgoing"]:  # a joint configuration: a change is still under way
                await asyncio.sleep(0.2)
                continue
            voters, learners = set(m["voters"]), set(m["learners"])
            missing = self.voters - voters
            if not missing:
                return True
            for node in missing - learners:
                await self._on_leader("add_learner", node, self.cluster.raft[node])
            if await self._on_leader("change_membership", self.voters):
                self._count("re-added", f"nodes {sorted(missing)}")
        return False

    async def _leader_status(self) -> dict | None:
        leader = await self.leader()
        if leader is None:
            return None
        try:
            return await asyncio.wait_for((await self.admin.to(leader)).status(self.group),
                                          1.0)
        except (ClientError, ConnectionError, OSError, asyncio.TimeoutError):
            return None

    async def heal(self) -> None:
        if self.network is not None:
            self.network.heal()
        for i in list(self.paused):
            self.cluster.resume(i)
        self.paused.clear()
        for i in list(self.down):
            self.cluster.start(i)
        self.down.clear()


async def final_reads(workload: Workload, cluster: ProcessCluster, timeout: float = 60.0):
    """After healing: on every node, a linearizable read of every key (into the history)
    and of every acknowledged unique key."""
    clients = await cluster.connect_all()
    try:
        leader = await find_leader(clients, timeout=timeout)
        target = (await clients[leader].status())["commit_index"]
        deadline = time.monotonic() + timeout
        for i, c in clients.items():
            while (await c.status())["applied_index"] < target:
                assert time.monotonic() < deadline, f"node {i} did not catch up to {target}"
                await asyncio.sleep(0.05)
        seen = {}
        workload.stats["final_reads_retried"] = 0

        async def get(c: KVClient, key: str) -> bytes | None:
            # A read the node could not confirm in time (say its request to the leader
            # was lost while a link reconnected) is answered not_leader, a certain
            # failure with no effect: a client asks again.
            while True:
                try:
                    return await c.get(key)
                except ClientError as exc:
                    if exc.error != "not_leader" or time.monotonic() > deadline:
                        raise
                    workload.stats["final_reads_retried"] += 1
                await asyncio.sleep(0.05)

        for i, c in clients.items():
            for key in KEYS:
                op = workload.history.invoke(-i, "get", key)
                value = await get(c, key)
                workload.history.ok(op, output=value)
                seen.setdefault(key, value)
                assert seen[key] == value, f"node {i} reads {key}={value!r}, " \
                    f"another node {seen[key]!r}"
            acked = list(workload.acked_unique.items())
            for start in range(0, len(acked), 1000):  # pipelined, a thousand at a time
                chunk = acked[start:start + 1000]
                got = await asyncio.gather(*[get(c, key) for key, _ in chunk])
                for (key, value), read in zip(chunk, got):
                    assert read == value, f"acknowledged {key} lost on node {i}"
            failed = workload.failed_unique
            for key, read in zip(failed, await asyncio.gather(*[get(c, k) for k in failed])):
                assert read is None, f"{key}, whose put failed, is {read!r} on node {i}"
        return {i: (await c.status())["applied_index"] for i, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()


async def chaos(tmp_path, seconds: float, seed: int, groups: int = 1) -> dict:
    rng = random.Random(seed)
    reason = netns.why_unavailable()
    network = None
    if reason is None:
        network = netns.Network(list(range(1, NODES + 1)))
    else:
        warnings.warn(f"chaos without partitions: {reason}", stacklevel=1)
    # The seed also picks the configuration: lease reads (paused leaders must not serve
    # stale reads), snapshots every 300 entries (installed on nodes that fell behind).
    leases, snapshots = seed % 2 == 1, seed // 2 % 2 == 1
    options = ["--lease-reads"] * leases + ["--snapshot-interval", "300"] * snapshots
    if groups > 1:
        options += ["--groups", str(groups)]
    cluster = ProcessCluster(
        NODES, str(tmp_path), data_dir=str(tmp_path / "data"),
        # role and membership changes at INFO: a timeline beside nemesis.log
        extra_args=["--log-level", "INFO", *options],
        hosts=network.hosts if network else None,
        command_prefix=network.command_prefix if network else None)
    nemesis = Nemesis(cluster, network, rng, str(tmp_path / "nemesis.log"), groups)
    nemesis.note(f"seed {seed} {' '.join(options)}")
    workload = Workload(cluster.client, cluster.cluster_id, seed, groups)
    try:
        cluster.start_all()
        probe = await cluster.connect_all()
        await find_leader(probe)
        for c in probe.values():
            c.close()
        workers = [asyncio.ensure_future(workload.worker(w)) for w in range(WORKERS)]
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < seconds:
            await nemesis.one_fault()
            rounds += 1
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # healed: the cluster recovers
        await nemesis.heal()
        assert await nemesis.restore_every_membership(attempts=20), "membership not restored"
        # some operations succeed on the healed cluster before the clients stop
        healed_ok = workload.stats["ok"] + 100
        deadline = time.monotonic() + 30
        while workload.stats["ok"] < healed_ok:
            assert time.monotonic() < deadline, "no progress after healing"
            await asyncio.sleep(0.05)
        workload.stop.set()
        await asyncio.gather(*workers)
        applied = await final_reads(workload, cluster)
        t0 = time.monotonic()
        result = check(workload.history)
        checker_seconds = time.monotonic() - t0
        summary = {"seconds": round(time.monotonic() - started, 1), "seed": seed, "groups": groups,
                   "partitions": network is not None, "options": options, "nemesis_rounds": rounds,
                   "faults": nemesis.faults, "operations": len(workload.history.operations),
                   **workload.stats, "errors": workload.errors,
                   "acknowledged_unique": len(workload.acked_unique),
                   "failed_unique": len(workload.failed_unique),
                   "applied": applied, "checker_seconds": round(checker_seconds, 2)}
        (tmp_path / "chaos-summary.json").write_text(json.dumps(summary, indent=1))
        print("chaos:", json.dumps(summary))
        assert result.ok, result.explain()
        assert workload.stats["ok"] > 100, summary
        unhandled = tracebacks({i: cluster.log(i) for i in cluster.ids})
        assert not unhandled, "\n".join(unhandled)
        return summary
    finally:
        nemesis.timeline.close()
        nemesis.admin.close()
        cluster.stop_all()
        if network is not None:
            network.close()


def run_chaos(tmp_path, request, default_seconds: float, groups: int = 1) -> dict:
    seconds = 1800.0 if request.config.getoption("--long") else \
        float(os.environ.get("FASTRAFT_CHAOS_SECONDS", str(default_seconds)))
    seed = int(os.environ.get("FASTRAFT_CHAOS_SEED", str(random.randrange(10**6))))
    print(f"chaos seed {seed} (FASTRAFT_CHAOS_SEED={seed} to pick the same faults)")

    async def bounded():
        return await asyncio.wait_for(chaos(tmp_path, seconds, seed, groups), seconds + 240)
    summary = uvloop.run(bounded()) if uvloop is not None else asyncio.run(bounded())
    assert summary["nemesis_rounds"] >= 3
    return summary


def test_chaos_history_is_linearizable_and_nothing_acknowledged_is_lost(tmp_path, request):
    run_chaos(tmp_path, request, 35)


def test_chaos_of_hosts_of_groups_is_linearizable_and_loses_nothing(tmp_path, request):
    """Every node a host of four groups: the keys of the history spread over all of them,
    and each fault picks a group (whose leader is the one isolated, whose membership
    changes)."""
    run_chaos(tmp_path, request, 25, groups=4)
