"""What an operator reads off a node: ``status()``, ``metrics()``, ``watch_metrics()``
and ``health()`` (``docs/operations.md``). All of them work on a node not started yet or
stopped, and none changes anything."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastraft.asyncutil import wait_within
from fastraft.engine import Role
from fastraft.errors import InvalidArgument
from fastraft.node.metrics import FollowerMetrics, Metrics, by_name

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode


def status(node: RaftNode) -> dict[str, Any]:
    if node.engine is None:
        return {"id": node.id, "role": "stopped"}
    e = node.engine
    s = e.status()
    s["applied_index"] = node.applied_index
    s["running"] = node._running
    s["refused"] = dict(e.refused)
    s["leader_address"] = e.membership.addresses.get(s["leader_id"])
    s["last_contact"] = leader_contact(node)
    return s


def metrics(node: RaftNode) -> Metrics:
    e = node.engine
    r = node._recorder
    now = node._loop.time() if node._loop is not None else 0.0
    heard = node._last_heard
    followers: dict[int, FollowerMetrics] = {}
    last_contact: float | None = None
    if e is None:
        term, leader, commit, last, snap = 0, None, 0, 0, 0
        voters: tuple[int, ...] = ()
        learners: tuple[int, ...] = ()
        refused: dict[str, int] = {}
    else:
        term, leader = e.term, e.leader_id
        commit, last, snap = e.commit_index, e.log.last_index, e.log.snapshot_index
        voters, learners = tuple(sorted(e.membership.voters)), \
            tuple(sorted(e.membership.learners))
        refused = dict(e.refused)
        last_contact = leader_contact(node)
        if e.role == Role.LEADER:
            for peer, pr in e.progress.items():
                if peer == node.id:
                    continue
                seen = heard.get(peer)
                followers[peer] = FollowerMetrics(
                    pr.match_index, last - pr.match_index, pr.state.name.lower(),
                    None if seen is None else now - seen)
    stats = getattr(node.network, "stats", None) or {}
    return Metrics(
        node_id=node.id, running=node._running, role=node.role_name, term=term,
        leader_id=leader,
        commit_index=commit, applied_index=node.applied_index, last_log_index=last,
        snapshot_index=snap, voters=voters, learners=learners,
        last_contact=last_contact, followers=followers, network=dict(stats),
        proposals_accepted=r.proposals_accepted, proposals_dropped=r.proposals_dropped,
        proposals_overloaded=r.proposals_overloaded,
        elections_started=r.elections_started, elections_won=r.elections_won,
        leader_changes=r.leader_changes, reads_retried=r.reads_retried,
        messages_in=by_name(r.messages_in),
        messages_out=by_name(r.messages_out), bytes_in=stats.get("bytes_in", 0),
        bytes_out=stats.get("bytes_out", 0), refused=refused,
        commit_seconds=r.commit_seconds.value(),
        apply_batch_entries=r.apply_batch_entries.value(),
        apply_seconds=r.apply_seconds.value(),
        log_write_seconds=r.log_write_seconds.value(),
        log_write_entries=r.log_write_entries.value(),
        snapshot_save_seconds=r.snapshot_save_seconds.value(),
        snapshot_install_seconds=r.snapshot_install_seconds.value())


async def watch_metrics(node: RaftNode, interval: float) -> AsyncIterator[Metrics]:
    if interval <= 0:
        raise InvalidArgument(f"interval must be positive, got {interval!r}")
    m = metrics(node)
    yield m
    seen = m.state
    while node._running:
        try:
            await wait_within(node._progress_wait(), interval)
        except asyncio.TimeoutError:
            pass
        m = metrics(node)
        if m.state != seen:
            seen = m.state
            yield m
    if seen[0]:  # the last value yielded still said running
        yield metrics(node)


def leader_contact(node: RaftNode) -> float | None:
    """Seconds since ``node`` last heard from its leader: 0 on the leader, None with no
    leader known or none heard from yet."""
    e = node.engine
    if e is None or e.leader_id is None:
        return None
    if e.role == Role.LEADER:
        return 0.0
    seen = node._last_heard.get(e.leader_id)
    return None if seen is None else node._loop.time() - seen


def health(node: RaftNode, max_apply_lag: int) -> str | None:
    e = node.engine
    if node.failure is not None:
        return str(node.failure)  # it stopped itself: say why
    if not node._running or e is None:
        return "node is not running"
    if e.removal_pending:  # thesis §4.1: it may have to lead the change to commit
        return (f"removed from the cluster (voters {sorted(e.membership.voters)}) by a "
                "change not known committed here: stop this node once the change returns")
    if e.told_out:  # its log ends before the change (``messages.Removed``)
        return (f"removed from the cluster (node {e.told_by} says its configuration "
                f"entry at {e.told_removed} leaves this node out): stop this node")
    if e.removed:  # it serves no reads (no entries reach it) and never campaigns
        return (f"removed from the cluster (voters {sorted(e.membership.voters)}): "
                "stop this node")
    if e.leader_id is None:
        return f"no leader known in term {e.term}"
    behind = e.commit_index - node.applied_index
    if behind > max_apply_lag:
        return (f"applied index {node.applied_index} is {behind} entries behind the "
                f"commit index {e.commit_index} (bound {max_apply_lag})")
    return None
