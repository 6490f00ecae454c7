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
from collections.abc import Set as AbstractSet
from typing import Any

from fastraft.config import Config
from fastraft.network import RaftNetwork
from fastraft.node import RaftNode
from fastraft.processes import free_ports
from fastraft.storage import MemoryStorage
from fastraft.transport.memory import MemoryHub
from fastraft.transport.tcp import TcpNetwork


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


class _CuttableTcp(TcpNetwork):
    """TcpNetwork whose links the hub can cut: real sockets, test-made partitions."""

    def __init__(self, hub: MemoryHub, node_id: int, listen: str, **options: Any) -> None:
        super().__init__(node_id, listen, **options)
        self.hub = hub

    def send_group(self, group_id: int, target: int, messages: list[Any]) -> None:
        if (self.id, target) not in self.hub._cut:
            super().send_group(group_id, target, messages)

    def receive_filter(self, frm: int) -> bool:
        return (frm, self.id) not in self.hub._cut


class LocalCluster:
    """``nodes`` founding voters (ids 1..nodes) plus ``spares`` started nodes outside the
    membership, to add later. ``transport`` is "memory" or "tcp" (127.0.0.1);
    ``tcp_options`` go to every ``TcpNetwork`` (``secret``, ``tls``, ``limits``, ...)."""

    def __init__(self, nodes: int = 3, *, state_machine: Callable[[], Any],
                 config: Config | None = None,
                 storage: Callable[[], Any] = MemoryStorage, seed: int = 0,
                 transport: str = "memory", spares: int = 0,
                 tcp_options: dict[str, Any] | None = None) -> None:
        if transport not in ("memory", "tcp"):
            raise ValueError(f"transport must be 'memory' or 'tcp', not {transport!r}")
        self.size = nodes
        self.state_machine_factory = state_machine
        self.config = config or Config()
        self.storage_factory = storage
        self.transport = transport
        self.tcp_options = tcp_options or {}
        self.rng = random.Random(seed)
        self.hub = MemoryHub()
        ids = range(1, nodes + spares + 1)
        if transport == "tcp":
            ports = free_ports(len(ids))
            self.addresses = {i: f"127.0.0.1:{ports[k]}" for k, i in enumerate(ids)}
        else:
            self.addresses = {i: f"local:{i}" for i in ids}
        self.members = {i: self.addresses[i] for i in range(1, nodes + 1)}
        self.storages = {i: storage() for i in ids}
        self.state_machines: dict[int, Any] = {}
        self.nodes: dict[int, RaftNode] = {}

    def _make(self, node_id: int) -> RaftNode:
        sm = self.state_machines[node_id] = self.state_machine_factory()
        network: RaftNetwork
        if self.transport == "tcp":
            network = _CuttableTcp(self.hub, node_id, self.addresses[node_id],
                                   **self.tcp_options)
        else:
            network = self.hub.network(node_id)
        return RaftNode(node_id, storage=self.storages[node_id], network=network,
                        state_machine=sm, config=self.config,
                        rng=random.Random(self.rng.random()))

    async def start(self) -> LocalCluster:
        for i in self.storages:
            self.nodes[i] = self._make(i)
            await self.nodes[i].start()
            self.hub.nodes.setdefault(i, self.nodes[i])  # partitions know every node
        for i in self.members:
            await self.nodes[i].initialize(self.members)
        return self

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.stop()

    async def __aenter__(self) -> LocalCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def leader(self, timeout: float = 10.0,
                     exclude: AbstractSet[int] = frozenset()) -> RaftNode:
        """The node that leads (and that a majority follows), once there is one."""
        def current() -> RaftNode | None:
            for n in self.nodes.values():
                if n.id not in exclude and n._running and n.is_leader:
                    voters = n.engine.membership.voters
                    followers = sum(1 for m in self.nodes.values()
                                    if m._running and m.id in voters
                                    and m.engine.leader_id == n.id)
                    if followers * 2 > len(voters):
                        return n
            return None
        await wait_until(lambda: current() is not None, timeout, "a leader")
        found = current()
        assert found is not None
        return found

    def voters(self) -> set[int]:
        """The voters as the cluster's leader sees them (any running node otherwise)."""
        for n in self.nodes.values():
            if n._running and n.is_leader:
                return set(n.engine.membership.voters)
        return set(next(n for n in self.nodes.values() if n._running).engine.membership.voters)

    async def restart(self, node_id: int) -> RaftNode:
        """Stop node ``node_id`` and start a new one on the same storage."""
        await self.nodes[node_id].stop()
        node = self.nodes[node_id] = self._make(node_id)
        await node.start()
        self.hub.nodes.setdefault(node_id, node)
        return node
