"""A node's metrics: counters and histograms kept as plain numbers on the node, and the
``Metrics`` value that ``RaftNode.metrics()`` returns.

The node records per batch (a flush, a write batch, an apply call), never per entry, and
with plain ints and a fixed-bucket histogram, so the figures cost nothing measurable and
need no library. ``fastraft.metrics`` exports them in the Prometheus format when the
``fastraft[metrics]`` extra is installed.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

import msgspec

#: Bucket upper bounds, seconds: 50 µs (an in-memory commit) to 10 s (a stalled disk).
SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Bucket upper bounds, entries per batch: powers of two, so a count's bucket is
#: ``(n - 1).bit_length()`` (see ``Recorder.batch``), no search.
ENTRIES = tuple(1 << k for k in range(14))
_ABOVE_ENTRIES = len(ENTRIES)  # the bucket of counts above every bound


class Histogram:
    """Counts of observations per bucket (``bounds`` are upper bounds, inclusive; the last
    count is above them all), their sum and number."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def value(self) -> HistogramValue:
        return HistogramValue(self.bounds, tuple(self.counts), self.sum, self.count)


class HistogramValue(msgspec.Struct, frozen=True):
    """A histogram at one moment: ``counts[k]`` observations were at most ``bounds[k]``
    and above ``bounds[k - 1]``; ``counts[-1]`` were above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int


class FollowerMetrics(msgspec.Struct, frozen=True):
    """A follower as the leader sees it."""

    match_index: int
    #: Entries the follower is behind the leader's last index.
    lag: int
    #: "probe", "replicate" or "snapshot".
    state: str
    #: Seconds since the leader last heard from it (None: never).
    last_contact: float | None


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    """The counters and histograms a node records: a node's own in ``Metrics``, a
    host's groups' summed in ``HostMetrics``."""

    proposals_accepted: int
    proposals_dropped: int
    proposals_overloaded: int
    elections_started: int
    elections_won: int
    leader_changes: int
    #: Reads asked again of a new leader after a change of leader failed them.
    reads_retried: int
    #: Raft messages received and sent, by type name.
    messages_in: Mapping[str, int]
    messages_out: Mapping[str, int]
    #: Frame bytes, when the network counts them (the TCP transport does).
    bytes_in: int
    bytes_out: int
    #: Messages dropped unread, by reason ("stranger", "malformed").
    refused: Mapping[str, int]
    #: From a proposal's flush into the log to its commit being known, per flush. This,
    #: ``apply_seconds`` and ``log_write_seconds`` need ``Config.measure_durations``
    #: (snapshots are rare: they are always timed).
    commit_seconds: HistogramValue
    apply_batch_entries: HistogramValue
    apply_seconds: HistogramValue
    #: One write batch made durable (storage calls including the fsync).
    log_write_seconds: HistogramValue
    log_write_entries: HistogramValue
    snapshot_save_seconds: HistogramValue
    snapshot_install_seconds: HistogramValue


class Metrics(Counts, frozen=True, kw_only=True):
    """``RaftNode.metrics()``: the node's state and counters at one moment."""

    node_id: int
    running: bool
    #: "follower", "pre_candidate", "candidate", "leader" or "stopped".
    role: str
    term: int
    leader_id: int | None
    commit_index: int
    applied_index: int
    last_log_index: int
    snapshot_index: int
    voters: tuple[int, ...]
    learners: tuple[int, ...]
    #: Seconds since this node last heard from its leader (0 on the leader; None: never).
    last_contact: float | None
    #: On the leader, per follower; empty elsewhere.
    followers: Mapping[int, FollowerMetrics]
    #: The transport's counters (frames, bytes, drops), when it counts them (a node's
    #: own ``TcpNetwork``; a host's groups: ``HostMetrics.network``); else empty.
    network: Mapping[str, int]

    @property
    def state(self) -> tuple[object, ...]:
        """What ``watch_metrics`` compares: role, term, leader, indexes, membership."""
        return (self.running, self.role, self.term, self.leader_id, self.commit_index,
                self.applied_index, self.last_log_index, self.snapshot_index, self.voters,
                self.learners)


class GroupFigures(msgspec.Struct, frozen=True, array_like=True):
    """One group's replica on a host at a glance (``RaftHost.gather_group_figures``)."""

    group: int
    #: "follower", "pre_candidate", "candidate", "leader" or "stopped".
    role: str
    term: int
    #: The known leader; None: none.
    leader_id: int | None
    commit_index: int
    applied_index: int
    last_log_index: int
    quiet: bool


class HostMetrics(Counts, frozen=True, kw_only=True):
    """``RaftHost.metrics()``: the host, and its groups' ``Counts`` summed over every
    group's replica here."""

    node_id: int
    running: bool
    groups: int
    #: This host's replicas by role ("leader", "follower", ...).
    roles: Mapping[str, int]
    quiet: int
    #: Replicas that know no leader (an election going on, or no quorum reachable).
    without_leader: int
    #: The largest gap between a replica's commit index and its applied index.
    apply_lag: int
    #: In the groups led here: the most entries any follower is behind.
    follower_lag: int
    #: Bytes of log entries the groups here keep in memory, together (at most
    #: ``RaftHost(log_cache_bytes=...)`` and the entries not yet durable).
    log_cache_bytes: int
    #: With ``RaftHost(log_cache_bytes=...)``: the bytes every awake group may keep now, at
    #: least (half the budget split evenly among the awake groups; the other half goes to
    #: them by what each appended lately; quiet ones keep none); None without a budget.
    log_cache_share: int | None
    #: Peer hosts heard from by no frame for ``election_timeout_min``.
    suspected: tuple[int, ...]
    transfers: int
    #: Groups campaigning now, and election timers that ran out while ``max_campaigns``
    #: groups campaigned (they waited for a place).
    campaigning: int
    campaigns_postponed: int
    #: The transport's counters (frames, bytes, drops) for the whole host.
    network: Mapping[str, int]


#: The histograms every node records, by attribute name (of ``Recorder`` and ``Metrics``).
HISTOGRAMS = ("commit_seconds", "apply_batch_entries", "apply_seconds", "log_write_seconds",
              "log_write_entries", "snapshot_save_seconds", "snapshot_install_seconds")
#: The plain counters of ``Recorder``.
COUNTERS = ("proposals_accepted", "proposals_dropped", "proposals_overloaded",
            "elections_started", "elections_won", "leader_changes", "reads_retried")


class Recorder:
    """The live counters of one node (see the module docstring). With ``timing`` off
    (``Config.measure_durations``) the clock is never read: the duration histograms stay
    empty, the rest is counted.

    The hot path pays two Python calls per batch (``log_written`` or ``applied``, then
    ``batch``; cheaper than a ``functools.partial`` on Python 3.11) and plain increments
    elsewhere (the node counts messages by type in place): at one write in
    flight a few dozen calls per write cost several percent."""

    def __init__(self, timing: bool = False) -> None:
        self.timing = timing
        #: What the node reads the time with when it measures a duration; ``float()`` is
        #: 0.0, a C call that reads no clock.
        self.clock: Callable[[], float] = time.monotonic if timing else float
        self.proposals_accepted = 0
        self.proposals_dropped = 0
        self.proposals_overloaded = 0
        self.elections_started = 0
        self.elections_won = 0
        self.leader_changes = 0
        self.reads_retried = 0
        self.messages_in: defaultdict[type, int] = defaultdict(int)
        self.messages_out: defaultdict[type, int] = defaultdict(int)
        #: (last index of a flush, when it was flushed) awaiting their commit. Untimed,
        #: the durations are never observed and nothing is ever awaited: every node shares
        #: the same empty ones (an idle group of a host saves 1.3 KB).
        self.awaiting_commit: deque[tuple[int, float]] = deque() if timing else _NEVER_AWAITED
        self.commit_seconds = Histogram(SECONDS) if timing else _UNTIMED
        self.apply_batch_entries = Histogram(ENTRIES)
        self.apply_seconds = Histogram(SECONDS) if timing else _UNTIMED
        self.log_write_seconds = Histogram(SECONDS) if timing else _UNTIMED
        self.log_write_entries = Histogram(ENTRIES)
        self.snapshot_save_seconds = Histogram(SECONDS)
        self.snapshot_install_seconds = Histogram(SECONDS)

    def log_written(self, started: float, count: int) -> None:
        """A write batch of ``count`` entries, begun at ``started`` (``clock()``), is
        durable."""
        self.batch(self.log_write_seconds, self.log_write_entries, started, count)

    def applied(self, started: float, count: int) -> None:
        """The state machine applied ``count`` entries, from ``started`` (``clock()``)."""
        self.batch(self.apply_seconds, self.apply_batch_entries, started, count)

    def flushed(self, last_index: int) -> None:
        """Entries up to ``last_index`` went into the log now (timing on only)."""
        self.awaiting_commit.append((last_index, time.monotonic()))

    def batch(self, seconds: Histogram, sizes: Histogram, started: float, count: int) -> None:
        """A batch of ``count`` entries, begun at ``started`` (``clock()``), is done."""
        if self.timing:
            seconds.observe(time.monotonic() - started)
        bucket = (count - 1).bit_length() if count > 1 else 0  # = bisect_left(ENTRIES, count)
        sizes.counts[bucket if bucket < _ABOVE_ENTRIES else _ABOVE_ENTRIES] += 1
        sizes.sum += count
        sizes.count += 1

    def committed(self, index: int) -> None:
        awaiting = self.awaiting_commit
        now = time.monotonic()
        while awaiting and awaiting[0][0] <= index:
            self.commit_seconds.observe(now - awaiting.popleft()[1])


#: What untimed recorders share (``Recorder``): only ``flushed`` adds to the one, and only
#: ``batch`` and ``committed`` observe the other, each when timing.
_NEVER_AWAITED: deque[tuple[int, float]] = deque()
_UNTIMED = Histogram(SECONDS)


def by_name(counts: dict[type, int]) -> dict[str, int]:
    return {t.__name__: n for t, n in counts.items()}
