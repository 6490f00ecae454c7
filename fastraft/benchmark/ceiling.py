"""The ceiling: a raw uvloop pump that sends framed record batches to two receivers and
counts a record once a majority has it (after fdatasync when asked). No consensus logic:
the most loopback (and the disk) allow."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from functools import partial
from typing import Any, cast

from fastraft.asyncutil import run_loop
from fastraft.processes import free_ports


async def pump_receiver(port: int, fsync: bool, workdir: str) -> None:
    """Receive framed record batches; acknowledge each (after fdatasync when asked)."""
    import struct
    fd = os.open(os.path.join(workdir, f"pump-{port}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if fsync else -1
    hdr = struct.Struct("<IQ")  # body length, batch number

    class Receiver(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            data = self.buffer + data if self.buffer else data
            pos, acks = 0, []
            while len(data) - pos >= hdr.size:
                n, batch = hdr.unpack_from(data, pos)
                if len(data) - pos - hdr.size < n:
                    break
                if fd >= 0:
                    os.write(fd, data[pos + hdr.size:pos + hdr.size + n])
                acks.append(batch)
                pos += hdr.size + n
            self.buffer = data[pos:]
            if acks:
                if fd >= 0:
                    os.fdatasync(fd)
                self.transport.write(struct.pack("<Q", acks[-1]))

    server = await asyncio.get_running_loop().create_server(Receiver, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _pump_sender(ports: list[int], in_flight: int, payload: int, seconds: float,
                       batch: int = 256) -> dict[str, Any]:
    """Send records to every receiver; a record counts once a majority (self plus half of
    the receivers) acknowledged its batch. No consensus logic: the ceiling."""
    import struct
    loop = asyncio.get_running_loop()
    hdr = struct.Struct("<IQ")
    record = os.urandom(payload)
    need = (1 + len(ports)) // 2  # a majority of the sender plus the receivers, minus self
    acked = {p: 0 for p in ports}
    sent_batches: dict[int, int] = {}
    state = {"next": 1, "committed_batch": 0, "outstanding": 0, "committed": 0}
    wake = asyncio.Event()

    class Sender(asyncio.Protocol):
        def __init__(self, port: int) -> None:
            self.port = port
            self.buffer = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            data = self.buffer + data
            k = len(data) // 8
            if k:
                acked[self.port] = struct.unpack_from("<Q", data, (k - 1) * 8)[0]
                self.buffer = data[k * 8:]
                quorum = sorted(acked.values(), reverse=True)[need - 1]
                while state["committed_batch"] < quorum:
                    state["committed_batch"] += 1
                    n = sent_batches.pop(state["committed_batch"])
                    state["outstanding"] -= n
                    state["committed"] += n
                wake.set()

    conns: list[Sender] = []
    for p in ports:
        _, proto = await loop.create_connection(partial(Sender, p), "127.0.0.1", p)
        conns.append(proto)
    t0 = loop.time()
    stop = t0 + seconds
    while loop.time() < stop:
        room = in_flight - state["outstanding"]
        if room <= 0:
            wake.clear()
            await wake.wait()
            continue
        n = min(room, batch)
        b = state["next"]
        state["next"] += 1
        body = record * n
        frame = hdr.pack(len(body), b) + body
        sent_batches[b] = n
        state["outstanding"] += n
        for c in conns:
            c.transport.write(frame)
        await asyncio.sleep(0)
    elapsed = loop.time() - t0
    return {"writes": state["committed"], "seconds": elapsed,
            "writes_per_s": state["committed"] / elapsed}


def pump(in_flight: int, payload: int, seconds: float, fsync: bool,
          workdir: str) -> dict[str, Any]:
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, "-m", "fastraft.benchmark", "pump-recv",
                               "--port", str(p), "--data-dir", workdir]
                              + (["--fsync"] if fsync else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ports]
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                return run_loop(_pump_sender(ports, in_flight, payload, seconds))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()


