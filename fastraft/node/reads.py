"""Linearizable reads (thesis §6.4): ReadIndex round trips, and opt-in leases (§6.4.1).

``read_index`` asks the engine for a read point (on a follower the engine asks the
leader, and asks again every ``election_timeout_min`` until answered, as etcd's read
loop does: a request or answer lost with a broken connection costs a retry, not the
read; a read that a change of leader fails is asked of the new leader, within its
timeout) and answers once this node's state machine has applied it. With
``Config.lease_reads`` a leader that confirmed its leadership with a quorum at time t
answers without a round trip until t + election_timeout_min * (1 - max_clock_drift),
renewing the lease in the background when half of it is used.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastraft.asyncutil import fail_future, wait_within
from fastraft.engine import Role
from fastraft.errors import NotLeader, Overloaded
from fastraft.logutil import Throttle

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode

log = logging.getLogger("fastraft.node")
_timeouts = Throttle(log, interval=5.0)


class Reads:
    def __init__(self, node: RaftNode) -> None:
        self.node = node
        #: Read requests the engine has not answered yet, by request id.
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: The timers that ask the leader again for the reads this follower forwarded.
        self._asking_again: dict[int, asyncio.TimerHandle] = {}
        #: Confirmed reads waiting for the state machine to apply their index.
        self._waiters: list[tuple[int, asyncio.Future[Any]]] = []
        self._next_id = 0
        #: Lease reads: loop time until which this leader may read without a round trip.
        self.lease_until = 0.0
        self._lease_renewing = False

    async def read_index(self, timeout: float | None) -> int:
        node = self.node
        engine = node.engine
        config = node.config
        loop = node._loop
        if config.lease_reads and engine.role == Role.LEADER and not engine.lease_forfeited:
            now = loop.time()
            if now < self.lease_until and engine.committed_in_term:
                if self.lease_until - now < config.lease_span / 2 and \
                        not self._lease_renewing:
                    self._lease_renewing = True
                    loop.create_task(self._renew_lease())
                return await self._wait_applied(engine.commit_index)
        pending = max(len(self.pending), engine.reads_pending)
        if pending >= config.max_pending_reads:
            raise Overloaded(f"{pending} reads pending; retry later")
        if engine.role != Role.LEADER and engine.leader_id is None:
            raise engine.not_leader()  # none known: at once, as for a proposal
        if timeout is None:
            timeout = config.election_timeout_max * 4
        issued = loop.time()
        deadline = issued + timeout
        while True:
            asked = (engine.term, engine.leader_id)
            try:
                index = await self._confirm(deadline, timeout)
                break
            except NotLeader:
                # A change of leader failed the read (a balancing transfer, an
                # election): ask the new leader within the same deadline. A read point
                # it gives is taken after this read began, so still linearizable (§6.4).
                # A refusal by the leader asked is the caller's to retry.
                if not await self._new_leader(asked, deadline):
                    raise
                self.node._recorder.reads_retried += 1
        if config.lease_reads and engine.role == Role.LEADER:
            # a quorum heard from us after `issued` (a read forwarded to another leader
            # does not end here: campaigning fails it, and a win takes a round trip);
            # none of them votes for another candidate for election_timeout_min after that
            self.lease_until = max(self.lease_until, issued + config.lease_span)
        return index

    async def _confirm(self, deadline: float, timeout: float) -> int:
        """One request for a read point: to the engine, which asks the leader if it is
        not the leader. ``NotLeader`` if refused, failed by a change of leader, or not
        confirmed by ``deadline``."""
        node = self.node
        engine = node.engine
        loop = node._loop
        self._next_id += 1
        rid = self._next_id
        fut = loop.create_future()
        self.pending[rid] = fut
        try:
            engine.read_index(rid)
        except NotLeader:
            del self.pending[rid]
            raise
        node._schedule_flush()
        if engine.role != Role.LEADER:  # forwarded
            self._asking_again[rid] = loop.call_later(node.config.election_timeout_min,
                                                      self._ask_again, rid)
        try:
            return int(await wait_within(fut, max(0.0, deadline - loop.time())))
        except asyncio.TimeoutError:
            # The client is told NotLeader (it asks again); the operator, why.
            _timeouts.warning(node.id, "%s: a read was not confirmed within %.2fs "
                              "(%s, leader %s)", node.label, timeout, engine.role.name.lower(),
                              engine.leader_id,
                              extra={"event": "read_timeout", **node.log_fields,
                                     "seconds": timeout, "leader": engine.leader_id})
            raise engine.not_leader() from None
        finally:
            self.pending.pop(rid, None)
            again = self._asking_again.pop(rid, None)
            if again is not None:
                again.cancel()

    async def _new_leader(self, asked: tuple[int, int | None], deadline: float) -> bool:
        """Whether, before ``deadline``, a leader is known that is not the one of
        ``asked`` (term, leader): the read may be asked again."""
        node = self.node
        if not node._running or node._loop.time() >= deadline:
            return False

        def moved() -> bool:
            e = node.engine
            return not node._running or (e.leader_id is not None
                                         and (e.term, e.leader_id) != asked)
        try:
            await wait_within(node._wait_progress(moved),
                                   deadline - node._loop.time())
        except asyncio.TimeoutError:
            return False
        return node._running

    def _ask_again(self, rid: int) -> None:
        node = self.node
        if rid not in self.pending or not node._running:
            return
        node.engine.ask_again(rid)  # nothing if answered or failed meanwhile
        node._schedule_flush()
        self._asking_again[rid] = node._loop.call_later(node.config.election_timeout_min,
                                                        self._ask_again, rid)

    async def _renew_lease(self) -> None:
        try:
            await self.node.read_index()
        except Exception:  # lost leadership or stopped: the lease simply runs out
            pass
        finally:
            self._lease_renewing = False

    def lost_leadership(self) -> None:
        self.lease_until = 0.0

    async def _wait_applied(self, index: int) -> int:
        if self.node._applier.applied_index >= index:
            return index
        fut: asyncio.Future[int] = self.node._loop.create_future()
        self._waiters.append((index, fut))
        return await fut

    def ready(self, request_id: int, read_index: int) -> None:
        """The engine confirmed read ``request_id`` at ``read_index``."""
        fut = self.pending.get(request_id)
        if fut is None or fut.done():
            return
        if self.node._applier.applied_index >= read_index:
            fut.set_result(read_index)
        else:
            self._waiters.append((read_index, fut))

    def failed(self, request_id: int, leader_id: int | None) -> None:
        fut = self.pending.get(request_id)
        if fut is not None:
            addresses = self.node.engine.membership.addresses
            fail_future(fut, NotLeader(leader_id, None if leader_id is None
                                       else addresses.get(leader_id)))

    def applied(self, applied_index: int) -> None:
        """The state machine reached ``applied_index``: answer the reads waiting for it."""
        if self._waiters:
            ready = [w for w in self._waiters if w[0] <= applied_index]
            self._waiters = [w for w in self._waiters if w[0] > applied_index]
            for read_index, fut in ready:
                if not fut.done():
                    fut.set_result(read_index)

    def fail_all(self, exc: BaseException) -> None:
        for fut in self.pending.values():
            fail_future(fut, exc)
        for _, fut in self._waiters:
            fail_future(fut, exc)
        self.pending.clear()
        self._waiters.clear()
        for again in self._asking_again.values():
            again.cancel()
        self._asking_again.clear()
