"""``Config``: every tunable of a node, validated when built."""
from __future__ import annotations

import msgspec

from fastraft.errors import ConfigError

#: Room left in a network's frame for the AppendEntries around a single entry (its other
#: fields and the frame's headers take under a hundred bytes).
ENTRY_ENVELOPE_BYTES = 4096


_KIND = {float: "a number", int: "an int", bool: "True or False"}


class Config(msgspec.Struct, kw_only=True, frozen=True):
    """Timing, batching and back-pressure settings. Times are in seconds.

    The election timeout is drawn uniformly from ``[election_timeout_min,
    election_timeout_max)`` each time the timer is armed (§5.2); the heartbeat interval
    must be well below the minimum so a healthy leader is never suspected (§5.6).
    """

    election_timeout_min: float = 0.150
    election_timeout_max: float = 0.300
    heartbeat_interval: float = 0.050
    #: Most entries, and most payload bytes, in one AppendEntries.
    max_entries_per_message: int = 4096
    max_bytes_per_message: int = 1 << 20
    #: The largest entry payload ``propose`` takes (a larger one raises
    #: ``EntryTooLarge``). A network that states ``max_frame_bytes`` caps it as well, less
    #: ``ENTRY_ENVELOPE_BYTES`` for the message around the entry: the followers refuse a
    #: larger frame, and an entry nobody can receive would cost the leader its leadership.
    max_entry_bytes: int = 64 << 20
    #: Pipelined AppendEntries a follower may have unacknowledged (§5.3 "replicate"
    #: state), and their payload bytes: a follower is never sent more than it can take in
    #: before its election timer would notice the leader again.
    max_inflight_messages: int = 64
    max_inflight_bytes: int = 8 << 20
    #: Proposals accepted but not yet applied; beyond this ``propose`` waits (or raises
    #: ``Overloaded`` when ``overload_wait`` is 0).
    max_pending_proposals: int = 65536
    overload_wait: float = 5.0
    #: A leader that loses leadership (a transfer, an election) keeps the proposals and
    #: membership changes whose entries it had not committed waiting this many election
    #: timeouts (``election_timeout_max``) to learn whether a later leader commits them:
    #: those it does are answered with their results, the rest fail with
    #: ``ProposalDropped``. 0: fail them at once (may or may not be committed).
    lost_leadership_wait: float = 2.0
    #: Linearizable reads waiting for confirmation, on this node and (leader) forwarded
    #: by followers; beyond this a read fails at once (``Overloaded``; a follower's
    #: forwarded read is refused and retried there).
    max_pending_reads: int = 65536
    #: Thesis §9.6: a candidate first asks whether it could win, without raising terms.
    pre_vote: bool = True
    #: Thesis §6.2: a leader that has not heard from a quorum for an election timeout steps
    #: down, so proposals to a partitioned leader fail instead of hanging.
    check_quorum: bool = True

    #: A follower that already holds every entry learns a new commit index from the next
    #: AppendEntries; if none carries it within this many seconds, an empty one does.
    #: 0 sends it at once, at the price of two more messages per write when writes are
    #: sparse (which costs single-write latency on a busy machine).
    commit_notify_delay: float = 0.001
    #: Take a snapshot once this many entries were applied since the last one (0: only on
    #: demand), keep this many entries behind it for followers that lag a little (§7),
    #: and send snapshots in chunks of this many bytes, one chunk in flight per follower.
    snapshot_interval: int = 100_000
    snapshot_trailing_entries: int = 10_000
    snapshot_chunk_bytes: int = 1 << 20
    #: Memory for log entries (payloads plus about 112 bytes each). The terms of the whole
    #: log stay in memory; entry payloads only for the newest entries within this bound
    #: (and any not yet durable). Older entries are read back from storage: for followers
    #: that lag, for the state machine after a restart, for ``committed()`` readers.
    log_cache_bytes: int = 64 << 20
    #: Keep at least this many entries, and this many payload bytes, of the log behind a
    #: snapshot (0: no retention beyond ``snapshot_trailing_entries``): a stream built on
    #: the log reads records for as long as they are retained, whatever the snapshots.
    log_retention_entries: int = 0
    log_retention_bytes: int = 0
    #: A learner is promoted, and a host hands a group's leadership to its preferred
    #: leader (``RaftHost`` balancing), only once within this many entries of the leader's
    #: log.
    max_learner_lag: int = 1000

    #: Opt-in lease reads (thesis §6.4.1): a leader that confirmed its leadership with a
    #: quorum at time t serves reads without a round trip until
    #: t + election_timeout_min * (1 - max_clock_drift). Safe only if no node's clock runs
    #: more than ``max_clock_drift`` (as a fraction) slower or faster than another's over
    #: that span, and needs ``check_quorum`` (followers then refuse votes for that long
    #: after hearing a leader, and after their own start: they may have heard it just
    #: before a restart).
    lease_reads: bool = False
    max_clock_drift: float = 0.1

    #: Time every durable write batch, apply call, snapshot and commit for the duration
    #: histograms of ``RaftNode.metrics()`` (two clock reads per batch). Off, those
    #: histograms stay empty and everything else is still counted; ``fastraft node
    #: --metrics`` turns it on.
    measure_durations: bool = False

    #: Seconds a leader's group must be idle (everything committed and acknowledged by
    #: every member, no read or transfer going on) before it goes quiet: a last heartbeat
    #: tells the followers, and then no member of the group ticks or sends anything until
    #: a proposal, a read or any message wakes it. 0: never. Quiet followers no longer
    #: hear heartbeats, so something else must tell them their leader's process died:
    #: ``RaftHost`` does (one liveness exchange per pair of processes for all groups); a
    #: lone ``RaftNode`` refuses a non-zero value.
    quiesce_after: float = 0.0

    #: Stop the node once it has applied the configuration entry that takes it out of
    #: the group (a voter removed, a learner removed), as hashicorp/raft's
    #: ``ShutdownOnRemove`` and etcd do: ``wait_stopped()`` returns, and a ``RaftHost``
    #: forgets the replica (its storage stays). It waits for that entry to commit: a
    #: voter removed by an uncommitted change may still have to lead it to commit
    #: (thesis §4.1). Off, a removed node keeps running, out of the group, until stopped
    #: (``health()`` says to), and may be added back as it is.
    stop_when_removed: bool = False

    @property
    def lease_span(self) -> float:
        """Seconds a leader may serve reads without a round trip after a quorum confirmed
        it (see ``lease_reads``)."""
        return self.election_timeout_min * (1 - self.max_clock_drift)

    def __post_init__(self) -> None:
        # msgspec checks types when decoding, not when a Struct is built: a str here
        # would surface as a TypeError deep in the node. The default says the type (a
        # field of another kind, say one defaulting to None, checks its own).
        for field in msgspec.structs.fields(self):
            value, default = getattr(self, field.name), field.default
            if type(default) not in _KIND:
                continue
            if type(default) is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = type(value) is type(default)
            if not ok:
                raise ConfigError(f"{field.name} must be {_KIND[type(default)]}, got {value!r}")
        if not 0 < self.election_timeout_min < self.election_timeout_max:
            raise ConfigError(
                "need 0 < election_timeout_min < election_timeout_max, got "
                f"{self.election_timeout_min} and {self.election_timeout_max}")
        if not 0 < self.heartbeat_interval < self.election_timeout_min:
            raise ConfigError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be positive and below "
                f"election_timeout_min ({self.election_timeout_min}), or followers will time "
                "out while the leader is healthy")
        for name in ("max_entries_per_message", "max_bytes_per_message", "max_entry_bytes",
                     "max_inflight_messages", "max_inflight_bytes", "max_pending_proposals",
                     "max_pending_reads", "snapshot_chunk_bytes", "log_cache_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("snapshot_interval", "snapshot_trailing_entries", "max_learner_lag",
                     "log_retention_entries", "log_retention_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lease_reads and not self.check_quorum:
            raise ConfigError("lease_reads needs check_quorum: without it followers may vote "
                              "for a new leader while the old one still serves reads")
        if not 0 <= self.max_clock_drift < 1:
            raise ConfigError(f"max_clock_drift must be in [0, 1), got {self.max_clock_drift}")
        if not 0 <= self.commit_notify_delay < self.heartbeat_interval:
            raise ConfigError(f"commit_notify_delay must be in [0, heartbeat_interval), got "
                              f"{self.commit_notify_delay}")
        if self.quiesce_after and self.quiesce_after < self.heartbeat_interval:
            raise ConfigError(f"quiesce_after must be 0 (never) or at least heartbeat_interval "
                              f"({self.heartbeat_interval}), got {self.quiesce_after}")
        for name in ("overload_wait", "lost_leadership_wait"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
