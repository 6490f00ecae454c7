"""The engine's in-memory view of the log: the terms of every entry after the last
snapshot (the ``LogIndex`` kernel: runs of equal terms, not entries), and the payloads of
a recent suffix only, bounded in bytes. Entries before that suffix are durable and are
read back from storage when needed (``ReadLog``, ``ApplyStored``)."""
from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Sequence

from fastraft import kernels
from fastraft.errors import SafetyViolation
from fastraft.messages import Entry

#: What an ``Entry`` costs in memory beyond its payload (the struct and the bytes object's
#: header), counted so a log of small entries is bounded as honestly as one of large ones.
ENTRY_OVERHEAD = 112
#: Spacing, in payload bytes, of the marks that measure the log's size for retention.
MARK_BYTES = 1 << 20


class RaftLog:
    __slots__ = ("terms", "entries", "cache_bytes", "total_bytes", "_mark_index",
                 "_mark_total")

    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0,
                 entries: Sequence[Entry] = ()) -> None:
        self.terms = kernels.LogIndex(snapshot_index, snapshot_term)
        #: The cached suffix of the log: entries[k] holds index cache_first + k, and the
        #: last one is always the last entry of the log.
        self.entries: list[Entry] = []
        #: Memory the cached entries hold (payloads plus ``ENTRY_OVERHEAD`` each).
        self.cache_bytes = 0
        #: Payload bytes appended since the log began (truncations subtract), and marks
        #: (index, total_bytes after it) every ``MARK_BYTES``: sizes for retention,
        #: without keeping a size per entry.
        self.total_bytes = 0
        self._mark_index = array("q")
        self._mark_total = array("q")
        if entries:
            self.append(list(entries))

    @property
    def snapshot_index(self) -> int:
        return self.terms.snapshot_index

    @property
    def last_index(self) -> int:
        return self.terms.last_index

    @property
    def last_term(self) -> int:
        return self.terms.last_term

    @property
    def cache_first(self) -> int:
        """Index of the first entry held in memory (``last_index + 1`` when none is)."""
        return self.terms.last_index + 1 - len(self.entries)

    def term_at(self, index: int) -> int:
        return self.terms.term_at(index)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo .. hi - 1``, which must be cached (``lo >= cache_first``)."""
        base = self.cache_first
        if lo < base:
            raise SafetyViolation(f"entries from {lo} asked of a cache that starts at {base}")
        return self.entries[lo - base:hi - base]

    def append(self, entries: list[Entry]) -> None:
        """Append entries that follow the last one, consecutive and with terms not
        decreasing. Checked at the ends only: peers are trusted not to lie (Raft is not
        Byzantine-tolerant), this only catches a garbled batch."""
        first, last = entries[0], entries[-1]
        expected = self.terms.last_index + 1
        if first.index != expected or last.index != expected + len(entries) - 1:
            raise SafetyViolation(
                f"log append of {first.index}..{last.index} does not follow {expected - 1}")
        if first.term == last.term:
            self.terms.append(first.term, len(entries))
        else:
            self.terms.extend([e.term for e in entries])
        self.entries.extend(entries)
        size = kernels.payload_bytes(entries)
        self.cache_bytes += size + ENTRY_OVERHEAD * len(entries)
        self.total_bytes += size
        marks = self._mark_total
        if self.total_bytes - (marks[-1] if marks else 0) >= MARK_BYTES:
            if size > MARK_BYTES:
                self._mark_within(entries, self.total_bytes - size)
            self._mark_index.append(last.index)
            marks.append(self.total_bytes)

    def _mark_within(self, entries: list[Entry], total: int) -> None:
        """Marks inside a batch of more than ``MARK_BYTES``, about that far apart."""
        pos = 0
        while True:
            rest = entries[pos:]
            n = kernels.count_within_bytes(rest, MARK_BYTES)
            if n >= len(rest):
                return
            total += kernels.payload_bytes(rest[:n])
            pos += n
            self._mark_index.append(entries[pos - 1].index)
            self._mark_total.append(total)

    def retained_from(self, retention_bytes: int) -> int:
        """The highest index the log may be compacted to while keeping at least
        ``retention_bytes`` of payload after it (to the nearest mark, erring on keeping)."""
        pos = bisect_right(self._mark_total, self.total_bytes - retention_bytes) - 1
        return self._mark_index[pos] if pos >= 0 else self.terms.snapshot_index

    def evict(self, upto: int, budget: int) -> None:
        """Let cached entries up to ``upto`` (durable ones) go, oldest first, until the
        cache holds at most seven eighths of ``budget`` bytes: the slack makes eviction
        happen once per many appends rather than on each, and small enough that freeing
        one slice of it is a short pause."""
        target = budget - budget // 8
        while self.cache_bytes > target:
            available = min(upto - self.cache_first + 1, len(self.entries))
            if available <= 0:
                return
            # Entries of the average size: exact for a log of one entry size, and the
            # loop makes up for the estimate otherwise.
            average = self.cache_bytes / len(self.entries)
            self._drop_front(min(max(int((self.cache_bytes - target) / average) + 1, 1),
                                 available))

    def _drop_front(self, n: int) -> None:
        gone = self.entries[:n]
        del self.entries[:n]
        self.cache_bytes -= kernels.payload_bytes(gone) + ENTRY_OVERHEAD * n

    def truncate_from(self, index: int) -> None:
        # Only entries above the commit index are ever cut, and those are all cached.
        keep = max(index - self.cache_first, 0)
        if keep < len(self.entries):
            gone = self.entries[keep:]
            del self.entries[keep:]
            size = kernels.payload_bytes(gone)
            self.cache_bytes -= size + ENTRY_OVERHEAD * len(gone)
            self.total_bytes -= size
        pos = bisect_right(self._mark_index, index - 1)
        del self._mark_index[pos:]
        del self._mark_total[pos:]
        self.terms.truncate_from(index)

    def compact_to(self, index: int) -> None:
        """Forget entries up to ``index`` (a snapshot covers them)."""
        n = min(index - self.cache_first + 1, len(self.entries))
        if n > 0:
            self._drop_front(n)
        pos = bisect_right(self._mark_index, index)
        del self._mark_index[:pos]
        del self._mark_total[:pos]
        self.terms.compact_to(index)

    def reset(self, index: int, term: int) -> None:
        """Forget every entry: the log continues after a snapshot at ``index``."""
        self.entries = []
        self.cache_bytes = 0
        del self._mark_index[:]
        del self._mark_total[:]
        self.terms.reset(index, term)

    def matches(self, entries: list[Entry]) -> bool:
        """Whether ``entries`` (read back from storage) are this log's entries at their
        indexes: consecutive, and each with the term the log has there."""
        if not entries or entries[-1].index > self.terms.last_index or \
                entries[0].index <= self.terms.snapshot_index:
            return False
        first = entries[0]
        if kernels.entries_follow(entries, first.index - 1, -1, entries[-1].term) != -1:
            return False
        return self.terms.find_conflict(first.index, [e.term for e in entries]) == 0

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a log is at least as up-to-date as ours (compare last term, then length)."""
        mine = self.terms.last_term
        return last_term > mine or (last_term == mine and last_index >= self.terms.last_index)
