"""Entries the engine no longer holds in memory, read back from storage.

The engine keeps payloads only for the newest ``Config.log_cache_bytes`` of the log. A
follower that lags gets older entries through ``ReadLog`` (one read per follower at a
time, in a task of its own, so the leader's hot path never waits on it); the state
machine gets them through ``ApplyStored`` (after a restart, or a follower that stored a
lot before learning it committed); ``RaftNode.committed()`` and ``ReplicatedLog`` readers
read them here too. Every read is bounded in bytes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastraft import kernels
from fastraft.asyncutil import call_hook
from fastraft.engine import ReadLog
from fastraft.errors import OffsetCompacted, StorageCorruption
from fastraft.logutil import Throttle
from fastraft.messages import Entry
from fastraft.storage import StorageState

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode

log = logging.getLogger("fastraft.node")
_failures = Throttle(log, interval=5.0)

#: Payload bytes per read of a long range (the apply backlog, a reader's replay).
READ_BATCH_BYTES = 4 << 20


class LogReader:
    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self._tasks: set[asyncio.Task[Any]] = set()
        #: ``ReadLog`` commands served (followers caught up from storage).
        self.reads = 0

    async def read(self, lo: int, hi: int, max_bytes: int = READ_BATCH_BYTES) -> list[Entry]:
        """Entries ``lo ..`` (at least one, at most ``hi - 1``) from storage."""
        entries: list[Entry] = await call_hook(self.node.storage.read_entries, lo, hi,
                                               max_bytes)
        if not entries or entries[0].index != lo or entries[-1].index >= hi:
            got = f"{entries[0].index}..{entries[-1].index}" if entries else "nothing"
            raise StorageCorruption(f"storage returned {got} when asked for entries "
                                    f"{lo}..{hi - 1}")
        return entries

    async def batches(self, lo: int, hi: int,
                      max_bytes: int = READ_BATCH_BYTES) -> AsyncIterator[list[Entry]]:
        """Entries ``lo .. hi - 1`` in consecutive batches of about ``max_bytes``."""
        while lo < hi:
            batch = await self.read(lo, hi, max_bytes)
            yield batch
            lo = batch[-1].index + 1

    async def committed(self, start: int, kind: int, max_entries: int,
                        max_bytes: int) -> tuple[list[Entry], int]:
        """Committed entries of ``kind`` from ``start`` on: at most ``max_entries``, and
        ``max_bytes`` of payload (at least one entry), from memory where the engine still
        holds them, else from storage; and the index to continue from. Nothing when no
        entry after ``start`` is committed yet."""
        node = self.node
        log = node.engine.log
        top = node._applier.committed_index
        out: list[Entry] = []
        nxt = start
        budget = max_bytes
        while nxt <= top and len(out) < max_entries and budget > 0:
            hi = min(top + 1, nxt + max_entries - len(out))
            cache_first = log.cache_first
            if nxt <= log.snapshot_index:
                # Behind the engine's log (it restarted from a snapshot): storage may
                # still hold it, kept by the retention bound.
                batch = await self._retained(nxt, min(hi, log.snapshot_index + 1), budget)
            elif nxt >= cache_first:
                batch = log.slice(nxt, hi)
                if len(batch) > 1:
                    batch = batch[:kernels.count_within_bytes(batch, budget)]
            else:
                try:
                    batch = await self.read(nxt, min(hi, cache_first), budget)
                except StorageCorruption:
                    if nxt <= log.snapshot_index:
                        continue  # compacted while it was read: try what storage keeps
                    raise
            nxt = batch[-1].index + 1
            if kernels.index_not_of_kind(batch, kind) >= 0:
                batch = [e for e in batch if e.kind == kind]
            if out and batch:
                # past the first entry, nothing beyond the budget
                n = kernels.count_within_bytes(batch, budget)
                if len(batch[0].data) > budget:
                    n = 0
                if n < len(batch):
                    out.extend(batch[:n])
                    return out, batch[n].index
            out.extend(batch)
            budget -= kernels.payload_bytes(batch)
        return out, nxt

    async def _retained(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        try:
            return await self.read(lo, hi, max_bytes)
        except StorageCorruption:
            pass  # storage no longer holds ``lo``
        node = self.node
        state = await call_hook(node.storage.load_state)
        raise OffsetCompacted(
            f"entries before {state.first_index} are no longer in the log of node {node.id} "
            f"(compacted behind a snapshot and the retention bound); read from "
            f"{state.first_index} on")

    async def first_index(self) -> int:
        """The first index the log still holds, in memory or in storage."""
        state: StorageState = await call_hook(self.node.storage.load_state)
        return min(state.first_index, self.node.engine.log.snapshot_index + 1)

    async def follow(self, start: int, kind: int, max_entries: int = 4096,
                     max_bytes: int = READ_BATCH_BYTES) -> AsyncIterator[list[Entry]]:
        """Batches of committed entries of ``kind`` from ``start`` on, then new ones as
        they commit, until the node stops; raises its ``NodeFailed`` if it stopped
        itself, so a consumer tells a failure from a stop. Nothing is read ahead of the
        consumer: a slow one costs no memory (but may fall behind the log's retention)."""
        node = self.node
        applier = node._applier
        nxt = start
        while node._running:
            batch, nxt_after = await self.committed(nxt, kind, max_entries, max_bytes)
            if nxt_after == nxt:
                def more(after: int = nxt) -> bool:
                    return not node._running or applier.committed_index >= after
                await node._wait_progress(more)
                continue
            nxt = nxt_after
            if batch:
                yield batch
        if node.failure is not None:
            raise node.failure

    def serve(self, c: ReadLog) -> None:
        """Run a ``ReadLog`` in a task of its own and hand the result to the engine."""
        task = self.node._loop.create_task(self._serve(c))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, c: ReadLog) -> None:
        node = self.node
        self.reads += 1
        try:
            entries = await self.read(c.start, c.stop, c.max_bytes)
        except Exception as exc:
            if node._running:
                if c.start <= node.engine.log.snapshot_index:
                    # Compacted while it was read: no damage, the follower gets a snapshot.
                    log.debug("%s: entries %d.. for node %d were compacted while read",
                              node.label, c.start, c.peer)
                else:
                    _failures.warning("read", "%s: reading entries %d..%d for node %d "
                                      "failed: %r", node.label, c.start, c.stop - 1, c.peer,
                                      exc)
                node.engine.log_read_failed(c.peer, c.start)
            return
        if node._running:
            node.engine.log_read(c.peer, c.start, entries)
            node._schedule_flush()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
