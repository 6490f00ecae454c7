"""The bounded log cache: the engine keeps every entry's term but only the newest
``log_cache_bytes`` of payloads, and asks its driver for older entries with commands
(``ReadLog`` for a lagging follower, ``ApplyStored`` for the state machine)."""
import random

import pytest

from fastraft.config import Config
from fastraft.engine import (
    Apply,
    ApplyStored,
    CompactLog,
    Engine,
    InitialState,
    ProgressState,
    ReadLog,
    Role,
    Timer,
)
from fastraft.engine.core import READ_LOG_PATIENCE
from fastraft.engine.raftlog import ENTRY_OVERHEAD
from fastraft.errors import InvalidArgument
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Membership,
    SnapshotMeta,
)

from engine_helpers import Harness, make, sends

ENTRY = 100 + ENTRY_OVERHEAD  # what one 100-byte entry costs in the cache
CFG = Config(pre_vote=False, check_quorum=False, commit_notify_delay=0,
             log_cache_bytes=20 * ENTRY)


def of(commands, kind):
    return [c for c in commands if type(c) is kind]


def leader_with_lagging_follower(n=60, config=CFG):
    """Node 1 leads {1, 2, 3} with ``n`` entries of 100 bytes; node 3 never answered."""
    h = Harness([make(i, config=config) for i in (1, 2)])
    h.fire(1)
    leader = h.engines[1]
    assert leader.role == Role.LEADER
    for _ in range(n // 10):
        leader.propose([b"x" * 100] * 10)
        h.run()
    assert leader.commit_index == leader.log.last_index
    # Node 3 finally answers a probe: it has nothing, so the leader must start at 1.
    leader.step(3, AppendEntriesResponse(leader.term, False, leader.progress[3].next_index - 1,
                                         0, 0))
    return h, leader


def test_only_durable_entries_leave_the_cache_and_it_stays_within_its_budget():
    h = Harness([make(i, config=CFG) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    leader.propose([b"x" * 100] * 50)
    assert leader.log.cache_first == 2  # nothing of them is durable yet: all stay
    h.run()
    for _ in range(5):
        leader.propose([b"x" * 100] * 10)
        h.run()
    log = leader.log
    assert log.cache_bytes <= CFG.log_cache_bytes
    assert log.cache_first > 30 and log.entries[-1].index == log.last_index
    # terms are kept for the whole log
    assert all(log.term_at(i) == leader.term for i in range(2, log.last_index + 1))
    # the first 50 left memory before they were applied (ApplyStored, which this
    # harness has no storage for); all since were applied from memory, in order
    for applied in h.applied.values():
        assert [e.index for e in applied][-50:] == list(range(52, log.last_index + 1))



def test_a_smaller_cache_budget_trims_at_once_and_never_exceeds_the_config():
    """What a host sharing one budget among its groups does to each (limit_cache)."""
    h = Harness([make(i, config=CFG) for i in (1, 2, 3)])
    h.fire(1)
    leader = h.engines[1]
    for _ in range(2):
        leader.propose([b"x" * 100] * 10)
        h.run()
    assert leader.log.cache_bytes > 5 * ENTRY
    leader.limit_cache(5 * ENTRY)
    assert leader.log.cache_bytes <= 5 * ENTRY  # at once, not at the next append
    for _ in range(3):
        leader.propose([b"x" * 100] * 10)
        h.run()
        assert leader.log.cache_bytes <= 5 * ENTRY
    leader.limit_cache(10 * CFG.log_cache_bytes)
    assert leader.cache_budget == CFG.log_cache_bytes
    with pytest.raises(InvalidArgument, match="number of bytes"):
        leader.limit_cache(-1)

def test_a_lagging_follower_is_caught_up_through_read_log():
    h, leader = leader_with_lagging_follower()
    cmds = leader.take_commands()
    reads = of(cmds, ReadLog)
    assert reads == [ReadLog(3, 1, leader.log.cache_first, CFG.max_bytes_per_message)]
    assert not [m for to, m in sends(cmds, AppendEntries) if to == 3 and m.entries]
    # one read at a time: a heartbeat while it runs asks for nothing more
    leader.on_timer(Timer.HEARTBEAT)
    assert not of(leader.take_commands(), ReadLog)
    stored = [Entry(leader.log.term_at(i), i, EntryKind.NORMAL, b"x" * 100) for i in range(1, 6)]
    stored[0] = Entry(1, 1, EntryKind.CONFIG, b"")  # (payloads are not compared)
    leader.log_read(3, 1, stored)
    out = [m for to, m in sends(leader.take_commands(), AppendEntries) if to == 3]
    assert out and out[0].prev_log_index == 0 and [e.index for e in out[0].entries] == [1, 2, 3,
                                                                                          4, 5]


def test_a_read_that_no_longer_matches_the_log_is_dropped_and_asked_again():
    h, leader = leader_with_lagging_follower()
    leader.take_commands()
    wrong = [Entry(leader.term + 5, i, EntryKind.NORMAL, b"") for i in range(1, 4)]
    leader.log_read(3, 1, wrong)
    cmds = leader.take_commands()
    assert not [m for to, m in sends(cmds, AppendEntries) if to == 3 and m.entries]
    assert of(cmds, ReadLog) == [ReadLog(3, 1, leader.log.cache_first,
                                         CFG.max_bytes_per_message)]


def test_a_failed_read_is_retried_on_the_next_heartbeat():
    h, leader = leader_with_lagging_follower()
    leader.take_commands()
    leader.log_read_failed(3, 1)
    assert not of(leader.take_commands(), ReadLog)  # no hot loop on a failing disk
    leader.on_timer(Timer.HEARTBEAT)
    assert [r.start for r in of(leader.take_commands(), ReadLog)] == [1]


def test_a_read_never_answered_is_asked_again_after_its_patience():
    h, leader = leader_with_lagging_follower()
    leader.take_commands()
    for _ in range(READ_LOG_PATIENCE):
        leader.on_timer(Timer.HEARTBEAT)
        assert not of(leader.take_commands(), ReadLog)
    leader.on_timer(Timer.HEARTBEAT)
    assert [r.start for r in of(leader.take_commands(), ReadLog)] == [1]


def test_an_answer_for_a_follower_that_moved_on_is_ignored():
    h, leader = leader_with_lagging_follower()
    leader.take_commands()
    leader.step(3, AppendEntriesResponse(leader.term, True, leader.log.last_index))
    leader.take_commands()
    assert leader.progress[3].state == ProgressState.REPLICATE
    leader.log_read(3, 1, [Entry(1, 1, EntryKind.CONFIG, b"")])
    assert not [m for to, m in sends(leader.take_commands(), AppendEntries)
                if to == 3 and m.entries]


def restarted(n_entries, commit, applied, config=CFG):
    entries = [Entry(1, i, EntryKind.NORMAL, b"x" * 100) for i in range(1, n_entries + 1)]
    e = Engine(1, config, random.Random(1), InitialState(
        hard_state=HardState(1, None, commit),
        snapshot_membership=Membership(voters=frozenset({1, 2, 3})),
        applied_index=applied))
    for k in range(0, n_entries, 7):
        e.load_log(entries[k:k + 7])
    return e


def test_a_restart_applies_what_left_memory_from_storage_then_the_rest_from_memory():
    e = restarted(100, commit=90, applied=10)
    first = e.log.cache_first
    assert 10 < first <= 90 and e.log.cache_bytes <= CFG.log_cache_bytes
    cmds = e.start()
    assert of(cmds, ApplyStored) == [ApplyStored(11, first - 1)]
    applies = of(cmds, Apply)
    assert [x.index for x in applies[0].entries] == list(range(first, 91))
    assert cmds.index(of(cmds, ApplyStored)[0]) < cmds.index(applies[0])  # in log order


def test_a_follower_applies_entries_it_stored_before_they_committed_from_storage():
    f = restarted(0, commit=0, applied=0)
    f.start()
    entries = [Entry(1, i, EntryKind.NORMAL, b"x" * 100) for i in range(1, 51)]
    f.step(2, AppendEntries(1, 2, 0, 0, entries, 0))
    f.take_commands()
    f.log_persisted(50, 1)  # durable, not committed: they may leave memory
    assert f.log.cache_first > 1
    f.step(2, AppendEntries(1, 2, 50, 1, [], 50))
    cmds = f.take_commands()
    assert of(cmds, ApplyStored) == [ApplyStored(1, f.log.cache_first - 1)]
    assert of(cmds, Apply)[0].entries[-1].index == 50


def test_retention_keeps_entries_and_bytes_behind_a_snapshot():
    def compacted_to(**retention):
        cfg = Config(pre_vote=False, check_quorum=False, snapshot_trailing_entries=0,
                     **retention)
        e = restarted(0, commit=0, applied=0, config=cfg)
        e.start()
        entries = [Entry(1, i, EntryKind.NORMAL, b"x" * 100_000) for i in range(1, 101)]
        e.step(2, AppendEntries(1, 2, 0, 0, entries, 100))
        e.log_persisted(100, 1)
        e.take_commands()
        e.snapshot_saved(SnapshotMeta(100, 1, Membership(voters=frozenset({1, 2, 3}))), 10)
        return [c.index for c in of(e.take_commands(), CompactLog)]

    assert compacted_to() == [100]
    assert compacted_to(log_retention_entries=30) == [70]
    # 3 MB of 100 kB entries: compaction stops at a mark with at least that much after it
    (index,) = compacted_to(log_retention_bytes=3_000_000)
    assert 60 <= index <= 70
    assert compacted_to(log_retention_entries=10, log_retention_bytes=3_000_000) == [index]
