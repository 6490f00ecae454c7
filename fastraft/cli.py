"""The ``fastraft`` command: ``demo``, ``node`` and ``status``."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys

from fastraft.addresses import parse_cluster
from fastraft.asyncutil import run_loop
from fastraft.errors import AlreadyInitialized, ConfigError, FastRaftError


def add_security_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("authentication (docs/security.md)")
    g.add_argument("--secret-file", metavar="FILE",
                   help="cluster secret (at least 16 bytes): peers and clients must hold it")
    g.add_argument("--tls-cert", metavar="FILE", help="this node's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE", help="the CA that signs every member (PEM)")
    g.add_argument("--tls-node-names", action="store_true",
                   help="a peer's certificate must name its node id (node-<id>)")


def security_options(args) -> dict:
    """``secret`` and ``tls`` keyword arguments for TcpNetwork, KVServer and KVClient."""
    from fastraft.transport.link import TlsConfig

    out: dict = {"secret": None, "tls": None}
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


def load_factory(spec: str):
    """``MODULE:NAME`` → the object ``NAME`` of module ``MODULE``."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"--state-machine {spec!r}: expected MODULE:NAME")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--state-machine {spec!r}: {exc}") from None


async def serve_node(args) -> int:
    """Run the node until SIGTERM/SIGINT (0), or until it stops itself because a hook
    failed (3: a supervisor restarts it, and the log says which entry)."""
    from fastraft import kv
    from fastraft.config import Config
    from fastraft.kvservice import KVServer
    from fastraft.node import RaftNode
    from fastraft.storage import MemoryStorage
    from fastraft.transport.tcp import TcpNetwork

    cluster = parse_cluster(args.cluster)
    if args.id not in cluster:
        raise ConfigError(f"--id {args.id} is not in --cluster")
    security = security_options(args)
    if args.data_dir:
        from fastraft.filestorage import FileStorage
        storage = FileStorage(args.data_dir, repair=args.repair)
    elif args.repair:
        raise ConfigError("--repair needs --data-dir")
    else:
        storage = MemoryStorage()
    store = load_factory(args.state_machine)() if args.state_machine else kv.KVStore()
    tuned: dict = {}
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
    config = Config(**tuned)
    node = RaftNode(args.id, storage=storage, state_machine=store, config=config,
                    cluster_id=args.cluster_id,
                    network=TcpNetwork(args.id, cluster[args.id], cluster_id=args.cluster_id,
                                       **security))
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
    server = KVServer(node, store, args.client, cluster_id=args.cluster_id, **security)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything allocated so far (modules, functions, types: most of what the collector
    # tracks) lives as long as the process: keep full collections from walking it again,
    # which shortens their pauses under load (docs/node.md, "Pauses").
    gc.freeze()
    print(f"node {args.id} ready: raft {cluster[args.id]}, clients {args.client}", flush=True)
    stopped = asyncio.ensure_future(node.wait_stopped())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopped, signalled}, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    await node.stop()
    _close(storage)
    signalled.cancel()
    if node.failure is not None:
        stopped.exception()  # retrieved: it is reported below
        print(f"fastraft node: {node.failure}", file=sys.stderr, flush=True)
        return 3
    return 0


def _close(storage) -> None:
    close = getattr(storage, "close", None)
    if close is not None:
        close()


async def show_status(args) -> None:
    from fastraft.kvservice import KVClient
    client = await KVClient.connect(args.address, cluster_id=args.cluster_id,
                                    **security_options(args))
    status = await client.status()
    client.close()
    print(json.dumps(status, indent=2, sort_keys=True))


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def main(argv: list[str] | None = None) -> None:
    from fastraft import __version__

    parser = argparse.ArgumentParser(
        prog="fastraft", description="Run and inspect fastraft clusters: a local demo, a KV "
        "node, a node's status, and the benchmarks (fastraft bench --help).")
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
    node.add_argument("--data-dir", help="durable storage directory (default: memory)")
    node.add_argument("--cluster-id", default="fastraft",
                      help="a name every member shares; storage and peers of another "
                           "cluster are refused (default: fastraft)")
    node.add_argument("--snapshot-interval", type=int, metavar="N",
                      help="snapshot every N applied entries (default: Config's)")
    node.add_argument("--log-cache-mib", type=float, metavar="MIB",
                      help="memory for log entries (default: Config.log_cache_bytes)")
    node.add_argument("--log-retention-entries", type=int, metavar="N",
                      help="keep N entries of log behind each snapshot (streams)")
    node.add_argument("--lease-reads", action="store_true",
                      help="serve reads on the leader under a lease, without a round trip "
                           "(Config.lease_reads: safe while clocks drift little)")
    node.add_argument("--init", action="store_true",
                      help="form the cluster from --cluster if this node is fresh")
    node.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                      help="WARNING (default); INFO adds role and membership changes")
    node.add_argument("--repair", action="store_true",
                      help="open a damaged --data-dir keeping its intact log; the node then "
                           "rejoins without voting until caught up (docs/storage.md)")
    node.add_argument("--state-machine", metavar="MODULE:NAME",
                      help="a KV state machine factory for the client port "
                           "(default: fastraft.kv:KVStore)")
    add_security_options(node)

    sub.add_parser("bench", help="benchmarks (see fastraft bench --help)", add_help=False)

    status = sub.add_parser("status", help="print a node's status")
    status.add_argument("--address", required=True, help="the node's client HOST:PORT")
    status.add_argument("--cluster-id", default="fastraft",
                        help="the cluster's name (default: fastraft)")
    add_security_options(status)

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
            logging.basicConfig(level=args.log_level,
                                format="%(asctime)s %(name)s %(levelname)s %(message)s")
            sys.exit(run_loop(serve_node(args)))
        else:
            run_loop(show_status(args))
    except FastRaftError as exc:  # refused to start: corrupt or foreign storage, config
        print(f"fastraft {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)
    except (ConnectionError, OSError) as exc:
        print(f"fastraft {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)
