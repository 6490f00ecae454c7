"""Time for a new learner to receive and install a snapshot of N MiB over TCP on
127.0.0.1 (3 voters and the learner in one process, FileStorage, chunks of 1 MiB, one in
flight), from a state machine whose state is one file: the snapshot streams from file to
file. Reports the growth of the process's peak RSS during the install.
Usage: python bench/snapshot_install.py [MiB]"""
import asyncio
import os
import resource
import sys
import tempfile
import time

from fastraft.config import Config
from fastraft.filestorage import FileStorage
from fastraft.testing import LocalCluster, wait_until
from fastraft.testing.filesm import FileStateMachine


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(mib: int, tmp: str) -> None:
    counter = iter(range(1, 100))
    storages = []

    def storage():
        storages.append(FileStorage(os.path.join(tmp, f"store{len(storages) + 1}")))
        return storages[-1]

    def state_machine():
        return FileStateMachine(os.path.join(tmp, f"sm{next(counter)}"))

    cfg = Config(snapshot_interval=0, snapshot_trailing_entries=0,
                 election_timeout_min=1.0, election_timeout_max=2.0, heartbeat_interval=0.1)
    try:
        async with LocalCluster(3, state_machine=state_machine, config=cfg, transport="tcp",
                                spares=1, storage=storage) as c:
            leader = await c.leader()
            await leader.propose(b"grow %d" % mib)
            index = await leader.snapshot()
            assert leader.engine.log.snapshot_index == index
            rss0 = peak_rss_mib()
            t0 = time.perf_counter()
            await leader.add_learner(4, c.addresses[4])
            await wait_until(lambda: c.nodes[4].applied_index >= index, 600, "the install")
            elapsed = time.perf_counter() - t0
            assert c.state_machines[4].digest() == c.state_machines[leader.id].digest()
            print(f"snapshot of {mib} MiB installed on a new learner in {elapsed:.2f}s "
                  f"({mib / elapsed:.0f} MiB/s); peak RSS {rss0:.0f} -> "
                  f"{peak_rss_mib():.0f} MiB")
    finally:
        for s in storages:
            s.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100, d))
