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


def test_no_dict_of_a_large_store_holds_much_more_than_its_share_of_the_keys():
    """apply() runs on the event loop, and a dict rehashes all its keys in one step when
    it grows (185 ms at 1.4 million keys, longer than an election timeout): every one of
    the store's dicts must stay near 1/SHARDS of the keys, whatever the keys are."""
    store = kv.KVStore()
    n = 64 * kv.SHARDS
    for start in range(0, n, 4096):
        store.apply([Entry(1, i + 1, 0, kv.put(f"user:{i:08d}", b"v"))
                     for i in range(start, start + 4096)])
    sizes = [len(values) for values, _ in store._table.shards.values()]
    assert sum(sizes) == n == len(store.data)
    assert max(sizes) <= 2 * n // kv.SHARDS, max(sizes)
