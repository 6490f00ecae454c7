"""Read the stream from where this consumer left off, write each record once, in order,
to an output file, and remember the position across restarts."""
from __future__ import annotations

import argparse
import asyncio
import json
import os

from streamlib import Cluster, decode


class Position:
    """The consumer's state on disk: the next offset, the highest sequence number seen per
    producer (duplicates of a retried append are skipped), and how long the output file
    is. It is saved after the output it describes is durable; on a restart the output is
    cut back to the length saved, so a crash between the two writes repeats nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        state = {"offset": 1, "seen": {}, "output_bytes": 0}
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        self.offset: int = state["offset"]
        self.seen: dict[str, int] = state["seen"]
        self.output_bytes: int = state["output_bytes"]

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"offset": self.offset, "seen": self.seen,
                       "output_bytes": self.output_bytes}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


async def consume(addresses: list[str], state: str, output: str, stop_after: int | None,
                  idle_exit: float | None) -> None:
    position = Position(state)
    started_at = position.offset
    cluster = Cluster(addresses)
    written = 0
    idle = 0.0
    with open(output, "ab") as out:
        out.truncate(position.output_bytes)  # anything past it was never acknowledged
        while stop_after is None or written < stop_after:
            batch = await cluster.call(lambda c: c.records(position.offset, 100),
                                       leader=False)
            if not batch:
                if idle_exit is not None and idle >= idle_exit:
                    break
                await asyncio.sleep(0.05)
                idle += 0.05
                continue
            idle = 0.0
            if stop_after is not None:
                batch = batch[:stop_after - written]
            for offset, data in batch:
                record = decode(data)
                if record.seq > position.seen.get(record.producer, -1):
                    out.write(f"{record.producer} {record.seq} {record.payload}\n".encode())
                    position.seen[record.producer] = record.seq
                    written += 1
                position.offset = offset + 1
            out.flush()
            os.fsync(out.fileno())
            position.output_bytes = out.tell()
            position.save()
    cluster.drop()
    print(f"{written} records from offset {started_at}; next offset {position.offset}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="client addresses: HOST:PORT,...")
    p.add_argument("--state", default="consumer.json", help="where the position is kept")
    p.add_argument("--output", default="consumed.txt")
    p.add_argument("--stop-after", type=int, help="stop after this many new records")
    p.add_argument("--idle-exit", type=float,
                   help="stop once nothing new arrived for this many seconds")
    args = p.parse_args()
    asyncio.run(consume(args.address.split(","), args.state, args.output, args.stop_after,
                        args.idle_exit))


if __name__ == "__main__":
    main()
