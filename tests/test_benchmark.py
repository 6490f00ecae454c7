"""The benchmark's processes start, write and report, as ``fastraft bench`` and
``bench/*.py`` run them (how fast is measured there, never here): a single-group row and
a multi-group row on one SharedWAL per host, each cut short."""
from fastraft.benchmark.clusters import host_cluster, node_cluster


def test_a_single_group_row_counts_its_writes_and_their_latencies(tmp_path):
    load = {"in_flight": 4, "payload": 100, "seconds": 0.3, "batch": 1}
    r = node_cluster(3, ["bench-node", "--storage", "file"], load, str(tmp_path))
    assert r["writes"] > 0 and r["writes_per_s"] == r["writes"] / 0.3
    assert 0 < r["p50_ms"] <= r["p99_ms"], r
    assert "leadership_lost" not in r, r["leadership_lost"]


def test_a_multi_group_row_merges_what_every_host_reports(tmp_path):
    load = {"groups": 3, "in_flight": 6, "payload": 100, "seconds": 0.3,
            "idle_seconds": 0.3}
    r = host_cluster(3, "file", load, str(tmp_path))
    assert r["writes"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
    assert sum(r["leaders"]) == 3 and len(r["rss_mib"]) == 3, r
    # every host worked while it was measured (a host's CPU is its whole process's)
    assert len(r["load_cpu"]) == 3 and all(0 < c for c in r["load_cpu"]), r
    # the idle figures (their flatness is tests/test_host.py's; a loaded CI machine may
    # wake a group while they are counted)
    assert r["idle_frames_per_s"] > 0 and 0 <= r["quiet_groups"] <= 3, r
    assert "leadership_lost" not in r, r["leadership_lost"]
