"""The simulator's parts that its nemeses share with it: simulated nodes, and the queue
of events in simulated time."""
from __future__ import annotations

import heapq
import random
from typing import Any

from fastraft.engine import Engine, Timer
from fastraft.testing.simdisks import Disk


class EventQueue:
    """Events in simulated time: ``(time, sequence, kind, args)`` run by ``_ev_<kind>``."""

    now: float
    rng: random.Random
    _events: list[Any]
    _seq: int

    def _schedule(self, delay: float, kind: str, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, kind, args))

    def _exp(self, mean: float) -> float:
        return self.rng.expovariate(1.0 / mean)


class SimNode:
    """One simulated node: its engine, disk, state machine and clock."""

    __slots__ = ("id", "engine", "disk", "alive", "timer_tokens", "fsyncs", "state_machine",
                 "applied", "applied_log", "incoming", "snapshot_at", "snapshots",
                 "clock_rate", "clock_offset", "lease_until", "heard_at", "suspected",
                 "boots", "boots_seen")

    def __init__(self, node_id: int, disk: Disk) -> None:
        self.id = node_id
        # Set when the node first starts (and anew on each restart); only nodes that are
        # alive are stepped, so no caller meets the None of a node never started.
        self.engine: Engine = None  # type: ignore[assignment]
        self.disk = disk
        self.alive = False
        self.timer_tokens = {t: 0 for t in Timer}
        #: Writes in flight, oldest first: [writes, sends released when durable].
        self.fsyncs: list[list[Any]] = []
        self.state_machine: Any = None
        self.applied = 0
        #: (term, kind, data) of every entry applied, by index - 1.
        self.applied_log: list[tuple[int, int, bytes]] = []
        #: A snapshot being received: [last included index, bytes so far].
        self.incoming: list[Any] | None = None
        self.snapshot_at = 0
        #: Bytes of the snapshots the engine may still stream (volatile, like a driver's).
        self.snapshots: dict[int, bytes] = {}
        #: This node's clock: clock_rate * simulated time + clock_offset.
        self.clock_rate = 1.0
        self.clock_offset = 0.0
        #: Lease reads: the node's clock time until which its leadership lease holds.
        self.lease_until = 0.0
        #: Liveness (quiescence): when each peer was last heard, and the peers silent
        #: for longer than election_timeout_min.
        self.heard_at: dict[int, float] = {}
        self.suspected: set[int] = set()
        #: How many times this node started; each peer's count when this node last
        #: heard it (a new one: the peer restarted, as a new connection says to a host).
        self.boots = 0
        self.boots_seen: dict[int, int] = {}
