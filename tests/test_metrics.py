"""RaftNode.metrics(), watch_metrics(), health(), the Prometheus server, JSON logs."""
import asyncio
import json
import logging
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastraft.config import Config
from fastraft.engine import Timer
from fastraft.errors import InvalidArgument, Overloaded, ProposalDropped
from fastraft.logutil import JsonFormatter
from fastraft.messages import AppendEntries, RequestVote
from fastraft.metrics import MetricsServer, families
from fastraft.node import RaftNode
from fastraft.node.metrics import ENTRIES, Histogram
from fastraft.node.metrics import Recorder as MetricsRecorder
from fastraft.node.observe import health
from fastraft.storage import MemoryStorage
from fastraft.testing import LocalCluster, wait_until
from fastraft.transport import MemoryHub

from aio import run
from engine_helpers import replacing_3_by_4
from test_node import Recorder

#: test_node's timing, with the duration histograms on.
FAST = Config(election_timeout_min=0.05, election_timeout_max=0.1, heartbeat_interval=0.01,
              measure_durations=True)
#: For a test that reads one leader's metrics and health over HTTP: a loaded machine
#: that stalls the loop for 100 ms would elect another leader under FAST (seen once in
#: a README run: /health said "no leader ... in term 3").
STEADY = Config(election_timeout_min=0.5, election_timeout_max=1.0, heartbeat_interval=0.05,
                measure_durations=True)


@run
async def test_metrics_count_what_the_cluster_did():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        await asyncio.gather(*[leader.propose(b"w%d" % k) for k in range(300)])
        await leader.propose_batch([b"b"] * 20)
        await wait_until(lambda: all(n.applied_index == leader.engine.commit_index
                                     for n in c.nodes.values()))
        m = leader.metrics()
        assert (m.role, m.leader_id, m.node_id) == ("leader", leader.id, leader.id)
        assert m.commit_index == m.applied_index == m.last_log_index == leader.engine.log.last_index
        assert m.voters == (1, 2, 3) and m.learners == ()
        assert m.proposals_accepted == 320
        assert m.elections_won == 1 and m.leader_changes >= 1
        # every user entry went through the state machine once, counted per call
        assert m.apply_batch_entries.sum == 320
        assert sum(m.apply_batch_entries.counts) == m.apply_batch_entries.count
        assert m.log_write_entries.sum == m.last_log_index  # each entry written once
        assert 0 < m.commit_seconds.count <= m.log_write_seconds.count
        assert m.messages_out["AppendEntries"] > 0 and m.messages_in["AppendEntriesResponse"] > 0
        assert m.last_contact == 0.0
        await wait_until(lambda: all(f.lag == 0 for f in leader.metrics().followers.values()))
        followers = leader.metrics().followers
        assert sorted(followers) == [n for n in (1, 2, 3) if n != leader.id]
        assert all(f.state == "replicate" and f.match_index == m.last_log_index
                   and f.last_contact is not None for f in followers.values())
        follower = next(n for n in c.nodes.values() if n is not leader)
        fm = follower.metrics()
        assert (fm.role, fm.leader_id) == ("follower", leader.id)
        assert fm.followers == {} and fm.proposals_accepted == 0
        assert fm.last_contact is not None and fm.last_contact >= 0
        assert fm.messages_in["AppendEntries"] > 0
        assert fm.apply_batch_entries.sum == 320
        assert follower.status()["last_contact"] == pytest.approx(fm.last_contact, abs=5)
    assert leader.metrics().role == "stopped" and not leader.metrics().running


@run
async def test_without_measure_durations_the_clock_is_not_read_but_sizes_are_counted():
    plain = Config(election_timeout_min=0.05, election_timeout_max=0.1,
                   heartbeat_interval=0.01)
    async with LocalCluster(3, state_machine=Recorder, config=plain) as c:
        leader = await c.leader()
        await asyncio.gather(*[leader.propose(b"w") for _ in range(50)])
        m = leader.metrics()
        assert m.proposals_accepted == 50 and m.apply_batch_entries.sum == 50
        assert m.log_write_entries.count > 0
        assert m.commit_seconds.count == m.apply_seconds.count == \
            m.log_write_seconds.count == 0


@run
async def test_overloaded_and_dropped_proposals_are_counted():
    config = Config(election_timeout_min=0.05, election_timeout_max=0.1,
                    heartbeat_interval=0.01, max_pending_proposals=4, overload_wait=0,
                    measure_durations=True)
    async with LocalCluster(3, state_machine=Recorder, config=config) as c:
        leader = await c.leader()
        c.hub.isolate(leader.id)  # nothing commits: the pending proposals pile up
        futures = [leader.propose(b"x") for _ in range(4)]
        with pytest.raises(Overloaded):
            await leader.propose(b"one too many")
        assert leader.metrics().proposals_overloaded == 1
        # the isolated leader steps down (check quorum): its proposals are dropped
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, ProposalDropped) for r in results)
        m = leader.metrics()
        assert m.proposals_dropped == 4 and m.role != "leader"
        c.hub.heal()
        new = await c.leader()
        assert sum(n.metrics().elections_started for n in c.nodes.values()) >= 2
        assert new.metrics().elections_won >= 1


async def watching(node, interval):
    """A task reading ``node.watch_metrics(interval)`` into a list, once it has read the
    first: (the list, the task)."""
    seen = []

    async def watch():
        async for m in node.watch_metrics(interval=interval):
            seen.append(m)
    task = asyncio.ensure_future(watch())
    await wait_until(lambda: seen)
    return seen, task


@run
async def test_watch_metrics_yields_changes_and_ends_when_the_node_stops():
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        seen, task = await watching(leader, 0.05)
        first = seen[0].commit_index
        index = await leader.propose(b"w")
        await wait_until(lambda: seen[-1].applied_index >= index)
        assert seen[-1].commit_index > first
        # only changes are yielded: no two neighbours are the same state
        assert all(a.state != b.state for a, b in zip(seen, seen[1:]))
        await leader.stop()
        await asyncio.wait_for(task, 5)
        assert not seen[-1].running and seen[-1].role == "stopped"
    with pytest.raises(InvalidArgument):
        await leader.watch_metrics(interval=0).__anext__()


@run
async def test_a_watcher_cancelled_as_progress_comes_is_cancelled():
    """Progress and the cancellation of a ``watch_metrics`` reader in one loop turn: on
    Python 3.11 the ``asyncio.wait_for`` inside took the progress and lost the
    cancellation, and the reader went on watching until the node stopped."""
    async with LocalCluster(1, state_machine=Recorder, config=FAST) as c:
        node = await c.leader()
        _, task = await watching(node, 10)
        for _ in range(3):
            await asyncio.sleep(0)  # inside its wait for progress
        node._notify_progress()
        task.cancel()
        await asyncio.wait((task,), timeout=5)
        assert task.cancelled()


@run
async def test_health_says_why():
    hub = MemoryHub()
    lonely = RaftNode(1, storage=MemoryStorage(), network=hub.network(1),
                      state_machine=Recorder(), config=FAST)
    assert lonely.health() == "node is not running"
    await lonely.start()
    try:
        assert lonely.health().startswith("no leader known")
        await lonely.initialize({1: "local:1"})
        await wait_until(lambda: lonely.is_leader)
        assert lonely.health() is None
        await lonely.propose(b"x")
        # an applier far behind: the bound says so
        lonely._applier.applied_index = 0
        assert "behind the commit index" in lonely.health(max_apply_lag=0)
    finally:
        await lonely.stop()


@run
async def test_health_says_a_removed_node_is_out():
    # told by the leader that it is out, it serves no reads (no entry reaches it)
    async with LocalCluster(3, state_machine=Recorder, config=FAST, spares=1) as c:
        leader = await c.leader()
        await leader.add_learner(4, c.addresses[4])
        await leader.remove_learner(4)
        removed = c.nodes[4]
        await wait_until(lambda: removed.engine.removed)
        assert removed.health() == "removed from the cluster (voters [1, 2, 3]): stop this node"
        assert leader.health() is None


@run
async def test_strangers_leave_no_last_contact_behind():
    """Last contact is kept per sender only for messages the engine took: ids claimed by
    strangers (refused) cost no memory, however many."""
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        leader = await c.leader()
        e = leader.engine
        for k in range(1000):
            leader.receive(1000 + k, [RequestVote(e.term + 1, 1000 + k, e.log.last_index,
                                                  e.term)])
        await wait_until(lambda: all(f.last_contact is not None
                                     for f in leader.metrics().followers.values()))
        assert len(leader._last_heard) == 2  # the two followers
        assert leader.is_leader and leader.metrics().refused["stranger"] >= 1000
        # A follower that has heard no leader for a while takes a stranger's vote
        # request (it may be a member added after its log ends, thesis §4.1): still
        # nothing remembered of the ids claimed.
        follower = next(n for n in c.nodes.values() if n is not leader)
        f = follower.engine
        f.on_timer(Timer.LEASE)
        refused = f.refused["stranger"]
        for k in range(1000):
            follower.receive(1000 + k, [RequestVote(f.term, 1000 + k, 0, 0)])
        assert f.refused["stranger"] == refused  # taken (and the votes refused)
        assert not [i for i in follower._last_heard if i >= 1000]


def http_get(url):
    """(status, body) of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url):
    """The samples of a /metrics page: {(name, sorted labels): value}."""
    status, text = http_get(url)
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@run
async def test_metrics_server_serves_prometheus_text_and_health():
    async with LocalCluster(3, state_machine=Recorder, config=STEADY) as c:
        leader = await c.leader()
        await asyncio.gather(*[leader.propose(b"w") for _ in range(50)])
        server = MetricsServer(leader, "127.0.0.1:0")
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            base = f"http://{server.address}"
            samples = await loop.run_in_executor(None, scrape, base + "/metrics")
            node = ("node", str(leader.id))
            assert samples[("fastraft_commit_index", (node,))] == leader.engine.commit_index
            assert samples[("fastraft_role", (node, ("role", "leader")))] == 1
            assert samples[("fastraft_role", (node, ("role", "follower")))] == 0
            assert samples[("fastraft_proposals_total", (node, ("outcome", "accepted")))] == 50
            assert samples[("fastraft_commit_seconds_count", (node,))] > 0
            assert samples[("fastraft_log_write_entries_sum", (node,))] > 0
            assert samples[("fastraft_messages_total",
                            (("direction", "out"), node, ("type", "AppendEntries")))] > 0
            peers = [p for p in c.nodes if p != leader.id]
            for p in peers:
                assert ("fastraft_follower_lag_entries", (node, ("peer", str(p)))) in samples
            assert await loop.run_in_executor(None, http_get, base + "/health") == (200, "ok\n")
            assert (await loop.run_in_executor(None, http_get, base + "/nope"))[0] == 404
            await leader.stop()
            status, body = await loop.run_in_executor(None, http_get, base + "/health")
            assert (status, body) == (503, "node is not running\n")
        finally:
            await server.stop()


@run
async def test_a_node_on_tcp_exports_its_transports_frames_and_drops():
    # A follower back after an outage was once sent a frame over its limit: a node of
    # one group showed that only in its log (hosts had these counters already).
    async with LocalCluster(3, state_machine=Recorder, config=FAST, transport="tcp") as c:
        leader = await c.leader()
        await leader.propose(b"w")
        stats = leader.network.stats
        stats["bad_frames"] += 2  # as a refused frame counts it
        assert leader.metrics().network == stats
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families(leader.metrics()) for s in f.samples}
        node = ("node", str(leader.id))
        assert samples[("fastraft_frames_total", (("direction", "out"), node))] > 0
        assert samples[("fastraft_transport_dropped_total",
                        (node, ("reason", "bad_frames")))] == 2
    async with LocalCluster(3, state_machine=Recorder, config=FAST) as c:
        m = (await c.leader()).metrics()  # a network that counts nothing: no families
        assert m.network == {}
        assert not any(f.name.startswith("fastraft_frames") for f in families(m))


def test_batch_sizes_land_in_the_buckets_a_search_would_find():
    # The recorder finds a size's bucket with bit arithmetic instead of a search.
    sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, *range(10, 20_000, 7), 8191, 8192, 8193, 1 << 20]
    recorder = MetricsRecorder()
    searched = Histogram(ENTRIES)
    for n in sizes:
        recorder.applied(0.0, n)
        searched.observe(n)
    assert recorder.apply_batch_entries.value() == searched.value()
    assert recorder.apply_seconds.count == 0  # durations are off by default


def test_json_log_lines_carry_the_event_keys():
    record = logging.LogRecord("fastraft.node", logging.INFO, __file__, 1,
                               "node %d: leader in term %d", (1, 7), None)
    record.event, record.node, record.term = "role", 1, 7
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "node 1: leader in term 7" and line["level"] == "INFO"
    assert (line["event"], line["node"], line["term"]) == ("role", 1, 7)
    assert "args" not in line and "msg" not in line


@run
async def test_a_host_serves_each_groups_own_gauges_only_when_asked():
    """MetricsServer(host, per_group=True): seven gauges a group, labelled with it, saying
    what each replica here holds; by default none (series per host only)."""
    from test_host import GROUPS, Hosts, balanced, preferred

    async with Hosts() as hosts:
        await wait_until(lambda: balanced(hosts), 15)
        await asyncio.gather(*[hosts.propose(g, b"w") for g in GROUPS])
        host = hosts.hosts[2]
        await wait_until(lambda: balanced(hosts) and all(
            host.group(g).applied_index == host.group(g).engine.commit_index
            == host.group(g).engine.log.last_index for g in GROUPS), 15)
        plain = MetricsServer(host, "127.0.0.1:0")
        detailed = MetricsServer(host, "127.0.0.1:0", per_group=True)
        await plain.start()
        await detailed.start()
        loop = asyncio.get_running_loop()
        try:
            samples = await loop.run_in_executor(
                None, scrape, f"http://{detailed.address}/metrics")
            for g in GROUPS:
                node, labels = host.group(g), (("group", str(g)), ("node", "2"))
                e = node.engine
                assert samples[("fastraft_group_is_leader", labels)] == node.is_leader
                assert samples[("fastraft_group_leader_id", labels)] == e.leader_id == \
                    preferred(g)
                assert samples[("fastraft_group_term", labels)] == e.term
                assert samples[("fastraft_group_commit_index", labels)] == \
                    samples[("fastraft_group_applied_index", labels)] == \
                    samples[("fastraft_group_last_log_index", labels)] == e.commit_index > 0
                assert samples[("fastraft_group_quiet", labels)] == e.quiet
            assert sum(samples[("fastraft_group_is_leader", (("group", str(g)),
                                                             ("node", "2")))]
                       for g in GROUPS) == len(host.leaders()) > 0
            assert samples[("fastraft_host_groups", (("node", "2"),))] == len(GROUPS)
            summed = await loop.run_in_executor(None, scrape, f"http://{plain.address}/metrics")
            assert not [k for k in summed if k[0].startswith("fastraft_group_")]
        finally:
            await plain.stop()
            await detailed.stop()


@run
async def test_a_host_serves_its_figures_and_its_groups_counters_summed():
    """MetricsServer(host): host-level series (groups, roles, quiet, transport) and the
    node counters summed over the host's groups, under the names a node uses; /health
    names the groups that know no leader."""
    from test_host import GROUPS, Hosts, balanced

    budget = 1 << 20
    async with Hosts(log_cache_bytes=budget) as hosts:
        # leaders where balancing wants them: nothing moves while the figures are compared
        await wait_until(lambda: balanced(hosts), 15)
        for k in range(3):
            await asyncio.gather(*[hosts.propose(g, b"w%d" % k) for g in GROUPS])
        await wait_until(lambda: balanced(hosts), 15)
        host = hosts.hosts[1]
        server = MetricsServer(host, "127.0.0.1:0")
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            base = f"http://{server.address}"
            samples = await loop.run_in_executor(None, scrape, base + "/metrics")
            node = ("node", "1")
            led = [g for g in GROUPS if host.group(g).is_leader]
            accepted = sum(host.group(g).metrics().proposals_accepted for g in GROUPS)
            assert accepted >= 3 * len(led) > 0
            assert samples[("fastraft_host_groups", (node,))] == len(GROUPS)
            assert samples[("fastraft_host_groups_by_role",
                            (node, ("role", "leader")))] == len(led)
            assert samples[("fastraft_host_groups_by_role",
                            (node, ("role", "follower")))] == len(GROUPS) - len(led)
            assert samples[("fastraft_host_groups_without_leader", (node,))] == 0
            assert samples[("fastraft_host_campaigning", (node,))] == 0
            assert samples[("fastraft_host_log_cache_bytes", (node,))] == sum(
                host.group(g).engine.log.cache_bytes for g in GROUPS) > 0
            # every group awake (no quiescence here): the even half of the budget split
            # for an eighth more, plus one
            assert samples[("fastraft_host_log_cache_share_bytes", (node,))] == \
                host.metrics().log_cache_share == \
                budget // 2 // (len(GROUPS) + len(GROUPS) // 8 + 1)
            assert samples[("fastraft_proposals_total",
                            (node, ("outcome", "accepted")))] == accepted
            assert samples[("fastraft_log_write_entries_sum", (node,))] == sum(
                host.group(g)._recorder.log_write_entries.sum for g in GROUPS)
            assert samples[("fastraft_host_frames_total", (("direction", "out"), node))] > 0
            assert samples[("fastraft_messages_total", (("direction", "out"), node,
                                                        ("type", "AppendEntries")))] > 0
            assert ("fastraft_term", (node,)) not in samples  # per group: not summed
            assert await loop.run_in_executor(None, http_get, base + "/health") == (200, "ok\n")
            # the two other hosts gone: no group has a quorum, leaders step down (§6.2)
            for i in (2, 3):
                await hosts.hosts[i].stop()
            del hosts.hosts[2], hosts.hosts[3]

            def unhealthy():
                return http_get(base + "/health")[1].startswith(
                    f"{len(GROUPS)} of {len(GROUPS)} groups know no leader")
            await wait_until(lambda: host.metrics().without_leader == len(GROUPS), 10)
            # with no quorum its groups campaign again and again, each holding a place
            await wait_until(lambda: host.metrics().campaigning == len(GROUPS), 10)
            assert await loop.run_in_executor(None, unhealthy)
            assert (await loop.run_in_executor(None, http_get, base + "/health"))[0] == 503
        finally:
            await server.stop()


def test_health_says_when_to_stop_a_voter_removed_by_an_uncommitted_change():
    """Thesis §4.1: a voter removed by an entry not known committed may have to lead the
    change to commit (tests/test_engine_reads_membership.py); stopped before the change
    returns, it could leave no one able to win an election."""
    engine = replacing_3_by_4(3, 3)
    node = SimpleNamespace(failure=None, _running=True, engine=engine)
    assert health(node, 0) == ("removed from the cluster (voters [1, 2, 4]) by a change "
                               "not known committed here: stop this node once the change "
                               "returns")
    assert engine.step(1, AppendEntries(1, 1, 3, 1, [], 3)) is None  # C_new committed
    assert health(node, 0) == "removed from the cluster (voters [1, 2, 4]): stop this node"
