"""The ``fastraft`` command: ``demo``, ``node`` and ``status``."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from fastraft.addresses import parse_address, parse_addresses, parse_cluster
from fastraft.asyncutil import run_loop, wait_within
from fastraft.errors import AlreadyInitialized, ConfigError, FastRaftError
from fastraft.gcpolicy import settle_gc
from fastraft.mallocpolicy import settle_malloc

if TYPE_CHECKING:  # the commands import what they run when they run
    from fastraft.config import Config
    from fastraft.host import RaftHost
    from fastraft.kvservice import KVServer
    from fastraft.node import RaftNode
    from fastraft.transport.tcp import TcpNetwork


def add_security_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("authentication (docs/security.md)")
    g.add_argument("--secret-file", metavar="FILE",
                   help="cluster secret (at least 16 bytes): peers and clients must hold it")
    g.add_argument("--tls-cert", metavar="FILE", help="this node's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE", help="the CA that signs every member (PEM)")
    g.add_argument("--tls-node-names", action="store_true",
                   help="a peer's certificate must name its node id (node-<id>)")


def add_timing_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("timing (defaults suit a LAN; docs/network.md)")
    g.add_argument("--heartbeat-interval", type=_positive(float), metavar="SECONDS",
                   help="a leader's heartbeat interval (default 0.05)")
    g.add_argument("--election-timeout", type=_positive(float), metavar="SECONDS",
                   help="a follower campaigns after hearing nothing from a leader for a "
                        "time drawn from [SECONDS, 2 x SECONDS) (default 0.15); well above "
                        "the heartbeat interval and the slowest round trip")
    g.add_argument("--unacked-timeout", type=_positive(float), default=2.0,
                   metavar="SECONDS", help="give up and redial a peer connection whose data "
                   "stays unacknowledged this long (default 2)")
    g.add_argument("--connect-timeout", type=_positive(float), default=2.0,
                   metavar="SECONDS", help="give up and redial a dial not answered in this "
                   "long (default 2)")


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    """``secret`` and ``tls`` keyword arguments for TcpNetwork, KVServer and KVClient."""
    from fastraft.transport.link import TlsConfig

    out: dict[str, Any] = {"secret": None, "tls": None}
    if args.secret_file:
        try:
            with open(args.secret_file, "rb") as f:
                out["secret"] = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--secret-file: {exc}") from None
    tls = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls):
        if not all(tls):
            raise ConfigError("--tls-cert, --tls-key and --tls-ca go together")
        out["tls"] = TlsConfig(certfile=args.tls_cert, keyfile=args.tls_key,
                               cafile=args.tls_ca, node_names=args.tls_node_names)
    return out


def node_network(args: argparse.Namespace, cluster: dict[int, str],
                 security: dict[str, Any]) -> TcpNetwork:
    """The node's transport, as its arguments say."""
    from fastraft.transport.tcp import TcpNetwork

    return TcpNetwork(args.id, cluster[args.id], cluster_id=args.cluster_id,
                      unacked_timeout=args.unacked_timeout,
                      connect_timeout=args.connect_timeout, **security)


def load_factory(spec: str) -> Any:
    """``MODULE:NAME`` → the object ``NAME`` of module ``MODULE``."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"--state-machine {spec!r}: expected MODULE:NAME")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--state-machine {spec!r}: {exc}") from None


async def serve_node(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM/SIGINT (0), or until it stops itself because a hook
    failed (3: a supervisor restarts it, and the log says which entry). With ``--groups
    N`` the node is a ``RaftHost`` of N groups, a KV store each (one ``SharedWAL`` in
    ``--data-dir``), and it stops when any of them does."""
    from fastraft import kv
    from fastraft.kvservice import KVServer
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage, RaftStorage

    settle_malloc()  # before the node's first big blocks
    cluster = parse_cluster(args.cluster)
    if args.id not in cluster:
        raise ConfigError(f"--id {args.id} is not in --cluster")
    if args.repair and not args.data_dir:
        raise ConfigError("--repair needs --data-dir")
    security = security_options(args)
    factory = load_factory(args.state_machine) if args.state_machine else kv.KVStore
    network = node_network(args, cluster, security)
    clients = parse_cluster(args.clients, "--clients") if args.clients else {}
    options = dict(cluster_id=args.cluster_id, client_addresses=clients, **security)
    if args.groups > 1:
        return await _serve_host(args, cluster, network, factory, options)
    storage: RaftStorage
    if args.data_dir:
        from fastraft.filestorage import FileStorage
        storage = FileStorage(args.data_dir, repair=args.repair)
    else:
        storage = MemoryStorage()
    store = factory()
    node = RaftNode(args.id, storage=storage, state_machine=store, config=_config(args),
                    cluster_id=args.cluster_id, network=network)
    try:
        await node.start()
    except BaseException:
        _close(storage)
        raise
    if args.init:
        try:
            await node.initialize(cluster)
        except AlreadyInitialized:
            # A restart of a node whose cluster has changed since it was formed: its data
            # says what the cluster is (like etcd ignoring --initial-cluster then).
            logging.getLogger("fastraft.cli").info(
                "node %d has state from an earlier run; --init ignored", args.id)
    server = KVServer(node, store, args.client, **options)
    failed = await _serve(args, server, node, [node], f"raft {cluster[args.id]}")
    await node.stop()
    await server.drain()
    _close(storage)
    return failed


async def _serve_host(args: argparse.Namespace, cluster: dict[int, str],
                      network: TcpNetwork, factory: Callable[[], Any],
                      options: dict[str, Any]) -> int:
    from fastraft.host import RaftHost
    from fastraft.kvservice import KVServer
    from fastraft.storage import MemoryStorage

    wal = None
    known: set[int] = set()
    if args.data_dir:
        from fastraft.sharedwal import SharedWAL
        wal = SharedWAL(args.data_dir, repair=args.repair)
        known = set(wal.group_ids())  # the groups this node ran before: a restart
        try:
            _keep_group_count(wal.directory, args.groups, known)
        except BaseException:
            wal.close()
            raise
    config = _host_config(args)
    # --log-cache-mib bounds the node's memory for entries whatever --groups says: one
    # budget for all its groups (quiet ones keep none), not one cache each.
    host = RaftHost(args.id, network=network, config=config,
                    log_cache_bytes=config.log_cache_bytes, cluster_id=args.cluster_id,
                    storage=wal.group if wal is not None else lambda g: MemoryStorage())
    stores = [factory() for _ in range(args.groups)]
    server: KVServer | None = None
    try:
        await host.start()
        for g, store in enumerate(stores):
            # a group this node has state of restarts on it; --init founds the others
            founding = cluster if args.init and g not in known else None
            await host.create_group(g, founding, state_machine=store)
        server = KVServer.sharded(host, stores, args.client, **options)
        failed = await _serve(args, server, host, list(host.groups.values()),
                              f"raft {cluster[args.id]}, {args.groups} groups")
    finally:
        await host.stop()
        if server is not None:
            await server.drain()
        if wal is not None:
            wal.close()
    return failed


class _GroupCount(msgspec.Struct):
    groups: int


def _keep_group_count(directory: str, groups: int, known: set[int]) -> None:
    """A key belongs to group crc32(key) % N: a data directory keeps the N it was first
    served with (in its file ``groups``) and refuses another, with which every node
    would look for most keys in the wrong group (acknowledged writes seemingly lost)."""
    from fastraft.walformat import _checked, _read_checked, _write_atomically

    saved = _read_checked(os.path.join(directory, "groups"), _GroupCount)
    before = saved.groups if saved is not None else max(known, default=-1) + 1
    if before > groups or saved is not None and before != groups:
        raise ConfigError(f"--groups {groups}: {directory} was served with --groups "
                          f"{before} (a key belongs to group crc32(key) % N: with another "
                          f"N most keys are looked for in the wrong group); start with "
                          f"--groups {before}")
    if saved is None:
        _write_atomically(directory, "groups", _checked(_GroupCount(groups)))


def _host_config(args: argparse.Namespace) -> Config:
    """``_config`` with the groups going quiet after as many heartbeats as a host's
    groups do by default (so later with longer heartbeats)."""
    from fastraft.config import Config
    from fastraft.host import DEFAULT_QUIESCE_AFTER

    config = _config(args)
    beats = DEFAULT_QUIESCE_AFTER / Config().heartbeat_interval
    return msgspec.structs.replace(config, quiesce_after=max(
        DEFAULT_QUIESCE_AFTER, beats * config.heartbeat_interval))


def _config(args: argparse.Namespace) -> Config:
    from fastraft.config import Config

    tuned: dict[str, Any] = {}
    if args.snapshot_interval is not None:
        tuned.update(snapshot_interval=args.snapshot_interval,
                     snapshot_trailing_entries=min(Config().snapshot_trailing_entries,
                                                   args.snapshot_interval))
    if args.log_cache_mib is not None:
        tuned["log_cache_bytes"] = int(args.log_cache_mib * (1 << 20))
    if args.log_retention_entries is not None:
        tuned["log_retention_entries"] = args.log_retention_entries
    if args.lease_reads:
        tuned["lease_reads"] = True
    if args.stop_when_removed:
        tuned["stop_when_removed"] = True
    if args.heartbeat_interval is not None:
        tuned["heartbeat_interval"] = args.heartbeat_interval
    if args.election_timeout is not None:
        tuned.update(election_timeout_min=args.election_timeout,
                     election_timeout_max=2 * args.election_timeout)
    if args.metrics:
        tuned["measure_durations"] = True  # the histograms the exporter serves
    return Config(**tuned)


async def _serve(args: argparse.Namespace, server: KVServer, measured: RaftNode | RaftHost,
                 nodes: list[RaftNode], where: str) -> int:
    """Serve clients (and ``--metrics`` of ``measured``, a node or a host) until a signal
    (0), until one of ``nodes`` stops itself after a hook failed (3, its failure on
    stderr), or until all of them stopped, removed (0, ``--stop-when-removed``)."""
    await server.start()
    metrics = None
    if args.metrics:
        from fastraft.metrics import MetricsServer
        metrics = MetricsServer(measured, args.metrics, max_apply_lag=args.health_max_lag,
                                per_group=args.metrics_per_group)
        await metrics.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything allocated so far (modules, functions, types: most of what the collector
    # tracks; a host's groups) lives as long as the process (docs/node.md, "Pauses").
    settle_gc()
    print(f"node {args.id} ready: {where}, clients {args.client}"
          + (f", metrics http://{metrics.address}/metrics" if metrics else ""), flush=True)
    stopped = [asyncio.ensure_future(node.wait_stopped()) for node in nodes]
    signalled = asyncio.ensure_future(stop.wait())
    running = set(stopped)
    while running and not signalled.done() and all(n.failure is None for n in nodes):
        done, _ = await asyncio.wait({*running, signalled},
                                     return_when=asyncio.FIRST_COMPLETED)
        running -= done
    if signalled.done():
        # A planned stop: the writes in flight get their answers, and clients are sent
        # to the new leaders, rather than hear "may or may not" (a rolling restart). A
        # live voter takes over within milliseconds; one election timeout at most, as
        # the others may be stopping too (the whole cluster shut down).
        await measured.step_down(_config(args).election_timeout_max)
    await server.shutdown()
    if metrics is not None:
        await metrics.stop()
    signalled.cancel()
    failures = [node.failure for node in nodes if node.failure is not None]
    for task in stopped:
        if task.done():
            task.exception()  # retrieved: a failure is reported below
        else:
            task.cancel()
    if failures:
        print(f"fastraft node: {failures[0]}", file=sys.stderr, flush=True)
        return 3
    if not running:
        print(f"fastraft node: node {args.id} was removed from the cluster"
              f"{' (every group)' if len(nodes) > 1 else ''}: stopped (--stop-when-removed)",
              file=sys.stderr, flush=True)
    return 0


def _close(storage: object) -> None:
    close = getattr(storage, "close", None)
    if close is not None:
        close()


async def show_status(args: argparse.Namespace) -> int:
    from fastraft.kvclient import ClientError, KVClient
    client = await KVClient.connect(args.address, cluster_id=args.cluster_id,
                                    **security_options(args))
    try:
        status = await client.status(args.group)
    except ClientError as exc:  # a group the node does not serve
        print(f"fastraft status: {exc.error}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


async def cluster_status(args: argparse.Namespace) -> int:
    """One row per node, like ``etcdctl endpoint status --cluster -w table`` (nodes of
    several groups, without ``--group``: their hosts' figures); 1 if a node did not
    answer."""
    from fastraft.kvclient import ClientError, KVClient

    addresses = parse_addresses(args.cluster)
    security = security_options(args)

    async def one(address: str) -> dict[str, Any]:
        try:
            client = await KVClient.connect(address, timeout=2.0,
                                            cluster_id=args.cluster_id, **security)
        except (OSError, asyncio.TimeoutError) as exc:
            return {"address": address, "error": str(exc) or type(exc).__name__}
        try:
            return {"address": address,
                    **await wait_within(client.status(args.group), 2.0)}
        except (OSError, asyncio.TimeoutError) as exc:
            return {"address": address, "error": str(exc) or type(exc).__name__}
        except ClientError as exc:  # a group the node does not serve
            return {"address": address, "error": exc.error, "refused": True}
        finally:
            client.close()
    rows = await asyncio.gather(*[one(a) for a in addresses])
    commit = max((r["commit_index"] for r in rows if "error" not in r), default=0)
    for r in rows:
        if "error" not in r:
            r["lag"] = commit - r["applied_index"]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 1 if any("error" in r for r in rows) else 0
    hosts = any("host" in r for r in rows)
    if hosts:  # nodes of several groups, none named: each node's host at a glance
        head: tuple[str, ...] = ("ID", "ADDRESS", "GROUPS", "LEADING", "QUIET", "CAMPAIGNING",
                                 "FAILED", "REMOVED", "SUSPECTED")
    else:
        head = ("ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "LAG",
                "LAST CONTACT")

    def cells(r: dict[str, Any]) -> tuple[str, ...]:
        if "error" in r:
            return ("?", r["address"], ("refused: " if r.get("refused") else "unreachable: ")
                    + r["error"])
        if hosts:
            h = r["host"]
            return (str(r["id"]), r["address"], str(h["groups"]), str(h["leading"]),
                    str(h["quiet"]), str(h["campaigning"]), str(len(h["failed"])),
                    str(len(h["removed"])), ",".join(map(str, h["suspected"])) or "-")
        role = "removed" if r.get("removed") else r["role"]
        return (str(r["id"]), r["address"], role, str(r["term"]), str(r["leader_id"]),
                str(r["commit_index"]), str(r["applied_index"]), str(r["lag"]),
                _contact(r.get("last_contact"), r["role"]))
    table = [head] + [cells(r) for r in rows]
    widths = [max(len(row[k]) for row in table if len(row) == len(head))
              for k in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(widths[k]) if k < len(row) - 1 else cell
                        for k, cell in enumerate(row)))
    return 1 if any("error" in r for r in rows) else 0


def _contact(seconds: float | None, role: str) -> str:
    """The LAST CONTACT cell: how long since the node heard from its leader."""
    if role == "leader":
        return "-"
    if seconds is None:
        return "never"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.0f}s"


#: How long ``fastraft kv`` waits for a node to answer, and for a leader (an election).
KV_TIMEOUT = 5.0


async def kv_command(args: argparse.Namespace) -> int:
    """``fastraft kv put|get|del``: on the leader of the key's group among ``--address``
    (``KVCluster``: redirects followed, an election waited out)."""
    from fastraft.kvclient import ClientError
    from fastraft.kvcluster import KVCluster

    addresses = [a.strip() for a in args.address.split(",") if a.strip()]
    try:
        cluster = await KVCluster.connect(addresses, timeout=KV_TIMEOUT,
                                          cluster_id=args.cluster_id,
                                          **security_options(args))
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; list every node's client address in --address") \
            from None
    try:
        if args.op == "get":
            value = await cluster.get(args.key)
            if value is None:
                print(f"fastraft kv: {args.key!r} is not set", file=sys.stderr)
                return 1
            sys.stdout.write(value.decode(errors="replace") + "\n")
        elif args.op == "put":
            print(f"version {await cluster.put(args.key, args.value.encode())}")
        else:
            print(f"version {await cluster.delete(args.key)}")
        return 0
    except ClientError as exc:
        raise ConfigError(str(exc)) from None
    except TimeoutError as exc:
        raise ConnectionError(f"{exc}; list every node's client address in --address") \
            from None
    finally:
        cluster.close()


async def member_command(args: argparse.Namespace) -> int:
    """``fastraft member add|update|remove``: the change in every group the nodes of
    ``--cluster`` serve, or in ``--group``, each on its own leader; 1 if a group failed."""
    from fastraft.members import change_members, connect

    addresses = parse_addresses(args.cluster)
    clients, groups = await connect(addresses, cluster_id=args.cluster_id,
                                    **security_options(args))
    try:
        if args.group is not None:
            groups = [args.group]
        failed = await change_members(clients, args.op, args.node, args.address, groups,
                                      learner=args.learner, timeout=args.timeout)
    finally:
        for c in clients.values():
            c.close()
    return 1 if failed else 0


def _positive(kind: Callable[[str], _N]) -> Callable[[str], _N]:
    def parse(text: str) -> _N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


_N = TypeVar("_N", int, float)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(level: str, form: str) -> None:
    handler = logging.StreamHandler()
    if form == "json":
        from fastraft.logutil import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s "
                                               "%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _metrics_available() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError("--metrics needs prometheus-client: "
                          "pip install 'fastraft[metrics]'") from None


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments (``fastraft bench`` parses its own)."""
    from fastraft import __version__

    parser = argparse.ArgumentParser(
        prog="fastraft", description="Run and inspect fastraft clusters: a local demo, a KV "
        "node, a node's status, membership changes, and the benchmarks (fastraft bench --help).")
    parser.add_argument("--version", action="version", version=f"fastraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a local cluster, write, read, kill the leader")
    demo.add_argument("--nodes", type=_positive(int), default=3,
                      help="processes in the cluster (default 3)")
    demo.add_argument("--seconds", type=_positive(float), default=8.0,
                      help="seconds of writes (half before, half after the leader is killed)")
    demo.add_argument("--inflight", type=_positive(int), default=256,
                      help="concurrent writes")
    demo.add_argument("--data-dir", help="keep each node's log in DIR/node-N (FileStorage)")

    node = sub.add_parser("node", help="run one KV node")
    node.add_argument("--id", type=_positive(int), required=True,
                      help="this node's id: one of those in --cluster")
    node.add_argument("--cluster", required=True, help="1=HOST:PORT,2=HOST:PORT,...")
    node.add_argument("--client", required=True, help="HOST:PORT for KV clients")
    node.add_argument("--clients", metavar="1=HOST:PORT,...",
                      help="every node's client address: a not-leader reply then names the "
                           "leader's, so clients follow it")
    node.add_argument("--data-dir", help="durable storage directory (default: memory)")
    node.add_argument("--cluster-id", default="fastraft",
                      help="a name every member shares; storage and peers of another "
                           "cluster are refused (default: fastraft)")
    node.add_argument("--snapshot-interval", type=int, metavar="N",
                      help="snapshot every N applied entries (default: Config's)")
    node.add_argument("--log-cache-mib", type=float, metavar="MIB",
                      help="memory for log entries (default: Config.log_cache_bytes); "
                           "with --groups, for all of them together")
    node.add_argument("--log-retention-entries", type=int, metavar="N",
                      help="keep N entries of log behind each snapshot (streams)")
    node.add_argument("--lease-reads", action="store_true",
                      help="serve reads on the leader under a lease, without a round trip "
                           "(Config.lease_reads: safe while clocks drift little)")
    node.add_argument("--stop-when-removed", action="store_true",
                      help="exit (0) once a membership change that took this node out has "
                           "committed; with --groups, once every group has (default: keep "
                           "running, out of the cluster, until stopped)")
    node.add_argument("--init", action="store_true",
                      help="form the cluster from --cluster if this node is fresh")
    node.add_argument("--groups", type=_positive(int), default=1, metavar="N",
                      help="run N Raft groups (a RaftHost), a KV store each: a key belongs "
                           "to group crc32(key) %% N; their logs share one WAL in --data-dir. "
                           "Every node says the same N (docs/multiraft.md)")
    node.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                      help="WARNING (default); INFO adds role and membership changes")
    node.add_argument("--log-format", default="text", choices=("text", "json"),
                      help="json: one object per line with the event's keys (event, node, "
                           "term, ...; docs/operations.md)")
    node.add_argument("--metrics", metavar="HOST:PORT",
                      help="serve Prometheus /metrics and /health here (needs "
                           "pip install 'fastraft[metrics]')")
    node.add_argument("--metrics-per-group", action="store_true",
                      help="with --groups: each group's own gauges too (fastraft_group_*, "
                           "seven series a group)")
    node.add_argument("--health-max-lag", type=_positive(int), default=1000, metavar="N",
                      help="/health fails when applied trails commit by more than N "
                           "entries (default 1000)")
    node.add_argument("--repair", action="store_true",
                      help="open a damaged --data-dir keeping its intact log; the node then "
                           "rejoins without voting until caught up (docs/storage.md)")
    node.add_argument("--state-machine", metavar="MODULE:NAME",
                      help="a KV state machine factory for the client port "
                           "(default: fastraft.kv:KVStore)")
    add_timing_options(node)
    add_security_options(node)

    sub.add_parser("bench", help="benchmarks (see fastraft bench --help)", add_help=False)

    status = sub.add_parser("status", help="print a node's status, or a table of them")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="one node's client HOST:PORT: its status as JSON")
    where.add_argument("--cluster", metavar="HOST:PORT,...",
                       help="every node's client address: one row each")
    status.add_argument("--json", action="store_true", help="with --cluster: JSON rows")
    status.add_argument("--group", type=int, metavar="G",
                        help="nodes of several groups (node --groups): group G's replica "
                             "(default: the node's status, its first group's role)")
    status.add_argument("--cluster-id", default="fastraft",
                        help="the cluster's name (default: fastraft)")
    add_security_options(status)

    kvp = sub.add_parser("kv", help="put, get or delete a key through the client port")
    kvp.add_argument("op", choices=("put", "get", "del"))
    kvp.add_argument("key")
    kvp.add_argument("value", nargs="?", help="for put")
    kvp.add_argument("--address", required=True, metavar="HOST:PORT,...",
                     help="client addresses of the nodes (the leader is found among them)")
    kvp.add_argument("--cluster-id", default="fastraft",
                     help="the cluster's name (default: fastraft)")
    add_security_options(kvp)

    member = sub.add_parser("member", help="add a node to, move it in, or remove it from, "
                            "every group (or one) of a running cluster")
    member_op = member.add_subparsers(dest="op", required=True)
    add = member_op.add_parser("add", help="add NODE as a learner, then a voter once caught up")
    add.add_argument("node", type=_positive(int), metavar="NODE", help="the new node's id")
    add.add_argument("address", metavar="RAFT_ADDRESS",
                     help="its Raft HOST:PORT (the one in its --cluster)")
    add.add_argument("--learner", action="store_true", help="stay a learner (no vote)")
    update = member_op.add_parser(
        "update", help="member NODE moved: it is now at RAFT_ADDRESS (restart it there on "
                       "its data first)")
    update.add_argument("node", type=_positive(int), metavar="NODE")
    update.add_argument("address", metavar="RAFT_ADDRESS",
                        help="its new Raft HOST:PORT (the one in its --cluster now)")
    update.set_defaults(learner=False)
    remove = member_op.add_parser("remove", help="remove NODE (a voter or a learner)")
    remove.add_argument("node", type=_positive(int), metavar="NODE")
    remove.set_defaults(address=None, learner=False)
    for p in (add, update, remove):
        p.add_argument("--cluster", required=True, metavar="HOST:PORT,...",
                       help="client addresses of the members (each group's leader is "
                            "found among them)")
        p.add_argument("--group", type=int, metavar="G",
                       help="nodes of several groups: group G only (default: every group)")
        p.add_argument("--timeout", type=_positive(float), default=60.0, metavar="SECONDS",
                       help="per group: its whole change, asked again while its leader "
                            "moves or another change is under way (default 60)")
        p.add_argument("--cluster-id", default="fastraft",
                       help="the cluster's name (default: fastraft)")
        add_security_options(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from fastraft.benchmark import main as bench_main
        sys.exit(bench_main(argv[1:]))
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from fastraft.demo import run_demo
            sys.exit(run_demo(args))
        elif args.command == "node":
            configure_logging(args.log_level, args.log_format)
            if args.metrics:
                parse_address(args.metrics)
                _metrics_available()
            sys.exit(run_loop(serve_node(args)))
        elif args.command == "kv":
            if (args.op == "put") != (args.value is not None):
                parser.error("kv put takes KEY VALUE; get and del take KEY")
            sys.exit(run_loop(kv_command(args)))
        elif args.command == "member":
            if args.op in ("add", "update"):
                parse_address(args.address)
            sys.exit(run_loop(member_command(args)))
        elif args.cluster:
            sys.exit(run_loop(cluster_status(args)))
        else:
            sys.exit(run_loop(show_status(args)))
    except FastRaftError as exc:  # refused to start: corrupt or foreign storage, config
        print(f"fastraft {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)
    except (ConnectionError, OSError) as exc:
        print(f"fastraft {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)
