"""Membership changes a leader makes for its caller (§6, thesis §4): learners added and
removed, the voter set moved through joint consensus, and each call waiting for its
change's fate, which a lost leadership can leave open for a while.

A call counts in ``RaftNode.membership_calls`` while it runs: a ``RaftHost`` does not
move such a group's leadership to balance load.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from fastraft.asyncutil import wait_within
from fastraft.engine import Engine, Role
from fastraft.errors import CatchUpTimeout, InvalidArgument, NodeStopped, ProposalDropped
from fastraft.messages import check_node_id
from fastraft.node.arguments import check_address

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _counted(
        method: Callable[Concatenate[MembershipChanges, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[MembershipChanges, _P], Coroutine[Any, Any, _T]]:
    """Counts the call in ``RaftNode.membership_calls`` while it runs."""
    @functools.wraps(method)
    async def counted(self: MembershipChanges, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        node = self.node
        node.membership_calls += 1
        try:
            return await method(self, *args, **kwargs)
        finally:
            node.membership_calls -= 1
    return counted


class MembershipChanges:
    """The ``add_learner``, ``remove_learner``, ``update_address`` and
    ``change_membership`` of one node."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node

    @_counted
    async def add_learner(self, node_id: int, address: str, timeout: float) -> None:
        check_node_id(node_id)
        check_address(address)
        engine = await self._settled_leader(timeout)
        m = engine.membership
        if node_id in m.members:
            raise InvalidArgument(f"node {node_id} is already a member")
        await self._change(engine, m.voters, m.learners | {node_id}, {node_id: address},
                           timeout)

    @_counted
    async def remove_learner(self, node_id: int, timeout: float) -> None:
        check_node_id(node_id)
        engine = await self._settled_leader(timeout)
        m = engine.membership
        if node_id not in m.learners:
            raise InvalidArgument(f"node {node_id} is not a learner" + (
                ": it votes, remove it with change_membership()" if node_id in m.voters
                else ""))
        await self._change(engine, m.voters, m.learners - {node_id}, None, timeout)

    @_counted
    async def update_address(self, node_id: int, address: str, timeout: float) -> None:
        check_node_id(node_id)
        check_address(address)
        engine = await self._settled_leader(timeout)
        m = engine.membership
        if node_id not in m.members:
            raise InvalidArgument(f"node {node_id} is not a member: add it with add_learner()")
        if m.addresses.get(node_id) == address:
            return
        await self._change(engine, m.voters, m.learners, {node_id: address}, timeout)

    @_counted
    async def change_membership(self, voters: set[int], timeout: float) -> None:
        node = self.node
        engine = await self._settled_leader(timeout)
        wanted = frozenset(voters)
        m = engine.membership
        strangers = wanted - m.voters - m.learners
        if strangers:
            raise InvalidArgument(f"nodes {sorted(strangers)} are not members: add them "
                                  "with add_learner() first so they catch up before they vote")
        newcomers = wanted - m.voters
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        max_lag = node.config.max_learner_lag

        def caught_up() -> bool:
            e = node._leader_engine()
            # promoting a learner not heard from raises the quorum with an unreachable node
            # (etcd's isLearnerReady asks for a match as well)
            return all(e.caught_up(n, max_lag) for n in newcomers if n in e.progress)
        while not caught_up():
            if loop.time() > deadline:
                e = node.engine
                lag = {n: e.log.last_index - e.progress[n].match_index
                       for n in newcomers if n in e.progress}
                raise CatchUpTimeout(f"learners still behind after {timeout}s (entries "
                                     f"behind: {lag}); not promoted")
            try:
                await wait_within(node._progress_wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        await self._change(node._leader_engine(), wanted, m.learners - wanted, None, timeout)

    async def _change(self, engine: Engine, voters: frozenset[int], learners: frozenset[int],
                      addresses: dict[int, str] | None, timeout: float) -> None:
        """Propose the configuration and wait until the change is complete."""
        index = engine.propose_membership(voters, learners, addresses)
        self.node._schedule_flush()
        await self.wait_complete(index, timeout)

    async def _settled_leader(self, timeout: float) -> Engine:
        """The engine once this leader has committed an entry of its term: until then the
        configuration it inherited may still be uncommitted, which is not a change in
        progress that the caller should be told about."""
        node = self.node
        node._leader_engine()

        def settled() -> bool:
            e = node.engine
            return e.role != Role.LEADER or e.committed_in_term
        await wait_within(node._wait_progress(settled), timeout)
        return node._leader_engine()

    async def wait_complete(self, index: int, timeout: float) -> None:
        """Until the change this leader just proposed at ``index`` is complete: committed,
        and no longer joint (the C_new that follows a C_old,new committed too). If
        leadership is lost first, a later leader may still commit it: as for a proposal,
        this waits ``Config.lost_leadership_wait`` to learn whether the entry committed
        at ``index`` is this one (it has its term: Log Matching, §5.3) or another, and
        raises ``ProposalDropped`` if it is another or remains unknown."""
        node = self.node
        applier = node._applier
        term = node.engine.term
        ours = done = False
        waits = node._fate_waits  # leading: only a wait begun after this counts

        def complete() -> bool:
            nonlocal ours, waits, done
            e = node.engine
            if not node._running:
                return True
            if not ours:
                at_index = e.log.term_at(index)
                if e.commit_index >= index:
                    # a leader never replaces its own entries (and may have compacted
                    # this one away already); else the entry at index is ours if it has
                    # our term (Log Matching, §5.3)
                    if at_index != term and not (e.role == Role.LEADER and e.term == term):
                        if at_index == -1:
                            raise self._dropped(index, "a snapshot of the new leader covers "
                                                "it: it may or may not have taken effect")
                        raise self._dropped(index, "a later leader committed another entry "
                                            "in its place: it did not take effect", False)
                    ours = True
                elif e.role == Role.LEADER and at_index == term:
                    waits = node._fate_waits  # a leader commits its log's entries (§5.4.2)
                    return False
                elif node._fate_wait_expired > waits:
                    raise self._dropped(index, node._unknown_fate(
                        "it may or may not take effect"))
                else:
                    return False
            done = (applier.committed_index >= index and not e.membership.joint
                    and e.membership_index <= applier.committed_index)
            return done
        await wait_within(node._wait_progress(complete), timeout)
        if not done:  # stopped; a leader that removed itself may stop once it returns
            raise node.failure or NodeStopped(
                f"node {node.id} stopped before the membership change at {index} was known "
                "complete: it may or may not take effect; read the membership (status()) "
                "before trying again")

    def _dropped(self, index: int, why: str,
                 committed: bool | None = None) -> ProposalDropped:
        return ProposalDropped(f"node {self.node.id} lost leadership before the membership "
                               f"change at {index} committed; {why}: read the membership "
                               "(status()) before trying again", committed)
