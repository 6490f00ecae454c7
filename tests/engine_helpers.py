"""Builders for engine tests: engines in a given state, and a lossless in-memory harness."""
import random

from fastraft.config import Config
from fastraft.engine import AppendLog, Engine, InitialState, Send, SetTimer, Timer, TruncateLog
from fastraft.messages import Entry, EntryKind, HardState, Membership, encode_membership

CFG = Config(pre_vote=False, check_quorum=False, commit_notify_delay=0)


def make(node_id=1, voters=(1, 2, 3), term=0, voted_for=None, terms=(), commit=0,
         config=CFG, learners=()):
    """An engine whose log holds one entry per element of ``terms``."""
    entries = [Entry(t, i, EntryKind.NORMAL, b"e%d" % i) for i, t in enumerate(terms, 1)]
    state = InitialState(
        hard_state=HardState(term, voted_for, commit),
        snapshot_membership=Membership(voters=frozenset(voters), learners=frozenset(learners)),
        entries=entries, applied_index=commit)
    e = Engine(node_id, config, random.Random(node_id), state)
    e.start()
    return e


def sends(commands, kind=None):
    return [(c.to, c.message) for c in commands
            if type(c) is Send and (kind is None or type(c.message) is kind)]


def without_timers(commands):
    return [c for c in commands if type(c) is not SetTimer]


class Harness:
    """Engines wired together with instant, lossless delivery and instant durability."""

    def __init__(self, engines):
        self.engines = {e.id: e for e in engines}
        self.delivered = 0
        self.applied = {e.id: [] for e in engines}

    def run(self, limit=10_000):
        queue = []
        for e in self.engines.values():
            queue.extend(self._settle(e))
        while queue and limit:
            limit -= 1
            frm, to, msg = queue.pop(0)
            if to in self.engines:
                self.delivered += 1
                self.engines[to].step(frm, msg)
                queue.extend(self._settle(self.engines[to]))
        return self

    def _settle(self, e):
        out = []
        cmds = e.take_commands()
        while cmds:
            for c in cmds:
                if type(c) is Send:
                    out.append((e.id, c.to, c.message))
                elif type(c) in (AppendLog, TruncateLog):
                    pass
                elif type(c).__name__ == "Apply":
                    self.applied[e.id].extend(c.entries)
            last = e.log.last_index
            e.log_persisted(last, e.log.term_at(last))
            e.hard_state_persisted(e.term)
            cmds = e.take_commands()
        return out

    def fire(self, node_id, timer=Timer.ELECTION):
        self.engines[node_id].on_timer(timer)
        return self.run()


def replacing_3_by_4(node_id, held):
    """Node ``node_id`` of a change from voters {1, 2, 3} to {1, 2, 4} (thesis §4.1's
    case): its log holds entry 1, C_old,new at 2 (committed) and, if ``held`` is 3,
    C_new at 3; no leader heard from since its start. Pre-vote and check-quorum on."""
    joint = Membership(voters=frozenset({1, 2, 4}), outgoing=frozenset({1, 2, 3}))
    entries = [Entry(1, 1, EntryKind.NORMAL, b"e1"),
               Entry(1, 2, EntryKind.CONFIG, encode_membership(joint)),
               Entry(1, 3, EntryKind.CONFIG,
                     encode_membership(Membership(voters=frozenset({1, 2, 4}))))]
    e = Engine(node_id, Config(commit_notify_delay=0), random.Random(node_id), InitialState(
        hard_state=HardState(1, None, 2), entries=entries[:held],
        snapshot_membership=Membership(voters=frozenset({1, 2, 3}))))
    e.start()
    e.on_timer(Timer.LEASE)
    return e
