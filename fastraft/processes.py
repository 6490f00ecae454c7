"""``ProcessCluster``: ``fastraft node`` processes on 127.0.0.1, for demos and tests.

Only processes it started are ever signalled, by their pid; ``stop_all`` ends them all.
Each cluster has a cluster id of its own: clusters started side by side (tests run by
several processes) refuse each other's nodes and clients even when one picks a port
another's stopped node used and will bind again.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastraft.errors import ConfigError

if TYPE_CHECKING:
    from fastraft.kvclient import KVClient

#: Lowest port ``free_ports`` hands out when it picks its own.
LOWEST_PORT = 10_000
#: Ports ``free_ports`` handed out lately in this process, oldest first: a server may
#: not have bound its port yet when the next call comes (a test's cluster, then its
#: metrics port), and a port handed out twice fails one of the two servers' start.
_handed_out: dict[int, None] = {}
_HANDED_OUT_KEPT = 4096


def _ephemeral_low() -> int:
    """Where the kernel's ephemeral ports (a connection's local end) start; 0 if unknown."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def port_range() -> tuple[int, int]:
    """Where ``free_ports`` picks, ``(low, high)`` with ``high`` excluded; ``(0, 0)``: the
    kernel's choice. ``FASTRAFT_PORTS=LOW-HIGH`` sets it (processes that start servers
    side by side, as test processes do, each take a range of their own: a port is free
    for another process too until its server binds it); else below the kernel's
    ephemeral range where it has room (Linux)."""
    spec = os.environ.get("FASTRAFT_PORTS")
    if spec:
        try:
            low, high = (int(part) for part in spec.split("-"))
        except ValueError:
            low = high = 0
        if not 1024 <= low < high <= 65536:
            raise ConfigError(f"FASTRAFT_PORTS must be LOW-HIGH with 1024 <= LOW < HIGH <= "
                              f"65536, got {spec!r}")
        return low, high
    ephemeral = _ephemeral_low()
    return (LOWEST_PORT, ephemeral) if ephemeral > LOWEST_PORT + 1000 else (0, 0)


def handed_out_kept(low: int, high: int) -> int:
    """How many of the ports handed out lately ``free_ports`` keeps from handing out
    again: at most half a small range, which leaves it the other half to pick from."""
    return min(_HANDED_OUT_KEPT, (high - low) // 2) if high else _HANDED_OUT_KEPT


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1, free now, for servers about to start, none of
    them handed out by an earlier call of this process (among the last 4,096). Picked at
    random in ``port_range()``: below the kernel's ephemeral range, such a port is never
    given to the local end of a connection opened between now and the moment the server
    binds it (likelier with clusters starting side by side), which would fail the
    server's start."""
    low, high = port_range()
    pick = random.SystemRandom()  # unaffected by a seeded random module
    socks: list[socket.socket] = []
    failures = 0
    try:
        while len(socks) < n:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", pick.randrange(low, high) if high else 0))
            except OSError:  # in use: pick again, unless binding itself fails
                s.close()
                failures += 1
                if failures > 100:
                    raise
                continue
            if s.getsockname()[1] in _handed_out:
                s.close()
                continue
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        for port in ports:
            _handed_out[port] = None
        while len(_handed_out) > handed_out_kept(low, high):
            del _handed_out[next(iter(_handed_out))]
        return ports
    finally:
        for s in socks:
            s.close()


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory in MiB (Linux): ``VmRSS`` now, ``VmHWM`` its peak."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class ProcessCluster:
    """``n`` nodes with ids 1..n. By default each listens on two free loopback ports;
    with ``hosts`` (id -> an address of that node's own, say in its network namespace) on
    ``RAFT_PORT`` and ``CLIENT_PORT`` there, and ``command_prefix(id)`` is put before its
    command line (``["ip", "netns", "exec", name]``: it execs, so the pid stays the
    node's)."""

    RAFT_PORT = 7000
    CLIENT_PORT = 7001

    def __init__(self, n: int, workdir: str, data_dir: str | None = None,
                 extra_args: list[str] | None = None, *,
                 hosts: dict[int, str] | None = None,
                 command_prefix: Callable[[int], list[str]] | None = None) -> None:
        self.ids = list(range(1, n + 1))
        #: Passed to every node (``--cluster-id``) and client (``connect``).
        self.cluster_id = f"fastraft-{secrets.token_hex(6)}"
        layout = os.path.join(data_dir, "cluster.json") if data_dir else None
        if hosts is not None:
            self.raft = {i: f"{hosts[i]}:{self.RAFT_PORT}" for i in self.ids}
            self.client = {i: f"{hosts[i]}:{self.CLIENT_PORT}" for i in self.ids}
        elif layout and os.path.exists(layout):
            # a restart: the stored membership names these addresses
            with open(layout) as f:
                saved = json.load(f)
            if len(saved["raft"]) != n:
                raise ConfigError(f"{data_dir} holds a cluster of {len(saved['raft'])} nodes, "
                                  f"not {n}")
            self.raft = {int(k): v for k, v in saved["raft"].items()}
            self.client = {int(k): v for k, v in saved["client"].items()}
            # a layout written before clusters had ids of their own: the nodes' default
            self.cluster_id = saved.get("cluster_id", "fastraft")
        else:
            ports = free_ports(2 * n)
            self.raft = {i: f"127.0.0.1:{ports[i - 1]}" for i in self.ids}
            self.client = {i: f"127.0.0.1:{ports[n + i - 1]}" for i in self.ids}
            if layout:
                os.makedirs(os.path.dirname(layout), exist_ok=True)
                with open(layout, "w") as f:
                    json.dump({"raft": self.raft, "client": self.client,
                               "cluster_id": self.cluster_id}, f)
        self.workdir = workdir
        self.data_dir = data_dir
        self.extra_args = extra_args or []
        self.command_prefix = command_prefix
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, i: int, extra_args: Sequence[str] = (), init: bool = True) -> None:
        """Start node ``i``; ``init``: founding the cluster of every node here when its
        data is fresh (else it waits to be added: ``add_learner``)."""
        prefix = self.command_prefix(i) if self.command_prefix else []
        cmd = [*prefix, sys.executable, "-m", "fastraft", "node", "--id", str(i),
               *(["--init"] if init else []),
               "--cluster", ",".join(f"{k}={a}" for k, a in self.raft.items()),
               "--client", self.client[i],
               "--clients", ",".join(f"{k}={a}" for k, a in self.client.items()),
               "--cluster-id", self.cluster_id, *self.extra_args, *extra_args]
        if self.data_dir:
            cmd += ["--data-dir", os.path.join(self.data_dir, f"node-{i}")]
        with open(os.path.join(self.workdir, f"node-{i}.log"), "ab") as logf:
            self.procs[i] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)

    async def connect(self, i: int, **options: Any) -> KVClient:
        """A client of node ``i``'s client port, retrying until it answers (``options``
        as for ``KVClient.connect_retrying``)."""
        # here, not at the top: the benchmark's nodes import this module for free_ports,
        # and the client stack would add 50-100 ms to each one's start
        from fastraft.kvclient import KVClient
        return await KVClient.connect_retrying(self.client[i], cluster_id=self.cluster_id,
                                               **options)

    async def connect_all(self, ids: Sequence[int] | None = None,
                          **options: Any) -> dict[int, KVClient]:
        """``connect`` to each node of ``ids`` (all by default), by node id."""
        return {i: await self.connect(i, **options) for i in (ids or self.ids)}

    def start_all(self) -> None:
        for i in self.ids:
            self.start(i)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no chance to clean up), and reap it."""
        proc = self.procs.pop(i, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``: it stops mid-flight, timers and sockets frozen."""
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGCONT)

    def terminate(self, i: int, timeout: float = 5.0) -> None:
        """SIGTERM node ``i`` (a graceful stop), and reap it; SIGKILL after ``timeout``."""
        proc = self.procs.pop(i, None)
        if proc is not None:
            self._terminate([proc], timeout)

    def stop_all(self, timeout: float = 5.0) -> None:
        self._terminate(list(self.procs.values()), timeout)
        self.procs.clear()

    @staticmethod
    def _terminate(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused node cannot handle SIGTERM
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self, i: int) -> str:
        with open(os.path.join(self.workdir, f"node-{i}.log"), errors="replace") as f:
            return f.read()
