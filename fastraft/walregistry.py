"""The ``registry`` of a ``SharedWAL``: every group that may have records in it.

A repair keeps what precedes the damage, and marks recovering every group it knows of;
a group whose only records were the damaged record itself, or lay in a missing segment,
would otherwise be unknown and start as a new replica (one that could vote again in a
term it voted in). So a group is appended here, durably, before its first record is
written, and taken off once its DROP record is durable; each start rewrites the file as
one record of the groups held. Records are ``walformat``'s (header with checksums),
each body one ``_RegistryChange``.
"""
from __future__ import annotations

import logging
import os

import msgspec

from fastraft.walformat import (
    _Damage,
    _intact_records,
    _record,
    _record_at,
    _valid_record_after,
    _write_at,
    _write_atomically,
)

log = logging.getLogger("fastraft.sharedwal")  # part of the WAL, for its operator

REGISTRY = "registry"


class _RegistryChange(msgspec.Struct, array_like=True):
    """A record of the registry: groups that may have records from now on, and groups
    whose DROP record is durable."""
    added: list[int]
    dropped: list[int]


class GroupRegistry:
    """The registry file in ``directory``: ``read()`` at a start, ``rewrite(held)`` at
    its end, then ``change(added, dropped)`` as groups come and go. ``ids`` is what it
    names once rewritten."""

    def __init__(self, directory: str, sync: bool) -> None:
        self.directory = directory
        self.path = os.path.join(directory, REGISTRY)
        self.sync = sync
        self.ids: set[int] = set()
        #: What ``read`` found in the file (``rewrite`` leaves the same bytes alone).
        self._found = b""
        self._fd = -1
        self._size = 0

    def read(self) -> set[int]:
        """The groups the file names (none if it is missing: a WAL written by an earlier
        version, which gets one at its first start on this one). A record that is not
        intact is skipped, and logged unless it is a torn last append."""
        try:
            with open(self.path, "rb") as f:
                data = self._found = f.read()
        except FileNotFoundError:
            return set()
        found: set[int] = set()

        def apply(body: memoryview) -> None:
            change = msgspec.msgpack.decode(body, type=_RegistryChange)
            found.update(change.added)
            found.difference_update(change.dropped)
        pos = 0
        while pos < len(data):
            try:
                pos, body, _ = _record_at(data, pos)
                apply(body)
            except _Damage as damage:
                if damage.torn and not _valid_record_after(data, pos + 1):
                    break
                log.warning("%s: %s at offset %d; the groups it named are known only by "
                            "their records (rewritten from them now)", self.path,
                            damage.what, pos,
                            extra={"event": "registry_damaged", "path": self.path})
                for body in _intact_records(data, pos + 1):
                    apply(body)
                break
        return found

    def rewrite(self, held: set[int]) -> None:
        """At the end of a start (after ``read``): the file names ``held`` (one record,
        written only if what ``read`` found says anything else), and is open for
        changes."""
        record = _record(msgspec.msgpack.encode(_RegistryChange(sorted(held), [])), 0)
        if self._found != record:
            _write_atomically(self.directory, REGISTRY, record, self.sync)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._size = len(record)
        self.ids = set(held)

    def change(self, added: list[int], dropped: list[int]) -> None:
        """``added`` durably, before their first records are written; ``dropped`` once
        their DROP records are durable, not synced (a power cut that loses that keeps
        them named, as if held: the safe way)."""
        record = _record(msgspec.msgpack.encode(_RegistryChange(added, dropped)), 0)
        _write_at(self._fd, (record,), self._size)
        if added and self.sync:
            os.fdatasync(self._fd)
        self._size += len(record)
        self.ids.update(added)
        self.ids.difference_update(dropped)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
