"""A replicated KV service with an HTTP API that plain ``curl`` can use.

One process per node: a ``RaftNode`` on ``FileStorage`` whose state machine is a dict of
versioned values, and an aiohttp server in front of it. See README.md in this folder.
"""
from __future__ import annotations

import argparse
import asyncio
import logging

import msgspec
from aiohttp import web

from fastraft import Config, NotLeader, ProposalDropped, RaftNode
from fastraft.addresses import parse_cluster
from fastraft.filestorage import FileStorage
from fastraft.transport import TcpNetwork

#: A command in the log: ("put", key, value, expected_version | None) or ("del", key).
encode = msgspec.msgpack.encode
decode = msgspec.msgpack.decode


class VersionedKV:
    """The state machine. Every key has a version: the log index of its last write, so a
    compare-and-set names what it expects and a retried write can be told apart."""

    def __init__(self) -> None:
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
    def __init__(self, node: RaftNode, kv: VersionedKV, http: dict[int, str]) -> None:
        self.node = node
        self.kv = kv
        self.http = http

    def routes(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/kv/{key}", self.get), web.put("/kv/{key}", self.put),
                        web.delete("/kv/{key}", self.delete),
                        web.get("/status", self.status)])
        return app

    async def get(self, request: web.Request) -> web.Response:
        """Linearizable by default (read_index: a follower asks the leader); ``?stale=1``
        reads this node's state as it is, without a round trip."""
        if request.query.get("stale") != "1":
            try:
                await self.node.read_index(timeout=2.0)
            except NotLeader as exc:
                return self._no_leader(request, exc)
        found = self.kv.data.get(request.match_info["key"])
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
        s = self.node.status()
        return web.json_response({k: s[k] for k in ("id", "role", "term", "leader_id",
                                                     "commit_index", "applied_index")})

    async def _write(self, request: web.Request, command: tuple) -> web.Response:
        try:
            outcome, version = await self.node.propose(encode(command))
        except NotLeader as exc:
            return self._no_leader(request, exc)
        except ProposalDropped:
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
    kv = VersionedKV()
    storage = FileStorage(args.data_dir)
    node = RaftNode(args.id, storage=storage, state_machine=kv,
                    network=TcpNetwork(args.id, cluster[args.id]),
                    config=Config(snapshot_interval=args.snapshot_interval,
                                  snapshot_trailing_entries=min(args.snapshot_interval,
                                                                10_000)))
    await node.start()
    await node.initialize(cluster)  # a no-op on a restart
    runner = web.AppRunner(Service(node, kv, http).routes(), access_log=None)
    await runner.setup()
    host, port = http[args.id].rsplit(":", 1)
    await web.TCPSite(runner, host, int(port)).start()
    print(f"node {args.id}: http://{http[args.id]}", flush=True)
    try:
        await node.wait_stopped()
    finally:
        await runner.cleanup()
        await node.stop()
        storage.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--cluster", required=True, help="Raft addresses: 1=HOST:PORT,...")
    p.add_argument("--http", required=True, help="HTTP addresses: 1=HOST:PORT,...")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--snapshot-interval", type=int, default=10_000)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
