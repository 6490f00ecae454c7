"""The engine's own cost of a replication round: three engines in one process, no I/O,
no asyncio, no encoding. A round: the leader takes K proposals and makes them durable,
each follower steps the AppendEntries, makes it durable and answers, the leader steps
the answers and commits. This is the floor under the per-round cost of a real cluster
(which adds the codec, the transport, the event loop, the writers, applying and the
proposers): with 1,024 writes in flight over 64 groups a round carries 16.

    python bench/engine_round.py [K ...]      (default: 16 64 1024)
"""
import random
import sys
import time

from fastraft.config import Config
from fastraft.engine import Engine, InitialState, Role, Send, Timer
from fastraft.messages import HardState, Membership

MEMBERS = (1, 2, 3)


def persist(engine):
    last = engine.log.last_index
    engine.log_persisted(last, engine.log.term_at(last))


def deliver_all(engines, sends):
    """Deliver until nothing is sent (durable at once): elects the leader."""
    while sends:
        frm, c = sends.pop(0)
        to = engines[c.to]
        to.step(frm, c.message)
        persist(to)
        to.hard_state_persisted(to.term)  # votes: durable at once as well
        sends += [(to.id, s) for s in to.take_commands() if type(s) is Send]


def cluster():
    state = InitialState(hard_state=HardState(0, None, 0),
                         snapshot_membership=Membership(voters=frozenset(MEMBERS)),
                         entries=[], applied_index=0)
    engines = {i: Engine(i, Config(), random.Random(i), state) for i in MEMBERS}
    for e in engines.values():
        e.start()
        e.take_commands()
    leader = engines[1]
    leader.on_timer(Timer.ELECTION)
    deliver_all(engines, [(1, s) for s in leader.take_commands() if type(s) is Send])
    persist(leader)
    leader.hard_state_persisted(leader.term)
    deliver_all(engines, [(1, s) for s in leader.take_commands() if type(s) is Send])
    assert leader.role == Role.LEADER
    return engines, leader


def rounds(engines, leader, k, n):
    datas = [b"x" * 100] * k
    started = time.perf_counter()
    for _ in range(n):
        leader.propose(datas)
        out = [c for c in leader.take_commands() if type(c) is Send]
        persist(leader)
        out += [c for c in leader.take_commands() if type(c) is Send]
        for c in out:
            follower = engines[c.to]
            follower.step(1, c.message)
            persist(follower)
            for answer in follower.take_commands():
                if type(answer) is Send:
                    leader.step(c.to, answer.message)
        leader.take_commands()  # the commit: Apply, and the notify timer
    return time.perf_counter() - started


def main():
    for k in [int(a) for a in sys.argv[1:]] or [16, 64, 1024]:
        engines, leader = cluster()
        n = max(200, 200_000 // k)
        rounds(engines, leader, k, n // 10)  # warm up
        before = leader.commit_index
        seconds = rounds(engines, leader, k, n)
        assert leader.commit_index == before + n * k
        print(f"{k:5d} entries a round: {seconds / n * 1e6:7.1f} us a round, "
              f"{seconds / n / k * 1e6:5.2f} us an entry (3 engines)")


if __name__ == "__main__":
    main()
