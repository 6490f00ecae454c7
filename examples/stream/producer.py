"""Append records ``NAME 0``, ``NAME 1``, ... to the stream, each acknowledged once it is
committed (durable on a majority) before the next is sent."""
from __future__ import annotations

import argparse
import asyncio

from streamlib import Cluster, Record, encode


async def produce(addresses: list[str], name: str, count: int, start: int) -> None:
    cluster = Cluster(addresses)
    for seq in range(start, start + count):
        record = encode(Record(name, seq, f"{name} record {seq}"))
        # an append whose outcome is unknown (connection lost, leadership changed) is
        # sent again: the record may then be in the stream twice, never zero times
        offset = await cluster.call(lambda c, record=record: c.append(record), leader=True)
        print(f"{name} {seq} at offset {offset}", flush=True)
    cluster.drop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="client addresses: HOST:PORT,...")
    p.add_argument("--name", default="producer")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--start", type=int, default=0, help="first sequence number")
    args = p.parse_args()
    asyncio.run(produce(args.address.split(","), args.name, args.count, args.start))


if __name__ == "__main__":
    main()
