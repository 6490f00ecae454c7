"""Leader balance across hosts: each group has a preferred leader (its voters in id
order, picked by group id), and a host that leads a group whose preferred leader is
caught up hands leadership to it (thesis §3.10). So leaders are balanced while every host
is up, and after a host restarts its groups' leadership comes back to it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastraft.engine import Role

if TYPE_CHECKING:
    from fastraft.node import RaftNode

log = logging.getLogger("fastraft.host")

#: Groups a balancing round looks at, taking turns: a round costs the same with 100,000.
BALANCE_SCAN = 1024


def preferred_leader(group_id: int, voters: frozenset[int] | set[int]) -> int:
    """The voter that should lead ``group_id``: groups with the same voters take turns."""
    ordered = sorted(voters)
    return ordered[group_id % len(ordered)]


class Balancer:
    """Hands the groups host ``host_id`` leads (``groups``, the host's own dict) to their
    preferred leaders, a round at a time."""

    def __init__(self, host_id: int, groups: Mapping[int, RaftNode]) -> None:
        self.host_id = host_id
        self.groups = groups
        #: Leadership transfers to preferred leaders started so far (one that times out
        #: may still complete later).
        self.transfers = 0
        #: Each group's voters when its preferred leader was last worked out, and it.
        self._preferred: dict[int, tuple[frozenset[int], int]] = {}
        #: The groups balancing rounds go through in turn, and where the next one starts.
        self._scan_order: list[int] | None = None
        self._scan_at = 0

    def forget(self, group_id: int) -> None:
        self._preferred.pop(group_id, None)

    async def every(self, interval: float) -> None:
        """A balancing round every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.balance()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: say so, keep the host serving
                log.exception("host %d: leader balancing failed", self.host_id)

    async def balance(self, max_transfers: int = 64, scan: int = BALANCE_SCAN) -> int:
        """Hand groups led here to their preferred leaders where those are caught up: at
        most ``max_transfers`` at a time, among the next ``scan`` groups (in turn, so
        every group is looked at within a few rounds). Returns how many moved within the
        transfer timeout."""
        moves = []
        preferred = self._preferred
        groups = self.groups
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
            # A membership change under way keeps its leader: moving it would drop the
            # change (ProposalDropped) or refuse it (NotLeader) in the caller's hands.
            if target == self.host_id or not e.committed_in_term \
                    or e.membership_change_pending or groups[group_id].membership_calls:
                continue
            # Near the end is enough: the transfer itself stops new entries and brings the
            # target up to date before it tells it to campaign (thesis §3.10). Asking for
            # the very end left leaders where they were under a steady load, where a few
            # entries are always in flight. A host this one suspects would stall the
            # group's writes for the transfer's timeout, round after round.
            if target in e.down or not e.caught_up(target, e.config.max_learner_lag):
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

    def _next_to_scan(self, scan: int) -> list[int]:
        if self._scan_order is None or self._scan_at >= len(self._scan_order):
            self._scan_order = list(self.groups)  # new groups join from the next pass
            self._scan_at = 0
        at = self._scan_at
        self._scan_at = at + scan
        return [g for g in self._scan_order[at:at + scan] if g in self.groups]
