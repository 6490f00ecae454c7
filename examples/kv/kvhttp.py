"""A replicated KV service with an HTTP API that plain ``curl`` can use.

One process per node: a ``RaftNode`` on ``FileStorage`` whose state machine is a dict of
versioned values, and an aiohttp server in front of it. With ``--shards N`` the keys are
spread over N Raft groups by hash, all in one ``RaftHost`` per process with their logs in
one ``SharedWAL``. See README.md in this folder.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import zlib

import msgspec
from aiohttp import web

from fastraft import Config, NotLeader, ProposalDropped, RaftHost, RaftNode
from fastraft.addresses import parse_cluster
from fastraft.filestorage import FileStorage
from fastraft.sharedwal import SharedWAL
from fastraft.transport import TcpNetwork

#: A command in the log: ("put", key, value, expected_version | None) or ("del", key).
encode = msgspec.msgpack.encode
decode = msgspec.msgpack.decode


class VersionedKV:
    """The state machine. Every key has a version: the log index of its last write, so a
    compare-and-set names what it expects and a retried write can be told apart."""

    def __init__(self) -> None:
        # One dict and a snapshot in one piece keep the example short; for millions of
        # keys see fastraft.kv.KVStore (sharded dicts, a streamed snapshot), as a dict
        # that grows rehashes all its keys in one step on the node's event loop.
        self.data: dict[str, tuple[bytes, int]] = {}

    def apply(self, entries):
        results = []
        for entry in entries:
            op, key, *rest = decode(entry.data)
            current = self.data.get(key)
            version = current[1] if current else 0
            if op == "put":
                value, expected = rest
                if expected is not None and expected != version:
                    results.append(("conflict", version))
                    continue
                self.data[key] = (value, entry.index)
                results.append(("ok", entry.index))
            else:
                self.data.pop(key, None)
                results.append(("ok", entry.index))
        return results

    def snapshot(self) -> bytes:
        return encode(self.data)

    def restore(self, data) -> None:
        self.data = {k: (v, n) for k, (v, n) in decode(data.read()).items()}


class Service:
    """The HTTP API over one or more shards: (Raft node, its state machine) pairs; a key
    belongs to shard ``crc32(key) % shards``."""

    def __init__(self, shards: list[tuple[RaftNode, VersionedKV]],
                 http: dict[int, str]) -> None:
        self.shards = shards
        self.http = http

    def shard(self, request: web.Request) -> tuple[RaftNode, VersionedKV]:
        key = request.match_info["key"].encode()
        return self.shards[zlib.crc32(key) % len(self.shards)]

    def routes(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/kv/{key}", self.get), web.put("/kv/{key}", self.put),
                        web.delete("/kv/{key}", self.delete),
                        web.get("/status", self.status)])
        return app

    async def get(self, request: web.Request) -> web.Response:
        """Linearizable by default (read_index: a follower asks the leader); ``?stale=1``
        reads this node's state as it is, without a round trip."""
        node, kv = self.shard(request)
        if request.query.get("stale") != "1":
            try:
                await node.read_index(timeout=2.0)
            except NotLeader as exc:
                return self._no_leader(request, exc)
        found = kv.data.get(request.match_info["key"])
        if found is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=found[0], headers={"X-Version": str(found[1])})

    async def put(self, request: web.Request) -> web.Response:
        expected = request.query.get("if_version")
        if expected is not None and not expected.isdigit():
            return web.Response(status=400, text="if_version: a version number\n")
        command = ("put", request.match_info["key"], await request.read(),
                   int(expected) if expected is not None else None)
        return await self._write(request, command)

    async def delete(self, request: web.Request) -> web.Response:
        return await self._write(request, ("del", request.match_info["key"]))

    async def status(self, request: web.Request) -> web.Response:
        """One node: its status; shards: ``{"shards": [status of each]}``."""
        rows = []
        for node, _ in self.shards:
            s = node.status()
            rows.append({k: s[k] for k in ("id", "role", "term", "leader_id",
                                           "commit_index", "applied_index")})
        return web.json_response(rows[0] if len(rows) == 1 else {"shards": rows})

    async def _write(self, request: web.Request, command: tuple) -> web.Response:
        node, _ = self.shard(request)
        try:
            outcome, version = await node.propose(encode(command))
        except NotLeader as exc:
            return self._no_leader(request, exc)
        except ProposalDropped as exc:
            if exc.committed is False:  # another entry was committed in its place
                return web.Response(status=503, text="leadership changed before the write "
                                    "committed: it was not applied; send it again\n")
            return web.Response(status=503, text="leadership changed before the write was "
                                "known committed: it may or may not have been applied\n")
        if outcome == "conflict":
            return web.Response(status=409, text=f"version is {version}\n",
                                headers={"X-Version": str(version)})
        return web.json_response({"version": version})

    def _no_leader(self, request: web.Request, exc: NotLeader) -> web.Response:
        """Writes go to the leader: 307 keeps the method and body (``curl -L`` follows)."""
        target = self.http.get(exc.leader_id) if exc.leader_id is not None else None
        if target is None:
            return web.Response(status=503, text="no leader yet; retry\n",
                                headers={"Retry-After": "1"})
        raise web.HTTPTemporaryRedirect(f"http://{target}{request.path_qs}")


async def serve(args) -> None:
    cluster = parse_cluster(args.cluster)
    http = parse_cluster(args.http)
    network = TcpNetwork(args.id, cluster[args.id])
    snapshots = dict(snapshot_interval=args.snapshot_interval,
                     snapshot_trailing_entries=min(args.snapshot_interval, 10_000))
    if args.shards == 1:
        kv = VersionedKV()
        storage = FileStorage(args.data_dir)
        node = RaftNode(args.id, storage=storage, state_machine=kv, network=network,
                        config=Config(**snapshots))
        await node.start()
        await node.initialize(cluster)  # a no-op on a restart
        shards = [(node, kv)]
        stop, close = node.stop, storage.close
    else:
        wal = SharedWAL(args.data_dir)  # every shard's log, one fsync per batch for all
        host = await RaftHost(args.id, network=network, storage=wal.group,
                              config=Config(quiesce_after=1.0, **snapshots)).start()
        known = wal.group_ids()  # the shards this process ran before: a restart
        shards = []
        for g in range(args.shards):
            kv = VersionedKV()
            shards.append((await host.create_group(g, None if g in known else cluster,
                                                   state_machine=kv), kv))
        stop, close = host.stop, wal.close
    runner = web.AppRunner(Service(shards, http).routes(), access_log=None)
    await runner.setup()
    address, port = http[args.id].rsplit(":", 1)
    await web.TCPSite(runner, address, int(port)).start()
    print(f"node {args.id}: http://{http[args.id]}", flush=True)
    try:  # until a node stops on its own (a failed disk, say)
        done, _ = await asyncio.wait([asyncio.ensure_future(node.wait_stopped())
                                      for node, _ in shards],
                                     return_when=asyncio.FIRST_COMPLETED)
        for stopped in done:
            stopped.result()  # raises NodeFailed saying why
    finally:
        await runner.cleanup()
        await stop()
        close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--cluster", required=True, help="Raft addresses: 1=HOST:PORT,...")
    p.add_argument("--http", required=True, help="HTTP addresses: 1=HOST:PORT,...")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--snapshot-interval", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=1,
                   help="Raft groups the keys are spread over (by hash); more than one: "
                        "a RaftHost and a SharedWAL in --data-dir")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
