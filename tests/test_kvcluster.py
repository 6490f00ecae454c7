"""``KVCluster``: each request goes to its key's group leader, found from the nodes' status
and their redirects; what a failure is asked again for, and what is raised."""
import asyncio
import json

import pytest

from fastraft import kv
from fastraft.config import Config
from fastraft.errors import InvalidArgument
from fastraft.kvclient import ClientError, KVClient
from fastraft.kvcluster import KVCluster
from fastraft.kvprotocol import shard_of
from fastraft.kvservice import KVServer
from fastraft.processes import ProcessCluster, free_ports
from fastraft.testing import LocalCluster, wait_until

from aio import run, until

CONFIG = Config(election_timeout_min=0.1, election_timeout_max=0.2, heartbeat_interval=0.02)


class _Served:
    """Counts the requests each client port was sent, by its address."""

    def __init__(self, monkeypatch) -> None:
        self.by_address: dict[str, int] = {}
        request = KVClient.request

        def counted(client, op, *args, **kwargs):
            self.by_address[client.server_address] = \
                self.by_address.get(client.server_address, 0) + 1
            return request(client, op, *args, **kwargs)
        monkeypatch.setattr(KVClient, "request", counted)


async def client_ports(c):
    """A client port on each node of ``c``, each told the others' addresses: the
    addresses by node id, and the servers (started; the caller closes them)."""
    ports = free_ports(len(c.nodes))
    addresses = {i: f"127.0.0.1:{port}" for i, port in zip(c.nodes, ports)}
    servers = [KVServer(node, c.state_machines[i], addresses[i],
                        client_addresses=addresses) for i, node in c.nodes.items()]
    for server in servers:
        await server.start()
    return addresses, servers


@run
async def test_a_client_given_only_a_follower_finds_the_leader_through_its_redirect(
        monkeypatch):
    """One group, the client given a follower's port alone: the follower's not_leader
    names the leader's client port, which the client dials and keeps using; once the
    leader is stopped, a new one is found the same way and no read fails meanwhile."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=CONFIG) as c:
        addresses, servers = await client_ports(c)
        try:
            leader = await c.leader()
            follower = next(i for i in c.nodes if i != leader.id)
            await wait_until(lambda: c.nodes[follower].engine.leader_id == leader.id, 10,
                             "the follower knowing the leader")
            served = _Served(monkeypatch)
            cluster = await KVCluster.connect([addresses[follower]])
            assert cluster.groups == 1
            versions = [await cluster.put(f"k{n}", b"v%d" % n) for n in range(50)]
            assert versions == sorted(versions)
            for call, match in ((lambda: cluster.put(1, b"v"), "put's key is a str, not int"),
                                (lambda: cluster.put("k", "v"), "put's value is bytes"),
                                (lambda: cluster.get(b"k"), "get's key is a str, not bytes"),
                                (lambda: cluster.delete(None), "delete's key is a str")):
                with pytest.raises(InvalidArgument, match=match):
                    await call()
            assert cluster.leaders == [leader.id] and cluster.ids[leader.id] == addresses[
                leader.id]
            # each node's status as it is dialed, one redirect, then every write on the
            # leader
            assert served.by_address == {addresses[follower]: 2, addresses[leader.id]: 51}

            # the leader's process exits: its node stops, its port and connections close;
            # meanwhile its port answers not_leader (a request that never began: a
            # client asks elsewhere), not NodeStopped (which may or may not)
            await leader.stop()
            late = await KVClient.connect(addresses[leader.id])
            with pytest.raises(ClientError) as info:
                await late.put("late", b"l")
            assert info.value.error == "not_leader" and info.value.leader != leader.id
            with pytest.raises(ClientError) as info:
                await late.get("k0")
            assert info.value.error == "not_leader"
            late.close()
            servers[list(c.nodes).index(leader.id)].close()
            for client in cluster._clients.values():
                if client.server_address == addresses[leader.id]:
                    client.close()
            for n in range(50):
                assert await cluster.get(f"k{n}") == b"v%d" % n
            assert await cluster.put("after", b"a") > versions[-1]
            assert cluster.leaders[0] not in (None, leader.id)
            cluster.close()
        finally:
            for server in servers:
                server.close()


@run
async def test_nothing_answering_is_a_connection_error_and_arguments_are_checked():
    (port,) = free_ports(1)
    with pytest.raises(ConnectionError, match=f"no node answered at 127.0.0.1:{port} "
                                              "within 0.3s"):
        await KVCluster.connect([f"127.0.0.1:{port}"], timeout=0.3)
    with pytest.raises(InvalidArgument, match="at least one client address"):
        await KVCluster.connect([])
    with pytest.raises(InvalidArgument, match="timeout must be > 0"):
        await KVCluster.connect(["127.0.0.1:1"], timeout=0)


@run
async def test_a_node_without_a_leader_is_asked_again_until_the_timeout():
    """A lone node of a three-node cluster knows no leader: its not_leader is asked
    again, and after ``timeout`` the call raises TimeoutError naming the last answer."""
    async with LocalCluster(3, state_machine=kv.KVStore, config=CONFIG) as c:
        await c.leader()
        (port,) = free_ports(1)
        address = f"127.0.0.1:{port}"
        alone = next(iter(c.nodes))
        server = KVServer(c.nodes[alone], c.state_machines[alone], address)
        await server.start()
        try:
            for other in c.nodes:
                if other != alone:
                    await c.nodes[other].stop()
            await wait_until(lambda: c.nodes[alone].engine.leader_id is None, 10,
                             "the node knowing no leader")
            cluster = await KVCluster.connect([address], timeout=0.5)
            with pytest.raises(TimeoutError, match="no leader of group 0 answered within "
                                                    "0.5s .*not_leader"):
                await cluster.put("k", b"v")
            cluster.close()
        finally:
            server.close()


async def put_again_if_ambiguous(cluster, key, value, ambiguous):
    """A write whose connection was lost may or may not be in: the same value again."""
    while True:
        try:
            return await cluster.put(key, value)
        except ConnectionError:
            ambiguous.append(key)


@run
async def test_nodes_of_several_groups_a_leader_killed_and_restarted(tmp_path, monkeypatch):
    """Three ``fastraft node --groups 4``: the client learns the groups and their leaders
    and sends every write straight to its group's leader. A node killed under load: the
    writes in flight on it raise ConnectionError (they may or may not be in), the others
    go on on the groups' new leaders, reads never fail; restarted, it leads its groups
    again and the client follows; every acknowledged write is on every node."""
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--groups", "4"])
    kc = None
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        served = _Served(monkeypatch)
        kc = await KVCluster.connect(list(cluster.client.values()),
                                     cluster_id=cluster.cluster_id)
        assert kc.groups == 4 and set(kc.ids) == {1, 2, 3}
        await until(balanced(clients), "leaders balanced", 20)
        kc.leaders = (await clients[1].status())["leaders"]
        served.by_address.clear()
        keys = [f"key{k}" for k in range(200)]
        acked = {key: await kc.put(key, key.encode()) for key in keys}
        leading = {}
        for key in keys:
            address = cluster.client[kc.leaders[shard_of(key, 4)]]
            leading[address] = leading.get(address, 0) + 1
        assert served.by_address == leading  # no redirect, no status: straight there

        victim = kc.leaders[0]
        ambiguous = []
        putting = {}  # writer -> the key of the put it waits for
        stop = asyncio.Event()

        async def writer(w):
            n = 0
            while not stop.is_set():
                key = putting[w] = f"w{w}-{n}"
                acked[key] = await put_again_if_ambiguous(kc, key, key.encode(), ambiguous)
                del putting[w]
                assert await kc.get(key) == key.encode()
                n += 1
        writers = [asyncio.ensure_future(writer(w)) for w in range(32)]
        await wait_until(lambda: len(acked) > 2000, 20, "writes before the kill")
        # paused first, so that a write is surely in flight on it when it dies (killed at
        # a random moment, once in a few hundred runs none was)
        cluster.pause(victim)
        await wait_until(lambda: any(kc.leaders[shard_of(k, 4)] == victim
                                     for k in putting.values()), 2, "a write on the victim")
        cluster.kill(victim)
        clients.pop(victim).close()
        done = len(acked)
        await wait_until(lambda: len(acked) > done + 2000, 30, "writes after the kill")
        assert ambiguous, "no write was in flight on the killed node"
        cluster.start(victim)
        clients[victim] = await cluster.connect(victim)
        await until(balanced(clients), "leaders balanced again", 30)
        done = len(acked)
        await wait_until(lambda: len(acked) > done + 2000 and kc.leaders[0] == victim, 30,
                         "writes on the restarted node's groups")
        stop.set()
        await asyncio.gather(*writers)
        for c in clients.values():
            for key in acked:
                if key.startswith("key") or key.endswith("-0"):
                    assert await c.get(key) == key.encode()
        for key in acked:
            assert await kc.get(key) == key.encode()
    finally:
        if kc is not None:
            kc.close()
        cluster.stop_all()


def balanced(clients):
    async def check():
        return (await clients[min(clients)].status())["leaders"] == [1, 2, 3, 1]
    return check


class _Forbidding(kv.KVStore):
    """Refuses to write the key "forbidden"."""

    def apply(self, entries):
        results = super().apply(entries)
        return [kv.Refused("forbidden") if kv.decode(e.data).key == "forbidden" else r
                for e, r in zip(entries, results)]


@run
async def test_an_answer_of_the_node_other_than_not_leader_is_raised(monkeypatch):
    """A refusal by the state machine is the caller's to see: raised, not asked again."""
    async with LocalCluster(1, state_machine=_Forbidding, config=CONFIG) as c:
        leader = await c.leader()
        (port,) = free_ports(1)
        address = f"127.0.0.1:{port}"
        server = KVServer(leader, c.state_machines[leader.id], address)
        await server.start()
        served = _Served(monkeypatch)
        try:
            cluster = await KVCluster.connect([address])
            with pytest.raises(ClientError, match="refused: forbidden"):
                await cluster.put("forbidden", b"v")
            assert served.by_address == {address: 2}  # the status, the put
            assert await cluster.put("allowed", b"v") > 0
            cluster.close()
        finally:
            server.close()


@run
async def test_a_write_a_later_leader_replaced_is_sent_to_that_leader():
    """The leader's messages are lost after it took two puts: the others elect a new
    leader, whose first entry takes the puts' indexes. The old leader answers them
    not_committed (they never took effect) naming the new leader, as a not_leader would:
    ``KVCluster`` sends its put there and succeeds; a plain ``KVClient`` sees the answer.
    (A rolling restart under load lost a write so, to an election at a handover.)"""
    config = Config(election_timeout_min=0.5, election_timeout_max=1.0,
                    heartbeat_interval=0.05, lost_leadership_wait=1000)
    async with LocalCluster(3, state_machine=kv.KVStore, config=config) as c:
        addresses, servers = await client_ports(c)
        cluster = client = None
        try:
            old = await c.leader()
            await old.propose(kv.put("warm", b"w"))
            cluster = await KVCluster.connect(list(addresses.values()))
            client = await KVClient.connect(addresses[old.id])
            before = old.engine.log.last_index
            c.hub._cut |= {(old.id, i) for i in c.nodes if i != old.id}  # one way
            put = asyncio.ensure_future(cluster.put("k", b"v"))
            direct = asyncio.ensure_future(client.put("k2", b"v2"))
            await wait_until(lambda: old.engine.log.last_index == before + 2, 10)
            new = await c.leader(exclude={old.id})
            assert await put > before + 1  # at the new leader, after its first entry
            with pytest.raises(ClientError) as answered:
                await direct
            assert (answered.value.error, answered.value.leader,
                    answered.value.leader_client_address) == \
                ("not_committed", new.id, addresses[new.id])
            assert await cluster.get("k") == b"v"
            assert old.metrics().proposals_dropped == 2
            c.hub.heal()
            await wait_until(lambda: old._applier.applied_index >= new.engine.commit_index, 10)
            assert c.state_machines[old.id].get("k2") is None
        finally:
            for opened in (cluster, client):
                if opened is not None:
                    opened.close()
            for server in servers:
                server.close()


@run
async def test_a_rolling_restart_under_load_costs_no_write_an_error(tmp_path, monkeypatch):
    """Three ``fastraft node --groups 2``, each stopped (SIGTERM) and started again in
    turn under 32 writers: every node hands its groups over before it stops, answers the
    writes it began and tells the client which it never began, so the client sends those
    to the new leaders. Not one write fails, and every one is on every node; a node that
    led a group was a follower of it before it stopped (it handed it over), and its
    clients heard its closing notice."""
    noticed = []
    closing = KVClient._closing

    def heard(client, last_started):
        noticed.append(client.server_address)
        closing(client, last_started)
    monkeypatch.setattr(KVClient, "_closing", heard)
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--groups", "2", "--log-level", "INFO",
                                         "--log-format", "json"])
    kc = None
    try:
        cluster.start_all()
        kc = await KVCluster.connect(list(cluster.client.values()),
                                     cluster_id=cluster.cluster_id)
        acked: dict[str, int] = {}
        failed: list[BaseException] = []
        stop = asyncio.Event()

        async def writer(w):
            n = 0
            while not stop.is_set():
                key = f"w{w}-{n}"
                try:
                    acked[key] = await kc.put(key, key.encode())
                except (ClientError, OSError) as exc:
                    failed.append(exc)
                n += 1
        writers = [asyncio.ensure_future(writer(w)) for w in range(32)]
        led: list[int] = []  # the groups each node led before it stopped
        stopped_leading: list[int] = []  # and those it still led as it stopped
        for victim in cluster.ids:
            done = len(acked)
            await wait_until(lambda done=done: len(acked) > done + 1000, 30,
                             f"writes before node {victim} stops")
            watcher = await cluster.connect(victim)
            await asyncio.get_running_loop().run_in_executor(None, cluster.terminate, victim)
            await wait_until(lambda w=watcher: w.closed, 10, "the connection closed")
            assert cluster.client[victim] in noticed
            roles = roles_by_group(cluster.log(victim))
            led += [g for g, seen in roles.items() if "leader" in seen]
            stopped_leading += [g for g, seen in roles.items() if seen[-1] == "leader"]
            cluster.start(victim)
        done = len(acked)
        await wait_until(lambda: len(acked) > done + 1000, 30, "writes after the restarts")
        stop.set()
        await asyncio.gather(*writers)
        assert not failed, failed[:3]
        assert led and not stopped_leading, (led, stopped_leading)
        clients = await cluster.connect_all()
        for c in clients.values():
            for key in list(acked)[::7]:
                assert await get_once_led(c, key) == key.encode()
            c.close()
    finally:
        if kc is not None:
            kc.close()
        cluster.stop_all()


def roles_by_group(log: str) -> dict[int, list[str]]:
    """The roles a node took in each group, in order, from its JSON log (``role``
    events)."""
    roles: dict[int, list[str]] = {}
    for line in log.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "role":
                roles.setdefault(event["group"], []).append(event["role"])
    return roles


async def get_once_led(client, key, timeout=10.0):
    """``get`` on one node, asked again while it knows no leader of the key's group (a
    node started last may not have heard from it yet)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await client.get(key)
        except ClientError as exc:
            if exc.error != "not_leader" or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)


@run
async def test_a_silent_leader_is_left_for_the_new_one(tmp_path):
    """The leader paused (SIGSTOP: its connections stay open, it answers nothing): after
    ``silence`` its connection is closed, so a read waiting on it is asked of another
    node and answered, a write waiting on it raises ConnectionError (may or may not), and
    the next write finds the new leader, instead of all of them waiting for the node."""
    cluster = ProcessCluster(3, str(tmp_path))
    kc = None
    try:
        cluster.start_all()
        kc = await KVCluster.connect(list(cluster.client.values()), silence=1.0,
                                     cluster_id=cluster.cluster_id)
        first = await kc.put("k", b"v")
        leader = kc.leaders[0]
        assert leader is not None and first > 0
        cluster.pause(leader)
        try:
            read = asyncio.ensure_future(kc.get("k"))
            write = asyncio.ensure_future(kc.put("k", b"w"))
            assert await asyncio.wait_for(read, 20) in (b"v", b"w")
            with pytest.raises(ConnectionError, match="no answer for 1.0s"):
                await asyncio.wait_for(write, 20)
            assert await asyncio.wait_for(kc.put("k", b"x"), 20) > first
            assert kc.leaders[0] not in (None, leader)
        finally:
            cluster.resume(leader)
    finally:
        if kc is not None:
            kc.close()
        cluster.stop_all()
