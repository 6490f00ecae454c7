"""A state machine whose whole state is one file: snapshots stream from it and restore
streams into it, so a snapshot never has to be held in memory."""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from typing import BinaryIO

from fastraft.messages import Entry


class FileStateMachine:
    """Command ``b"grow <MiB>"`` appends that much deterministic data to the file; any
    other command is appended as is."""

    def __init__(self, path: str) -> None:
        self.path = path
        open(path, "wb").close()

    def apply(self, entries: Sequence[Entry]) -> list[int]:
        with open(self.path, "ab") as f:
            for e in entries:
                data = bytes(e.data)
                if data.startswith(b"grow "):
                    block = hashlib.sha256(b"%d" % e.index).digest() * (1 << 15)  # 1 MiB
                    for _ in range(int(data[5:])):
                        f.write(block)
                else:
                    f.write(data)
        return [e.index for e in entries]

    def snapshot(self) -> BinaryIO:
        return open(self.path, "rb")

    def restore(self, data: BinaryIO) -> None:
        with open(self.path, "wb") as f:
            shutil.copyfileobj(data, f, 1 << 20)

    def digest(self) -> tuple[str, int]:
        """(sha256 of the state, its size)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest(), os.path.getsize(self.path)
