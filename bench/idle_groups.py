"""Idle cost of many Raft groups: 3 RaftHost processes (loopback, MemoryStorage), N groups
each, created 1,000 at a time, no writes, for every count the timings of the writes rows
past 64 groups (heartbeats every 0.25 s, elections after 1.5-3 s). Once the groups had the
time to go quiet: what the hosts send per second (Raft messages, and TCP frames with the
liveness frames) and the busiest host's share of a core.

    python bench/idle_groups.py 10 1000 10000 [--no-quiesce]
"""
import argparse
import json
import tempfile
import time

from fastraft.benchmark.clusters import host_cluster
from fastraft.host import DEFAULT_QUIESCE_AFTER


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("groups", type=int, nargs="+")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--no-quiesce", action="store_true",
                        help="every group heartbeats on its own (Config.quiesce_after=0)")
    args = parser.parse_args()
    # one Config for every count (the writes rows tick slower past 64 groups)
    config = {"quiesce_after": 0.0 if args.no_quiesce else DEFAULT_QUIESCE_AFTER,
              "heartbeat_interval": 0.25, "election_timeout_min": 1.5,
              "election_timeout_max": 3.0}
    for groups in args.groups:
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fastraft-idle-") as workdir:
            r = host_cluster(3, "memory", {
                "groups": groups, "in_flight": 0, "payload": 100, "seconds": 0.1,
                "idle_seconds": args.idle_seconds, "warmup": 0.0, "config": config,
                "create_batch": 1000}, workdir, timeout=600 + groups / 10)
        print(json.dumps({"groups": groups, "quiet_groups_per_host": r["quiet_groups"],
                          "idle_messages_per_s": round(r["idle_messages_per_s"]),
                          "idle_frames_per_s": round(r["idle_frames_per_s"]),
                          "idle_cpu_busiest_host": round(r["idle_cpu"], 4),
                          "rss_mib": r["rss_mib"], "leaders": r["leaders"],
                          "run_seconds": round(time.monotonic() - began)}), flush=True)


if __name__ == "__main__":
    main()
