"""The leader's view of each follower's log (§5.3; etcd's tracker.Progress)."""
from __future__ import annotations

from collections import deque
from enum import IntEnum

from fastraft.messages import SnapshotMeta


class ProgressState(IntEnum):
    #: Next index unknown: one AppendEntries at a time until one succeeds.
    PROBE = 0
    #: Next index known: stream AppendEntries, up to the in-flight window.
    REPLICATE = 1
    #: The entries it needs were compacted: stream a snapshot, one chunk at a time (§7).
    SNAPSHOT = 2


class Progress:
    __slots__ = ("match_index", "next_index", "state", "probe_sent", "inflight",
                 "acked_seq", "match_at_heartbeat", "recent_active", "commit_sent",
                 "snapshot_index",
                 "snapshot_offset", "snapshot_meta", "snapshot_size", "snapshot_progressed",
                 "inflight_total", "reading_from", "read_rounds",
                 "sent_since_tick", "farewell", "farewell_rounds")

    def __init__(self, next_index: int) -> None:
        #: Highest index known to be in the follower's log and durable there; only grows
        #: while this node leads. Invariant: match_index < next_index.
        self.match_index = 0
        #: Index of the next entry to send (optimistic in REPLICATE).
        self.next_index = next_index
        self.state = ProgressState.PROBE
        #: PROBE only: a probe is outstanding, send no other until it is answered or the
        #: next heartbeat gives up on it.
        self.probe_sent = False
        #: REPLICATE only: the last index and payload bytes of each unacknowledged
        #: AppendEntries, oldest first (one deque: an empty one takes 770 bytes, in each
        #: follower's progress of every group led here), and their bytes' sum.
        self.inflight: deque[tuple[int, int]] = deque()
        self.inflight_total = 0
        #: Highest heartbeat sequence number the follower has echoed (ReadIndex).
        self.acked_seq = 0
        #: match_index when the last heartbeat went out: no progress over a whole
        #: heartbeat interval in REPLICATE means a message was lost, so probe again.
        self.match_at_heartbeat = 0
        #: Answered since the last check-quorum round.
        self.recent_active = False
        #: Highest leader_commit sent in an AppendEntries with a log check: when every
        #: entry is acknowledged, an empty one still has to carry a newer commit index.
        self.commit_sent = 0
        #: SNAPSHOT only: the snapshot being sent (a transfer finishes the snapshot it
        #: started with, even if a newer one is taken meanwhile), and the offset of the
        #: chunk in flight (probe_sent) or to send next.
        self.snapshot_index = 0
        self.snapshot_offset = 0
        self.snapshot_meta: SnapshotMeta | None = None
        self.snapshot_size = 0
        #: SNAPSHOT only: a chunk was answered since the last heartbeat; without that, the
        #: chunk in flight is taken as lost and sent again.
        self.snapshot_progressed = False
        #: Index its entries are being read from storage from (0: no read), and for how
        #: many heartbeat intervals: nothing else is sent to it meanwhile.
        self.reading_from = 0
        self.read_rounds = 0
        #: An AppendEntries went to it since the last heartbeat tick: it has heard from
        #: this leader, so the tick need not send it a heartbeat (``Engine``).
        self.sent_since_tick = False
        #: A node a configuration entry removed (0 while a member): the index of that
        #: entry, which the leader replicates to it before forgetting it, and for how
        #: many heartbeat intervals it has tried (``Engine.departing``).
        self.farewell = 0
        self.farewell_rounds = 0

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._clear_inflight()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._clear_inflight()

    def become_snapshot(self, meta: SnapshotMeta, size: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot_meta = meta
        self.snapshot_size = size
        self.snapshot_index = meta.last_included_index
        self.snapshot_offset = 0
        self.snapshot_progressed = False
        self.probe_sent = False
        self._clear_inflight()

    def is_paused(self, max_inflight: int, max_bytes: int) -> bool:
        if self.reading_from:
            return True
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.SNAPSHOT:
            return True
        return len(self.inflight) >= max_inflight or self.inflight_total >= max_bytes

    def sent(self, last_index: int, nbytes: int) -> None:
        """An AppendEntries ending at ``last_index`` with ``nbytes`` of payload is in flight."""
        self.inflight.append((last_index, nbytes))
        self.inflight_total += nbytes

    def _clear_inflight(self) -> None:
        self.inflight.clear()
        self.inflight_total = 0

    def acknowledge(self, index: int) -> bool:
        """Record that the follower holds entries up to ``index``; True if that is news."""
        if index <= self.match_index:
            return False
        self.match_index = index
        if self.next_index <= index:
            self.next_index = index + 1
        inflight = self.inflight
        while inflight and inflight[0][0] <= index:
            self.inflight_total -= inflight.popleft()[1]
        return True

    def as_dict(self) -> dict[str, object]:
        return {"match_index": self.match_index, "next_index": self.next_index,
                "state": self.state.name.lower(), "inflight": len(self.inflight)}
