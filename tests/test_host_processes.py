"""RaftHost in real processes, each on one SharedWAL: many groups on 3 hosts, writes to all, every
group quiet, one host killed (-9) and restarted; every group converges and keeps every
acknowledged write.
FASTRAFT_HOST_GROUPS sets the number of groups (CI: 30; the issue's run: 1000; 10,000 passes)."""
import json
import os
import pathlib
import subprocess
import sys

import waiting

from fastraft.processes import free_ports

HOSTPROC = str(pathlib.Path(__file__).with_name("hostproc.py"))
GROUPS = int(os.environ.get("FASTRAFT_HOST_GROUPS", "30"))


def wait_for(predicate, what):
    waiting.wait_for(predicate, what, 60.0 + GROUPS / 5)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_many_groups_survive_a_host_killed_and_restarted(tmp_path):
    ports = free_ports(3)
    cluster = ",".join(f"{i}=127.0.0.1:{ports[i - 1]}" for i in (1, 2, 3))
    procs = {}

    def start(i, init):
        log = open(tmp_path / f"host-{i}.log", "ab")
        procs[i] = subprocess.Popen(
            [sys.executable, HOSTPROC, "--id", str(i), "--cluster", cluster, "--groups",
             str(GROUPS), "--data-dir", str(tmp_path)]
            + (["--init"] if init else []), stdout=log, stderr=subprocess.STDOUT)

    def acked(i):
        return lines(tmp_path / f"acked-{i}.txt")

    try:
        for i in (1, 2, 3):
            start(i, init=True)
        wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in (1, 2, 3)), "start")
        wait_for(lambda: len(acked(3)) >= GROUPS // 6, "writes through host 3")
        # no writes for a while: every group goes quiet (no heartbeats, no timers)
        (tmp_path / "pause").touch()
        wait_for(lambda: all((tmp_path / f"quiet-{i}").exists() for i in (1, 2, 3)), "quiet")
        procs[3].kill()  # only processes this test started, by pid
        procs[3].wait()
        at_kill = {i: len(acked(i)) for i in (1, 2)}
        (tmp_path / "pause").unlink()
        # hosts 1 and 2 hear nothing from host 3: the quiet groups it led wake, elect
        # leaders on hosts 1 and 2 and take writes, every group
        wait_for(lambda: {line.split()[0] for i in (1, 2) for line in acked(i)[at_kill[i]:]}
                 == {str(g) for g in range(GROUPS)}, "writes to every group after the kill")
        (tmp_path / "ready-3").unlink()
        before_restart = len(acked(3))
        start(3, init=False)  # a restart: every group from its host's SharedWAL
        wait_for(lambda: (tmp_path / "ready-3").exists(), "restart")
        # its groups catch up and the hosts hand it back the groups it prefers to lead
        wait_for(lambda: len(acked(3)) >= before_restart + GROUPS // 6, "writes after restart")
        (tmp_path / "stop").touch()
        for p in procs.values():
            assert p.wait(timeout=120 + GROUPS / 5) == 0, \
                (tmp_path / f"host-{list(procs.values()).index(p) + 1}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    applied = {i: json.loads((tmp_path / f"applied-{i}.json").read_text()) for i in (1, 2, 3)}
    for g in map(str, range(GROUPS)):
        assert applied[1][g] == applied[2][g] == applied[3][g], f"group {g} diverged"
        assert len(set(applied[1][g])) == len(applied[1][g]), f"group {g} applied twice"
    everything = {(g, r) for g in applied[1] for r in applied[1][g]}
    for i in (1, 2, 3):
        for line in acked(i):
            g, record = line.split()
            assert (g, record) in everything, f"acknowledged {record} of group {g} is lost"
    assert sum(len(acked(i)) for i in (1, 2, 3)) >= 2 * GROUPS
