"""Snapshot transfer (§7): the leader's chunks read from storage, the follower's spool.

The leader keeps a reader of storage's copy of every snapshot the engine may still stream
(``Engine.snapshots_in_use``) and fills each InstallSnapshot chunk from it at its offset.
A follower writes the chunks it receives into a spool (memory, then a temporary file); on
the last one the snapshot is saved as a write, ahead of the log changes the engine makes,
and the state machine is restored from it by the applier.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from fastraft.engine import SendSnapshotChunk
from fastraft.messages import InstallSnapshot
from fastraft.node.applier import Restore
from fastraft.node.writer import SaveSnapshot
from fastraft.snapshots import spool

if TYPE_CHECKING:
    from fastraft.node.raftnode import RaftNode


class SnapshotTransfer:
    def __init__(self, node: RaftNode) -> None:
        self.node = node
        #: Leader: a reader of each snapshot the engine may still send, by index.
        self.readers: dict[int, BinaryIO] = {}
        #: Follower: the snapshot being received, (last included index, spool file).
        self.incoming: tuple[int, BinaryIO] | None = None

    def fill_chunk(self, c: SendSnapshotChunk) -> InstallSnapshot | None:
        """The chunk's data, read at its offset; None if that snapshot is gone (the
        engine sends the chunk of a newer one later)."""
        m = c.message
        reader = self.readers.get(m.meta.last_included_index)
        if reader is None:
            return None
        # A page-cache read of one chunk; chunks are sent one at a time.
        reader.seek(m.offset)
        m.data = reader.read(c.length)
        return m

    def snapshot_saved(self, op: SaveSnapshot) -> None:
        """A snapshot write is durable: keep its reader, drop readers no longer in use."""
        engine = self.node.engine
        if op.reader is not None:
            self.readers[op.meta.last_included_index] = op.reader
            if not op.installed:
                engine.snapshot_saved(op.meta, op.size)
        in_use = engine.snapshots_in_use()
        for index in [i for i in self.readers if i not in in_use]:
            self.readers.pop(index).close()
        if not op.durable.done():
            op.durable.set_result(op.meta.last_included_index)

    def store_chunk(self, frm: int, m: InstallSnapshot) -> SaveSnapshot | None:
        """Keep a chunk from the leader; on the last one, install the snapshot: returns
        the write that saves it (the restore is queued behind what is being applied)."""
        node = self.node
        index = m.meta.last_included_index
        if m.offset == 0:
            self.drop_incoming()
            self.incoming = (index, spool())
        inc = self.incoming
        engine = node.engine
        if inc is None or inc[0] != index:
            engine.snapshot_chunk_stored(frm, m, 0)
            return None
        received = inc[1].tell()
        if m.offset != received:
            engine.snapshot_chunk_stored(frm, m, received)  # resume where we are
            return None
        inc[1].write(m.data)
        received += len(m.data)
        if not m.done:
            engine.snapshot_chunk_stored(frm, m, received)
            return None
        self.incoming = None
        if index <= engine.commit_index:
            inc[1].close()
            engine.snapshot_installed(frm, m.meta, received)
            return None
        if node._proposals.waiting:  # a lost leadership's entries it covers
            node._recorder.proposals_dropped += node._proposals.fail_orphans_through(
                index, node._orphan_error("a snapshot of the new leader covers it: it may "
                                          "or may not be committed"))
        inc[1].seek(0)
        saved = node._loop.create_future()
        node._applier.committed_index = index
        node._applier.enqueue(Restore(m.meta, inc[1], saved))
        engine.snapshot_installed(frm, m.meta, received)
        return SaveSnapshot(m.meta, inc[1], installed=True, durable=saved)

    def drop_incoming(self) -> None:
        if self.incoming is not None:
            self.incoming[1].close()
            self.incoming = None

    def close(self) -> None:
        self.drop_incoming()
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
