"""Real network partitions for tests: one network namespace per node, joined by a bridge.

Needs root and iproute2. Everything is created under names carrying this process's pid
and removed by ``close()``; nothing of the host's own networking is touched besides the
bridge it adds. A cut is a blackhole route in the sender's namespace: ``cut(a, b)`` drops
what ``a`` sends to ``b`` (one way; TCP then stalls both ways, as across a broken
router), while clients on the bridge still reach every node.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import subprocess
import tempfile

SUBNET = "10.231"


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> bool:
    cmd = ["ip", *args] if namespace is None else ["ip", "netns", "exec", namespace, "ip", *args]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.returncode == 0


def why_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"frprobe{os.getpid()}"
    if not _ip("netns", "add", probe, check=False):
        return "ip netns add failed"
    _ip("netns", "del", probe, check=False)
    return None


#: Networks made by this process so far: each gets names of its own, as a namespace
#: deleted by ``close()`` may live on a while (until its sockets in TIME_WAIT are gone)
#: with its end of the veth pair still attached.
_made = itertools.count()


def _unused_subnet() -> str:
    held = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                          text=True, check=True).stdout
    for k in range(1, 255):
        if f" {SUBNET}.{k}." not in held:
            return f"{SUBNET}.{k}"
    raise RuntimeError(f"every {SUBNET}.x.0/24 subnet is in use on this host")


class Network:
    def __init__(self, ids: list[int]) -> None:
        tag = (os.getpid() * 8 + next(_made)) % 100_000
        self.bridge = f"frc{tag}"
        self.namespaces = {i: f"fastraft-chaos-{tag}-{i}" for i in ids}
        self.cuts: set[tuple[int, int]] = set()
        try:
            # Test processes running side by side (pytest-xdist workers) each need a
            # subnet of their own: taken under a lock, as the first one no address of
            # this host is in, and held by the bridge's address before the lock goes.
            with open(os.path.join(tempfile.gettempdir(), "fastraft-netns.lock"),
                      "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = _unused_subnet()
                self.hosts = {i: f"{self.subnet}.{i}" for i in ids}
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, ns in self.namespaces.items():
                veth = f"{self.bridge}v{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("addr", "add", f"{self.hosts[i]}/24", "dev", "eth0", namespace=ns)
                _ip("link", "set", "eth0", "up", namespace=ns)
                _ip("link", "set", "lo", "up", namespace=ns)
        except BaseException:
            self.close()
            raise

    def command_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    def cut(self, a: int, b: int) -> None:
        """Drop every packet ``a`` sends to ``b``."""
        if (a, b) not in self.cuts:
            _ip("route", "add", "blackhole", f"{self.hosts[b]}/32", namespace=self.namespaces[a])
            self.cuts.add((a, b))

    def split(self, *groups: set[int]) -> None:
        """Cut both ways between nodes of different groups."""
        for g in groups:
            for h in groups:
                if g is not h:
                    for a in g:
                        for b in h:
                            self.cut(a, b)

    def heal(self) -> None:
        for a, b in self.cuts:
            _ip("route", "del", "blackhole", f"{self.hosts[b]}/32",
                namespace=self.namespaces[a])
        self.cuts.clear()

    def close(self) -> None:
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair along
        _ip("link", "del", self.bridge, check=False)
