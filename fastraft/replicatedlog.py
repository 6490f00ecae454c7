"""A replicated log of records, for streams and queues built on a ``RaftNode``.

::

    log = ReplicatedLog(node)
    offsets = await log.append([b"r1", b"r2"])         # on the leader: durable on a quorum
    batch = await log.read(offsets[0], max_records=100)  # on any node
    async for batch in log.subscribe(1):               # replay, then follow live
        for record in batch:
            handle(record.index, record.data)

A record's offset is its Raft log index. Offsets increase but are not dense: the log
also holds leader no-ops, membership changes and, when a state machine shares the log,
its commands (records are entries of their own kind: the state machine never sees them,
and a stream never sees its commands). Dense offsets would need a second index kept in
step with the log through truncations and snapshots; the log index already is the
position every replica agrees on, so a consumer resumes from ``last.index + 1``.

Records stay readable while they are in the log: ``Config.log_retention_entries`` and
``log_retention_bytes`` keep them behind the state machine's snapshots. Reading an offset
no longer held raises ``OffsetCompacted``. A follower serves what it knows committed,
which may trail the leader; ``await node.read_index()`` first for a read that sees every
record acknowledged before it.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING

from fastraft.messages import Entry, EntryKind
from fastraft.node.arguments import check_count

if TYPE_CHECKING:
    from fastraft.node import RaftNode

_RECORD = EntryKind.RECORD


class ReplicatedLog:
    """Records appended through one node's leader, read on any node. See the module
    docstring."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node

    def append(self, records: Sequence[bytes]) -> Awaitable[list[int]]:
        """Append ``records`` as consecutive entries; ``await`` it for their offsets, once
        they are committed. Raises ``NotLeader`` on a follower, ``ProposalDropped`` if
        leadership was lost first (the records may or may not be in the log, unless its
        ``committed`` says; ``BatchPartlyCommitted`` names the offsets of those that
        were committed when the rest certainly were not, ``BatchRestUnknown`` when the
        rest may or may not be); waits, as
        ``propose`` does, while ``Config.max_pending_proposals`` entries are pending."""
        return self.node._propose_many(records, True)

    async def read(self, offset: int, max_records: int = 1000,
                   max_bytes: int = 1 << 20) -> list[Entry]:
        """Committed records from ``offset`` on: at most ``max_records``, and about
        ``max_bytes`` of payload (at least one record). Each is an ``Entry``: ``.index``
        is its offset, ``.data`` the record. Empty when none is committed yet."""
        self.node._check_running()
        _check_bounds(offset, max_records, max_bytes)
        batch, _ = await self.node._log_reader.committed(offset, _RECORD, max_records,
                                                         max_bytes)
        return batch

    def subscribe(self, offset: int = 1, max_records: int = 1000,
                  max_bytes: int = 1 << 20) -> AsyncIterator[list[Entry]]:
        """Batches of records from ``offset`` on: those in the log (from memory or
        storage), then new ones as they commit; ends when the node stops (raises its
        ``NodeFailed`` if it stopped itself). Each batch is
        read when the consumer asks for it, so a slow consumer costs the node nothing
        (but one that falls behind the retention bound gets ``OffsetCompacted``)."""
        self.node._check_running()
        _check_bounds(offset, max_records, max_bytes)
        return self.node._log_reader.follow(offset, _RECORD, max_records, max_bytes)

    async def first_offset(self) -> int:
        """The first offset this node still holds (older ones raise ``OffsetCompacted``)."""
        self.node._check_running()
        return await self.node._log_reader.first_index()


def _check_bounds(offset: int, max_records: int, max_bytes: int) -> None:
    check_count(offset, "offset (offsets start at 1)")
    check_count(max_records, "max_records")
    check_count(max_bytes, "max_bytes")
