"""What a user meets on the command line: wrong arguments get one clear line and exit 2,
never a traceback."""
import subprocess
import sys

import pytest

import fastraft

NODE = ["node", "--client", "127.0.0.1:1"]


@pytest.mark.parametrize("args, says", [
    (NODE + ["--id", "0", "--cluster", "1=127.0.0.1:2"], "--id: must be above 0"),
    (NODE + ["--id", "2", "--cluster", "1=127.0.0.1:2"], "--id 2 is not in --cluster"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2", "--log-level", "bogus"],
     "invalid choice: 'BOGUS'"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:99999"], "port 99999 is out of range"),
    (NODE + ["--id", "1", "--cluster", "1=127.0.0.1:2,1=127.0.0.1:3"],
     "node 1 appears twice"),
    (NODE + ["--id", "1", "--cluster", "1=nowhere"], "expected ID=HOST:PORT"),
    (["demo", "--inflight", "0"], "--inflight: must be above 0"),
    (["demo", "--nodes", "x"], "'x' is not a number"),
], ids=["id-0", "id-not-member", "log-level", "port", "duplicate-id", "bad-member",
        "inflight-0", "nodes-nan"])
def test_wrong_arguments_get_one_clear_line(args, says):
    done = subprocess.run([sys.executable, "-m", "fastraft", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1]


def test_version():
    done = subprocess.run([sys.executable, "-m", "fastraft", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"fastraft {fastraft.__version__}"


def test_help_is_plain_text_and_names_every_command():
    done = subprocess.run([sys.executable, "-m", "fastraft", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "``" not in done.stdout
    for command in ("demo", "node", "status", "bench"):
        assert command in done.stdout
