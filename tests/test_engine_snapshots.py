"""§7 snapshots and compaction, thesis §3.10 leadership transfer and §4.2.3 vote
stickiness: the exact commands the engine emits."""
import random

import pytest

from fastraft.config import Config
from fastraft.engine import (
    CompactLog,
    Engine,
    InitialState,
    ProgressState,
    Role,
    SendSnapshotChunk,
    SetTimer,
    StoreSnapshotChunk,
    Timer,
    TruncateLog,
)
from fastraft.errors import NotLeader
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    Membership,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
)

from engine_helpers import Harness, make, sends

CFG = Config(pre_vote=False, check_quorum=False, snapshot_trailing_entries=2,
             snapshot_chunk_bytes=10, commit_notify_delay=0)
MEMBERS = Membership(voters=frozenset({1, 2, 3}))


def leader_with_log(n_entries=10, config=CFG):
    h = Harness([make(i, terms=[1] * n_entries, commit=n_entries, config=config)
                 for i in (1, 2, 3)])
    h.fire(1)
    return h, h.engines[1]


def test_snapshot_saved_compacts_behind_a_trailing_window():
    h, leader = leader_with_log()
    meta = leader.snapshot_meta(8)
    assert meta == SnapshotMeta(8, 1, MEMBERS)
    leader.snapshot_saved(meta, 25)
    assert leader.take_commands() == [CompactLog(6)]  # 8 - 2 trailing entries
    assert leader.log.snapshot_index == 6 and leader.log.term_at(6) == 1
    leader.snapshot_saved(SnapshotMeta(5, 1, MEMBERS), 10)  # older: ignored
    assert leader.take_commands() == []


def start_transfer(leader, index, size=25):
    """Snapshot at ``index``, then find follower 2 behind it: the transfer starts."""
    leader.snapshot_saved(leader.snapshot_meta(index), size)
    leader.take_commands()
    pr = leader.progress[2]
    pr.match_index, pr.next_index = 0, 1
    pr.become_probe()
    leader.on_timer(Timer.HEARTBEAT)
    return pr


def test_follower_behind_the_compaction_point_gets_chunks_one_at_a_time():
    h, leader = leader_with_log()
    pr = start_transfer(leader, leader.applied_index)
    chunks = [c for c in leader.take_commands() if type(c) is SendSnapshotChunk and c.to == 2]
    meta = leader._snapshot
    assert chunks == [SendSnapshotChunk(2, InstallSnapshot(leader.term, 1, meta, 0, b"", False),
                                        10)]
    assert pr.state == ProgressState.SNAPSHOT
    leader.step(2, InstallSnapshotResponse(leader.term, meta.last_included_index, 10))
    assert [c.message.offset for c in leader.take_commands() if type(c) is SendSnapshotChunk] \
        == [10]
    leader.step(2, InstallSnapshotResponse(leader.term, meta.last_included_index, 20))
    last = [c for c in leader.take_commands() if type(c) is SendSnapshotChunk]
    assert [(c.message.offset, c.length, c.message.done) for c in last] == [(20, 5, True)]
    leader.step(2, InstallSnapshotResponse(leader.term, meta.last_included_index, 25, True))
    assert pr.match_index == meta.last_included_index and pr.state != ProgressState.SNAPSHOT


def snapshot_chunks(leader):
    return [(c.message.offset, c.length) for c in leader.take_commands()
            if type(c) is SendSnapshotChunk]


def test_a_chunk_is_resent_only_after_an_interval_without_answers_and_duplicates_stop():
    h, leader = leader_with_log()
    start_transfer(leader, leader.applied_index)
    index = leader._snapshot.last_included_index
    assert snapshot_chunks(leader) == [(0, 10)]
    leader.step(2, InstallSnapshotResponse(leader.term, index, 10))
    assert snapshot_chunks(leader) == [(10, 10)]
    leader.on_timer(Timer.HEARTBEAT)  # answered within this interval: nothing resent
    assert snapshot_chunks(leader) == []
    leader.on_timer(Timer.HEARTBEAT)  # a whole interval without an answer: lost, resend
    assert snapshot_chunks(leader) == [(10, 10)]
    leader.step(2, InstallSnapshotResponse(leader.term, index, 20))
    assert snapshot_chunks(leader) == [(20, 5)]
    # the answer to the duplicate of chunk 10 asks for the chunk already in flight
    leader.step(2, InstallSnapshotResponse(leader.term, index, 20))
    assert snapshot_chunks(leader) == []
    # a follower that lost what it had (restart) starts over at once
    leader.step(2, InstallSnapshotResponse(leader.term, index, 0))
    assert snapshot_chunks(leader) == [(0, 10)]


def test_a_transfer_finishes_the_snapshot_it_started_with():
    h, leader = leader_with_log(20)
    start_transfer(leader, 12)
    leader.take_commands()
    leader.snapshot_saved(leader.snapshot_meta(leader.applied_index), 30)  # newer one
    assert leader.snapshots_in_use() == {12, leader.applied_index}
    leader.step(2, InstallSnapshotResponse(leader.term, 12, 10))
    chunk = [c for c in leader.take_commands() if type(c) is SendSnapshotChunk][0]
    assert chunk.message.meta.last_included_index == 12 and chunk.message.offset == 10


def test_a_node_removed_while_sent_a_snapshot_is_sent_no_more_of_it_when_added_back():
    # No snapshots for a node that is out: the transfer ends, and the leader no longer
    # keeps that snapshot for it. Added back, it starts afresh; before, its departing
    # progress kept the transfer, and the leader asked for chunks of a snapshot it had
    # dropped (a random mix on FileStorage disks, seed 7088165).
    h, leader = leader_with_log(20)
    start_transfer(leader, 12)
    leader.take_commands()
    del h.engines[2]  # it does not hear of its removal
    leader.propose_membership(frozenset({1, 3}))
    h.run()
    assert leader.membership.voters == {1, 3} and list(leader.departing) == [2]
    assert leader.departing[2].state != ProgressState.SNAPSHOT
    leader.snapshot_saved(leader.snapshot_meta(leader.applied_index), 30)  # newer one
    assert 12 not in leader.snapshots_in_use()
    leader.propose_membership(frozenset({1, 3}), frozenset({2}))
    h.run()
    pr = leader.progress[2]  # a transfer afresh, of the snapshot the leader keeps
    assert pr.state != ProgressState.SNAPSHOT \
        or pr.snapshot_index == leader._snapshot.last_included_index
    for _ in range(3):
        leader.on_timer(Timer.HEARTBEAT)
        chunks = [c for c in leader.take_commands() if type(c) is SendSnapshotChunk]
        assert all(c.message.meta.last_included_index in leader.snapshots_in_use()
                   for c in chunks)


def test_follower_asks_driver_to_store_chunks_and_answers_after_install():
    f = make(2, terms=[1, 1, 2], term=2, config=CFG)
    f.take_commands()
    meta = SnapshotMeta(5, 2, MEMBERS)
    chunk = InstallSnapshot(3, 1, meta, 0, b"0123456789", False)
    f.step(1, chunk)
    cmds = f.take_commands()
    assert StoreSnapshotChunk(1, chunk) in cmds
    f.snapshot_chunk_stored(1, chunk, 10)
    assert sends(f.take_commands()) == [(1, InstallSnapshotResponse(3, 5, 10, False))]
    f.snapshot_installed(1, meta, 25)
    cmds = f.take_commands()
    # its log (ending at 3) cannot hold entry 5: discard all, continue after the snapshot
    assert [c for c in cmds if type(c) in (TruncateLog, CompactLog)] == [TruncateLog(1),
                                                                       CompactLog(5)]
    assert sends(cmds) == [(1, InstallSnapshotResponse(3, 5, 25, True))]
    assert (f.commit_index, f.applied_index, f.log.last_index) == (5, 5, 5)


def test_a_snapshot_that_replaces_the_log_resets_what_is_durable():
    """A log of 8 durable entries (terms 1, 2) replaced by a snapshot at 5 of term 3: the
    node holds nothing durable past 5 now. Were persisted_index left at 8, this node as
    leader would count itself a replica of entries 6..8 of the new log before writing
    them, and its cache would let them go as if on disk."""
    f = make(2, terms=[1, 1, 2, 2, 2, 2, 2, 2], term=3, config=CFG)
    f.take_commands()
    assert f.persisted_index == 8
    f.snapshot_installed(1, SnapshotMeta(5, 3, MEMBERS), 10)
    f.take_commands()
    assert (f.log.last_index, f.persisted_index) == (5, 5)


def test_the_last_chunk_of_a_snapshot_over_a_disagreeing_log_cuts_what_follows_it_first():
    """A deposed leader's entries 3..8 (term 2) and a snapshot at 5 of term 3: on the last
    chunk the entries after 5 go, before the driver saves the snapshot (the commands'
    order is the writes' order), so a crash after the save leaves none of them after it
    (their older terms stopped the node from loading its log). Entries up to 5 stay
    until the snapshot is durable; a log that agrees with the snapshot keeps them all."""
    f = make(2, terms=[1, 1, 2, 2, 2, 2, 2, 2], term=3, commit=2, config=CFG)
    f.take_commands()
    meta = SnapshotMeta(5, 3, MEMBERS)
    first = InstallSnapshot(3, 1, meta, 0, b"0123456789", False)
    f.step(1, first)
    assert [type(c) for c in f.take_commands() if type(c) in (
        TruncateLog, StoreSnapshotChunk)] == [StoreSnapshotChunk]  # not before the last
    last = InstallSnapshot(3, 1, meta, 10, b"01234", True)
    f.step(1, last)
    cmds = [c for c in f.take_commands() if type(c) in (TruncateLog, StoreSnapshotChunk)]
    assert cmds == [TruncateLog(6), StoreSnapshotChunk(1, last)]
    assert (f.log.last_index, f.persisted_index) == (5, 5)
    agrees = make(2, terms=[1, 1, 2, 2, 3, 3, 3], term=3, commit=2, config=CFG)
    agrees.take_commands()
    agrees.step(1, last)
    assert [c for c in agrees.take_commands() if type(c) is TruncateLog] == []
    assert agrees.log.last_index == 7


def test_installing_a_snapshot_keeps_a_matching_suffix():
    f = make(2, terms=[1, 1, 2, 2, 2, 2], term=2, config=CFG)
    f.take_commands()
    f.snapshot_installed(1, SnapshotMeta(4, 2, MEMBERS), 10)
    cmds = f.take_commands()
    assert [c for c in cmds if type(c) in (TruncateLog, CompactLog)] == [CompactLog(4)]
    assert f.log.last_index == 6 and f.log.snapshot_index == 4  # §7: entries 5, 6 kept


def test_stale_snapshot_is_answered_with_the_commit_index():
    f = make(2, terms=[1] * 6, term=1, commit=6, config=CFG)
    f.take_commands()
    f.step(1, InstallSnapshot(1, 1, SnapshotMeta(4, 1, MEMBERS), 0, b"x", True))
    assert sends(f.take_commands()) == [(1, AppendEntriesResponse(1, True, 6))]


def test_leadership_transfer_sends_timeout_now_once_caught_up():
    h, leader = leader_with_log(3)
    h.run()
    leader.transfer_leadership(2)
    assert sends(leader.take_commands(), TimeoutNow) == [(2, TimeoutNow(leader.term, 1))]
    with pytest.raises(NotLeader) as info:
        leader.propose([b"refused while handing over"])
    assert info.value.leader_id == 2
    h.engines[2].step(1, TimeoutNow(leader.term, 1))  # deliver what the test took
    h.run()
    assert h.engines[2].role == Role.LEADER and leader.role == Role.FOLLOWER


def test_leadership_transfer_catches_the_target_up_first():
    h, leader = leader_with_log(3)
    h.run()
    h.engines.pop(2)
    leader.propose([b"x", b"y"])
    leader.take_commands()
    leader.transfer_leadership(2)
    assert sends(leader.take_commands(), TimeoutNow) == []
    leader.step(2, AppendEntriesResponse(leader.term, True, leader.log.last_index))
    assert sends(leader.take_commands(), TimeoutNow) == [(2, TimeoutNow(leader.term, 1))]


def test_leadership_transfer_gives_up_after_an_election_timeout():
    h, leader = leader_with_log(3)
    h.engines.pop(2)
    leader.transfer_leadership(2)
    leader.on_timer(Timer.ELECTION)
    with pytest.raises(NotLeader):
        leader.propose([b"still handing over"])
    leader.on_timer(Timer.ELECTION)
    assert leader.propose([b"accepted again"]) > 0


def test_a_leader_handing_over_refuses_membership_changes_as_it_does_proposals():
    # Thesis §3.10: no new entries while handing over, a configuration entry no more than
    # a command (each would hold the target back from the end of the log); the caller
    # is sent to the target, as etcd drops both.
    h, leader = leader_with_log(3)
    h.engines.pop(2)
    leader.propose([b"x"])
    leader.take_commands()
    last = leader.log.last_index
    leader.transfer_leadership(2)
    with pytest.raises(NotLeader) as info:
        leader.propose_membership(frozenset({1, 2, 3}), frozenset({4}), {4: "d"})
    assert info.value.leader_id == 2
    assert leader.log.last_index == last and not leader.membership_change_pending
    leader.on_timer(Timer.ELECTION)
    leader.on_timer(Timer.ELECTION)  # given up: changes are taken again
    assert leader.transfer_target is None
    assert leader.propose_membership(frozenset({1, 2, 3}), frozenset({4}), {4: "d"}) == last + 1


def test_a_leader_handing_over_still_completes_the_change_it_started():
    # C_new follows a committed C_old,new (§6) whatever the leader is doing: it ends a
    # change taken before the transfer, and the target leads in C_new.
    h, leader = leader_with_log(3)
    h.engines.pop(3)
    joint = leader.propose_membership(frozenset({1, 2}))
    leader.transfer_leadership(2)
    term = leader.term
    h.run()
    successor = h.engines[2]
    assert successor.role == Role.LEADER and leader.role == Role.FOLLOWER
    assert successor.membership.voters == {1, 2} and not successor.membership.joint
    # appended by the leader handing over, in its term
    assert successor.membership_index == joint + 1 and successor.log.term_at(joint + 1) == term


def test_a_voter_that_is_leaving_declines_leadership_and_the_leader_goes_on():
    # A node stepping down for a stop (Engine.leaving) answers TimeoutNow with one of
    # its own: the leader gives the transfer up at once and takes proposals again.
    h, leader = leader_with_log(3)
    h.run()
    leaving = h.engines[2]
    leaving.leaving = True
    leader.transfer_leadership(2)
    assert leader.transfer_target == 2 and leader.status()["transfer_target"] == 2
    assert leaving.status()["leaving"] and not leader.status()["leaving"]
    h.run()
    assert leader.role == Role.LEADER and leader.transfer_target is None
    assert leaving.role == Role.FOLLOWER and leaving.term == leader.term
    assert leader.propose([b"accepted again"]) > 0
    h.run()
    # a decline from a node the leader is not handing over to changes nothing
    h.engines.pop(3)
    leader.transfer_leadership(3)
    leader.step(2, TimeoutNow(leader.term, 2))
    assert leader.transfer_target == 3
    # still a voter: it campaigns when its election timer runs out, and can win
    leaving.on_timer(Timer.ELECTION)
    h.run()
    assert leaving.role == Role.LEADER


def test_a_leader_forfeits_its_read_lease_for_the_term_once_it_sends_timeout_now():
    # TimeoutNow's receiver campaigns at once and voters grant a transfer's votes despite
    # a live leader (thesis §3.10): the followers' promise a lease rests on (§6.4.1) is
    # gone for the rest of the term, whatever becomes of the transfer.
    h, leader = leader_with_log(3)
    h.run()
    assert not leader.lease_forfeited
    h.engines[2].leaving = True  # stepping down for a stop: it will decline
    leader.transfer_leadership(2)
    h.run()
    assert leader.role == Role.LEADER and leader.transfer_target is None  # declined
    assert leader.lease_forfeited and leader.status()["lease_forfeited"]
    # the successor, leading in a later term, holds a lease again; so does node 1 when
    # it leads once more, in a later term still
    h.engines[2].leaving = False
    leader.transfer_leadership(2)
    h.run()
    successor = h.engines[2]
    assert successor.role == Role.LEADER and not successor.lease_forfeited
    successor.transfer_leadership(1)
    h.run()
    assert leader.role == Role.LEADER and not leader.lease_forfeited
    # a leader stopping cleanly (resign) sends TimeoutNow too
    assert leader.resign() and leader.lease_forfeited


def test_votes_are_refused_while_the_leader_is_heard():
    cfg = Config(check_quorum=True)
    f = make(2, term=2, terms=[1], config=cfg)
    f.step(1, AppendEntries(2, 1, 1, 1, [], 0))
    f.take_commands()
    f.step(3, RequestVote(3, 3, 5, 2))  # a node that lost contact wants an election
    assert sends(f.take_commands()) == [] and f.term == 2
    # the leader's own transfer request is answered
    f.step(3, RequestVote(3, 3, 5, 2, False, True))
    assert sends(f.take_commands()) == [(3, RequestVoteResponse(3, True, False))]


def test_a_restarted_node_refuses_votes_until_its_promise_runs_out():
    """Before it stopped it may have answered a leader, promising no vote for
    election_timeout_min (§4.2.3), the promise the leader's read lease rests on (§6.4.1):
    a new process keeps it from its start."""
    cfg = Config(check_quorum=True)
    state = InitialState(hard_state=HardState(2, None, 0), snapshot_membership=MEMBERS,
                         entries=[Entry(1, 1, EntryKind.NORMAL, b"")])
    f = Engine(2, cfg, random.Random(2), state)
    assert SetTimer(Timer.LEASE, cfg.election_timeout_min) in f.start()
    for pre_vote in (True, False):
        f.step(3, RequestVote(3, 3, 5, 2, pre_vote))
        assert sends(f.take_commands()) == [] and f.term == 2
    f.step(3, RequestVote(3, 3, 5, 2, False, True))  # a leader's transfer is answered
    assert sends(f.take_commands()) == [(3, RequestVoteResponse(3, True, False))]
    f = Engine(2, cfg, random.Random(2), state)
    f.start()
    f.on_timer(Timer.LEASE)
    f.step(3, RequestVote(3, 3, 5, 2))
    assert sends(f.take_commands()) == [(3, RequestVoteResponse(3, True, False))]
    # a node of term 0 never answered a leader; without check-quorum there is no promise
    for fresh in (make(2, config=cfg), make(2, term=2, terms=[1], config=CFG)):
        fresh.step(3, RequestVote(3, 3, 5, 2))
        assert sends(fresh.take_commands()) == [(3, RequestVoteResponse(3, True, False))]


def test_votes_are_answered_once_the_lease_expires():
    cfg = Config(check_quorum=True)
    f = make(2, term=2, terms=[1], config=cfg)
    f.step(1, AppendEntries(2, 1, 1, 1, [], 0))
    f.take_commands()
    f.on_timer(Timer.LEASE)
    f.step(3, RequestVote(3, 3, 5, 2, True))
    assert sends(f.take_commands()) == [(3, RequestVoteResponse(3, True, True))]
