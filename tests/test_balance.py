"""The host's leader balancing (``fastraft.host.balance``) on engines in a given state:
which groups it hands to their preferred leader, and when it leaves them alone."""
from fastraft.engine import Role, Timer
from fastraft.host.balance import Balancer, preferred_leader

from aio import run
from engine_helpers import Harness, make


class Replica:
    """What the balancer sees of a group's replica: its engine, the membership calls
    under way on it, and the leadership transfers it is asked for."""

    def __init__(self, engine):
        self.engine = engine
        self.membership_calls = 0
        self.transfers = []

    async def transfer_leadership(self, target):
        self.transfers.append(target)


@run
async def test_a_group_with_a_membership_change_under_way_keeps_its_leader():
    # Group 0 of voters 1-4 prefers voter 1; voter 2 leads it.
    assert preferred_leader(0, {1, 2, 3, 4}) == 1
    h = Harness([make(i, voters=(1, 2, 3, 4), terms=[1]) for i in (1, 2, 3, 4)])
    h.fire(2)
    leader = h.engines[2]
    assert leader.role == Role.LEADER and leader.committed_in_term
    replica = Replica(leader)
    balancer = Balancer(2, {0: replica})
    # A change's entry reaches voter 1 only: caught up, and the change not committed
    # (three of four voters needed). Moving the leadership now would drop the change.
    leader.propose_membership(leader.membership.voters, frozenset({5}), {5: "n5:1"})
    Harness([leader, h.engines[1]]).run()
    assert leader.progress[1].match_index == leader.log.last_index
    assert leader.membership_change_pending
    assert await balancer.balance() == 0 and replica.transfers == []
    # Committed: nothing pending, but a call that changes the membership is still
    # running on the leader (say change_membership waiting for a learner to catch up).
    for _ in range(10):  # heartbeats find the entry missing on 3 and 4 and send it
        h.fire(2, Timer.HEARTBEAT)
        if not leader.membership_change_pending:
            break
    assert not leader.membership_change_pending
    assert leader.progress[1].match_index == leader.log.last_index
    replica.membership_calls = 1
    assert await balancer.balance() == 0 and replica.transfers == []
    # Done: the group goes to its preferred leader.
    replica.membership_calls = 0
    assert await balancer.balance() == 1 and replica.transfers == [1]
