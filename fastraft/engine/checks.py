"""What a node refuses to act on. Input from the network is untrusted.

``refusal`` runs before a message may change anything (term, vote, leader, log). It
returns why the message is refused, or None. Two kinds of refusal:

- from a *stranger*: an id in no configuration this node knows (the one in force and the
  earlier ones still in its log). Such a node may still lead this one, or need its vote,
  when this one is behind a membership change (thesis §4.1: a server votes for a
  candidate not in its configuration, and follows such a leader): its AppendEntries,
  snapshots and vote requests are accepted once no live leader is known (no leader heard
  from for election_timeout_min), never while one is; once followed, that leader is
  heard like a member.
  A node with no configuration yet (started empty, to be added as a learner) accepts the
  leader that contacts it. A leader hears the vote requests of a node its configuration
  names as removed (``Membership.removed``), to tell it so (``Removed``), and nothing more.
- *malformed*: out-of-range numbers (a term or index above ``MAX_TERM``), a sender that
  claims to be someone else (``leader_id`` / ``candidate_id`` not the sender), entries
  that do not follow ``prev_log_index`` one by one with non-decreasing terms no newer than
  the message's, a second leader in a term whose leader this node knows (impossible in
  Raft, §5.2: election safety), an acknowledgement of entries the leader never had.

Raft is not Byzantine-tolerant: an authenticated member can still lie within these
bounds. These checks keep outsiders out and make garbled input harmless (docs/security.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastraft import kernels
from fastraft.engine.commands import Role
from fastraft.messages import (
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    EntryBatch,
    InstallSnapshot,
    Removed,
    RequestVote,
    TimeoutNow,
)

if TYPE_CHECKING:
    from fastraft.engine.core import Engine

STRANGER = "stranger"
MALFORMED = "malformed"


def refusal(engine: Engine, frm: int, m: Any) -> tuple[str, str] | None:
    """(kind, reason) if ``m`` from ``frm`` must be dropped unread, else None."""
    t = type(m)
    known = engine.known_ids
    if known and frm not in known and frm != engine.leader_id and not (
            (t is AppendEntries or t is InstallSnapshot or t is RequestVote or t is Removed)
            and engine.role != Role.LEADER and not engine.leader_alive) and not (
            t is RequestVote and engine.role == Role.LEADER
            and frm in engine.membership.removed):
        # A node added after the configurations in this node's log may lead it, or need
        # its vote to win (this node is behind; §4.1): accepted only once no live leader
        # is known, as any vote is (§4.2.3); a leader is then followed like any other.
        # A leader hears a removed node's vote requests, to tell it it is out.
        return STRANGER, f"node {frm} is in no configuration this node knows"
    term = m.term
    if type(term) is not int or not 0 <= term <= MAX_TERM:
        return MALFORMED, f"term {term!r} is out of range"
    if t is AppendEntries or t is InstallSnapshot or t is Removed:
        if m.leader_id != frm:
            return MALFORMED, f"node {frm} sent a {t.__name__} as node {m.leader_id}"
        if term == engine.term and engine.role == Role.LEADER:
            return MALFORMED, f"node {frm} claims to lead term {term}, which this node leads"
        if term == engine.term and engine.leader_id not in (None, frm):
            return MALFORMED, (f"node {frm} claims to lead term {term}, which node "
                               f"{engine.leader_id} leads")
        if t is AppendEntries:
            return _append_entries(m)
        if t is Removed:
            if m.commit < m.index:
                return MALFORMED, f"commit {m.commit} before the configuration at {m.index}"
        elif t is InstallSnapshot:
            meta = m.meta
            if meta.last_included_term > term or not meta.membership.voters:
                return MALFORMED, "snapshot metadata is inconsistent with the message"
    elif t is RequestVote:
        if m.candidate_id != frm:
            return MALFORMED, f"node {frm} asked for votes for node {m.candidate_id}"
        if m.last_log_term > term:
            return MALFORMED, f"a candidate of term {term} with a log of term {m.last_log_term}"
    elif t is AppendEntriesResponse:
        if m.success and m.index > engine.log.last_index and term == engine.term \
                and engine.role == Role.LEADER:
            return MALFORMED, (f"acknowledges index {m.index}; this leader's log ends at "
                               f"{engine.log.last_index}")
        if not m.success and m.hint_index > m.index:
            return MALFORMED, f"hint {m.hint_index} beyond the rejected index {m.index}"
    elif t is TimeoutNow and m.leader_id != frm:
        return MALFORMED, f"node {frm} sent a TimeoutNow as node {m.leader_id}"
    return None


def _append_entries(m: AppendEntries) -> tuple[str, str] | None:
    if m.prev_log_term > m.term:
        return MALFORMED, f"prev_log_term {m.prev_log_term} is newer than the term {m.term}"
    entries = m.entries
    if entries:
        if type(entries) is EntryBatch:  # shaped by the codec: its ends are what is left
            first, last = entries[0], entries[-1]
            bad = -1 if (first.index == m.prev_log_index + 1
                         and first.term >= m.prev_log_term and last.term <= m.term) else 0
        else:
            bad = kernels.entries_follow(entries, m.prev_log_index, m.prev_log_term, m.term)
        if bad >= 0:
            e = entries[bad]
            return MALFORMED, (f"entry {bad} (index {e.index!r}, term {e.term!r}, kind "
                               f"{e.kind!r}) does not follow prev_log_index "
                               f"{m.prev_log_index} of term {m.prev_log_term}")
    return None
