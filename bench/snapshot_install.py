"""Time for a new learner to receive and install a snapshot of N MiB over TCP on
127.0.0.1 (3 voters and the learner in one process, chunks of 1 MiB, one in flight).
Usage: python bench/snapshot_install.py [MiB]"""
import asyncio
import os
import sys
import time

from fastraft.config import Config
from fastraft.testing import LocalCluster, wait_until


class Blob:
    """A state machine whose whole state is one blob of bytes."""

    size = 100 << 20

    def __init__(self):
        self.state = b""

    def apply(self, entries):
        if not self.state:
            self.state = os.urandom(1024) * (self.size // 1024)
        return [e.index for e in entries]

    def snapshot(self):
        return self.state

    def restore(self, data):
        self.state = bytes(data)


async def main(mib: int) -> None:
    Blob.size = mib << 20
    cfg = Config(snapshot_interval=0, snapshot_trailing_entries=0,
                 election_timeout_min=1.0, election_timeout_max=2.0, heartbeat_interval=0.1)
    async with LocalCluster(3, state_machine=Blob, config=cfg, transport="tcp",
                            spares=1) as c:
        leader = await c.leader()
        await leader.propose(b"fill")
        index = await leader.snapshot()
        assert leader.engine.log.snapshot_index == index
        t0 = time.perf_counter()
        await leader.add_learner(4, c.addresses[4])
        await wait_until(lambda: c.nodes[4].applied_index >= index, 300, "the install")
        elapsed = time.perf_counter() - t0
        assert c.state_machines[4].state == c.state_machines[leader.id].state
        print(f"snapshot of {mib} MiB installed on a new learner in {elapsed:.2f}s "
              f"({mib / elapsed:.0f} MiB/s)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
