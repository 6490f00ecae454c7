"""The applier: hands committed entries to the state machine, in log order.

Committed entries queue for a task of their own, so a slow state machine never delays
replication or elections; the task runs while the queue holds work (an idle group of a
host keeps none). A synchronous state machine with nothing queued is applied in place
instead, which saves the task's loop turn on every commit (latency). The same queue
orders the other work that must see a stable state: snapshots of the state machine
(taken every ``Config.snapshot_interval`` entries, or on demand) and restores from a
snapshot received from the leader.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from fastraft import kernels
from fastraft.asyncutil import fail_future
from fastraft.engine import ApplyStored
from fastraft.errors import NodeStopped, ProposalDropped, StorageCorruption
from fastraft.messages import Entry, EntryKind, SnapshotMeta
from fastraft.node.writer import SaveSnapshot
from fastraft.snapshots import COPY_BYTES, as_stream, close_stream, spool

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode

log = logging.getLogger("fastraft.node")
_NORMAL = EntryKind.NORMAL
#: Most entries handed to the state machine in one call; the task yields to the event
#: loop between calls, so a backlog never holds off heartbeats and votes for long.
MAX_APPLY_BATCH = 4096


class Restore:
    """A queue item: replace the state machine with a received snapshot, once it is saved
    (the spool is read by the save first, then by the restore)."""

    __slots__ = ("meta", "spool", "saved")

    def __init__(self, meta: SnapshotMeta, spool: BinaryIO, saved: asyncio.Future[Any]) -> None:
        self.meta = meta
        self.spool = spool
        self.saved = saved


_SNAPSHOT_DUE = object()  # queue item: take a snapshot if the policy says so


class Applier:
    def __init__(self, node: RaftNode) -> None:
        self.node = node
        #: Items to apply or answer in this order. A list (an empty deque takes 700 bytes
        #: more, in every idle group of a host); it rarely holds more than a few.
        self.queue: list[Any] = []
        #: Works through the queue; None while it is empty.
        self._task: asyncio.Task[Any] | None = None
        #: Nothing more is applied: the node stops, or an item failed (what follows it
        #: must never reach the state machine without it).
        self._closed = False
        #: Working on an item (possibly awaiting): no inline apply now.
        self._busy = False
        #: A synchronous call into the state machine running in a thread, which
        #: ``stop`` waits for (``_call_state_machine``); None: none.
        self._in_thread: asyncio.Future[Any] | None = None
        #: What a ``snapshot()`` still waiting when the node stops fails with (None:
        #: ``NodeStopped``; made when needed, as most nodes never need it).
        self._stop_error: Exception | None = None
        #: Highest index the state machine has applied.
        self.applied_index = 0
        #: Highest index handed to the applier (entries up to here are committed).
        self.committed_index = 0

    def start(self, applied_index: int) -> None:
        node = self.node
        self.applied_index = self.committed_index = applied_index
        sm_apply = node.state_machine.apply
        self._sm_apply, self._sm_apply_async = sm_apply, inspect.iscoroutinefunction(sm_apply)

    async def stop(self, error: Exception) -> None:
        """End the apply task, once a call into the state machine running in a thread
        has returned (a coroutine one is cancelled with the task, as asyncio stops
        work); a ``snapshot()`` still waiting fails with ``error``."""
        self._stop_error = error
        self._closed = True
        task = self._task
        if task is not None:
            if self._in_thread is not None:
                await asyncio.wait([self._in_thread])
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for item in self.queue:
            if type(item) is Restore:
                item.spool.close()
            elif isinstance(item, asyncio.Future):
                fail_future(item, error)

    def enqueue(self, item: object) -> None:
        """Committed entries (a list), a ``Restore``, or a future to answer with a
        snapshot taken at this point of the apply order."""
        self.queue.append(item)
        self._start_task()

    def _start_task(self) -> None:
        if self._task is None and not self._closed:
            self._task = self.node._loop.create_task(self._run())

    def can_apply_now(self) -> bool:
        return not self._sm_apply_async and not self.queue and not self._busy

    def apply_now(self, entries: list[Entry]) -> None:
        """Apply ``entries`` at once (the queue was empty when they were taken)."""
        if self._closed:
            return
        if len(entries) > MAX_APPLY_BATCH:
            # A backlog: the task applies it in slices, before anything queued since it
            # was taken (the Restore of a snapshot installed in the same turn).
            self.queue.insert(0, entries)
            self._start_task()
            return
        self._busy = True
        try:
            user = self._user_entries(entries)
            results: Sequence[Any] = ()
            if user:
                recorder = self.node._recorder
                started = recorder.clock()
                results = self._sm_apply(user)
                recorder.applied(started, len(user))
            self._applied(entries, user, results)
        except Exception:
            self._failed(entries)
            return
        finally:
            self._busy = False
        if self._snapshot_due():
            self.enqueue(_SNAPSHOT_DUE)  # taken by the task (it awaits)

    async def _run(self) -> None:
        try:
            await self._work_through()
        finally:
            self._task = None

    async def _work_through(self) -> None:
        queue = self.queue
        while queue:
            entries = queue.pop(0)
            self._busy = True
            try:
                if type(entries) is not list:
                    await self._special(entries)
                    continue
                if self._behind_installed_snapshot():
                    continue  # see _behind_installed_snapshot
                if queue and type(queue[0]) is list and len(entries) < MAX_APPLY_BATCH:
                    entries = entries + queue[0]  # a new list: the items stay as they were given
                    taken = 1
                    while taken < len(queue) and type(queue[taken]) is list \
                            and len(entries) < MAX_APPLY_BATCH:
                        entries.extend(queue[taken])
                        taken += 1
                    del queue[:taken]  # at once: a backlog may queue thousands
                if len(entries) > MAX_APPLY_BATCH:
                    queue.insert(0, entries[MAX_APPLY_BATCH:])
                    entries = entries[:MAX_APPLY_BATCH]
                await self._apply_batch(entries)
                if self._snapshot_due():
                    await self._take_snapshot()
                if queue:
                    await asyncio.sleep(0)  # let the loop read and send between batches
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failed(entries)
                return
            finally:
                self._busy = False

    def _failed(self, item: object) -> None:
        self._closed = True
        if type(item) is Restore:
            what = "restoring the leader's snapshot failed"
        elif type(item) is ApplyStored:
            what = f"applying entries {item.first}..{item.last} from storage failed"
        elif type(item) is not list:
            what = "taking a snapshot failed"
        else:
            user = self._user_entries(item)
            where = f"entry {user[0].index}" if len(user) == 1 else \
                f"one of entries {user[0].index}..{user[-1].index}"
            what = f"the state machine failed applying {where}"
        self.node._fail_node(what)

    def _snapshot_due(self) -> bool:
        """Every ``snapshot_interval`` applied entries; never on a node removed from the
        group: a snapshot past the entry that removed it would compact away every
        configuration that held it, and it would no longer know it is out (``status``,
        ``health``, ``stop_when_removed``, after a restart too)."""
        interval = self.node.config.snapshot_interval
        return bool(interval) and \
            self.applied_index - self.node._writer.snapshot_index >= interval and \
            not self._behind_installed_snapshot() and not self.node.engine.removed

    def _behind_installed_snapshot(self) -> bool:
        """The engine installed a leader's snapshot past what the state machine holds
        (§7). Its Restore is queued behind everything committed before it, and covers
        all of that: those entries are skipped, not applied (storage may no longer
        hold them, and applying the later ones alone would leave a gap in the state
        that reads would see); the log no longer has the applied index to snapshot at."""
        return self.applied_index < self.node.engine.log.snapshot_index

    async def _special(self, item: Any) -> None:
        if type(item) is Restore:
            try:
                await item.saved
                if item.meta.last_included_index > self.applied_index:
                    item.spool.seek(0)
                    started = time.monotonic()
                    await self.restore(item.spool)
                    took = time.monotonic() - started
                    self.node._recorder.snapshot_install_seconds.observe(took)
                    index = item.meta.last_included_index
                    log.info("%s: installed the leader's snapshot at %d in %.3fs",
                             self.node.label, index, took,
                             extra={"event": "snapshot_installed", **self.node.log_fields,
                                    "index": index, "seconds": took})
                    self.applied_index = index
                    proposals = self.node._proposals
                    if proposals.waiting:
                        # Committed under this node's lost leadership and not applied
                        # before the leader's snapshot came: skipped for it (see
                        # _behind_installed_snapshot), so no result is to be had.
                        self.node._recorder.proposals_dropped += proposals.fail_through(
                            index, ProposalDropped(
                                f"node {self.node.id} lost leadership before it applied "
                                "the entry, then restored a snapshot of the new leader "
                                "that holds it: it was committed, but its result is not "
                                "known here", committed=True))
                    self._after_apply()
            finally:
                item.spool.close()
        elif type(item) is ApplyStored:
            # Committed entries that left the engine's memory: from storage, a batch at a
            # time, in their place in the apply order.
            if self._behind_installed_snapshot():
                return  # even if storage still holds them: see _behind_installed_snapshot
            try:
                async for batch in self.node._log_reader.batches(item.first, item.last + 1):
                    if batch[0].index <= self.applied_index:
                        batch = [e for e in batch if e.index > self.applied_index]
                        if not batch:
                            continue
                    for k in range(0, len(batch), MAX_APPLY_BATCH):
                        await self._apply_batch(batch[k:k + MAX_APPLY_BATCH])
                        if self._snapshot_due():
                            await self._take_snapshot()
                        await asyncio.sleep(0)
            except StorageCorruption:
                # A leader's snapshot installed meanwhile replaced them in storage (see
                # _behind_installed_snapshot). Anything else is damage.
                if not self._behind_installed_snapshot():
                    raise
        elif item is _SNAPSHOT_DUE:
            if self._snapshot_due():
                await self._take_snapshot()
        elif self._behind_installed_snapshot():
            self.enqueue(item)  # a future from snapshot(): answered after the Restore
        else:  # a future from snapshot(): answer it from this point of the apply order
            try:
                item.set_result(await self._take_snapshot())
            except asyncio.CancelledError:
                # stopped while taking or saving it
                fail_future(item, self._stop_error or NodeStopped(f"node {self.node.id} stopped"))
                raise
            except Exception as exc:
                fail_future(item, exc)

    async def _take_snapshot(self) -> int:
        """Snapshot the state machine at the applied index (we are in the task, so
        nothing changes it meanwhile); the save joins the ordered write pipeline."""
        node = self.node
        index = self.applied_index
        if index <= node._writer.snapshot_index:
            return node._writer.snapshot_index
        started = time.monotonic()
        meta = node.engine.snapshot_meta(index)
        # The task waits here, so nothing changes the state meanwhile; a thread keeps
        # replication and elections running while a large snapshot is taken.
        data = await self._call_state_machine(node.state_machine.snapshot)
        durable = node._loop.create_future()
        # Nothing is applied until the stream is read to its end (it may read the live
        # state lazily): a chunk per loop turn, here on the loop, so that encoding the
        # state never competes with the loop for the GIL from another thread.
        copied = await self._drain(as_stream(data))
        if not node._running:
            # The node stops, and its writer may have finished already: a save begun now
            # would touch storage after stop() returned (closed by then, or a new node's).
            copied.close()
            raise asyncio.CancelledError
        node._runner.run([SaveSnapshot(meta, copied, installed=False, durable=durable)])
        saved: int = await durable
        took = time.monotonic() - started
        node._recorder.snapshot_save_seconds.observe(took)
        log.info("%s: snapshot at %d saved in %.3fs", node.label, saved, took,
                 extra={"event": "snapshot", **node.log_fields, "index": saved,
                        "seconds": took})
        return saved

    @staticmethod
    async def _drain(source: BinaryIO) -> BinaryIO:
        """The stream's content in a spool (memory, then a temporary file), read one
        chunk per loop turn."""
        out = spool()
        try:
            while chunk := source.read(COPY_BYTES):
                out.write(chunk)
                await asyncio.sleep(0)
        except BaseException:
            out.close()
            raise
        finally:
            close_stream(source)
        out.seek(0)
        return out

    async def restore(self, data: BinaryIO) -> None:
        await self._call_state_machine(self.node.state_machine.restore, data)

    async def _call_state_machine(self, method: Callable[..., Any], *args: Any) -> Any:
        """Call a method of the state machine, in a thread if it is synchronous (so the
        loop goes on replicating meanwhile). A thread cannot be cancelled: ``stop``
        waits for it, which would otherwise go on using the state machine (and a
        restore its snapshot's spool) after ``stop()`` returned. None begins once the
        node stops."""
        if self._closed:
            raise asyncio.CancelledError
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        call = self._in_thread = self.node._loop.run_in_executor(None, method, *args)
        try:
            return await call
        finally:
            self._in_thread = None

    @staticmethod
    def _user_entries(entries: list[Entry]) -> list[Entry]:
        if kernels.index_not_of_kind(entries, _NORMAL) >= 0:
            return [e for e in entries if e.kind == _NORMAL]
        return entries

    async def _apply_batch(self, entries: list[Entry]) -> None:
        user = self._user_entries(entries)
        results: Sequence[Any] = ()
        if user:
            recorder = self.node._recorder
            started = recorder.clock()
            returned: Any = self._sm_apply(user)
            results = await returned if self._sm_apply_async else returned
            recorder.applied(started, len(user))
        self._applied(entries, user, results)

    def _applied(self, entries: list[Entry], user: list[Entry], results: Sequence[Any]) -> None:
        try:
            count = len(results)
        except TypeError:  # a forgotten return, a generator
            raise TypeError(f"the state machine's apply returned {type(results).__name__}, "
                            "not one result per entry (a list)") from None
        if count != len(user):
            raise TypeError(f"the state machine's apply returned {count} results for "
                            f"{len(user)} entries")
        self.applied_index = entries[-1].index
        node = self.node
        proposals = node._proposals
        if proposals.waiting:
            node._recorder.proposals_dropped += proposals.resolve(entries, user, results)
        self._after_apply()  # notifies proposers waiting for room, too

    def _after_apply(self) -> None:
        node = self.node
        node._reads.applied(self.applied_index)
        node._notify_progress()
        if node._removal_index:
            node._stop_if_removed()
