"""What the producer and the consumer share: the record format and finding a node."""
from __future__ import annotations

import asyncio

import msgspec

from fastraft.kvclient import ClientError, KVClient


class Record(msgspec.Struct, array_like=True):
    """One record of the stream. ``producer`` and ``seq`` make it identifiable: a
    producer that retries an append whose outcome it does not know may store it twice,
    and the consumer keeps the first."""

    producer: str
    seq: int
    payload: str


encode = msgspec.msgpack.encode
decode = msgspec.msgpack.Decoder(Record).decode


class Cluster:
    """A connection to some node of the cluster, replaced when it fails; ``leader()``
    follows not-leader replies to the leader's client port."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.client: KVClient | None = None
        self.turn = 0

    async def any(self) -> KVClient:
        while self.client is None or self.client.closed:
            address = self.addresses[self.turn % len(self.addresses)]
            self.turn += 1
            try:
                self.client = await KVClient.connect(address, timeout=1.0)
            except OSError:
                await asyncio.sleep(0.05)
        return self.client

    def drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    async def call(self, fn, *, leader: bool):
        """``fn(client)``, retried on another node (or the leader named) until it works."""
        while True:
            client = await self.any()
            try:
                return await asyncio.wait_for(fn(client), 5.0)
            except ClientError as exc:
                if exc.error not in ("not_leader", "not_committed") \
                        and not exc.error.startswith("ProposalDropped"):
                    raise
                self.drop()
                if leader and exc.leader_client_address:
                    self.addresses.insert(0, exc.leader_client_address)
                    self.turn = 0
                await asyncio.sleep(0.05)
            except (OSError, asyncio.TimeoutError):
                self.drop()
                await asyncio.sleep(0.05)
