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

Leadership is spread across hosts (``balance``); with a ``log_cache_bytes`` budget the
awake groups share it (``cachebudget``); ``metrics`` sums the groups' counters (``sums``).
"""
from __future__ import annotations

import asyncio
import functools
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
from fastraft.host.balance import BALANCE_SCAN, Balancer, preferred_leader
from fastraft.host.cachebudget import LogCacheBudget
from fastraft.host.sums import HostSums
from fastraft.messages import AppendEntries, check_group_id, check_node_id
from fastraft.node import RaftNode
from fastraft.node.arguments import check_members, check_timeout
from fastraft.node.metrics import GroupFigures, HostMetrics
from fastraft.node.runner import CampaignLimit, HeartbeatClock
from fastraft.statemachine import StateMachine
from fastraft.storage import MemoryStorage, RaftStorage
from fastraft.transport.tcp import TcpNetwork

log = logging.getLogger("fastraft.host")

#: ``Config.quiesce_after`` of a host's groups unless its ``config`` says otherwise.
DEFAULT_QUIESCE_AFTER = 1.0
#: Groups ``gather_metrics`` sums between two turns of the event loop.
METRICS_CHUNK = 256
#: Groups of a host that may campaign at once unless its ``max_campaigns`` says otherwise.
DEFAULT_MAX_CAMPAIGNS = 32
#: Groups not created yet whose heartbeats a host keeps for their creation (the oldest
#: go first): a host restarting creates its groups one by one while their leaders'
#: hosts already remind it who leads.
EARLY_GROUPS = 10_000
#: Senders whose last heartbeat a host keeps for each such group (the first heard go
#: first): so at most EARLY_GROUPS * EARLY_SENDERS heartbeats (a few hundred bytes each).
EARLY_SENDERS = 8


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
        if not isinstance(network, TcpNetwork):
            raise InvalidArgument(f"a host's network is a TcpNetwork (its groups share it), "
                                  f"not {type(network).__name__}")
        if network.id != node_id:
            raise InvalidArgument(f"the network is node {network.id}'s, not node {node_id}'s")
        if storage is not None and not callable(storage):
            raise InvalidArgument(f"a host's storage is a function from group id to that "
                                  f"group's RaftStorage (say SharedWAL(...).group), not "
                                  f"{type(storage).__name__}")
        if balance_interval is not None and balance_interval <= 0:
            raise InvalidArgument(f"balance_interval must be positive or None, "
                                  f"got {balance_interval!r}")
        if log_cache_bytes is not None and (type(log_cache_bytes) is not int
                                            or log_cache_bytes < 0):
            raise InvalidArgument(f"log_cache_bytes must be a number of bytes or None, "
                                  f"got {log_cache_bytes!r}")
        self.id = node_id
        self.network = network
        self.storage_factory = storage if storage is not None \
            else (lambda group_id: MemoryStorage())
        self.config = config or Config(quiesce_after=DEFAULT_QUIESCE_AFTER)
        self.cluster_id = cluster_id
        self.balance_interval = balance_interval
        #: None: no limit.
        self.campaigns = None if max_campaigns is None else CampaignLimit(max_campaigns)
        #: One per heartbeat interval the groups use (most hosts: one).
        self._clocks: dict[float, HeartbeatClock] = {}
        self._groups: dict[int, RaftNode] = {}
        #: The stops of replicas ``remove_group`` took off the host (``_leave``): a new
        #: replica of the group waits for its stop (it may be on the same storage).
        self._leaving: dict[int, asyncio.Task[None]] = {}
        self._balancer = Balancer(node_id, self._groups)
        #: The host's tasks: liveness, and balancing and the cache budget if any.
        self._tasks: list[asyncio.Task[None]] = []
        #: Peer hosts silent for longer than ``election_timeout_min``.
        self.suspected: set[int] = set()
        self._running = False
        #: The stop under way, or done (None until ``stop()``).
        self._stopping: asyncio.Task[None] | None = None
        #: Resolved when the start under way has listened or failed (None: none).
        self._starting: asyncio.Future[None] | None = None
        #: Quiet groups led here that reminded a peer host of their leader, so far
        #: (``_remind``).
        self.reminders = 0
        #: Heartbeats that came for groups not created here yet: group id -> sender ->
        #: its last one (``_arrived_early``), delivered when the group is created.
        self._early: OrderedDict[int, dict[int, AppendEntries]] = OrderedDict()
        self.log_cache_bytes = log_cache_bytes
        self._cache_budget = (None if log_cache_bytes is None
                              else LogCacheBudget(log_cache_bytes))
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

    @property
    def transfers(self) -> int:
        """Leadership transfers to preferred leaders started so far (one that times out
        may still complete later)."""
        return self._balancer.transfers

    @property
    def log_cache_share(self) -> int | None:
        """With a log cache budget: the bytes every awake group may keep now, at least
        (its part of the even half; the groups that appended lately may keep more)."""
        return None if self._cache_budget is None else self._cache_budget.share

    async def start(self) -> RaftHost:
        """Listen, and run the host's own tasks (liveness, balancing, the cache budget).
        A no-op on a host running; a call while another starts it waits for that one
        (and tries again if it failed); a host stopping finishes its stop first (a stop
        left to run when its caller was cancelled), then starts again."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
        if self._starting is not None:
            await asyncio.shield(self._starting)
        if self._running:
            return self
        starting = self._starting = asyncio.get_running_loop().create_future()
        try:
            await self.network.serve()
        finally:
            self._starting = None
            starting.set_result(None)
        self.network.early = self._arrived_early
        self._running = True
        self._stopping = None
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._liveness_loop()))
        if self.balance_interval is not None:
            self._tasks.append(loop.create_task(self._balancer.every(self.balance_interval)))
        if self._cache_budget is not None:
            self._tasks.append(loop.create_task(self._cache_budget.follow_load_every()))
        return self

    async def stop(self) -> None:
        """Stop every group and the transport; storages stay open (they are reused by a
        new host: a restart). A caller cancelled while it waits stops waiting; the stop
        goes on to its end (``RaftNode.stop``), and a second call waits for it. A start
        under way ends first."""
        if self._starting is not None:
            await asyncio.shield(self._starting)
        if self._stopping is None:
            self._running = False
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        groups = list(self._groups.values())
        self._groups.clear()  # (the balancer's view of them too)
        self._early.clear()
        if self._cache_budget is not None:
            self._cache_budget.clear()
        for node in groups:
            node.quiet_changed = None
            await node.stop()
        # remove_group's replicas still stopping
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)
        for clock in self._clocks.values():
            clock.stop()
        self._clocks.clear()
        await self.network.stop()

    async def step_down(self, timeout: float | None = None) -> None:
        """Before a planned stop: every group led here hands leadership over and waits
        for its proposals' fate (``RaftNode.step_down``), all at once; every replica here
        declines leadership from then on, so the other hosts' balancing does not hand
        groups back to this one while it stops. Groups that did not hand over are
        logged in one line (``step_down_failed``): when the whole cluster stops, every
        group's successor declines."""
        if timeout is not None:
            check_timeout(timeout)
        groups = list(self._groups.items())
        failures = await asyncio.gather(*(node.hand_over(timeout) for _, node in groups))
        failed = {gid: why for (gid, _), why in zip(groups, failures) if why is not None}
        if failed:
            first = min(failed)
            log.warning("host %d: stepping down: %d of %d groups did not hand over; group "
                        "%d: %s", self.id, len(failed), len(groups), first, failed[first],
                        extra={"event": "step_down_failed", "node": self.id,
                               "groups": sorted(failed)})

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
        group. Raises ``GroupExists`` if the group is already here, ``NodeStopped`` if the
        host stops before the replica has started. A replica of the group that
        ``remove_group`` is still stopping stops first."""
        check_group_id(group_id)
        while (leaving := self._leaving.get(group_id)) is not None and self._running:
            await asyncio.shield(leaving)  # done once it has left _leaving: no spin
        if not self._running:
            raise NodeStopped(f"host {self.id} is not running: start() it first")
        if group_id in self._groups:
            raise GroupExists(f"group {group_id} already runs on host {self.id}")
        if members is not None:
            members = check_members(self.id, members)
        network = self.network.group(group_id)
        network.watched = True  # _liveness_loop wakes it when quiet and its leader is lost
        if storage is None:  # not `or`: a user's storage may define __len__
            storage = self.storage_factory(group_id)
        node = RaftNode(self.id, storage=storage,
                        network=network, state_machine=state_machine,
                        config=config or self.config, rng=self._rng,
                        cluster_id=f"{self.cluster_id}/{group_id}")
        node.group_id = group_id
        node.campaign_limit = self.campaigns
        node.preferred = lambda voters: preferred_leader(group_id, voters) == self.id
        interval = node.config.heartbeat_interval
        clock = self._clocks.get(interval)
        if clock is None:
            clock = self._clocks[interval] = HeartbeatClock(asyncio.get_running_loop(),
                                                            interval)
        node.heartbeat_clock = clock
        # A replica stopping itself, taken out of its group (Config.stop_when_removed):
        # gone from the host as after remove_group, with no leadership to hand over.
        node.on_removed = functools.partial(self._forget, group_id)
        self._groups[group_id] = node
        budget = self._cache_budget
        if budget is not None:
            budget.join(node)
        try:
            try:
                await node.start()
            except NodeStopped as e:
                if self._running:  # the replica's own stop() (host.group(...).stop())
                    raise
                raise NodeStopped(
                    f"host {self.id} stopped while group {group_id} started") from e
            if budget is not None:
                budget.started(node)
            node.peers_down(frozenset(self.suspected))
            if members is not None:
                await node.initialize(dict(members))
        except BaseException:
            self._forget(group_id, node)
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
            except (FastRaftError, TimeoutError) as exc:
                # the builtin TimeoutError: before Python 3.11, asyncio.TimeoutError was
                # another class, and a timed-out handover escaped remove_group
                log.warning("host %d: group %d stops while leading: %s", self.id,
                            group_id, exc)
        self._forget(group_id, node)
        leaving = self._leaving[group_id] = asyncio.get_running_loop().create_task(
            self._leave(group_id, node))
        await asyncio.shield(leaving)

    async def _leave(self, group_id: int, node: RaftNode) -> None:
        """Stop a replica ``remove_group`` took off the host, to its end even if that
        call is cancelled: until then a new replica of the group waits."""
        try:
            await node.stop()
        finally:
            if self._leaving.get(group_id) is asyncio.current_task():
                del self._leaving[group_id]

    def _forget(self, group_id: int, node: RaftNode) -> None:
        """A group leaves this host: no balancing, no share of the cache budget. Not if
        ``node`` left already (``remove_group`` while it started), whatever replica of
        the group came since."""
        if self._groups.get(group_id) is not node:
            return
        del self._groups[group_id]
        self._balancer.forget(group_id)
        if self._cache_budget is not None:
            self._cache_budget.leave(node)

    def leaders(self) -> list[int]:
        """The groups this host leads."""
        return [g for g, node in self._groups.items() if node.is_leader]

    def status(self) -> dict[str, Any]:
        """This host at a glance: its groups, how many it leads, how many are quiet,
        the groups whose replica here stopped itself (a hook failed: ``NodeFailed``, the
        group's ``failure`` says which), those taken out of their group (stop them with
        ``remove_group``; with ``Config.stop_when_removed`` they leave by themselves),
        the peer hosts it suspects gone, leadership transfers, reminders of quiet
        leaders (``_remind``), groups campaigning and election timers postponed
        (``max_campaigns``), the bytes of log entries its groups keep in memory and
        their budget (None: none), and transport counters.
        One pass over the groups; each group's own ``status()`` has the details."""
        leading = quiet = cached = 0
        failed = []
        removed = []
        for group_id, node in self._groups.items():
            if node.failure is not None:
                failed.append(group_id)
                continue
            e = node.engine
            if e is not None:
                leading += e.role == Role.LEADER
                quiet += e.quiet
                cached += e.log.cache_bytes
                if e.removed:
                    removed.append(group_id)
        return {"id": self.id, "address": self.address, "running": self._running,
                "groups": len(self._groups), "leading": leading, "quiet": quiet,
                "failed": sorted(failed), "removed": sorted(removed),
                "log_cache_bytes": cached,
                "log_cache_budget": self.log_cache_bytes,
                "suspected": sorted(self.suspected), "transfers": self.transfers,
                "reminders": self.reminders,
                **self.campaign_figures(),
                "network": dict(self.network.stats)}

    def campaign_figures(self) -> dict[str, int]:
        """Groups campaigning now, and election timers that waited for a place."""
        limit = self.campaigns
        return {"campaigning": len(limit.holders) if limit else 0,
                "campaigns_postponed": limit.postponed if limit else 0}

    def metrics(self) -> HostMetrics:
        """This host, and its groups' counters summed (one pass over the groups; see
        ``gather_metrics`` for thousands of groups)."""
        sums = HostSums()
        for node in self._groups.values():
            sums.add(node, self.id)
        return sums.result(self)

    async def gather_metrics(self) -> HostMetrics:
        """``metrics()``, yielding to the event loop every ``METRICS_CHUNK`` groups: a
        scrape of 10,000 groups never holds up their heartbeats
        (``fastraft.metrics.MetricsServer`` uses this)."""
        sums = HostSums()
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
        ``max_apply_lag`` entries of its commit index. A replica taken out of its group
        counts for nothing (``status()["removed"]`` lists it): after a restart it hears
        from no leader, and the host serves its other groups all the same."""
        if not self._running:
            return "host is not running"
        failed = [g for g, node in self._groups.items() if node.failure is not None]
        if failed:
            first = min(failed)
            return (f"{len(failed)} of {len(self._groups)} groups stopped themselves "
                    f"(group {first}: {self._groups[first].failure})")
        leaderless = [g for g, node in self._groups.items() if node.engine is None
                      or (node.engine.leader_id is None and not node.engine.removed)]
        if leaderless:
            return (f"{len(leaderless)} of {len(self._groups)} groups know no leader "
                    f"(groups {', '.join(map(str, sorted(leaderless)[:5]))}"
                    f"{', ...' if len(leaderless) > 5 else ''})")
        for g, node in self._groups.items():
            if node.engine.removed:
                continue
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

    async def balance(self, max_transfers: int = 64, scan: int = BALANCE_SCAN) -> int:
        """Hand groups led here to their preferred leaders where those are caught up: at
        most ``max_transfers`` at a time, among the next ``scan`` groups (in turn, so
        every group is looked at within a few rounds). Returns how many moved within the
        transfer timeout. (The host does this every ``balance_interval`` seconds.)"""
        return await self._balancer.balance(max_transfers, scan)
