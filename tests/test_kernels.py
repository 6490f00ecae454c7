"""The compiled kernels, their pure-Python twins and a naive reference agree exactly."""
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastraft import _py, kernels
from fastraft.errors import DecodeError
from fastraft.messages import MAX_TERM, Entry

_cy = pytest.importorskip("fastraft._cy")

IMPLS = [_py, _cy]
idx = st.integers(min_value=0, max_value=10**12)


# ---------------------------------------------------------------- naive references

def naive_committed(matches):
    if not matches:
        return _py.MAX_INDEX
    best = 0
    for candidate in set(matches):
        if sum(m >= candidate for m in matches) * 2 > len(matches):
            best = max(best, candidate)
    return best


def naive_vote(votes, voters):
    if not voters:
        return _py.VOTE_WON
    yes = sum(1 for v in voters if votes.get(v) is True)
    no = sum(1 for v in voters if votes.get(v) is False)
    if yes * 2 > len(voters):
        return _py.VOTE_WON
    if no * 2 >= len(voters):
        return _py.VOTE_LOST
    return _py.VOTE_PENDING


def test_selected_implementation_matches_environment():
    expect_py = bool(os.environ.get("FASTRAFT_NO_EXTENSIONS"))
    assert kernels.COMPILED is (not expect_py)
    assert kernels.LogIndex is (_py.LogIndex if expect_py else _cy.LogIndex)
    for name in _py.__all__:
        assert hasattr(_cy, name), name
        assert hasattr(kernels, name), name


@given(st.lists(idx, max_size=20))
def test_committed_index(matches):
    expected = naive_committed(matches)
    for impl in IMPLS:
        assert impl.committed_index(matches) == expected
        assert impl.committed_index(tuple(matches)) == expected


@given(st.lists(idx, max_size=9), st.lists(idx, max_size=9))
def test_joint_committed_index_is_min_and_empty_half_is_neutral(a, b):
    expected = min(naive_committed(a), naive_committed(b))
    for impl in IMPLS:
        assert impl.joint_committed_index(a, b) == expected
        assert impl.joint_committed_index(a, []) == impl.committed_index(a)


node_ids = st.integers(min_value=1, max_value=12)


@given(st.lists(node_ids, max_size=7, unique=True), st.lists(node_ids, max_size=7, unique=True),
       st.lists(st.tuples(node_ids, idx), max_size=40))
def test_quorum_tracker_answers_like_the_lists_it_replaces(incoming, outgoing, updates):
    """A voter may sit in both halves (one value); updates to non-voters are ignored."""
    trackers = [impl.QuorumTracker(incoming, outgoing) for impl in IMPLS]
    values = dict.fromkeys(incoming + outgoing, 0)
    for node_id, value in updates:
        if node_id in values:
            values[node_id] = value
        for t in trackers:
            t.set(node_id, value)
        expected = min(naive_committed([values[v] for v in incoming]),
                       naive_committed([values[v] for v in outgoing]))
        assert [t.committed_index() for t in trackers] == [expected, expected]
    for v in values:
        assert [t.get(v) for t in trackers] == [values[v], values[v]]
    for t in trackers:
        with pytest.raises(KeyError):
            t.get(13)


def test_committed_index_examples():
    for impl in IMPLS:
        assert impl.committed_index([5]) == 5
        assert impl.committed_index([5, 3]) == 3
        assert impl.committed_index([5, 3, 1]) == 3
        assert impl.committed_index([9, 7, 5, 3, 1]) == 5
        assert impl.committed_index([9, 7, 5, 3]) == 5


votes_st = st.dictionaries(st.integers(0, 9), st.booleans(), max_size=10)
voters_st = st.lists(st.integers(0, 9), unique=True, max_size=7)


@given(votes_st, voters_st, voters_st)
def test_vote_results(votes, a, b):
    ra, rb = naive_vote(votes, a), naive_vote(votes, b)
    if _py.VOTE_LOST in (ra, rb):
        joint = _py.VOTE_LOST
    elif ra == rb == _py.VOTE_WON:
        joint = _py.VOTE_WON
    else:
        joint = _py.VOTE_PENDING
    for impl in IMPLS:
        assert impl.vote_result(votes, a) == ra
        assert impl.joint_vote_result(votes, a, b) == joint
        assert impl.joint_vote_result(votes, a, []) == ra


# ---------------------------------------------------------------- LogIndex

class NaiveLog:
    """Terms in a plain list: the obviously-correct model."""

    def __init__(self):
        self.snap_index, self.snap_term, self.terms = 0, 0, []

    @property
    def last_index(self):
        return self.snap_index + len(self.terms)

    @property
    def last_term(self):
        return self.terms[-1] if self.terms else self.snap_term

    def term_at(self, i):
        if i == self.snap_index:
            return self.snap_term
        if i < self.snap_index or i > self.last_index:
            return -1
        return self.terms[i - self.snap_index - 1]

    def find_conflict_by_term(self, index, term):
        index = min(index, self.last_index)
        while index > self.snap_index and self.term_at(index) > term:
            index -= 1
        return max(index, self.snap_index)

    def find_conflict(self, first, terms):
        for k, t in enumerate(terms):
            i = first + k
            if i > self.snap_index and self.term_at(i) != t:
                return i
        return 0


ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("truncate"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("compact"), st.integers(0, 40), st.just(0)),
    st.tuples(st.just("reset"), st.integers(0, 40), st.integers(0, 3)),
), max_size=30)


@given(ops, st.integers(0, 45), st.integers(0, 12))
def test_logindex_matches_naive_model(operations, probe_index, probe_term):
    model = NaiveLog()
    logs = [impl.LogIndex() for impl in IMPLS]
    for op, a, b in operations:
        if op == "append":
            term = model.last_term + a
            model.terms.extend([term] * b)
            for log in logs:
                log.append(term, b)
        elif op == "truncate":
            if a <= model.snap_index:
                for log in logs:
                    with pytest.raises(ValueError):
                        log.truncate_from(a)
                continue
            del model.terms[max(0, a - model.snap_index - 1):]
            for log in logs:
                log.truncate_from(a)
        elif op == "compact":
            if a > model.last_index:
                for log in logs:
                    with pytest.raises(ValueError):
                        log.compact_to(a)
                continue
            if a > model.snap_index:
                model.snap_term = model.term_at(a)
                del model.terms[:a - model.snap_index]
                model.snap_index = a
            for log in logs:
                log.compact_to(a)
        else:
            term = max(b, model.last_term)
            model.snap_index, model.snap_term, model.terms = a, term, []
            for log in logs:
                log.reset(a, term)
        for log in logs:
            assert (log.snapshot_index, log.snapshot_term) == (model.snap_index, model.snap_term)
            assert (log.last_index, log.last_term, len(log)) == (
                model.last_index, model.last_term, len(model.terms))
    for log in logs:
        for i in range(model.snap_index - 1, model.last_index + 3):
            assert log.term_at(i) == model.term_at(i), i
        assert log.find_conflict_by_term(probe_index, probe_term) == \
            model.find_conflict_by_term(probe_index, probe_term)
        incoming = [model.term_at(i) if i <= model.last_index else model.last_term + 1
                    for i in range(model.snap_index + 1, model.last_index + 3)]
        if probe_index < len(incoming):
            incoming[probe_index] += 1
            incoming[probe_index + 1:] = [incoming[probe_index]] * len(incoming[probe_index + 1:])
        assert log.find_conflict(model.snap_index + 1, incoming) == \
            model.find_conflict(model.snap_index + 1, incoming)


def test_logindex_rejects_decreasing_terms():
    for impl in IMPLS:
        log = impl.LogIndex(5, 3)
        with pytest.raises(ValueError):
            log.append(2)
        log.append(3, 2)
        assert log.term_at(5) == 3 and log.term_at(7) == 3 and log.term_at(8) == -1


# ---------------------------------------------------------------- codec

entries_st = st.lists(
    st.builds(Entry, st.integers(0, MAX_TERM), st.integers(0, MAX_TERM), st.integers(0, 2),
              st.one_of(st.binary(max_size=300), st.binary(min_size=500, max_size=700))),
    max_size=30)


@st.composite
def batches_st(draw):
    """Entries as a log holds them: consecutive indexes from anywhere, terms that never
    decrease, each within MAX_TERM."""
    raw = draw(entries_st)
    first = draw(st.integers(0, MAX_TERM - len(raw)))
    terms = sorted(e.term for e in raw)
    return [Entry(t, first + k, e.kind, e.data) for k, (t, e) in enumerate(zip(terms, raw))]


@given(batches_st())
def test_codec_round_trips_across_implementations(entries):
    frames = [impl.encode_entries(entries) for impl in IMPLS]
    assert frames[0] == frames[1]  # wire-identical
    for impl in IMPLS:
        decoded = impl.decode_entries(frames[0])
        assert [(e.term, e.index, e.kind, bytes(e.data)) for e in decoded] == \
            [(e.term, e.index, e.kind, bytes(e.data)) for e in entries]
        # large payloads are views into the frame, not copies; small ones are bytes
        assert all(isinstance(e.data, memoryview if len(e.data) >= _py.codec.VIEW_THRESHOLD
                              else bytes) for e in decoded)
    for impl in IMPLS:
        made = impl.make_entries(7, 100, 2, [e.data for e in entries])
        assert [(e.term, e.index, e.kind, e.data) for e in made] == \
            [(7, 100 + k, 2, e.data) for k, e in enumerate(entries)]
        assert impl.count_within_bytes(entries, 200) == _naive_count(entries, 200)
        assert impl.payload_bytes(entries) == sum(len(e.data) for e in entries)
        assert impl.index_of_kind(entries, 1) == next(
            (k for k, e in enumerate(entries) if e.kind == 1), -1)
        assert impl.index_not_of_kind(entries, 0) == next(
            (k for k, e in enumerate(entries) if e.kind != 0), -1)


class LookAlike:
    """Not an Entry, with an Entry's fields (what the kernels' docstrings ask for)."""
    __slots__ = ("term", "index", "kind", "data")

    def __init__(self, e):
        self.term, self.index, self.kind, self.data = e.term, e.index, e.kind, e.data


@given(batches_st())
def test_kernels_read_other_objects_with_an_entrys_fields_alike(entries):
    """The compiled kernels read an Entry's fields from its slots; anything else goes
    through getattr, with the same answers."""
    alike = [LookAlike(e) for e in entries]
    prev = entries[0].index - 1 if entries else 0
    for impl in IMPLS:
        assert impl.encode_entries(alike) == impl.encode_entries(entries)
        assert impl.payload_bytes(alike) == impl.payload_bytes(entries)
        assert impl.count_within_bytes(alike, 200) == impl.count_within_bytes(entries, 200)
        for kind in range(4):
            assert impl.index_of_kind(alike, kind) == impl.index_of_kind(entries, kind)
            assert impl.index_not_of_kind(alike, kind) == impl.index_not_of_kind(entries, kind)
        assert impl.entries_follow(alike, prev, 0, MAX_TERM) == \
            impl.entries_follow(entries, prev, 0, MAX_TERM) == -1


class Bytes(bytes):
    pass


payloads_st = st.lists(st.one_of(
    st.binary(max_size=12), st.binary(max_size=12).map(bytearray),
    st.binary(max_size=12).map(Bytes), st.integers(), st.text(max_size=3), st.none()),
    max_size=8)


@given(payloads_st, st.integers(min_value=0, max_value=14))
def test_first_unfit_payload_matches_a_naive_check(datas, limit):
    """Only ``bytes`` itself, within the limit, fits (a subclass or a buffer is copied
    into bytes by the node first)."""
    naive = next((k for k, d in enumerate(datas)
                  if type(d) is not bytes or len(d) > limit), -1)
    for impl in IMPLS:
        assert impl.first_unfit_payload(datas, limit) == naive
        assert impl.first_unfit_payload(tuple(datas), limit) == naive


@pytest.mark.parametrize("entries", [
    [Entry(1, 5, 0, b""), Entry(1, 7, 0, b"")], [Entry(1, 5, 0, b""), Entry(1, 5, 0, b"")],
    [Entry(2, 5, 0, b""), Entry(1, 6, 0, b"")]], ids=["gap", "repeat", "term-decreases"])
def test_codec_refuses_batches_that_no_log_holds(entries):
    frame = _py.encode_entries(entries)
    for impl in IMPLS:
        with pytest.raises(DecodeError, match="not consecutive"):
            impl.decode_entries(frame)


@pytest.mark.parametrize("term, index", [(MAX_TERM + 1, 1), (1, MAX_TERM + 1),
                                          (2**64 - 1, 1), (1, 2**63)])
def test_codec_refuses_terms_and_indexes_beyond_max_term(term, index):
    """A peer cannot smuggle in a term or index a node could not increment."""
    frame = _py.encode_entries([Entry(1, 1, 0, b"x")])
    forged = frame[:4] + term.to_bytes(8, "little") + index.to_bytes(8, "little") + frame[20:]
    for impl in IMPLS:
        with pytest.raises(DecodeError, match="out-of-range"):
            impl.decode_entries(forged)


@given(entries_st, st.integers(0, 40), st.integers(0, 3), st.data())
def test_entries_follow_matches_a_naive_check(entries, prev, prev_term, data):
    entries = [Entry(min(e.term, 5), e.index, e.kind, e.data) for e in entries]
    if entries and data.draw(st.booleans()):  # mostly well-formed batches
        entries = [Entry(max(prev_term, e.term), prev + 1 + k, e.kind, b"")
                   for k, e in enumerate(sorted(entries, key=lambda e: e.term))]
    expected, last = -1, prev_term
    for k, e in enumerate(entries):
        if e.index != prev + 1 + k or e.term < last or e.term > 4 or e.kind > 2:
            expected = k
            break
        last = e.term
    for impl in IMPLS:
        assert impl.entries_follow(entries, prev, prev_term, 4) == expected


def _naive_count(entries, budget):
    n, total = 0, 0
    for e in entries:
        total += len(e.data)
        if total > budget and n:
            break
        n += 1
    return n


@given(entries_st.filter(bool), st.data())
def test_codec_rejects_truncation_and_trailing_bytes(entries, data):
    frame = _py.encode_entries(entries)
    cut = data.draw(st.integers(0, len(frame) - 1))
    for impl in IMPLS:
        with pytest.raises(DecodeError):
            impl.decode_entries(frame[:cut])
        with pytest.raises(DecodeError):
            impl.decode_entries(frame + b"\0")


@given(st.binary(max_size=200))
def test_codec_never_crashes_on_garbage(garbage):
    outcomes = []
    for impl in IMPLS:
        try:
            outcomes.append([(e.term, e.index, e.kind, bytes(e.data))
                             for e in impl.decode_entries(garbage)])
        except DecodeError as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


def test_codec_rejects_unknown_kind_and_huge_count():
    frame = bytearray(_py.encode_entries([Entry(1, 1, 0, b"x")]))
    frame[4 + 16] = 7
    huge = (10**9).to_bytes(4, "little") + b"\0" * 30
    for impl in IMPLS:
        with pytest.raises(DecodeError, match="kind"):
            impl.decode_entries(bytes(frame))
        with pytest.raises(DecodeError, match="claims"):
            impl.decode_entries(huge)
