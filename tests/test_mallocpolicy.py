"""The C allocator's settings of a serving process (``fastraft.mallocpolicy``): each case
runs in a process of its own, as the settings are process-wide."""
import platform
import subprocess
import sys

from fastraft.mallocpolicy import settle_malloc

# Frees a 4 MiB block (glibc then raises its threshold to 4 MiB, unless it is fixed),
# then says whether a 1 MiB block got pages of its own: the bytes that malloc has
# mapped so (mallinfo2's hblkhd) grow by that much; then whether 6 MiB of smaller blocks
# freed stay at the top of the heap (keepcost: at least 1 MiB of them, where glibc's
# fixed default hands back all beyond 128 KiB).
_PROBE = """
import ctypes, sys
from fastraft.mallocpolicy import settle_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
settled = sys.argv[1] == "settled" and settle_malloc()
big = bytes(4 << 20)
del big
before = libc.mallinfo2().hblkhd
block = bytes(1 << 20)
mapped = libc.mallinfo2().hblkhd - before >= 1 << 20
blocks = [bytes(64 << 10) for _ in range(96)]
del blocks
print(settled, mapped, libc.mallinfo2().keepcost >= 1 << 20)
"""


def _probe(mode: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                          text=True, check=True).stdout.split()


def test_settle_malloc_gives_big_blocks_pages_of_their_own_whatever_was_freed_before():
    if platform.libc_ver()[0] != "glibc":
        assert settle_malloc() is False  # nothing to set elsewhere
        return
    assert _probe("settled") == ["True", "True", "True"]
    # without it, the 1 MiB block came from the heap: the probe tells the two apart
    assert _probe("default")[:2] == ["False", "False"]
