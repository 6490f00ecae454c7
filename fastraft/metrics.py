"""``RaftNode.metrics()`` in the Prometheus text format, and a health check, over HTTP.

Needs the ``fastraft[metrics]`` extra (``prometheus-client``). The node keeps its counters
whether or not this module is used (``fastraft.node.metrics``); a scrape reads them once,
on the node's event loop, so the HTTP server (prometheus-client's, in a thread) never
touches the node's state from another thread.

``MetricsServer(node, "127.0.0.1:9100")`` serves ``GET /metrics`` and ``GET /health``: 200
and ``ok`` when the node has a leader and has applied to within ``max_apply_lag`` entries
of its commit index, else 503 and the reason (``RaftNode.health``). ``MetricsServer(host,
...)`` does the same for a ``RaftHost``: host figures and its groups' counters summed
(``RaftHost.metrics``), healthy when every group's replica is (``RaftHost.health``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import ThreadingWSGIServer
except ImportError as exc:  # pragma: no cover - depends on the extra being installed
    raise ImportError("fastraft.metrics needs prometheus-client: "
                      "pip install 'fastraft[metrics]'") from exc

from fastraft.addresses import parse_address
from fastraft.node import RaftNode
from fastraft.node.metrics import GroupFigures, HistogramValue, HostMetrics, Metrics

if TYPE_CHECKING:
    from fastraft.host import RaftHost

__all__ = ["MetricsServer", "families", "group_families"]

T = TypeVar("T")

ROLES = ("follower", "pre_candidate", "candidate", "leader", "stopped")
FOLLOWER_STATES = ("probe", "replicate", "snapshot")


def _histogram(name: str, doc: str, h: HistogramValue, node: str) -> HistogramMetricFamily:
    buckets = []
    total = 0
    for bound, count in zip(h.bounds, h.counts):
        total += count
        buckets.append((repr(float(bound)), total))
    buckets.append(("+Inf", h.count))
    family = HistogramMetricFamily(name, doc, labels=["node"])
    family.add_metric([node], buckets, h.sum)
    return family


def families(m: Metrics | HostMetrics) -> Iterator[Metric]:
    """The Prometheus metric families for a node's ``Metrics`` or a host's
    ``HostMetrics`` (whose counters and histograms, summed over its groups, have the
    names a single node's have)."""
    node = str(m.node_id)

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["node"])
        g.add_metric([node], value)
        return g

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["node"])
        c.add_metric([node], value)
        return c

    if isinstance(m, HostMetrics):
        yield from _host_families(m, gauge, counter)
    else:
        yield from _node_families(m, gauge)
    yield from _counter_families(m, node, counter)


_Gauge = Callable[[str, str, float], GaugeMetricFamily]
_Counter = Callable[[str, str, float], CounterMetricFamily]


def _host_families(m: HostMetrics, gauge: _Gauge, counter: _Counter) -> Iterator[Metric]:
    node = str(m.node_id)
    yield gauge("fastraft_host_groups", "Groups with a replica on this host.", m.groups)
    roles = GaugeMetricFamily("fastraft_host_groups_by_role",
                              "This host's replicas by their role.", labels=["node", "role"])
    for r in ROLES:
        roles.add_metric([node, r], m.roles.get(r, 0))
    yield roles
    yield gauge("fastraft_host_groups_quiet", "Replicas whose group is quiet (idle).",
                m.quiet)
    yield gauge("fastraft_host_groups_without_leader", "Replicas that know no leader.",
                m.without_leader)
    yield gauge("fastraft_host_apply_lag_entries",
                "The most entries any replica here has committed but not applied.",
                m.apply_lag)
    yield gauge("fastraft_host_follower_lag_entries",
                "In the groups led here: the most entries any follower is behind.",
                m.follower_lag)
    yield gauge("fastraft_host_log_cache_bytes",
                "Bytes of log entries the groups here keep in memory, together.",
                m.log_cache_bytes)
    if m.log_cache_share is not None:
        yield gauge("fastraft_host_log_cache_share_bytes",
                    "With a log cache budget: the bytes every awake group may keep now, at least.",
                    m.log_cache_share)
    yield gauge("fastraft_host_suspected_peers",
                "Peer hosts heard from by no frame for election_timeout_min.",
                len(m.suspected))
    yield counter("fastraft_host_leader_transfers",
                  "Leadership transfers to preferred leaders started.", m.transfers)
    yield gauge("fastraft_host_campaigning", "Groups campaigning now (at most "
                "max_campaigns).", m.campaigning)
    yield counter("fastraft_host_campaigns_postponed", "Election timers that ran out while "
                  "max_campaigns groups campaigned: they waited for a place.",
                  m.campaigns_postponed)
    yield from _transport_families("fastraft_host_frames", "fastraft_host_transport_dropped",
                                   node, m.network)


def _transport_families(frames_name: str, dropped_name: str, node: str,
                        network: Mapping[str, int]) -> Iterator[Metric]:
    """The transport's frames and drops: a host's, or a node's own ``TcpNetwork``'s."""
    frames = CounterMetricFamily(frames_name, "Transport frames by direction.",
                                 labels=["node", "direction"])
    frames.add_metric([node, "in"], network.get("frames_in", 0))
    frames.add_metric([node, "out"], network.get("frames_out", 0))
    yield frames
    dropped = CounterMetricFamily(
        dropped_name, "Messages or frames the transport dropped, "
        "by reason (queue full, bad frame, group not here, ...).", labels=["node", "reason"])
    for reason in ("dropped", "bad_frames", "unknown_group", "refused", "timeouts",
                   "evicted"):
        dropped.add_metric([node, reason], network.get(reason, 0))
    yield dropped


def _node_families(m: Metrics, gauge: _Gauge) -> Iterator[Metric]:
    node = str(m.node_id)
    yield gauge("fastraft_term", "Current term.", m.term)
    role = GaugeMetricFamily("fastraft_role", "1 for the node's current role.",
                             labels=["node", "role"])
    for r in ROLES:
        role.add_metric([node, r], 1.0 if m.role == r else 0.0)
    yield role
    yield gauge("fastraft_leader_id", "Id of the known leader (0: none).", m.leader_id or 0)
    yield gauge("fastraft_commit_index", "Highest index known committed.", m.commit_index)
    yield gauge("fastraft_applied_index", "Highest index the state machine applied.",
                m.applied_index)
    yield gauge("fastraft_last_log_index", "Index of the last entry in the log.",
                m.last_log_index)
    yield gauge("fastraft_snapshot_index", "Index the log is compacted to.",
                m.snapshot_index)
    yield gauge("fastraft_voters", "Voters in the configuration in force.", len(m.voters))
    yield gauge("fastraft_learners", "Learners in the configuration in force.",
                len(m.learners))
    if m.network:  # a host's are its own families (fastraft_host_frames, ...)
        yield from _transport_families("fastraft_frames", "fastraft_transport_dropped", node,
                                       m.network)
    if m.last_contact is not None:
        yield gauge("fastraft_leader_last_contact_seconds",
                    "Seconds since this node last heard from its leader (0 on the leader).",
                    m.last_contact)
    lag = GaugeMetricFamily("fastraft_follower_lag_entries",
                            "On the leader: entries a follower is behind its last index.",
                            labels=["node", "peer"])
    state = GaugeMetricFamily("fastraft_follower_state",
                              "On the leader: 1 for a follower's replication state.",
                              labels=["node", "peer", "state"])
    for peer, f in sorted(m.followers.items()):
        lag.add_metric([node, str(peer)], f.lag)
        for s in FOLLOWER_STATES:
            state.add_metric([node, str(peer), s], 1.0 if f.state == s else 0.0)
    yield lag
    yield state


#: A host's groups' own gauges (name, help), in the order of ``_group_values``.
GROUP_GAUGES = (
    ("fastraft_group_is_leader", "1 if this host's replica leads the group."),
    ("fastraft_group_leader_id", "The group's known leader (0: none)."),
    ("fastraft_group_term", "The replica's current term."),
    ("fastraft_group_commit_index", "Highest index the replica knows committed."),
    ("fastraft_group_applied_index", "Highest index its state machine applied."),
    ("fastraft_group_last_log_index", "Last index in the replica's log."),
    ("fastraft_group_quiet", "1 if the group is quiet (idle)."),
)


def _group_values(f: GroupFigures) -> tuple[float, ...]:
    return (f.role == "leader", f.leader_id or 0, f.term, f.commit_index, f.applied_index,
            f.last_log_index, f.quiet)


def group_families(node_id: int, groups: list[GroupFigures]) -> Iterator[Metric]:
    """A host's groups' own gauges, a series per group (``MetricsServer(host,
    per_group=True)``)."""
    node = str(node_id)
    rows = [([node, str(f.group)], _group_values(f)) for f in groups]
    for k, (name, doc) in enumerate(GROUP_GAUGES):
        family = GaugeMetricFamily(name, doc, labels=["node", "group"])
        for labels, values in rows:
            family.add_metric(labels, values[k])
        yield family


def _counter_families(m: Metrics | HostMetrics, node: str,
                      counter: _Counter) -> Iterator[Metric]:
    proposals = CounterMetricFamily(
        "fastraft_proposals", "Proposals by outcome: accepted into the leader's log, "
        "dropped (leadership lost before commit), refused as overloaded.",
        labels=["node", "outcome"])
    proposals.add_metric([node, "accepted"], m.proposals_accepted)
    proposals.add_metric([node, "dropped"], m.proposals_dropped)
    proposals.add_metric([node, "overloaded"], m.proposals_overloaded)
    yield proposals
    yield counter("fastraft_elections_started", "Elections this node started.",
                  m.elections_started)
    yield counter("fastraft_elections_won", "Elections this node won.", m.elections_won)
    yield counter("fastraft_leader_changes", "Times the known leader changed.",
                  m.leader_changes)
    yield counter("fastraft_reads_retried", "Linearizable reads asked again of a new "
                  "leader after a change of leader failed them.", m.reads_retried)
    messages = CounterMetricFamily("fastraft_messages", "Raft messages by direction and type.",
                                   labels=["node", "direction", "type"])
    for direction, counts in (("in", m.messages_in), ("out", m.messages_out)):
        for kind, n in sorted(counts.items()):
            messages.add_metric([node, direction, kind], n)
    yield messages
    net = CounterMetricFamily("fastraft_network_bytes", "Frame bytes by direction.",
                              labels=["node", "direction"])
    net.add_metric([node, "in"], m.bytes_in)
    net.add_metric([node, "out"], m.bytes_out)
    yield net
    refused = CounterMetricFamily("fastraft_refused_messages",
                                  "Messages dropped unread, by reason.",
                                  labels=["node", "reason"])
    for reason, n in sorted(m.refused.items()):
        refused.add_metric([node, reason], n)
    yield refused
    yield _histogram("fastraft_commit_seconds",
                     "From proposals entering the leader's log to their commit.",
                     m.commit_seconds, node)
    yield _histogram("fastraft_apply_batch_entries", "Entries per state machine apply call.",
                     m.apply_batch_entries, node)
    yield _histogram("fastraft_apply_seconds", "Duration of a state machine apply call.",
                     m.apply_seconds, node)
    yield _histogram("fastraft_log_write_seconds",
                     "Duration of a durable log write batch (storage calls and fsync).",
                     m.log_write_seconds, node)
    yield _histogram("fastraft_log_write_entries", "Entries per durable log write batch.",
                     m.log_write_entries, node)
    yield _histogram("fastraft_snapshot_save_seconds",
                     "From taking a snapshot to it being durable.",
                     m.snapshot_save_seconds, node)
    yield _histogram("fastraft_snapshot_install_seconds",
                     "Restoring the state machine from a snapshot received from the leader.",
                     m.snapshot_install_seconds, node)


class _Collector:
    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        target = self.server.node
        if isinstance(target, RaftNode):
            yield from families(self.server.on_loop(target.metrics))
        else:  # a host: summed in chunks, between which its groups keep running
            yield from families(self.server.on_loop_async(target.gather_metrics))
            if self.server.per_group:
                yield from group_families(
                    target.id, self.server.on_loop_async(target.gather_group_figures))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


class MetricsServer:
    """Serves ``/metrics`` and ``/health`` for ``node`` on ``address`` (``HOST:PORT``;
    port 0 picks one: see ``address`` once started). ``node`` may be a ``RaftHost``: its
    own figures and its groups' counters summed, and healthy when every group's replica
    is (``RaftHost.health``); ``per_group`` adds each group's own gauges
    (``fastraft_group_*``, labelled ``group``: seven series a group, for hosts of
    hundreds of groups rather than tens of thousands)."""

    def __init__(self, node: RaftNode | RaftHost, address: str, *,
                 max_apply_lag: int = 1000, per_group: bool = False) -> None:
        self.node = node
        self.per_group = per_group
        self.host, self.port = parse_address(address)
        self.max_apply_lag = max_apply_lag
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/health":
                reason = self.on_loop(lambda: self.node.health(self.max_apply_lag))
                status = "200 OK" if reason is None else "503 Service Unavailable"
                body = b"ok\n" if reason is None else reason.encode() + b"\n"
            else:
                status, body = "404 Not Found", b"try /metrics or /health\n"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))])
            return [body]

        self._server = make_server(self.host, self.port, app, ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fastraft-metrics", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
        server.server_close()

    def on_loop_async(self, fn: Callable[[], Coroutine[Any, Any, T]],
                      timeout: float = 5.0) -> T:
        """``await fn()`` on the node's event loop (from the HTTP server's thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def on_loop(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """``fn()`` run on the node's event loop (from the HTTP server's thread)."""
        assert self._loop is not None
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)
        self._loop.call_soon_threadsafe(run)
        return result.result(timeout)
