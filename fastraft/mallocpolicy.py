"""The C allocator's settings for a process that serves Raft (``fastraft node``, the
benchmark's processes). Like the garbage collector's (``fastraft.gcpolicy``) they are
process-wide, so ``RaftNode`` never makes them; an embedding program can call
``settle_malloc`` itself, or set ``MALLOC_MMAP_THRESHOLD_=262144`` and
``MALLOC_TRIM_THRESHOLD_=8388608`` in the environment (docs/storage.md, "Memory")."""
from __future__ import annotations

import ctypes
import platform

#: Blocks of at least this many bytes get pages of their own, handed back to the system
#: when freed (glibc's ``M_MMAP_THRESHOLD``).
BIG_BLOCK_BYTES = 256 << 10
#: Free bytes at the top of the heap that malloc keeps rather than hand back (glibc's
#: ``M_TRIM_THRESHOLD``).
KEPT_TOP_BYTES = 8 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def settle_malloc() -> bool:
    """Under glibc, fix the size from which a block gets pages of its own at
    ``BIG_BLOCK_BYTES``, and keep up to ``KEPT_TOP_BYTES`` free at the top of the heap;
    returns whether it did (False under another C library).

    glibc starts that threshold at 128 KiB and raises it to the size of each such block
    freed, up to 32 MiB: once a node has freed one batch of big entries, later batches
    come from the heap, between small objects that keep it from shrinking, and its peak
    memory depends on how they happened to interleave. With 10 KiB writes a leader's
    peak RSS ranged from 68 to over 100 MiB between runs of the same load, and is about
    65 MiB with the threshold fixed (docs/storage.md). Writes of 100 bytes rarely make
    such blocks (a batch of 1,024 is some 120 KiB). The top of the heap is kept as glibc
    keeps it once its threshold has grown to 4 MiB (twice that): a busy node does not
    hand memory back only to ask for it again."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, BIG_BLOCK_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, KEPT_TOP_BYTES))
