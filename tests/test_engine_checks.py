"""What the engine refuses (engine/checks.py): strangers and malformed messages never
change a term, a vote, a leader or the log, and emit nothing."""
import pytest

from fastraft.config import Config
from fastraft.engine import Role, Timer
from fastraft.engine.commands import Send
from fastraft.messages import (
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryBatch,
    EntryKind,
    InstallSnapshot,
    Membership,
    Removed,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
)

from engine_helpers import Harness, make

CQ = Config(commit_notify_delay=0)  # pre-vote and check-quorum on, as deployed


def follower_of_2(term=3):
    """Node 1 of {1, 2, 3}, following leader 2 in ``term``, log [1, term]."""
    e = make(1, term=term, terms=[1, term], config=CQ)
    e.step(2, AppendEntries(term, 2, 2, term, [], 2))
    e.take_commands()
    assert (e.role, e.leader_id, e.term) == (Role.FOLLOWER, 2, term)
    return e


def state(e):
    return (e.term, e.voted_for, e.leader_id, e.role, e.log.last_index, e.commit_index)


def refused(e, frm, m, kind):
    before = state(e)
    counts = dict(e.refused)
    reason = e.step(frm, m)
    assert reason is not None, f"{m!r} from {frm} was accepted"
    assert state(e) == before
    assert e.take_commands() == []
    assert e.refused[kind] == counts[kind] + 1
    return reason


BIG = 10**18
FORGED = [Entry(3, 3, EntryKind.NORMAL, b"pwned")]


@pytest.mark.parametrize("message", [
    AppendEntriesResponse(BIG, False, 0),
    AppendEntries(BIG, 99, 2, 3, [], 2),
    AppendEntries(3, 99, 2, 3, FORGED, 3),
    TimeoutNow(3, 99),
    RequestVote(4, 99, 2, 3, leadership_transfer=True),
    RequestVote(BIG, 99, 2, 3, pre_vote=True),
    Removed(BIG, 99, 9, 9),
], ids=["huge-term-response", "huge-term-append", "forged-entry", "timeout-now",
        "transfer-vote", "pre-vote", "removed-word"])
def test_a_stranger_changes_nothing(message):
    e = follower_of_2()
    assert "no configuration" in refused(e, 99, message, "stranger")


def test_a_stranger_changes_nothing_on_the_leader():
    e = make(1, term=2, terms=[1], config=CQ)
    e.on_timer(Timer.ELECTION)  # pre-vote
    for peer in (2, 3):
        e.step(peer, RequestVoteResponse(3, True, True))
    for peer in (2, 3):
        e.step(peer, RequestVoteResponse(3, True, False))
    e.take_commands()
    assert e.role == Role.LEADER
    refused(e, 99, AppendEntriesResponse(BIG, False, 0), "stranger")
    refused(e, 99, AppendEntries(BIG, 99, 9, 9, [], 9), "stranger")


@pytest.mark.parametrize("message, why", [
    (AppendEntries(MAX_TERM + 1, 2, 2, 3, [], 2), "out of range"),
    (AppendEntries(4, 3, 2, 3, [], 2), "sent a AppendEntries as node 3"),
    (AppendEntries(3, 2, 2, 3, [Entry(3, 5, 0, b"")], 3), "does not follow"),
    (AppendEntries(3, 2, 2, 3, [Entry(3, 3, 0, b""), Entry(2, 4, 0, b"")], 3),
     "does not follow"),
    (AppendEntries(3, 2, 2, 3, [Entry(4, 3, 0, b"")], 3), "does not follow"),
    (AppendEntries(3, 2, 2, 3, [Entry(3, 3, 7, b"")], 3), "does not follow"),
    (AppendEntries(3, 2, 2, 5, [], 2), "newer than the term"),
    (RequestVote(4, 2, 2, 3), "node 3 asked for votes for node 2"),
    (RequestVote(4, 3, 2, 5), "with a log of term 5"),
    (TimeoutNow(3, 3), "TimeoutNow as node 3"),
    (Removed(4, 3, 9, 9), "sent a Removed as node 3"),
    (Removed(4, 2, 9, 8), "commit 8 before the configuration at 9"),
    (InstallSnapshot(3, 2, SnapshotMeta(9, 4, Membership(voters=frozenset({1}))), 0, b"",
                     False), "inconsistent"),
    (InstallSnapshot(3, 2, SnapshotMeta(9, 3, Membership()), 0, b"", False),
     "inconsistent"),
], ids=["term-too-big", "impersonation", "gap", "decreasing-terms", "newer-entry-term",
        "unknown-kind", "prev-term-too-new", "vote-for-other", "candidate-log-too-new",
        "timeout-impersonation", "removed-impersonation", "removed-commit", "snapshot-term",
        "snapshot-no-voters"])
def test_malformed_messages_from_a_member_change_nothing(message, why):
    e = follower_of_2()
    frm = 3 if type(message) is RequestVote else 2
    assert why in refused(e, frm, message, "malformed")


@pytest.mark.parametrize("batch, why", [
    ([Entry(3, 4, 0, b""), Entry(3, 5, 0, b"")], "does not follow"),  # starts after a gap
    ([Entry(1, 3, 0, b"")], "does not follow"),  # older than prev_log_term
    ([Entry(3, 3, 0, b""), Entry(4, 4, 0, b"")], "does not follow"),  # newer than the message
])
def test_a_decoded_batch_is_checked_at_its_ends(batch, why):
    """The codec checked the inside of an EntryBatch; the ends must fit the message."""
    from fastraft import kernels
    decoded = kernels.decode_entries(kernels.encode_entries(batch))
    assert type(decoded) is EntryBatch
    e = follower_of_2()
    assert why in refused(e, 2, AppendEntries(3, 2, 2, 3, decoded, 2), "malformed")


def test_a_second_leader_in_a_known_term_is_refused():
    """Election safety (§5.2) makes this impossible from honest members: a forged claim."""
    e = follower_of_2()
    why = refused(e, 3, AppendEntries(3, 3, 2, 3, FORGED, 3), "malformed")
    assert "which node 2 leads" in why


def test_an_acknowledgement_beyond_the_leaders_log_is_refused():
    h = Harness([make(i, voters=(1, 2, 3)) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    assert leader.role == Role.LEADER
    why = refused(leader, 2, AppendEntriesResponse(leader.term, True, leader.log.last_index + 5),
                  "malformed")
    assert "acknowledges index" in why


def test_timeout_now_only_from_the_leader_in_its_term():
    e = follower_of_2()
    e.step(3, TimeoutNow(3, 3))  # a member, but not our leader: ignored
    assert (e.role, e.term) == (Role.FOLLOWER, 3)
    e.step(2, TimeoutNow(3, 2))
    assert (e.role, e.term) == (Role.CANDIDATE, 4)


def test_a_node_behind_a_membership_change_follows_an_unknown_leader_once_its_own_is_gone():
    """Node 4 was added after node 1's log ends and now leads: node 1 refuses it while
    a leader it knows is alive, accepts it once that leader is silent for
    election_timeout_min, and then keeps following it (simulator seed 116)."""
    e = follower_of_2()
    probe = AppendEntries(5, 4, 2, 3, [], 2)
    refused(e, 4, probe, "stranger")
    e.on_timer(Timer.LEASE)  # no word from leader 2 for election_timeout_min
    assert e.step(4, probe) is None
    assert (e.term, e.leader_id) == (5, 4)
    assert e.step(4, AppendEntries(5, 4, 2, 3, [Entry(5, 3, 0, b"x")], 2)) is None
    assert e.log.last_index == 3


def test_a_node_behind_a_membership_change_votes_for_an_unknown_candidate_once_its_leader_is_gone():
    """Thesis §4.1: a server votes for a candidate not in its configuration (when its
    log is up to date and its term current). Node 4, added after node 1's log ends,
    asks for votes: refused while leader 2 is alive (§4.2.3), granted once it is not,
    pre-vote and vote alike; a candidate whose log is behind is refused as a member's
    would be."""
    e = follower_of_2()
    ahead = RequestVote(5, 4, 3, 3)
    refused(e, 4, ahead, "stranger")
    refused(e, 4, RequestVote(5, 4, 3, 3, pre_vote=True), "stranger")
    e.on_timer(Timer.LEASE)  # no word from leader 2 for election_timeout_min
    assert e.step(4, RequestVote(5, 4, 3, 3, pre_vote=True)) is None
    assert e.take_commands() == [Send(4, RequestVoteResponse(5, True, True))]
    assert (e.term, e.voted_for) == (3, None)  # a pre-vote changes nothing
    assert e.step(4, ahead) is None
    assert (e.term, e.voted_for) == (5, 4)
    assert Send(4, RequestVoteResponse(5, True, False)) in e.take_commands()
    behind = make(1, term=3, terms=[1, 3, 3], config=CQ)
    behind.on_timer(Timer.LEASE)
    assert behind.step(4, RequestVote(5, 4, 2, 3)) is None
    assert (behind.term, behind.voted_for) == (5, None)
    assert Send(4, RequestVoteResponse(5, False, False)) in behind.take_commands()


def test_a_candidate_added_after_a_voters_log_ends_can_win_with_its_vote():
    """Voters {1, 2, 4} replaced {1, 2, 3}: the change reached leader 1 and node 4 (a
    majority of {1, 2, 4}, so it committed) but not node 2, whose log still says {1, 2,
    3}. Leader 1 is gone, and node 3, removed, was stopped. Node 4 needs node 2's vote;
    node 2 cannot win without node 1 or 3. Without §4.1's vote for a candidate not in
    the configuration no one is ever elected."""
    h = Harness([make(2, voters=(1, 2, 3), term=1, terms=[1, 1], config=CQ),
                 make(4, voters=(1, 2, 4), term=1, terms=[1, 1, 1], config=CQ)])
    for e in h.engines.values():
        e.on_timer(Timer.LEASE)  # no leader heard from since the start
    for _ in range(3):
        h.fire(2)
    assert h.engines[2].role != Role.LEADER
    h.fire(4)
    assert h.engines[4].role == Role.LEADER
    assert h.engines[2].leader_id == 4


def test_a_node_with_no_configuration_accepts_the_leader_that_contacts_it():
    e = make(4, voters=())
    assert e.known_ids == frozenset()
    assert e.step(1, AppendEntries(2, 1, 0, 0, [], 0)) is None
    assert e.leader_id == 1


def test_a_node_never_campaigns_past_max_term():
    e = make(1, term=MAX_TERM, terms=[1], config=CQ)
    e.on_timer(Timer.ELECTION)
    assert e.term == MAX_TERM and e.role == Role.FOLLOWER
