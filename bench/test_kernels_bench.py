"""Kernel micro-benchmarks: compiled (_cy), pure Python (_py) and a naive reference, side
by side in one run. ``pytest bench/ --benchmark-only -n 0`` (compare within one run: the machine
is shared and noisy)."""
import pytest

from fastraft import _cy, _py
from fastraft.messages import Entry

IMPLS = {"cy": _cy, "py": _py}


def naive_committed(matches):
    return sorted(matches)[(len(matches) - 1) // 2]  # the textbook sort-and-pick


class NaiveLog:
    def __init__(self):
        self.terms = []

    def append(self, term, count=1):
        self.terms.extend([term] * count)

    def term_at(self, i):
        return self.terms[i - 1] if 0 < i <= len(self.terms) else -1

    def find_conflict(self, first, terms):
        for k, t in enumerate(terms):
            if self.term_at(first + k) != t:
                return first + k
        return 0

    def truncate_from(self, i):
        del self.terms[i - 1:]


@pytest.mark.parametrize("voters", [3, 5, 7])
@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_committed_index(benchmark, impl, voters):
    matches = [1000 + 7 * k for k in range(voters)]
    fn = naive_committed if impl == "naive" else IMPLS[impl].committed_index
    assert fn(matches) == IMPLS["py"].committed_index(matches)
    benchmark(fn, matches)


@pytest.mark.parametrize("voters", [3, 5, 7])
@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_quorum_tracker_committed_index(benchmark, impl, voters):
    """What the engine calls on every acknowledgement: the values live in the tracker,
    so no list is built per call. The naive reference builds one from a dict."""
    ids = list(range(1, voters + 1))
    values = {i: 1000 + 7 * i for i in ids}
    if impl == "naive":
        fn = lambda: naive_committed([values[i] for i in ids])  # noqa: E731
    else:
        tracker = IMPLS[impl].QuorumTracker(ids)
        for i in ids:
            tracker.set(i, values[i])
        fn = tracker.committed_index
    assert fn() == IMPLS["py"].committed_index(list(values.values()))
    benchmark(fn)


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_joint_committed_index(benchmark, impl):
    a, b = [5, 9, 7], [4, 8, 6, 3, 9]
    if impl == "naive":
        benchmark(lambda: min(naive_committed(a), naive_committed(b)))
    else:
        benchmark(IMPLS[impl].joint_committed_index, a, b)


def _log(impl, n=10_000, terms=10):
    log = NaiveLog() if impl == "naive" else IMPLS[impl].LogIndex()
    for t in range(1, terms + 1):
        log.append(t, n // terms)
    return log


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_logindex_append_batch(benchmark, impl):
    def run():
        log = NaiveLog() if impl == "naive" else IMPLS[impl].LogIndex()
        for t in range(1, 101):
            log.append(t, 100)
    benchmark(run)


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_logindex_term_at(benchmark, impl):
    log = _log(impl)
    benchmark(lambda: [log.term_at(i) for i in range(1, 10_001, 7)])


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_logindex_find_conflict(benchmark, impl):
    log = _log(impl)
    incoming = [log.term_at(i) for i in range(9_001, 10_001)] + [11] * 100
    assert log.find_conflict(9_001, incoming) == 10_001
    benchmark(log.find_conflict, 9_001, incoming)


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_logindex_truncate(benchmark, impl):
    def run():
        log = _log(impl)
        log.truncate_from(5_000)
    benchmark(run)


ENTRIES = [Entry(3, i, 0, bytes(100)) for i in range(1, 1001)]


def naive_encode(entries):
    import struct
    out = bytearray(struct.pack("<I", len(entries)))
    for e in entries:
        out += struct.pack("<QQBI", e.term, e.index, e.kind, len(e.data)) + e.data
    return bytes(out)


@pytest.mark.parametrize("impl", ["cy", "py", "naive"])
def test_codec_encode_1000x100B(benchmark, impl):
    fn = naive_encode if impl == "naive" else IMPLS[impl].encode_entries
    assert fn(ENTRIES) == _py.encode_entries(ENTRIES)
    benchmark(fn, ENTRIES)


@pytest.mark.parametrize("impl", ["cy", "py"])
def test_codec_decode_1000x100B(benchmark, impl):
    frame = _py.encode_entries(ENTRIES)
    benchmark(IMPLS[impl].decode_entries, frame)


@pytest.mark.parametrize("impl", ["cy", "py"])
def test_codec_decode_100x64KiB(benchmark, impl):
    frame = _py.encode_entries([Entry(3, i, 0, bytes(65536)) for i in range(1, 101)])
    benchmark(IMPLS[impl].decode_entries, frame)
