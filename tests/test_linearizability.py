"""The linearizability checker: hand-made good and bad histories, and agreement with a
brute-force search on thousands of small random histories."""
import itertools
import random
import time

import pytest

from fastraft.testing.linearizability import FOREVER, History, Operation, check, check_operations


def history(*ops):
    """ops: (process, kind, key, value_or_output, invoked, completed, outcome)."""
    h = History()
    for process, kind, key, v, start, end, outcome in ops:
        op = h.invoke(process, kind, key, v if kind == "put" else None, at=start)
        if outcome == "ok":
            h.ok(op, v if kind == "get" else None, at=end)
        elif outcome == "fail":
            h.fail(op, at=end)
        elif outcome == "info":
            h.info(op)
    return h


def test_sequential_and_concurrent_histories_that_are_linearizable():
    assert check(history(
        (1, "put", "x", b"1", 0, 1, "ok"),
        (2, "get", "x", b"1", 2, 3, "ok"),
        (1, "delete", "x", None, 4, 5, "ok"),
        (2, "get", "x", None, 6, 7, "ok"),
    )).ok
    # a read concurrent with a write may see either value
    for seen in (b"1", b"2"):
        assert check(history(
            (1, "put", "x", b"1", 0, 1, "ok"),
            (2, "put", "x", b"2", 2, 5, "ok"),
            (3, "get", "x", seen, 3, 4, "ok"),
        )).ok


def test_a_stale_read_is_caught():
    result = check(history(
        (1, "put", "x", b"1", 0, 1, "ok"),
        (1, "put", "x", b"2", 2, 3, "ok"),
        (2, "get", "x", b"1", 4, 5, "ok"),
    ))
    assert not result.ok and result.key == "x"
    assert "NOT linearizable" in result.explain() and "get('x') -> b'1'" in result.explain()


def test_a_lost_write_is_caught():
    assert not check(history(
        (1, "put", "x", b"1", 0, 1, "ok"),
        (2, "get", "x", None, 2, 3, "ok"),
    )).ok


def test_a_new_old_inversion_is_caught():
    # two reads, one after the other, both concurrent with a write: the second may not
    # see the old value once the first saw the new one
    assert not check(history(
        (1, "put", "x", b"0", 0, 1, "ok"),
        (1, "put", "x", b"1", 2, 10, "ok"),
        (2, "get", "x", b"1", 3, 4, "ok"),
        (3, "get", "x", b"0", 5, 6, "ok"),
    )).ok


def test_unknown_outcomes_may_or_may_not_have_happened():
    # a timed-out write that was read: it happened
    assert check(history(
        (1, "put", "x", b"1", 0, None, "info"),
        (2, "get", "x", b"1", 5, 6, "ok"),
    )).ok
    # one that was never read: it did not (or not yet)
    assert check(history(
        (1, "put", "x", b"1", 0, None, "info"),
        (2, "get", "x", None, 5, 6, "ok"),
    )).ok
    # but it cannot take effect before it was invoked
    assert not check(history(
        (2, "get", "x", b"1", 0, 1, "ok"),
        (1, "put", "x", b"1", 2, None, "info"),
    )).ok
    # and once seen it stays seen: no flickering back
    assert not check(history(
        (1, "put", "x", b"1", 0, None, "info"),
        (2, "get", "x", b"1", 5, 6, "ok"),
        (2, "get", "x", None, 7, 8, "ok"),
    )).ok
    # a failed write never happened
    assert not check(history(
        (1, "put", "x", b"1", 0, 1, "fail"),
        (2, "get", "x", b"1", 5, 6, "ok"),
    )).ok


def test_keys_are_checked_apart_and_a_failure_names_its_key():
    result = check(history(
        (1, "put", "a", b"1", 0, 1, "ok"),
        (1, "put", "b", b"1", 0, 1, "ok"),
        (2, "get", "a", b"1", 2, 3, "ok"),
        (2, "get", "b", b"2", 2, 3, "ok"),
    ))
    assert not result.ok and result.key == "b" and result.keys == 2


def test_the_window_is_small():
    ops = [(1, "put", "x", b"%d" % k, 2 * k, 2 * k + 1, "ok") for k in range(200)]
    ops.append((2, "get", "x", b"5", 1000, 1001, "ok"))  # long after 199 was written
    result = check(history(*ops))
    assert not result.ok
    assert len(result.window) <= 3, result.explain()
    assert result.window[-1].kind == "get"


def brute_force(ops):
    """Try every order of the operations that respects real time (tiny histories)."""
    ops = [op for op in ops if op.outcome != "fail" and not (op.kind == "get" and
                                                             op.outcome != "ok")]
    # an unknown write may also not have happened at all
    unknown = [op for op in ops if op.outcome != "ok"]
    for drop in itertools.product((False, True), repeat=len(unknown)):
        dropped = {op.id for op, d in zip(unknown, drop) if d}
        chosen = [op for op in ops if op.id not in dropped]
        for order in itertools.permutations(chosen):
            if any(order[j].completed < order[i].invoked
                   for i in range(len(order)) for j in range(i + 1, len(order))):
                continue  # j finished before i began, yet comes after it
            state = {}
            good = True
            for op in order:
                if op.kind == "put":
                    state[op.key] = op.value
                elif op.kind == "delete":
                    state.pop(op.key, None)
                elif state.get(op.key) != op.output:
                    good = False
                    break
            if good:
                return True
    return False


def random_history(rng, unique=False):
    ops = []
    for k in range(rng.randint(1, 6)):
        start = rng.randint(0, 10)
        end = start + rng.randint(0, 6)
        kind = rng.choice(("put", "put", "get", "get", "delete"))
        key = rng.choice("ab")
        outcome = rng.choice(("ok", "ok", "ok", "ok", "info", "fail"))
        value = rng.choice((b"1", b"2", None)) if kind == "get" else \
            (rng.choice((b"1", b"2")) if kind == "put" else None)
        if unique and kind == "put":
            value = b"%d" % k  # every write its own value: unknown writes get bounded
        elif unique and kind == "get":
            value = rng.choice([b"%d" % j for j in range(6)] + [None])
        if outcome == "info" and kind == "get":
            outcome = "ok"
        ops.append(Operation(id=k, process=k, kind=kind, key=key,
                             value=value if kind == "put" else None, invoked=start,
                             completed=FOREVER if outcome == "info" else end,
                             outcome=outcome, output=value if kind == "get" else None))
    return ops


@pytest.mark.parametrize("unique", [False, True], ids=["shared-values", "unique-values"])
def test_agrees_with_brute_force_on_thousands_of_small_histories(unique):
    rng = random.Random(11)
    verdicts = {True: 0, False: 0}
    for _ in range(4000):
        ops = random_history(rng, unique)
        expected = brute_force(ops)
        assert check_operations(ops).ok == expected, [op.describe() for op in ops]
        verdicts[expected] += 1
    assert verdicts[True] > 300 and verdicts[False] > 300  # both kinds were tried


def test_fifty_thousand_operations_in_seconds():
    """A realistic history: 20 clients, 10 keys, reads and writes of a linearizable
    store (a global order is simulated), overlapping in time; a few unknown outcomes."""
    rng = random.Random(5)
    h = History()
    value = {}
    now = 0.0
    running = []
    for k in range(50_000):
        now += rng.random()
        key = f"k{rng.randrange(10)}"
        if rng.random() < 0.5:
            op = h.invoke(k % 20, "put", key, b"%d" % k, at=now)
            effect = now + rng.random() * 3
            running.append((effect, op, "put", key, b"%d" % k))
        else:
            op = h.invoke(k % 20, "get", key, at=now)
            running.append((now + rng.random() * 3, op, "get", key, None))
        running.sort()
        while running and running[0][0] < now:
            effect, op, kind, key, v = running.pop(0)
            if kind == "put":
                value[key] = v
                if rng.random() < 0.01:
                    h.info(op)
                    continue
                h.ok(op, at=effect + rng.random())
            else:
                h.ok(op, value.get(key), at=effect + rng.random())
    started = time.perf_counter()
    result = check(h)
    assert result.ok, result.explain()
    assert result.operations > 45_000 and time.perf_counter() - started < 30


@pytest.mark.parametrize("bad", ["invoke", "complete"])
def test_misuse_is_refused(bad):
    h = History()
    if bad == "invoke":
        with pytest.raises(ValueError):
            h.invoke(1, "cas", "x")
    else:
        op = h.invoke(1, "put", "x", b"1", at=5)
        with pytest.raises(ValueError):
            h.ok(op, at=4)
        h.ok(op, at=6)
        with pytest.raises(ValueError):
            h.ok(op, at=7)


def test_a_search_past_its_budget_is_undecided_not_a_verdict():
    """Fourteen writes overlapping in time, then a read of one of them: thousands of
    states to explore. With a small budget the key is left undecided (memory stays
    bounded), never called a violation; with the default budget it is linearizable."""
    h = History()
    ops = [h.invoke(p, "put", "x", f"v{p}".encode(), at=0.0) for p in range(14)]
    for p, op in enumerate(ops):
        h.ok(op, at=1.0 + p)
    h.ok(h.invoke(99, "get", "x", at=40.0), output=b"v7", at=41.0)
    small = check(h, max_states=100)
    assert not small.ok and not small.violated and small.undecided == ["x"]
    assert "undecided" in small.explain()
    assert check(h).ok
