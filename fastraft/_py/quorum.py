"""Majority and joint-majority arithmetic (Raft §5.3, §5.4, §6).

An empty configuration commits everything (``MAX_INDEX``) and wins every vote, so a
joint configuration whose outgoing half is empty reduces to the single one by ``min``
with no special case.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

MAX_INDEX = (1 << 63) - 1

VOTE_PENDING = 0
VOTE_WON = 1
VOTE_LOST = 2


def committed_index(match_indexes: Sequence[int]) -> int:
    """The largest index that a majority of ``match_indexes`` has reached (§5.3).

    The caller applies the §5.4.2 rule (only entries of the current term commit by
    counting) to the result.
    """
    n = len(match_indexes)
    if n == 0:
        return MAX_INDEX
    ordered = sorted(match_indexes, reverse=True)
    return ordered[n // 2]


def joint_committed_index(a: Sequence[int], b: Sequence[int]) -> int:
    """Committed index under joint consensus: both majorities must agree (§6)."""
    ca = committed_index(a)
    cb = committed_index(b)
    return ca if ca < cb else cb


def vote_result(votes: Mapping[int, bool], voters: Sequence[int]) -> int:
    """VOTE_WON once a majority of ``voters`` granted, VOTE_LOST once that is impossible."""
    n = len(voters)
    if n == 0:
        return VOTE_WON
    granted = 0
    missing = 0
    for v in voters:
        vote = votes.get(v)
        if vote is None:
            missing += 1
        elif vote:
            granted += 1
    quorum = n // 2 + 1
    if granted >= quorum:
        return VOTE_WON
    if granted + missing >= quorum:
        return VOTE_PENDING
    return VOTE_LOST


def joint_vote_result(votes: Mapping[int, bool], a: Sequence[int], b: Sequence[int]) -> int:
    """Election result under joint consensus: a majority of each configuration (§6)."""
    ra = vote_result(votes, a)
    rb = vote_result(votes, b)
    if ra == rb:
        return ra
    if ra == VOTE_LOST or rb == VOTE_LOST:
        return VOTE_LOST
    return VOTE_PENDING


class QuorumTracker:
    """One value per voter (a match index, or an acknowledged heartbeat sequence) of a
    configuration that may be joint, kept up to date as answers arrive, so the largest
    value a quorum has reached is one call (§5.3; both majorities while joint, §6).

    Values of ids outside the configuration are ignored; every voter starts at 0.
    """

    __slots__ = ("_incoming", "_outgoing", "_values")

    def __init__(self, incoming: Sequence[int], outgoing: Sequence[int] = ()) -> None:
        self._incoming = tuple(incoming)
        self._outgoing = tuple(outgoing)
        self._values = dict.fromkeys(self._incoming + self._outgoing, 0)

    def set(self, node_id: int, value: int) -> None:
        if node_id in self._values:
            self._values[node_id] = value

    def get(self, node_id: int) -> int:
        """The value of a voter (KeyError for a non-voter)."""
        return self._values[node_id]

    def committed_index(self) -> int:
        """The largest value a majority of each configuration has reached."""
        values = self._values
        return joint_committed_index([values[v] for v in self._incoming],
                                     [values[v] for v in self._outgoing])
