"""The KV state machine on its own: what it stores, its snapshots, how its dicts grow."""
import io

from hypothesis import given
from hypothesis import strategies as st

from fastraft import kv
from fastraft.messages import Entry

keys = st.text(max_size=4)
commands = st.lists(st.one_of(st.tuples(st.just("put"), keys, st.binary(max_size=3)),
                              st.tuples(st.just("del"), keys),
                              st.just(("junk",))), max_size=60)


def entries(cmds, first=1):
    data = {"put": lambda c: kv.put(c[1], c[2]), "del": lambda c: kv.delete(c[1]),
            "junk": lambda c: b"\xc1"}
    return [Entry(1, first + i, 0, data[c[0]](c)) for i, c in enumerate(cmds)]


@given(commands, commands)
def test_the_store_holds_what_a_dict_would_and_a_snapshot_restores_it(first, then):
    store, values, versions = kv.KVStore(), {}, {}
    for batch, start in ((first, 1), (then, 1 + len(first))):
        results = store.apply(entries(batch, start))
        for i, (cmd, result) in enumerate(zip(batch, results)):
            if cmd[0] == "junk":
                assert isinstance(result, kv.Refused)
                continue
            assert result == start + i
            if cmd[0] == "put":
                values[cmd[1]], versions[cmd[1]] = cmd[2], start + i
            else:
                values.pop(cmd[1], None)
                versions.pop(cmd[1], None)
        assert dict(store.data) == values and dict(store.versions) == versions
        # what snapshot() relies on: both dicts of a shard list their keys alike
        assert all(list(vals) == list(vers) for vals, vers in store._table.shards.values())
        assert len(store.data) == len(values) and sorted(store.data) == sorted(values)
        assert all(store.get(k) == v and store.versions[k] == versions[k]
                   for k, v in values.items())
        assert store.get("absent key") is None and "absent key" not in store.data
        for key in {c[1] for c in first + then if c[0] != "junk"}:  # deleted ones too
            assert store.get(key) == values.get(key)
            assert store.versions.get(key) == versions.get(key)
    restored = kv.KVStore()
    restored.restore(io.BytesIO(store.snapshot().read()))
    assert dict(restored.data) == values and dict(restored.versions) == versions


def test_a_snapshot_is_read_in_chunks_of_bounded_size():
    store = kv.KVStore()
    n = 3 * kv.CHUNK_KEYS + 5
    store.apply([Entry(1, i + 1, 0, kv.put(f"k{i}", b"v")) for i in range(n)])
    stream, reads = store.snapshot(), []
    while chunk := stream.read(1 << 30):
        reads.append(chunk)
    assert len(reads) == 4  # one chunk per read, each of at most CHUNK_KEYS keys
    restored = kv.KVStore()
    restored.restore(io.BytesIO(b"".join(reads)))
    assert restored.data == store.data and len(restored.data) == n


def test_the_shards_of_a_large_store_grow_one_at_a_time():
    """apply() runs on the event loop, and a dict rehashes all its keys in one step when
    it grows (185 ms at 1.4 million keys, longer than an election timeout). No shard may
    hold much more than 1.4/SHARDS of the keys, and their sizes must spread over one
    doubling, so that they never all grow in the same few apply() calls. Keys go to
    shards by hash(), randomized per process: 4,096 keys a shard keep the sampling noise
    of the smallest and largest shard well inside the bounds (with 1,024 a shard the
    ratio passed 2.3 now and then: 2.36 once, up to 2.24 in 40 seeds)."""
    store = kv.KVStore()
    n = 4096 * kv.SHARDS
    for start in range(0, n, 4096):
        store.apply([Entry(1, i + 1, 0, kv.put(f"user:{i:08d}", b"v"))
                     for i in range(start, start + 4096)])
    sizes = sorted(len(values) for values, _ in store._table.shards.values())
    assert sum(sizes) == n == len(store.data) and len(sizes) == kv.SHARDS
    assert sizes[-1] <= 1.6 * n / kv.SHARDS, sizes[-1]
    assert 1.7 <= sizes[-1] / sizes[0] <= 2.3, (sizes[0], sizes[-1])
