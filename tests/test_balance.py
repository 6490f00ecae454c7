"""The host's leader balancing (``fastraft.host.balance``) on engines in a given state:
which groups it hands to their preferred leader, and when it leaves them alone."""
import msgspec

from fastraft.engine import Role, Timer
from fastraft.host.balance import Balancer, preferred_leader

from aio import run
from engine_helpers import CFG, Harness, make


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


@run
async def test_the_preferred_leader_is_handed_the_group_within_the_lag_and_not_beyond():
    """Under a steady load a follower is always a few entries behind: the group moves
    once its preferred leader is within ``max_learner_lag`` entries (the transfer then
    brings it to the end first), not further behind, nor before it has answered, nor
    while its host is suspected."""
    config = msgspec.structs.replace(CFG, max_learner_lag=3)
    h = Harness([make(i, terms=[1], config=config) for i in (1, 2, 3)])
    # Voter 2 elected by voter 3 alone: voter 1, group 0's preferred leader, has not
    # answered yet; its log is short enough to be within the lag all the same.
    Harness([h.engines[2], h.engines[3]]).fire(2)
    leader = h.engines[2]
    assert leader.role == Role.LEADER and leader.committed_in_term
    assert leader.progress[1].match_index == 0 and leader.log.last_index <= 3
    replica = Replica(leader)
    balancer = Balancer(2, {0: replica})
    assert await balancer.balance() == 0 and replica.transfers == []
    h.fire(2, Timer.HEARTBEAT)  # voter 1 hears of the leader and catches up
    assert leader.progress[1].match_index == leader.log.last_index
    # four entries voter 1 has not acknowledged (voter 3 has: they commit)
    leader.propose([b"w"] * 4)
    Harness([leader, h.engines[3]]).run()
    assert leader.log.last_index - leader.progress[1].match_index == 4
    assert await balancer.balance() == 0 and replica.transfers == []
    # three, but its host suspected (silent): a transfer would stall the group's writes
    leader.progress[1].match_index += 1
    leader.peers_down(frozenset({1}))
    assert await balancer.balance() == 0 and replica.transfers == []
    leader.peers_down(frozenset())
    assert await balancer.balance() == 1 and replica.transfers == [1]
