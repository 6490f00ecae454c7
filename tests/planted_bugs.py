"""Bugs planted one at a time into the engine (by monkeypatching), each one a classic way
to get Raft wrong. ``tests/test_simulator.py`` checks that the simulator alone reports
every one of them."""
from fastraft import kernels
from fastraft.engine import Engine, Role, Send
from fastraft.engine.core import _HANDLERS, _PendingRead
from fastraft.engine.raftlog import RaftLog
from fastraft.messages import AppendEntries, AppendEntriesResponse, RequestVote


def figure_8_commit_rule(mp):
    """§5.4.2: commit any entry a majority holds, whatever its term."""
    def commit_any_term(self):
        c = self._match.committed_index()
        if c > self.commit_index:
            self.commit_index = c
            self._emit_apply()
            self._broadcast = True
            self._on_config_committed()
    mp.setattr(Engine, "_maybe_commit", commit_any_term)


def commit_beyond_last_new_entry(mp):
    """Figure 2, AppendEntries 5: commit up to the end of the log, not only up to the last
    entry this message vouched for."""
    original = Engine._on_append_entries

    def commit_to_the_end(self, frm, m):
        original(self, frm, m)
        if self.role == Role.FOLLOWER and self.leader_id == m.leader_id:
            commit = min(m.leader_commit, self.log.last_index)
            if commit > self.commit_index:
                self.commit_index = commit
                self._emit_apply()
    mp.setitem(_HANDLERS, AppendEntries, commit_to_the_end)


def vote_without_up_to_date_check(mp):
    """§5.4.1: grant votes whatever the candidate's log."""
    mp.setattr(RaftLog, "is_up_to_date", lambda self, last_index, last_term: True)


def second_vote_in_a_term(mp):
    """Figure 2, RequestVote 2: forget the vote already cast in this term."""
    original = Engine._on_request_vote

    def vote_again(self, frm, m):
        if m.term == self.term and not m.pre_vote:
            self.voted_for = None
        original(self, frm, m)
    mp.setitem(_HANDLERS, RequestVote, vote_again)


def prev_log_term_not_compared(mp):
    """§5.3: accept entries after any entry at prev_log_index, whatever its term."""
    original = Engine._on_append_entries

    def trust_prev_index(self, frm, m):
        if self.log.snapshot_index <= m.prev_log_index <= self.log.last_index:
            m.prev_log_term = self.log.term_at(m.prev_log_index)
        original(self, frm, m)
    mp.setitem(_HANDLERS, AppendEntries, trust_prev_index)


def learners_counted_in_the_quorum(mp):
    """Thesis §4.2.1: learners (non-voting members) do not count towards commitment."""
    original = Engine._refresh_voters

    def count_learners(self):
        original(self)
        with_learners = tuple(sorted(self.membership.voters | self.membership.learners))
        self._match = kernels.QuorumTracker(with_learners, self._voters_out)
    mp.setattr(Engine, "_refresh_voters", count_learners)


def read_index_without_a_quorum_round(mp):
    """Thesis §6.4: a leader must hear from a quorum after a read arrives before serving
    it; this one answers from its commit index at once."""
    def answer_at_once(self, request_id, origin):
        if self.log.term_at(self.commit_index) != self.term:
            self._reads_before_commit.append((request_id, origin))
            return
        self._reads.append(_PendingRead(0, self.commit_index, request_id, origin))
        self._confirm_reads()
    mp.setattr(Engine, "_leader_read", answer_at_once)


def lease_kept_after_a_handover(mp):
    """Thesis §3.10 and §6.4.1: a leader that sent TimeoutNow goes on serving lease
    reads, though its successor's election skips the followers' promise the lease rests
    on."""
    original = Engine._send_timeout_now

    def send_keeping_the_lease(self, target):
        forfeited = self.lease_forfeited
        original(self, target)
        self.lease_forfeited = forfeited
    mp.setattr(Engine, "_send_timeout_now", send_keeping_the_lease)


def repaired_node_votes(mp):
    """Thesis §11.7 (docs/storage.md, "Repairing a node"): a node whose damaged log was
    repaired may have lost entries it acknowledged; this one votes and campaigns at
    once, as if nothing was lost."""
    original = Engine.__init__

    def forget_the_damage(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.recovering = False
    mp.setattr(Engine, "__init__", forget_the_damage)


def restarted_node_votes_at_once(mp):
    """Thesis §4.2.3 and §6.4.1: a node restarted just after it answered a leader votes
    at once, breaking the promise that leader's read lease counted on."""
    original = Engine.start

    def start_forgetting_the_promise(self):
        commands = original(self)
        self.leader_alive = False
        return commands
    mp.setattr(Engine, "start", start_forgetting_the_promise)


def removed_voter_never_campaigns(mp):
    """Thesis §4.1: a voter removed by a C_new it holds uncommitted may be the only node
    able to win (the others, in C_old,new, need its vote and it refuses them); this one
    never campaigns once C_new leaves it out."""
    mp.setattr(Engine, "removal_pending", property(lambda self: False))


def acknowledgement_before_the_write(mp):
    """Figure 2: a follower acknowledges entries only once they are on disk; this one
    answers every AppendEntries at once, its entries' fsync still to come (marked as the
    answer of a heartbeat whose claim is durable already)."""
    original = Engine._on_append_entries

    def acknowledge_at_once(self, frm, m):
        original(self, frm, m)
        for c in self._out:
            if type(c) is Send and type(c.message) is AppendEntriesResponse:
                c.durable = True
    mp.setitem(_HANDLERS, AppendEntries, acknowledge_at_once)


PLANTS = [figure_8_commit_rule, commit_beyond_last_new_entry, vote_without_up_to_date_check,
          second_vote_in_a_term, prev_log_term_not_compared, learners_counted_in_the_quorum,
          read_index_without_a_quorum_round, lease_kept_after_a_handover,
          repaired_node_votes, restarted_node_votes_at_once, removed_voter_never_campaigns,
          acknowledgement_before_the_write]
