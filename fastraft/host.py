"""``RaftHost``: many Raft groups in one process over one transport (multi-Raft).

A storage engine that shards its data runs one Raft group per shard, a few processes
holding a replica of each. A host is one such process: every group on it is a
``RaftNode`` (the same class, the same code path as a single node) whose network is a
view of the host's ``TcpNetwork``: one listening port, one connection per peer process,
and every group's messages for a peer in one frame per loop turn. A group's members are
hosts: node ids are host ids, addresses host addresses.

The heartbeats of the awake groups a host leads run on one clock (``HeartbeatClock``),
so each interval one frame to each peer carries them all. An idle group goes quiet
(``Config.quiesce_after``, on by default here): its leader stops heartbeating and its
followers stop their election timers, so thousands of idle groups cost no ticks and no
messages. What replaces their heartbeats is one liveness exchange per pair of hosts
(``TcpNetwork.keepalive``, an empty frame when nothing else went out): a host that hears
nothing from a peer for ``election_timeout_min`` tells its groups (``peers_down``): the
quiet groups that peer led wake, as lost, and elect a new leader (with pre-vote), quiet
leaders left without a quorum wake and are deposed, and while it stays silent groups go
quiet without its answers; heard again, it wakes the quiet groups it is behind in. A
peer heard again, or one that connected anew (it restarted), is reminded who leads the
quiet groups led here: its replicas may have lost their leader, and quiet leaders send
nothing otherwise. Any proposal, read or message wakes a quiet group.

Leadership is spread across hosts: each group has a preferred leader (its voters in id
order, picked by group id), and a host that leads a group whose preferred leader is
caught up hands leadership to it (thesis §3.10). So leaders are balanced while every host
is up, and after a host restarts its groups' leadership comes back to it.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from fastraft.config import Config
from fastraft.engine import Role
from fastraft.errors import (
    FastRaftError,
    GroupExists,
    InvalidArgument,
    NodeStopped,
    UnknownGroup,
)
from fastraft.messages import AppendEntries
from fastraft.node import RaftNode
from fastraft.node.metrics import (
    COUNTERS,
    HISTOGRAMS,
    GroupFigures,
    HistogramValue,
    HostMetrics,
    Recorder,
)
from fastraft.node.raftnode import check_node_id
from fastraft.node.runner import CampaignLimit, HeartbeatClock
from fastraft.statemachine import StateMachine
from fastraft.storage import MemoryStorage, RaftStorage
from fastraft.transport.tcp import TcpNetwork

log = logging.getLogger("fastraft.host")

#: Group ids travel as unsigned 64-bit ints.
MAX_GROUP_ID = (1 << 64) - 1
#: ``Config.quiesce_after`` of a host's groups unless its ``config`` says otherwise.
DEFAULT_QUIESCE_AFTER = 1.0
#: Groups a balancing round looks at, taking turns: a round costs the same with 100,000.
BALANCE_SCAN = 1024
#: Groups ``gather_metrics`` sums between two turns of the event loop.
METRICS_CHUNK = 256
#: Groups of a host that may campaign at once unless its ``max_campaigns`` says otherwise.
DEFAULT_MAX_CAMPAIGNS = 32
#: How often, in seconds, the awake groups' shares of a host's log cache budget follow
#: what each appended since.
CACHE_LOAD_INTERVAL = 1.0
#: Groups not created yet whose heartbeats a host keeps for their creation (the oldest
#: go first): a host restarting creates its groups one by one while their leaders'
#: hosts already remind it who leads.
EARLY_GROUPS = 10_000
#: Senders whose last heartbeat a host keeps for each such group (the first heard go
#: first): so at most EARLY_GROUPS * EARLY_SENDERS heartbeats (a few hundred bytes each).
EARLY_SENDERS = 8


def preferred_leader(group_id: int, voters: frozenset[int] | set[int]) -> int:
    """The voter that should lead ``group_id``: groups with the same voters take turns."""
    ordered = sorted(voters)
    return ordered[group_id % len(ordered)]


class _HostSums:
    """A host's groups' counters, summed as they are added (``RaftHost.metrics``)."""

    def __init__(self) -> None:
        self.roles: Counter[str] = Counter()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.messages_in: Counter[str] = Counter()
        self.messages_out: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.quiet = self.without_leader = self.apply_lag = self.follower_lag = 0
        self.log_cache_bytes = 0
        #: Per histogram: its bounds, bucket counts, sum and count so far.
        empty = Recorder()
        self.histograms = {name: (getattr(empty, name).bounds, [0] * len(
            getattr(empty, name).counts), [0.0, 0]) for name in HISTOGRAMS}

    def add(self, node: RaftNode, host_id: int) -> None:
        r = node._recorder
        counters = self.counters
        for name in COUNTERS:
            counters[name] += getattr(r, name)
        for kind, n in r.messages_in.items():
            self.messages_in[kind.__name__] += n
        for kind, n in r.messages_out.items():
            self.messages_out[kind.__name__] += n
        for name in HISTOGRAMS:
            h = getattr(r, name)
            if h.count:  # most are empty (durations are measured on request)
                _, counts, totals = self.histograms[name]
                for i, c in enumerate(h.counts):
                    counts[i] += c
                totals[0] += h.sum
                totals[1] += h.count
        role = node.role_name
        self.roles[role] += 1
        e = node.engine
        if e is None or role == "stopped":
            return
        self.quiet += e.quiet
        self.log_cache_bytes += e.log.cache_bytes
        self.without_leader += e.leader_id is None
        self.apply_lag = max(self.apply_lag, e.commit_index - node.applied_index)
        if e.refused:
            self.refused.update(e.refused)
        if e.role == Role.LEADER:
            last = e.log.last_index
            for peer, pr in e.progress.items():
                if peer != host_id:
                    self.follower_lag = max(self.follower_lag, last - pr.match_index)

    def result(self, host: RaftHost) -> HostMetrics:
        c = self.counters
        h = {name: HistogramValue(bounds, tuple(counts), float(totals[0]), int(totals[1]))
             for name, (bounds, counts, totals) in self.histograms.items()}
        stats = dict(host.network.stats)
        return HostMetrics(
            node_id=host.id, running=host._running, groups=len(host._groups),
            roles=dict(self.roles), quiet=self.quiet, without_leader=self.without_leader,
            apply_lag=self.apply_lag, follower_lag=self.follower_lag,
            log_cache_bytes=self.log_cache_bytes, log_cache_share=host.log_cache_share,
            suspected=tuple(sorted(host.suspected)),
            transfers=host.transfers,
            **host._campaign_figures(),
            network=stats, proposals_accepted=c["proposals_accepted"],
            proposals_dropped=c["proposals_dropped"],
            proposals_overloaded=c["proposals_overloaded"],
            elections_started=c["elections_started"], elections_won=c["elections_won"],
            leader_changes=c["leader_changes"], reads_retried=c["reads_retried"],
            messages_in=dict(self.messages_in),
            messages_out=dict(self.messages_out), bytes_in=stats.get("bytes_in", 0),
            bytes_out=stats.get("bytes_out", 0), refused=dict(self.refused),
            commit_seconds=h["commit_seconds"], apply_batch_entries=h["apply_batch_entries"],
            apply_seconds=h["apply_seconds"], log_write_seconds=h["log_write_seconds"],
            log_write_entries=h["log_write_entries"],
            snapshot_save_seconds=h["snapshot_save_seconds"],
            snapshot_install_seconds=h["snapshot_install_seconds"])


class RaftHost:
    """Hosts Raft groups in this process (see the module docstring).

    ``storage(group_id)`` makes a group's storage when ``create_group`` is not given one
    (default: ``MemoryStorage``); the host never closes a storage, whoever made it, so a
    new host on the same storages is a restart. ``config`` is every group's unless
    ``create_group`` says otherwise (default: ``Config(quiesce_after=1.0)``); its timings
    also pace the liveness exchange between hosts. Every ``balance_interval`` seconds the
    host hands groups it leads to their preferred leaders (``None``: never). At most
    ``max_campaigns`` of its groups campaign at once (``CampaignLimit``: thousands of
    groups electing together would swamp the host; ``None``: no limit).
    ``log_cache_bytes`` bounds the entries all its groups keep in memory together
    (``None``: each group's ``Config.log_cache_bytes``): the awake groups share half of
    it evenly and the other half by what each appended lately; quiet ones keep none.
    """

    def __init__(self, node_id: int, *, network: TcpNetwork,
                 storage: Callable[[int], RaftStorage] | None = None,
                 config: Config | None = None, cluster_id: str = "fastraft",
                 balance_interval: float | None = 1.0,
                 max_campaigns: int | None = DEFAULT_MAX_CAMPAIGNS,
                 log_cache_bytes: int | None = None) -> None:
        check_node_id(node_id)
        if network.id != node_id:
            raise InvalidArgument(f"the network is node {network.id}'s, not node {node_id}'s")
        if balance_interval is not None and balance_interval <= 0:
            raise InvalidArgument(f"balance_interval must be positive or None, "
                                  f"got {balance_interval!r}")
        if log_cache_bytes is not None and (type(log_cache_bytes) is not int
                                            or log_cache_bytes < 0):
            raise InvalidArgument(f"log_cache_bytes must be a number of bytes or None, "
                                  f"got {log_cache_bytes!r}")
        self.id = node_id
        self.network = network
        self.storage_factory = storage or (lambda group_id: MemoryStorage())
        self.config = config or Config(quiesce_after=DEFAULT_QUIESCE_AFTER)
        self.cluster_id = cluster_id
        self.balance_interval = balance_interval
        #: None: no limit.
        self.campaigns = None if max_campaigns is None else CampaignLimit(max_campaigns)
        #: One per heartbeat interval the groups use (most hosts: one).
        self._clocks: dict[float, HeartbeatClock] = {}
        self._groups: dict[int, RaftNode] = {}
        self._balancer: asyncio.Task[None] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._cache_loader: asyncio.Task[None] | None = None
        #: Each group's voters when its preferred leader was last worked out, and it.
        self._preferred: dict[int, tuple[frozenset[int], int]] = {}
        #: The groups balancing rounds go through in turn, and where the next one starts.
        self._scan_order: list[int] | None = None
        self._scan_at = 0
        #: Peer hosts silent for longer than ``election_timeout_min``.
        self.suspected: set[int] = set()
        self._running = False
        #: Leadership transfers to preferred leaders started so far (one that times out
        #: may still complete later).
        self.transfers = 0
        #: Quiet groups led here that reminded a peer host of their leader, so far
        #: (``_remind``).
        self.reminders = 0
        #: Heartbeats that came for groups not created here yet: group id -> sender ->
        #: its last one (``_arrived_early``), delivered when the group is created.
        self._early: OrderedDict[int, dict[int, AppendEntries]] = OrderedDict()
        self.log_cache_bytes = log_cache_bytes
        #: With a budget: the groups that share it, those not quiet (``_quiet_changed``).
        self._awake: set[RaftNode] = set()
        #: The number of awake groups the budget was last split for (``_share_cache``).
        self._cache_split_for = 0
        #: Each awake group's part of the half of the budget that follows the load, and
        #: its log's ``total_bytes`` when that was last worked out (``_follow_load``).
        self._load_share: dict[RaftNode, int] = {}
        self._appended_at: dict[RaftNode, int] = {}
        #: Every group's election timeouts: one generator for the host (a Random holds
        #: 2.5 KB of state, as much as the rest of an idle group's timers and counters).
        self._rng = random.Random()

    @property
    def address(self) -> str:
        """This host's address (``HOST:PORT``; port 0 is resolved by ``start``)."""
        return self.network.listen

    @property
    def groups(self) -> Mapping[int, RaftNode]:
        """The groups on this host, by id (a read-only view)."""
        return self._groups

    async def start(self) -> RaftHost:
        await self.network.serve()
        self.network.early = self._arrived_early
        self._running = True
        loop = asyncio.get_running_loop()
        self._liveness = loop.create_task(self._liveness_loop())
        if self.balance_interval is not None:
            self._balancer = loop.create_task(self._balance_loop())
        if self.log_cache_bytes is not None:
            self._cache_loader = loop.create_task(self._cache_load_loop())
        return self

    async def stop(self) -> None:
        """Stop every group and the transport; storages stay open (they are reused by a
        new host: a restart)."""
        self._running = False
        for task in (self._balancer, self._liveness, self._cache_loader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._balancer = self._liveness = self._cache_loader = None
        groups, self._groups = self._groups, {}
        self._early.clear()
        self._awake.clear()
        self._load_share.clear()
        self._appended_at.clear()
        for node in groups.values():
            node.quiet_changed = None
            await node.stop()
        for clock in self._clocks.values():
            clock.stop()
        self._clocks.clear()
        await self.network.stop()

    async def __aenter__(self) -> RaftHost:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def create_group(self, group_id: int, members: Mapping[int, str] | None, *,
                           state_machine: StateMachine, config: Config | None = None,
                           storage: RaftStorage | None = None) -> RaftNode:
        """Start this host's replica of group ``group_id`` and return it (a ``RaftNode``).

        ``members`` (host id -> host address) founds the group, as ``initialize`` does:
        every founding host may pass the same; ``None`` for a replica that is added later
        (``add_learner`` on the group's leader) or restarts on storage that knows its
        group. Raises ``GroupExists`` if the group is already here."""
        if not self._running:
            raise NodeStopped(f"host {self.id} is not running: start() it first")
        if not isinstance(group_id, int) or not 0 <= group_id <= MAX_GROUP_ID:
            raise InvalidArgument(f"group ids are ints from 0 to 2**64 - 1, got {group_id!r}")
        if group_id in self._groups:
            raise GroupExists(f"group {group_id} already runs on host {self.id}")
        network = self.network.group(group_id)
        network.watched = True  # _liveness_loop wakes it when quiet and its leader is lost
        node = RaftNode(self.id, storage=storage or self.storage_factory(group_id),
                        network=network, state_machine=state_machine,
                        config=config or self.config, rng=self._rng,
                        cluster_id=f"{self.cluster_id}/{group_id}")
        node.group_id = group_id
        node.campaign_limit = self.campaigns
        interval = node.config.heartbeat_interval
        clock = self._clocks.get(interval)
        if clock is None:
            clock = self._clocks[interval] = HeartbeatClock(asyncio.get_running_loop(),
                                                            interval)
        node.heartbeat_clock = clock
        self._groups[group_id] = node
        if self.log_cache_bytes is not None:
            node.quiet_changed = self._quiet_changed
            self._awake.add(node)  # a group starts awake
            self._share_cache(node)
        try:
            await node.start()
            if node in self._awake:
                self._count_appends_from(node)
            node.peers_down(frozenset(self.suspected))
            if members is not None:
                await node.initialize(dict(members))
        except BaseException:
            self._groups.pop(group_id, None)
            self._forget(node)
            await node.stop()
            raise
        early = self._early.pop(group_id, None)
        if early is not None:
            for frm, heartbeat in early.items():
                node.receive(frm, [heartbeat])
        return node

    def _arrived_early(self, group_id: int, frm: int, messages: list[Any]) -> None:
        """Messages of a group not created here yet (``TcpNetwork.early``): keep each
        member's last heartbeat for its creation. A quiet leader reminded this host
        (restarted) of the group once, and sends nothing more; without it the replica
        would wait for its election timer to learn who leads. Raft takes a message late
        as well as on time; entries are sent again anyway."""
        for m in messages:
            if type(m) is AppendEntries and not m.entries:
                kept = self._early.get(group_id)
                if kept is None:
                    kept = self._early[group_id] = {}
                    if len(self._early) > EARLY_GROUPS:
                        self._early.popitem(last=False)
                elif frm not in kept and len(kept) >= EARLY_SENDERS:
                    del kept[next(iter(kept))]
                kept[frm] = m

    def _share_cache(self, new: RaftNode | None = None) -> None:
        """Split ``log_cache_bytes`` among the awake groups: each engine keeps at most its
        share of entries in memory (``Engine.limit_cache``), so together they keep at
        most the budget (and the entries not yet durable). Half of it goes evenly to
        every awake group, the other half by what each appended lately
        (``_follow_load``). A quiet group keeps none (``_quiet_changed``), so the busy
        groups get the room idle ones do not use. Going over every awake group whenever
        one comes, goes, wakes or goes quiet would make N of them cost N² steps: the
        even half is split for an eighth more than there are, so the shares hold until
        that many are awake (or until fewer than half are left, when the shares grow
        again). ``new``: an awake group that needs its share."""
        n = len(self._awake)
        if not n <= self._cache_split_for < 2 * n + 2:
            self._cache_split_for = n + n // 8 + 1
            for node in self._awake:
                self._give_share(node)
        elif new is not None:
            self._give_share(new)

    @property
    def log_cache_share(self) -> int | None:
        """With a log cache budget: the bytes every awake group may keep now, at least
        (its part of the even half; the groups that appended lately may keep more)."""
        if self.log_cache_bytes is None:
            return None
        return self.log_cache_bytes // 2 // max(self._cache_split_for, 1)

    def _give_share(self, node: RaftNode) -> None:
        """The group's share: to the engine (``cache_budget``), or, before it starts, to
        the node, which gives it to its engine as it loads the log."""
        share = self.log_cache_share
        assert share is not None  # (called only with a budget)
        share += self._load_share.get(node, 0)
        if node.engine is None:
            node.log_cache_share = share
        else:
            node.engine.limit_cache(share)

    def _forget(self, node: RaftNode) -> None:
        """A group leaves: it no longer shares the budget (nor says when it wakes)."""
        node.quiet_changed = None
        if node in self._awake:
            self._asleep(node)
            self._share_cache()

    def _asleep(self, node: RaftNode) -> None:
        self._awake.discard(node)
        self._load_share.pop(node, None)
        self._appended_at.pop(node, None)

    def _count_appends_from(self, node: RaftNode) -> None:
        """What the group appends from now on is its load (not the log it restarted on,
        nor what it appended before it went quiet)."""
        self._appended_at[node] = node.engine.log.total_bytes

    async def _cache_load_loop(self) -> None:
        while self._running:
            await asyncio.sleep(CACHE_LOAD_INTERVAL)
            self._follow_load()

    def _follow_load(self) -> None:
        """Give the half of the budget that follows the load to the awake groups in
        proportion to the payload bytes each appended since the last time, so the
        busiest keep the most of their recent entries and the coldest let go of theirs
        first (CockroachDB's raft entry cache evicts across ranges the same way, entry by
        entry). When no group appended anything, the shares stay as they are."""
        assert self.log_cache_bytes is not None
        appended: dict[RaftNode, int] = {}
        was = self._appended_at
        now: dict[RaftNode, int] = {}
        for node in self._awake:
            if node in was:
                total = now[node] = node.engine.log.total_bytes
                if total > was[node]:
                    appended[node] = total - was[node]
        self._appended_at = now
        load = sum(appended.values())
        if not load:
            return
        half = self.log_cache_bytes - self.log_cache_bytes // 2
        self._load_share = {node: half * n // load for node, n in appended.items()}
        for node in self._awake:
            self._give_share(node)

    def _quiet_changed(self, node: RaftNode, quiet: bool) -> None:
        """A group went quiet: its log is committed everywhere it counts and nothing is
        replicating (a proposal, a read, a member falling behind or coming back wakes it
        first), so it gives its share back and its cache lets go of what is durable;
        woken, it takes a share again."""
        if quiet != (node in self._awake):
            return  # told already
        if quiet:
            self._asleep(node)
            node.engine.limit_cache(0)
            self._share_cache()
        else:
            self._awake.add(node)
            self._count_appends_from(node)
            self._share_cache(node)

    def group(self, group_id: int) -> RaftNode:
        """The replica of group ``group_id`` on this host; ``UnknownGroup`` if none."""
        node = self._groups.get(group_id)
        if node is None:
            raise UnknownGroup(f"group {group_id} does not run on host {self.id}")
        return node

    async def remove_group(self, group_id: int) -> None:
        """Stop this host's replica of ``group_id`` (its storage stays as it is). To take
        the host out of the group, change the group's membership first. A replica that
        leads hands leadership to its preferred successor first, caught up, so the group
        has a leader when this returns (a bare stop resigns too, ``Engine.resign``, but
        the election comes after)."""
        node = self._groups.get(group_id)
        if node is None:
            raise UnknownGroup(f"group {group_id} does not run on host {self.id}")
        others = node.engine.membership.voters - {self.id} if node.is_leader else frozenset()
        if others:
            try:
                await node.transfer_leadership(preferred_leader(group_id, others),
                                               self.config.election_timeout_max * 2)
            except (FastRaftError, asyncio.TimeoutError) as exc:
                log.warning("host %d: group %d stops while leading: %s", self.id,
                            group_id, exc)
        self._groups.pop(group_id, None)
        self._preferred.pop(group_id, None)
        self._forget(node)
        await node.stop()

    def leaders(self) -> list[int]:
        """The groups this host leads."""
        return [g for g, node in self._groups.items() if node.is_leader]

    def status(self) -> dict[str, Any]:
        """This host at a glance: its groups, how many it leads, how many are quiet,
        the groups whose replica here stopped itself (a hook failed: ``NodeFailed``, the
        group's ``failure`` says which), the peer hosts it suspects gone, leadership
        transfers, reminders of quiet leaders (``_remind``), groups campaigning and
        election timers postponed (``max_campaigns``), and transport counters. One pass
        over the groups; each group's own ``status()`` has the details."""
        leading = quiet = 0
        failed = []
        for group_id, node in self._groups.items():
            if node.failure is not None:
                failed.append(group_id)
                continue
            e = node.engine
            if e is not None:
                leading += e.role == Role.LEADER
                quiet += e.quiet
        return {"id": self.id, "address": self.address, "running": self._running,
                "groups": len(self._groups), "leading": leading, "quiet": quiet,
                "failed": sorted(failed),
                "suspected": sorted(self.suspected), "transfers": self.transfers,
                "reminders": self.reminders,
                **self._campaign_figures(),
                "network": dict(self.network.stats)}

    def _campaign_figures(self) -> dict[str, int]:
        """Groups campaigning now, and election timers that waited for a place."""
        limit = self.campaigns
        return {"campaigning": len(limit.holders) if limit else 0,
                "campaigns_postponed": limit.postponed if limit else 0}

    def metrics(self) -> HostMetrics:
        """This host, and its groups' counters summed (one pass over the groups; see
        ``gather_metrics`` for thousands of groups)."""
        sums = _HostSums()
        for node in self._groups.values():
            sums.add(node, self.id)
        return sums.result(self)

    async def gather_metrics(self) -> HostMetrics:
        """``metrics()``, yielding to the event loop every ``METRICS_CHUNK`` groups: a
        scrape of 10,000 groups never holds up their heartbeats
        (``fastraft.metrics.MetricsServer`` uses this)."""
        sums = _HostSums()
        for k, node in enumerate(list(self._groups.values())):
            sums.add(node, self.id)
            if k % METRICS_CHUNK == METRICS_CHUNK - 1:
                await asyncio.sleep(0)
        return sums.result(self)

    async def gather_group_figures(self) -> list[GroupFigures]:
        """Each group's replica here at a glance, by group id, yielding to the event loop
        every ``METRICS_CHUNK`` groups (``MetricsServer(host, per_group=True)``)."""
        figures = []
        for k, (group_id, node) in enumerate(sorted(self._groups.items())):
            e = node.engine
            if e is not None:
                figures.append(GroupFigures(
                    group_id, node.role_name,
                    e.term, e.leader_id, e.commit_index, node.applied_index,
                    e.log.last_index, e.quiet))
            if k % METRICS_CHUNK == METRICS_CHUNK - 1:
                await asyncio.sleep(0)
        return figures

    def health(self, max_apply_lag: int = 1000) -> str | None:
        """Why this host is unhealthy, or None: healthy means running, every group's
        replica here knows its leader (or is it), and each has applied to within
        ``max_apply_lag`` entries of its commit index."""
        if not self._running:
            return "host is not running"
        failed = [g for g, node in self._groups.items() if node.failure is not None]
        if failed:
            first = min(failed)
            return (f"{len(failed)} of {len(self._groups)} groups stopped themselves "
                    f"(group {first}: {self._groups[first].failure})")
        leaderless = [g for g, node in self._groups.items()
                      if node.engine is None or node.engine.leader_id is None]
        if leaderless:
            return (f"{len(leaderless)} of {len(self._groups)} groups know no leader "
                    f"(groups {', '.join(map(str, sorted(leaderless)[:5]))}"
                    f"{', ...' if len(leaderless) > 5 else ''})")
        for g, node in self._groups.items():
            reason = node.health(max_apply_lag)
            if reason is not None:
                return f"group {g}: {reason}"
        return None

    # ------------------------------------------------------------------ liveness

    async def _liveness_loop(self) -> None:
        """Every heartbeat interval: an empty frame to each peer host this host sent
        nothing to, and a peer heard from by no frame for ``election_timeout_min`` is
        suspected: the quiet groups it led wake, their leader lost. A peer heard again,
        or that opened a new connection, is reminded of the quiet groups led here."""
        cfg = self.config
        net = self.network
        loop = asyncio.get_running_loop()
        counts: dict[int, int] = {}
        heard_at: dict[int, float] = {}
        connections: dict[int, int] = {}
        last_tick = loop.time()
        while self._running:
            await asyncio.sleep(cfg.heartbeat_interval)
            net.keepalive()
            now = loop.time()
            # A tick this late found this loop stalled, with frames maybe unread: judge
            # no peer on it.
            stalled = now - last_tick > 2 * cfg.heartbeat_interval
            last_tick = now
            heard = net.frames_heard()
            back = set()
            for peer in net.addresses:
                opened = net.connections_from[peer]
                if opened != connections.get(peer, 0):
                    connections[peer] = opened
                    back.add(peer)
                n = heard.get(peer, 0)
                if n != counts.get(peer) or stalled:
                    counts[peer] = n
                    heard_at[peer] = now
                    if peer in self.suspected:
                        self.suspected.discard(peer)
                        back.add(peer)
                        woken = self._tell_down()
                        log.info("host %d: host %d heard again; woke %s", self.id, peer,
                                 dict(woken), extra={"event": "host_back", "node": self.id,
                                                     "peer": peer, "woken": dict(woken)})
                elif peer not in self.suspected and \
                        now - heard_at[peer] > cfg.election_timeout_min:
                    self.suspected.add(peer)
                    woken = self._tell_down()
                    log.info("host %d: host %d silent for %.2fs; woke %s", self.id, peer,
                             now - heard_at[peer], dict(woken),
                             extra={"event": "host_silent", "node": self.id, "peer": peer,
                                    "woken": dict(woken)})
            if back:
                self._remind(frozenset(back))

    def _tell_down(self) -> Counter[str]:
        """Every group learns which hosts are suspected (``RaftNode.peers_down``): their
        leaders go quiet without those hosts' answers, and quiet groups wake where that
        changes what they must do (their leader lost, a leader without a quorum, a
        member back that is behind). Returns how many woke, by why."""
        down = frozenset(self.suspected)
        woken: Counter[str] = Counter()
        for node in self._groups.values():
            if node.engine is not None:
                why = node.peers_down(down)
                if why is not None:
                    woken[why] += 1
        return woken

    def _remind(self, peers: frozenset[int]) -> None:
        """The quiet groups led here tell their replicas on ``peers`` who leads them
        (``RaftNode.peers_back``): a replica that restarted, or woke when its leader's
        host went silent, knows no leader until then (its election timer would run out
        first). After ``_tell_down``: a member back that is behind woke its group, which
        catches it up instead."""
        told = sum(node.peers_back(peers) for node in self._groups.values())
        self.reminders += told
        if told:
            log.debug("host %d: reminded hosts %s of %d quiet groups led here", self.id,
                      sorted(peers), told)

    # ------------------------------------------------------------------ balance

    def _next_to_scan(self, scan: int) -> list[int]:
        if self._scan_order is None or self._scan_at >= len(self._scan_order):
            self._scan_order = list(self._groups)  # new groups join from the next pass
            self._scan_at = 0
        at = self._scan_at
        self._scan_at = at + scan
        return [g for g in self._scan_order[at:at + scan] if g in self._groups]

    async def _balance_loop(self) -> None:
        assert self.balance_interval is not None
        while self._running:
            await asyncio.sleep(self.balance_interval)
            try:
                await self.balance()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: say so, keep the host serving
                log.exception("host %d: leader balancing failed", self.id)

    async def balance(self, max_transfers: int = 64, scan: int = BALANCE_SCAN) -> int:
        """Hand groups led here to their preferred leaders where those are caught up: at
        most ``max_transfers`` at a time, among the next ``scan`` groups (in turn, so
        every group is looked at within a few rounds). Returns how many moved within the
        transfer timeout."""
        moves = []
        preferred = self._preferred
        groups = self._groups
        order = list(groups) if len(groups) <= scan else self._next_to_scan(scan)
        for group_id in order:  # no await until the loop ends
            e = groups[group_id].engine
            if e is None or e.role != Role.LEADER:
                continue
            voters = e.membership.voters
            known = preferred.get(group_id)
            if known is None or known[0] is not voters:  # a new configuration
                known = preferred[group_id] = (voters, preferred_leader(group_id, voters))
            target = known[1]
            if target == self.id or not e.committed_in_term or e.membership.joint:
                continue
            pr = e.progress.get(target)
            if pr is None or pr.match_index < e.log.last_index:
                continue
            moves.append((groups[group_id], target))
            if len(moves) >= max_transfers:
                break
        self.transfers += len(moves)
        results = await asyncio.gather(*(node.transfer_leadership(target)
                                         for node, target in moves), return_exceptions=True)
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r
        # the others failed for a reason of the moment (a timeout, a stopped group, a new
        # leader meanwhile): the next round tries again
        return sum(1 for r in results if r is None)
