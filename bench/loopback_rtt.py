"""The machine's floor under "one write in flight": a bare round trip between two
processes over loopback TCP, with the same event loop (uvloop) and TCP_NODELAY as
fastraft, and no Raft. A write needs at least one such round trip (leader to a follower
and back), so its p50 can only be this plus the work of the leader and a follower.

    python bench/loopback_rtt.py [round trips]      (default: 20,000; 150-byte messages)
"""
import asyncio
import socket
import subprocess
import sys
import time

import uvloop

SIZE = 150


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class Ping(asyncio.Protocol):
    def __init__(self, rounds, done):
        self.rounds, self.done = rounds, done
        self.times = []
        self.received = 0

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                      socket.TCP_NODELAY, 1)
        self.transport = transport
        self.send()

    def send(self):
        self.started = time.perf_counter()
        self.transport.write(b"x" * SIZE)

    def data_received(self, data):
        self.received += len(data)
        if self.received < SIZE:
            return  # the rest of this message is on its way
        self.received -= SIZE
        self.times.append(time.perf_counter() - self.started)
        if len(self.times) == self.rounds:
            self.done.set_result(None)
        else:
            self.send()


async def serve():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)  # ended by the parent


async def ping(port, rounds):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    _, protocol = await loop.create_connection(lambda: Ping(rounds, done), "127.0.0.1", port)
    await done
    times = sorted(protocol.times)
    print(f"{rounds} round trips of {SIZE} bytes: p50 {times[rounds // 2] * 1e6:.1f} us, "
          f"p99 {times[int(rounds * 0.99)] * 1e6:.1f} us")


def main():
    if sys.argv[1:2] == ["serve"]:
        uvloop.run(serve())
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    server = subprocess.Popen([sys.executable, __file__, "serve"], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        uvloop.run(ping(port, rounds))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
