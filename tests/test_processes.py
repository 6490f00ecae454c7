"""A real cluster: ``fastraft node`` processes on 127.0.0.1 over TcpNetwork."""
import asyncio
import json
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import http_get

from fastraft.errors import ConfigError
from fastraft.kvclient import ClientError, find_leader
from fastraft.kvprotocol import shard_of
from fastraft.processes import ProcessCluster, free_ports, handed_out_kept, port_range

from aio import (
    LEADERSHIP_CHANGED,
    change_membership_retrying,
    put_retrying,
    refusal_retrying,
    run,
    until,
    until_applied,
    until_knows_leader,
)


@pytest.fixture
def cluster(tmp_path):
    c = ProcessCluster(3, str(tmp_path))
    c.start_all()
    yield c
    c.stop_all()


def test_free_ports_are_distinct_bindable_and_clear_of_the_ephemeral_range(monkeypatch):
    import socket

    from fastraft.processes import LOWEST_PORT, _ephemeral_low
    monkeypatch.delenv("FASTRAFT_PORTS", raising=False)
    low = _ephemeral_low()
    ports = free_ports(50)
    assert len(set(ports)) == 50
    if low > LOWEST_PORT + 1000:  # Linux: connections never take these as their own end
        assert port_range() == (LOWEST_PORT, low)
        assert all(LOWEST_PORT <= p < low for p in ports), (low, ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_ports_picks_in_the_range_fastraft_ports_names(monkeypatch):
    """Test processes side by side each take a range of their own (tests/conftest.py):
    a port two of them picked at once was free for both until one's server bound it."""
    monkeypatch.setenv("FASTRAFT_PORTS", "20000-20100")
    assert all(20000 <= p < 20100 for p in free_ports(20))
    for bad in ("20000", "a-b", "100-200", "30000-20000", "20000-70000"):
        monkeypatch.setenv("FASTRAFT_PORTS", bad)
        with pytest.raises(ConfigError, match="FASTRAFT_PORTS must be LOW-HIGH"):
            free_ports(1)


def test_each_test_process_picks_ports_in_a_range_of_its_own(monkeypatch):
    """tests/conftest.py gives pytest-xdist worker k of n the k-th of n slices of the
    range, the default one or one set by hand (two test runs side by side, each given
    its own)."""
    import conftest
    monkeypatch.delenv("FASTRAFT_PORTS", raising=False)
    low, high = port_range()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.delenv("FASTRAFT_PORTS", raising=False)
        conftest._own_ports()
        slices.append(port_range())
    if high:
        half = low + (high - low) // 2
        assert slices == [(low, half), (half, half + (high - low) // 2)]
    monkeypatch.setenv("FASTRAFT_PORTS", "20000-20100")
    conftest._own_ports()
    assert port_range() == (20050, 20100)


def test_free_ports_never_hands_out_a_port_twice():
    """Calls made before the servers bind (a test's cluster, then its metrics port) once
    got the same port in CI: node 1 took it for metrics, node 3 could not start."""
    ports = [p for _ in range(min(2000, handed_out_kept(*port_range())))
             for p in free_ports(1)]
    assert len(set(ports)) == len(ports)


def test_free_ports_gives_up_when_nothing_can_be_bound(monkeypatch):
    import socket

    def refuse(self, address):
        raise OSError(99, "Cannot assign requested address")
    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(OSError, match="Cannot assign"):
        free_ports(1)


@run
async def test_process_cluster_failover_restart_and_linearizable_reads(cluster):
    clients = await cluster.connect_all()
    leader = await find_leader(clients)
    acked = {}
    for k in range(200):
        acked[f"a{k}"] = await clients[leader].put(f"a{k}", b"A%d" % k)
    # a write from a follower is redirected to the leader, once the follower knows it
    follower = next(i for i in cluster.ids if i != leader)
    await until_knows_leader(clients[follower], follower, leader)
    with pytest.raises(ClientError) as info:
        await clients[follower].put("x", b"y")
    assert info.value.error == "not_leader" and info.value.leader == leader

    cluster.kill(leader)
    clients.pop(leader).close()
    new = await find_leader(clients)
    assert new != leader
    for k in range(200):
        acked[f"b{k}"] = await clients[new].put(f"b{k}", b"B%d" % k)
    # reads from any node (a follower forwards to the leader) see every acknowledged write
    for c in clients.values():
        for key in ("a199", "b199", "a0"):
            resp = await c.request("get", key)
            assert resp.version == acked[key] and resp.value[:1] == key[:1].upper().encode()

    cluster.start(leader)  # restart the crashed node: it catches up from the leader
    clients[leader] = await cluster.connect(leader)
    target = (await clients[new].status())["commit_index"]

    await until_applied([clients[leader]], target)
    assert (await clients[leader].request("get", "b199")).version == acked["b199"]
    for c in clients.values():
        c.close()


@run
async def test_a_follower_far_behind_catches_up_through_a_snapshot_on_disk(tmp_path):
    """FileStorage everywhere and a snapshot every 50 entries: a follower killed for a
    while comes back behind the leader's compaction point and is sent a snapshot."""
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--snapshot-interval", "50"])
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        for k in range(100):
            await clients[leader].put(f"a{k}", b"A")
        follower = next(i for i in cluster.ids if i != leader)
        behind = (await clients[follower].status())["last_index"]
        cluster.kill(follower)
        clients.pop(follower).close()
        last = None
        for k in range(400):
            last = await clients[leader].put(f"b{k}", b"B%d" % k)
        assert (await clients[leader].status())["snapshot_index"] > behind
        cluster.start(follower)
        clients[follower] = await cluster.connect(follower)
        await until_applied([clients[follower]], last)
        status = await clients[follower].status()
        assert status["snapshot_index"] > behind  # it got a snapshot, not the entries
        assert (await clients[follower].request("get", "b399")).version == last
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_membership_changes_through_the_client_port(cluster):
    """Remove a voter and add it back through ``KVClient``; a change naming a stranger
    is refused with the reason. Each change goes to whoever leads: on a loaded machine
    an election may come in between (the call then says the change may or may not have
    happened), and the change is made again if it is not there."""
    clients = await cluster.connect_all()
    ids = set(cluster.ids)
    first_leader = await find_leader(clients)
    other = next(i for i in cluster.ids if i != first_leader)
    await change_membership_retrying(
        clients, lambda c: c.change_membership(ids - {other}), ids - {other})
    refused = await refusal_retrying(clients, lambda c: c.change_membership({first_leader, 9}))
    assert refused.error.startswith("InvalidArgument: nodes [9] are not members"), refused
    await change_membership_retrying(
        clients, lambda c: c.add_learner(other, cluster.raft[other]), ids - {other}, [other])
    leader = await change_membership_retrying(
        clients, lambda c: c.change_membership(ids), ids)
    follower = next(i for i in cluster.ids if i != leader)
    await until_knows_leader(clients[follower], follower, leader)
    with pytest.raises(ClientError) as info:
        await clients[follower].add_learner(7, "127.0.0.1:1")
    assert info.value.error == "not_leader" and info.value.leader == leader
    version = await put_retrying(clients, "after")
    await until_applied(list(clients.values()), version)
    assert await clients[other].get("after") == b"after"
    for c in clients.values():
        c.close()


@pytest.mark.parametrize("groups", [1, 2])
@run
async def test_a_node_stopped_with_a_request_waiting_answers_it_and_logs_no_traceback(
        tmp_path, groups):
    """A membership change waits for a learner that never catches up (nobody listens at
    its address) when the leader is stopped (SIGTERM): the client is answered
    ``not_leader`` (the leader hands over as it stops, and the change, not proposed yet,
    never began), and the node's request ends before its event loop does (left
    running, ``asyncio.run`` would log its failure with a traceback). A node of one group
    and one of several."""
    cluster = ProcessCluster(3, str(tmp_path), extra_args=["--groups", str(groups)] * (groups > 1))
    group = 0 if groups > 1 else None
    cluster.start_all()
    try:
        clients = await cluster.connect_all()
        leader = await find_leader(clients, group=group)
        # a log longer than Config.max_learner_lag, so the learner is behind
        await asyncio.gather(*[clients[leader].append(b"v", group) for i in range(2000)])
        await clients[leader].add_learner(4, f"127.0.0.1:{free_ports(1)[0]}", group)
        change = asyncio.ensure_future(
            clients[leader].change_membership({*cluster.ids, 4}, group))

        async def waiting():
            status = await clients[leader].status(group)
            return status["membership"]["learners"] == [4] and not change.done()
        await until(waiting, "the change waiting for the learner")
        cluster.procs[leader].terminate()
        with pytest.raises(ClientError, match="not_leader"):
            await change
        assert cluster.procs[leader].wait(10) == 0
        assert "Traceback" not in cluster.log(leader), cluster.log(leader)[-2000:]
        for c in clients.values():
            c.close()
    finally:
        cluster.stop_all()


async def leader_of(cluster):
    clients = await cluster.connect_all()
    leader = await find_leader(clients)
    for c in clients.values():
        c.close()
    return leader


def test_status_command_prints_a_nodes_status(cluster):
    leader = asyncio.run(leader_of(cluster))
    out = fastraft_cli(cluster, "status", "--address", cluster.client[leader])
    assert out.returncode == 0, out.stderr
    assert '"role": "leader"' in out.stdout and f'"leader_id": {leader}' in out.stdout


def fastraft_cli(cluster, *args, timeout=30):
    """``fastraft *args`` against ``cluster`` (its cluster id), run to its end."""
    return subprocess.run([sys.executable, "-m", "fastraft", *args, "--cluster-id",
                           cluster.cluster_id], capture_output=True, text=True,
                          timeout=timeout)


def test_the_member_command_removes_and_adds_back_a_node_of_one_group(cluster):
    """``fastraft member remove|add`` on single-group nodes: no group to name; the leader
    removed hands leadership over first (to the lowest other voter, as balancing would),
    so no election is left to chance; adding back a voter already there is nothing to
    do; a stranger's removal changes nothing."""
    everyone = ",".join(cluster.client[i] for i in cluster.ids)

    async def leader_and_voters():
        clients = await cluster.connect_all()
        try:
            leader = await find_leader(clients)
            return leader, (await clients[leader].status())["membership"]["voters"]
        finally:
            for c in clients.values():
                c.close()
    leader = asyncio.run(leader_of(cluster))
    others = sorted(set(cluster.ids) - {leader})
    out = fastraft_cli(cluster, "member", "remove", str(leader), "--cluster", everyone, timeout=90)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.splitlines() == [
        f"the group: node {leader} removed (leadership handed to node {others[0]} first)"]
    assert asyncio.run(leader_and_voters()) == (others[0], others)
    # the new leader told it so: `fastraft status` shows it removed
    async def told_it_is_out():
        clients = await cluster.connect_all()
        try:
            async def removed():
                return (await clients[leader].status())["removed"]
            await until(removed, f"node {leader} knowing it is out", 20)
        finally:
            for c in clients.values():
                c.close()
    asyncio.run(told_it_is_out())
    out = fastraft_cli(cluster, "status", "--cluster", everyone)
    row = next(line.split() for line in out.stdout.splitlines()
               if line.split()[:1] == [str(leader)])
    assert row[2] == "removed", out.stdout
    out = fastraft_cli(cluster, "member", "add", str(leader), cluster.raft[leader], "--cluster",
                       everyone, timeout=90)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.splitlines() == [f"the group: node {leader} added as a voter"]
    assert asyncio.run(leader_and_voters())[1] == [1, 2, 3]
    out = fastraft_cli(cluster, "member", "add", str(leader), cluster.raft[leader], "--cluster",
                       everyone)
    assert out.stdout.splitlines() == [f"the group: node {leader} is already a voter"]
    out = fastraft_cli(cluster, "member", "remove", "9", "--cluster", everyone)
    assert out.returncode == 0 and out.stdout.splitlines() == ["the group: node 9 is not a member"]
    assert asyncio.run(leader_and_voters())[1] == [1, 2, 3]


def test_a_node_run_with_stop_when_removed_exits_once_its_removal_commits(tmp_path):
    """``fastraft node --stop-when-removed``: ``fastraft member remove`` of a follower,
    then of the leader (which hands over first), ends each one's process, with status 0
    and a line saying why; the last voter serves writes."""
    cluster = ProcessCluster(3, str(tmp_path), extra_args=["--stop-when-removed"])
    try:
        cluster.start_all()
        leader = asyncio.run(leader_of(cluster))
        live = set(cluster.ids)
        for gone in (next(i for i in cluster.ids if i != leader), leader):
            out = fastraft_cli(cluster, "member", "remove", str(gone), "--cluster",
                               ",".join(cluster.client[i] for i in sorted(live)), timeout=90)
            assert out.returncode == 0, out.stderr + out.stdout
            assert cluster.procs[gone].wait(20) == 0
            assert (f"node {gone} was removed from the cluster: stopped "
                    "(--stop-when-removed)") in cluster.log(gone)
            live.discard(gone)
        last, = live

        async def write():
            clients = await cluster.connect_all([last])
            try:
                await put_retrying(clients, "after")
                assert await clients[last].get("after") == b"after"
            finally:
                clients[last].close()
        asyncio.run(write())
    finally:
        cluster.stop_all()


def test_a_dead_node_removed_exits_when_it_is_revived_with_stop_when_removed(tmp_path):
    """The operator's story: a node dies (SIGKILL) and is removed while dead; revived on
    its data (a supervisor restarting it), it learns it is out (from the farewell the
    leader's transport kept queued for it, or, were that lost, from the leader it asks
    for a vote: test_membership holds that path), and with ``--stop-when-removed`` its
    process exits (status 0) instead of lingering outside the cluster."""
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--stop-when-removed"])
    try:
        cluster.start_all()
        leader = asyncio.run(leader_of(cluster))
        dead = next(i for i in cluster.ids if i != leader)
        cluster.kill(dead)
        live = ",".join(cluster.client[i] for i in cluster.ids if i != dead)
        out = fastraft_cli(cluster, "member", "remove", str(dead), "--cluster", live,
                           timeout=90)
        assert out.returncode == 0, out.stderr + out.stdout
        cluster.start(dead)  # on its data: its log ends before the change
        assert cluster.procs[dead].wait(30) == 0
        assert (f"node {dead} was removed from the cluster: stopped "
                "(--stop-when-removed)") in cluster.log(dead)
    finally:
        cluster.stop_all()


@run
async def test_a_node_of_several_groups_with_stop_when_removed_exits_once_out_of_all(tmp_path):
    """``--stop-when-removed`` with ``--groups 2``: removed from one group, the host drops
    that replica and serves the other; removed from both, its process ends (status 0)."""
    cluster = ProcessCluster(3, str(tmp_path), extra_args=["--groups", "2",
                                                          "--stop-when-removed"])
    members = ",".join(cluster.client[i] for i in (1, 2))
    clients = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        for g in range(2):
            await find_leader(clients, group=g)
        out = await asyncio.to_thread(fastraft_cli, cluster, "member", "remove", "3",
                                      "--group", "0", "--cluster", members, timeout=90)
        assert out.returncode == 0, out.stderr + out.stdout

        async def one_group_left():
            return (await clients[3].status())["host"]["groups"] == 1
        await until(one_group_left, "node 3 dropping its replica of group 0", 20)
        assert cluster.procs[3].poll() is None
        out = await asyncio.to_thread(fastraft_cli, cluster, "member", "remove", "3",
                                      "--group", "1", "--cluster", members, timeout=90)
        assert out.returncode == 0, out.stderr + out.stdout
        assert await asyncio.to_thread(cluster.procs[3].wait, 20) == 0
        assert ("node 3 was removed from the cluster (every group): stopped "
                "(--stop-when-removed)") in cluster.log(3)
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_the_member_command_tells_the_members_a_node_moved(tmp_path):
    """A follower restarted on its data at another Raft address hears nothing (the
    members dial the address in the configuration) until ``fastraft member update``
    tells them; then it catches up. A second run has nothing to do."""
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"))
    everyone = ",".join(cluster.client[i] for i in cluster.ids)
    clients = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        mover = next(i for i in cluster.ids if i != leader)
        cluster.terminate(mover)
        clients.pop(mover).close()
        cluster.raft[mover] = f"127.0.0.1:{free_ports(1)[0]}"
        cluster.start(mover)  # on its data: --init changes nothing
        clients[mover] = await cluster.connect(mover)
        out = fastraft_cli(cluster, "member", "update", str(mover), cluster.raft[mover],
                           "--cluster", everyone, timeout=90)
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.splitlines() == [
            f"the group: node {mover} is now at {cluster.raft[mover]}"]
        index = await clients[leader].put("after", b"the move")
        await until_applied(clients.values(), index)
        assert [(await c.status())["addresses"][mover] for c in clients.values()] == [
            cluster.raft[mover]] * 3
        out = fastraft_cli(cluster, "member", "update", str(mover), cluster.raft[mover],
                           "--cluster", everyone)
        assert out.stdout.splitlines() == [
            f"the group: node {mover} is already at {cluster.raft[mover]}"]
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


def test_cluster_status_table_and_kv_commands(cluster):
    """``fastraft status --cluster`` (a row per node, ``--json``, an unreachable node
    named) and ``fastraft kv put|get|del`` against a running 3-node cluster."""
    leader = asyncio.run(leader_of(cluster))
    everyone = ",".join(cluster.client[i] for i in cluster.ids)
    # A node names the leader once it has heard from it, and forgets it while it
    # pre-campaigns (its election timer ran out on a starved CPU) until the next
    # heartbeat: the table names the leader in every row within a deadline.
    deadline = time.monotonic() + 20
    while True:
        out = fastraft_cli(cluster, "status", "--cluster", everyone)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT",
                                    "APPLIED", "LAG", "LAST", "CONTACT"]
        rows = {int(line.split()[0]): line.split() for line in lines[1:]}
        assert sorted(rows) == cluster.ids and rows[leader][2] == "leader", out.stdout
        if all(row[4] == str(leader) for row in rows.values()):
            break
        assert time.monotonic() < deadline, out.stdout
    assert rows[leader][8] == "-"
    assert all(row[8].endswith("ms") for i, row in rows.items() if i != leader)
    out = fastraft_cli(cluster, "status", "--cluster", everyone, "--json")
    assert [r["id"] for r in json.loads(out.stdout)] == cluster.ids
    dead = "127.0.0.1:1"
    out = fastraft_cli(cluster, "status", "--cluster", everyone + "," + dead)
    assert out.returncode == 1
    assert any(line.split()[1:3] == [dead, "unreachable:"] for line in out.stdout.splitlines())

    # through a follower's address first: the leader is found among the others
    follower_first = ",".join(cluster.client[i] for i in sorted(
        cluster.ids, key=lambda i: i == leader))
    put = fastraft_cli(cluster, "kv", "put", "greeting", "hello", "--address", follower_first)
    assert put.returncode == 0 and put.stdout.startswith("version "), put.stderr
    got = fastraft_cli(cluster, "kv", "get", "greeting", "--address", follower_first)
    assert got.returncode == 0 and got.stdout == "hello\n", got.stderr
    # one follower's address alone: its not-leader reply names the leader's client port
    follower = next(i for i in cluster.ids if i != leader)
    put = fastraft_cli(cluster, "kv", "put", "greeting", "hi", "--address",
                       cluster.client[follower])
    assert put.returncode == 0 and put.stdout.startswith("version "), put.stderr
    got = fastraft_cli(cluster, "kv", "get", "greeting", "--address", cluster.client[follower])
    assert got.returncode == 0 and got.stdout == "hi\n", got.stderr
    assert fastraft_cli(cluster, "kv", "del", "greeting", "--address", everyone).returncode == 0
    gone = fastraft_cli(cluster, "kv", "get", "greeting", "--address", everyone)
    assert gone.returncode == 1 and "is not set" in gone.stderr
    bad = fastraft_cli(cluster, "kv", "put", "k", "--address", everyone)
    assert bad.returncode == 2 and "kv put takes KEY VALUE" in bad.stderr
    nobody = fastraft_cli(cluster, "kv", "get", "k", "--address", dead)
    assert nobody.returncode == 2 and f"no node answered at {dead}" in nobody.stderr


def test_node_serves_metrics_and_health_and_logs_json(tmp_path):
    """``fastraft node --metrics HOST:PORT --log-format json``: Prometheus text and
    /health over HTTP from every node of a running cluster; events as JSON lines."""
    c = ProcessCluster(3, str(tmp_path), extra_args=["--log-format", "json",
                                                     "--log-level", "INFO"])
    taken = {int(a.rsplit(":", 1)[1]) for a in [*c.raft.values(), *c.client.values()]}
    while True:  # the cluster's ports are not bound yet: the kernel may offer them again
        ports = dict(zip(c.ids, free_ports(3)))
        if not taken & set(ports.values()):
            break
    for i in c.ids:
        c.start(i, ["--metrics", f"127.0.0.1:{ports[i]}"])
    try:
        leader = asyncio.run(leader_of(c))
        assert fastraft_cli(c, "kv", "put", "k", "v", "--address", c.client[leader]).returncode == 0

        def scrape(i):
            status, text = http_get(f"http://127.0.0.1:{ports[i]}/metrics")
            assert status == 200
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}
        for i in c.ids:
            node = ("node", str(i))
            deadline = time.monotonic() + 20
            while True:  # a follower learns the commit on the next heartbeat
                samples = scrape(i)
                if samples[("fastraft_applied_index", (node,))] >= 2 or \
                        time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert samples[("fastraft_applied_index", (node,))] >= 2
            assert samples[("fastraft_leader_id", (node,))] == leader
            assert samples[("fastraft_role", (node, ("role", "leader")))] == (i == leader)
            assert samples[("fastraft_network_bytes_total", (("direction", "in"), node))] > 0
            assert http_get(f"http://127.0.0.1:{ports[i]}/health") == (200, "ok\n")
        # alone, a node has no leader: /health says so with 503
        survivor = next(i for i in c.ids if i != leader)
        for i in c.ids:
            if i != survivor:
                c.kill(i)
        deadline = time.monotonic() + 20
        while (health := http_get(f"http://127.0.0.1:{ports[survivor]}/health"))[0] == 200 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health[0] == 503 and health[1].startswith("no leader known"), health
    finally:
        c.stop_all()
    events = [json.loads(line) for i in c.ids for line in c.log(i).splitlines()
              if line.startswith("{")]
    roles = [e for e in events if e.get("event") == "role"]
    assert any(e["role"] == "leader" and e["node"] == leader for e in roles)
    assert all({"time", "level", "logger", "message", "term"} <= set(e) for e in roles)
    assert any(e.get("event") == "membership" and e["voters"] == c.ids for e in events)


def test_demo_runs_and_loses_nothing():
    out = subprocess.run([sys.executable, "-m", "fastraft", "demo", "--seconds", "3",
                          "--inflight", "64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "acknowledged lost   : 0 of" in out.stdout
    assert "OK: nothing acknowledged was lost" in out.stdout


async def put_on_its_leader(clients, key, value, deadline=20.0):
    """Put ``key`` through the node that leads its group; asked again after a write
    refused or dropped by a change of leader (the same value, so one that took effect
    after all changes nothing but its version)."""
    return await on_its_leader(clients, lambda c: c.put(key, value), deadline,
                               again=lambda exc: True)


async def on_its_leader(clients, request, deadline=20.0,
                        again=lambda exc: exc.error == "not_leader"):
    """``await request(client)`` (a put, a membership change or an append of one group)
    on that group's leader, following not_leader replies; a reply ``again`` accepts is
    asked again until ``deadline``, of the next node when it names no leader there."""
    target = min(clients)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            return await request(clients[target])
        except ClientError as exc:
            if not again(exc) or loop.time() > end:
                raise
            if exc.error == "not_leader" and exc.leader in clients:
                target = exc.leader
            else:  # no leader known there, or one that is down: ask the next node
                others = sorted(clients)
                target = others[(others.index(target) + 1) % len(others)]
                await asyncio.sleep(0.05)


def election_in_between(exc):
    """An election got in the way of the request (a change a deposed leader took may or
    may not be in): ask again."""
    return exc.error.startswith(LEADERSHIP_CHANGED)


async def add_learner_on_its_leader(clients, group, node_id, address):
    """``add_learner`` through ``group``'s leader, asked again after an election got in
    the way; the node being a member already answers it only then (the dropped change
    took effect after all)."""
    dropped = False

    async def add(c):
        nonlocal dropped
        try:
            return await c.add_learner(node_id, address, group=group)
        except ClientError as exc:
            if dropped and exc.error == f"InvalidArgument: node {node_id} is already a member":
                return None
            dropped = dropped or election_in_between(exc)
            raise
    await on_its_leader(clients, add, again=election_in_between)


async def get_retrying(client, key, deadline=20.0):
    """A linearizable read (the response: value and version), asked again while the node
    cannot have it confirmed: it knows no leader of the key's group (a replica restarted
    in a quiet group learns it within an election timeout) or the leader did not answer
    in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            return await client.request("get", key)
        except ClientError as exc:
            assert loop.time() < end, exc
            await asyncio.sleep(0.05)


@run
async def test_a_node_joins_every_group_of_a_cluster_of_several_groups(tmp_path):
    """Three nodes of ``--groups 4`` found the cluster; a fourth starts without ``--init``
    and each group adds it (``add_learner`` then ``change_membership`` with ``group=``,
    through that group's leader): it catches up in every group, serves linearizable
    reads of every key, and leads its share of the groups once balanced."""
    cluster = ProcessCluster(4, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--groups", "4"])
    founders = ",".join(f"{i}={cluster.raft[i]}" for i in (1, 2, 3))
    clients = {}
    try:
        for i in (1, 2, 3):
            cluster.start(i, ["--cluster", founders])
        clients = await cluster.connect_all((1, 2, 3))
        keys = [f"key{k}" for k in range(40)]
        acked = {key: await put_on_its_leader(clients, key, key.encode()) for key in keys}
        cluster.start(4, init=False)
        clients[4] = await cluster.connect(4)
        for g in range(4):
            await add_learner_on_its_leader(clients, g, 4, cluster.raft[4])
            # Proposing the same voters again is a change to what is there: harmless
            await on_its_leader(
                clients, lambda c, g=g: c.change_membership({1, 2, 3, 4}, group=g),
                again=election_in_between)
        by_group = [sum(1 for key in keys if shard_of(key, 4) == g) for g in range(4)]

        async def caught_up():
            return (await clients[4].status())["kv_keys_by_group"] == by_group
        await until(caught_up, "node 4 holding every group's keys", 20)
        for g in range(4):  # a group's own status: its replica's membership and role
            status = await clients[4].status(group=g)
            assert status["group"] == g and status["membership"]["voters"] == [1, 2, 3, 4]
        with pytest.raises(ClientError, match="not group 4"):
            await clients[4].status(group=4)
        for key in keys:
            resp = await get_retrying(clients[4], key)
            assert (resp.value, resp.version) == (key.encode(), acked[key])

        async def leads_its_share():
            # voters 1-4: preferred leaders 1, 2, 3, 4 (host.preferred_leader)
            return (await clients[4].status())["leaders"] == [1, 2, 3, 4]
        await until(leads_its_share, "leaders balanced over four nodes", 20)
        assert (await clients[4].status())["host"]["leading"] == 1
        roles = [(await clients[4].status(group=g))["role"] for g in range(4)]
        assert roles == ["follower", "follower", "follower", "leader"]
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_the_member_command_adds_a_node_to_every_group_and_removes_it_from_one(tmp_path):
    """``fastraft member add`` joins a new node to every group of nodes of several groups,
    each through its own leader, and a second run finds nothing left to do; ``member
    remove --group`` takes it out of that group only, ``member add --group --learner``
    puts it back there without a vote, and removes it again as a learner; a group's
    leader removed hands its leadership over first."""
    cluster = ProcessCluster(4, str(tmp_path), extra_args=["--groups", "3"])
    founders = ",".join(f"{i}={cluster.raft[i]}" for i in (1, 2, 3))
    members = ",".join(cluster.client[i] for i in (1, 2, 3))
    clients = {}

    async def membership(g):
        leader = await find_leader(clients, group=g)
        return (await clients[leader].status(group=g))["membership"]

    def member(*args):
        return fastraft_cli(cluster, "member", *args, "--cluster", members, timeout=120)
    [metrics_port] = free_ports(1)
    try:
        for i in (1, 2, 3):
            cluster.start(i, ["--cluster", founders] + [
                "--metrics", f"127.0.0.1:{metrics_port}", "--metrics-per-group"] * (i == 1))
        cluster.start(4, init=False)
        clients = await cluster.connect_all()
        for g in range(3):
            await find_leader(clients, group=g)
        # node 1's /metrics has each group's own gauges (--metrics-per-group)
        status, text = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert {s.labels["group"] for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "fastraft_group_term"} == {"0", "1", "2"}
        out = member("add", "4", cluster.raft[4])
        assert out.returncode == 0, out.stderr + out.stdout
        assert sorted(out.stdout.splitlines()) == [
            f"group {g}: node 4 added as a voter" for g in range(3)]
        for g in range(3):
            assert (await membership(g))["voters"] == [1, 2, 3, 4]
        out = member("add", "4", cluster.raft[4])
        assert sorted(out.stdout.splitlines()) == [
            f"group {g}: node 4 is already a voter" for g in range(3)]
        out = member("remove", "4", "--group", "1")
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.splitlines() == ["group 1: node 4 removed"]
        assert [(await membership(g))["voters"] for g in range(3)] == [
            [1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4]]
        out = member("add", "4", cluster.raft[4], "--group", "1", "--learner")
        assert out.stdout.splitlines() == ["group 1: node 4 added as a learner"]
        assert await membership(1) == {"voters": [1, 2, 3], "learners": [4], "outgoing": []}
        out = member("remove", "4", "--group", "1")
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.splitlines() == ["group 1: node 4 removed (a learner)"]
        assert await membership(1) == {"voters": [1, 2, 3], "learners": [], "outgoing": []}
        # group 2's leader removed: it hands over to the one balancing prefers among the
        # other voters the command reaches (1 and 2 of 1, 2, 4: node 1), in group 2 only
        async def node_3_leads_group_2():
            return await find_leader(clients, group=2) == 3
        await until(node_3_leads_group_2, "node 3 leading group 2", 20)
        out = member("remove", "3", "--group", "2")
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.splitlines() == [
            "group 2: node 3 removed (leadership handed to node 1 first)"]
        assert (await membership(2))["voters"] == [1, 2, 4]
        # node 1 leads, or node 4 already (node 1's host balances every second)
        assert await find_leader(clients, group=2) in (1, 4)
        # the replicas taken out were told so: their hosts list them (stop them there)
        async def told():
            return [(await clients[i].status())["host"]["removed"] for i in (1, 2, 3, 4)] \
                == [[], [], [2], [1]]
        await until(told, "removed replicas listed", 20)
        table = (await asyncio.to_thread(
            fastraft_cli, cluster, "status", "--cluster", ",".join(cluster.client.values()))).stdout
        head, *lines = [line.split() for line in table.splitlines()]
        assert [r[head.index("REMOVED")] for r in lines] == ["0", "0", "1", "1"], table
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_a_node_of_several_groups_serves_each_key_from_its_group(tmp_path):
    """``fastraft node --groups 4`` on three processes: every key is written through the
    leader of its own group (crc32 % 4) and kept by that group's store on every node,
    the groups' leaders spread over the nodes, each group has its own stream, a node
    killed (-9) restarts from its one WAL with every acknowledged write, and a single
    group's requests that name no group are refused with the reason."""
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(tmp_path / "data"),
                             extra_args=["--groups", "4"])
    clients = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        keys = [f"key{k}" for k in range(40)]
        assert {shard_of(key, 4) for key in keys} == {0, 1, 2, 3}
        acked = {key: await put_on_its_leader(clients, key, key.encode()) for key in keys}

        async def balanced():
            return (await clients[1].status())["leaders"] == [1, 2, 3, 1]
        # every host leads the groups whose preferred leader it is (1, 2, 3, 1)
        await until(balanced, "leaders balanced", 20)
        # each key went to its own group, on every node
        by_group = [sum(1 for key in keys if shard_of(key, 4) == g) for g in range(4)]

        async def in_their_groups():
            return all([(await c.status())["kv_keys_by_group"] == by_group
                        for c in clients.values()])
        await until(in_their_groups, "keys in their groups' stores", 20)
        status = await clients[2].status()
        assert status["host"]["groups"] == 4 and status["host"]["leading"] == 1
        # the command line's view of the hosts: groups and how many each leads
        table = (await asyncio.to_thread(
            fastraft_cli, cluster, "status", "--cluster", ",".join(cluster.client.values()))).stdout
        head, *lines = [line.split() for line in table.splitlines()]
        assert head == ["ID", "ADDRESS", "GROUPS", "LEADING", "QUIET", "CAMPAIGNING",
                        "FAILED", "REMOVED", "SUSPECTED"]
        assert [(r[0], r[2], r[3], r[6], r[7], r[8]) for r in lines] == [
            ("1", "4", "2", "0", "0", "-"), ("2", "4", "1", "0", "0", "-"),
            ("3", "4", "1", "0", "0", "-")]
        # the command line's view of one group: group 2's leader is node 3
        rows = json.loads((await asyncio.to_thread(
            fastraft_cli, cluster, "status", "--cluster", ",".join(cluster.client.values()),
            "--group", "2", "--json")).stdout)
        assert [(r["id"], r["group"], r["role"]) for r in rows] == \
            [(1, 2, "follower"), (2, 2, "follower"), (3, 2, "leader")]
        done = await asyncio.to_thread(fastraft_cli, cluster, "status", "--address",
                                       cluster.client[1], "--group", "4")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "serves groups 0 to 3, not group 4" in done.stderr
        assert status["kv_keys"] == len(keys)
        # each group has its own stream: a record appended to a group is in its log only
        offsets = {g: await on_its_leader(
            clients, lambda c, g=g: c.append(b"record %d" % g, group=g)) for g in range(4)}

        async def streams_replicated():
            return all([await clients[3].records(1, group=g) == [(offsets[g], b"record %d" % g)]
                        for g in range(4)])
        await until(streams_replicated, "each group's record in its stream on node 3", 20)
        # requests of one group need its id here
        with pytest.raises(ClientError, match="serves 4 groups: name one"):
            await clients[1].append(b"record")
        with pytest.raises(ClientError, match="serves 4 groups: name one"):
            await clients[1].change_membership({1, 2})
        with pytest.raises(ClientError, match="serves groups 0 to 3, not group 4"):
            await clients[1].add_learner(9, "127.0.0.1:1", group=4)

        cluster.kill(1)
        clients.pop(1).close()
        for key in keys:  # the other two elect leaders for node 1's groups
            acked[key] = await put_on_its_leader(clients, key, key.encode() + b"!")
        # restarted with --init and a --cluster that is no longer the groups' membership
        # (say an address changed): it restarts each group on what its WAL holds
        changed = ",".join(f"{i}={a}" for i, a in cluster.raft.items()) + ",4=127.0.0.1:9"
        cluster.start(1, ["--cluster", changed])
        clients[1] = await cluster.connect(1)
        for key in keys:  # linearizable: the restarted node's reads see every write
            resp = await get_retrying(clients[1], key)
            assert (resp.value, resp.version) == (key.encode() + b"!", acked[key])
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_a_cluster_on_a_stopped_nodes_port_of_another_is_not_mixed_in(tmp_path):
    """Tests run side by side, and a test may pick free ports while another's node is
    down: its node 2 on that node's Raft port is dialed by the other cluster's nodes as
    their node 2 (same node id, and once the same default cluster id). A CI run failed
    so, as it seems: a new cluster's log held 32 entries nobody had written to it, and a
    test killing and restarting nodes beside it found no leader for 30 s. Each
    ``ProcessCluster`` has a cluster id of its own: such dials are refused (logged), and
    no entry of one cluster enters the other's log."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ProcessCluster(3, str(tmp_path / "a"))
    b = ProcessCluster(3, str(tmp_path / "b"))
    b.raft[2], b.client[2] = a.raft[2], a.client[2]  # b's node 2 on a's node 2's ports
    clients_a: dict = {}
    clients_b: dict = {}
    try:
        a.start_all()
        clients_a = await a.connect_all()
        for k in range(20):
            await put_retrying(clients_a, f"a{k}")
        a.kill(2)
        clients_a.pop(2).close()
        b.start_all()
        clients_b = await b.connect_all()
        await put_retrying(clients_b, "b")

        async def refused():  # a's nodes dial their node 2 again at their backoff's pace
            return "peer belongs to cluster" in b.log(2)
        await until(refused, "b's node 2 refusing a's nodes", 15)
        for k in range(20, 40):  # a's leader sends these to whoever is at its node 2's port
            await put_retrying(clients_a, f"a{k}")
        b_leader = await find_leader(clients_b)
        await until_applied(clients_b.values(), 3)
        # b holds its own entries only: its founding configuration, its leaders' no-ops
        # and the one put; each of a's puts would be one more
        assert [(await c.status())["last_index"] < 10 for c in clients_b.values()] == \
            [True] * 3
        assert (await clients_b[b_leader].get("a0")) is None
    finally:
        for c in [*clients_a.values(), *clients_b.values()]:
            c.close()
        a.stop_all()
        b.stop_all()
