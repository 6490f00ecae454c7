"""Elections: §5.1 terms, §5.2 leader election, §5.4.1 election restriction, thesis §9.6
pre-vote and §6.2 check-quorum. Each test asserts the exact commands emitted."""

import random

import pytest

from fastraft.config import Config
from fastraft.engine import (
    AppendLog,
    CancelTimer,
    Engine,
    InitialState,
    PersistHardState,
    Role,
    RoleChanged,
    Send,
    SetTimer,
    Timer,
)
from fastraft.engine.core import LEARNER_CAMPAIGN_TIMEOUTS
from fastraft.errors import AlreadyInitialized, NotLeader
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Membership,
    RequestVote,
    RequestVoteResponse,
    TimeoutNow,
    encode_membership,
)

from engine_helpers import CFG, Harness, make, sends, without_timers


def test_election_timeout_starts_campaign_vote_persisted_before_requests():
    e = make(1, term=3, terms=[1, 3])
    e.on_timer(Timer.ELECTION)
    cmds = e.take_commands()
    assert without_timers(cmds) == [
        RoleChanged(Role.CANDIDATE, 4, None, 0),
        PersistHardState(HardState(4, 1, 0)),
        Send(2, RequestVote(4, 1, 2, 3, False)),
        Send(3, RequestVote(4, 1, 2, 3, False)),
    ]
    # the driver releases RequestVote only after the hard state is durable (commands.py)
    timers = [c for c in cmds if type(c) is SetTimer]
    assert len(timers) == 1 and timers[0].timer == Timer.ELECTION



def election_timers(commands):
    return [c for c in commands if type(c) is SetTimer and c.timer == Timer.ELECTION]


@pytest.mark.parametrize("voted", ["for itself", "for a candidate"])
def test_the_election_timeout_counts_from_the_votes_durability(voted):
    """A vote's election (§5.2) begins once it is on disk: a candidate's RequestVote and
    a voter's grant wait for it (``requires_durability``). A timeout before that does not
    start another election, which would wait behind the same write and only raise the
    term; the timer is armed afresh once the vote is durable (a disk whose fsync outlasts
    the timeout had candidates and voters time out as the grants came, election after
    election: simulator seed 12045980)."""
    e = make(1, term=3, terms=[1, 3])
    if voted == "for itself":
        e.on_timer(Timer.ELECTION)
        assert e.role == Role.CANDIDATE and e.term == 4
    else:
        e.step(2, RequestVote(4, 2, 2, 3))
        assert e.voted_for == 2
    e.take_commands()
    e.on_timer(Timer.ELECTION)  # the vote's fsync is still under way
    assert e.take_commands() == [] and e.term == 4
    e.hard_state_persisted(3)  # an earlier term's hard state: not this vote
    assert e.take_commands() == []
    e.hard_state_persisted(4)
    (timer,) = e.take_commands()
    assert timer == SetTimer(Timer.ELECTION, timer.delay) and 0.15 <= timer.delay < 0.3
    e.hard_state_persisted(4)  # said again: nothing more
    assert e.take_commands() == []
    e.on_timer(Timer.ELECTION)  # durable, no leader heard: a new election
    assert e.role == Role.CANDIDATE and e.term == 5


def test_a_vote_durable_before_its_timeout_changes_nothing():
    """The usual case: the disk answers first, the timer runs as armed with the vote, and
    a leader heard meanwhile arms it as always (no second arming once durable)."""
    e = make(1, term=3, terms=[1, 3])
    e.step(2, RequestVote(4, 2, 2, 3))
    assert election_timers(e.take_commands())
    e.hard_state_persisted(4)
    assert e.take_commands() == []
    e.on_timer(Timer.ELECTION)
    assert e.role == Role.CANDIDATE and e.term == 5
    f = make(1, term=3, terms=[1, 3])
    f.step(2, RequestVote(4, 2, 2, 3))
    f.take_commands()
    f.on_timer(Timer.ELECTION)  # deferred: not durable yet
    f.step(2, AppendEntries(4, 2, 2, 3, [], 0))  # the candidate won: its heartbeat
    assert len(election_timers(f.take_commands())) == 1
    f.hard_state_persisted(4)
    assert f.take_commands() == [] and f.role == Role.FOLLOWER and f.leader_id == 2

def test_election_timeouts_are_randomized_in_range():
    cfg = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.05)
    e = make(1, config=cfg)
    delays = set()
    for _ in range(200):
        e.step(2, AppendEntries(e.term, 2, 0, 0, [], 0))
        delays.update(c.delay for c in e.take_commands() if type(c) is SetTimer)
    assert all(0.1 <= d < 0.2 for d in delays)
    assert len(delays) > 150  # really random, not one value


@pytest.mark.parametrize("preferred, lo, hi", [(True, 0.3, 0.4), (False, 0.4, 0.6),
                                                (None, 0.3, 0.6)])
def test_a_hosts_preferred_replica_draws_its_first_timeout_before_the_others(preferred, lo,
                                                                              hi):
    """A RaftHost starts each replica telling it whether it is the one its group's
    leadership is balanced to: that one's first election timeout comes from the first
    third of the range and the others' from the rest, so after a restart of every host
    the preferred replica mostly campaigns first; later timeouts use the whole range."""
    cfg = Config(election_timeout_min=0.3, election_timeout_max=0.6, heartbeat_interval=0.1)
    state = InitialState(snapshot_membership=Membership(voters=frozenset({1, 2, 3})))
    first, later = set(), set()
    for seed in range(200):
        e = Engine(1, cfg, random.Random(seed), state)
        [timer] = [c for c in e.start(preferred) if type(c) is SetTimer
                   and c.timer == Timer.ELECTION]
        first.add(timer.delay)
        e.step(2, AppendEntries(0, 2, 0, 0, [], 0))
        later.update(c.delay for c in e.take_commands() if type(c) is SetTimer
                     and c.timer == Timer.ELECTION)
    assert all(lo <= d < hi for d in first) and len(first) > 150
    assert min(first) < lo + 0.02 and max(first) > hi - 0.02  # all of its part
    assert all(0.3 <= d < 0.6 for d in later)
    assert min(later) < 0.32 and max(later) > 0.58


@pytest.mark.parametrize("preferred, lo, hi", [(True, 0.3, 0.4), (False, 0.4, 0.6)])
def test_a_hosts_founding_replica_draws_its_first_timeout_as_told(preferred, lo, hi):
    """The same when a host founds a group: bootstrap arms the election timer again, in
    the preferred replica's part of the range or the others'."""
    cfg = Config(election_timeout_min=0.3, election_timeout_max=0.6, heartbeat_interval=0.1)
    voters = Membership(voters=frozenset({1, 2, 3}))
    delays = set()
    for seed in range(200):
        e = Engine(1, cfg, random.Random(seed), InitialState())
        e.start()
        e.bootstrap(voters, preferred)
        [timer] = [c for c in e.take_commands() if type(c) is SetTimer
                   and c.timer == Timer.ELECTION]
        delays.add(timer.delay)
    assert all(lo <= d < hi for d in delays) and len(delays) > 150


def test_candidate_with_majority_becomes_leader_and_appends_noop():
    e = make(1, term=1, terms=[1])
    e.on_timer(Timer.ELECTION)
    e.take_commands()
    e.step(2, RequestVoteResponse(2, True))
    cmds = e.take_commands()
    noop = Entry(2, 2, EntryKind.NOOP, b"")
    assert cmds == [
        RoleChanged(Role.LEADER, 2, 1, 0),
        CancelTimer(Timer.ELECTION),
        SetTimer(Timer.HEARTBEAT, CFG.heartbeat_interval),
        AppendLog([noop]),
        Send(2, AppendEntries(2, 1, 1, 1, [noop], 0, 0)),
        Send(3, AppendEntries(2, 1, 1, 1, [noop], 0, 0)),
    ]
    assert e.role == Role.LEADER


def test_candidate_rejected_by_majority_becomes_follower():
    e = make(1, term=1)
    e.on_timer(Timer.ELECTION)
    e.take_commands()
    e.step(2, RequestVoteResponse(2, False))
    assert e.role == Role.CANDIDATE  # 1 yes, 1 no, 1 pending: not decided
    e.step(3, RequestVoteResponse(2, False))
    assert e.role == Role.FOLLOWER and e.term == 2


def test_one_vote_per_term():
    e = make(1, term=1)
    e.step(2, RequestVote(2, 2, 0, 0))
    cmds = e.take_commands()
    assert without_timers(cmds) == [PersistHardState(HardState(2, None, 0)),
                                     PersistHardState(HardState(2, 2, 0)),
                                     Send(2, RequestVoteResponse(2, True, False))]
    e.step(3, RequestVote(2, 3, 0, 0))
    assert without_timers(e.take_commands()) == [Send(3, RequestVoteResponse(2, False, False))]
    # asking again is idempotent
    e.step(2, RequestVote(2, 2, 0, 0))
    assert sends(e.take_commands()) == [(2, RequestVoteResponse(2, True, False))]


@pytest.mark.parametrize("cand_last_index, cand_last_term, granted", [
    (3, 2, False),   # same last index, older last term
    (2, 3, False),   # same last term, shorter log
    (3, 3, True),    # identical
    (1, 4, True),    # newer last term wins even when shorter
    (9, 3, True),    # same term, longer
])
def test_election_restriction(cand_last_index, cand_last_term, granted):
    e = make(1, term=3, terms=[1, 2, 3])
    e.step(2, RequestVote(4, 2, cand_last_index, cand_last_term))
    assert sends(e.take_commands(), RequestVoteResponse) == [
        (2, RequestVoteResponse(4, granted, False))]


def test_stale_term_messages_rejected():
    e = make(1, term=5)
    e.step(2, AppendEntries(3, 2, 0, 0, [], 0))
    e.step(3, RequestVote(4, 3, 10, 4))
    assert e.take_commands() == [Send(2, AppendEntriesResponse(5, False, 0)),
                                 Send(3, RequestVoteResponse(5, False, False))]
    assert e.term == 5 and e.voted_for is None


def test_leader_steps_down_on_higher_term():
    h = Harness([make(i, terms=[1]) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    assert leader.role == Role.LEADER
    leader.step(3, AppendEntriesResponse(leader.term + 5, False, 0))
    cmds = leader.take_commands()
    assert cmds[:3] == [PersistHardState(HardState(leader.term, None, leader.commit_index)),
                        CancelTimer(Timer.HEARTBEAT),
                        RoleChanged(Role.FOLLOWER, leader.term, None, leader.commit_index)]
    assert leader.role == Role.FOLLOWER


def test_single_node_elects_itself_and_commits_after_persist():
    e = make(1, voters=(1,))
    e.on_timer(Timer.ELECTION)
    e.take_commands()
    assert e.role == Role.LEADER and e.commit_index == 0
    e.log_persisted(1, 1)
    assert e.commit_index == 1


def test_pre_vote_does_not_raise_terms():
    cfg = Config(pre_vote=True, check_quorum=False)
    e = make(1, term=3, terms=[3], config=cfg)
    e.on_timer(Timer.ELECTION)
    cmds = e.take_commands()
    assert e.term == 3 and e.role == Role.PRE_CANDIDATE
    assert not [c for c in cmds if type(c) is PersistHardState]
    assert sends(cmds) == [(2, RequestVote(4, 1, 1, 3, True)), (3, RequestVote(4, 1, 1, 3, True))]
    # a follower answering a pre-vote keeps its term and vote
    f = make(2, term=3, terms=[3], config=cfg)
    f.step(1, RequestVote(4, 1, 1, 3, True))
    assert f.take_commands() == [Send(1, RequestVoteResponse(4, True, True))]
    assert f.term == 3 and f.voted_for is None
    # with a quorum of pre-votes, the real campaign starts
    e.step(2, RequestVoteResponse(4, True, True))
    assert e.role == Role.CANDIDATE and e.term == 4


def test_pre_vote_refused_to_a_stale_log():
    cfg = Config(pre_vote=True)
    f = make(2, term=3, terms=[1, 3], config=cfg)
    f.on_timer(Timer.LEASE)  # the promise it kept from its start ran out
    f.step(1, RequestVote(4, 1, 1, 1, True))
    assert f.take_commands() == [Send(1, RequestVoteResponse(3, False, True))]


def test_check_quorum_leader_steps_down_without_answers():
    cfg = Config(pre_vote=False, check_quorum=True)
    h = Harness([make(i, terms=[1], config=cfg) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    leader.on_timer(Timer.ELECTION)  # everyone answered during this period
    leader.take_commands()
    assert leader.role == Role.LEADER
    leader.on_timer(Timer.ELECTION)  # nobody answered since
    assert leader.role == Role.FOLLOWER


@pytest.mark.parametrize("pre_vote", [True, False])
def test_a_voter_grants_a_learner_only_a_log_newer_than_its_own(pre_vote):
    # A learner campaigns only for entries no voter may have (thesis §4.1). With the
    # same log as this voter's it holds none, and this voter can win whatever it could:
    # refused, so it takes no voter's place. A newer log is granted; a voter with the
    # same log is granted as ever (§5.4.1).
    def granted(candidate, last_index, last_term):
        voter = make(1, terms=[1, 2], term=2, voters=(1, 2, 3), learners=(4,))
        voter.take_commands()
        voter.step(candidate, RequestVote(3, candidate, last_index, last_term, pre_vote))
        [(to, answer)] = sends(voter.take_commands(), RequestVoteResponse)
        return to == candidate and answer.vote_granted
    assert not granted(4, 2, 2)  # a learner, the same log
    assert granted(4, 3, 2)  # longer
    assert granted(4, 1, 3)  # a newer last term, shorter
    assert not granted(4, 1, 2)  # behind, as for anyone
    assert granted(2, 2, 2)  # a voter, the same log
    assert granted(5, 3, 2) and not granted(5, 2, 2)  # a node outside the configuration


def test_a_learner_asks_first_and_campaigns_after_leaderless_timeouts():
    # Thesis §4.1: a server outside its configuration may be needed, so it campaigns,
    # not counting its own vote. A learner gives the voters election timeouts first:
    # at those it only asks (a leader that removed it may have given up telling it),
    # and grants start no campaign.
    learner = make(4, voters=(1, 2, 3), learners=(4,))
    assert LEARNER_CAMPAIGN_TIMEOUTS == 3

    def ask():
        learner.on_timer(Timer.ELECTION)
        asks = sends(learner.take_commands())
        assert sorted(to for to, _ in asks) == [1, 2, 3]
        assert all(type(m) is RequestVote and m.pre_vote and m.term == 1 for _, m in asks)
        for v in (1, 2, 3):
            learner.step(v, RequestVoteResponse(1, True, True))
        assert learner.role == Role.FOLLOWER and learner.term == 0
        assert learner.voted_for is None and sends(learner.take_commands()) == []

    ask()
    ask()
    # A leader heard in between: the next timeout is again the first without one.
    learner.step(1, AppendEntries(0, 1, 0, 0, [], 0))
    learner.take_commands()
    ask()
    ask()
    # The third in a row: it pre-votes (always, though this config has pre-vote off:
    # a learner raises no term unless a quorum of voters would accept its log). Its own
    # vote counts in no quorum: one grant of three voters is not enough, two are.
    learner.on_timer(Timer.ELECTION)
    asks = sends(learner.take_commands())
    assert sorted(to for to, _ in asks) == [1, 2, 3]
    assert all(type(m) is RequestVote and m.pre_vote and m.term == 1 for _, m in asks)
    assert learner.role == Role.PRE_CANDIDATE
    learner.step(1, RequestVoteResponse(1, True, True))
    assert learner.role == Role.PRE_CANDIDATE and learner.term == 0
    learner.step(2, RequestVoteResponse(1, True, True))
    assert learner.role == Role.CANDIDATE and learner.term == 1 and learner.voted_for == 4
    votes = sends(learner.take_commands())
    assert sorted(to for to, _ in votes) == [1, 2, 3]
    assert all(type(m) is RequestVote and not m.pre_vote and m.term == 1 for _, m in votes)
    learner.step(3, RequestVoteResponse(1, True, False))
    assert learner.role == Role.CANDIDATE
    learner.step(2, RequestVoteResponse(1, True, False))
    # It leads only to bring the voters its log: no proposals, and a transfer (thesis
    # §3.10) to a voter that granted its vote, once that one holds the whole log.
    assert learner.role == Role.LEADER and learner.transfer_target == 2
    with pytest.raises(NotLeader) as info:
        learner.propose([b"x"])
    assert info.value.leader_id == 2
    learner.take_commands()
    learner.log_persisted(1, 1)
    learner.step(2, AppendEntriesResponse(1, True, 1))
    assert sends(learner.take_commands(), TimeoutNow) == [(2, TimeoutNow(1, 4))]
    assert learner.commit_index == 0  # its own copy counts in no quorum
    # Its no-op commits: it steps down, and no second voter is told to campaign (the
    # votes would split).
    learner.step(1, AppendEntriesResponse(1, True, 1))
    assert learner.commit_index == 1 and learner.role == Role.FOLLOWER
    assert sends(learner.take_commands(), TimeoutNow) == []


def test_a_learner_whose_handover_target_is_silent_steps_down_once_its_term_commits():
    learner = make(4, voters=(1, 2, 3), learners=(4,))
    for _ in range(LEARNER_CAMPAIGN_TIMEOUTS):
        learner.on_timer(Timer.ELECTION)
    for kind in (True, False):  # the pre-vote, then the vote
        for v in (2, 3):
            learner.step(v, RequestVoteResponse(1, True, kind))
    assert learner.role == Role.LEADER and learner.transfer_target == 2
    learner.take_commands()
    learner.log_persisted(1, 1)
    for v in (1, 3):  # voter 2 says nothing
        learner.step(v, AppendEntriesResponse(1, True, 1))
    assert learner.commit_index == 1 and learner.role == Role.FOLLOWER
    assert sends(learner.take_commands(), TimeoutNow) == [(1, TimeoutNow(1, 4))]


def test_a_repaired_learner_and_removed_nodes_never_campaign():
    # A repaired learner (recovering: it may lack entries it acknowledged) only asks,
    # however long it hears no leader; a node that knows it is out sends nothing.
    learner = Engine(4, CFG, random.Random(4), InitialState(
        hard_state=HardState(1, None, 0, recovering=True),
        snapshot_membership=Membership(voters=frozenset({1, 2, 3}),
                                       learners=frozenset({4}))))
    learner.start()
    learner.take_commands()
    assert learner.recovering
    term = learner.term
    for _ in range(3):
        learner.on_timer(Timer.ELECTION)
        asks = sends(learner.take_commands())
        assert sorted(to for to, _ in asks) == [1, 2, 3]
        assert all(m.pre_vote and m.term == term + 1 for _, m in asks)
        for v in (1, 2, 3):
            learner.step(v, RequestVoteResponse(term + 1, True, True))
        assert learner.role == Role.FOLLOWER and learner.term == term
    removed = Engine(4, CFG, random.Random(4), InitialState(
        hard_state=HardState(0, None, 0),
        snapshot_membership=Membership(voters=frozenset({1, 2, 3}), removed=frozenset({4}))))
    removed.start()
    removed.take_commands()
    assert removed.status()["removed"]
    removed.on_timer(Timer.ELECTION)
    removed.on_timer(Timer.ELECTION)
    assert removed.take_commands() == [] and removed.role == Role.FOLLOWER


@pytest.mark.parametrize("removed", [False, True])
def test_a_learner_holding_the_newest_entries_leads_and_hands_over(removed):
    """Seed 91016303's end, reduced. Voters {2, 3, 5}, learners {1, 4}. Node 2 led term
    2 and appended a joint configuration making learner 1 a voter ({1, 2, 5} with {2, 3,
    5}), which reached no one; node 5 led term 3 with the votes of 3 and 5, replicated
    its entries to learner 1 only (``removed``: among them a configuration that takes
    learner 1 out), and was lost for good. Node 2 needs node 1's vote, which node 1
    refuses (its log has term 3); node 3 needs node 2's, which node 2 refuses (node 3 is
    behind). Learner 1, whose log both accept, leads, and hands over to a voter."""
    first = Entry(1, 1, EntryKind.NORMAL, b"e1")
    joint = Membership(voters=frozenset({1, 2, 5}), outgoing=frozenset({2, 3, 5}),
                       learners=frozenset({4}))
    before = Membership(voters=frozenset({2, 3, 5}), learners=frozenset({1, 4}))
    after = Membership(voters=frozenset({2, 3, 5}), learners=frozenset({4}),
                       removed=frozenset({1}))
    last = Entry(3, 3, EntryKind.CONFIG, encode_membership(after)) if removed \
        else Entry(3, 3, EntryKind.NORMAL, b"x")
    logs = {1: [first, Entry(3, 2, EntryKind.NOOP, b""), last],
            2: [first, Entry(2, 2, EntryKind.CONFIG, encode_membership(joint)),
                Entry(2, 3, EntryKind.NORMAL, b"y")],
            3: [first]}
    hard = {1: HardState(3, None, 1), 2: HardState(2, 2, 1), 3: HardState(3, 5, 1)}
    config = Config(commit_notify_delay=0)  # pre-vote and check-quorum on, as deployed
    engines = []
    for i in (1, 2, 3):
        e = Engine(i, config, random.Random(i), InitialState(
            hard_state=hard[i], entries=logs[i], applied_index=1,
            snapshot_membership=before))
        e.start()
        e.on_timer(Timer.LEASE)  # no leader heard since the start
        engines.append(e)
    h = Harness(engines)
    one, two, three = (h.engines[i] for i in (1, 2, 3))
    assert two.membership == joint and one.membership == (after if removed else before)
    for voter in (2, 3, 2, 3):
        h.fire(voter)
        assert all(e.role != Role.LEADER for e in h.engines.values())
    assert [e.term for e in (one, two, three)] == [3, 3, 3]  # pre-votes raised none
    for _ in range(LEARNER_CAMPAIGN_TIMEOUTS - 1):
        h.fire(1)  # it asks
        assert one.role == Role.FOLLOWER and one.term == 3
    h.fire(1)
    # Learner 1 led term 4 and handed over to voter 2 (which granted its vote) once
    # that one held its log; voter 2 won term 5.
    assert one.role == Role.FOLLOWER and two.role == Role.LEADER and two.term == 5
    assert [e.log.term_at(2) for e in (one, two, three)] == [3, 3, 3]
    assert two.membership == (after if removed else before)
    assert all(e.log.term_at(4) == 4 for e in (one, two, three))
    assert two.commit_index == three.commit_index == 5
    # Taken out, it knows once it holds that its removal committed, and hears no more.
    assert one.removed == removed and one.commit_index >= (3 if removed else 5)


def test_bootstrap_once():
    e = make(1, voters=())
    e.bootstrap(Membership(voters=frozenset({1, 2, 3})))
    assert e.take_commands()[:1] == [PersistHardState(HardState(1, None, 0))]
    with pytest.raises(AlreadyInitialized):
        e.bootstrap(Membership(voters=frozenset({1})))


def test_propose_on_follower_names_the_leader():
    e = make(1, voters=(1, 2, 3))
    with pytest.raises(NotLeader) as info:
        e.propose([b"x"])
    assert info.value.leader_id is None
    e.step(2, AppendEntries(1, 2, 0, 0, [], 0))
    with pytest.raises(NotLeader) as info:
        e.propose([b"x"])
    assert info.value.leader_id == 2


def test_harness_elects_exactly_one_leader():
    h = Harness([make(i, terms=[1]) for i in (1, 2, 3)])
    h.fire(2)
    roles = sorted(e.role for e in h.engines.values())
    assert roles == [Role.FOLLOWER, Role.FOLLOWER, Role.LEADER]
    assert {e.leader_id for e in h.engines.values()} == {2}
