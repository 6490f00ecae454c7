"""A host's groups' counters and histograms summed into one ``HostMetrics``
(``RaftHost.metrics`` and ``gather_metrics``)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from fastraft.engine import Role
from fastraft.node.metrics import COUNTERS, HISTOGRAMS, HistogramValue, HostMetrics, Recorder

if TYPE_CHECKING:
    from fastraft.host.rafthost import RaftHost
    from fastraft.node import RaftNode


class HostSums:
    """A host's groups' counters, summed as they are added (``RaftHost.metrics``)."""

    def __init__(self) -> None:
        self.roles: Counter[str] = Counter()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.messages_in: Counter[str] = Counter()
        self.messages_out: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.quiet = self.without_leader = self.apply_lag = self.follower_lag = 0
        self.log_cache_bytes = 0
        #: Per histogram: its bounds, bucket counts, sum and count so far.
        empty = Recorder()
        self.histograms = {name: (getattr(empty, name).bounds, [0] * len(
            getattr(empty, name).counts), [0.0, 0]) for name in HISTOGRAMS}

    def add(self, node: RaftNode, host_id: int) -> None:
        r = node._recorder
        counters = self.counters
        for name in COUNTERS:
            counters[name] += getattr(r, name)
        for kind, n in r.messages_in.items():
            self.messages_in[kind.__name__] += n
        for kind, n in r.messages_out.items():
            self.messages_out[kind.__name__] += n
        for name in HISTOGRAMS:
            h = getattr(r, name)
            if h.count:  # most are empty (durations are measured on request)
                _, counts, totals = self.histograms[name]
                for i, c in enumerate(h.counts):
                    counts[i] += c
                totals[0] += h.sum
                totals[1] += h.count
        role = node.role_name
        self.roles[role] += 1
        e = node.engine
        if e is None or role == "stopped":
            return
        self.quiet += e.quiet
        self.log_cache_bytes += e.log.cache_bytes
        self.without_leader += e.leader_id is None
        self.apply_lag = max(self.apply_lag, e.commit_index - node.applied_index)
        if e.refused:
            self.refused.update(e.refused)
        if e.role == Role.LEADER:
            last = e.log.last_index
            for peer, pr in e.progress.items():
                if peer != host_id:
                    self.follower_lag = max(self.follower_lag, last - pr.match_index)

    def result(self, host: RaftHost) -> HostMetrics:
        c = self.counters
        h = {name: HistogramValue(bounds, tuple(counts), float(totals[0]), int(totals[1]))
             for name, (bounds, counts, totals) in self.histograms.items()}
        stats = dict(host.network.stats)
        return HostMetrics(
            node_id=host.id, running=host._running, groups=len(host.groups),
            roles=dict(self.roles), quiet=self.quiet, without_leader=self.without_leader,
            apply_lag=self.apply_lag, follower_lag=self.follower_lag,
            log_cache_bytes=self.log_cache_bytes, log_cache_share=host.log_cache_share,
            suspected=tuple(sorted(host.suspected)),
            transfers=host.transfers,
            **host.campaign_figures(),
            network=stats, proposals_accepted=c["proposals_accepted"],
            proposals_dropped=c["proposals_dropped"],
            proposals_overloaded=c["proposals_overloaded"],
            elections_started=c["elections_started"], elections_won=c["elections_won"],
            leader_changes=c["leader_changes"], reads_retried=c["reads_retried"],
            messages_in=dict(self.messages_in),
            messages_out=dict(self.messages_out), bytes_in=stats.get("bytes_in", 0),
            bytes_out=stats.get("bytes_out", 0), refused=dict(self.refused),
            commit_seconds=h["commit_seconds"], apply_batch_entries=h["apply_batch_entries"],
            apply_seconds=h["apply_seconds"], log_write_seconds=h["log_write_seconds"],
            log_write_entries=h["log_write_entries"],
            snapshot_save_seconds=h["snapshot_save_seconds"],
            snapshot_install_seconds=h["snapshot_install_seconds"])
