"""The guide's promises: every Python block of the pages a newcomer copies from runs as a
program, every Config field is in the configuration reference, every metric is listed."""
import pathlib
import re
import subprocess
import sys

import pytest

from fastraft.config import Config

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNNABLE = ["README.md", "docs/getting-started.md", "docs/api.md", "docs/network.md",
            "docs/multiraft.md"]


def python_blocks(page):
    text = (ROOT / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("page, k", [(page, k) for page in RUNNABLE
                                     for k in range(len(python_blocks(page)))])
def test_every_python_block_runs(page, k, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(python_blocks(page)[k])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{page} block {k + 1}:\n{done.stderr}"


def test_the_runnable_pages_have_blocks():
    assert all(python_blocks(page) for page in RUNNABLE)


def test_the_configuration_reference_names_every_field():
    text = (ROOT / "docs/configuration.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert documented == set(Config.__struct_fields__)


def test_the_operations_page_lists_every_metric():
    source = (ROOT / "fastraft/metrics.py").read_text()
    names = set(re.findall(r'"(fastraft_[a-z_]+)"', source))
    assert len(names) > 20
    text = (ROOT / "docs/operations.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/operations.md does not list {missing}"
