"""A linearizability checker for histories of key-value (register) operations.

Record what clients did, then check that some order of the operations, one that respects
real time (an operation that completed before another began comes first), explains every
result::

    from fastraft.testing.linearizability import History, check

    h = History()
    op = h.invoke(process=1, kind="put", key="x", value=b"1")
    h.ok(op)
    op = h.invoke(process=2, kind="get", key="x")
    h.ok(op, output=b"1")
    result = check(h)
    assert result.ok, result.explain()

An operation ends ``ok`` (it happened, with its output), ``fail`` (it certainly did not
happen: dropped from the history) or ``info`` (unknown: a write that timed out may have
taken effect at any time after it began, or never; a read with an unknown outcome tells
nothing and is dropped). Kinds: ``put`` (value), ``delete``, ``get`` (output: the value,
or None for a missing key).

The search is Wing & Gong's, with the memoisation of Lowe and of porcupine (a set of
(operations linearized, state) pairs already explored), run per key: operations on
different keys commute, so each key is checked alone (P-compositionality). A failure
names the key and the smallest window of operations that cannot be linearized.

The problem is NP-complete; the search is fast while few operations on a key overlap in
time (50,000 operations over 10 keys with a few overlapping each: under a second), and
can take seconds or more for a key with dozens of writes pending at once (a leader that
stalls, then commits them together). Give each write its own value: an unknown write
whose value nobody read is then left out, and one that was read is bounded by that read.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

__all__ = ["History", "Operation", "Result", "check", "check_operations"]

#: Completion time of an operation whose outcome is unknown: after everything else.
FOREVER = float("inf")
_KINDS = ("put", "delete", "get")


class Operation(msgspec.Struct, kw_only=True):
    id: int
    process: int
    kind: str
    key: Any
    value: Any = None
    invoked: float
    completed: float = FOREVER
    #: "ok", "fail", "info", or None while still running.
    outcome: str | None = None
    output: Any = None

    def describe(self) -> str:
        what = {"put": f"put({self.key!r}, {self.value!r})",
                "delete": f"delete({self.key!r})",
                "get": f"get({self.key!r}) -> {self.output!r}"}[self.kind]
        end = "unknown" if self.completed == FOREVER else f"{self.completed:.6f}"
        return (f"#{self.id} process {self.process}: {what} [{self.invoked:.6f} .. {end}]"
                + (" (outcome unknown)" if self.outcome == "info" else ""))


class History:
    """Operations as clients saw them. Times come from ``clock`` (``time.monotonic``
    unless given per call); concurrent clients must share one clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.operations: list[Operation] = []

    def invoke(self, process: int, kind: str, key: Any, value: Any = None,
               at: float | None = None) -> int:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        op = Operation(id=len(self.operations), process=process, kind=kind, key=key,
                       value=value, invoked=self.clock() if at is None else at)
        self.operations.append(op)
        return op.id

    def ok(self, op_id: int, output: Any = None, at: float | None = None) -> None:
        self._complete(op_id, "ok", at, output)

    def fail(self, op_id: int, at: float | None = None) -> None:
        """The operation certainly did not take effect (``NotLeader``, ``Overloaded``, a
        ``ProposalDropped`` or ``NodeStopped`` whose ``committed`` is False)."""
        self._complete(op_id, "fail", at)

    def info(self, op_id: int) -> None:
        """The outcome is unknown (a timeout, a lost connection, any other
        ``ProposalDropped``)."""
        op = self.operations[op_id]
        op.outcome, op.completed = "info", FOREVER

    def _complete(self, op_id: int, outcome: str, at: float | None, output: Any = None) -> None:
        op = self.operations[op_id]
        if op.outcome is not None:
            raise ValueError(f"operation {op_id} already completed ({op.outcome})")
        completed = self.clock() if at is None else at
        if completed < op.invoked:
            raise ValueError(f"operation {op_id} completed before it was invoked")
        op.outcome, op.output, op.completed = outcome, output, completed


class Result(msgspec.Struct):
    #: Every key was searched and is linearizable.
    ok: bool
    operations: int
    keys: int
    seconds: float
    #: On failure: the key, and the smallest window of its operations that cannot be
    #: linearized (in invocation order).
    key: Any = None
    window: list[Operation] = msgspec.field(default_factory=list)
    #: Keys whose search outgrew ``max_states`` (no verdict on them; ``ok`` is False).
    undecided: list[Any] = msgspec.field(default_factory=list)

    @property
    def violated(self) -> bool:
        """A key was shown not linearizable (not merely left undecided)."""
        return bool(self.window)

    def explain(self) -> str:
        if self.ok:
            return (f"linearizable: {self.operations} operations on {self.keys} keys, "
                    f"checked in {self.seconds:.2f}s")
        if not self.window:
            return (f"undecided: the search of keys {self.undecided!r} outgrew its budget "
                    f"of states (too many operations overlap in time on one key: use more "
                    f"keys, or a larger max_states); the other keys are linearizable")
        lines = [f"NOT linearizable: key {self.key!r}; these {len(self.window)} operations "
                 "cannot be ordered to explain their results:"]
        lines += ["  " + op.describe() for op in self.window]
        return "\n".join(lines)


def _step(state: Any, op: Operation) -> tuple[bool, Any]:
    """The register model: (whether ``op`` is possible in ``state``, the next state)."""
    kind = op.kind
    if kind == "put":
        return True, op.value
    if kind == "delete":
        return True, None
    return op.output == state, state


class _Undecided(Exception):
    """The search explored more states than it may."""


#: States (operations linearized, register value) one key's search may remember.
MAX_STATES = 1_000_000


def _linearizable(ops: list[Operation], max_states: int = MAX_STATES) -> bool:
    """Wing & Gong's search with memoisation over one key's operations (porcupine's
    algorithm): walk the events in time order; at a call, try to linearize that operation
    now; at a return whose operation is not yet linearized, undo the last choice.
    ``_Undecided`` past ``max_states`` remembered states."""
    if not ops:
        return True
    # Events in time order (calls first at a tie: operations that touch in time count as
    # concurrent), as a doubly linked list between a head (n) and a tail (n + 1).
    events = sorted([(op.invoked, 0, k) for k, op in enumerate(ops)]
                    + [(op.completed, 1, k) for k, op in enumerate(ops)])
    n = len(events)
    head, tail = n, n + 1
    nxt = list(range(1, n)) + [tail, 0, -1]
    prv = [head] + list(range(n - 1)) + [-1, n - 1]
    call_at = [0] * len(ops)
    return_at = [0] * len(ops)
    for pos, (_, is_return, k) in enumerate(events):
        (return_at if is_return else call_at)[k] = pos

    def unlink(pos: int) -> None:
        nxt[prv[pos]] = nxt[pos]
        prv[nxt[pos]] = prv[pos]

    def relink(pos: int) -> None:
        nxt[prv[pos]] = pos
        prv[nxt[pos]] = pos

    seen: set[tuple[int, Any]] = set()
    linearized = 0
    state: Any = None
    stack: list[tuple[int, Any]] = []
    pos = nxt[head]
    while nxt[head] != tail:
        _, is_return, k = events[pos]
        if not is_return:
            possible, new_state = _step(state, ops[k])
            if possible:
                marked = linearized | (1 << k)
                if (marked, new_state) not in seen:
                    if len(seen) >= max_states:
                        raise _Undecided
                    seen.add((marked, new_state))
                    stack.append((k, state))
                    state, linearized = new_state, marked
                    unlink(call_at[k])
                    unlink(return_at[k])
                    pos = nxt[head]
                    continue
            pos = nxt[pos]
        else:
            if not stack:
                return False
            k, state = stack.pop()
            linearized &= ~(1 << k)
            relink(return_at[k])
            relink(call_at[k])
            pos = nxt[call_at[k]]
    return True


def _prepared(ops: Iterable[Operation]) -> dict[Any, list[Operation]]:
    by_key: dict[Any, list[Operation]] = {}
    for op in ops:
        if op.outcome == "fail" or (op.kind == "get" and op.outcome != "ok"):
            continue  # it did not happen, or (a read without a result) tells nothing
        if op.outcome != "ok":  # unknown, or still running when the history ended
            op = msgspec.structs.replace(op, outcome="info", completed=FOREVER)
        by_key.setdefault(op.key, []).append(op)
    return {key: _bounded_unknowns(key_ops) for key, key_ops in by_key.items()}


def _bounded_unknowns(ops: list[Operation]) -> list[Operation]:
    """Unknown writes are what makes the search branch: each may take effect anywhere
    after it began. When a write's value is written by no other operation on the key,
    its fate is read off the history: never read, it is as if it took effect after
    everything (or never) and is left out; read, it took effect before the first read
    that returned it completed, which bounds it."""
    writers: dict[Any, int] = {}
    first_seen: dict[Any, float] = {}
    for op in ops:
        if op.kind == "put":
            writers[op.value] = writers.get(op.value, 0) + 1
        elif op.kind == "get" and op.completed < first_seen.get(op.output, FOREVER):
            first_seen[op.output] = op.completed
    out = []
    for op in ops:
        if op.outcome == "info" and op.kind == "put" and writers[op.value] == 1:
            seen = first_seen.get(op.value)
            if seen is None:
                continue
            op = msgspec.structs.replace(op, completed=max(seen, op.invoked))
        out.append(op)
    return out


def _smallest_window(ops: list[Operation]) -> list[Operation]:
    """A short sub-history that still fails: the shortest failing prefix (by invocation),
    then as few of its first operations as can go while it still fails (every write kept
    that a read in the window could have seen)."""
    ops = sorted(ops, key=lambda o: o.invoked)
    lo, hi = 1, len(ops)
    while lo < hi:  # shortest prefix that fails
        mid = (lo + hi) // 2
        if _linearizable(ops[:mid]):
            lo = mid + 1
        else:
            hi = mid
    prefix = ops[:lo]
    start = 0
    while start < len(prefix) - 1 and not _linearizable(prefix[start + 1:]):
        start += 1
    return prefix[start:]


def check_operations(ops: Iterable[Operation], max_states: int = MAX_STATES) -> Result:
    started = time.perf_counter()
    by_key = _prepared(ops)
    total = sum(len(v) for v in by_key.values())
    undecided = []
    for key, key_ops in by_key.items():
        try:
            if _linearizable(key_ops, max_states):
                continue
        except _Undecided:
            undecided.append(key)
            continue
        try:
            window = _smallest_window(key_ops)
        except _Undecided:  # a shorter window is too costly to find: show them all
            window = sorted(key_ops, key=lambda o: o.invoked)
        return Result(False, total, len(by_key), time.perf_counter() - started,
                      key=key, window=window)
    return Result(not undecided, total, len(by_key), time.perf_counter() - started,
                  undecided=undecided)


def check(history: History, max_states: int = MAX_STATES) -> Result:
    """Whether ``history`` is linearizable (see the module docstring). The search of a
    key stops, undecided, past ``max_states`` remembered states (about 100 bytes each
    for a few hundred operations on the key): memory stays bounded."""
    return check_operations(history.operations, max_states)
