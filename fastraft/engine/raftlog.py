"""The engine's in-memory view of the log: entries after the last snapshot, and their terms
in the ``LogIndex`` kernel."""
from __future__ import annotations

from collections.abc import Sequence

from fastraft import kernels
from fastraft.errors import SafetyViolation
from fastraft.messages import Entry


class RaftLog:
    __slots__ = ("terms", "entries")

    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0,
                 entries: Sequence[Entry] = ()) -> None:
        self.terms = kernels.LogIndex(snapshot_index, snapshot_term)
        #: entries[k] holds index snapshot_index + 1 + k.
        self.entries: list[Entry] = []
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

    def term_at(self, index: int) -> int:
        return self.terms.term_at(index)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo .. hi - 1`` (both within the live log)."""
        base = self.terms.snapshot_index + 1
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

    def truncate_from(self, index: int) -> None:
        del self.entries[index - self.terms.snapshot_index - 1:]
        self.terms.truncate_from(index)

    def compact_to(self, index: int) -> None:
        """Forget entries up to ``index`` (a snapshot covers them)."""
        del self.entries[:index - self.terms.snapshot_index]
        self.terms.compact_to(index)

    def reset(self, index: int, term: int) -> None:
        """Forget every entry: the log continues after a snapshot at ``index``."""
        self.entries = []
        self.terms.reset(index, term)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a log is at least as up-to-date as ours (compare last term, then length)."""
        mine = self.terms.last_term
        return last_term > mine or (last_term == mine and last_index >= self.terms.last_index)
