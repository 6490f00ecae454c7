"""Start-up time of a FileStorage holding N entries: open (scan + checksums) and the full
read a restarting node does. Usage: python bench/filestorage_startup.py [N] [payload]"""
import asyncio
import shutil
import sys
import tempfile
import time

from fastraft import kernels
from fastraft.filestorage import FileStorage
from fastraft.messages import Entry


async def main(n: int, payload: int) -> None:
    d = tempfile.mkdtemp(prefix="fastraft-startup-")
    try:
        s = FileStorage(d, sync=False)
        data = b"x" * payload
        batch = 1000
        for first in range(1, n + 1, batch):
            await s.append_entries([Entry(1, i, 0, data)
                                    for i in range(first, min(first + batch, n + 1))])
        s.close()
        t0 = time.perf_counter()
        s = FileStorage(d)
        t1 = time.perf_counter()
        st = s.load_state()
        entries = await s.read_entries(st.first_index, st.last_index + 1)
        t2 = time.perf_counter()
        assert len(entries) == n
        s.close()
        print(f"kernels.COMPILED={kernels.COMPILED} entries={n:,} payload={payload}B: "
              f"open+scan {t1 - t0:.3f}s, read all {t2 - t1:.3f}s, total {t2 - t0:.3f}s")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000,
                     int(sys.argv[2]) if len(sys.argv) > 2 else 100))
