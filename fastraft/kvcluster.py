"""A client of a whole cluster of ``fastraft node`` processes: each request goes to the node
that leads its key's group, so a program neither tracks leaders nor routes keys itself (as
etcd's clientv3 does with its endpoints).

``KVCluster.connect(addresses)`` dials the nodes' client ports and learns from their status
each node's id, the number of groups (``fastraft node --groups N``: a key belongs to group
``shard_of(key, N)``) and each group's leader. A request then goes to its group's leader over
one connection per node, pipelined with the others in flight.

What is asked again, and what is not:

- a ``not_leader`` reply (refused before it entered any log), or a ``not_committed`` one
  (a later leader committed another entry in place of the write's: it never took effect),
  is asked again of the leader it names, or, when it names none (an election), of the
  next node a moment later, until ``timeout`` seconds have passed since the call; then it
  is raised;
- a node that cannot be dialed (down, restarting) is skipped for the next, and so is one
  that shut down before it began the request (``fastraft node`` stopping: its closing
  notice names the requests it never began);
- a ``get`` whose connection is lost, or whose node is stopping, is asked again of another
  node (a read changes nothing); a ``put`` or ``delete`` whose connection is lost raises
  ``ConnectionError``, and one whose node is stopping the ``ClientError`` it answered: it
  may or may not have taken effect, and only the caller knows whether asking again is
  harmless;
- any other answer of a node (``Overloaded``, a refusal of the state machine) is raised as
  the ``ClientError`` it is.

A node that answers nothing for ``silence`` seconds while requests wait on it (paused,
cut off by the network: its connection stays open) has its connection closed: its reads
go to another node, its writes raise ``ConnectionError`` (may or may not), and later
requests look for their group's leader elsewhere. A node that answers late is not
silent: ``silence`` should exceed the slowest answer expected (a commit waits for a
quorum's fsync; a deposed leader's write for ``Config.lost_leadership_wait``).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .asyncutil import wait_within
from .errors import InvalidArgument
from .kvclient import ClientError, KVClient
from .kvprotocol import CLOSING, NOT_COMMITTED, check_item, shard_of

_T = TypeVar("_T")

#: Longest wait before asking again when no leader is known (an election takes about
#: one election timeout; the first waits are shorter).
MAX_BACKOFF = 0.1
#: Redirects followed at once, one after another (more: the nodes disagree for a moment,
#: as an election ends, and asking again waits).
FOLLOW = 2
#: Answers of a node that stopped (its process on its way out): for a read, as a lost
#: connection; a write's may or may not have taken effect.
_STOPPED = ("NodeStopped", "NodeFailed")


class KVCluster:
    """Requests of a cluster's KV store, each sent to the leader of its key's group."""

    def __init__(self, addresses: Sequence[str], timeout: float, silence: float,
                 options: dict[str, Any]):
        if not addresses:
            raise InvalidArgument("give at least one client address")
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0 seconds, got {timeout}")
        if silence <= 0:
            raise InvalidArgument(f"silence must be > 0 seconds, got {silence}")
        self.silence = silence
        self._watcher: asyncio.Task[None] | None = None
        #: The status of the node last dialed (``connect`` learns the layout from it).
        self._status: dict[str, Any] | None = None
        #: Every client address known: those given, then those learnt from redirects.
        self.addresses = list(dict.fromkeys(addresses))
        self.timeout = timeout
        self._options = options
        self._clients: dict[str, KVClient] = {}
        self._dials: dict[str, asyncio.Task[KVClient]] = {}
        #: Node id -> client address, from the nodes' status and their redirects.
        self.ids: dict[int, str] = {}
        self.groups = 1
        #: Each group's leader as last seen (None: not known).
        self.leaders: list[int | None] = [None]
        self._next = 0

    @classmethod
    async def connect(cls, addresses: Sequence[str], *, timeout: float = 10.0,
                      silence: float = 3.0, **options: Any) -> KVCluster:
        """Dial every node of ``addresses`` (client ports) and learn the cluster's layout
        from those that answer; ``options`` are ``KVClient.connect``'s (``cluster_id``,
        ``secret``, ``tls``). ``timeout``: how long a call looks for its group's leader,
        and how long this waits for a node to answer (nodes still starting). Raises
        ``ConnectionError`` when none does. ``silence``: see the module's docstring."""
        self = cls(addresses, timeout, silence, options)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = 0.05
        while True:
            await asyncio.gather(*(self._reach(a) for a in self.addresses))
            if self._status is not None:
                break
            if loop.time() + backoff > deadline:
                self.close()
                raise ConnectionError(f"no node answered at {', '.join(self.addresses)} "
                                      f"within {timeout}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
        first = self._status
        if "host" in first:
            self.groups = first["host"]["groups"]
            self.leaders = list(first["leaders"])
        else:
            self.leaders = [first.get("leader_id")]
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        """Close the connections whose requests have waited ``silence`` seconds without a
        frame from their node (checked every half of it: a connection busy at two checks
        in a row with no frame between them)."""
        heard: dict[KVClient, int] = {}  # busy connections at the last check
        while True:
            await asyncio.sleep(self.silence / 2)
            busy = {}
            for address, client in list(self._clients.items()):
                if client.closed or not client.waiting:
                    continue
                if heard.get(client) != client.frames_received:
                    busy[client] = client.frames_received
                    continue
                client.refused = f"no answer for {self.silence}s"
                client.close()
                if client.transport is not None:  # what it could not send, dropped
                    client.transport.abort()
                for group, leader in enumerate(self.leaders):
                    if leader is not None and self.ids.get(leader) == address:
                        self.leaders[group] = None
            heard = busy

    async def _reach(self, address: str) -> None:
        try:
            await self._client(address)
        except (OSError, asyncio.TimeoutError, ClientError):
            pass

    def close(self) -> None:
        """Close every connection (calls in flight fail with ``ConnectionError``)."""
        if self._watcher is not None:
            self._watcher.cancel()
        for task in self._dials.values():
            task.cancel()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # ------------------------------------------------------------------ requests

    async def put(self, key: str, value: bytes) -> int:
        """Set ``key``; its new version once committed and applied."""
        check_item("put", key, value)
        return await self._on_leader(key, lambda c: c.put(key, value), read=False)

    async def delete(self, key: str) -> int:
        """Delete ``key``; its new version."""
        check_item("delete", key)
        return await self._on_leader(key, lambda c: c.delete(key), read=False)

    async def get(self, key: str) -> bytes | None:
        """``key``'s value (None if not set), linearizable."""
        check_item("get", key)
        return await self._on_leader(key, lambda c: c.get(key), read=True)

    def group_of(self, key: str) -> int:
        """The group ``key`` belongs to."""
        return shard_of(key, self.groups) if self.groups > 1 else 0

    async def _on_leader(self, key: str, request: Callable[[KVClient], Awaitable[_T]],
                         read: bool) -> _T:
        group = self.group_of(key)
        leader = self.leaders[group]
        client = self._clients.get(self.ids.get(leader, "")) if leader is not None else None
        if client is not None and not client.closed:
            try:  # the common case: a connection to the group's leader
                return await request(client)
            except (ClientError, ConnectionError) as exc:
                self._failed(group, leader, exc, read, sent=True)
        return await self._searching(group, request, read)

    async def _searching(self, group: int, request: Callable[[KVClient], Awaitable[_T]],
                         read: bool) -> _T:
        """Ask the group's leader as known, or the nodes in turn, until one answers; a
        moment's wait after each miss but a redirect to a leader not yet asked."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = 0.005
        follow = FOLLOW
        last: Exception | None = None
        while loop.time() < deadline:
            leader = self.leaders[group]
            address = self.ids.get(leader) if leader is not None else None
            if address is None:
                address = self.addresses[self._next % len(self.addresses)]
                self._next += 1
            sent = False
            try:
                client = await self._client(address, deadline - loop.time())
                sent = True
                result = await request(client)
            except (ClientError, OSError, asyncio.TimeoutError) as exc:
                last = exc
                if self._failed(group, leader, exc, read, sent) and follow:
                    follow -= 1
                    continue
            else:
                if not read:  # only a leader takes writes: this node leads the group
                    self.leaders[group] = next(
                        (i for i, a in self.ids.items() if a == address), None)
                return result
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, MAX_BACKOFF)
            follow = FOLLOW
        raise TimeoutError(f"no leader of group {group} answered within {self.timeout}s "
                           f"(last: {last})")

    def _failed(self, group: int, leader: int | None, exc: Exception, read: bool,
                sent: bool) -> bool:
        """What an attempt that failed with ``exc`` teaches; raises ``exc`` if it may not
        be asked again. True: a redirect to a leader not asked yet."""
        if isinstance(exc, ClientError):
            if exc.error == "not_leader" or exc.error == NOT_COMMITTED:
                return self._redirected(group, exc)
            if not (exc.error == CLOSING or read and exc.error.startswith(_STOPPED)):
                raise exc
        elif sent and not read:
            # a write's lost connection: it may or may not have taken effect (a dial that
            # failed, or a read's lost connection: another node is asked)
            raise exc
        self._forget(group, leader)
        return False

    def _redirected(self, group: int, exc: ClientError) -> bool:
        """Note the leader a ``not_leader`` or ``not_committed`` reply names; True if it
        is one to ask now."""
        leader = exc.leader
        if leader is not None and exc.leader_client_address:
            if exc.leader_client_address not in self.addresses:
                self.addresses.append(exc.leader_client_address)
            self.ids[leader] = exc.leader_client_address
        known = leader is not None and leader in self.ids and leader != self.leaders[group]
        self.leaders[group] = leader if leader in self.ids else None
        return known

    def _forget(self, group: int, leader: int | None) -> None:
        if leader is not None and self.leaders[group] == leader:
            self.leaders[group] = None

    async def _client(self, address: str, timeout: float = 2.0) -> KVClient:
        """The connection to ``address``, dialed once however many calls wait for it."""
        client = self._clients.get(address)
        if client is not None and not client.closed:
            return client
        dial = self._dials.get(address)
        if dial is None:
            dial = self._dials[address] = asyncio.ensure_future(
                self._dial(address, min(timeout, 2.0)))
            dial.add_done_callback(lambda _: self._dials.pop(address, None))
        client = await asyncio.shield(dial)
        self._clients[address] = client
        return client

    async def _dial(self, address: str, timeout: float) -> KVClient:
        """A new connection, and the id of the node behind it (from its status)."""
        client = await KVClient.connect(address, timeout=timeout, **self._options)
        try:
            status = await wait_within(client.status(), timeout)
        except BaseException:
            client.close()
            raise
        self.ids[status["id"]] = address
        self._status = status
        return client
