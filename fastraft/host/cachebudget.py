"""A host's log cache budget (``RaftHost(log_cache_bytes=...)``), shared by its awake
groups: each engine keeps at most its share of entries in memory (``Engine.limit_cache``),
so together they keep at most the budget (and the entries not yet durable). Half of it
goes evenly to every awake group, the other half by what each appended lately. A quiet
group keeps none, so the busy groups get the room idle ones do not use."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastraft.node import RaftNode

#: How often, in seconds, the awake groups' shares of a host's log cache budget follow
#: what each appended since.
CACHE_LOAD_INTERVAL = 1.0


class LogCacheBudget:
    """``total`` bytes of log cache split among the awake groups of a host (see the
    module docstring). A group ``join``\\ s when created and ``leave``\\ s when removed;
    in between, its node tells ``quiet_changed``."""

    def __init__(self, total: int) -> None:
        self.total = total
        #: The groups that share it: those not quiet.
        self.awake: set[RaftNode] = set()
        #: The number of awake groups the even half was last split for (``_split``).
        self._split_for = 0
        #: Each awake group's part of the half that follows the load, and its log's
        #: ``total_bytes`` when that was last worked out (``follow_load``).
        self.load_share: dict[RaftNode, int] = {}
        self.appended_at: dict[RaftNode, int] = {}

    @property
    def share(self) -> int:
        """The bytes every awake group may keep now, at least (its part of the even half;
        the groups that appended lately may keep more)."""
        return self.total // 2 // max(self._split_for, 1)

    def join(self, node: RaftNode) -> None:
        """A group is created (before it starts): it starts awake, with a share."""
        node.quiet_changed = self.quiet_changed
        self.awake.add(node)
        self._split(node)

    def started(self, node: RaftNode) -> None:
        """What the group appends from now on is its load (not the log it restarted on)."""
        if node in self.awake:
            self._count_appends_from(node)

    def leave(self, node: RaftNode) -> None:
        """A group leaves: it no longer shares the budget (nor says when it wakes)."""
        node.quiet_changed = None
        if node in self.awake:
            self._asleep(node)
            self._split()

    def clear(self) -> None:
        """The host stops: no group shares the budget any more."""
        self.awake.clear()
        self.load_share.clear()
        self.appended_at.clear()

    def quiet_changed(self, node: RaftNode, quiet: bool) -> None:
        """A group went quiet: its log is committed everywhere it counts and nothing is
        replicating (a proposal, a read, a member falling behind or coming back wakes it
        first), so it gives its share back and its cache lets go of what is durable;
        woken, it takes a share again."""
        if quiet != (node in self.awake):
            return  # told already
        if quiet:
            self._asleep(node)
            node.engine.limit_cache(0)
            self._split()
        else:
            self.awake.add(node)
            self._count_appends_from(node)
            self._split(node)

    async def follow_load_every(self, interval: float = CACHE_LOAD_INTERVAL) -> None:
        """``follow_load`` every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.follow_load()

    def follow_load(self) -> None:
        """Give the half of the budget that follows the load to the awake groups in
        proportion to the payload bytes each appended since the last time, so the
        busiest keep the most of their recent entries and the coldest let go of theirs
        first (CockroachDB's raft entry cache evicts across ranges the same way, entry by
        entry). When no group appended anything, the shares stay as they are."""
        appended: dict[RaftNode, int] = {}
        was = self.appended_at
        now: dict[RaftNode, int] = {}
        for node in self.awake:
            if node in was:
                total = now[node] = node.engine.log.total_bytes
                if total > was[node]:
                    appended[node] = total - was[node]
        self.appended_at = now
        load = sum(appended.values())
        if not load:
            return
        half = self.total - self.total // 2
        self.load_share = {node: half * n // load for node, n in appended.items()}
        for node in self.awake:
            self._give_share(node)

    def _split(self, new: RaftNode | None = None) -> None:
        """Split the even half among the awake groups. Going over every awake group
        whenever one comes, goes, wakes or goes quiet would make N of them cost N² steps:
        the even half is split for an eighth more than there are, so the shares hold until
        that many are awake (or until fewer than half are left, when the shares grow
        again). ``new``: an awake group that needs its share."""
        n = len(self.awake)
        if not n <= self._split_for < 2 * n + 2:
            self._split_for = n + n // 8 + 1
            for node in self.awake:
                self._give_share(node)
        elif new is not None:
            self._give_share(new)

    def _give_share(self, node: RaftNode) -> None:
        """The group's share: to the engine (``cache_budget``), or, before it starts, to
        the node, which gives it to its engine as it loads the log."""
        share = self.share + self.load_share.get(node, 0)
        if node.engine is None:
            node.log_cache_share = share
        else:
            node.engine.limit_cache(share)

    def _asleep(self, node: RaftNode) -> None:
        self.awake.discard(node)
        self.load_share.pop(node, None)
        self.appended_at.pop(node, None)

    def _count_appends_from(self, node: RaftNode) -> None:
        self.appended_at[node] = node.engine.log.total_bytes
