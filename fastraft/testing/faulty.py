"""State machines that fail on purpose, to test what surrounds a node (supervisors,
alerting, restarts)."""
from __future__ import annotations

from collections.abc import Sequence

import msgspec

from fastraft.kv import KVStore, Put, Refused, decode
from fastraft.messages import Entry


class PoisonKV(KVStore):
    """A ``KVStore`` with a bug: it raises on a put whose key starts with ``poison``.
    Every replica raises on the same committed entry, so every node stops there (a
    restart meets it again): what an application bug looks like to an operator."""

    def apply(self, entries: Sequence[Entry]) -> list[int | Refused]:
        for e in entries:
            try:
                cmd = decode(e.data)
            except (msgspec.MsgspecError, ValueError):
                continue  # KVStore answers those with Refused
            if type(cmd) is Put and cmd.key.startswith("poison"):
                raise ValueError(f"cannot apply {cmd.key!r} (entry {e.index})")
        return super().apply(entries)
