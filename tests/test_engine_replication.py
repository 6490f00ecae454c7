"""Replication: §5.3 log consistency and fast backtracking, §5.4.2 commitment (Figure 8),
§5.5 duplicated/reordered messages, batching and the in-flight window, durability order."""
import random

from fastraft.config import Config
from fastraft.engine import (
    AppendLog,
    Apply,
    Engine,
    InitialState,
    ProgressState,
    Role,
    RoleChanged,
    Send,
    SetTimer,
    Timer,
    TruncateLog,
)
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Membership,
    RequestVoteResponse,
)

from engine_helpers import Harness, make, sends, without_timers


def E(term, index, data=None):
    return Entry(term, index, EntryKind.NORMAL, b"e%d" % index if data is None else data)


def follower(terms, term=None, commit=0):
    f = make(2, term=term or (terms[-1] if terms else 1), terms=terms, commit=commit)
    f.take_commands()
    return f


def test_follower_appends_and_acknowledges():
    f = follower([1])
    f.step(1, AppendEntries(1, 1, 1, 1, [E(1, 2), E(1, 3)], 1, 7))
    assert without_timers(f.take_commands()) == [
        RoleChanged(Role.FOLLOWER, 1, 1, 0),
        AppendLog([E(1, 2), E(1, 3)]),
        Apply([E(1, 1)]),
        Send(1, AppendEntriesResponse(1, True, 3, 0, 0, 7)),
    ]


def test_follower_rejects_gap_with_hint():
    f = follower([1, 1, 2])
    f.step(1, AppendEntries(3, 1, 6, 3, [E(3, 7)], 0))
    assert sends(f.take_commands()) == [(1, AppendEntriesResponse(3, False, 6, 3, 2, 0))]


def test_follower_rejects_term_mismatch_with_hint():
    f = follower([1, 1, 2, 2, 2])
    f.step(1, AppendEntries(3, 1, 5, 3, [], 0))
    # "my last entry with a term <= 3 is index 5, of term 2": the leader then skips every
    # entry of its own log whose term is above 2 in one step
    assert sends(f.take_commands()) == [(1, AppendEntriesResponse(3, False, 5, 5, 2, 0))]
    f.step(1, AppendEntries(3, 1, 4, 1, [], 0))
    assert sends(f.take_commands()) == [(1, AppendEntriesResponse(3, False, 4, 2, 1, 0))]


def test_follower_truncates_conflicting_suffix_then_appends():
    f = follower([1, 1, 2, 2], term=3)
    f.step(1, AppendEntries(3, 1, 2, 1, [E(3, 3, b"new3"), E(3, 4, b"new4")], 0))
    assert without_timers(f.take_commands()) == [
        RoleChanged(Role.FOLLOWER, 3, 1, 0),
        TruncateLog(3),
        AppendLog([E(3, 3, b"new3"), E(3, 4, b"new4")]),
        Send(1, AppendEntriesResponse(3, True, 4, 0, 0, 0)),
    ]
    assert [f.log.term_at(i) for i in range(1, 5)] == [1, 1, 3, 3]


def test_duplicate_append_is_idempotent_and_never_truncates_matching_entries():
    f = follower([1])
    msg = AppendEntries(1, 1, 1, 1, [E(1, 2), E(1, 3)], 0)
    f.step(1, msg)
    f.take_commands()
    f.log_persisted(3, 1)
    f.step(1, msg)  # nothing to write: answered at once (durable)
    assert without_timers(f.take_commands()) == [Send(1, AppendEntriesResponse(1, True, 3),
                                                      True)]
    # an older, shorter message must not cut the longer log back (§5.3 / reordering)
    f.step(1, AppendEntries(1, 1, 1, 1, [E(1, 2)], 0))
    assert without_timers(f.take_commands()) == [Send(1, AppendEntriesResponse(1, True, 2),
                                                      True)]
    assert f.log.last_index == 3


def test_follower_commit_is_bounded_by_last_new_entry():
    f = follower([1, 1, 1, 1])
    f.step(1, AppendEntries(1, 1, 2, 1, [], 4))  # heartbeat proves only a match up to 2
    assert f.commit_index == 2


def test_follower_never_truncates_committed_entries():
    f = follower([1, 1, 1], commit=3)
    f.step(1, AppendEntries(2, 1, 1, 1, [E(2, 2)], 0))
    # entries up to the commit index are skipped, so nothing is truncated
    assert not [c for c in f.take_commands() if type(c) is TruncateLog]
    assert f.log.last_index == 3 and f.log.term_at(2) == 1


def elect(n=3, terms=(1,), leader=1, **kw):
    h = Harness([make(i, voters=range(1, n + 1), terms=terms, **kw) for i in range(1, n + 1)])
    h.fire(leader)
    assert h.engines[leader].role == Role.LEADER
    return h


def test_proposals_in_one_iteration_share_one_append_and_one_message_per_follower():
    h = elect()
    leader = h.engines[1]
    base = leader.log.last_index
    for k in range(3):
        leader.propose([b"p%d" % k])
    cmds = leader.take_commands()
    appends = [c for c in cmds if type(c) is AppendLog]
    assert len(appends) == 1 and [e.data for e in appends[0].entries] == [b"p0", b"p1", b"p2"]
    msgs = sends(cmds, AppendEntries)
    assert [to for to, _ in msgs] == [2, 3]
    assert all([e.index for e in m.entries] == [base + 1, base + 2, base + 3] for _, m in msgs)


def test_leader_counts_its_own_entry_only_once_durable():
    h = elect()
    leader = h.engines[1]
    index = leader.propose([b"x"])
    leader.take_commands()
    leader.step(2, AppendEntriesResponse(leader.term, True, index))
    assert leader.commit_index < index  # 1 follower + leader not yet durable = 1 of 3
    leader.log_persisted(index, leader.term)
    assert leader.commit_index == index
    # a stale persistence report for a replaced entry is ignored
    leader.log_persisted(index, leader.term - 1)


def test_figure_8_previous_term_entries_commit_only_under_a_current_term_entry():
    # Node 1 leads term 4 with an entry of term 2 at index 2 that it never committed.
    e = make(1, voters=(1, 2, 3), term=3, terms=[1, 2])
    e.on_timer(Timer.ELECTION)
    e.take_commands()
    e.step(2, RequestVoteResponse(4, True))
    e.take_commands()
    assert e.role == Role.LEADER and e.log.last_index == 3  # the no-op of term 4
    e.log_persisted(3, 4)
    # follower 2 holds index 2 but not the no-op yet: a majority holds index 2, yet the
    # entry is of term 2, so counting replicas must not commit it (§5.4.2).
    e.step(2, AppendEntriesResponse(4, True, 2))
    assert e.commit_index == 0
    e.step(2, AppendEntriesResponse(4, True, 3))
    assert e.commit_index == 3  # the no-op commits, and index 2 with it


def test_pipelining_respects_the_inflight_window():
    cfg = Config(pre_vote=False, check_quorum=False, max_entries_per_message=2,
                 max_inflight_messages=3)
    h = elect(config=cfg)
    leader = h.engines[1]
    leader.propose([b"%d" % k for k in range(20)])
    msgs = sends(leader.take_commands(), AppendEntries)
    to2 = [m for to, m in msgs if to == 2]
    assert len(to2) == 3 and all(len(m.entries) == 2 for m in to2)
    assert leader.progress[2].state == ProgressState.REPLICATE
    leader.step(2, AppendEntriesResponse(leader.term, True, to2[0].entries[-1].index))
    more = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2]
    assert len(more) == 1 and more[0].prev_log_index == to2[-1].entries[-1].index


def test_byte_budget_splits_messages():
    cfg = Config(pre_vote=False, check_quorum=False, max_bytes_per_message=250)
    h = elect(config=cfg)
    leader = h.engines[1]
    leader.propose([b"x" * 100] * 5)
    to2 = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2]
    assert [len(m.entries) for m in to2] == [2, 2, 1]


def test_fast_backtracking_needs_one_round_trip_per_term_not_per_entry():
    # The follower has 50 entries of a stale term 2 the leader never had.
    leader_terms = [1] * 10 + [3] * 50
    follower_terms = [1] * 10 + [2] * 50
    engines = [make(1, voters=(1, 2), term=3, terms=leader_terms),
               make(2, voters=(1, 2), term=3, terms=follower_terms)]
    h = Harness(engines)
    h.fire(1)
    leader, f = h.engines[1], h.engines[2]
    assert leader.role == Role.LEADER
    assert [f.log.term_at(i) for i in range(1, 62)] == [leader.log.term_at(i) for i in range(1, 62)]
    assert h.delivered < 12  # vote, a probe or two, the catch-up; not 50 probes


def test_stale_rejection_is_ignored():
    h = elect()
    leader = h.engines[1]
    leader.propose([b"a"])
    leader.take_commands()
    h.run()
    pr = leader.progress[2]
    assert pr.state == ProgressState.REPLICATE
    match = pr.match_index
    leader.step(2, AppendEntriesResponse(leader.term, False, match - 1, 0, 0))
    assert pr.state == ProgressState.REPLICATE and pr.match_index == match


def test_heartbeat_reprobes_a_stalled_follower():
    h = elect()
    leader = h.engines[1]
    leader.propose([b"lost"])
    leader.take_commands()  # the AppendEntries are lost
    leader.on_timer(Timer.HEARTBEAT)
    leader.take_commands()
    leader.on_timer(Timer.HEARTBEAT)  # still no progress: fall back to probing, resend
    msgs = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2]
    assert msgs and msgs[0].entries and msgs[0].entries[-1].data == b"lost"


def heartbeat_targets(leader):
    leader.on_timer(Timer.HEARTBEAT)
    return sorted(to for to, m in sends(leader.take_commands(), AppendEntries)
                  if not m.entries)


def answers(engine):
    return [c for c in engine.take_commands()
            if type(c) is Send and type(c.message) is AppendEntriesResponse]


def test_an_answer_to_a_message_with_nothing_to_write_claims_the_disk_and_leaves_at_once():
    """Figure 2: an acknowledgement waits for the disk (``requires_durability``). To a
    message that brings nothing to write (a heartbeat, whose prev the leader knows
    acknowledged; a probe or a duplicate of entries still being written) it claims what
    is on disk already, marked ``durable``: it leaves at once, not behind the writes in
    flight."""
    f = follower([1, 1])  # entries 1-2 and term 1 on disk
    f.step(1, AppendEntries(1, 1, 2, 1, [E(1, 3)], 0, 4))
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 3, 0, 0, 4), False)]
    f.step(1, AppendEntries(1, 1, 2, 1, [], 0, 5))  # heartbeat: 3's write still in flight
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 2, 0, 0, 5), True)]
    f.step(1, AppendEntries(1, 1, 3, 1, [], 0, 6))  # it holds 3, not yet on disk
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 2, 0, 0, 6), True)]
    f.step(1, AppendEntries(1, 1, 2, 1, [E(1, 3)], 0, 7))  # a probe resending 3
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 2, 0, 0, 7), True)]
    f.step(1, AppendEntries(1, 1, 2, 1, [E(1, 3), E(1, 4)], 0, 8))  # 4 to write: waits
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 4, 0, 0, 8), False)]
    f.log_persisted(4, 1)
    f.step(1, AppendEntries(1, 1, 3, 1, [], 0, 9))
    assert answers(f) == [Send(1, AppendEntriesResponse(1, True, 3, 0, 0, 9), True)]


def test_an_answer_in_a_term_not_yet_durable_waits_for_the_disk():
    f = follower([1, 1])
    f.step(1, AppendEntries(2, 1, 2, 1, [], 0, 1))  # a leader of term 2: the term's write
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 1), False)]
    f.step(1, AppendEntries(2, 1, 2, 1, [], 0, 2))
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 2), False)]
    f.hard_state_persisted(2)
    f.step(1, AppendEntries(2, 1, 2, 1, [], 0, 3))
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 3), True)]


def test_an_answer_at_once_never_claims_entries_a_truncation_replaces_on_disk():
    f = follower([1, 1, 1], term=2)  # on disk: entries 1-3 (term 1), term 2
    f.step(1, AppendEntries(2, 1, 1, 1, [E(2, 2)], 0, 1))  # 2-3 replaced, not yet on disk
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 1), False)]
    f.step(1, AppendEntries(2, 1, 2, 2, [], 0, 2))  # the disk's entry 2 is of term 1
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 1, 0, 0, 2), True)]
    f.log_persisted(3, 1)  # the write before the truncation: nothing it holds counts now
    f.step(1, AppendEntries(2, 1, 2, 2, [], 0, 3))
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 1, 0, 0, 3), True)]
    f.log_persisted(2, 2)
    f.step(1, AppendEntries(2, 1, 2, 2, [], 0, 4))
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 4), True)]


def test_a_repaired_node_answers_only_from_the_disk():
    """A node in recovery (thesis §11.7) may clear that state with its next write: its
    answers wait for it, whatever they claim."""
    state = InitialState(hard_state=HardState(1, None, 0, recovering=True),
                         snapshot_membership=Membership(voters=frozenset({1, 2, 3})),
                         entries=[E(1, 1), E(1, 2)])
    f = Engine(2, Config(commit_notify_delay=0), random.Random(2), state)
    f.start()
    assert f.term == 2  # a repaired node starts a term later
    f.hard_state_persisted(2)
    f.step(1, AppendEntries(2, 1, 2, 1, [], 0, 1))
    assert answers(f) == [Send(1, AppendEntriesResponse(2, True, 2, 0, 0, 1, True), False)]


def test_heartbeat_tick_skips_followers_sent_entries_since_the_last_tick():
    h = elect()
    leader = h.engines[1]
    h.run()
    assert heartbeat_targets(leader) == []  # both were just sent the election's entry
    h.run()
    assert heartbeat_targets(leader) == [2, 3]  # idle: both hear only from the tick
    h.run()
    leader.propose([b"busy"])
    h.run()  # both were sent the entry and acknowledged it
    # they heard from the leader this interval: the tick sends nothing
    assert heartbeat_targets(leader) == []
    assert heartbeat_targets(leader) == [2, 3]  # nothing since: heartbeats again
    h.run()
    leader.propose([b"to 2"])
    leader.take_commands()  # only node 2's AppendEntries arrives
    leader.step(2, AppendEntriesResponse(leader.term, True, leader.log.last_index))
    leader.take_commands()
    assert heartbeat_targets(leader) == []  # 3 is probed (no progress), 2 was just sent to
    assert leader.progress[3].state == ProgressState.PROBE


def test_heartbeat_tick_skips_nobody_when_the_election_timeout_is_under_three_intervals():
    # a skipped follower may hear nothing for two intervals: too close to its timeout here
    h = elect(config=Config(pre_vote=False, check_quorum=False, commit_notify_delay=0,
                            heartbeat_interval=0.06, election_timeout_min=0.15,
                            election_timeout_max=0.3))
    leader = h.engines[1]
    h.run()
    leader.propose([b"busy"])
    h.run()
    assert heartbeat_targets(leader) == [2, 3]


def test_cluster_replicates_and_applies_in_order_everywhere():
    h = elect(n=5)
    leader = h.engines[1]
    for k in range(10):
        leader.propose([b"w%d" % k])
        h.run()
    for node_id, applied in h.applied.items():
        assert [e.data for e in applied if e.kind == EntryKind.NORMAL] == \
            [b"e1"] + [b"w%d" % k for k in range(10)], node_id


def test_commit_index_reaches_caught_up_followers_after_a_short_delay():
    cfg = Config(pre_vote=False, check_quorum=False, commit_notify_delay=0.001)
    h = elect(config=cfg)
    leader = h.engines[1]
    leader.on_timer(Timer.COMMIT)  # the election's own commit armed it; let it fire
    h.run()
    index = leader.propose([b"x"])
    leader.take_commands()
    leader.log_persisted(index, leader.term)
    leader.step(2, AppendEntriesResponse(leader.term, True, index))
    cmds = leader.take_commands()
    assert leader.commit_index == index
    # no empty AppendEntries right away: the next one would carry the commit anyway
    assert [m for _, m in sends(cmds, AppendEntries) if not m.entries] == []
    assert SetTimer(Timer.COMMIT, 0.001) in cmds
    leader.on_timer(Timer.COMMIT)
    notify = [(to, m.leader_commit) for to, m in sends(leader.take_commands(), AppendEntries)]
    assert (2, index) in notify
    # once the commit went out, the timer sends nothing more
    leader.on_timer(Timer.COMMIT)
    assert [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2] == []


def test_inflight_window_is_bounded_in_bytes_too():
    cfg = Config(pre_vote=False, check_quorum=False, commit_notify_delay=0,
                 max_bytes_per_message=1000, max_inflight_bytes=2500)
    h = elect(config=cfg)
    leader = h.engines[1]
    leader.propose([b"x" * 500] * 20)  # 10 KB: ten messages of 1,000 bytes
    to2 = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2]
    assert [len(m.entries) for m in to2] == [2, 2, 2]  # 3,000 bytes, then paused
    assert leader.progress[2].inflight_total == 3000
    leader.step(2, AppendEntriesResponse(leader.term, True, to2[0].entries[-1].index))
    more = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 2]
    assert len(more) == 1 and leader.progress[2].inflight_total == 3000
