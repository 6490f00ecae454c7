import os

import pytest
from hypothesis import settings

from fastraft.filestorage import FileStorage

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="soak runs: tests/test_chaos.py for 30 minutes")


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
