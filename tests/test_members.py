"""``fastraft.members`` (``fastraft member``) against a stand-in for a group's leader:
which refusals it asks again after, and which it reports. The command itself runs
against real nodes in ``test_processes.py``."""
import asyncio

from fastraft.kvclient import ClientError
from fastraft.members import change_members

from aio import run


class Leader:
    """A client of a group's leader that refuses its next changes with ``refusals``."""

    closed = False

    def __init__(self, *refusals: str) -> None:
        self.refusals = list(refusals)
        self.voters, self.learners = {1, 2, 3}, set()

    async def status(self, group=None):
        return {"role": "leader", "term": 1,
                "membership": {"voters": sorted(self.voters),
                               "learners": sorted(self.learners), "outgoing": []}}

    def _refuse_maybe(self):
        if self.refusals:
            raise ClientError(self.refusals.pop(0))

    async def add_learner(self, node_id, address, group=None):
        self._refuse_maybe()
        self.learners.add(node_id)

    async def change_membership(self, voters, group=None):
        self._refuse_maybe()
        self.voters, self.learners = set(voters), self.learners - set(voters)


@run
async def test_a_moved_or_stopped_leader_or_a_change_under_way_is_waited_out():
    leader = Leader("not_leader", "MembershipChangeInProgress: joint configuration",
                    "TimeoutError: the change did not complete in 30.0s",
                    "ProposalDropped: node 1 lost leadership before entry 7 committed; "
                    "it may or may not take effect",
                    "NodeStopped: node 1 stopped before the membership change at 9 was "
                    "known complete: it may or may not take effect; read the membership "
                    "(status()) before trying again")
    said = []
    failed = await change_members({1: leader}, "add", 4, "127.0.0.1:9", [0], say=said.append)
    assert failed == 0 and said == ["group 0: node 4 added as a voter"]
    assert leader.voters == {1, 2, 3, 4} and not leader.refusals


@run
async def test_a_refusal_that_would_refuse_again_is_reported_not_retried():
    leader = Leader("CatchUpTimeout: learners still behind after 30s; not promoted")
    leader.learners = {4}  # added; too far behind to be promoted in time
    said = []
    failed = await change_members({1: leader}, "add", 4, "127.0.0.1:9", [None],
                                  say=said.append)
    assert failed == 1
    assert said == ["the group: failed: CatchUpTimeout: learners still behind after 30s; "
                    "not promoted"]
    assert leader.learners == {4}  # a run again finds the learner and promotes it
    said.clear()
    assert await change_members({1: leader}, "add", 4, "127.0.0.1:9", [None],
                                say=said.append) == 0
    assert said == ["the group: node 4 added as a voter"] and leader.voters == {1, 2, 3, 4}


@run
async def test_a_leader_that_stops_answering_fails_its_group_within_the_timeout():
    """A paused leader never answers: the group is reported failed after ``timeout``
    (the command ends; a run again finds what was done), the others go on."""
    class Silent(Leader):
        async def add_learner(self, node_id, address, group=None):
            await asyncio.Event().wait()

    said = []
    failed = await asyncio.wait_for(change_members(
        {1: Silent()}, "add", 4, "127.0.0.1:9", [0], timeout=0.2, say=said.append), 10)
    assert failed == 1 and said == ["group 0: failed: not done within 0.2s"]
