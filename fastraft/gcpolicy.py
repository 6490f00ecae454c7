"""The garbage collector's settings for a process that serves Raft (``fastraft node``, the
benchmark's processes). They are process-wide, so ``RaftNode`` never makes them; an
embedding program can call ``settle_gc`` once it has started (docs/node.md, "Pauses")."""
from __future__ import annotations

import gc

#: Net allocations of tracked objects (allocations less deallocations) that start a young
#: collection; CPython's default is 700.
YOUNG_COLLECTION_THRESHOLD = 20_000


def settle_gc() -> None:
    """Call once the long-lived objects exist (a node started, a host's groups created).

    ``gc.freeze()``: full collections never walk them again. Young collections wait for
    ``YOUNG_COLLECTION_THRESHOLD`` net allocations: a leader with 1,024 writes in flight
    holds some thousands of futures, tasks and messages at any moment, all freed by
    reference counting, and with CPython's 700 it ran a young collection every ~1,000
    writes that found nothing to free (11% of its CPU, 30 of them reaching the middle
    generation). The older generations keep their thresholds."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)
