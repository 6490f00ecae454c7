"""Quiescence (``Config.quiesce_after``): an idle group's leader sends a last heartbeat and
stops ticking, its followers stop their election timers, and any proposal, read or message
wakes them; the driver wakes followers whose leader's process is lost. Not in the paper:
the multi-Raft practice of CockroachDB and TiKV, kept within §5.2 (a quiet follower counts
its leader as alive, thesis §4.2.3) and §6.2 (check-quorum starts over on waking)."""
import pytest

from fastraft.config import Config
from fastraft.engine import CancelTimer, QuietChanged, ReadReady, Role, SetTimer, Timer
from fastraft.errors import ConfigError
from fastraft.messages import AppendEntries, AppendEntriesResponse, RequestVote, TimeoutNow

from engine_helpers import Harness, make, sends

QCFG = Config(heartbeat_interval=0.05, election_timeout_min=0.15, election_timeout_max=0.3,
              commit_notify_delay=0, quiesce_after=0.1)  # two idle heartbeats


def cluster(config=QCFG, follower_config=None):
    engines = [make(i, config=config if i == 1 else (follower_config or config), terms=[1],
                    commit=1) for i in (1, 2, 3)]
    h = Harness(engines)
    h.fire(1, Timer.ELECTION)  # pre-vote, then the vote
    assert engines[0].role == Role.LEADER
    return h, engines


def tick(h, n=1):
    """``n`` heartbeat intervals of the leader, everything delivered in between."""
    for _ in range(n):
        h.engines[1].on_timer(Timer.HEARTBEAT)
        h.run()


def quiet_cluster():
    h, engines = cluster()
    tick(h, 3)  # one to see the group idle, two idle heartbeats
    assert [e.quiet for e in engines] == [True, True, True]
    return h, engines


def test_an_idle_group_goes_quiet_after_the_configured_heartbeats():
    h, (leader, f2, f3) = cluster()
    tick(h, 2)
    assert not leader.quiet
    leader.on_timer(Timer.HEARTBEAT)
    cmds = leader.take_commands()
    last = leader.log.last_index
    quiesce = AppendEntries(leader.term, 1, last, leader.term, [], last, 0, True)
    assert sends(cmds) == [(2, quiesce), (3, quiesce)]  # with the commit index
    assert CancelTimer(Timer.HEARTBEAT) in cmds and CancelTimer(Timer.ELECTION) in cmds
    assert not any(type(c) is SetTimer for c in cmds)
    assert leader.quiet
    for f in (f2, f3):
        f.step(1, quiesce)
        out = f.take_commands()
        assert f.quiet and f.leader_alive and f.commit_index == last
        assert out[-3:-1] == [CancelTimer(Timer.ELECTION), CancelTimer(Timer.LEASE)]
        # its answer does not wake the leader
        (to, answer), = sends(out)
        assert answer == AppendEntriesResponse(leader.term, True, last)
        leader.step(f.id, answer)
    assert leader.quiet and leader.take_commands() == []
    assert leader.status()["quiet"]


def test_going_quiet_and_waking_are_told_once_each():
    # A host lends a quiet group's share of its log cache budget to the awake ones
    # (RaftHost): it has to hear of every change, and of each once.
    h, engines = cluster()
    told = {e.id: [] for e in engines}
    for e in engines:
        def take(e=e, take=e.take_commands):
            cmds = take()
            told[e.id].extend(c.quiet for c in cmds if type(c) is QuietChanged)
            return cmds
        e.take_commands = take
    tick(h, 3)
    assert told == {1: [True], 2: [True], 3: [True]}
    leader = engines[0]
    last = leader.log.last_index
    again = AppendEntries(leader.term, 1, last, leader.term, [], last, 0, True)
    for f in engines[1:]:  # the quiesce heartbeat again (one follower missed it, say)
        f.step(1, again)
    h.run()
    assert told == {1: [True], 2: [True], 3: [True]} and all(e.quiet for e in engines)
    leader.propose([b"x"])
    h.run()
    assert told == {1: [True, False], 2: [True, False], 3: [True, False]}
    tick(h, 3)
    assert told == {i: [True, False, True] for i in (1, 2, 3)}


def test_activity_or_a_silent_member_keeps_the_group_awake():
    h, (leader, f2, f3) = cluster()
    tick(h, 2)
    leader.propose([b"x"])  # wakes nothing (not quiet yet) but restarts the idle count
    h.run()
    tick(h, 2)
    assert not leader.quiet
    tick(h)
    assert leader.quiet
    # a member that has not acknowledged the whole log keeps it awake, however long
    h, (leader, f2, f3) = cluster()
    del h.engines[3]
    leader.propose([b"y"])
    h.run()
    tick(h, 10)
    assert not leader.quiet and not f2.quiet


def test_late_answers_do_not_keep_the_group_awake():
    # A loaded host answers heartbeats late, in bursts: here every third interval. Its
    # groups go quiet all the same once everything is acknowledged; if each interval
    # needed its answer they would stay awake, and their heartbeats keep the host loaded
    # (10,000 groups on 2 cores written once each never went quiet again that way).
    h, (leader, f2, f3) = cluster()
    held = []
    for k in range(12):
        leader.on_timer(Timer.HEARTBEAT)
        for to, m in sends(leader.take_commands()):
            h.engines[to].step(1, m)
            held.extend((to, a) for _, a in sends(h.engines[to].take_commands()))
        if k % 3 == 2:
            for frm, answer in held:
                leader.step(frm, answer)
            held = []
    assert leader.quiet


def test_a_proposal_wakes_the_leader_and_replication_wakes_the_followers():
    h, (leader, f2, f3) = quiet_cluster()
    leader.propose([b"x"])
    cmds = leader.take_commands()
    assert SetTimer(Timer.HEARTBEAT, QCFG.heartbeat_interval) in cmds
    assert SetTimer(Timer.ELECTION, QCFG.election_timeout_max) in cmds  # check-quorum again
    assert not leader.quiet
    for to, m in sends(cmds):
        h.engines[to].step(1, m)
        assert not h.engines[to].quiet
        assert any(type(c) is SetTimer and c.timer == Timer.ELECTION
                   for c in h.engines[to].take_commands())
    h.run()
    assert f2.log.last_index == f3.log.last_index == leader.log.last_index


def test_a_read_wakes_a_quiet_leader_and_is_confirmed():
    h, (leader, f2, f3) = quiet_cluster()
    leader.read_index(7)
    assert not leader.quiet
    got = []
    while True:  # the read's heartbeats wake the followers too
        cmds = leader.take_commands()
        got += [c for c in cmds if type(c) is ReadReady]
        for to, m in sends(cmds):
            h.engines[to].step(1, m)
            for c in h.engines[to].take_commands():
                if type(c).__name__ == "Send":
                    leader.step(to, c.message)
        if got:
            break
    assert got == [ReadReady(7, leader.commit_index)]


def test_a_quiet_follower_refuses_votes_but_wakes_and_so_does_the_leader():
    h, (leader, f2, f3) = quiet_cluster()
    # node 3 missed the quiesce heartbeat and timed out: its pre-vote
    ask = RequestVote(leader.term + 1, 3, f3.log.last_index, f3.log.last_term, True)
    f2.step(3, ask)
    cmds = f2.take_commands()
    assert not f2.quiet and f2.leader_alive
    assert not any(s for s in sends(cmds) if s[1].vote_granted)  # its leader is alive
    assert any(type(c) is SetTimer and c.timer == Timer.ELECTION for c in cmds)
    leader.step(3, ask)
    assert not leader.quiet and leader.role == Role.LEADER
    # it heartbeats again from the next interval, and the group goes quiet again later
    leader.take_commands()
    tick(h, 3)
    assert leader.quiet


def test_followers_woken_with_their_leader_lost_elect_a_new_one():
    h, (leader, f2, f3) = quiet_cluster()
    del h.engines[1]  # its process died
    for f in (f2, f3):
        f.wake(leader_lost=True)
        assert not f.quiet and not f.leader_alive
        assert any(type(c) is SetTimer and c.timer == Timer.ELECTION for c in f.take_commands())
    h.fire(2, Timer.ELECTION)
    assert f2.role == Role.LEADER and f2.term == leader.term + 1 and f3.leader_id == 2


def test_a_stopping_leader_picks_the_fullest_voter_and_wakes_the_others():
    voters = (1, 2, 3, 4, 5)
    engines = [make(i, voters=voters, config=QCFG, terms=[1], commit=1) for i in voters]
    h = Harness(engines)
    h.fire(1, Timer.ELECTION)
    leader = engines[0]
    tick(h, 3)
    assert all(e.quiet for e in engines)
    f2 = h.engines.pop(2)  # out of reach while the leader appends: it falls behind
    leader.propose([b"x"])
    h.run()
    h.engines[2] = f2
    assert [e.resign() for e in engines[1:]] == [[], [], [], []]  # only a leader resigns
    farewell = leader.resign()
    # the fullest voter, lowest id among equals, campaigns at once (thesis §3.10)
    assert farewell[-1] == (3, TimeoutNow(leader.term, 1))
    assert sorted(to for to, _ in farewell[:-1]) == [2, 4, 5]
    assert all(type(m) is AppendEntries and not m.quiesce and m.term == leader.term
               for _, m in farewell[:-1])
    # the leader stops and node 3 is gone too: the heartbeat woke 4 and 5 (quiet, they
    # ran no election timer), which elect a leader with node 2
    del h.engines[1], h.engines[3]
    for to, m in farewell:
        if to in h.engines:
            h.engines[to].step(1, m)
    h.run()
    assert not any(h.engines[i].quiet for i in (2, 4, 5))  # their election timers run
    for i in (2, 4, 5):
        h.fire(i, Timer.LEASE)  # silence from the leader: no longer counted alive
    h.fire(4, Timer.ELECTION)
    assert h.engines[4].role == Role.LEADER and h.engines[5].leader_id == 4


def behind_and_back():
    """A quiet cluster whose node 3 missed a write while known down (the leader went
    quiet without it), reachable again: the harness, the leader, node 3."""
    h, (leader, f2, f3) = quiet_cluster()
    del h.engines[3]
    leader.peers_down(frozenset({3}))
    leader.propose([b"x"])
    h.run()
    tick(h, 3)
    assert leader.quiet and f3.log.last_index < leader.log.last_index
    h.engines[3] = f3
    return h, leader, f3


def test_a_leader_goes_quiet_without_members_known_down_but_not_without_a_quorum():
    h, (leader, f2, f3) = cluster()
    del h.engines[3]  # its process is down: nothing reaches it, nothing comes back
    leader.propose([b"y"])
    h.run()
    tick(h, 6)
    assert not leader.quiet  # it waits for node 3 to acknowledge the new entry
    assert leader.peers_down(frozenset({3})) is None  # the driver knows better
    tick(h, 2)  # one to see the group idle again (answers are in), one more idle
    assert leader.quiet and f2.quiet
    # node 3 comes back, restarted: its pre-vote wakes the leader, which catches it up
    h.engines[3] = f3
    f3.on_timer(Timer.ELECTION)
    h.run()
    assert not leader.quiet and leader.role == Role.LEADER
    tick(h, 1)
    assert f3.leader_id == 1 and f3.log.last_index == leader.log.last_index

    h, (leader, f2, f3) = cluster()
    del h.engines[2], h.engines[3]
    leader.peers_down(frozenset({2, 3}))
    tick(h, 6)
    assert not leader.quiet  # no quorum answered


def test_what_the_driver_says_down_wakes_quiet_nodes_that_must_act():
    # a follower whose leader went down: it campaigns after its election timeout
    h, (leader, f2, f3) = quiet_cluster()
    assert f2.peers_down(frozenset({3})) is None and f2.quiet  # not its leader
    assert f2.peers_down(frozenset({1, 3})) == "leader_lost"
    assert not f2.quiet and not f2.leader_alive
    assert any(type(c) is SetTimer and c.timer == Timer.ELECTION for c in f2.take_commands())
    # a leader left without a quorum wakes, and check-quorum deposes it (§6.2)
    h, (leader, f2, f3) = quiet_cluster()
    assert leader.peers_down(frozenset({3})) is None and leader.quiet  # 1 and 2: a quorum
    del h.engines[2], h.engines[3]  # cut off from both
    assert leader.peers_down(frozenset({2, 3})) == "no_quorum" and not leader.quiet
    leader.on_timer(Timer.ELECTION)
    assert leader.role == Role.FOLLOWER
    # a member back that has not acknowledged the whole log wakes the leader, which
    # catches it up; one that has, does not
    h, (leader, f2, f3) = quiet_cluster()
    leader.peers_down(frozenset({3}))
    assert leader.peers_down(frozenset()) is None and leader.quiet  # 3 has it all
    h, leader, f3 = behind_and_back()
    assert leader.peers_down(frozenset()) == "member_back" and not leader.quiet
    tick(h, 1)
    assert f3.log.last_index == leader.log.last_index
    # a node that is not quiet has nothing to wake
    h, (leader, f2, f3) = cluster()
    assert leader.peers_down(frozenset({2, 3})) is None and f2.peers_down(frozenset({1})) is None


def test_a_quiet_leader_reminds_members_back_of_its_leadership():
    # node 3 restarts on its log: it knows no leader, and the quiet leader sends nothing
    h, (leader, f2, f3) = quiet_cluster()
    f3 = h.engines[3] = make(3, config=QCFG, term=leader.term, terms=[1, leader.term],
                             commit=1)
    assert f3.log.last_index == leader.log.last_index and f3.leader_id is None
    assert not leader.remind([4, 5])  # not members: nothing to tell
    assert leader.remind([3])
    out = sends(leader.take_commands())
    assert [(to, type(m), m.quiesce) for to, m in out] == [(3, AppendEntries, True)]
    h.engines[3].step(1, out[0][1])
    h.run()
    assert f3.leader_id == 1 and f3.leader_alive and f3.quiet and leader.quiet
    assert f3.commit_index == leader.commit_index
    # one that missed entries refuses the reminder, which wakes the leader to catch it up
    h, leader, f3 = behind_and_back()
    assert leader.remind([3])
    h.run()
    assert not leader.quiet
    tick(h, 1)
    assert f3.leader_id == 1 and f3.log.last_index == leader.log.last_index
    # only a quiet leader reminds
    h, (leader, f2, f3) = cluster()
    leader.take_commands()
    assert not leader.remind([2, 3]) and leader.take_commands() == []
    h, (leader, f2, f3) = quiet_cluster()
    assert not f2.remind([1, 3]) and f2.take_commands() == []


def test_a_follower_without_quiescence_ignores_the_flag():
    h, (leader, f2, f3) = cluster(follower_config=Config(
        heartbeat_interval=0.05, election_timeout_min=0.15, election_timeout_max=0.3,
        commit_notify_delay=0))
    tick(h, 3)
    assert leader.quiet and not f2.quiet and not f3.quiet


def test_waking_a_node_that_is_not_quiet_does_nothing():
    h, (leader, f2, f3) = cluster()
    leader.take_commands()
    for e in (leader, f2):
        e.wake()
        e.wake(leader_lost=True)
        assert e.take_commands() == [] and not e.quiet
    assert f2.leader_alive


def test_quiesce_after_is_checked():
    with pytest.raises(ConfigError, match="quiesce_after"):
        Config(quiesce_after=0.01)


@pytest.mark.parametrize("in_a_word", [False, True])
def test_a_removed_voter_that_never_heard_so_does_not_keep_the_group_awake(in_a_word):
    # A removed voter cut off while the change goes through misses C_new: the leader
    # tries to tell it for an election timeout's worth of heartbeats, then gives up, so
    # it still counts itself a voter and pre-campaigns (thesis §4.2.3: its votes are
    # refused). Back, its first pre-vote has the leader tell it again: with the entries
    # it lacks (its answers wake the leader once, a term), or, once they left the
    # leader's memory, in a word (``Removed``), which wakes no one. Told, it never
    # campaigns again; woken by each of its pre-votes, the group would never stay quiet.
    engines = [make(i, voters=(1, 2, 3, 4), config=QCFG, terms=[1], commit=1)
               for i in (1, 2, 3, 4)]
    h = Harness(engines)
    h.fire(1, Timer.ELECTION)
    leader, f2, f3, removed = engines
    del h.engines[4]  # cut off
    leader.propose_membership(frozenset({1, 2, 3}))
    h.run()
    assert leader.membership.voters == {1, 2, 3} and not leader.membership.joint
    assert list(leader.departing) == [4]
    tick(h, leader._farewell_rounds)
    assert list(leader.departing) == [4] and not leader.quiet  # still trying
    tick(h)
    assert leader.departing == {}
    tick(h, 2)  # two idle heartbeats: quiet now
    h.engines[4] = removed  # back
    assert not removed.membership.joint and removed.membership.is_voter(4)
    assert [e.quiet for e in (leader, f2, f3)] == [True, True, True]
    term = leader.term
    if in_a_word:
        leader.limit_cache(0)
    h.fire(4, Timer.ELECTION)
    assert removed.role == Role.FOLLOWER and removed.status()["removed"]
    assert removed.told_out == in_a_word == removed.membership.is_voter(4)
    # a word is said again at each heartbeat of the farewell: none while quiet
    assert list(leader.departing) == ([4] if in_a_word else [])
    if not in_a_word:
        assert not leader.quiet  # woken by the answers
        tick(h, 2)  # two idle heartbeats: quiet again
    assert [e.quiet for e in (leader, f2, f3)] == [True, True, True]
    for _ in range(3):
        h.fire(4, Timer.ELECTION)
        assert removed.role == Role.FOLLOWER
        assert [e.quiet for e in (leader, f2, f3)] == [True, True, True]
        assert all(not any(type(c) is SetTimer for c in e.take_commands())
                   for e in (leader, f2, f3))
    assert leader.role == Role.LEADER and [e.term for e in (leader, f2, f3)] == [term] * 3
    # a member's pre-vote still wakes them (it may have missed the quiesce heartbeat)
    f3.step(2, RequestVote(term + 1, 2, f2.log.last_index, f2.log.last_term, True))
    assert not f3.quiet
