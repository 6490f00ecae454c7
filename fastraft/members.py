"""Membership changes of a running cluster through its nodes' client ports
(``fastraft member add|update|remove``): one node added to, moved in, or removed from,
every group of nodes of several groups (``fastraft node --groups N``), or one group, or
a node's only group.

Each group's change goes to that group's own leader, found among the nodes given: a new
member joins as a learner and is promoted to voter once caught up (§6, thesis §4.2.1:
``RaftNode.add_learner`` then ``change_membership``); a removal is a change to the voters
without it, made on another voter once the node led the group (leadership handed over
first, thesis §3.10, so the group waits for no election). A change is asked again when
its group's leader moves or another change is under way, until the deadline; a group
already as asked is left alone, so the command can be run again after a failure and
finishes what is left.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastraft.asyncutil import wait_within
from fastraft.host import preferred_leader
from fastraft.kvclient import ClientError, KVClient, find_leader

#: Groups changed at once: a few, so that a thousand groups do not take a thousand round
#: trips one after the other, nor hand every leader a catch-up at the same moment.
CONCURRENT_GROUPS = 8
#: Refusals that a moment later may succeed: the group's leader moved (before the
#: change, or while it waited to commit: it may or may not have happened) or stopped (a
#: rolling restart: the group's next leader is found among the others), another
#: membership change of the group is not complete yet, or a leadership transfer or a
#: change did not finish in the node's time (the next try looks at the group again).
_TRANSIENT = ("not_leader", "not_committed", "ProposalDropped", "NodeStopped",
              "MembershipChangeInProgress", "TimeoutError")


async def connect(addresses: list[str], **options: Any) -> tuple[dict[int, KVClient],
                                                                  list[int | None]]:
    """Clients of the nodes at ``addresses`` that answer, by node id (``options`` as for
    ``KVClient.connect``), and the groups they serve: ``[0, ..., N-1]`` on nodes of several
    groups, ``[None]`` on single-group nodes (a request names no group there)."""
    clients: dict[int, KVClient] = {}
    groups: list[int | None] = []
    errors = []
    for address in addresses:
        try:
            c = await KVClient.connect(address, timeout=2.0, **options)
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(f"{address}: {exc or type(exc).__name__}")
            continue
        try:
            status = await wait_within(c.status(), 2.0)
        except (ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            c.close()
            errors.append(f"{address}: {exc or type(exc).__name__}")
            continue
        clients[status["id"]] = c
        leaders = status.get("leaders")
        groups = list(range(len(leaders))) if leaders is not None else [None]
    if not clients:
        raise ConnectionError(f"no node answered ({'; '.join(errors)})")
    return clients, groups


async def change_members(clients: dict[int, KVClient], op: str, node_id: int,
                         address: str | None, groups: list[int | None], *,
                         learner: bool = False, timeout: float = 60.0,
                         say: Callable[[str], None] = print) -> int:
    """``op`` "add" (a learner, then a voter unless ``learner``; ``address`` its Raft
    address), "update" (member ``node_id`` is now at ``address``) or "remove" node
    ``node_id`` in each of ``groups``, a line to ``say`` for each group as it is done;
    the number of groups that failed (each said why)."""
    limit = asyncio.Semaphore(CONCURRENT_GROUPS)
    failed = 0

    async def one(group: int | None) -> None:
        nonlocal failed
        name = "the group" if group is None else f"group {group}"
        async with limit:
            try:
                # bounds everything: a leader that stops answering midway too (what it
                # did is found by a run again)
                done = await wait_within(_change_group(
                    clients, op, node_id, address, group, learner, timeout), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                failed += 1
                say(f"{name}: failed: not done within {timeout:g}s")
            except (ClientError, ConnectionError) as exc:
                failed += 1
                say(f"{name}: failed: {exc}")
            else:
                say(f"{name}: node {node_id} {done}")
    await asyncio.gather(*[one(g) for g in groups])
    return failed


async def _change_group(clients: dict[int, KVClient], op: str, node_id: int,
                        address: str | None, group: int | None, learner: bool,
                        timeout: float) -> str:
    """One group's change on its leader; what was done ("added as a voter", ...). Asks
    again after a transient refusal until the caller's ``timeout`` ends it."""
    handed = ""
    while True:
        leader = await find_leader(clients, timeout=timeout, group=group)
        c = clients[leader]
        try:
            status: dict[str, Any] = await c.status(group)
            membership = status["membership"]
            voters, learners = set(membership["voters"]), set(membership["learners"])
            if op == "add":
                return await _add(c, node_id, address, group, voters, learners, learner)
            if op == "update":
                assert address is not None
                if status["addresses"].get(node_id) == address:
                    return f"is already at {address}"
                await c.update_address(node_id, address, group=group)
                return f"is now at {address}"
            if leader == node_id and len(voters) > 1:
                # Hand leadership over first (thesis §3.10), to the voter the host's
                # balancing would pick among those reachable here (the change goes to
                # it next): removing the leader itself makes it step down once the
                # change commits, and the group waits an election timeout.
                others = voters - {node_id}
                successor = preferred_leader(group or 0, others & clients.keys() or others)
                await c.transfer_leadership(successor, group=group)
                handed = f" (leadership handed to node {successor} first)"
                continue
            return await _remove(c, node_id, group, voters, learners) + handed
        except ClientError as exc:
            if not exc.error.startswith(_TRANSIENT):
                raise
        await asyncio.sleep(0.1)


async def _add(c: KVClient, node_id: int, address: str | None, group: int | None,
               voters: set[int], learners: set[int], learner: bool) -> str:
    if node_id in voters:
        return "is already a voter"
    if node_id not in learners:
        assert address is not None
        await c.add_learner(node_id, address, group=group)
    elif learner:
        return "is already a learner"
    if learner:
        return "added as a learner"
    await c.change_membership(voters | {node_id}, group=group)  # once it has caught up
    return "added as a voter"


async def _remove(c: KVClient, node_id: int, group: int | None, voters: set[int],
                  learners: set[int]) -> str:
    if node_id in learners:
        await c.remove_learner(node_id, group=group)
        return "removed (a learner)"
    if node_id not in voters:
        return "is not a member"
    await c.change_membership(voters - {node_id}, group=group)
    return "removed"
