"""Seeded fault-injection runs of whole clusters; every invariant checked after every event."""
import os
import random

import msgspec
import pytest

from fastraft.config import Config
from fastraft.engine import Role
from fastraft.testing import NO_FAULTS, Faults, InvariantViolation, Simulator
from fastraft.testing.multigroup import MultiGroupSimulator

from planted_bugs import PLANTS

SEEDS = int(os.environ.get("FASTRAFT_SIM_SEEDS", "294"))  # 14 per profile

CHURN = dict(snapshot_every=40, spare_nodes=2, reconfigure_every=0.3)
CHURN_HARSH = dict(snapshot_every=25, spare_nodes=2, reconfigure_every=0.2)
SNAP_CFG = Config(snapshot_trailing_entries=5, snapshot_chunk_bytes=256)
SNAP_CFG_HARSH = Config(snapshot_trailing_entries=0, snapshot_chunk_bytes=100)
SMALL_CACHE = Config(log_cache_bytes=2000)
HARSH = Faults(drop=0.2, duplicate=0.1, partition_every=0.5, crash_every=0.4, down_for=0.3)

QUIET_LOAD = {"propose_every": 0.3, "read_every": 0.4}
QUIET_FAULTS = Faults(drop=0.02, partition_every=1.5, crash_every=1.0)
TRANSFER_FAULTS = Faults(transfer_every=0.2, leaving=0.3, deafen_on_handover=0.5)
PROFILES = {
    "default": (Faults(), Config()),
    "harsh": (Faults(drop=0.2, duplicate=0.1, partition_every=0.5, crash_every=0.4,
                     down_for=0.3), Config()),
    "no-prevote": (Faults(), Config(pre_vote=False, check_quorum=False)),
    "small-windows": (Faults(drop=0.1), Config(max_entries_per_message=2,
                                                max_inflight_messages=2)),
    # membership churn (add/promote/remove/replace, the leader included) with snapshots
    "churn-snapshots": (Faults(), SNAP_CFG, CHURN),
    "churn-snapshots-harsh": (HARSH, SNAP_CFG_HARSH, CHURN_HARSH),
    # a log cache of a dozen entries: lagging followers are caught up from storage
    # (slow reads, a fifth of them failing), followers apply what they stored earlier
    "small-cache": (Faults(drop=0.1, read_fail=0.2, max_read=0.03), SMALL_CACHE),
    "small-cache-churn": (Faults(drop=0.1, read_fail=0.2, max_read=0.03),
                          msgspec.structs.replace(SNAP_CFG, log_cache_bytes=2000), CHURN),
    # Figure 8's schedule: new leaders, and leaders re-replicating entries of an earlier
    # term, cut off (and half the time crashed) at once; one entry per message, so an
    # earlier term's entries reach followers before the new leader's own
    "flapping": (Faults(flap_leader=0.5, flap_within=0.01, partition_for=0.2, down_for=0.2),
                 Config(max_entries_per_message=1, max_inflight_messages=1)),
    # two learners in the founding configuration, under partitions and crashes; half
    # the partitions put the leader and the learners on one side, a majority of the
    # voters on the other
    "learners": (Faults(learner_side=0.5), Config(), {"learners": 2}),
    # most partitions one-way: one side hears the other but is not heard
    "one-way": (Faults(one_way=0.7, partition_every=0.6), Config()),
    # slow fsyncs, and crashes that pick nodes with writes in flight and leave part of
    # the unsynced writes on disk
    "torn-disks": (Faults(slow_fsync_chance=0.05, slow_fsync=0.3, torn_crash=0.8,
                          crash_every=0.5), Config()),
    # lease reads while clocks drift within the bound the configuration states, skewed
    # the worst way (a slow leader, fast followers) every 0.3 s
    "leases-skew": (Faults(clock_drift=0.09, skew_every=0.3), Config(lease_reads=True),
                    {"read_every": 0.005}),
    # sparse writes and reads: the group goes quiet between them, and wakes on a write,
    # a read, any message, or (the simulated hosts' liveness) its leader's node going
    # silent
    "quiet": (QUIET_FAULTS, Config(quiesce_after=0.1), QUIET_LOAD),
    # leadership handed over (thesis §3.10) under load, to nodes that may be stepping
    # down for a stop (they decline), with lease reads; a leader that hands over is often
    # cut off from hearing its successor at once (its lease must be void by then)
    "transfers": (TRANSFER_FAULTS, Config(lease_reads=True), {"read_every": 0.002}),
    # crashes that damage a node's log, which restarts repaired (cut short, recovering:
    # no votes, no campaigns until caught up), one node at a time
    "repairs": (Faults(damage=0.8, crash_every=0.3, down_for=0.2), Config()),
    # membership churn in which a leader sending a configuration entry is often lost
    # for good (one node a run): the cluster must go on without it, even when C_new
    # reached only a node it removes (thesis §4.1)
    "lost-at-change": (Faults(lose_at_change=0.6), Config(),
                       {"spare_nodes": 2, "reconfigure_every": 0.15}),
    # membership churn that removes voters and learners which are down (an operator
    # removing dead nodes): their leader's farewell is lost, and they come back a
    # second later
    "remove-down": (Faults(remove_down=1.0, remove_learners=0.3, down_for=1.0,
                           crash_every=0.5, partition_every=3.0), Config(),
                    {"spare_nodes": 2, "reconfigure_every": 0.3}),
    # the same with sparse writes, so that groups go quiet: RaftHost's liveness exchange
    # tells a leader which processes are back, and it tells every removed node among
    # them, learners too
    "remove-down-quiet": (Faults(remove_down=1.0, down_for=1.0, crash_every=0.5,
                                 partition_every=3.0), Config(quiesce_after=0.1),
                          {"spare_nodes": 2, "reconfigure_every": 0.3, **QUIET_LOAD}),
    # most partitions bridged (Jepsen's nemesis): one node still talks with both sides,
    # which do not talk to each other; lease reads
    "bridges": (Faults(bridge=0.7, partition_every=0.5), Config(lease_reads=True),
                {"read_every": 0.005}),
    # bridge partitions around the leader whose bridge restarts just before the far side
    # campaigns (its vote promise, §4.2.3, is what the leader's lease rests on); sparse
    # writes, so that the far side's log is often as long as the bridge's
    "bounces": (Faults(bridge=1.0, bounce=1.0, partition_every=0.15, partition_for=0.3,
                       crash_every=0), Config(lease_reads=True),
                {"read_every": 0.002, "propose_every": 0.05}),
}


@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_seeded_runs_keep_every_invariant(profile, nodes):
    faults, config, *extra = PROFILES[profile]
    kw = extra[0] if extra else {}
    seeds = SEEDS // len(PROFILES) if profile != "default" else SEEDS
    if profile == "remove-down-quiet":
        seeds *= 4  # its quiet leaders lose their quorum in one run in ten (3 nodes)
    totals = {"acked": 0, "crashes": 0, "elections": 0, "reads": 0, "dropped": 0,
              "snapshots": 0, "installs": 0, "reconfigurations": 0, "log_reads": 0,
              "flaps": 0, "one_way_partitions": 0, "slow_fsyncs": 0, "torn_crashes": 0,
              "skews": 0, "lease_reads": 0, "history_undecided": 0, "quiet_nodes": 0,
              "leader_lost_wakes": 0, "no_quorum_wakes": 0, "member_back_wakes": 0,
              "reminders": 0, "transfers": 0, "leaving": 0, "declines": 0, "deafened": 0,
              "repairs": 0, "bridges": 0, "bounces": 0, "lost": 0, "removed_down": 0,
              "learner_sides": 0, "learners_removed": 0}
    out_of_group = 0
    for seed in range(seeds):
        sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw)
        sim.run(3.0, settle=8.0)
        for k in totals:
            totals[k] += sim.stats[k]
        if faults.remove_down:
            out_of_group += removed_nodes_know_it(sim, every=bool(config.quiesce_after))
    # every client history got a verdict (linearizable: a violation raised above)
    assert totals["history_undecided"] == 0
    # the faults really happened and the cluster really worked through them (the quiet
    # profiles write every 0.3 s, 1.5 entries on average, to a random node, spares
    # too, and only the leader's count: about 15 / nodes a seed without faults; the
    # bounces profile every 0.05 s: about 90 / nodes)
    if config.quiesce_after:
        per_seed = 9 / (nodes + kw.get("spare_nodes", 0))
    elif faults.bounce:
        per_seed = 45 / nodes
    else:
        per_seed = 20
    assert totals["acked"] > seeds * per_seed
    assert totals["elections"] >= seeds
    if faults.crash_every:
        assert totals["crashes"] > seeds
    if faults.drop:
        assert totals["dropped"] > seeds
    assert totals["reads"] > seeds
    if "snapshot_every" in kw:
        assert totals["snapshots"] > seeds and totals["installs"] > 0
        assert totals["reconfigurations"] > seeds
    if faults.flap_leader:
        assert totals["flaps"] > seeds
    if config.log_cache_bytes < 10_000:
        assert totals["log_reads"] > seeds
    if faults.one_way:
        assert totals["one_way_partitions"] > seeds
    if faults.torn_crash:
        assert totals["torn_crashes"] > seeds and totals["slow_fsyncs"] > seeds
    if faults.skew_every:
        assert totals["skews"] > seeds and totals["lease_reads"] > seeds * 20
    if config.quiesce_after:
        # groups went quiet, and quiet followers whose leader went silent were woken; so
        # were quiet leaders left without a quorum, or behind a peer heard again; quiet
        # leaders reminded peers heard again (or restarted) that they lead
        assert totals["quiet_nodes"] > seeds * 20 and totals["leader_lost_wakes"] > seeds // 4
        assert totals["no_quorum_wakes"] > 0 and totals["member_back_wakes"] > 0
        assert totals["reminders"] > 0
    if faults.transfer_every:
        assert totals["transfers"] > seeds * 5 and totals["leaving"] > seeds
        assert totals["declines"] > 0 and totals["deafened"] > seeds
    if faults.damage:
        assert totals["repairs"] > seeds * 2
    if faults.bridge:
        assert totals["bridges"] > seeds
    if faults.bounce:
        assert totals["bounces"] > seeds
    if faults.learner_side:
        assert totals["learner_sides"] > seeds // 2
    if faults.lose_at_change:
        assert totals["lost"] > seeds // 2 and totals["reconfigurations"] > seeds
    if faults.remove_down:
        assert totals["removed_down"] >= seeds // 2 and out_of_group >= seeds // 3
    if faults.remove_learners:
        assert totals["learners_removed"] >= seeds // 2


def removed_nodes_know_it(sim, every=False):
    """Once a leader would have said it again after ``run``: every live node that a
    configuration in the leader's log took out of the group (or its ``removed`` names:
    taken out before the log begins), and that would ask the leader for its vote (a
    member, voter or learner, in its own configuration, which counts the leader a voter:
    a learner asks with a pre-vote), knows it is out: its leader told it, or a later
    leader did when elected or asked for a vote. Returns the number of such nodes. (One
    that knows the leader only as a learner, or not at all, does not ask it: without the
    liveness exchange it may never learn.) With ``every`` (the liveness exchange runs:
    its leader tells the removed nodes among the processes it hears back), every live
    node the leader's log removed knows it. Not a node that holds nothing of the group
    (``Engine.fresh``: a learner added and removed before anything reached it), which
    was never in it as far as it knows.
    A word lost at the end of the run is said again once the removed node asks for votes
    (every election timeout) and the leader's wait before it retells
    (``Engine._retell_rounds`` heartbeat ticks) is over: the check waits that long."""
    cfg = sim.config
    retell = next(iter(sim.nodes.values())).engine._retell_rounds * cfg.heartbeat_interval
    sim.run_until(sim.now + retell + cfg.election_timeout_max + 2 * cfg.heartbeat_interval)
    leader = next((n for n in sim.nodes.values()
                   if n.alive and n.engine.role == Role.LEADER), None)
    assert leader is not None, f"seed {sim.seed}: no leader after the run"
    e = leader.engine
    out = [n for n in sim.nodes.values() if n.alive
           and (n.id in e.known_ids or n.id in e.membership.removed)
           and n.id not in e.membership.members and not n.engine.fresh
           and (every or n.engine.removed or n.id in n.engine.membership.members
                and n.engine.membership.is_voter(leader.id))]
    untold = [n.id for n in out if not n.engine.removed]
    assert not untold, f"seed {sim.seed}: nodes {untold} were never told they are out"
    return len(out)


def random_mix(seed, learner_removals=True):
    """Nodes, faults, configuration and load drawn at random from ``seed``: the CI
    profiles' faults in combinations none of them has (mixes found two bugs of removed
    nodes that the profiles had missed, 2026-12-04). ``learner_removals=False``: the mix
    as drawn before the fifty-sixth session (2026-12-06), whose churn removed voters only
    (the regression tests of seeds found before then replay those)."""
    r = random.Random(seed)
    f, c, kw = {}, {}, {}
    for p, name, *values in [
            (0.3, "drop", 0.0, 0.1, 0.2), (0.3, "duplicate", 0.0, 0.1),
            (0.3, "partition_every", 0.3, 0.6, 2.0), (0.2, "partition_for", 0.2, 1.0),
            (0.3, "crash_every", 0.0, 0.4, 0.8), (0.2, "down_for", 0.2, 1.0),
            (0.2, "read_fail", 0.2), (0.15, "flap_leader", 0.3), (0.2, "one_way", 0.5),
            (0.2, "slow_fsync_chance", 0.05), (0.2, "torn_crash", 0.8),
            (0.2, "graceful_stop", 0.5), (0.2, "transfer_every", 0.2, 0.5),
            (0.15, "leaving", 0.3), (0.15, "deafen_on_handover", 0.5), (0.2, "bridge", 0.5),
            (0.1, "bounce", 0.5), (0.15, "learner_side", 0.5)]:
        if r.random() < p:
            f[name] = r.choice(values)
    if r.random() < 0.2:
        c.update(pre_vote=False, check_quorum=r.random() < 0.5)
    if r.random() < 0.3:
        c.update(lease_reads=True, pre_vote=True, check_quorum=True)
        if r.random() < 0.5:
            f["clock_drift"] = 0.09
            if r.random() < 0.5:
                f["skew_every"] = 0.3
        kw["read_every"] = 0.005
    if r.random() < 0.2:
        c["quiesce_after"] = 0.1
        kw.update(QUIET_LOAD)
    if r.random() < 0.2:
        c["log_cache_bytes"] = 2000
    if r.random() < 0.2:
        c.update(max_entries_per_message=r.choice([1, 2]),
                 max_inflight_messages=r.choice([1, 2]))
        kw.setdefault("propose_every", 0.02)  # what one or two entries a message carry
    if r.random() < 0.3:
        c.update(snapshot_trailing_entries=r.choice([0, 5]),
                 snapshot_chunk_bytes=r.choice([100, 256]))
        kw["snapshot_every"] = r.choice([25, 40])
    # removed servers disrupt a cluster with neither pre-vote nor check-quorum (§4.2.3)
    if r.random() < 0.35 and (c.get("pre_vote", True) or c.get("check_quorum", True)):
        kw.update(spare_nodes=2, reconfigure_every=r.choice([0.15, 0.3]))
        if r.random() < 0.3:
            f["remove_down"] = 1.0
        elif r.random() < 0.2:
            f["lose_at_change"] = 0.6
    elif r.random() < 0.2:
        kw["learners"] = r.choice([1, 2])
    elif r.random() < 0.15 and "quiesce_after" not in c:
        f["damage"] = 0.8
    nodes = r.choice([3, 3, 5])
    # Damaged disks with churn, learners and quiet groups too (drawn last: the mixes of
    # earlier seeds stay as they were, some with damage added). One repair at a time and
    # none during a change (``_may_damage``, as docs/storage.md asks); not with a node
    # lost for good: it and a recovering voter could leave no one able to win.
    if "damage" not in f and "lose_at_change" not in f \
            and r.random() < 0.15:
        f["damage"] = 0.8
    # Churn that removes learners too (2026-12-06, fifty-sixth session; drawn last as
    # well), some of them down with ``remove_down``: a removed learner must learn it is
    # out as a voter does.
    if learner_removals and "reconfigure_every" in kw and r.random() < 0.4:
        f["remove_learners"] = r.choice([0.3, 0.6])
    return nodes, Faults(**f), Config(**c), kw


def test_random_mixes_keep_every_invariant():
    removed = 0
    for seed in range(SEEDS // 2):
        nodes, faults, config, kw = random_mix(seed)
        sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw)
        # one or two entries a message: 8 s may not replicate what 3 s of writes queued
        sim.run(3.0, settle=20.0 if config.max_entries_per_message <= 2 else 8.0)
        assert sim.stats["history_undecided"] == 0
        # Removed nodes are told, but for those docs/cluster.md lists: one a farewell of
        # one or two entries a message cannot reach within an election timeout.
        if (faults.remove_down or faults.remove_learners) \
                and config.max_entries_per_message > 2:
            removed += removed_nodes_know_it(sim, every=bool(config.quiesce_after))
    assert removed > 0


@pytest.mark.parametrize("profile", ["churn-snapshots", "churn-snapshots-harsh", "harsh",
                                     "small-cache-churn", "torn-disks"])
def test_seeded_runs_on_file_storage_disks(profile, tmp_path):
    """The same fault model with every disk a FileStorage directory: crashes close it,
    restarts run its recovery, and every write the engine asks for must be accepted."""
    faults, config, *extra = PROFILES[profile]
    kw = extra[0] if extra else {}
    seeds = max(SEEDS // 10, 5)
    crashes = installs = 0
    for nodes in (3, 5):
        for seed in range(seeds):
            sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config,
                            disk_directory=str(tmp_path / f"{nodes}-{seed}"), **kw)
            try:
                sim.run(3.0, settle=8.0)
            finally:
                sim.close()
            crashes += sim.stats["crashes"]
            installs += sim.stats["installs"]
    if faults.crash_every:
        assert crashes > seeds
    if kw:
        assert installs > 0


# Bugs the simulator found, kept as regression tests with their seeds.

def test_regression_seed_17_file_storage_snapshot_past_the_end_of_the_log(tmp_path):
    """FileStorage refused the truncation that installing a snapshot past the end of a
    follower's log asks for ("cannot truncate from 1: compacted"); the gap left by such
    a snapshot also broke the next start-up. (First seen in a process test.)"""
    sim = Simulator(seed=17, nodes=5, config=SNAP_CFG, disk_directory=str(tmp_path), **CHURN)
    try:
        sim.run(3.0, settle=8.0)
    finally:
        sim.close()


def test_regression_seed_0_no_lease_reads_after_timeout_now():
    """A leader that sent TimeoutNow, then heard nobody, served lease reads while its
    successor (elected at once: a transfer's votes skip the followers' promise) committed
    new writes: stale reads (thesis §3.10 against §6.4.1)."""
    faults, config, load = PROFILES["transfers"]
    Simulator(seed=0, nodes=5, faults=faults, config=config, **load).run(3.0, settle=8.0)


@pytest.mark.parametrize("seed, nodes", [(20000469, 3), (20006436, 5)])
def test_regression_a_removed_node_back_as_its_farewell_runs_out(seed, nodes):
    """A leader told that a removed node's process was back left the farewell it had
    sent while the node was down alone; the next heartbeat gave it up before a round
    trip told the node, which never learned it was out (seeds 20000245 and 20000312
    found it; since learners ask too, 2026-12-06, those runs no longer meet the case,
    and these two, which fail with the fix undone, replace them)."""
    faults, config, kw = PROFILES["remove-down-quiet"]
    sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw)
    sim.run(3.0, settle=8.0)
    assert removed_nodes_know_it(sim, every=True) > 0


def test_regression_seed_114636_a_removed_node_campaigning_without_pre_vote():
    """Pre-vote off, check-quorum on, voters removed while down: one came back and
    campaigned in ever later terms, and its answers to each leader's farewell deposed
    that leader (a random mix of the simulator's faults, 2026-12-04). The leader that
    the run ends with leads on."""
    sim = Simulator(seed=114636, nodes=3,
                    faults=Faults(duplicate=0.1, down_for=1.0, learner_side=0.5,
                                  remove_down=1.0),
                    config=Config(pre_vote=False, max_entries_per_message=2,
                                  max_inflight_messages=1),
                    spare_nodes=2, reconfigure_every=0.3)
    sim.run(3.0, settle=8.0)
    [leader] = [n for n in sim.nodes.values() if n.engine.role == Role.LEADER]
    term = leader.engine.term
    sim.run_until(sim.now + 2.0)
    assert leader.engine.role == Role.LEADER and leader.engine.term == term


@pytest.mark.parametrize("seed, nodes, faults, config, kw", [
    # a removed node in a later term than the leader's (it holds C_new uncommitted and
    # campaigned, §4.1): ignoring its answers left it untold; the leader takes its term
    (248205, 3, Faults(torn_crash=0.8, graceful_stop=0.5, remove_down=1.0),
     Config(quiesce_after=0.1), {**QUIET_LOAD, "reconfigure_every": 0.15}),
    # a removed node's own snapshot past its removal compacted away every configuration
    # that held it, and it no longer knew it was out
    (245185, 5, Faults(partition_for=1.0, torn_crash=0.8, remove_down=1.0),
     Config(lease_reads=True, quiesce_after=0.1, snapshot_trailing_entries=5,
            snapshot_chunk_bytes=256),
     {**QUIET_LOAD, "snapshot_every": 25, "reconfigure_every": 0.15}),
])
def test_regression_removed_nodes_of_random_mixes_know_it(seed, nodes, faults, config, kw):
    """Random mixes of the simulator's faults, configurations and loads (2026-12-04)."""
    sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, spare_nodes=2, **kw)
    sim.run(3.0, settle=8.0)
    assert removed_nodes_know_it(sim, every=True) > 0


@pytest.mark.parametrize("seed, nodes, faults, config, kw", [
    # a word naming the change that removed the node, which the node's log had passed
    # with an old leader's uncommitted configuration holding it: disregarded
    (1223711, 5, Faults(drop=0.1, duplicate=0.0, partition_every=2.0, down_for=1.0,
                        read_fail=0.2, flap_leader=0.3, remove_down=1.0, graceful_stop=0.5),
     Config(log_cache_bytes=2000, lease_reads=True),
     {"read_every": 0.005, "reconfigure_every": 0.3}),
    # the same past the leader's configuration in force (the word now carries the
    # leader's commit index, which such an entry cannot be past); found with 2335048,
    # whose run removes no node since heartbeats' answers stopped waiting for writes
    # (2026-12-05): the next seed of the mix that does
    (2335050, 3, Faults(drop=0.0, crash_every=0.4, remove_down=1.0, one_way=0.5,
                        learner_side=0.5),
     Config(log_cache_bytes=2000), {"reconfigure_every": 0.3}),
    # a word said once and lost: the node asked again only after the leader's wait
    (1277757, 5, Faults(drop=0.0, duplicate=0.1, flap_leader=0.3, remove_down=1.0,
                        learner_side=0.5),
     Config(log_cache_bytes=2000, quiesce_after=0.1),
     {**QUIET_LOAD, "reconfigure_every": 0.15}),
    # a removed learner whose word was lost: a new leader, whose log the change was
    # compacted out of, did not tell the nodes its configuration names as removed
    (10028159, 5, Faults(read_fail=0.2, remove_down=1.0, torn_crash=0.8,
                         deafen_on_handover=0.5),
     Config(snapshot_trailing_entries=5, snapshot_chunk_bytes=100, log_cache_bytes=2000,
            quiesce_after=0.1),
     {**QUIET_LOAD, "snapshot_every": 25, "reconfigure_every": 0.15}),
    # a removed node whose term passed the leader's (it campaigned on a TimeoutNow whose
    # votes were lost, then was removed while down): it refused the leader's words of an
    # earlier term, and the leader never learned its term (2026-12-05, a sweep of mixes;
    # since learners ask, 2026-12-06, this run no longer meets the case: 47322046 below
    # and test_a_word_of_a_leader_of_an_earlier_term_is_taken_and_the_term_kept do)
    (43053691, 3, Faults(drop=0.0, remove_down=1.0, clock_drift=0.09, skew_every=0.3,
                         transfer_every=0.5, deafen_on_handover=0.5, bridge=0.5),
     Config(snapshot_trailing_entries=0, snapshot_chunk_bytes=256, lease_reads=True),
     {"read_every": 0.005, "snapshot_every": 25, "reconfigure_every": 0.15}),
    # without pre-vote, a node removed while down campaigned in ever later terms when
    # back: it refused its farewell's entries, of an earlier term, and the leader
    # ignored its refusals' term (2026-12-05, a sweep of mixes without pre-vote)
    (47322046, 3, Faults(remove_down=1.0), Config(pre_vote=False),
     {"reconfigure_every": 0.15}),
])
def test_regression_removed_nodes_told_in_a_word(seed, nodes, faults, config, kw):
    """Random mixes with a small log cache (2026-12-04, forty-second session): the
    entries a farewell would carry left the leader's memory, so it says ``Removed``;
    and removed nodes whose term passed the leader's, which refuse those entries."""
    sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, spare_nodes=2,
                    **kw)
    sim.run(3.0, settle=8.0)
    assert removed_nodes_know_it(sim, every=bool(config.quiesce_after)) > 0


@pytest.mark.parametrize("seed", [64842, 111461])  # without pre-vote, with it
def test_regression_a_node_removed_while_down_and_repaired_is_told(seed):
    """Random mixes with repairs and removals (2026-12-06, fifty-fourth session: mixes
    carry damage with membership churn since): a voter removed while it was down came
    back repaired, recovering, which never campaigns; the leader's farewell had run out,
    it never heard from the node again, and the node never learned it is out. A
    recovering node now asks with a pre-vote (and never campaigns)."""
    nodes, faults, config, kw = random_mix(seed, learner_removals=False)
    assert faults.damage and faults.remove_down
    sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw)
    sim.run(3.0, settle=8.0)
    assert sim.stats["repairs"] > 0
    assert removed_nodes_know_it(sim, every=bool(config.quiesce_after)) > 0


@pytest.mark.parametrize("seed", [99491198, 100526838])
def test_regression_a_learner_holding_the_newest_entries_campaigns_when_it_must(seed):
    """Random mixes losing leaders at membership changes, with learner removals
    (2026-12-06, fifty-sixth session: seed 91016303, whose run began with a membership
    change taken by a leader handing over, which leaders refuse since the fifty-eighth
    session, and no longer meets the case; these two were found then). A leader lost
    for good had replicated its last term's entries to one learner only; the voter
    whose log the others would accept holds its own uncommitted joint configuration
    making that learner a voter, so it needs the learner's vote, which the learner
    refuses (its log is newer); the other voters are behind it, and it refuses them;
    learners never campaigned: no leader, for ever. 99491198: leader 1 of {1, 2, 3},
    term 7, entries 24 to 32 on learner 5 only; node 2's joint configuration at 24,
    {1, 2, 5} and {1, 2, 3}. 100526838: leader 3, term 3, entries 16 and 17 on learner 4
    only, 17 the change removing learner 4 itself; node 2's joint configuration at 17,
    {1, 2, 3, 4} and {1, 2, 3}. A learner (one a change it holds takes out too) now
    campaigns from its third election timeout in a row without a leader (thesis §4.1: a
    server outside its configuration may be needed), leads and hands over to a voter
    once that one holds its log (learners never campaigning, both runs fail: "cluster
    did not converge", the lost leader leading among the dead)."""
    nodes, faults, config, kw = random_mix(seed)
    assert faults.lose_at_change and faults.remove_learners
    sim = Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw)
    sim.run(3.0, settle=20.0 if config.max_entries_per_message <= 2 else 8.0)
    assert sim.stats["lost"] == 1 and sim.stats["learner_leaders"] == 1
    leaders = [n for n in sim.nodes.values() if n.alive and n.engine.role == Role.LEADER]
    assert len(leaders) == 1 and leaders[0].engine.membership.is_voter(leaders[0].id)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("seed", [83000006, 83000013])
def test_regression_an_election_timeout_waits_for_the_vote_to_be_durable(seed, disk,
                                                                        tmp_path):
    """Random mixes with slow fsyncs (200 ms, over the 150 ms election timeout; 2026-12-04,
    forty-second and forty-third sessions): candidates and voters timed out while their
    votes were still waiting for the disk, just as the grants came, election after
    election, and a group had no leader a second after the run (seeds 4122004 and
    12045980). The timeout now counts from the vote's durability
    (``Engine.hard_state_persisted``). Since heartbeats' answers stopped waiting for
    writes (2026-12-05) no mix found meets the case again (none of 8,300 with slow fsyncs
    and removed nodes, 2026-12-06): disks slow at 80% of their fsyncs do, the fix
    undone (these seeds: terms past 30, nothing committed after the faults heal)."""
    faults = Faults(slow_fsync_chance=0.8, slow_fsync=0.2)
    sim = Simulator(seed=seed, nodes=3, faults=faults,
                    disk_directory=str(tmp_path) if disk else None)
    try:
        sim.run(3.0, settle=8.0)
    finally:
        sim.close()
    assert sim.stats["slow_fsyncs"] > 100 and sim.stats["acked"] > 0


def with_damage(profile):
    """A CI profile as the sweep of 2026-12-03 ran it: damaged disks and leadership
    transfers on top, and lease reads where check_quorum allows them."""
    faults, config, *extra = PROFILES[profile]
    faults = msgspec.structs.replace(faults, damage=0.5, transfer_every=0.5, leaving=0.2,
                                     deafen_on_handover=0.2)
    if config.check_quorum:
        config = msgspec.structs.replace(config, lease_reads=True)
    return faults, config, (extra[0] if extra else {})


@pytest.mark.parametrize("profile, seed, nodes", [
    # a repaired node left recovery at its first leader's commit index and voted for a
    # leader that lacked an entry it had acknowledged before the damage (safety)
    ("flapping", 350031, 3),
    # each heartbeat rejected by a recovering follower made the leader forget its
    # progress again, restarting the snapshot being streamed to it, for ever
    ("churn-snapshots-harsh", 350006, 3),
    # a repaired node that hears the leader of its repair term again waited for a later
    # term that never came: it now starts in one
    ("torn-disks", 350179, 3),
])
def test_regression_damaged_disks(profile, seed, nodes):
    faults, config, kw = with_damage(profile)
    Simulator(seed=seed, nodes=nodes, faults=faults, config=config, **kw).run(3.0, settle=8.0)


def test_regression_seed_7_probe_stuck_at_the_compaction_point():
    """A follower whose log diverged below the leader's compaction point was probed at the
    boundary forever instead of being sent a snapshot."""
    Simulator(seed=7, nodes=3, config=SNAP_CFG, **CHURN).run(3.0, settle=8.0)


def test_regression_seed_116_snapshot_transfer_livelock():
    """Each new snapshot restarted the transfer in flight from offset 0; a leader that
    snapshots faster than it can stream never caught the follower up."""
    Simulator(seed=116, nodes=3, faults=HARSH, config=SNAP_CFG_HARSH,
              **CHURN_HARSH).run(3.0, settle=8.0)


def test_regression_seed_311_conflict_at_the_compaction_point():
    """A follower holding a different entry exactly at the leader's compaction point was
    probed there forever."""
    Simulator(seed=311, nodes=5, faults=HARSH, config=SNAP_CFG_HARSH,
              **CHURN_HARSH).run(3.0, settle=8.0)


def test_regression_seed_1891_a_torn_write_keeps_no_term_without_its_entries():
    """The simulator made a batch durable in the engine's order, the term before the
    entries, where the node's writer puts the hard state last (``write_order``): torn
    crashes left every founding node with term 1 and no founding entry, no
    configuration, so none could campaign or be initialized again. (Multi-group sweep,
    torn disks; this is the single-group seed.)"""
    faults, config = PROFILES["torn-disks"]
    Simulator(seed=1891, nodes=3, faults=faults, config=config).run(3.0, settle=8.0)


def test_regression_seed_381_founders_initialize_at_every_start():
    """Founding nodes were initialized at their first start only, where a program calls
    ``initialize()`` at every start (docs/cluster.md): crashes before the founding entry
    was durable anywhere left a cluster that never formed."""
    faults, config = PROFILES["torn-disks"]
    Simulator(seed=381, nodes=3, faults=faults, config=config).run(3.0, settle=8.0)


def test_regression_seed_352_an_fsync_due_with_the_one_before_it_is_not_lost():
    """Batches queued behind a slow fsync are all due when it ends; their events' times,
    computed as now + (end - now), came out rounded apart, and an event that fired ahead
    of the batch before it was taken for one lost in a crash: that node never made
    anything durable again, so it never acknowledged again."""
    faults, config = PROFILES["torn-disks"]
    Simulator(seed=352, nodes=5, faults=faults, config=config).run(3.0, settle=8.0)


#: Torn crashes (half the unsynced writes reach the disk) with snapshots: installed ones
#: (churn) and the leader's every 25 entries, none kept behind.
TORN_SNAPSHOTS = Faults(slow_fsync_chance=0.05, slow_fsync=0.3, torn_crash=0.8, crash_every=0.5)


@pytest.mark.parametrize("disk", ["memory", "file"])
@pytest.mark.parametrize("seed, nodes, config, load", [
    (930544, 3, SNAP_CFG, CHURN),
    # found as 930565; 930564 since restarted nodes keep their vote promise (2026-12-03):
    # the schedule moved, and 930565 no longer installs a snapshot
    (930564, 5, SNAP_CFG_HARSH, {"snapshot_every": 25}),
], ids=["930544-churn", "930564-snapshots"])
def test_regression_a_crash_after_installing_a_snapshot_leaves_no_stale_log_after_it(
        seed, nodes, config, load, disk, tmp_path):
    """A follower saved a snapshot from its leader over a log that disagreed with it and
    crashed before the truncation after the save: the old entries past the snapshot
    stayed the log after it, and at the restart the node could not load them ("term 2
    is older than the last term 4"). §7: such a snapshot replaces the whole log; the
    engine now cuts the entries past it before the save. (A sweep of torn disks with
    churn, and with snapshots.)"""
    sim = Simulator(seed=seed, nodes=nodes, faults=TORN_SNAPSHOTS, config=config,
                    disk_directory=str(tmp_path) if disk == "file" else None, **load)
    try:
        sim.run(3.0, settle=8.0)
    finally:
        sim.close()
    assert sim.stats["installs"] > 0 and sim.stats["torn_crashes"] > 0


def test_regression_seed_950693_a_log_that_goes_on_after_an_uncompacted_snapshot_reopens(
        tmp_path):
    """A follower with an empty log (compacted to its end) saved a snapshot past it and
    crashed before the compaction after it; restarted, it appended after the snapshot,
    and FileStorage began the log there without moving its compaction point: the next
    start-up refused the directory ("the log starts at index 108 but entries after 81
    were never compacted"). The append now compacts up to the snapshot first. (A sweep
    of torn disks with snapshots on FileStorage disks.)"""
    sim = Simulator(seed=950693, nodes=3, faults=TORN_SNAPSHOTS, config=SNAP_CFG_HARSH,
                    disk_directory=str(tmp_path), snapshot_every=25)
    try:
        sim.run(3.0, settle=8.0)
    finally:
        sim.close()


def test_a_seed_replays_exactly():
    a = Simulator(seed=1234, nodes=5).run(2.0)
    b = Simulator(seed=1234, nodes=5).run(2.0)
    assert a.stats == b.stats and a.acked == b.acked
    c = Simulator(seed=1235, nodes=5).run(2.0)
    assert c.stats != a.stats


def test_fault_free_cluster_acknowledges_steadily():
    sim = Simulator(seed=7, nodes=3, faults=NO_FAULTS).run(2.0)
    assert sim.stats["elections"] == 1
    assert sim.stats["acked"] > 100


class Counter:
    """A deterministic state machine: returns the running count per key."""

    def __init__(self):
        self.counts = {}

    def apply(self, entries):
        out = []
        for e in entries:
            key = bytes(e.data).split(b":")[0]
            self.counts[key] = self.counts.get(key, 0) + 1
            out.append(self.counts[key])
        return out


class Nondeterministic(Counter):
    instances = 0

    def __init__(self):
        super().__init__()
        Nondeterministic.instances += 1
        self.me = Nondeterministic.instances

    def apply(self, entries):
        return [self.me for _ in entries]


def test_user_state_machine_replicas_agree():
    Simulator(seed=3, nodes=3, state_machine=Counter).run(2.0)


def test_nondeterministic_state_machine_is_caught():
    with pytest.raises(InvariantViolation, match="state machine on node"):
        Simulator(seed=3, nodes=3, state_machine=Nondeterministic).run(2.0)


#: Seeds of the flapping profile the planted-bug test may run (more than the seeded
#: runs: the Figure 8 schedule is rare; the first run that meets it, under today's
#: random streams, is seed 41 with 3 nodes).
FIGURE_8_SEEDS = 80
#: Seeds of the bounces profile the planted-bug test may run: a restarted node's broken
#: promise shows in about one run in twenty (seed 2 with 3 nodes is the first today).
BOUNCE_SEEDS = 40

#: Seeds of the lost-at-change profile the planted-bug test may run: a removed voter
#: that never campaigns leaves no one able to win in about one run in ten (seed 7 with
#: 3 nodes is the first today).
LOST_SEEDS = 40

#: The CI profiles in the order the planted-bug test runs them: the nemeses first, the
#: flapping profile after three that catch most bugs within a few runs and the four
#: that alone find their own (its up to FIGURE_8_SEEDS seeds cost a bug it does not
#: catch 20 s; the bounces profile's BOUNCE_SEEDS about 8 s, lost-at-change's LOST_SEEDS
#: about 2 s).
PLANT_ORDER = ["learners", "no-prevote", "harsh", "transfers", "repairs", "bounces",
               "lost-at-change", "flapping", "small-windows", "churn-snapshots-harsh",
               "churn-snapshots", "small-cache", "small-cache-churn", "one-way", "torn-disks",
               "leases-skew", "bridges", "quiet", "remove-down", "remove-down-quiet",
               "default"]


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.__name__)
def test_the_simulator_alone_catches_each_planted_bug(plant, monkeypatch):
    """Each classic Raft bug, planted alone, makes the CI seeds fail: the runs of
    ``test_seeded_runs_keep_every_invariant``, profile by profile, until one reports."""
    assert sorted(PLANT_ORDER) == sorted(PROFILES)
    plant(monkeypatch)
    found = None
    for name in PLANT_ORDER:
        faults, config, *extra = PROFILES[name]
        kw = extra[0] if extra else {}
        seeds = SEEDS // len(PROFILES) if name != "default" else SEEDS
        if name == "flapping":
            # Figure 8 needs a rare schedule: about one run in a hundred meets it
            seeds = max(seeds, FIGURE_8_SEEDS)
        elif name == "bounces":
            seeds = max(seeds, BOUNCE_SEEDS)
        elif name == "lost-at-change":
            seeds = max(seeds, LOST_SEEDS)
        for seed in range(seeds):
            for nodes in (3, 5):
                try:
                    Simulator(seed=seed, nodes=nodes, faults=faults, config=config,
                              **kw).run(3.0, settle=8.0)
                except InvariantViolation as exc:
                    found = str(exc)
                    break
            if found:
                break
        if found:
            break
    assert found is not None and "seed=" in found, f"{plant.__name__} went unnoticed"


def test_the_client_history_check_alone_catches_stale_reads(monkeypatch):
    """Reads answered without a quorum round, with the simulator's own read check turned
    off: the KV history through the linearizability checker still reports them."""
    from planted_bugs import read_index_without_a_quorum_round
    read_index_without_a_quorum_round(monkeypatch)
    answer = Simulator._read_done

    def without_the_read_bound(self, node, c):
        read = self._reads.get(c.request_id)
        if read is not None:
            self._reads[c.request_id] = (0, *read[1:])
        return answer(self, node, c)
    monkeypatch.setattr(Simulator, "_read_done", without_the_read_bound)
    faults, config = PROFILES["harsh"][:2]
    # A read goes stale only when a deposed leader answers it after the new one committed
    # a write of its key: a few runs in a hundred (seed 0 until the engine's trajectories
    # moved). Each run is ~15 ms: look for the first that shows one.
    for seed in range(128):
        try:
            # 8 keys: a stale read and the write it missed share a key more often
            Simulator(seed=seed, nodes=5, faults=faults, config=config, kv_keys=8).run(
                3.0, settle=8.0)
        except InvariantViolation as exc:
            assert "client history: NOT linearizable" in str(exc), exc
            return
    pytest.fail("no run of 128 showed the stale reads of reads without a quorum round")


def test_lease_reads_turn_stale_when_clocks_drift_beyond_the_stated_bound():
    """The clock nemesis bites: with a slow leader and fast followers drifting five times
    past ``Config.max_clock_drift``, a deposed leader still inside its lease serves a
    stale read, and the simulator reports it. (Within the bound, the "leases-skew"
    profile's seeded runs stay clean.)"""
    config = Config(lease_reads=True, max_clock_drift=0.1)
    with pytest.raises(InvariantViolation, match="acknowledged before it started"):
        # seed 7 of 0-59 (and 26, 27); it was 8 until restarted nodes kept their vote
        # promise (2026-12-03), then 13 until heartbeats' answers stopped waiting for
        # writes in flight (2026-12-05): each moved the schedule
        Simulator(seed=7, nodes=5, faults=Faults(clock_drift=0.5, skew_every=0.3),
                  config=config, read_every=0.005).run(3.0)


def test_leaders_that_stop_cleanly_hand_off_and_keep_every_invariant():
    """Half the crashes of a leader are clean stops (``Engine.resign``: TimeoutNow to the
    fullest voter, a heartbeat to the others, then down): every invariant holds."""
    seeds = max(SEEDS // 26, 3)
    stops = 0
    # Enough runs must have had a leader stop cleanly for them to mean something: about
    # 0.7 a run, so ``seeds`` seeds give 1.4 * seeds give or take, and the check of more
    # than ``seeds`` failed once the engine's trajectories moved (4 in 5 seeds; 7
    # before). Past ``seeds``, run on until 10 stops were seen.
    for seed in range(10 * seeds):
        if seed >= seeds and stops >= 10:
            break
        for nodes in (3, 5):
            sim = Simulator(seed=seed, nodes=nodes,
                            faults=Faults(crash_every=0.4, graceful_stop=0.5), config=Config())
            sim.run(3.0, settle=8.0)
            assert sim.stats["history_undecided"] == 0 and sim.stats["acked"] > 20
            stops += sim.stats["graceful_stops"]
    assert stops >= 10


@pytest.mark.parametrize("kind", ["busy", "quiet", "quiet-torn-disks"])
def test_groups_sharing_nodes_and_frames_keep_every_invariant_per_group(kind):
    """Four groups on the same three nodes: a crash takes down every group's replica on a
    node, a partition cuts every group, and messages of several groups between two nodes
    at one instant share a frame's fate; each group keeps its invariants and converges.
    With torn disks, crashes also pick nodes with writes in flight, of every group."""
    quiet = kind != "busy"
    config = Config(quiesce_after=0.1) if quiet else Config()
    faults = PROFILES["torn-disks"][0] if kind == "quiet-torn-disks" else Faults()
    seeds = max(SEEDS // 26, 3)
    crashes = partitions = torn = 0
    for seed in range(seeds):
        sim = MultiGroupSimulator(seed, groups=4, nodes=3, faults=faults, config=config,
                                  **(QUIET_LOAD if quiet else {}))
        sim.run(3.0, settle=8.0)
        totals = sim.totals()
        # every node crash took down each group's replica on it
        assert {g.stats["crashes"] for g in sim.groups} == {sim.stats["node_crashes"]}
        crashes += sim.stats["node_crashes"]
        partitions += sim.stats["partitions"]
        assert all(g.stats["acked"] > (0 if quiet else 100) for g in sim.groups)
        assert totals["shared_frames"] > 0 and totals["history_undecided"] == 0
        if quiet:
            assert totals["quiet_nodes"] > 0
        torn += totals["torn_crashes"]
    assert crashes > seeds // 2 and partitions > seeds // 2
    assert (torn > seeds // 2) == (kind == "quiet-torn-disks")


def test_a_bridge_partition_cuts_the_sides_apart_but_not_from_the_bridge():
    for seed in range(20):
        sim = Simulator(seed=seed, nodes=5, faults=Faults(bridge=1.0, one_way=0.0))
        sim._ev_partition()
        sides = sim._partition
        (bridge,) = [i for i, side in sides.items() if side == 2]
        assert {side for i, side in sides.items() if i != bridge} == {0, 1}
        for a in sim.nodes:
            for b in sim.nodes:
                if a != b:
                    assert sim._connected(a, b) == (sides[a] == sides[b] or bridge in (a, b))


@pytest.mark.parametrize("nodes", [3, 5])
def test_a_bounce_restarts_the_bridge_on_the_far_side_before_the_far_side_campaigns(nodes):
    faults, config, kw = PROFILES["bounces"]
    sim = Simulator(seed=1, nodes=nodes, faults=faults, config=config, **kw)
    assert sim.run_until(2.0, lambda: sim.stats["bounces"] > 0)
    leader = max((n for n in sim.nodes.values() if n.engine.role == Role.LEADER),
                 key=lambda n: n.engine.term)
    sides = sim._partition
    down = [i for i, n in sim.nodes.items() if not n.alive]
    assert len(down) == 1 and sides[down[0]] == 1  # the bridge, now on the far side
    near = {i for i, side in sides.items() if side == 0}
    far = {i for i, side in sides.items() if side == 1} - set(down)
    # with the bridge, either side was a majority: the leader's lease, the far election
    assert leader.id in near and len(near) + 1 > nodes // 2 and len(far) + 1 > nodes // 2
    restart = min(at for at, _, kind, args in sim._events
                  if kind == "restart" and args == (down[0],))
    far_timers = sim.election_timers_due(far)
    assert far_timers and restart <= min(far_timers)
