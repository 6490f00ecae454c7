"""Dynamic membership, snapshots and leadership on real clusters over TCP (127.0.0.1)."""
import asyncio
import tracemalloc

import msgspec
import pytest

from fastraft import kv
from fastraft.config import Config
from fastraft.engine import Role
from fastraft.errors import (
    CatchUpTimeout,
    InvalidArgument,
    MembershipChangeInProgress,
    NodeStopped,
    NotLeader,
    ProposalDropped,
)
from fastraft.messages import AppendEntries, EntryKind, InstallSnapshot, decode_membership
from fastraft.testing import LocalCluster, wait_until
from fastraft.testing.filesm import FileStateMachine

from aio import run

FAST = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02)
STOPPING = msgspec.structs.replace(FAST, stop_when_removed=True)


async def write(leader, n, prefix="k"):
    return await asyncio.gather(*[leader.propose(kv.put(f"{prefix}{k}", b"v%d" % k))
                                  for k in range(n)])


async def converged(c, ids, index):
    await wait_until(lambda: all(c.nodes[i].applied_index >= index for i in ids), 20,
                     f"nodes {sorted(ids)} applying {index}")
    data = [c.state_machines[i].data for i in ids]
    assert all(d == data[0] for d in data)


@run
async def test_grow_3_to_5_then_shrink_to_3():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, transport="tcp",
                            spares=2) as c:
        leader = await c.leader()
        await write(leader, 100)
        await leader.add_learner(4, c.addresses[4])
        await leader.add_learner(5, c.addresses[5])
        assert leader.engine.membership.learners == {4, 5}
        await leader.change_membership({1, 2, 3, 4, 5})
        assert c.voters() == {1, 2, 3, 4, 5} and not leader.engine.membership.joint
        last = (await write(leader, 50, "g"))[-1]
        await converged(c, range(1, 6), last)
        leader = await c.leader()
        keep = {leader.id} | set(sorted(set(range(1, 6)) - {leader.id})[:2])
        await leader.change_membership(keep)
        assert c.voters() == keep
        last = (await write(leader, 20, "s"))[-1]
        await converged(c, keep, last)


@run
async def test_a_learner_removed_gets_no_more_entries_and_the_voters_stay():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        before = (await write(leader, 20))[-1]
        await converged(c, range(1, 5), before)
        with pytest.raises(InvalidArgument, match="it votes"):
            await leader.remove_learner(2)
        await leader.remove_learner(4)
        m = leader.engine.membership
        assert (m.voters, m.learners, m.joint) == ({1, 2, 3}, set(), False)
        assert 4 not in leader.engine.progress
        after = (await write(leader, 20, "after"))[-1]
        await converged(c, range(1, 4), after)
        assert c.nodes[4].applied_index < after  # nothing sent to it since
        with pytest.raises(InvalidArgument, match="node 4 is not a learner"):
            await leader.remove_learner(4)


@run
async def test_replace_a_node_and_remove_the_leader():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        await write(leader, 50)
        gone = next(i for i in (1, 2, 3) if i != leader.id)
        await leader.add_learner(4, c.addresses[4])
        await leader.change_membership({1, 2, 3, 4} - {gone})
        assert c.voters() == {1, 2, 3, 4} - {gone}
        # now remove the leader itself: it steps down once C_new commits
        old = leader.id
        await leader.change_membership(c.voters() - {old})
        await wait_until(lambda: not c.nodes[old].is_leader)
        new = await c.leader(exclude={old})
        assert new.id != old and old not in new.engine.membership.members
        last = (await write(new, 20, "after"))[-1]
        await converged(c, new.engine.membership.voters, last)
        # removed nodes never win an election in the new cluster, and keep running
        # (Config.stop_when_removed is off) until stopped
        assert all(not c.nodes[i].is_leader and c.nodes[i].running for i in (old, gone))


@run
async def test_with_stop_when_removed_a_learner_and_a_leader_stop_once_their_removal_commits():
    """``Config.stop_when_removed`` (hashicorp/raft's ``ShutdownOnRemove``): a removed
    learner stops once it has applied the entry that removed it; a leader that removes
    itself answers its caller, hands over and stops; ``wait_stopped()`` returns."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=STOPPING, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        learner = c.nodes[4]
        await converged(c, range(1, 5), (await write(leader, 20))[-1])
        await leader.remove_learner(4)
        removal = leader.engine.membership_index
        await asyncio.wait_for(learner.wait_stopped(), 10)
        assert not learner.running and learner.failure is None
        assert learner.applied_index >= removal and learner.engine.removed
        assert all(c.nodes[i].running for i in (1, 2, 3))
        old = leader.id
        kept = {1, 2, 3} - {old}
        await leader.change_membership(kept)  # answered, not "may or may not"
        await asyncio.wait_for(leader.wait_stopped(), 10)
        assert leader.failure is None and leader.applied_index >= leader.engine.membership_index
        new = await c.leader(exclude={old})
        assert new.engine.membership.voters == kept
        last = (await write(new, 20, "after"))[-1]
        await converged(c, kept, last)
        assert all(c.nodes[i].running for i in kept)


async def remove_while_down(c):
    """A follower of 3 nodes stopped and removed, writes before and after: the leader,
    the node, and the index of the configuration entry that removed it."""
    leader = await c.leader()
    await write(leader, 20)
    gone = next(i for i in (1, 2, 3) if i != leader.id)
    await c.nodes[gone].stop()
    await leader.change_membership({1, 2, 3} - {gone})
    removal = leader.engine.membership_index
    await write(leader, 20, "later")
    return leader, gone, removal


@run
async def test_a_node_removed_while_down_is_told_when_it_comes_back_and_stops():
    """The operator's case: a node is down, so it is removed; the leader's farewell
    gives up. Restarted with ``stop_when_removed``, the node pre-campaigns; the leader
    tells it it is out, and it stops (without the flag it would run on, knowing it)."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=STOPPING) as c:
        leader, gone, removal = await remove_while_down(c)
        await wait_until(lambda: leader.engine.departing == {}, 10, "the farewell given up")
        back = await c.restart(gone)
        assert not back.engine.removed  # its log ends before the change
        await asyncio.wait_for(back.wait_stopped(), 10)
        assert back.failure is None and back.engine.removed
        assert back.applied_index >= removal and leader.is_leader


@run
async def test_a_learner_removed_while_down_asks_when_it_comes_back_and_stops():
    """The same for a learner (a read replica taken out while down): hearing no leader it
    first asks with a pre-vote, before it would campaign; the leader tells it, and it
    stops."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=STOPPING, spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        await converged(c, range(1, 5), (await write(leader, 20))[-1])
        await c.nodes[4].stop()
        await leader.remove_learner(4)
        removal = leader.engine.membership_index
        await write(leader, 20, "later")
        await wait_until(lambda: leader.engine.departing == {}, 10, "the farewell given up")
        back = await c.restart(4)
        assert not back.engine.removed  # its log ends before the change
        await asyncio.wait_for(back.wait_stopped(), 10)
        assert back.failure is None and back.engine.removed
        assert back.applied_index >= removal and leader.is_leader


@pytest.mark.parametrize("stop_when_removed", [False, True])
@run
async def test_a_node_removed_while_down_long_ago_is_told_in_a_word(stop_when_removed):
    """The same once the leader's snapshot compacted the change (a node down for long):
    no farewell can carry the entries it lacks, so the leader tells it in a word
    (``messages.Removed``). It knows it is out though its log ends before the change,
    and stops (``health()`` asks to stop it without ``stop_when_removed``)."""
    cfg = msgspec.structs.replace(STOPPING if stop_when_removed else FAST,
                                  snapshot_interval=5, snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg) as c:
        leader, gone, removal = await remove_while_down(c)
        await wait_until(lambda: leader.engine.log.snapshot_index > removal, 10,
                         "the change compacted")
        assert gone not in leader.engine.known_ids
        back = await c.restart(gone)
        assert not back.engine.removed  # its log ends before the change
        if stop_when_removed:
            await asyncio.wait_for(back.wait_stopped(), 10)
            assert back.failure is None
        else:
            await wait_until(lambda: back.engine.removed, 10, "the node told it is out")
            assert back.health() == (
                f"removed from the cluster (node {leader.id} says its configuration entry "
                f"at {back.engine.told_removed} leaves this node out): stop this node")
            assert back.running and back.engine.role == Role.FOLLOWER
        assert back.engine.told_out and back.applied_index < removal and leader.is_leader


@run
async def test_a_removed_node_takes_no_snapshot_that_would_make_it_forget_it_is_out():
    """A snapshot past the entry that removed a node compacted away every configuration
    that held it: it no longer knew it was out (a random mix of the simulator's faults,
    seed 245185). It takes none on its own once removed, and knows it after a restart."""
    cfg = msgspec.structs.replace(FAST, snapshot_interval=1, snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        await converged(c, range(1, 5), (await write(leader, 5))[-1])
        taken = c.nodes[4]._writer.snapshot_index
        assert taken > 0  # it snapshots while a member
        await leader.remove_learner(4)
        removal = leader.engine.membership_index
        await wait_until(lambda: c.nodes[4].applied_index >= removal
                         and c.nodes[4]._applier._task is None, 10,
                         "the removal applied, and any snapshot after it taken")
        out = await c.restart(4)
        assert out.engine.removed and out.health().startswith("removed from the cluster")
        assert out._writer.snapshot_index < removal


@run
async def test_with_stop_when_removed_a_node_restarted_after_its_removal():
    """Restarted with ``stop_when_removed``, a removed node holds its removal in its log
    but not that it committed (the commit index on disk lags). A removed voter then
    campaigns (thesis §4.1: it may be needed), a removed learner first asks with a
    pre-vote, the leader tells each, and both stop."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        await converged(c, range(1, 5), (await write(leader, 5))[-1])
        voter = next(i for i in (1, 2, 3) if i != leader.id)
        await leader.remove_learner(4)
        learner_out = leader.engine.membership_index
        await leader.change_membership({1, 2, 3} - {voter})
        removal = leader.engine.membership_index
        await wait_until(lambda: c.nodes[4].applied_index >= learner_out
                         and c.nodes[voter].applied_index >= removal, 10,
                         "the removals applied")
        assert c.nodes[4].running and c.nodes[voter].running  # stop_when_removed is off
        c.config = STOPPING
        learner, again = await c.restart(4), await c.restart(voter)
        assert again.engine.removal_pending and again.engine.commit_index < removal
        assert learner.engine.removed and learner.engine.commit_index < learner_out
        await asyncio.wait_for(again.wait_stopped(), 10)
        assert again.failure is None and again.applied_index >= removal
        await asyncio.wait_for(learner.wait_stopped(), 10)
        assert learner.failure is None and learner.applied_index >= learner_out
        last = (await write(leader, 20, "after"))[-1]
        await converged(c, {1, 2, 3} - {voter}, last)


@run
async def test_new_node_catches_up_from_a_snapshot_after_compaction():
    cfg = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02,
                 snapshot_interval=200, snapshot_trailing_entries=10,
                 snapshot_chunk_bytes=4096)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        await write(leader, 1000)
        await wait_until(lambda: leader.engine.log.snapshot_index > 0, 10, "compaction")
        compacted = leader.engine.log.snapshot_index
        await leader.add_learner(4, c.addresses[4])
        newcomer = c.nodes[4]
        await wait_until(lambda: newcomer.applied_index >= compacted, 20, "snapshot install")
        # it got a snapshot (several chunks), not the compacted entries
        assert newcomer.engine.log.snapshot_index >= compacted
        assert newcomer._writer.snapshot_index >= compacted
        await leader.change_membership({1, 2, 3, 4})
        last = (await write(leader, 10, "n"))[-1]
        await converged(c, range(1, 5), last)
        assert c.state_machines[4].data == c.state_machines[leader.id].data


@run
async def test_partitioned_node_rejoins_without_disrupting_the_leader():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, transport="tcp") as c:
        leader = await c.leader()
        await write(leader, 20)
        term = leader.engine.term
        loner = next(n for n in c.nodes.values() if n is not leader)
        c.hub.isolate(loner.id)
        # several election timeouts pass; pre-vote keeps its term from climbing
        await asyncio.sleep(0)  # let the cut take effect before counting campaigns
        await wait_until(lambda: loner.engine.leader_id is None, 5)
        await write(leader, 20, "p")
        c.hub.heal()
        last = (await write(leader, 5, "h"))[-1]
        await converged(c, (1, 2, 3), last)
        assert leader.is_leader and leader.engine.term == term
        assert loner.engine.term == term


@run
async def test_a_membership_change_asked_of_a_leader_handing_over_goes_to_the_target():
    """A leader handing over takes no new entries (thesis §3.10), a configuration entry no
    more than a command: the call raises NotLeader naming the target and changes
    nothing; the target, leading, takes it. Election timeouts of a second or two: the
    leader gives the transfer up after one, which must not pass before the call."""
    slow = Config(election_timeout_min=1.0, election_timeout_max=2.0, heartbeat_interval=0.05)
    async with LocalCluster(3, spares=1, state_machine=kv.KVStore, config=slow) as c:
        leader = await c.leader()
        target = next(n for n in c.nodes.values() if n is not leader and n.id != 4)
        c.hub.isolate(target.id)
        await write(leader, 5)  # the target is behind: the transfer waits for it
        transfer = asyncio.ensure_future(leader.transfer_leadership(target.id, 30))
        await wait_until(lambda: leader.engine.transfer_target == target.id)
        index = leader.engine.log.last_index
        with pytest.raises(NotLeader) as refused:
            await leader.add_learner(4, c.addresses[4])
        assert refused.value.leader_id == target.id
        assert leader.engine.log.last_index == index and leader.membership_calls == 0
        c.hub.heal()
        await transfer
        await target.add_learner(4, c.addresses[4])
        assert target.engine.membership.learners == {4}


@run
async def test_leadership_transfer_under_load():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, transport="tcp") as c:
        leader = await c.leader()
        target = next(i for i in (1, 2, 3) if i != leader.id)
        acked, refused = [], []

        async def load():
            k = 0
            while len(acked) < 400:
                node = next((n for n in c.nodes.values() if n.is_leader), None)
                if node is None:
                    await asyncio.sleep(0.001)
                    continue
                try:
                    acked.append(await node.propose(kv.put(f"t{k}", b"x")))
                except NotLeader:
                    refused.append(k)
                    await asyncio.sleep(0.001)
                k += 1
        task = asyncio.ensure_future(load())
        await wait_until(lambda: len(acked) > 50)
        await leader.transfer_leadership(target)
        assert c.nodes[target].is_leader
        await asyncio.wait_for(task, 20)
        await converged(c, (1, 2, 3), max(acked))
        assert sorted(acked) == acked  # every acknowledged write kept its order


@run
async def test_membership_survives_restarts():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        await leader.change_membership({1, 2, 3, 4})
        index = leader.engine.commit_index
        # complete once a quorum of the four holds it: every node holds it before its
        # restart
        await converged(c, (1, 2, 3, 4), index)
        for i in (1, 2, 3, 4):
            node = await c.restart(i)
            assert node.engine.membership.voters == {1, 2, 3, 4}
        leader = await c.leader()
        await write(leader, 5)


@run
async def test_membership_changes_are_refused_while_one_is_in_progress_or_not_caught_up():
    # One leader throughout (its engine is asked directly at the end): election timeouts
    # beyond a stall of a busy test worker.
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 max_learner_lag=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        with pytest.raises(InvalidArgument, match="add_learner"):
            await leader.change_membership({1, 2, 3, 4})
        c.hub.isolate(4)  # the learner can never catch up
        await leader.add_learner(4, c.addresses[4])
        await write(leader, 10)
        with pytest.raises(CatchUpTimeout, match="not promoted"):
            await leader.change_membership({1, 2, 3, 4}, timeout=0.5)
        c.hub.heal()
        leader.engine.propose_membership(frozenset({1, 2, 3, 4}))
        with pytest.raises(MembershipChangeInProgress):
            leader.engine.propose_membership(frozenset({1, 2, 3}))


@run
async def test_an_address_update_is_one_entry_every_member_applies_and_refuses_strangers():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        with pytest.raises(InvalidArgument, match="node 7 is not a member"):
            await leader.update_address(7, "elsewhere:1")
        with pytest.raises(InvalidArgument):
            await leader.update_address(2, "")
        with pytest.raises(NotLeader):
            await follower.update_address(2, "elsewhere:2")
        last = leader.engine.log.last_index
        await leader.update_address(2, "elsewhere:2")
        assert leader.engine.log.last_index == last + 1  # no joint configuration
        await wait_until(lambda: all(n.engine.membership.addresses[2] == "elsewhere:2"
                                     and n.engine.membership.voters == {1, 2, 3}
                                     for n in c.nodes.values()), 10, "the new address")
        await leader.update_address(2, "elsewhere:2")  # already so: nothing to append
        assert leader.engine.log.last_index == last + 1


@run
async def test_a_learner_that_never_answered_is_not_promoted_however_short_the_log():
    async with LocalCluster(3, state_machine=kv.KVStore, config=FAST, spares=1) as c:
        leader = await c.leader()
        c.hub.isolate(4)
        await leader.add_learner(4, c.addresses[4])
        assert leader.engine.log.last_index < leader.config.max_learner_lag
        change = asyncio.ensure_future(leader.change_membership({1, 2, 3, 4}, timeout=0.5))
        # counted while it waits (a RaftHost leaves the group's leadership where it is)
        await wait_until(lambda: leader.membership_calls == 1, 5)
        with pytest.raises(CatchUpTimeout, match="not promoted"):
            await change
        assert leader.membership_calls == 0  # and not once it failed
        assert c.voters() == {1, 2, 3}
        c.hub.heal()
        await leader.change_membership({1, 2, 3, 4})
        assert c.voters() == {1, 2, 3, 4}


@run
async def test_a_change_proposed_when_the_leader_stops_may_or_may_not_take_effect():
    """Its entry is in the log, and the followers may commit it without this node: the
    caller is told to read the membership rather than that the change failed."""
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, spares=1) as c:
        leader = await c.leader()
        # Committed in its term first: until then its configuration counts as a change
        # in progress (the wait below passed at once, and the stop came while the call
        # still waited for the leader to settle: "node 2 is not running", once in CI).
        await wait_until(lambda: leader.engine.committed_in_term, 5)
        c.hub.isolate(leader.id)  # nothing commits
        change = asyncio.ensure_future(leader.add_learner(4, c.addresses[4]))
        await wait_until(lambda: leader.engine.membership_change_pending, 5)
        await leader.stop()
        with pytest.raises(NodeStopped, match="it may or may not take effect"):
            await asyncio.wait_for(change, 5)


@run
async def test_a_change_waiting_for_a_learner_fails_when_the_leader_stops():
    """It kept waiting for the learner until its timeout: a stopped leader's engine
    still says it leads."""
    cfg = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02,
                 max_learner_lag=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, spares=1) as c:
        leader = await c.leader()
        c.hub.isolate(4)  # the learner can never catch up
        await leader.add_learner(4, c.addresses[4])
        await write(leader, 10)
        change = asyncio.ensure_future(leader.change_membership({1, 2, 3, 4}, timeout=60))
        # the leader has committed in its term: the only wait for progress is the one
        # for the learner to catch up
        await wait_until(lambda: leader._progress is not None, 5)  # a waiter
        await leader.stop()
        with pytest.raises(NodeStopped):
            await asyncio.wait_for(change, 5)


@run
async def test_lease_reads_skip_the_round_trip_and_expire_when_cut_off():
    cfg = Config(election_timeout_min=0.2, election_timeout_max=0.4, heartbeat_interval=0.02,
                 lease_reads=True)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, transport="tcp") as c:
        leader = await c.leader()
        version = await leader.propose(kv.put("x", b"1"))
        assert await leader.read_index() >= version  # a ReadIndex round: takes the lease
        sent = sum(n.network.stats["frames_out"] for n in c.nodes.values())
        for _ in range(50):
            assert await leader.read_index() >= version
        # fifty reads inside the lease cost no messages (heartbeats aside)
        assert sum(n.network.stats["frames_out"] for n in c.nodes.values()) - sent < 20
        c.hub.isolate(leader.id)
        new = await c.leader(exclude={leader.id}, timeout=10)
        # safety: no new leader exists while the old one could still read from its lease
        assert asyncio.get_running_loop().time() >= leader._reads.lease_until
        await new.propose(kv.put("x", b"2"))
        with pytest.raises(NotLeader):
            await leader.read_index()


@run
async def test_a_leader_that_handed_leadership_over_serves_no_lease_reads_in_its_term():
    """A TimeoutNow's receiver campaigns at once and the voters grant it despite a live
    leader (thesis §3.10), so once one went out the lease (§6.4.1) is void for the term,
    even if the transfer is declined. (The simulator's "transfers" profile found stale
    lease reads here: a leader deaf to its successor served them.)"""
    cfg = Config(election_timeout_min=0.2, election_timeout_max=0.4, heartbeat_interval=0.02,
                 lease_reads=True)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, transport="tcp") as c:
        leader = await c.leader()
        version = await leader.propose(kv.put("x", b"1"))
        assert await leader.read_index() >= version  # takes the lease

        def frames():
            return sum(n.network.stats["frames_out"] for n in c.nodes.values())
        other = next(n for n in c.nodes.values() if n is not leader)
        await other.step_down()  # a follower stepping down for a stop declines leadership
        term = leader.engine.term
        with pytest.raises(TimeoutError, match="declined"):
            await leader.transfer_leadership(other.id, 5)
        assert leader.is_leader and leader.engine.term == term
        sent = frames()
        for _ in range(20):
            assert await leader.read_index() >= version
        # each read took a ReadIndex round (a heartbeat out and its answer, at least)
        assert frames() - sent >= 40


def test_lease_reads_need_check_quorum():
    from fastraft.errors import ConfigError
    with pytest.raises(ConfigError, match="check_quorum"):
        Config(lease_reads=True, check_quorum=False)


def test_snapshots_stream_from_and_to_files_without_being_held_in_memory(tmp_path,
                                                                         file_storage):
    """A 48 MiB snapshot from a file-backed state machine reaches a new learner over TCP,
    with FileStorage on every node, while the process's Python heap never grows by even
    half of it: the leader reads chunks from storage's file, the learner spools them to a
    temp file and the state machine restores from that stream."""
    mib = 48
    counter = iter(range(1, 100))
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 snapshot_interval=0, snapshot_trailing_entries=0)

    def state_machine():
        return FileStateMachine(str(tmp_path / f"sm{next(counter)}"))

    @run
    async def scenario():
        async with LocalCluster(3, state_machine=state_machine, config=cfg, transport="tcp",
                                spares=1, storage=file_storage) as c:
            leader = await c.leader()
            await leader.propose(b"grow %d" % mib)
            await leader.propose(b"tail")
            index = await leader.snapshot()
            assert leader.engine.log.snapshot_index == index
            tracemalloc.start()
            try:
                await leader.add_learner(4, c.addresses[4])
                await wait_until(lambda: c.nodes[4].applied_index >= index, 50, "the install")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert c.nodes[4].engine.log.snapshot_index == index
            assert c.state_machines[4].digest() == c.state_machines[leader.id].digest()
            assert c.state_machines[4].digest()[1] == (mib << 20) + 4
            assert peak < (mib << 20) // 2, f"peak Python heap {peak / 2**20:.1f} MiB"
            # the learner restarts from its own stored snapshot (streamed restore)
            node = await c.restart(4)
            assert node.applied_index >= index
            assert c.state_machines[4].digest() == c.state_machines[leader.id].digest()

    scenario()


def test_an_interrupted_snapshot_transfer_resumes_or_restarts(tmp_path):
    """A learner cut off in the middle of a multi-chunk InstallSnapshot resumes where it
    was once healed; restarted in the middle of one, it starts over from offset 0; either
    way it ends with the leader's state."""
    counter = iter(range(1, 100))
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 snapshot_interval=0, snapshot_trailing_entries=0,
                 snapshot_chunk_bytes=64 << 10)

    def state_machine():
        return FileStateMachine(str(tmp_path / f"sm{next(counter)}"))

    def received(node):
        return node._transfer.incoming[1].tell() if node._transfer.incoming is not None else 0

    @run
    async def scenario():
        async with LocalCluster(3, state_machine=state_machine, config=cfg, transport="tcp",
                                spares=1) as c:
            leader = await c.leader()
            await leader.propose(b"grow 16")
            index = await leader.snapshot()
            await leader.add_learner(4, c.addresses[4])
            await wait_until(lambda: received(c.nodes[4]) > 2 << 20, 20, "a partial transfer")
            lost = []
            send = leader.network.send

            def counting_send(target, messages):
                if target == 4 and (leader.id, 4) in c.hub._cut:
                    lost.extend(m for m in messages if isinstance(m, InstallSnapshot))
                send(target, messages)

            leader.network.send = counting_send
            c.hub.isolate(4)
            held = received(c.nodes[4])
            await wait_until(lambda: len(lost) >= 2, 10, "chunks lost to the partition")
            assert 0 < received(c.nodes[4]) == held
            c.hub.heal()
            lowest = held

            def resumed():
                nonlocal lowest
                now = received(c.nodes[4])
                lowest = min(lowest, now)
                return now > held + (1 << 20)

            await wait_until(resumed, 20, "the transfer to resume")
            assert lowest == held  # it went on from there, never back to offset 0
            node = await c.restart(4)
            assert received(node) == 0
            await wait_until(lambda: node.applied_index >= index, 30, "the install")
            assert c.state_machines[4].digest() == c.state_machines[leader.id].digest()

    scenario()


def test_grow_shrink_and_restart_on_file_storage_with_compaction(file_storage):
    """The membership chapter on durable storage: learners join through snapshots, the
    cluster grows to 5 and shrinks to 3 while compacting, then every member restarts
    from its FileStorage (configuration from the snapshot metadata and the log)."""
    cfg = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02,
                 snapshot_interval=30, snapshot_trailing_entries=0)
    @run
    async def scenario():
        async with LocalCluster(3, state_machine=kv.KVStore, config=cfg, transport="tcp",
                                spares=2, storage=file_storage) as c:
            leader = await c.leader()
            await write(leader, 100)
            await wait_until(lambda: leader.engine.log.snapshot_index > 0, 10, "compaction")
            await leader.add_learner(4, c.addresses[4])
            await leader.add_learner(5, c.addresses[5])
            await leader.change_membership({1, 2, 3, 4, 5})
            await write(leader, 50, "g")
            leader = await c.leader()
            keep = {leader.id} | set(sorted(set(range(1, 6)) - {leader.id})[:2])
            await leader.change_membership(keep)
            last = (await write(leader, 50, "s"))[-1]
            await converged(c, keep, last)
            # applied is not durable (a stop drops writes still queued): restart each on
            # a log that holds C_new
            await wait_until(lambda: all(c.nodes[i].engine.persisted_index >= last
                                         for i in keep), 20, "the log durable")
            for i in sorted(keep):
                node = await c.restart(i)
                assert node.engine.membership.voters == keep
            leader = await c.leader()
            last = (await write(leader, 10, "r"))[-1]
            await converged(c, keep, last)
            assert all(c.nodes[i].engine.log.snapshot_index > 0 for i in keep)

    scenario()


@run
async def test_a_membership_change_lost_with_the_leadership_is_not_reported_done():
    """The leader proposes a change and is cut off before it commits; the others elect a
    new leader whose entries take its place. The change did not happen: the call says so
    (ProposalDropped, as ``propose`` does), where it returned as if the change were
    done once the old leader's commit index passed that index with another entry."""
    # only the new commits end the wait
    config = msgspec.structs.replace(FAST, lost_leadership_wait=1000)
    async with LocalCluster(3, state_machine=kv.KVStore, config=config) as c:
        leader = await c.leader()
        await leader.propose(kv.put("x", b"before"))  # its term's first entry committed:
        # the change is proposed at once (else it waits for that, cut off, and is refused)
        left_out = next(i for i in c.nodes if i != leader.id)
        c.hub.isolate(leader.id)
        change = asyncio.ensure_future(leader.change_membership(set(c.nodes) - {left_out}))
        new = await c.leader(exclude={leader.id}, timeout=10)
        await new.propose(kv.put("x", b"after"))
        c.hub.heal()
        with pytest.raises(ProposalDropped, match="another entry in its place: it did not") \
                as dropped:
            await asyncio.wait_for(change, 10)
        assert dropped.value.committed is False
        await wait_until(lambda: leader.engine.commit_index >= new.engine.commit_index, 10)
        assert leader.engine.membership.voters == frozenset(c.nodes)


@run
async def test_a_change_compacted_away_before_its_caller_looks_is_reported_done():
    """The caller of a change looks at the log when its task runs, and a snapshot may
    have compacted the change's entry away by then: the leader that proposed it and still
    leads knows the committed entry is its own (it never replaces its entries)."""
    cfg = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                 snapshot_trailing_entries=0)
    async with LocalCluster(3, state_machine=kv.KVStore, config=cfg) as c:
        leader = await c.leader()
        await leader.propose(kv.put("x", b"before"))
        m = leader.engine.membership
        index = leader.engine.propose_membership(m.voters, m.learners | {9}, {9: "nine"})
        await leader.propose(kv.put("x", b"after"))
        await leader.snapshot()
        assert leader.engine.log.term_at(index) == -1  # compacted away
        await leader._membership.wait_complete(index, 5)
        assert leader.engine.membership.learners == {9}


@pytest.mark.parametrize("stop_when_removed", [False, True])
@run
async def test_a_removed_voter_that_alone_holds_c_new_is_elected_when_the_leader_is_lost(
        stop_when_removed):
    """Thesis §4.1 on running nodes: replacing voter ``gone`` by node 4, the leader sends
    C_new to ``gone`` alone and is lost. The two others, in C_old,new, need the vote of
    ``gone``, which refuses them (its log is longer): only ``gone`` can win, without its
    own vote. It commits C_new, hands over, and the cluster serves writes without the
    lost leader (before the fix no one was ever elected). ``stop_when_removed`` waits
    for that commit: ``gone`` stops only then. In memory: the test filters the hub's
    deliveries."""
    config = STOPPING if stop_when_removed else FAST
    async with LocalCluster(3, state_machine=kv.KVStore, config=config, spares=1) as c:
        leader = await c.leader()
        old = leader.id
        await write(leader, 20)
        await leader.add_learner(4, c.addresses[4])
        gone, kept = sorted(set(range(1, 4)) - {old})
        deliver = c.hub._deliver

        def is_c_new(e):
            if e.kind != EntryKind.CONFIG:
                return False
            m = decode_membership(e.data)
            return not m.joint and m.voters == {old, kept, 4}

        def c_new_to_gone_only(frm, to, messages):
            if frm == old and to != gone and any(
                    type(m) is AppendEntries and any(map(is_c_new, m.entries))
                    for m in messages):
                c.hub._cut |= {(old, kept), (old, 4)}  # from then on, gone alone hears it
                return
            deliver(frm, to, messages)
        c.hub._deliver = c_new_to_gone_only
        change = asyncio.ensure_future(leader.change_membership({old, kept, 4}))
        await wait_until(lambda: c.nodes[gone].engine.removal_pending, 10,
                         "the removed voter holding C_new")
        assert c.nodes[kept].engine.log.last_index < c.nodes[gone].engine.log.last_index
        await leader.stop()  # lost for good
        with pytest.raises((NodeStopped, ProposalDropped)):
            await change
        new = await c.leader(timeout=10, exclude={old, gone})
        assert new.engine.membership == c.nodes[gone].engine.membership
        assert new.engine.membership.voters == {old, kept, 4}
        if stop_when_removed:
            await asyncio.wait_for(c.nodes[gone].wait_stopped(), 10)
            assert c.nodes[gone].applied_index >= new.engine.membership_index
        else:
            assert c.nodes[gone].health().endswith("): stop this node")  # knows: committed
        last = (await write(new, 20, "after"))[-1]
        await converged(c, {kept, 4}, last)
