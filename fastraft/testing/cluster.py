"""``LocalCluster``: real ``RaftNode``s in one event loop over an in-memory network.

For testing an application's state machine against a real cluster without sockets::

    async with LocalCluster(3, state_machine=MyStateMachine) as cluster:
        leader = await cluster.leader()
        await leader.propose(b"...")
        cluster.hub.isolate(leader.id)       # partitions
        await cluster.restart(2)             # restart with its storage
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from fastraft.config import Config
from fastraft.node import RaftNode
from fastraft.storage import MemoryStorage
from fastraft.transport.memory import MemoryHub


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Wait until ``predicate()`` holds, polling each loop turn and then every few ms;
    raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    interval = 0.0
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
        interval = min(0.005, interval + 0.0005)


class LocalCluster:
    def __init__(self, nodes: int = 3, *, state_machine: Callable[[], Any],
                 config: Config | None = None,
                 storage: Callable[[], Any] = MemoryStorage, seed: int = 0) -> None:
        self.size = nodes
        self.state_machine_factory = state_machine
        self.config = config or Config()
        self.storage_factory = storage
        self.rng = random.Random(seed)
        self.hub = MemoryHub()
        self.members = {i: f"local:{i}" for i in range(1, nodes + 1)}
        self.storages = {i: storage() for i in self.members}
        self.state_machines: dict[int, Any] = {}
        self.nodes: dict[int, RaftNode] = {}

    def _make(self, node_id: int) -> RaftNode:
        sm = self.state_machines[node_id] = self.state_machine_factory()
        return RaftNode(node_id, storage=self.storages[node_id],
                        network=self.hub.network(node_id), state_machine=sm,
                        config=self.config, rng=random.Random(self.rng.random()))

    async def start(self) -> LocalCluster:
        for i in self.members:
            self.nodes[i] = self._make(i)
            await self.nodes[i].start()
        for node in self.nodes.values():
            await node.initialize(self.members)
        return self

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.stop()

    async def __aenter__(self) -> LocalCluster:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def leader(self, timeout: float = 10.0, exclude: set[int] = frozenset()) -> RaftNode:
        """The node that leads (and that a majority follows), once there is one."""
        def current():
            for n in self.nodes.values():
                if n.id not in exclude and n._running and n.is_leader:
                    followers = sum(1 for m in self.nodes.values()
                                    if m._running and m.engine.leader_id == n.id)
                    if followers * 2 > self.size:
                        return n
            return None
        await wait_until(lambda: current() is not None, timeout, "a leader")
        return current()

    async def restart(self, node_id: int) -> RaftNode:
        """Stop node ``node_id`` and start a new one on the same storage."""
        await self.nodes[node_id].stop()
        node = self.nodes[node_id] = self._make(node_id)
        await node.start()
        return node
