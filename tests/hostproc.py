"""One RaftHost process for tests/test_host_processes.py.

    python hostproc.py --id N --cluster 1=H:P,... --groups G --data-dir DIR [--init]
                       [--max-campaigns K]

Runs groups 0..G-1 on one SharedWAL (fsync on). Writes by itself:
to every group it leads, records ``b"<host>:<start>:<seq>"`` one at a time, and after each one is
acknowledged appends ``<group> <record>`` to ``acked-<host>.txt`` (flushed and fsynced
before the next write, so a kill -9 loses no line of a record that was acknowledged),
pausing 0.1 s between rounds so the load stays light. While the file ``pause`` exists in
DIR it writes nothing, and says ``quiet-<host>`` (a file) once every group here is quiet
(``Config.quiesce_after``). When the file ``stop`` appears in
DIR it stops writing, and once every host has (the file ``written-<host>``) makes each
group's replica current (a linearizable read), writes what
every group applied to ``applied-<host>.json`` and exits. The file ``ready-<host>`` says
every group started.
"""
import argparse
import asyncio
import gc
import hashlib
import json
import os
import sys
import time

from fastraft import FastRaftError, RaftHost
from fastraft.addresses import parse_cluster
from fastraft.asyncutil import run_loop
from fastraft.config import Config
from fastraft.host import DEFAULT_MAX_CAMPAIGNS
from fastraft.sharedwal import SharedWAL
from fastraft.transport import TcpNetwork

exists = os.path.exists  # a stat on a local disk: cheap enough for a test's event loop
CONFIG = Config(heartbeat_interval=0.1, election_timeout_min=0.6, election_timeout_max=1.2,
                quiesce_after=0.3)
#: Past a thousand groups: the timings of the benchmark's many-group rows, and groups
#: founded a thousand at a time, each batch quiet before the next (docs/multiraft.md,
#: "Creating thousands of groups"). A restart starts them all at once.
MANY, BATCH = 1000, 1000
MANY_CONFIG = Config(heartbeat_interval=0.25, election_timeout_min=1.5,
                     election_timeout_max=3.0, quiesce_after=1.0)


class Records:
    def __init__(self):
        self.items = []

    def apply(self, entries):
        self.items.extend(bytes(e.data).decode() for e in entries)
        return [None] * len(entries)

    def snapshot(self):
        return "\n".join(self.items).encode()

    def restore(self, data):
        self.items = [line for line in data.read().decode().split("\n") if line]


async def main(args):
    cluster = parse_cluster(args.cluster)
    wal = SharedWAL(os.path.join(args.data_dir, str(args.id)))
    many = args.groups > MANY
    # a cluster id of its own (its addresses): hosts of another test that picked a port
    # of a host of this one while it was down are refused, not mixed in
    cluster_id = "hosts-" + hashlib.sha256(args.cluster.encode()).hexdigest()[:12]
    host = RaftHost(args.id, network=TcpNetwork(args.id, cluster[args.id],
                                                cluster_id=cluster_id),
                    config=MANY_CONFIG if many else CONFIG, storage=wal.group,
                    balance_interval=0.5, max_campaigns=args.max_campaigns)
    await host.start()
    records = {}
    for g in range(args.groups):
        records[g] = Records()
        await host.create_group(g, cluster if args.init else None, state_machine=records[g])
        if many and args.init and (g + 1) % BATCH == 0:
            settled_by = time.monotonic() + 60  # the loop's bound; quiet is the goal
            while time.monotonic() < settled_by and \
                    not all(n.engine.quiet for n in host.groups.values()):
                await asyncio.sleep(0.1)
    # the groups live as long as the process: keep full collections from walking them
    # (docs/multiraft.md, "Creating thousands of groups")
    gc.freeze()
    open(os.path.join(args.data_dir, f"ready-{args.id}"), "w").close()
    if many and args.init:  # no writes before every host has founded every group
        while not all(exists(os.path.join(args.data_dir, f"ready-{i}")) for i in cluster):
            await asyncio.sleep(0.1)
    acked = open(os.path.join(args.data_dir, f"acked-{args.id}.txt"), "a")
    # Unique across restarts: proposals that failed (or were cut short by a kill) may
    # still commit, so the acknowledged lines do not say which numbers were used.
    start = time.time_ns()
    seq = 0
    stop_file = os.path.join(args.data_dir, "stop")
    pause_file = os.path.join(args.data_dir, "pause")
    quiet_file = os.path.join(args.data_dir, f"quiet-{args.id}")
    while not exists(stop_file):
        if exists(pause_file):
            if not exists(quiet_file) and all(n.engine.quiet for n in host.groups.values()):
                open(quiet_file, "w").close()
            await asyncio.sleep(0.1)
            continue
        for g in host.leaders():
            record = f"{args.id}:{start}:{seq}"
            seq += 1
            try:
                await host.group(g).propose(record.encode())
            except FastRaftError:
                continue  # not acknowledged: it may or may not be in the log
            acked.write(f"{g} {record}\n")
            acked.flush()
            os.fsync(acked.fileno())
        await asyncio.sleep(0.1)
    # No reads before every host has stopped writing: a write another host makes after
    # this one's read of its group would be applied there and missing here.
    open(os.path.join(args.data_dir, f"written-{args.id}"), "w").close()
    while not all(exists(os.path.join(args.data_dir, f"written-{i}")) for i in cluster):
        await asyncio.sleep(0.05)
    for g in range(args.groups):
        node = host.group(g)
        while True:
            try:
                await node.wait_for_leader(30)
                await node.read_index()
                break
            except (FastRaftError, TimeoutError):
                await asyncio.sleep(0.05)
    applied = os.path.join(args.data_dir, f"applied-{args.id}.json")
    with open(applied + ".tmp", "w") as f:
        json.dump({g: r.items for g, r in records.items()}, f)
    os.replace(applied + ".tmp", applied)
    # the others may still be reading: serve until every host has written its file
    while not all(exists(os.path.join(args.data_dir, f"applied-{i}.json")) for i in cluster):
        await asyncio.sleep(0.05)
    await host.stop()
    wal.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--init", action="store_true")
    parser.add_argument("--max-campaigns", type=int, default=DEFAULT_MAX_CAMPAIGNS)
    run_loop(main(parser.parse_args()))
    sys.exit(0)
