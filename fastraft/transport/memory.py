"""An in-process network: nodes of one event loop exchange messages through a hub.

For tests, examples and in-process benchmarks. Messages are delivered on a later loop
iteration (never re-entrantly) and can be cut between pairs of nodes to make partitions.
"""
from __future__ import annotations

import asyncio
from typing import Any


class MemoryHub:
    """Connects ``MemoryNetwork``s; ``partition``/``heal`` cut and restore links."""

    def __init__(self) -> None:
        self.nodes: dict[int, Any] = {}
        self._cut: set[tuple[int, int]] = set()
        self.delivered = 0

    def network(self, node_id: int) -> MemoryNetwork:
        return MemoryNetwork(self, node_id)

    def partition(self, *groups: set[int]) -> None:
        """Cut every link between nodes of different ``groups``."""
        self._cut = {(a, b) for g in groups for h in groups if g is not h for a in g for b in h}

    def isolate(self, node_id: int) -> None:
        others = {i for i in self.nodes if i != node_id}
        self.partition({node_id}, others)

    def heal(self) -> None:
        self._cut = set()

    def _deliver(self, frm: int, to: int, messages: list[Any]) -> None:
        node = self.nodes.get(to)
        if node is None or (frm, to) in self._cut:
            return
        self.delivered += len(messages)
        node.receive(frm, messages)


class MemoryNetwork:
    def __init__(self, hub: MemoryHub, node_id: int) -> None:
        self.hub = hub
        self.id = node_id
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, node: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self.hub.nodes[self.id] = node

    async def stop(self) -> None:
        self.hub.nodes.pop(self.id, None)

    def send(self, target: int, messages: list[Any]) -> None:
        if self._loop is not None and (self.id, target) not in self.hub._cut:
            self._loop.call_soon(self.hub._deliver, self.id, target, messages)

    def set_peers(self, addresses: dict[int, str]) -> None:
        pass  # the hub knows every node
