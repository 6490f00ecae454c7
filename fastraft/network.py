"""The network hook: how messages travel between nodes.

A ``RaftNetwork`` sends; inbound messages reach the node through
``node.receive(from_id, messages)``. ``send`` is fire-and-forget and must never block the
node: a slow or dead peer may cost only that peer's (bounded) queue, and dropping messages
is always allowed (Raft retries). Deliver from a later event-loop callback, never from
inside ``send`` (``receive`` acts on the message at once, and the sending node may be in
the middle of its own work). Built-ins: ``fastraft.transport.TcpNetwork`` and, for
tests and in-process clusters, ``fastraft.transport.MemoryNetwork``; writing one:
``docs/network.md``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RaftNetwork(Protocol):
    async def start(self, node: Any) -> None:
        """Begin delivering inbound messages to ``node.receive``."""

    async def stop(self) -> None: ...

    def send(self, target: int, messages: list[Any]) -> None:
        """Queue ``messages`` for node ``target``; never blocks, may drop, never delivers
        before returning."""

    def set_peers(self, addresses: dict[int, str]) -> None:
        """The current members' addresses (called when membership changes)."""
