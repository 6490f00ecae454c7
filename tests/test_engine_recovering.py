"""A node whose storage was repaired (HardState.recovering): it may have lost entries it
acknowledged and votes it cast, so it neither votes nor campaigns until a leader has
caught it up; the leader forgets what it knew of that node's log (thesis §11.7)."""
import random

from fastraft.config import Config
from fastraft.engine import (
    Engine,
    FollowerLostEntries,
    InitialState,
    PersistHardState,
    Role,
    Timer,
)
from fastraft.engine.progress import ProgressState
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
)

from engine_helpers import Harness, make, sends

CFG = Config(commit_notify_delay=0)
MEMBERS = Membership(voters=frozenset({1, 2, 3}))


def repaired(term=3, entries=2):
    """Node 3 after a repair kept ``entries`` entries of term 1."""
    state = InitialState(
        hard_state=HardState(term, None, 0, recovering=True), snapshot_membership=MEMBERS,
        entries=[Entry(1, i, EntryKind.NORMAL, b"") for i in range(1, entries + 1)])
    e = Engine(3, CFG, random.Random(3), state)
    e.start()
    return e


def replicated(entries=5):
    """Three engines, node 1 leading, ``entries`` entries of it replicated on all."""
    h = Harness([make(i, voters=(1, 2, 3), config=CFG) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    for k in range(entries):
        leader.propose([b"x%d" % k])
    h.run()
    return h, leader


def test_it_votes_for_no_one_and_never_campaigns():
    e = repaired()
    e.on_timer(Timer.LEASE)  # the promise it kept from its start ran out
    for pre in (True, False):
        e.step(1, RequestVote(9, 1, 50, 8, pre_vote=pre))
        assert sends(e.take_commands(), RequestVoteResponse)[-1][1].vote_granted is False
    term = e.term
    e.on_timer(Timer.ELECTION)
    # It only asks, with a pre-vote (a leader that removed it while it was down learns
    # of it so, and tells it), and campaigns no more when every voter grants it.
    asks = sends(e.take_commands())
    assert sorted(to for to, _ in asks) == [1, 2]
    assert all(type(m) is RequestVote and m.pre_vote and m.term == term + 1 for _, m in asks)
    for frm in (1, 2):
        e.step(frm, RequestVoteResponse(term + 1, True, True))
    assert e.role == Role.FOLLOWER and e.term == term and e.voted_for is None
    assert sends(e.take_commands()) == []


def test_it_tells_the_leader_and_leaves_recovery_once_caught_up():
    e = repaired()
    e.step(1, AppendEntries(9, 1, 5, 9, [], 5))  # it lacks 3..5
    (to, reply), = sends(e.take_commands(), AppendEntriesResponse)
    assert to == 1 and not reply.success and reply.recovering
    e.on_timer(Timer.ELECTION)
    e.step(1, TimeoutNow(9, 1))  # not even a transfer makes it campaign
    assert e.role == Role.FOLLOWER
    catch_up = [Entry(1, 3, 0, b""), Entry(9, 4, 0, b""), Entry(9, 5, 0, b"")]
    e.step(1, AppendEntries(9, 1, 2, 1, catch_up, 5))
    cmds = e.take_commands()
    assert e.recovering  # caught up in memory, not yet durable
    assert sends(cmds, AppendEntriesResponse)[-1][1].recovering
    e.log_persisted(5, 9)
    assert not e.recovering
    assert PersistHardState(HardState(9, None, 5, False)) in e.take_commands()
    e.on_timer(Timer.LEASE)  # leader 1 went silent: votes are possible again
    e.step(2, RequestVote(10, 2, 5, 9))
    assert sends(e.take_commands(), RequestVoteResponse)[-1][1].vote_granted


def test_the_leader_forgets_what_a_recovering_follower_had_acknowledged():
    """Without that, the leader ignores the rejection (below match_index, so 'stale') and
    probes above the follower's log for ever."""
    h, leader = replicated()
    last = leader.log.last_index
    assert leader.progress[3].match_index == last
    leader.step(3, AppendEntriesResponse(leader.term, False, last, 2, 1, 0, True))
    assert leader.progress[3].match_index == 0
    (to, probe), = sends(leader.take_commands(), AppendEntries)
    assert to == 3 and probe.prev_log_index == 2
    # an ordinary stale rejection below match_index is still ignored
    h2 = Harness([make(i, voters=(1, 2, 3), config=CFG) for i in (1, 2, 3)])
    h2.fire(1)
    l2 = h2.engines[1]
    l2.propose([b"y"])
    h2.run()
    l2.step(3, AppendEntriesResponse(l2.term, False, 1, 0, 0))
    assert l2.progress[3].match_index == l2.log.last_index


def test_a_heartbeat_for_entries_the_leader_compacted_proves_nothing():
    # A leader that compacted a follower's acknowledged entries sends heartbeats with
    # prev_log_term -1 (it no longer knows that term). A follower lacking those entries
    # (repaired; or its directory wiped) says -1 of them too: that is no match. Taken as
    # one, it set its commit index beyond its log, applied nothing it claimed applied,
    # and a repaired one left recovery (voting again) without the entries.
    e = repaired(entries=2)
    e.step(1, AppendEntries(9, 1, 40, -1, [], 40))
    (to, reply), = sends(e.take_commands(), AppendEntriesResponse)
    assert not reply.success and reply.recovering and reply.index == 40
    assert e.commit_index == 0 and e.applied_index == 0 and e.recovering
    fresh = make(3, voters=(1, 2, 3), term=9, config=CFG)
    fresh.take_commands()
    fresh.step(1, AppendEntries(9, 1, 40, -1, [], 40))
    (_, reply), = sends(fresh.take_commands(), AppendEntriesResponse)
    assert not reply.success and fresh.commit_index == 0
    # a follower that holds the entry is told nothing new by -1 either
    held = make(3, voters=(1, 2, 3), term=9, terms=[1] * 40, config=CFG)
    held.take_commands()
    held.step(1, AppendEntries(9, 1, 40, -1, [], 40))
    (_, reply), = sends(held.take_commands(), AppendEntriesResponse)
    assert not reply.success and held.commit_index == 0


def test_the_leader_catches_up_a_follower_whose_storage_lost_what_it_acknowledged():
    """A follower restarted on an empty directory under its old id (wiped, or another
    disk) answers a heartbeat for its match with a log that ends below it. The leader
    took that for a stale answer and probed at the old match for ever (LAG fixed in
    `fastraft status`); it now forgets the match, says so, and catches the node up."""
    h, leader = replicated()
    last = leader.log.last_index
    assert leader.progress[3].match_index == last
    wiped = h.engines[3] = make(3, voters=(1, 2, 3), config=CFG)
    wiped.take_commands()
    h.applied[3] = []
    leader.on_timer(Timer.HEARTBEAT)  # it sent to every follower since the last: no beat
    leader.take_commands()
    leader.on_timer(Timer.HEARTBEAT)
    (_, beat), = [(to, m) for to, m in sends(leader.take_commands(), AppendEntries) if to == 3]
    wiped.step(1, beat)
    (_, reply), = sends(wiped.take_commands(), AppendEntriesResponse)
    assert not reply.success and reply.hint_index == 0
    leader.step(3, reply)
    cmds = leader.take_commands()
    assert FollowerLostEntries(3, last, 0) in cmds
    assert leader.progress[3].match_index == 0 and leader.commit_index == last
    for to, m in sends(cmds):
        h.engines[to].step(1, m)
    h.run()
    assert wiped.log.last_index == last and leader.progress[3].match_index == last
    assert [e.data for e in h.applied[3]] == [e.data for e in h.applied[2]]


def test_a_follower_that_holds_its_entries_is_never_taken_for_one_that_lost_them():
    # A follower that missed appends rejects the next with its log's end: at or above
    # what it acknowledged, so nothing is reported and nothing forgotten.
    h = Harness([make(i, voters=(1, 2, 3), config=CFG) for i in (1, 2, 3)])
    h.fire(1)
    leader, follower = h.engines[1], h.engines[3]
    leader.propose([b"a"])
    h.run()
    match = leader.progress[3].match_index
    leader.propose([b"lost"])
    assert [to for to, _ in sends(leader.take_commands(), AppendEntries)] == [2, 3]
    leader.propose([b"next"])
    (to, append), = [(to, m) for to, m in sends(leader.take_commands(), AppendEntries)
                     if to == 3]
    follower.step(1, append)
    (_, reply), = sends(follower.take_commands(), AppendEntriesResponse)
    assert not reply.success and reply.hint_index == match
    leader.step(3, reply)
    cmds = leader.take_commands()
    assert not [c for c in cmds if type(c) is FollowerLostEntries]
    assert leader.progress[3].match_index == match


def test_it_stays_recovering_until_it_holds_a_committed_entry_of_a_later_term():
    """Seed 350031 (flapping with damaged disks): recovery used to end at the commit index
    of the first leader heard from. A leader of the repair term can still commit with an
    acknowledgement given before the damage, and a new leader's commit index lags until
    its own entry commits (§5.4.2): the node voted again without an entry it had
    acknowledged, and a leader without it was elected."""
    state = InitialState(
        hard_state=HardState(3, 2, 0, recovering=True), snapshot_membership=MEMBERS,
        entries=[Entry(1, i, EntryKind.NORMAL, b"") for i in (1, 2)])
    e = Engine(3, CFG, random.Random(3), state)
    # a term past the repair term, durable before it says anything
    assert e.term == 3 and PersistHardState(HardState(4, None, 0, True)) in e.start()
    # the leader of the repair term is answered with it (and so deposed)
    e.step(1, AppendEntries(3, 1, 2, 1, [], 2))
    (_, reply), = sends(e.take_commands(), AppendEntriesResponse)
    assert reply.term == 4 and not reply.success
    # caught up to the next leader's commit index, all of it entries of term 1: no
    e.step(2, AppendEntries(5, 2, 2, 1, [Entry(1, 3, 0, b""), Entry(1, 4, 0, b"")], 4))
    e.log_persisted(4, 1)
    assert e.commit_index == 4 and e.recovering
    # its own entry (term 5) committed, and durable here: yes
    e.step(2, AppendEntries(5, 2, 4, 1, [Entry(5, 5, EntryKind.NOOP, b"")], 5))
    assert e.commit_index == 5 and e.recovering  # not durable yet
    e.log_persisted(5, 5)
    assert not e.recovering
    assert PersistHardState(HardState(5, None, 5, False)) in e.take_commands()


def test_a_leader_forgets_a_recovering_followers_acknowledgements_on_evidence_only():
    """Seeds 350022 and 350095 (membership churn with damaged disks): each rejection of a
    heartbeat by a recovering follower made the leader forget its progress again, which
    restarted the snapshot being streamed to it, for ever. The leader forgets only what
    the follower's log is shown to lack: a rejection of a probe whose term the leader
    still knows, with a hint below what it had acknowledged."""
    state = InitialState(
        hard_state=HardState(2, None, 15), snapshot_index=10, snapshot_term=1,
        snapshot_membership=MEMBERS, snapshot_size=1, applied_index=15,
        entries=[Entry(2, i, EntryKind.NORMAL, b"") for i in range(11, 16)])
    leader = Engine(1, CFG, random.Random(1), state)
    leader.start()
    leader.on_timer(Timer.ELECTION)
    leader.take_commands()
    if leader.role != Role.LEADER:  # pre-vote first
        leader.step(2, RequestVoteResponse(leader.term + 1, True, True))
        leader.take_commands()
    leader.step(2, RequestVoteResponse(leader.term, True, False))
    leader.take_commands()
    assert leader.role == Role.LEADER
    pr = leader.progress[3]
    assert pr.acknowledge(14)
    term = leader.term
    # a heartbeat below the compaction point (term -1) proves nothing
    leader.step(3, AppendEntriesResponse(term, False, 5, 0, 0, 0, True))
    assert pr.match_index == 14
    # a probe the leader could match, rejected below 14: the follower lost entries
    leader.step(3, AppendEntriesResponse(term, False, 14, 11, 2, 0, True))
    assert pr.match_index == 0 and pr.next_index <= 12
    # once forgotten, nothing more: a heartbeat's rejection leaves the snapshot being
    # streamed to it alone
    h, other = replicated()
    other.step(3, AppendEntriesResponse(other.term, False, other.log.last_index, 0, 0, 0,
                                        True))
    pr = other.progress[3]
    assert pr.match_index == 0
    other.take_commands()
    pr.become_snapshot(other.snapshot_meta(other.log.last_index), 1)
    other.step(3, AppendEntriesResponse(other.term, False, 0, 0, 0, 0, True))
    assert pr.state == ProgressState.SNAPSHOT and pr.match_index == 0
