"""Proposals and membership changes a leader took and then lost the leadership over:
answered with their result when a later leader commits their entries, failed when it
commits others in their place or a snapshot covers them, and not left waiting forever."""
import asyncio

import msgspec
import pytest

from fastraft.config import Config
from fastraft.engine import Role
from fastraft.errors import BatchPartlyCommitted, BatchRestUnknown, ProposalDropped
from fastraft.messages import AppendEntries
from fastraft.testing import LocalCluster, wait_until

from aio import run
from test_node import GatedApply, Recorder

# One leader until a test moves it: election timeouts beyond a stall of a busy worker.
STEADY = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05)
#: As STEADY, but a deposed leader waits as long as it takes to learn its writes' fate.
UNBOUNDED = msgspec.structs.replace(STEADY, lost_leadership_wait=1000)


def cut_one_way(c, frm, to):
    """Messages from the nodes ``frm`` to the nodes ``to`` are lost (not the answers)."""
    c.hub._cut |= {(a, b) for a in frm for b in to}


# Check-quorum deposes a leader that hears one follower of four an election timeout
# after the cut: timeouts long enough that a transfer comes first on a busy machine.
PATIENT = Config(election_timeout_min=1.0, election_timeout_max=2.0, heartbeat_interval=0.05)


async def heard_by_the_target_only(c):
    """The leader of five, once an entry of its term committed, and the follower it is
    to hand over to: from now on only that follower's messages reach the leader, which
    can commit nothing (2 of 5)."""
    leader = await c.leader()
    await leader.propose(b"warm")
    target, *others = [i for i in c.nodes if i != leader.id]
    cut_one_way(c, others, [leader.id])
    return leader, target


async def writes_held_by_the_target_only(c):
    """``heard_by_the_target_only``, then 20 writes every follower holds but only the
    target acknowledged (not committed): the leader, the target, the last index before
    the writes, and the writes' futures."""
    leader, target = await heard_by_the_target_only(c)
    before = leader.engine.log.last_index
    writes = [asyncio.ensure_future(leader.propose(b"w%d" % k)) for k in range(20)]
    await wait_until(lambda: leader.engine.log.last_index == before + 20 and
                     c.nodes[target].engine.log.last_index == before + 20, 10)
    assert leader.engine.commit_index <= before  # only the target answered
    return leader, target, before, writes


@pytest.mark.parametrize("wait", [2, 0])  # the default; told not to wait
@run
async def test_writes_in_flight_over_a_transfer_get_their_results(wait):
    """Five nodes; the leader's writes reach every follower but only the transfer's
    target answers (2 of 5: not committed). The target wins, commits them with its
    first entry, and the old leader, told so, answers its proposers with their results
    (it said ProposalDropped at once before, for writes that did commit). Told not to
    wait (``lost_leadership_wait=0``), it fails them as it steps down, long before the
    new leader's commit can reach it."""
    config = msgspec.structs.replace(PATIENT, lost_leadership_wait=wait)
    async with LocalCluster(5, state_machine=Recorder, config=config) as c:
        leader, target, before, writes = await writes_held_by_the_target_only(c)
        await leader.transfer_leadership(target)
        results = await asyncio.gather(*writes, return_exceptions=True)
        if wait:
            assert results == list(range(before + 1, before + 21))
            assert leader.metrics().proposals_dropped == 0
        else:
            assert all(isinstance(r, ProposalDropped) and r.committed is None
                       and "in 0 election timeouts" in str(r) for r in results), results


@run
async def test_writes_a_later_leader_replaced_fail_as_not_committed():
    """The leader's messages are lost: the others elect a new leader, which writes at the
    same indexes and commits. When the old leader applies those entries, its proposers
    hear theirs were not committed, never another write's result."""
    # only the new commits end the wait
    async with LocalCluster(3, state_machine=Recorder, config=UNBOUNDED) as c:
        old = await c.leader()
        await old.propose(b"warm")
        others = [i for i in c.nodes if i != old.id]
        cut_one_way(c, [old.id], others)
        writes = [asyncio.ensure_future(old.propose(b"lost%d" % k)) for k in range(5)]
        new = await c.leader(exclude={old.id})
        for k in range(10):  # the new leader's writes take the old leader's indexes
            await new.propose(b"new%d" % k)
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(r, ProposalDropped) and r.committed is False
                   for r in results), results
        assert all("committed other entries in its place: it was not committed" in str(r)
                   for r in results), results
        assert old.metrics().proposals_dropped == 5
        await wait_until(lambda: old.engine.commit_index >= new.engine.commit_index, 10)
        assert not any(data.startswith(b"lost") for _, data in c.state_machines[old.id].applied)


async def a_batch_of_which_four_entries_committed(c, monkeypatch, applied=True):
    """A batch of ten from the leader of three: one follower, A, gets only its first four
    entries, the other, B, none; the leader commits and applies those four with A (not
    ``applied``: commits them, its ``GatedApply`` closed). The leader, A, B, the last
    index before the batch, and the batch's future."""
    old = await c.leader()
    await old.propose(b"warm")
    a, b = [i for i in c.nodes if i != old.id]
    before = old.engine.log.last_index
    cut_one_way(c, [old.id], [b])
    deliver = c.hub._deliver

    def the_batchs_first_four_only(frm, to, messages):
        if frm == old.id:
            messages = [msgspec.structs.replace(m, entries=[
                e for e in m.entries if e.index <= before + 4])
                if isinstance(m, AppendEntries) else m for m in messages]
        deliver(frm, to, messages)
    monkeypatch.setattr(c.hub, "_deliver", the_batchs_first_four_only)
    if not applied:
        c.state_machines[old.id].gate.clear()
    batch = asyncio.ensure_future(old.propose_batch([b"b%d" % k for k in range(10)]))
    await wait_until(lambda: (old._applier.applied_index if applied
                              else old.engine.commit_index) == before + 4, 10)
    return old, a, b, before, batch


@run
async def test_a_batch_a_later_leader_committed_in_part_fails_saying_which_part(monkeypatch):
    """A batch of ten reaches one follower, A, only up to its fourth entry, and the
    leader commits those four with A. Cut off, the leader loses its leadership to A,
    whose first entry takes the batch's fifth index. The batch's proposer hears that its
    first four entries were committed, with their results, and the rest not: not "it was
    not committed" (it was told so before), and not a batch safe to send again whole."""
    config = msgspec.structs.replace(UNBOUNDED, max_entries_per_message=4)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        old, a, _, before, batch = await a_batch_of_which_four_entries_committed(
            c, monkeypatch)
        cut_one_way(c, [old.id], [a])
        await c.leader(exclude={old.id})  # A: B's log ends before the batch
        with pytest.raises(BatchPartlyCommitted) as failed:
            await batch
        assert failed.value.committed is None
        assert failed.value.results == list(range(before + 1, before + 5))
        assert f"committed entries {before + 1}..{before + 4} of the batch's entries " \
               f"{before + 1}..{before + 10}, and other entries in place of the rest" \
               in str(failed.value)
        assert [d for _, d in c.state_machines[old.id].applied][-4:] == \
            [b"b0", b"b1", b"b2", b"b3"]


@run
async def test_a_batch_whose_fate_is_given_up_on_keeps_the_results_of_its_committed_part(
        monkeypatch):
    """A batch of ten reaches one follower, A, only up to its fourth entry, and the
    leader commits and applies those four with A. Then the leader is cut off from both
    followers and never learns what became of the rest. Once ``lost_leadership_wait``
    runs out, the batch's proposer hears the results of the first four and that the
    rest's fate is unknown: not a "may or may not" for the whole batch, four entries of
    which took effect."""
    config = msgspec.structs.replace(STEADY, max_entries_per_message=4)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        old, a, b, before, batch = await a_batch_of_which_four_entries_committed(
            c, monkeypatch)
        cut_one_way(c, [old.id], [a])
        cut_one_way(c, [a, b], [old.id])
        with pytest.raises(BatchRestUnknown) as failed:
            await asyncio.wait_for(batch, 20)
        assert failed.value.committed is None
        assert not isinstance(failed.value, BatchPartlyCommitted)
        assert failed.value.results == list(range(before + 1, before + 5))
        assert f"did not learn its fate in 2 election timeouts: it may or may not be " \
               f"committed (entries {before + 1}..{before + 4} of the batch's entries " \
               f"{before + 1}..{before + 10} were committed, and their results are the " \
               f"error's; the fate of the rest is unknown)" in str(failed.value)
        assert old.engine.role != Role.LEADER


@run
async def test_a_batch_given_up_on_before_its_committed_part_is_applied_waits_for_it(
        monkeypatch):
    """As above, but the leader's state machine is held up before the four committed
    entries: the batch is given up on while they are not applied yet. It fails once
    they are, with their results, not at once with a "may or may not" for all ten."""
    config = msgspec.structs.replace(STEADY, max_entries_per_message=4)
    async with LocalCluster(3, state_machine=GatedApply, config=config) as c:
        old, a, b, before, batch = await a_batch_of_which_four_entries_committed(
            c, monkeypatch, applied=False)
        cut_one_way(c, [old.id], [a])
        cut_one_way(c, [a, b], [old.id])
        await wait_until(lambda: old.metrics().proposals_dropped == 6, 20)  # given up on
        assert not batch.done() and old._applier.applied_index == before
        c.state_machines[old.id].gate.set()
        with pytest.raises(BatchRestUnknown) as failed:
            await asyncio.wait_for(batch, 10)
        assert failed.value.results == list(range(before + 1, before + 5))
        assert f"(entries {before + 1}..{before + 4} of the batch's entries {before + 1}.." \
               f"{before + 10} were committed" in str(failed.value)


@run
async def test_writes_cut_from_the_old_leaders_log_that_commit_later_get_their_results(
        monkeypatch):
    """Five nodes. The leader's writes reach one follower, A, only. The three others elect
    a new leader, N, whose entries reach the old leader alone: they cut the writes from
    its log, and commit nothing. N stops; A, whose log holds the writes and is the most
    up to date of the three live voters, is elected and commits them, and the old leader
    gets them back. Its proposers hear their results: failing them as not committed when
    they were cut (this node did) was wrong, as they were committed after."""
    # only the commit ends the wait
    async with LocalCluster(5, state_machine=Recorder, config=UNBOUNDED) as c:
        old = await c.leader()
        await old.propose(b"warm")
        a, *rest = [i for i in c.nodes if i != old.id]
        cut_one_way(c, [old.id], rest)
        before, term = old.engine.log.last_index, old.engine.term
        writes = [asyncio.ensure_future(old.propose(b"w%d" % k)) for k in range(5)]
        await wait_until(lambda: c.nodes[a].engine.log.last_index == before + 5, 10)
        # A out; among the three others, what a leader sends reaches none of them
        cut_one_way(c, [a], c.nodes)
        cut_one_way(c, c.nodes, [a])
        deliver = c.hub._deliver
        dropping = True

        def deliver_votes_only_among_the_rest(frm, to, messages):
            if dropping and frm in rest and to in rest:
                messages = [m for m in messages if not isinstance(m, AppendEntries)]
            if messages:
                deliver(frm, to, messages)
        monkeypatch.setattr(c.hub, "_deliver", deliver_votes_only_among_the_rest)
        await wait_until(lambda: any(c.nodes[i].is_leader for i in rest), 10)
        new = next(c.nodes[i] for i in rest if c.nodes[i].is_leader)
        await wait_until(lambda: old.engine.log.term_at(before + 1) not in (term, -1), 10)
        assert new.engine.commit_index <= before and not any(w.done() for w in writes)
        await new.stop()
        dropping = False
        c.hub._cut = {(old.id, i) for i in c.nodes if i != old.id}  # A back
        leader = await c.leader(exclude={old.id})
        assert leader.id == a
        c.hub.heal()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results == list(range(before + 1, before + 6))
        assert old.metrics().proposals_dropped == 0


@run
async def test_writes_a_snapshot_covers_fail_as_unknown():
    """Nothing reaches the old leader: its writes are in every other log, and it steps
    down (check-quorum) not knowing whether they committed. The new leader commits them
    and compacts its log past them; the old leader then gets a snapshot, which holds
    their effects but not their results: its proposers hear the outcome is unknown (the
    entries were committed, so not 'not committed')."""
    # only the snapshot ends the wait
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 lost_leadership_wait=1000,
                 snapshot_interval=10, snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=Recorder, config=cfg) as c:
        old = await c.leader()
        await old.propose(b"warm")
        others = [i for i in c.nodes if i != old.id]
        cut_one_way(c, others, [old.id])
        before = old.engine.log.last_index
        writes = [asyncio.ensure_future(old.propose(b"w%d" % k)) for k in range(5)]
        await wait_until(lambda: all(c.nodes[i].engine.log.last_index == before + 5
                                     for i in others), 10)
        new = await c.leader(exclude={old.id})
        for k in range(30):
            await new.propose(b"new%d" % k)
        await wait_until(lambda: new.engine.log.snapshot_index > before + 5, 10)
        assert not any(w.done() for w in writes)
        c.hub.heal()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(r, ProposalDropped) and r.committed is None
                   for r in results), results
        assert all("a snapshot of the new leader covers it" in str(r) for r in results)
        await wait_until(lambda: old.engine.commit_index >= new.engine.commit_index, 10)


@run
async def test_committed_writes_a_snapshot_restores_before_they_are_applied_are_answered():
    """The leader commits writes while its state machine is held up on the first, and is
    cut off. The new leader compacts past them; the old one restores its snapshot
    instead of applying them (the snapshot holds them). Their proposers hear that they
    were committed and that their results are not known: they waited forever before."""
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 snapshot_interval=10, snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=GatedApply, config=cfg) as c:
        old = await c.leader()
        await old.propose(b"warm")
        c.state_machines[old.id].gate.clear()
        first = asyncio.ensure_future(old.propose(b"w0"))  # its apply waits at the gate
        # w0 alone in the state machine's hands: had the apply task not taken it yet, the
        # rest would join its batch and be applied with it, legitimately
        await wait_until(lambda: old.engine.commit_index == old.engine.log.last_index
                         and old._applier.applied_index < old.engine.commit_index
                         and not old._applier.queue, 10)
        rest = [asyncio.ensure_future(old.propose(b"w%d" % k)) for k in range(1, 5)]
        await wait_until(lambda: old.engine.commit_index == old.engine.log.last_index
                         and not old._proposals.buffered, 10)
        last = old.engine.log.last_index
        c.hub.isolate(old.id)
        new = await c.leader(exclude={old.id})
        for k in range(30):
            await new.propose(b"new%d" % k)
        await wait_until(lambda: new.engine.log.snapshot_index > last, 10)
        c.hub.heal()
        await wait_until(lambda: old.engine.log.snapshot_index > last, 10)
        c.state_machines[old.id].gate.set()
        assert await asyncio.wait_for(first, 10) == last - 4
        results = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 10)
        assert all(isinstance(r, ProposalDropped) and r.committed is True and "it was "
                   "committed, but its result is not known here" in str(r)
                   for r in results), results
        assert old._proposals.pending == 0 and old.metrics().proposals_dropped == 4


@pytest.mark.parametrize("writes", [5, 0])  # and a change alone
@pytest.mark.parametrize("wait", [2, 0])  # the default; told not to wait
@run
async def test_writes_and_a_change_of_a_leader_cut_off_fail_after_lost_leadership_wait(
        wait, writes):
    config = msgspec.structs.replace(STEADY, lost_leadership_wait=wait)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        old = await c.leader()
        await old.propose(b"warm")
        c.hub.isolate(old.id)
        proposed = [asyncio.ensure_future(old.propose(b"w%d" % k)) for k in range(writes)]
        change = asyncio.ensure_future(old.add_learner(9, "nine"))
        await wait_until(lambda: not old.is_leader, 10)
        results = await asyncio.gather(*proposed, change, return_exceptions=True)
        assert all(isinstance(r, ProposalDropped) for r in results), results
        assert all(f"did not learn its fate in {wait} election timeouts" in str(r)
                   for r in results), results
        assert old._proposals.pending == 0


@run
async def test_a_leader_elected_again_answers_its_earlier_terms_writes():
    """Cut off, the leader steps down with its writes in its log only; the other live
    node cannot be elected without them (the third is stopped). When the link heals, the
    old leader is elected again and commits them with its new term's first entry: its
    proposers get their results, and their wait is no longer bounded."""
    async with LocalCluster(3, state_machine=Recorder, config=UNBOUNDED) as c:
        old = await c.leader()
        await old.propose(b"warm")
        down = next(i for i in c.nodes if i != old.id)
        await c.nodes[down].stop()
        c.hub.isolate(old.id)
        before = old.engine.log.last_index
        writes = [asyncio.ensure_future(old.propose(b"w%d" % k)) for k in range(5)]
        # (the engine steps down first; the node acts on it with the turn's commands)
        await wait_until(lambda: old._orphan_wait is not None, 10)
        assert not old.is_leader and not any(w.done() for w in writes)
        c.hub.heal()
        await wait_until(lambda: old._accepting, 10)  # leads, and the node acted on it
        assert old._orphan_wait is None
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results == list(range(before + 1, before + 6))


@run
async def test_a_membership_change_a_later_leader_commits_completes():
    """As for writes: the change reaches every follower, only the transfer's target
    answers, and the target commits it. The call returns (it said ProposalDropped at once
    for a change that took effect)."""
    async with LocalCluster(5, state_machine=Recorder, config=PATIENT) as c:
        leader, target = await heard_by_the_target_only(c)
        before = leader.engine.log.last_index
        change = asyncio.ensure_future(leader.add_learner(9, "nine"))
        await wait_until(lambda: c.nodes[target].engine.log.last_index == before + 1, 10)
        assert leader.engine.commit_index <= before and not change.done()
        await leader.transfer_leadership(target)
        await asyncio.wait_for(change, 10)
        assert leader.engine.membership.learners == {9}
        assert leader.engine.commit_index > before and leader.membership_calls == 0


@run
async def test_a_leader_that_steps_down_before_it_stops_answers_every_write():
    """A planned stop (a rolling restart): ``step_down`` hands leadership to a caught-up
    voter and waits for the fate of the writes in flight, so the stop that follows
    answers each with its result instead of "may or may not"; the new leader has them."""
    async with LocalCluster(3, state_machine=Recorder, config=STEADY) as c:
        leader = await c.leader()
        await leader.propose(b"warm")
        writes = [asyncio.ensure_future(leader.propose(b"w%d" % k)) for k in range(200)]
        await asyncio.sleep(0)  # taken: buffered, some appended, none answered
        assert not any(w.done() for w in writes)
        await leader.step_down()
        assert not leader.is_leader
        await leader.stop()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)]
        successor = await c.leader()
        assert successor.id != leader.id
        await successor.read_index()
        applied = [data for _, data in c.state_machines[successor.id].applied]
        assert applied[-200:] == [b"w%d" % k for k in range(200)]
        assert results == [index for index, _ in c.state_machines[successor.id].applied[-200:]]


@run
async def test_stepping_down_is_nothing_to_a_follower_or_a_lone_voter():
    async with LocalCluster(1, state_machine=Recorder, config=STEADY) as c:
        alone = await c.leader()
        await alone.step_down()
        assert alone.is_leader and await alone.propose(b"still") is not None
    async with LocalCluster(3, state_machine=Recorder, config=STEADY) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        await follower.step_down()
        assert leader.is_leader and not follower.is_leader
        # hand_over: step_down's work, answering why it failed rather than logging it
        assert await follower.hand_over() is None  # not a leader: nothing to hand over
        third = next(n for n in c.nodes.values() if n not in (leader, follower))
        third.engine.leaving = True  # stopping too: every successor declines
        assert "the node declined it" in await leader.hand_over(5) and leader.is_leader
        third.engine.leaving = follower.engine.leaving = False
        assert await leader.hand_over(5) is None and not leader.is_leader


@run
async def test_a_leader_stepping_down_waits_for_the_fate_of_writes_not_yet_committed():
    """Five nodes, only the follower holding the most of the log answers the leader: its
    writes are not committed when it steps down. ``step_down`` hands over to that
    follower and waits until its commits reach the old leader, which then answers each
    write with its result before it stops."""
    async with LocalCluster(5, state_machine=Recorder, config=PATIENT) as c:
        leader, target, before, writes = await writes_held_by_the_target_only(c)
        await leader.step_down()
        await leader.stop()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results == list(range(before + 1, before + 21))
        assert (await c.leader()).id == target
