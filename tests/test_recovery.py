"""Nothing acknowledged is ever lost: FileStorage recovery either returns every
acknowledged record or refuses with StorageCorruption, never fewer records silently."""
import asyncio
import glob
import io
import os
import random
import shutil
import struct
import sys

import pytest

from fastraft import kv
from fastraft.errors import StorageCorruption, StorageOwnedElsewhere
from fastraft.filestorage import FileStorage
from fastraft.messages import Entry, EntryKind, HardState, Membership, SnapshotMeta
from fastraft.node import RaftNode
from fastraft.storage import MemoryStorage
from fastraft.transport import MemoryHub

from aio import put_retrying, run, until_applied

HEAD = 24  # magic, length, commit mark, body crc, header crc


async def one_node(directory, **kw):
    store = kv.KVStore()
    node = RaftNode(1, storage=FileStorage(directory), network=MemoryHub().network(1),
                    state_machine=store, **kw)
    await node.start()
    return node, store


async def stop(node):
    await node.stop()
    node.storage.close()


async def write_puts(directory, n=100):
    """A one-node cluster acknowledges ``n`` puts, one record each, and stops cleanly."""
    node, _ = await one_node(directory)
    await node.initialize({1: "local:1"})
    await node.wait_for_leader()
    for k in range(n):
        await node.propose(kv.put(f"k{k}", b"v%d" % k))
    await stop(node)


async def acknowledged_keys(directory):
    """How many of the 100 keys a restarted node serves (raises StorageCorruption)."""
    node, store = await one_node(directory)
    try:
        await node.wait_for_leader(5)
        await node.read_index()
        return sum(1 for k in range(100) if store.data.get(f"k{k}") == b"v%d" % k)
    finally:
        await stop(node)


def segment(directory):
    return sorted(glob.glob(os.path.join(directory, "log-*.seg")))[-1]


def record_offsets(path):
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos += HEAD + struct.unpack_from("<I", data, pos + 4)[0]
    return out


def flip_length_bit(d):
    path = segment(d)
    off = record_offsets(path)[50] + 4 + 3
    data = bytearray(open(path, "rb").read())
    data[off] ^= 0x01
    open(path, "wb").write(data)


def truncate_middle(d):
    path = segment(d)
    os.truncate(path, record_offsets(path)[50] + 3)


def zeros_over_last_20(d):
    path = segment(d)
    start = record_offsets(path)[-20]
    data = bytearray(open(path, "rb").read())
    data[start:] = bytes(len(data) - start)
    open(path, "wb").write(data)


def flip_last_record_byte(d):
    path = segment(d)
    data = bytearray(open(path, "rb").read())
    data[-2] ^= 0xFF
    open(path, "wb").write(data)


def delete_state(d):
    os.unlink(os.path.join(d, "state"))


@pytest.mark.parametrize("damage", [flip_length_bit, truncate_middle, zeros_over_last_20,
                                    flip_last_record_byte, delete_state],
                         ids=lambda f: f.__name__)
@run
async def test_each_damage_of_the_issue_is_refused_never_silently_shortened(damage, tmp_path):
    d = str(tmp_path)
    await write_puts(d)
    assert await acknowledged_keys(d) == 100
    damage(d)
    with pytest.raises(StorageCorruption) as info:
        await acknowledged_keys(d)
    assert str(tmp_path) in str(info.value)


@run
async def test_a_directory_of_another_node_or_cluster_is_refused(tmp_path):
    d = str(tmp_path)
    await write_puts(d, 3)
    for node_id, cluster in ((2, "fastraft"), (1, "beta")):
        store = FileStorage(d)
        node = RaftNode(node_id, storage=store, network=MemoryHub().network(node_id),
                        state_machine=kv.KVStore(), cluster_id=cluster)
        with pytest.raises(StorageOwnedElsewhere, match="belongs to node 1 of cluster "
                           f"'fastraft', not node {node_id} of cluster '{cluster}'"):
            await node.start()
        store.close()
    assert await acknowledged_keys(d) == 3


# ---------------------------------------------------------------- crash points

def _records(directory, batches, mark_last=True):
    """A directory whose log holds ``batches`` (one record each); the commit mark is
    advanced before every append, as the node does."""
    st = FileStorage(directory)
    index = 0
    for size in batches:
        st.commit_advanced(index)
        entries = [Entry(1, index + k + 1, EntryKind.NORMAL, bytes([7 + (index + k) % 200]) * 40)
                   for k in range(size)]
        st._append_sync(entries)
        index += size
    if mark_last:
        st.commit_advanced(index)
    return st, index


def _indexes(directory):
    st = FileStorage(directory)
    try:
        s = st.load_state()
        return [e.index for e in st._read_sync(s.first_index, s.last_index + 1, None)]
    finally:
        st.close()


def _copy_with(src, dst, name, data):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
    with open(os.path.join(dst, name), "wb") as f:
        f.write(data)


def test_a_crash_at_every_byte_of_the_last_write_keeps_every_acknowledged_record(tmp_path):
    """The last record was being written when the process (or machine) died: whatever
    prefix of it reached the disk, recovery returns every earlier record (acknowledged:
    each was fsynced before the next was written) or refuses."""
    src = str(tmp_path / "src")
    st, last = _records(src, [3, 5, 1, 4, 9], mark_last=False)
    st.close()  # the commit mark in ``state`` covers only what was acknowledged
    path = segment(src)
    name = os.path.basename(path)
    data = open(path, "rb").read()
    start = record_offsets(path)[-1]
    acknowledged = list(range(1, last - 9 + 1))
    outcomes = set()
    for cut in range(start, len(data)):
        _copy_with(src, str(tmp_path / "t"), name, data[:cut])
        try:
            got = _indexes(str(tmp_path / "t"))
        except StorageCorruption:
            outcomes.add("refused")
            continue
        assert got == acknowledged, (cut, got)
        outcomes.add("recovered")
    # sectors of the last record that never reached the disk (zeros) but its size did
    for sector in range(start // 512 * 512, len(data), 512):
        damaged = bytearray(data)
        damaged[sector:sector + 512] = bytes(len(damaged[sector:sector + 512]))
        _copy_with(src, str(tmp_path / "t"), name, bytes(damaged))
        try:
            got = _indexes(str(tmp_path / "t"))
        except StorageCorruption:
            continue
        assert got == acknowledged, (sector, got)
    assert outcomes == {"recovered"}  # a torn tail is recognised as such


def test_damage_in_any_field_of_any_sampled_record_is_refused(tmp_path):
    """One bit flipped in the magic, length, commit mark, checksums or payload of a
    record (a seeded sample) stops start-up: every record was acknowledged."""
    src = str(tmp_path / "src")
    st, _ = _records(src, [2, 3, 1, 6, 2, 5, 3, 1, 4, 2])
    st.close()
    path = segment(src)
    name = os.path.basename(path)
    data = open(path, "rb").read()
    offsets = record_offsets(path)
    fields = {"magic": (0, 4), "length": (4, 8), "mark": (8, 16), "body crc": (16, 20),
              "head crc": (20, 24)}
    rng = random.Random(15)
    for start in [offsets[0], offsets[-1]] + rng.sample(offsets[1:-1], 3):
        end = start + HEAD + struct.unpack_from("<I", data, start + 4)[0]
        for lo, hi in list(fields.values()) + [(HEAD, end - start)]:
            for _ in range(3):
                at = start + rng.randrange(lo, hi)
                damaged = bytearray(data)
                damaged[at] ^= 1 << rng.randrange(8)
                _copy_with(src, str(tmp_path / "t"), name, bytes(damaged))
                with pytest.raises(StorageCorruption):
                    _indexes(str(tmp_path / "t"))


def test_a_log_cut_at_any_record_boundary_is_refused_after_a_clean_stop(tmp_path):
    src = str(tmp_path / "src")
    st, _ = _records(src, [1] * 12)
    st.close()
    path = segment(src)
    name = os.path.basename(path)
    data = open(path, "rb").read()
    for boundary in record_offsets(path):
        _copy_with(src, str(tmp_path / "t"), name, data[:boundary])
        with pytest.raises(StorageCorruption, match="were committed"):
            _indexes(str(tmp_path / "t"))


@pytest.mark.parametrize("name", ["state", "snapshot", "identity"])
def test_every_cut_or_flipped_byte_of_a_small_file_is_refused(name, tmp_path):
    src = str(tmp_path / "src")
    st, _ = _records(src, [2, 2])
    st.save_identity(1, "fastraft")
    st._save_state_sync(HardState(3, 1, 2))
    st._save_snapshot_sync(SnapshotMeta(2, 1, Membership(voters=frozenset({1}))),
                           io.BytesIO(b"snapshot data"))
    st.close()
    data = open(os.path.join(src, name), "rb").read()
    for k in range(len(data)):
        for damaged in (data[:k], data[:k] + bytes([data[k] ^ 0x20]) + data[k + 1:]):
            _copy_with(src, str(tmp_path / "t"), name, damaged)
            with pytest.raises(StorageCorruption):
                _indexes(str(tmp_path / "t"))


def test_a_flipped_byte_in_an_unmarked_last_record_is_not_taken_for_a_torn_write(tmp_path):
    """After a kill -9 no commit mark covers the last record; it was fsynced (perhaps
    acknowledged) all the same. A flipped byte with no sector of zeros is damage, not an
    interrupted write: refused, not dropped."""
    src = str(tmp_path / "src")
    st, _ = _records(src, [3, 4, 5], mark_last=False)
    st.close()
    path = segment(src)
    data = open(path, "rb").read()
    start = record_offsets(path)[-1]
    for at in range(start, len(data), 7):
        damaged = bytearray(data)
        damaged[at] ^= 0x04
        _copy_with(src, str(tmp_path / "t"), os.path.basename(path), bytes(damaged))
        with pytest.raises(StorageCorruption):
            _indexes(str(tmp_path / "t"))


# ---------------------------------------------------------------- through the CLI

@run
async def test_a_poison_entry_stops_every_node_loudly(tmp_path):
    """A state machine that raises on a committed entry: every node that applies it
    exits with code 3 naming the entry (a supervisor sees it; no zombie), the client is
    told; a node that never learned the entry committed cannot apply it."""
    from fastraft.kvclient import ClientError, find_leader
    from fastraft.processes import ProcessCluster

    cluster = ProcessCluster(3, str(tmp_path), extra_args=[
        "--state-machine", "fastraft.testing.faulty:PoisonKV"])
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        leader = await find_leader(clients)
        index = await clients[leader].put("fine", b"1") + 1
        with pytest.raises((ClientError, ConnectionError)) as info:
            await clients[leader].put("poison-pill", b"x")
        if isinstance(info.value, ClientError):
            assert "NodeFailed" in str(info.value)
        assert await asyncio.to_thread(cluster.procs[leader].wait, 20) == 3
        for i in cluster.ids:
            if cluster.procs[i].poll() is None:
                try:
                    assert (await clients[i].status())["applied_index"] < index
                    continue
                except ConnectionError:
                    pass  # it applied the entry while asked (a new leader commits it)
                except ClientError as exc:
                    if exc.error != "closing":
                        raise
                    # the same, seen as its port's closing notice as it shuts down
            assert await asyncio.to_thread(cluster.procs[i].wait, 20) == 3
            assert f"stopped: the state machine failed applying entry {index}: " \
                "ValueError" in cluster.log(i)
        for c in clients.values():
            c.close()
    finally:
        cluster.stop_all()


def test_the_cli_refuses_another_nodes_data_dir_in_one_line(tmp_path):
    import subprocess
    import sys

    from fastraft.processes import free_ports

    raft, client = free_ports(2)

    def node(node_id, cluster_id):
        return subprocess.run(
            [sys.executable, "-m", "fastraft", "node", "--id", str(node_id), "--init",
             "--cluster", f"{node_id}=127.0.0.1:{raft}", "--client", f"127.0.0.1:{client}",
             "--data-dir", str(tmp_path / "d"), "--cluster-id", cluster_id],
            capture_output=True, text=True, timeout=60)

    asyncio.run(write_puts(str(tmp_path / "d"), 5))  # node 1 of cluster "fastraft"
    refused = node(2, "beta")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "belongs to node 1 of cluster 'fastraft', not node 2 of cluster 'beta'" in \
        refused.stderr
    corrupt = tmp_path / "d" / "state"
    corrupt.write_bytes(corrupt.read_bytes()[:-1])
    refused = node(1, "fastraft")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "StorageCorruption" not in refused.stderr and "fails its checksum" in refused.stderr


# ---------------------------------------------------------------- repair

@pytest.mark.parametrize("compacting", [False, True])
@run
async def test_a_damaged_follower_is_refused_then_repaired_and_catches_up(tmp_path,
                                                                          compacting):
    """A follower's WAL is damaged in the middle: it refuses to start; with --repair it
    keeps its intact prefix, rejoins as 'recovering' (no votes, no campaigns), is caught
    up by the leader, and serves every acknowledged write again. ``compacting``: the
    leader compacts past what the follower had acknowledged while it is away, so its
    heartbeats carry prev_log_term -1 (taken as a match, the follower once set its
    commit index beyond its log and crashed in the command runner)."""
    from fastraft.kvclient import find_leader
    from fastraft.processes import ProcessCluster

    data = tmp_path / "data"
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(data),
                             extra_args=["--snapshot-interval", "40"] if compacting else None)
    clients = {}
    acked = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        for k in range(150):  # an election may come soon after the start: write again
            acked[f"a{k}"] = await put_retrying(clients, f"a{k}")
        leader = await find_leader(clients)
        victim = next(i for i in cluster.ids if i != leader)
        clients.pop(victim).close()
        cluster.kill(victim)
        path = segment(str(data / f"node-{victim}"))
        middle = record_offsets(path)[len(record_offsets(path)) // 2]
        raw = bytearray(open(path, "rb").read())
        raw[middle + HEAD + 3] ^= 0x10
        open(path, "wb").write(raw)

        cluster.start(victim)
        assert await asyncio.to_thread(cluster.procs[victim].wait, 30) == 2
        assert "fails its checksum" in cluster.log(victim)

        for k in range(150):  # written while it is away
            acked[f"b{k}"] = await clients[leader].put(f"b{k}", b"v")
        if compacting:  # what it acknowledged before the damage is compacted
            assert (await clients[leader].status())["snapshot_index"] > 150
        cluster.start(victim, ["--repair"])
        clients[victim] = await cluster.connect(victim)
        assert "REPAIR" in cluster.log(victim)
        target = (await clients[leader].status())["commit_index"]

        async def caught_up():
            while True:
                s = await clients[victim].status()
                if not s["recovering"] and s["applied_index"] >= target:
                    return s
                await asyncio.sleep(0.02)
        status = await asyncio.wait_for(caught_up(), 30)
        assert status["term"] == (await clients[leader].status())["term"]
        for key, version in acked.items():
            resp = await clients[victim].request("get", key)
            assert resp.version == version, key
        assert "Traceback" not in cluster.log(victim)
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


@run
async def test_a_follower_started_again_on_an_empty_directory_is_reported_and_caught_up(
        tmp_path):
    """Not supported (docs/storage.md: replace such a node), but done by mistake: a
    follower's directory is wiped and the node started again under its id. The leader
    took its answers for stale ones and the node stayed behind for good; now the leader
    logs what happened, in one line, and catches it up."""
    import shutil

    from fastraft.kvclient import find_leader
    from fastraft.processes import ProcessCluster

    data = tmp_path / "data"
    cluster = ProcessCluster(3, str(tmp_path), data_dir=str(data))
    clients = {}
    try:
        cluster.start_all()
        clients = await cluster.connect_all()
        for k in range(50):  # an election may come soon after the start: write again
            await put_retrying(clients, f"a{k}")
        leader = await find_leader(clients)
        victim = next(i for i in cluster.ids if i != leader)
        clients.pop(victim).close()
        cluster.terminate(victim)
        shutil.rmtree(data / f"node-{victim}")
        cluster.start(victim)  # --init on an empty directory, as the first time
        clients[victim] = await cluster.connect(victim)
        await until_applied([clients[victim]],
                            (await clients[leader].status())["commit_index"])
        said = [line for line in cluster.log(leader).splitlines()
                if "its storage lost them" in line]
        assert len(said) == 1 and f"node {victim} had acknowledged" in said[0], said
        assert "Traceback" not in cluster.log(victim) + cluster.log(leader)
    finally:
        for c in clients.values():
            c.close()
        cluster.stop_all()


def _writer_on(storage, engine_commit_index=0):
    """A LogWriter on ``storage`` for a node whose engine says ``engine_commit_index``."""
    import asyncio
    from types import SimpleNamespace

    from fastraft.node.metrics import Recorder
    from fastraft.node.writer import LogWriter
    engine = SimpleNamespace(commit_index=engine_commit_index,
                             log_persisted=lambda index, term: None,
                             take_commands=lambda: [])
    failures = []
    node = SimpleNamespace(engine=engine, _loop=asyncio.get_running_loop(), _running=True,
                           _runner=SimpleNamespace(run=lambda commands: None),
                           _recorder=Recorder(),
                           _fail_node=lambda what: failures.append(sys.exc_info()[1]))
    writer = LogWriter(node)
    writer.failures = failures
    writer.bind(storage)
    return writer


async def _written(writer):
    while writer.writes and not writer.failures:
        await asyncio.sleep(0.001)
    assert not writer.failures, f"the node would stop: {writer.failures[0]!r}"


@run
async def test_a_commit_mark_never_lands_on_entries_a_later_truncation_in_the_batch_replaces(
        tmp_path):
    """Found by tests/test_chaos.py: one write batch held an old leader's entries 1..5,
    then (a new leader's AppendEntries arrived meanwhile) a truncation from 3 and the new
    entries 3..4, with the commit index already at 4. The mark was stamped on the first
    append, so storage refused the truncation as cutting committed entries, stopping the
    node. The mark belongs on the batch's last append only."""
    from fastraft.engine import AppendLog, TruncateLog

    storage = FileStorage(str(tmp_path))
    storage.load_state()
    writer = _writer_on(storage)
    old = [Entry(1, i, EntryKind.NORMAL, b"old") for i in range(1, 6)]
    new = [Entry(2, i, EntryKind.NORMAL, b"new") for i in range(3, 5)]
    writer.submit([AppendLog(old), TruncateLog(3), AppendLog(new)], [], 4)
    await _written(writer)
    storage.close()
    reopened = FileStorage(str(tmp_path))
    state = reopened.load_state()
    assert state.last_index == 4 and state.hard_state.commit == 4
    got = reopened._read_sync(1, 5, None)
    assert [(e.term, bytes(e.data)) for e in got] == [(1, b"old")] * 2 + [(2, b"new")] * 2
    reopened.close()


@run
async def test_the_commit_mark_is_the_commit_index_the_writes_were_emitted_with(tmp_path):
    """Found by tests/test_chaos.py: a leader paused (SIGSTOP) with its own entries 4..6
    waiting to be written; resumed, it learned of a new leader, whose entries at 4..
    moved its commit index to 9 before those commands reached the writer. The writer
    stamped the engine's commit index of that moment on the old entries 4..6, and then
    refused the truncation from 4 the new leader's entries need."""
    from fastraft.engine import AppendLog, TruncateLog

    storage = FileStorage(str(tmp_path))
    storage.load_state()
    writer = _writer_on(storage, engine_commit_index=9)  # the engine moved on meanwhile
    writer.submit([AppendLog([Entry(1, i, EntryKind.NORMAL, b"a") for i in range(1, 4)])],
                  [], 3)
    writer.submit([AppendLog([Entry(1, i, EntryKind.NORMAL, b"old") for i in range(4, 7)])],
                  [], 3)
    await _written(writer)
    writer.submit([TruncateLog(4),
                   AppendLog([Entry(2, i, EntryKind.NORMAL, b"new") for i in range(4, 10)])],
                  [], 9)
    await _written(writer)
    storage.close()
    reopened = FileStorage(str(tmp_path))
    got = reopened._read_sync(1, 10, None)
    assert [bytes(e.data) for e in got] == [b"a"] * 3 + [b"new"] * 6
    reopened.close()



def _stale_log_under_a_snapshot(store):
    """What a follower's storage held when it crashed right after saving a snapshot from
    its leader over a log that disagreed with it, before cutting that log (fastraft now
    cuts the entries past the snapshot first; earlier versions left this): entries 1..30
    of a deposed leader's term 2 (6 MB: more than one read batch at start), the snapshot
    at 20 of term 4."""
    leader_state = kv.KVStore()
    leader_state.apply([Entry(4, 20, EntryKind.NORMAL, kv.put("k", b"v"))])
    return (store.append_entries([Entry(2, i, EntryKind.NORMAL, b"%02d" % i * 300_000)
                                  for i in range(1, 31)]),
            store.save_hard_state(HardState(5, None, 0)),
            store.save_snapshot(SnapshotMeta(20, 4, Membership(
                voters=frozenset({1}), addresses={1: "local:1"})),
                leader_state.snapshot()))


@pytest.mark.parametrize("kind", ["memory", "file"])
@run
async def test_a_log_that_goes_back_in_term_after_the_snapshot_is_cut_at_start(
        kind, tmp_path, caplog):
    """Entries past a snapshot with an older term than the snapshot's were never
    committed (§5.3): at start the node cuts them, says so in one line, and goes on from
    the snapshot; they never reach the state machine, and what it writes next survives a
    restart. (It was a ValueError of the log index, then a StorageCorruption.)"""
    store = MemoryStorage() if kind == "memory" else FileStorage(str(tmp_path / "n1"))
    for done in _stale_log_under_a_snapshot(store):
        if done is not None:  # FileStorage's hooks are coroutines, MemoryStorage's not
            await done
    try:
        for restart in (False, True):
            sm = kv.KVStore()
            node = RaftNode(1, storage=store, network=MemoryHub().network(1),
                            state_machine=sm)
            with caplog.at_level("WARNING", logger="fastraft.node"):
                await node.start()
            cut = [r.getMessage() for r in caplog.records if "cutting them" in r.getMessage()]
            if not restart:
                assert cut == ["node 1: entries 21..30 of term 2 follow the snapshot of "
                               "term 4 at 20: a log the snapshot replaced, never "
                               "committed; cutting them"], cut
                await node.wait_for_leader(timeout=10)
                await node.propose(kv.put("after", b"restart"))
            else:
                assert cut == []  # cut once, durably
                await node.wait_for_leader(timeout=10)
                await node.read_index()
            assert dict(sm.data) == {"k": b"v", "after": b"restart"}
            assert [(e.index, e.term) for e in node.engine.log.slice(21, 23)] == \
                [(21, 6), (22, 6)]  # the new leader's (term 6) empty entry, the put
            await node.stop()
            caplog.clear()
    finally:
        if kind == "file":
            store.close()


@run
async def test_a_log_that_goes_back_in_term_inside_is_refused_in_one_clear_error():
    """The same regression between two entries of the log (not right after the
    snapshot) is damage: refused at start with StorageCorruption saying where."""
    store = MemoryStorage()
    store.append_entries([Entry(3, 1, EntryKind.NORMAL, b"a"),
                          Entry(2, 2, EntryKind.NORMAL, b"b")])
    node = RaftNode(1, storage=store, network=MemoryHub().network(1),
                    state_machine=kv.KVStore())
    with pytest.raises(StorageCorruption, match="goes on at entry 2 with term 2, older "
                                                "than term 3 of entry 1: damage; "):
        await node.start()
