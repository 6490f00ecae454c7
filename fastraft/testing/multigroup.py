"""Several Raft groups on the same simulated nodes, as ``RaftHost`` runs them.

Each group is a ``Simulator`` with its own engines, disks, clients and invariants; what
they share is what a host's groups share: one clock, the nodes (a crash takes down every
group's replica on that node, a restart brings them all back), the network (a partition
cuts every group alike) and its frames: the messages one node sends another at one
instant, whatever their group, travel in one frame with one fate (lost, delayed or
duplicated together), as ``TcpNetwork`` sends every group's messages of a loop turn in
one frame. Everything random comes from one seed::

    from fastraft.testing.multigroup import MultiGroupSimulator
    MultiGroupSimulator(seed=42, groups=8, nodes=3).run(3.0)

Invariants are each group's (``Simulator``); a violation names the group's seed.
"""
from __future__ import annotations

import heapq
import random
from typing import Any

import msgspec

from fastraft.config import Config
from fastraft.testing.faults import Faults, random_partition
from fastraft.testing.simnode import EventQueue
from fastraft.testing.simulator import Simulator


class _Frames:
    """One fate per (sender, receiver, instant), for every group's messages."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._last: dict[tuple[int, int], tuple[float, tuple[float, ...]]] = {}
        #: Frames decided, and messages that rode in one another group's message opened.
        self.frames = 0
        self.shared = 0

    def fate(self, sim: Simulator, frm: int, to: int) -> tuple[float, ...]:
        seen = self._last.get((frm, to))
        if seen is not None and seen[0] == sim.now:
            self.shared += 1
            return seen[1]
        fate = sim.fate(self.rng, frm, to)
        self._last[frm, to] = (sim.now, fate)
        self.frames += 1
        return fate


class MultiGroupSimulator(EventQueue):
    """See the module docstring. ``faults`` apply to nodes and the network as a whole
    (partitions, crashes) and to each frame (drops, duplicates, delays); leader flapping
    and clock skew, which single out one group's leader, are not modelled here."""

    def __init__(self, seed: int, groups: int = 4, nodes: int = 3,
                 faults: Faults | None = None, config: Config | None = None,
                 **group_options: Any) -> None:
        faults = faults if faults is not None else Faults()
        if faults.flap_leader or faults.skew_every:
            raise ValueError("flap_leader and skew_every single out one group's leader: "
                             "use Simulator for them")
        self.seed = seed
        self.faults = faults
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[Any] = []
        self._seq = 0
        self._faults_on = True
        self.frames = _Frames(self.rng)
        # node-wide faults are the host's to schedule, not each group's
        per_group = msgspec.structs.replace(faults, partition_every=0, crash_every=0)
        self.groups = []
        for g in range(groups):
            sim = Simulator(seed * 1000 + g, nodes=nodes, faults=per_group, config=config,
                            **group_options)
            sim.frames = self.frames
            self.groups.append(sim)
        self.node_ids = list(self.groups[0].nodes)
        self.stats = {"partitions": 0, "node_crashes": 0}
        if faults.partition_every:
            self._schedule(self._exp(faults.partition_every), "partition")
        if faults.crash_every:
            self._schedule(self._exp(faults.crash_every), "crash")

    def run(self, duration: float = 3.0, settle: float = 4.0) -> MultiGroupSimulator:
        """Run with faults for ``duration``, heal, then check that every group converges
        and that its clients' history is linearizable."""
        self.run_until(self.now + duration)
        self._faults_on = False
        for sim in self.groups:
            sim.heal()
            sim.check_converged(settle)
            sim.check_history()
        return self

    def run_until(self, deadline: float) -> None:
        """Run every event, the hosts' and every group's, in time order up to ``deadline``."""
        while True:
            sim = min(self.groups, key=lambda s: s.next_event_at)
            own = self._events[0][0] if self._events else float("inf")
            at = min(own, sim.next_event_at)
            if at > deadline:
                break
            if own <= sim.next_event_at:
                t, _, kind, args = heapq.heappop(self._events)
                self.now = t
                for s in self.groups:
                    s.now = max(s.now, t)  # what the event schedules starts from now
                getattr(self, "_ev_" + kind)(*args)
            else:
                sim.run_next()
        self.now = deadline
        for sim in self.groups:
            sim.now = max(sim.now, deadline)

    def totals(self) -> dict[str, int]:
        """Every group's counters added up, with the hosts' own."""
        out = dict(self.stats)
        for sim in self.groups:
            for k, v in sim.stats.items():
                out[k] = out.get(k, 0) + v
        out["frames"] = self.frames.frames
        out["shared_frames"] = self.frames.shared
        return out

    # ------------------------------------------------------------------ node-wide faults

    def _ev_partition(self) -> None:
        if not self._faults_on:
            return
        partition = random_partition(self.rng, self.node_ids)
        one_way = self.rng.random() < self.faults.one_way
        for sim in self.groups:
            sim._partition = partition
            sim._one_way = one_way
        self.stats["partitions"] += 1
        self._schedule(self.faults.partition_for, "unpartition")

    def _ev_unpartition(self) -> None:
        for sim in self.groups:
            sim._partition = None
        if self._faults_on:
            self._schedule(self._exp(self.faults.partition_every), "partition")

    def _ev_crash(self) -> None:
        if not self._faults_on:
            return
        alive = [i for i in self.node_ids if self.groups[0].nodes[i].alive]
        if alive:
            node_id = self.rng.choice(alive)
            for sim in self.groups:  # the process dies: every group's replica on it
                sim._crash(sim.nodes[node_id])
            self.stats["node_crashes"] += 1
            self._schedule(self.faults.down_for, "restart", node_id)
        self._schedule(self._exp(self.faults.crash_every), "crash")

    def _ev_restart(self, node_id: int) -> None:
        for sim in self.groups:
            sim._ev_restart(node_id)
