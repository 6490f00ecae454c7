import fcntl
import os

import pytest
from hypothesis import settings

from fastraft.filestorage import FileStorage
from fastraft.processes import port_range

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _own_ports() -> None:
    """Each test process (pytest-xdist worker) picks server ports in a range of its own,
    its slice of ``FASTRAFT_PORTS`` or of the default range (``free_ports``; the node
    processes it starts inherit it): a port two workers picked at once was free for both
    until one's server bound it, and the other's then could not start (a README run: one
    worker's node 2 on another's client port)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    low, high = port_range()
    if not high:
        return
    width = (high - low) // count
    first = low + int(worker.removeprefix("gw")) * width
    os.environ["FASTRAFT_PORTS"] = f"{first}-{first + width}"


_own_ports()


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="soak runs: tests/test_chaos.py for 30 minutes")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``alone`` first, one after the other: each waits for the test running
    beside it to end (``_room_to_run``), and at the start those are short ones, where
    later it could be a 35 s process test, a worker idle all that time."""
    items.sort(key=lambda item: item.get_closest_marker("alone") is None)


@pytest.fixture(autouse=True)
def _room_to_run(request, tmp_path_factory):
    """With several test processes (pytest-xdist), a test marked ``alone`` runs with no
    other test beside it: it makes a load of its own and asserts what the cluster keeps
    under it (a leader, a term), which a neighbour's load on the same cores would turn
    into a test of the machine. The gate lock, held while waiting, keeps the other
    workers from starting test after test ahead of it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # one directory for all the workers
    with open(shared / "gate.lock", "a") as gate, open(shared / "room.lock", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        alone = request.node.get_closest_marker("alone") is not None
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        yield


@pytest.fixture
def file_storage(tmp_path):
    """A factory of FileStorage directories under tmp_path, all closed at teardown."""
    opened = []

    def make():
        opened.append(FileStorage(str(tmp_path / f"store{len(opened) + 1}")))
        return opened[-1]

    yield make
    for store in opened:
        store.close()
