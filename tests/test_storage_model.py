"""FileStorage and SharedWAL against MemoryStorage, the model: any sequence of the writes a
node issues (appends in new terms, cuts of a suffix, snapshots of its own and installed
from a leader, compactions behind them, hard states), with the store closed and opened
again anywhere, leaves each the same log, hard state and snapshot as the model. The
conformance suite checks chosen sequences; this one lets Hypothesis choose them, with
segments small enough that records and snapshots cross segment boundaries, and (on a
shared WAL) three groups interleaved so that segments are freed and groups relocated."""
import asyncio
import io
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fastraft.filestorage import FileStorage
from fastraft.messages import Entry, EntryKind, HardState, Membership, SnapshotMeta
from fastraft.sharedwal import SharedWAL
from fastraft.storage import MemoryStorage
from fastraft.testing.storage_suite import _do

MEMBERSHIP = Membership(voters=frozenset({1, 2, 3}))
groups = st.integers(0, 2)  # an index into the class's GROUPS


def plain(entries):
    return [(e.term, e.index, int(e.kind), bytes(e.data)) for e in entries]


class StoreAgainstModel(RuleBasedStateMachine):
    GROUPS: tuple[int, ...] = (1,)

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="fastraft-model-")
        self.loop = asyncio.new_event_loop()
        self.model = {g: MemoryStorage() for g in self.GROUPS}
        self.open()

    def open(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def store(self, group):
        raise NotImplementedError

    def teardown(self):
        self.close()
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def group_of(self, drawn):
        """The group a rule's drawn index (``groups``) names."""
        return self.GROUPS[drawn % len(self.GROUPS)]

    def run(self, group, method, *args):
        """Call ``method`` of the store under test, inside the event loop."""
        async def call():
            return await _do(getattr(self.store(group), method)(*args))
        return self.loop.run_until_complete(call())

    def both(self, group, method, *args):
        """Call ``method`` on the model and on the store under test."""
        getattr(self.model[group], method)(*args)
        if method == "save_snapshot":  # a stream is read once
            args = (args[0], io.BytesIO(args[1].getvalue()))
        self.run(group, method, *args)

    def last_term(self, group):
        m = self.model[group]
        st_ = m.load_state()
        if st_.last_index >= st_.first_index:
            return m.read_entries(st_.last_index, st_.last_index + 1)[0].term
        return st_.snapshot.last_included_term if st_.snapshot else 0

    def raise_term(self, group, term):
        """The node's term is never below its log's (it votes or learns of a leader
        first)."""
        hs = self.model[group].hard_state
        if hs.current_term < term:
            self.both(group, "save_hard_state", HardState(term, None, 0))

    # ------------------------------------------------------------------ the writes

    @rule(group=groups, count=st.integers(1, 6), new_term=st.booleans(),
          size=st.one_of(st.integers(0, 16), st.integers(100, 600)))
    def append(self, group, count, new_term, size):
        self.append_to(self.group_of(group), count, new_term, size)

    def append_to(self, group, count, new_term, size):
        term = max(1, self.last_term(group) + new_term, self.model[group].hard_state.current_term
                   if new_term else 0)
        self.raise_term(group, term)
        first = self.model[group].load_state().last_index + 1
        self.both(group, "append_entries",
                  [Entry(term, i, EntryKind.NORMAL, b"%d:" % i + b"p" * size)
                   for i in range(first, first + count)])

    @rule(group=groups, data=st.data())
    def truncate(self, group, data):
        """A new leader's entries conflict from ``index`` on (never a compacted one)."""
        group = self.group_of(group)
        st_ = self.model[group].load_state()
        if st_.last_index < st_.first_index:
            return
        index = data.draw(st.integers(st_.first_index, st_.last_index + 1))
        self.both(group, "truncate_suffix", index)

    @rule(group=groups, data=st.data(), size=st.integers(0, 700), crash=st.booleans())
    def own_snapshot(self, group, data, size, crash):
        """The state machine's snapshot at an entry of the log, newer than the last one,
        and a compaction behind it (``Config.snapshot_trailing_entries`` kept or not);
        ``crash``: the process stops between the two."""
        group = self.group_of(group)
        m = self.model[group]
        st_ = m.load_state()
        lowest = max(st_.first_index, st_.snapshot.last_included_index + 1 if st_.snapshot
                     else 1)
        if st_.last_index < lowest:
            return
        index = data.draw(st.integers(lowest, st_.last_index))
        term = m.read_entries(index, index + 1)[0].term
        self.both(group, "save_snapshot", SnapshotMeta(index, term, MEMBERSHIP),
                  io.BytesIO(b"own %d " % index + b"s" * size))
        if crash:
            self.reopen()
            return
        self.both(group, "compact_prefix", data.draw(st.integers(st_.first_index - 1, index)))

    @rule(group=groups, past=st.integers(-4, 12), matching=st.booleans(),
          size=st.integers(0, 700), crash=st.booleans())
    def installed_snapshot(self, group, past, matching, size, crash):
        """A leader's snapshot ``past`` entries beyond this log's end (or before it), as
        the engine stores it (§7): one whose last entry the log holds with its term keeps
        the log after it (compacted behind it); any other replaces the log, the entries
        after a disagreeing one cut before the save, the rest after it. ``crash``: the
        process stops right after the save."""
        group = self.group_of(group)
        m = self.model[group]
        st_ = m.load_state()
        index = st_.last_index + past
        if index < st_.first_index or st_.snapshot and \
                index <= st_.snapshot.last_included_index:
            return
        held = index <= st_.last_index
        if matching and held:
            term = m.read_entries(index, index + 1)[0].term
        else:
            term = max(self.last_term(group), m.hard_state.current_term) + 1
            self.raise_term(group, term)
            if held:
                self.both(group, "truncate_suffix", index + 1)
        self.both(group, "save_snapshot", SnapshotMeta(index, term, MEMBERSHIP),
                  io.BytesIO(b"installed %d " % index + b"i" * size))
        if crash:
            self.reopen()
            return
        if matching and held:
            self.both(group, "compact_prefix", index)
        elif st_.last_index >= st_.first_index:
            self.both(group, "truncate_suffix", st_.first_index)

    @rule(group=groups, new_term=st.booleans(), vote=st.sampled_from([None, 1, 2, 3]))
    def hard_state(self, group, new_term, vote):
        group = self.group_of(group)
        hs = self.model[group].hard_state
        term = hs.current_term + new_term
        if not new_term and hs.voted_for is not None:
            vote = hs.voted_for  # one vote a term (§5.2)
        self.both(group, "save_hard_state", HardState(term, vote, 0))

    @rule()
    def reopen(self):
        self.close()
        self.open()

    # ------------------------------------------------------------------ the check

    @invariant()
    def same_as_the_model(self):
        for group in self.GROUPS:
            model = self.model[group]
            expected, got = model.load_state(), self.run(group, "load_state")
            assert got.hard_state == expected.hard_state, (group, got, expected)
            assert got.snapshot == expected.snapshot, (group, got, expected)
            assert (got.first_index, got.last_index) == \
                (expected.first_index, expected.last_index), (group, got, expected)
            hi = expected.last_index + 1
            assert plain(self.run(group, "read_entries", got.first_index, hi)) == \
                plain(model.read_entries(expected.first_index, hi)), group
            loaded = self.run(group, "load_snapshot")
            if expected.snapshot is None:
                assert loaded is None, group
                continue
            with loaded[1] as reader:
                assert reader.read() == model.load_snapshot()[1].read(), group


class FileStorageAgainstModel(StoreAgainstModel):
    def open(self):
        self.fs = FileStorage(self.directory, segment_bytes=400, sync=False,
                              cache_bytes=300)

    def close(self):
        self.fs.close()

    def store(self, group):
        return self.fs


class SharedWALAgainstModel(StoreAgainstModel):
    GROUPS = (1, 2, 3)

    def open(self):
        # a log of at most 250 bytes is small enough to be written again at the tail
        self.wal = SharedWAL(self.directory, segment_bytes=2000, sync=False,
                             cache_bytes=300, max_segments=2)

    @rule(group=groups)
    def busy_round(self, group):
        """A busy group fills a segment, snapshots and compacts its whole log: the
        segments behind it go, and the idle groups holding the oldest move."""
        group = self.group_of(group)
        self.append_to(group, 4, False, 600)
        last = self.model[group].load_state().last_index
        term = self.model[group].read_entries(last, last + 1)[0].term
        self.both(group, "save_snapshot", SnapshotMeta(last, term, MEMBERSHIP),
                  io.BytesIO(b"busy %d" % last))
        self.both(group, "compact_prefix", last)

    def close(self):
        self.wal.close()

    def store(self, group):
        return self.wal.group(group)


TestFileStorageAgainstModel = FileStorageAgainstModel.TestCase
TestFileStorageAgainstModel.settings = settings(max_examples=60, stateful_step_count=40,
                                                deadline=None)
# more runs: a group moves only once a busy one has filled and freed segments
TestSharedWALAgainstModel = SharedWALAgainstModel.TestCase
TestSharedWALAgainstModel.settings = settings(max_examples=200, stateful_step_count=40,
                                              deadline=None)
