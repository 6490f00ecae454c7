"""The log writer: makes the engine's persistence commands durable, in order.

Write batches run one at a time; batches that queue behind a write in progress are merged
into the next one (group commit), so one storage append and one fsync serve everything
that arrived meanwhile. With synchronous storage and nothing queued a batch is written in
place, saving a task hop. When a batch is durable the writer reports it to the engine and
releases the messages that waited for it.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from fastraft.asyncutil import call_hook
from fastraft.engine import AppendLog, CompactLog, PersistHardState, TruncateLog, write_order
from fastraft.errors import StorageCorruption
from fastraft.messages import Entry, SnapshotMeta
from fastraft.snapshots import close_stream, stream_size

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode
    from fastraft.storage import RaftStorage


class SaveSnapshot:
    """A write op: make a snapshot durable, in order with the log writes around it."""

    __slots__ = ("meta", "source", "installed", "durable", "reader", "size")

    def __init__(self, meta: SnapshotMeta, source: BinaryIO, installed: bool,
                 durable: asyncio.Future[Any]) -> None:
        self.meta = meta
        #: The data to copy into storage: the state machine's stream, or the spool of a
        #: snapshot received from the leader.
        self.source = source
        #: Received from the leader (the engine already knows) rather than taken here.
        self.installed = installed
        #: Resolved with the index once the snapshot is on disk.
        self.durable = durable
        #: Storage's copy, opened once saved: InstallSnapshot chunks are read from it.
        self.reader: BinaryIO | None = None
        self.size = 0


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn)


class LogWriter:
    def __init__(self, node: RaftNode) -> None:
        self.node = node
        #: Write batches not yet durable, oldest first: [ops, sends held until durable].
        #: A list, not a deque: it holds the batch being written and those submitted
        #: meanwhile (merged into one before the next write), and an idle group's empty
        #: deque would cost it 700 bytes more.
        self.writes: list[list[Any]] = []
        self.task: asyncio.Task[Any] | None = None
        #: The newest snapshot saved (or being saved, in order) by this writer.
        self.snapshot_index = 0

    def bind(self, storage: RaftStorage) -> None:
        """Decide once, per storage method, whether it is a coroutine."""
        self.storage = storage
        self._append, self._append_async = storage.append_entries, \
            _is_async(storage.append_entries)
        self._truncate, self._truncate_async = storage.truncate_suffix, \
            _is_async(storage.truncate_suffix)
        self._compact, self._compact_async = storage.compact_prefix, \
            _is_async(storage.compact_prefix)
        self._save_hs, self._save_hs_async = storage.save_hard_state, \
            _is_async(storage.save_hard_state)
        #: Optional: told the commit index before a batch that appends (the storage may
        #: record it so recovery never drops committed entries).
        self._commit_advanced = getattr(storage, "commit_advanced", None)
        self._snapshot_io_async = (_is_async(storage.save_snapshot)
                                   or _is_async(storage.load_snapshot))
        self.sync = not (self._append_async or self._truncate_async or self._compact_async
                         or self._snapshot_io_async or self._save_hs_async)

    def submit(self, ops: list[Any], held: list[Any], commit_index: int) -> None:
        """Make ``ops`` durable after every batch before them, then send ``held``.
        ``commit_index``: the engine's when it emitted ``ops`` (not its commit index when
        the batch is written, which may count entries of commands not submitted yet)."""
        if self.sync and not self.writes and not any(type(op) is SaveSnapshot for op in ops):
            self._write_now(ops, held, commit_index)
            return
        self.writes.append([ops, held, commit_index])
        if self.task is None:
            self.task = self.node._loop.create_task(self._write_loop())

    def hold(self, held: list[Any]) -> None:
        """Send ``held`` once the newest batch in progress is durable."""
        self.writes[-1][1].extend(held)

    async def drain(self) -> bool:
        """Until every batch submitted (or about to be, by a scheduled flush) is durable:
        True; False if the node stops first. A failed write stops it and leaves its batch
        here with no task to write it: waiting on would never end."""
        node = self.node
        while self.writes or node._flush_scheduled:
            if not node._running:
                return False
            await asyncio.sleep(0)
            if self.task is not None:
                await asyncio.shield(self.task)
        return True

    async def stop(self) -> None:
        if self.task is not None:
            try:
                await self.task  # never leave a write half done
            except Exception:  # already logged by the write loop
                pass
        if self._commit_advanced is not None and not self.writes:
            # Everything is durable: the storage may record the final commit index (a
            # FileStorage keeps it in ``state`` when closed).
            self._commit_advanced(self.node.engine.commit_index)

    async def _write_loop(self) -> None:
        writes = self.writes
        try:
            while writes:
                batch = writes[0]
                while len(writes) > 1:
                    ops, held, commit_index = writes.pop()
                    # merge the newest into the one in front, keeping order
                    writes[-1][0].extend(ops)
                    writes[-1][1].extend(held)
                    writes[-1][2] = commit_index
                steps, last, appended = self._plan(batch[0], batch[2])
                started = self.node._recorder.clock()
                for fn, is_async, args in steps:
                    r = fn(*args)
                    if is_async:
                        await r
                self.node._recorder.log_written(started, appended)
                del writes[0]
                if not self.node._running:
                    return
                self._done(batch[0], batch[1], last)
        except Exception:
            self.node._fail_node("storage write failed")
        finally:
            self.task = None

    def _write_now(self, ops: list[Any], held: list[Any], commit_index: int) -> None:
        try:
            steps, last, appended = self._plan(ops, commit_index)
            started = self.node._recorder.clock()
            for fn, _, args in steps:
                fn(*args)
        except Exception:
            self.node._fail_node("storage write failed")
            return
        self.node._recorder.log_written(started, appended)
        self._done(ops, held, last)

    def _plan(self, ops: list[Any], commit_index: int) -> tuple[list[Any], Entry | None, int]:
        """The storage calls for one batch, in ``write_order``, as (method, is_async,
        args); the last entry the batch appends, and how many entries it appends.
        Consecutive appends become one call."""
        ordered, marked = write_order(ops)
        appended = 0
        steps: list[Any] = []
        pending: list[Entry] = []
        mark_step = 0  # position in steps of the append call holding the marked append
        for k, op in enumerate(ordered):
            t = type(op)
            if t is AppendLog:
                if k == marked:
                    mark_step = len(steps)
                pending.extend(op.entries)
                continue
            if pending:
                steps.append((self._append, self._append_async, (pending,)))
                appended += len(pending)
                pending = []
            if t is TruncateLog:
                steps.append((self._truncate, self._truncate_async, (op.index,)))
            elif t is CompactLog:
                steps.append((self._compact, self._compact_async, (op.index,)))
            elif t is SaveSnapshot:
                index = op.meta.last_included_index
                if index > self.snapshot_index:  # never replace a newer snapshot
                    # Synchronous storage copies a snapshot in a thread: it may be large.
                    steps.append((self._persist_snapshot_async if self._snapshot_io_async
                                  else self._persist_snapshot_in_thread, True, (op,)))
                    self.snapshot_index = index
                elif not op.installed:
                    close_stream(op.source)
            else:
                steps.append((self._save_hs, self._save_hs_async, (op.hard_state,)))
        if pending:
            steps.append((self._append, self._append_async, (pending,)))
            appended += len(pending)
        if marked < 0:
            return steps, None, appended
        if self._commit_advanced is not None:
            # Every entry up to the commit index is in this batch's last append or earlier:
            # stamp it on that append alone. An earlier append of the batch may hold
            # entries a later truncation in the batch replaces (a new leader's entries
            # arrived meanwhile): a mark on those would claim the replaced ones committed.
            steps.insert(mark_step, (self._commit_advanced, False, (commit_index,)))
        return steps, ordered[marked].entries[-1], appended

    def _done(self, ops: list[Any], held: list[Any], last: Entry | None) -> None:
        """A batch is durable: tell the engine, release the replies that waited for it."""
        node = self.node
        engine = node.engine
        if last is not None:
            engine.log_persisted(last.index, last.term)
        hard_state = None
        for op in ops:
            t = type(op)
            if t is PersistHardState:
                hard_state = op.hard_state
            elif t is SaveSnapshot:
                node._transfer.snapshot_saved(op)
        if hard_state is not None:
            engine.hard_state_persisted(hard_state.current_term)
        if held:
            by_peer: dict[int, list[Any]] = {}
            sent = node._recorder.messages_out
            for s in held:
                sent[type(s.message)] += 1
                by_peer.setdefault(s.to, []).append(s.message)
            for to, msgs in by_peer.items():
                node.network.send(to, msgs)
        node._runner.run(engine.take_commands())

    def _persist_snapshot(self, op: SaveSnapshot) -> None:
        self.storage.save_snapshot(op.meta, op.source)
        loaded: Any = self.storage.load_snapshot()  # a synchronous storage: the value
        self._snapshot_opened(op, loaded)

    async def _persist_snapshot_in_thread(self, op: SaveSnapshot) -> None:
        await self.node._loop.run_in_executor(None, self._persist_snapshot, op)

    async def _persist_snapshot_async(self, op: SaveSnapshot) -> None:
        await call_hook(self.storage.save_snapshot, op.meta, op.source)
        self._snapshot_opened(op, await call_hook(self.storage.load_snapshot))

    @staticmethod
    def _snapshot_opened(op: SaveSnapshot,
                         loaded: tuple[SnapshotMeta, BinaryIO] | None) -> None:
        if not op.installed:
            close_stream(op.source)  # the state machine's stream was read to its end
        index = op.meta.last_included_index
        if loaded is None or loaded[0].last_included_index != index:
            found = None if loaded is None else loaded[0].last_included_index
            raise StorageCorruption(f"storage saved the snapshot at {index} but "
                                    f"load_snapshot() returned {found}")
        op.reader = loaded[1]
        op.size = stream_size(op.reader)
