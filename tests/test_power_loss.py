"""Power cuts at any point of a storage's work lose nothing it acknowledged.

kill -9 keeps what the kernel holds; a power cut keeps only what was synced. Followers'
lives are played on a ``FileStorage`` and on two groups of a ``SharedWAL`` (appends, hard
states, commit marks, truncations by a new leader, snapshots and compactions, one past
the end of the log), with small segments so that they roll and go; around the storages'
file calls, ``DiskModel`` writes what a power cut there could leave
(``tests/powerloss.py``). Each such image must open, without repair, as the storage was
before the call under way or after it: a power cut never stops a node from starting, and
nothing acknowledged is lost. Some images are opened under a model of their own, and
what a second power cut during that recovery leaves must open the same way. Then whole
nodes: a cluster of three on one machine (``RaftNode``s on ``FileStorage``, then
``RaftHost``s of four groups on one ``SharedWAL`` each) loses power while it takes
writes, and every write it acknowledged is there when it starts again.
"""
import asyncio
import io
import os
import random
import shutil

import msgspec
import pytest
from powerloss import DiskModel

from fastraft import Config, RaftHost, RaftNode, sharedwal, walformat, walregistry
from fastraft.errors import FastRaftError, StorageCorruption
from fastraft.filestorage import FileStorage
from fastraft.messages import Entry, EntryKind, HardState, Membership
from fastraft.processes import free_ports
from fastraft.sharedwal import SharedWAL
from fastraft.storage import SnapshotMeta
from fastraft.testing import wait_until
from fastraft.transport import MemoryHub, TcpNetwork

MEMBERS = Membership(voters=frozenset({1, 2, 3}))
SEGMENT = 1024
CALLS = 150


async def observe(store):
    """What a storage holds, as its user sees it."""
    st = store.load_state()
    entries = await store.read_entries(st.first_index, st.last_index + 1)
    found = await store.load_snapshot()
    snapshot = None
    if found is not None:
        meta, data = found
        with data:
            snapshot = (meta.last_included_index, meta.last_included_term, data.read())
    hs = st.hard_state
    return {"vote": (hs.current_term, hs.voted_for), "snapshot": snapshot,
            "first": st.first_index, "last": st.last_index,
            "entries": {e.index: (e.term, bytes(e.data)) for e in entries}}


def same(found, expected, cut_from=None):
    """Whether ``found`` holds what ``expected`` does; with ``cut_from``, a truncation
    from there under way, its log may also end anywhere from there to where it ended:
    the entries cut were never committed."""
    if any(found[k] != expected[k] for k in ("vote", "snapshot")):
        return False
    if found["last"] != expected["last"] and not (
            cut_from is not None and cut_from - 1 <= found["last"] <= expected["last"]):
        return False
    first = max(found["first"], expected["first"])
    return all(found["entries"].get(i) == expected["entries"].get(i)
               for i in range(first, found["last"] + 1))


def summary(state):
    entries = state["entries"]
    return (f"term/vote {state['vote']}, snapshot {state['snapshot'] and state['snapshot'][:2]}"
            f", log {state['first']}..{state['last']} of terms "
            f"{[entries[i][0] for i in sorted(entries)]}")


class Follower:
    """A follower's storage calls, chosen at random but valid, one at a time."""

    def __init__(self, store, rng):
        self.store, self.rng = store, rng
        self.term, self.last, self.commit, self.floor = 1, 0, 0, 0
        self.saved_term = 0  # the highest term saved in a hard state
        self.terms = {}

    def entries(self, first, n):
        for i in range(first, first + n):
            self.terms[i] = self.term
        return [Entry(self.term, i, EntryKind.NORMAL,
                      b"%d." % i + self.rng.randbytes(self.rng.randint(0, 200)))
                for i in range(first, first + n)]

    async def step(self):
        """One call; returns what it was (a truncation: "truncate <index>")."""
        rng, store = self.rng, self.store
        roll = rng.random()
        if roll < 0.45 or self.last == self.floor:
            n = rng.randint(1, 6)
            await store.append_entries(self.entries(self.last + 1, n))
            self.last += n
            if rng.random() < 0.5:  # the leader's commit index, stamped on the next write
                self.commit = rng.randint(self.commit, self.last)
                store.commit_advanced(self.commit)
            return "append"
        if roll < 0.6:
            if rng.random() < 0.5:
                self.term += 1
            await store.save_hard_state(HardState(self.term, rng.choice([0, 1, 2, 3]),
                                                  self.commit))
            self.saved_term = self.term
            return "hard state"
        if roll < 0.75 and self.last > self.commit:  # a new leader cuts the uncommitted end
            index = rng.randint(self.commit + 1, self.last)
            await store.truncate_suffix(index)
            self.term += 1
            self.last = index - 1
            return f"truncate {index}"
        if roll < 0.9 and self.commit > self.floor:
            index = rng.randint(self.floor + 1, self.commit)
            if rng.random() < 0.5:
                meta = SnapshotMeta(index, self.terms[index], MEMBERS)
                await store.save_snapshot(meta, io.BytesIO(b"state at %d" % index))
            await store.compact_prefix(index)
            self.floor = index
            return "compact"
        if roll < 0.95:  # a snapshot from the leader past the end of this log
            index = self.last + rng.randint(1, 5)
            self.term += 1
            self.terms[index] = self.term
            await store.save_snapshot(SnapshotMeta(index, self.term, MEMBERS),
                                      io.BytesIO(b"leader's state at %d" % index))
            await store.compact_prefix(index)
            self.last = self.floor = self.commit = index
            store.commit_advanced(index)
            return "install"
        return "nothing"


class FileKind:
    name = "FileStorage"

    segments = "log-"

    def open(self, path, repair=False):
        return FileStorage(path, segment_bytes=SEGMENT, repair=repair)

    def views(self, opened):
        return [opened]

    def term_ceiling(self, path):
        return None

    def unnamed(self, path):
        return set()


class SharedKind:
    """Two groups in one WAL: group 8 writes now and then, so it holds old segments
    until they are relocated."""
    name = "SharedWAL"

    segments = "wal-"

    def open(self, path, repair=False):
        return SharedWAL(path, segment_bytes=SEGMENT, max_segments=3, repair=repair)

    def views(self, opened):
        return [opened.group(7), opened.group(8)]

    def term_ceiling(self, path):
        """What the ``terms`` file says: no group's term is above it (None: no file)."""
        found = walformat._read_checked(os.path.join(path, "terms"), sharedwal._TermCeiling)
        return found and found.ceiling

    def unnamed(self, path):
        """The groups with a record in the segments that the ``registry`` does not
        name (a repair that cannot read their records would not know them)."""
        written = set()  # the groups whose last record is not their DROP
        for name in sorted(os.listdir(path)):
            if name.startswith("wal-"):
                with open(os.path.join(path, name), "rb") as f:
                    data = f.read()
                for body in walformat._intact_records(data, 0):
                    group_id, kind = sharedwal._TAG.unpack_from(body)
                    (written.discard if kind == sharedwal.DROP else written.add)(group_id)
        named = set()
        if os.path.exists(os.path.join(path, "registry")):
            with open(os.path.join(path, "registry"), "rb") as f:
                data = f.read()
            for body in walformat._intact_records(data, 0):
                change = msgspec.msgpack.decode(body, type=walregistry._RegistryChange)
                named.update(change.added)
                named.difference_update(change.dropped)
        return written - named


def opening(kind, where, what):
    try:
        return kind.open(where)
    except Exception as exc:
        raise AssertionError(f"{where}: a power cut {what} left a storage that does not "
                             f"open: {exc}") from exc


def opens_as(kind, where, what, before, after, cut_from):
    """The storage in ``where`` opens and each store holds what it held before the call
    under way (the store ``what`` names) or after it; ``cut_from``: each store's
    truncation under way (None: none). No store's term is above the WAL's term ceiling,
    and the WAL's ``registry`` names every group with a record in it."""
    ceiling = kind.term_ceiling(where)
    unnamed = kind.unnamed(where)
    assert not unnamed, f"{where}: a power cut {what} left records of groups {unnamed} " \
        "that the registry does not name"
    opened = opening(kind, where, what)
    try:
        found = [asyncio.run(observe(v)) for v in kind.views(opened)]
    finally:
        opened.close()
    assert ceiling is None or all(f["vote"][0] <= ceiling for f in found), (
        f"{where}: a power cut {what} left a store of a term above the ceiling {ceiling}: "
        f"{[f['vote'] for f in found]}")
    for j, (f, b, a, cut) in enumerate(zip(found, before, after, cut_from)):
        assert same(f, b, cut) or same(f, a), (
            f"{where}: a power cut {what} left store {j} with {summary(f)}; before the call "
            f"{summary(b)}, after {summary(a)}")


def cut_during_recovery(kind, where, what, rng, monkeypatch):
    """Open the storage in ``where`` under a model of its own; returns the images of
    power cuts during that recovery, and what each cut."""
    again = []

    def take(name, when):
        if rng.random() < 0.5:
            again.append((f"{where}-{len(again)}", f"{when} {name}"))
            recovery.image(again[-1][0], rng)

    with monkeypatch.context() as m:
        recovery = DiskModel(where, m, take)
        opened = opening(kind, where, what)
        recovery.on_call = None
        opened.close()
    return again


@pytest.mark.parametrize("kind", [FileKind(), SharedKind()], ids=lambda k: k.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_power_cut_anywhere_loses_nothing_acknowledged(tmp_path, monkeypatch, kind, seed):
    rng = random.Random(seed)
    monkeypatch.setattr(sharedwal, "TERM_MARGIN", 2)  # the term ceiling raised often
    images = []  # (directory, the file call, the number of the storage call under way)
    at = {"k": 0}

    def take(name, when):
        if rng.random() < 0.3:
            where = str(tmp_path / f"image{len(images)}")
            model.image(where, rng)
            images.append((where, f"{when} {name}", at["k"]))

    root = str(tmp_path / "disk")
    model = DiskModel(root, monkeypatch, take)
    calls = [{0: "open"}]  # by call: what each store stepped did

    async def play():
        opened = kind.open(root)
        followers = [Follower(v, rng) for v in kind.views(opened)]
        seen = [[await observe(f.store) for f in followers]]
        for k in range(1, CALLS):
            at["k"] = k
            if len(followers) > 1 and rng.random() < 0.25:
                # every group at once: their records share batches, which roll segments
                done = await asyncio.gather(*(f.step() for f in followers))
                calls.append(dict(enumerate(done)))
            else:
                j = 0 if rng.random() < 0.8 else rng.randrange(len(followers))
                calls.append({j: await followers[j].step()})
            seen.append([await observe(f.store) for f in followers])
        model.on_call = None
        opened.close()
        return seen

    seen = asyncio.run(play())
    assert len(images) > 100
    for n, (where, what, k) in enumerate(images):
        before, after = seen[max(k - 1, 0)], seen[k]
        stepped = calls[k]
        cut_from = [int(stepped[i].split()[1]) if stepped.get(i, "").startswith("truncate")
                    else None for i in range(len(before))]
        # the other stores hold what they held before the call
        expected = (before, [a if i in stepped else b
                             for i, (a, b) in enumerate(zip(after, before))])
        what = f"{what} in call {k} (by store: {stepped})"
        if n % 8:
            opens_as(kind, where, what, *expected, cut_from)
            continue
        for into, cut in cut_during_recovery(kind, where, what, rng, monkeypatch):
            opens_as(kind, into, f"{cut} during the recovery after a power cut {what}",
                     *expected, cut_from)
        opens_as(kind, where, what, *expected, cut_from)


def test_a_truncation_cut_short_after_the_cut_is_finished_at_the_next_start(tmp_path, caplog,
                                                                            monkeypatch):
    """The process dies between a truncation's cut inside a record and the write of the
    head that stays (acknowledged entries): the next start writes them again, and says
    so in one line."""
    import fastraft.walformat as walformat

    def entries(first, last):
        return [Entry(1, i, EntryKind.NORMAL, b"entry %d" % i) for i in range(first, last + 1)]

    async def cut_short():
        store = FileStorage(str(tmp_path / "a"))
        await store.append_entries(entries(1, 4))
        await store.append_entries(entries(5, 10))
        with monkeypatch.context() as m:
            m.setattr(walformat, "_write_at", lambda *a: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                await store.truncate_suffix(8)
        # the machine stops here: what is on disk now is what the next start finds
        shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("LOCK"))
        store.close()

    async def reopened():
        store = FileStorage(str(tmp_path / "b"))
        try:
            st = store.load_state()
            return st.last_index, await store.read_entries(1, st.last_index + 1)
        finally:
            store.close()

    asyncio.run(cut_short())
    assert os.path.getsize(tmp_path / "b" / "log-00000000000000000001.seg") < 200  # cut
    last, found = asyncio.run(reopened())
    assert last == 7 and found == entries(1, 7)
    [line] = [r for r in caplog.records if r.getMessage().find("finishing a truncation") > 0]
    assert line.event == "truncation_finished"
    assert not os.path.exists(tmp_path / "b" / "truncation")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_power_cut_during_a_drop_leaves_the_group_whole_or_gone(tmp_path, monkeypatch,
                                                                   seed):
    """``SharedWAL.drop_group`` under the power-cut model: every image opens, also after
    a second power cut during that recovery, with the dropped group as it was (log and
    snapshot) or gone (nothing of it, not even its snapshot: a new group of that id
    starts empty), the other group as it was."""
    rng = random.Random(seed)
    kind = SharedKind()
    root = str(tmp_path / "disk")
    images = []

    def take(name, when):
        if rng.random() < 0.6:
            images.append((str(tmp_path / f"image{len(images)}"), f"{when} {name}"))
            model.image(images[-1][0], rng)

    async def fill():
        wal = kind.open(root)
        for g in (7, 8):
            store = wal.group(g)
            await store.save_identity(1, "c/1")
            await store.append_entries([Entry(1, i, EntryKind.NORMAL, b"%d.%d" % (g, i))
                                        for i in range(1, 40)])
            await store.save_snapshot(SnapshotMeta(30, 1, MEMBERS), io.BytesIO(b"state %d" % g))
            await store.compact_prefix(30)
        found = [await observe(v) for v in kind.views(wal)]
        wal.close()
        return found

    async def drop():
        wal = kind.open(root)
        await wal.drop_group(7)
        model.on_call = None
        wal.close()

    whole = asyncio.run(fill())
    model = DiskModel(root, monkeypatch, take)
    asyncio.run(drop())
    assert len(images) > 3
    again = [cut for where, what in images[::2]
             for cut in cut_during_recovery(kind, where, what, rng, monkeypatch)]
    for where, what in images + again:
        opened = opening(kind, where, what)
        try:
            found = [asyncio.run(observe(v)) for v in kind.views(opened)]
        finally:
            opened.close()
        gone = dict(EMPTY, vote=(0, None))
        assert found[0] in (whole[0], gone), f"{where}: a power cut {what}: {summary(found[0])}"
        assert found[1] == whole[1], f"{where}: a power cut {what}: {summary(found[1])}"


EMPTY = {"vote": (0, None), "snapshot": None, "first": 1, "last": 0, "entries": {}}


def repaired(kind, where, repair):
    """What each store of the storage in ``where`` holds once opened (``repair``: with
    repair), and whether it is recovering; None if the storage refuses to open."""
    try:
        opened = kind.open(where, repair=repair)
    except StorageCorruption:
        return None
    try:
        return [(asyncio.run(observe(v)), v.load_state().hard_state.recovering)
                for v in kind.views(opened)]
    finally:
        opened.close()


def as_repaired(found, expected):
    """Whether stores hold what a repair made of them (None: refused to open). A repair
    cut short and done again may have raised a SharedWAL's term ceiling meanwhile: a
    group then starts past a later term, with no vote."""
    if found is None or expected is None:
        return found is expected
    return all(
        rf == re and {**f, "vote": None} == {**e, "vote": None}
        and (f["vote"] == e["vote"] or f["vote"][0] > e["vote"][0] and f["vote"][1] is None)
        for (f, rf), (e, re) in zip(found, expected, strict=True))


@pytest.mark.parametrize("kind, damaged_file", [(FileKind(), "segment"), (SharedKind(), "segment"),
                                                (FileKind(), "snapshot")],
                         ids=["FileStorage", "SharedWAL", "FileStorage-snapshot"])
@pytest.mark.parametrize("seed", [1, 2, 3, 14, 92])  # 14: repaired twice; 92: a snapshot left
def test_a_power_cut_during_a_repair_never_leaves_a_store_that_forgot_it(tmp_path, monkeypatch,
                                                                         kind, damaged_file,
                                                                         seed):
    """A repair cuts a damaged log and marks the store recovering: it may have lost
    entries it acknowledged, so it must not vote until a leader has caught it up. A
    power cut during the repair must leave a storage that refuses to open without
    repair, or opens as the repair left it, recovering; opened with repair, it is what
    one uninterrupted repair makes of it."""
    rng = random.Random(seed)
    root = str(tmp_path / "disk")

    def segments():
        return sorted(n for n in os.listdir(root) if n.startswith(kind.segments))

    def snapshots():
        return [os.path.join(root, n) for n in os.listdir(root) if n.startswith("snapshot-")]

    async def play():
        opened = kind.open(root)
        followers = [Follower(v, rng) for v in kind.views(opened)]
        for _ in range(CALLS * 4):
            await followers[0 if rng.random() < 0.8 else 1 % len(followers)].step()
            if len(segments()) > 3 and (damaged_file == "segment" or snapshots()):
                break
        opened.close()
        return [f.saved_term for f in followers]

    monkeypatch.setattr(sharedwal, "TERM_MARGIN", 2)  # the term ceiling raised often
    terms = asyncio.run(play())  # the highest term each store saved
    segments = segments()
    assert len(segments) > 3
    damaged = os.path.join(root, segments[len(segments) // 2])  # neither first nor last
    if damaged_file == "snapshot":  # the repair drops the snapshot and the log behind it
        [damaged] = snapshots()
    with open(damaged, "r+b") as f:
        f.seek(rng.randrange(os.path.getsize(damaged)))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    assert repaired(kind, root, repair=False) is None
    shutil.copytree(root, tmp_path / "reference")
    expected = repaired(kind, str(tmp_path / "reference"), repair=True)
    # None: beyond repair (a SharedWAL group whose compaction point was in what the
    # repair drops), and then every image must refuse to open too. A SharedWAL group
    # whose every record lay beyond the damage is gone, as if never there (its term and
    # vote with it: docs/multiraft.md, "Repairing a host"); every other is recovering.
    assert expected is None or all(recovering for found, recovering in expected
                                   if found != EMPTY)
    # a SharedWAL's repair may drop a group's latest term and vote: it starts the group
    # past every term it had, where it never voted (FileStorage's state file is intact)
    assert expected is None or all(found["vote"][0] >= term for (found, _), term
                                   in zip(expected, terms) if found != EMPTY)
    images = []

    def take(name, when):
        where = str(tmp_path / f"image{len(images)}")
        model.image(where, rng)
        images.append((where, f"{when} {name}"))

    with monkeypatch.context() as m:
        model = DiskModel(root, m, take)
        kind.open(root, repair=True).close()
    assert len(images) > 4
    for where, what in images:
        shutil.copytree(where, where + "-repaired")
        found = repaired(kind, where, repair=False)
        assert found is None or as_repaired(found, expected), (
            f"a power cut {what} during a repair left stores that open without repair "
            f"as {[(summary(f), r) for f, r in found]}; the repair makes "
            f"{expected and [(summary(f), r) for f, r in expected]}")
        assert as_repaired(repaired(kind, where + "-repaired", repair=True), expected), (
            f"a power cut {what} during a repair: repaired again, the stores differ from "
            "one repair's")


class Applied:
    """A state machine holding every entry it applied (index -> payload), its snapshots
    too."""

    def __init__(self):
        self.held = {}

    def apply(self, entries):
        self.held.update((e.index, bytes(e.data)) for e in entries)
        return [e.index for e in entries]

    def snapshot(self):
        return msgspec.msgpack.encode(self.held)

    def restore(self, data):
        self.held = msgspec.msgpack.decode(data.read(), type=dict[int, bytes])


class PowerCuts:
    """The power of the machine going at random file calls of a load under ``root``:
    ``images`` (directory, writes acknowledged by then), at most ``most`` of them, each
    at least ``apart`` acknowledged writes after the one before."""

    def __init__(self, tmp_path, monkeypatch, rng, most, apart):
        self.tmp_path, self.rng, self.most, self.apart = tmp_path, rng, most, apart
        self.acked = []
        self.images = []
        self.root = str(tmp_path / "disk")
        self.model = DiskModel(self.root, monkeypatch, self._take)

    def _take(self, name, when):
        images = self.images
        if len(images) < self.most and len(self.acked) > self.apart * len(images) \
                and self.rng.random() < 0.05:
            images.append((str(self.tmp_path / f"image{len(images)}"), len(self.acked)))
            self.model.image(images[-1][0], self.rng)


NODES = Config(election_timeout_min=0.15, election_timeout_max=0.3, heartbeat_interval=0.03,
               snapshot_interval=40, snapshot_trailing_entries=10)


async def start_cluster(root, members=None):
    hub = MemoryHub()
    nodes = {}
    for i in (1, 2, 3):
        nodes[i] = RaftNode(i, storage=FileStorage(os.path.join(root, f"n{i}"),
                                                   segment_bytes=2048),
                            network=hub.network(i), state_machine=Applied(), config=NODES)
        await nodes[i].start()
    if members:
        for node in nodes.values():
            await node.initialize(members)
    return nodes


async def stop_cluster(nodes):
    for node in nodes.values():
        await node.stop()
        node.storage.close()


def leading(nodes):
    return next((n for n in nodes.values() if n.is_leader), None)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_power_cut_of_the_whole_cluster_keeps_every_acknowledged_write(tmp_path, monkeypatch,
                                                                         seed):
    """Three nodes on one machine, FileStorage with fsync, writers and a leadership
    transfer now and then; the power goes at random moments. Each image, started again,
    elects a leader whose log holds every write acknowledged before the cut, at its
    index."""
    rng = random.Random(seed)
    cuts = PowerCuts(tmp_path, monkeypatch, rng, most=8, apart=20)
    acked, images, root = cuts.acked, cuts.images, cuts.root  # acked: (index, payload)

    async def load():
        nodes = await start_cluster(root, {i: f"local:{i}" for i in (1, 2, 3)})

        async def writer(w):
            for k in range(60):
                while True:
                    await wait_until(lambda: leading(nodes) is not None, 10, "a leader")
                    data = b"w%d.%d" % (w, k)
                    try:
                        acked.append((await leading(nodes).propose(data), data))
                        break
                    except FastRaftError:
                        await asyncio.sleep(0.01)  # a new leader: this write again

        async def transfers():
            while len(acked) < 400:
                await asyncio.sleep(0.1)
                leader = leading(nodes)
                if leader is not None:
                    try:
                        await leader.transfer_leadership(rng.choice(
                            [i for i in nodes if i != leader.id]))
                    except (FastRaftError, TimeoutError):
                        pass  # a move of the moment: the next one may do

        moves = asyncio.ensure_future(transfers())
        await asyncio.gather(*(writer(w) for w in range(8)))
        await moves
        cuts.model.on_call = None
        await stop_cluster(nodes)

    asyncio.run(asyncio.wait_for(load(), 120))
    assert len(images) >= 4

    async def check(where, count):
        try:
            nodes = await start_cluster(where)
        except FastRaftError as exc:
            raise AssertionError(f"{where}: a node does not start: {exc}") from exc
        try:
            try:
                await wait_until(lambda: leading(nodes) is not None
                                 and leading(nodes).engine.committed_in_term, 10, "a leader")
            except TimeoutError:
                held = {i: (n.engine.term, n.engine.log.last_index) for i, n in nodes.items()}
                raise AssertionError(f"{where}: no leader; (term, last index) of each node: "
                                     f"{held}") from None
            leader = leading(nodes)
            await wait_until(lambda: leader.applied_index >= leader.engine.commit_index, 10)
            held = leader.state_machine.held
            lost = [(i, d) for i, d in acked[:count] if held.get(i) != d]
            assert not lost, f"{where}: {len(lost)} of {count} acknowledged writes lost"
        finally:
            await stop_cluster(nodes)

    for where, count in images:
        asyncio.run(check(where, count))


GROUPS = 4


async def start_hosts(root, addresses, found):
    """Three hosts with one ``SharedWAL`` each, every group on all three (the groups'
    configurations hold ``addresses``: a restart uses them again)."""
    hosts, wals = {}, {}
    for i in (1, 2, 3):
        wal = wals[i] = SharedWAL(os.path.join(root, f"h{i}"), segment_bytes=4096,
                                  max_segments=3)
        host = hosts[i] = RaftHost(i, network=TcpNetwork(i, addresses[i]), storage=wal.group,
                                   config=NODES, balance_interval=0.2)
        await host.start()
        for g in range(GROUPS):
            await host.create_group(g, addresses if found else None, state_machine=Applied())
    return hosts, wals


async def stop_hosts(hosts, wals):
    for i, host in hosts.items():
        await host.stop()
        wals[i].close()


def group_leader(hosts, g):
    return next((h.group(g) for h in hosts.values() if h.group(g).is_leader), None)


@pytest.mark.parametrize("seed", [7])
def test_a_power_cut_of_every_host_keeps_every_acknowledged_write(tmp_path, monkeypatch, seed):
    """The same with three ``RaftHost``s of four groups, each host's groups in one
    ``SharedWAL`` (records of every group interleaved, 4 KiB segments freed and
    relocated), leaders moved by the hosts' balancing."""
    rng = random.Random(seed)
    cuts = PowerCuts(tmp_path, monkeypatch, rng, most=6, apart=40)
    acked, images, root = cuts.acked, cuts.images, cuts.root  # acked: (group, index, payload)
    ports = free_ports(3)
    addresses = {i: f"127.0.0.1:{ports[i - 1]}" for i in (1, 2, 3)}

    async def load():
        hosts, wals = await start_hosts(root, addresses, found=True)

        async def writer(g, w):
            for k in range(30):
                while True:
                    await wait_until(lambda: group_leader(hosts, g) is not None, 10,
                                     f"a leader of group {g}")
                    data = b"g%d.w%d.%d" % (g, w, k)
                    try:
                        acked.append((g, await group_leader(hosts, g).propose(data), data))
                        break
                    except FastRaftError:
                        await asyncio.sleep(0.01)  # a new leader: this write again

        await asyncio.gather(*(writer(g, w) for g in range(GROUPS) for w in range(4)))
        cuts.model.on_call = None
        await stop_hosts(hosts, wals)

    asyncio.run(asyncio.wait_for(load(), 120))
    assert len(images) >= 3

    async def check(where, count):
        try:
            hosts, wals = await start_hosts(where, addresses, found=False)
        except FastRaftError as exc:
            raise AssertionError(f"{where}: a host does not start: {exc}") from exc
        try:
            for g in range(GROUPS):
                await wait_until(lambda g=g: group_leader(hosts, g) is not None
                                 and group_leader(hosts, g).engine.committed_in_term, 15,
                                 f"a leader of group {g} in {where}")
                leader = group_leader(hosts, g)
                await wait_until(lambda n=leader: n.applied_index >= n.engine.commit_index, 10)
                held = leader.state_machine.held
                lost = [(i, d) for h, i, d in acked[:count] if h == g and held.get(i) != d]
                assert not lost, f"{where}: group {g} lost {len(lost)} acknowledged writes"
        finally:
            await stop_hosts(hosts, wals)

    for where, count in images:
        asyncio.run(check(where, count))
