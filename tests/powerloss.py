"""What a power cut may leave of a directory tree, for crash tests of the storages.

A process killed with SIGKILL loses nothing the kernel already has; a machine that loses
power loses whatever was not synced. ``DiskModel`` wraps the ``os`` calls the storages
use to make things durable or to remove them (``fsync``, ``fdatasync``, ``unlink``,
``replace``, ``ftruncate``, ``pwrite``, ``write``, ``rmdir``) and keeps what each sync made
durable: a file's content at its last ``fsync``/``fdatasync``, a directory's entries at
its last ``fsync``. ``image(into)`` writes one tree a power cut at this moment could
leave, chosen at random among those POSIX allows:

- each directory entry created, removed or replaced since the directory's last sync may
  be the old one or the new one, independently of the others;
- each file holds its content at its last sync, or its content now, or (when it only grew
  since) its synced content followed by part of what was written after.

That is stricter than ext4 or XFS, whose journals persist metadata changes in order: a
storage that survives it relies on nothing but its syncs. ``on_call`` is called around
every wrapped call (before and after, with the call's name), where a test takes images.
"""
from __future__ import annotations

import itertools
import os
import random
import stat
import threading
from collections.abc import Callable
from typing import Any

_File = tuple[int, bool]  # file id (``DiskModel._id``), is a directory


class DiskModel:
    def __init__(self, root: str, monkeypatch: Any,
                 on_call: Callable[[str, str], None] | None = None) -> None:
        self.root = os.path.realpath(root)
        os.makedirs(self.root, exist_ok=True)
        self.lock = threading.RLock()
        #: inode -> a file id of ours: an inode number freed by an unlink may come back
        #: as a new file's, which must not inherit what the model knows of the old one
        self.ids: dict[int, int] = {}
        self._next_id = itertools.count(1)
        #: file id -> its content at its last sync
        self.synced: dict[int, bytes] = {}
        #: file id -> its content when its name went (unlink, replaced over)
        self.unlinked: dict[int, bytes] = {}
        self.root_id = self._id(os.stat(self.root).st_ino)
        #: directory id -> {name: (file id, is_dir)} at its last sync
        self.dirs: dict[int, dict[str, _File]] = {}
        for path, _, files in os.walk(self.root):  # what is there already is durable
            self.dirs[self._id(os.stat(path).st_ino)] = self._listing(path)
            for name in files:
                with open(os.path.join(path, name), "rb") as f:
                    self.synced[self._id(os.fstat(f.fileno()).st_ino)] = f.read()
        self.on_call = on_call
        self._busy = threading.local()  # an image being taken: no hooks from inside it
        real = {name: getattr(os, name) for name in (
            "fsync", "fdatasync", "unlink", "remove", "replace", "rename", "ftruncate",
            "pwrite", "write", "rmdir")}
        self.real = real

        def wrap(name: str, before: Callable[..., None] | None) -> Callable[..., Any]:
            fn = real[name]

            def call(*args: Any, **kwargs: Any) -> Any:
                if getattr(self._busy, "on", False) or not self._concerns(args, kwargs):
                    return fn(*args, **kwargs)
                with self.lock:
                    self._hook(name, "before")
                    if before is not None:
                        before(*args, **kwargs)
                    result = fn(*args, **kwargs)
                    if name in ("fsync", "fdatasync"):
                        self._synced(args[0])
                    self._hook(name, "after")
                    return result
            return call

        for name in ("fsync", "fdatasync", "ftruncate", "pwrite", "write"):
            monkeypatch.setattr(os, name, wrap(name, None))
        monkeypatch.setattr(os, "rmdir", wrap("rmdir", self._before_unlink))
        for name in ("unlink", "remove"):
            monkeypatch.setattr(os, name, wrap(name, self._before_unlink))
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, wrap(name, self._before_replace))

    # ------------------------------------------------------------------ tracking

    def _hook(self, name: str, when: str) -> None:
        if self.on_call is None:
            return
        self._busy.on = True
        try:
            self.on_call(name, when)
        finally:
            self._busy.on = False

    def _concerns(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a wrapped call's first argument (a file descriptor or a path) is in
        the tree."""
        what = args[0]
        if isinstance(what, int):
            try:
                path = os.readlink(f"/proc/self/fd/{what}")
            except OSError:
                return False
        else:
            path = os.fsdecode(what)
            dir_fd = kwargs.get("dir_fd")
            if dir_fd is not None:
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            path = os.path.realpath(path)
        return self._inside(path)

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _synced(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not self._inside(path):
            return
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            self.dirs[self._id(st.st_ino)] = self._listing(path)
        else:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                self.synced[self._id(st.st_ino)] = f.read()

    def _id(self, ino: int) -> int:
        found = self.ids.get(ino)
        if found is None:
            found = self.ids[ino] = next(self._next_id)
        return found

    def _keep_content(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not self._inside(os.path.realpath(path)):
            return
        content = b""
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = f.read()
        self.unlinked[self._id(st.st_ino)] = content
        del self.ids[st.st_ino]  # its number may be a new file's from now on

    def _before_unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        if dir_fd is not None:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(path))
        self._keep_content(os.fsdecode(path))

    def _before_replace(self, src: Any, dst: Any, **_: Any) -> None:
        self._keep_content(os.fsdecode(dst))

    def _listing(self, path: str) -> dict[str, _File]:
        found = {}
        for entry in os.scandir(path):
            st = entry.stat(follow_symlinks=False)
            found[entry.name] = (self._id(st.st_ino), stat.S_ISDIR(st.st_mode))
        return found

    # ------------------------------------------------------------------ images

    def image(self, into: str, rng: random.Random) -> None:
        """Write into ``into`` (a new directory) one tree a power cut now could leave."""
        with self.lock:
            now: dict[int, tuple[str, dict[str, _File]]] = {}  # dir id -> path, entries
            for path, _, _ in os.walk(self.root):
                now[self._id(os.stat(path).st_ino)] = (path, self._listing(path))
            contents: dict[int, bytes] = {}
            self._build(self.root_id, into, now, contents, rng)

    def _build(self, dir_id: int, into: str, now: dict[int, tuple[str, dict[str, _File]]],
               contents: dict[int, bytes], rng: random.Random) -> None:
        os.makedirs(into)
        durable = self.dirs.get(dir_id, {})
        path, current = now.get(dir_id, ("", {}))
        for name in sorted(durable.keys() | current.keys()):
            old, new = durable.get(name), current.get(name)
            chosen = old if old == new else rng.choice([old, new])
            if chosen is None:
                continue
            file_id, is_dir = chosen
            target = os.path.join(into, name)
            if is_dir:
                self._build(file_id, target, now, contents, rng)
                continue
            if file_id not in contents:
                here = os.path.join(path, name) if new == chosen else None
                contents[file_id] = self._content(file_id, here, rng)
            with open(target, "wb") as f:
                f.write(contents[file_id])

    def _content(self, file_id: int, path: str | None, rng: random.Random) -> bytes:
        synced = self.synced.get(file_id, b"")
        if path is not None:
            with open(path, "rb") as f:
                latest = f.read()
        else:
            latest = self.unlinked.get(file_id, synced)
        if latest == synced:
            return synced
        if latest.startswith(synced) and rng.random() < 0.5:
            return latest[:rng.randint(len(synced), len(latest))]
        return rng.choice([synced, latest])
