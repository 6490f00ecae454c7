"""Fuzz targets for everything that reads bytes from the network or the disk.

Each target takes one input and may raise only the documented error of its decoder
(``DecodeError``, ``StorageCorruption``); anything else is a bug. ``tests/test_fuzz.py``
runs a seeded slice of each in CI through Hypothesis. Run it long, locally::

    python tests/fuzz_targets.py --inputs 100000            # every target, mutation fuzzing
    python tests/fuzz_targets.py --atheris messages -- -runs=100000   # coverage-guided

Mutation fuzzing starts from valid encodings (a corpus per target) and applies bit flips,
interesting bytes, truncations, insertions, duplications and splices, plus pure random
inputs; it is deterministic for a given ``--seed``.
"""
from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import struct
import sys
import tempfile
import time

from fastraft import _py
from fastraft.errors import DecodeError, StorageCorruption
from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    Membership,
    ReadIndexRequest,
    ReadIndexResponse,
    Removed,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
)
from fastraft.transport.link import (
    PROTOCOL_VERSION,
    ClientHello,
    ServerHello,
    Welcome,
    decode_hello,
)
from fastraft.transport.link import _encoder as _hello_encoder
from fastraft.transport.tcp import _SECTION, _sections
from fastraft.wire import FrameReader, FrameTooLarge, decode_messages, encode_messages

try:
    from fastraft import _cy
except ImportError:  # built without the extension: the pure twin is compared with itself
    _cy = _py

MEMBERS = Membership(voters=frozenset({1, 2, 3}), learners=frozenset({4}),
                     addresses={1: "a:1", 2: "b:2", 3: "c:3", 4: "d:4"})
ENTRIES = [Entry(3, 10, EntryKind.NORMAL, b"x" * 20), Entry(3, 11, EntryKind.CONFIG, b""),
           Entry(4, 12, EntryKind.NOOP, b"y" * 600)]
MESSAGES = [
    RequestVote(5, 2, 12, 4, True, False), RequestVoteResponse(5, True, False),
    AppendEntries(4, 1, 9, 3, ENTRIES, 11, 7), AppendEntries(4, 1, 12, -1, [], 11, 8),
    AppendEntriesResponse(4, False, 12, 9, -1, 3), AppendEntriesResponse(4, True, 12),
    InstallSnapshot(4, 1, SnapshotMeta(9, 3, MEMBERS), 0, b"chunk" * 10, False),
    InstallSnapshotResponse(4, 9, 50, True), TimeoutNow(4, 1), ReadIndexRequest(4, 77),
    ReadIndexResponse(4, 77, 12, True), Removed(4, 1, 9, 12),
]


# ---------------------------------------------------------------- targets

def frames(data: bytes) -> None:
    """The frame splitter, fed ``data`` in pieces whose sizes ``data`` itself picks."""
    reader = FrameReader(1 << 16)
    pos, step = 0, 1
    try:
        while pos < len(data):
            step = 1 + (data[pos] * 7 + step) % 97
            reader.feed(data[pos:pos + step])
            pos += step
            assert reader.buffered <= (1 << 16) + 4
    except FrameTooLarge:
        pass


def handshake(data: bytes) -> None:
    try:
        decode_hello(data)
    except DecodeError:
        pass


def messages(data: bytes) -> None:
    """A message batch: decodes or raises DecodeError; what decodes re-encodes to a batch
    that decodes the same (so the twins agree on it)."""
    try:
        decoded = decode_messages(data)
    except DecodeError:
        return
    assert decode_messages(encode_messages(decoded)) == decoded


def entries(data: bytes) -> None:
    """The entry batch codec: the compiled and pure twins agree on every input."""
    outcomes = []
    for impl in (_cy, _py):
        try:
            outcomes.append([(e.term, e.index, e.kind, bytes(e.data))
                             for e in impl.decode_entries(data)])
        except DecodeError:
            outcomes.append("DecodeError")
    assert outcomes[0] == outcomes[1], outcomes


class _Template:
    """A storage directory written once; each input damages a copy of one of its files."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.files = sorted(n for n in os.listdir(template) if n != "LOCK"
                            and os.path.isfile(os.path.join(template, n)))
        self.contents = {n: open(os.path.join(template, n), "rb").read()
                         for n in self.files}
        self.work = tempfile.mkdtemp(prefix="fastraft-fuzz-work-")
        for directory in (template, self.work):  # made once per process, kept until its end
            atexit.register(shutil.rmtree, directory, ignore_errors=True)

    def open_damaged(self, data: bytes) -> None:
        """Open a copy of the template with one file (``data`` picks which and how)
        damaged (the subclass's ``open``): it raises StorageCorruption, or opens and
        passes the subclass's ``check`` (nothing lost or changed)."""
        if not data:
            return
        name = self.files[data[0] % len(self.files)]
        shutil.rmtree(self.work)
        shutil.copytree(self.template, self.work)
        original = self.contents[name]
        damaged = _Mutator(random.Random(data)).mutate(original, [original])
        with open(os.path.join(self.work, name), "wb") as f:
            f.write(damaged)
        try:
            store = self.open(self.work)
        except StorageCorruption:
            return
        try:
            self.check(store)
        except StorageCorruption:
            return
        finally:
            store.close()


class _Disk(_Template):
    """A FileStorage directory: 40 entries, a hard state, an identity, a snapshot."""

    def __init__(self) -> None:
        import asyncio

        from fastraft.filestorage import FileStorage

        template = tempfile.mkdtemp(prefix="fastraft-fuzz-")
        st = FileStorage(template, segment_bytes=2048)

        async def fill():
            for k in range(1, 41):
                await st.append_entries([Entry(1 + k // 15, k, EntryKind.NORMAL,
                                               b"%d" % k * (k % 7))])
            await st.save_hard_state(HardState(3, 2, 40))
            st.save_identity(1, "fastraft")
            import io
            await st.save_snapshot(SnapshotMeta(5, 1, MEMBERS), io.BytesIO(b"snap" * 100))
            await st.compact_prefix(5)
        asyncio.run(fill())
        st.close()
        super().__init__(template)

    def open(self, directory: str):
        from fastraft.filestorage import FileStorage

        return FileStorage(directory, segment_bytes=2048)

    def check(self, store) -> None:
        state = store.load_state()
        got = store._read_sync(state.first_index, state.last_index + 1, None)
        # Opened: nothing acknowledged may be missing or changed (the template was
        # closed cleanly, so its commit mark covers every entry; the first 5 are in the
        # snapshot).
        assert [(e.index, bytes(e.data)) for e in got] == \
            [(k, b"%d" % k * (k % 7)) for k in range(6, 41)], [e.index for e in got]


class _SharedDisk(_Template):
    """A SharedWAL directory of three groups, their records interleaved."""

    GROUPS = (1, 2, 3)

    def __init__(self) -> None:
        import asyncio

        from fastraft.sharedwal import SharedWAL

        template = tempfile.mkdtemp(prefix="fastraft-fuzz-wal-")
        wal = SharedWAL(template, segment_bytes=2048)

        async def fill():
            for g in self.GROUPS:
                await wal.group(g).save_identity(1, "fastraft")
            for k in range(1, 31):
                for g in self.GROUPS:
                    await wal.group(g).append_entries(
                        [Entry(1, k, EntryKind.NORMAL, b"%d:%d" % (g, k) * (k % 5))])
            for g in self.GROUPS:
                await wal.group(g).save_hard_state(HardState(2, 1, 30))
        asyncio.run(fill())
        wal.close()
        super().__init__(template)

    def open(self, directory: str):
        from fastraft.sharedwal import SharedWAL

        return SharedWAL(directory, segment_bytes=2048)

    def check(self, store) -> None:
        for g in self.GROUPS:
            view = store.group(g)
            state = view.load_state()
            got = view._read_sync(state.first_index, state.last_index + 1, None)
            # Opened: every group's acknowledged entries are there, each its own (the
            # commit marks cover all 30; records are interleaved by group).
            assert [(e.index, bytes(e.data)) for e in got] == \
                [(k, b"%d:%d" % (g, k) * (k % 5)) for k in range(1, 31)], g


_disk: _Disk | None = None
_shared_disk: _SharedDisk | None = None


def storage(data: bytes) -> None:
    """FileStorage recovery over a damaged segment, state, identity or snapshot file: it
    opens with every acknowledged entry, or raises StorageCorruption."""
    global _disk
    if _disk is None:
        _disk = _Disk()
    _disk.open_damaged(data)


def _corpus() -> dict[str, list[bytes]]:
    hello = [_hello_encoder.encode(ServerHello(PROTOCOL_VERSION, b"n" * 16)),
             _hello_encoder.encode(ClientHello("fastraft", 2, PROTOCOL_VERSION, "h:1",
                                               b"m" * 16, b"p" * 32)),
             _hello_encoder.encode(Welcome(3, b"q" * 32))]
    batches = [encode_messages([m]) for m in MESSAGES] + [encode_messages(MESSAGES)]
    framed = [b"".join(struct.pack("<I", len(b)) + b for b in batches)]
    return {
        "frames": framed + [struct.pack("<I", 70000)],
        "handshake": hello,
        "messages": batches,
        "entries": [_py.encode_entries(ENTRIES), _py.encode_entries(ENTRIES[:1]),
                    _py.encode_entries([])],
        "storage": [bytes(range(256)), b"\x00" * 8],
        "shared_storage": [bytes(range(256)), b"\x00" * 8],
        "sections": [b"".join(_SECTION.pack(g, len(b)) + b for g, b in enumerate(batches)),
                     _SECTION.pack(7, len(batches[-1])) + batches[-1], b""],
    }


def shared_storage(data: bytes) -> None:
    """SharedWAL recovery over a damaged segment of three groups' interleaved records:
    it opens with every group's acknowledged entries, or raises StorageCorruption."""
    global _shared_disk
    if _shared_disk is None:
        _shared_disk = _SharedDisk()
    _shared_disk.open_damaged(data)


def sections(data: bytes) -> None:
    """A multi-group frame's body, split into (group, messages) sections: decodes or
    raises DecodeError; what decodes re-encodes to a body that decodes the same."""
    try:
        decoded = _sections(memoryview(data))
    except DecodeError:
        return
    body = b"".join(_SECTION.pack(g, len(b)) + b
                    for g, b in ((g, encode_messages(m)) for g, m in decoded))
    assert _sections(memoryview(body)) == decoded


TARGETS = {"frames": frames, "handshake": handshake, "messages": messages,
           "entries": entries, "storage": storage, "shared_storage": shared_storage,
           "sections": sections}
CORPUS = _corpus()


# ---------------------------------------------------------------- mutation

class _Mutator:
    INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC1, 0xD9, 0xDB, 0xCF)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def mutate(self, data: bytes, corpus: list[bytes]) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            op = rng.randrange(7)
            if op == 0 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:
                buf[rng.randrange(len(buf))] = rng.choice(self.INTERESTING)
            elif op == 2 and buf:
                del buf[rng.randrange(len(buf)):]
            elif op == 3:
                i = rng.randrange(len(buf) + 1)
                buf[i:i] = rng.randbytes(rng.randint(1, 16))
            elif op == 4 and buf:
                i = rng.randrange(len(buf))
                j = min(len(buf), i + rng.randint(1, 64))
                buf[j:j] = buf[i:j]
            elif op == 5:
                other = rng.choice(corpus)
                cut = rng.randrange(len(other) + 1)
                buf = buf[:rng.randrange(len(buf) + 1)] + bytearray(other[cut:])
            elif op == 6 and len(buf) >= 4:
                i = rng.randrange(len(buf) - 3)
                buf[i:i + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFFFFFF, 1 << 31,
                                                              len(buf), 21, 25)))
        return bytes(buf)


def inputs(target: str, n: int, seed: int):
    """``n`` deterministic inputs for ``target``: mutations of its corpus, some random."""
    rng = random.Random(f"{target}:{seed}")
    mutator = _Mutator(rng)
    corpus = CORPUS[target]
    for k in range(n):
        if k % 10 == 9:
            yield rng.randbytes(rng.randint(0, 256))
        else:
            yield mutator.mutate(rng.choice(corpus), corpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--atheris", choices=sorted(TARGETS),
                        help="run one target under atheris (libFuzzer arguments after --)")
    args, rest = parser.parse_known_args()
    import logging
    for name in ("fastraft.filestorage", "fastraft.sharedwal"):  # a line per input
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.atheris:
        import atheris
        target = TARGETS[args.atheris]
        seeds = tempfile.mkdtemp(prefix="fastraft-fuzz-seeds-")
        atexit.register(shutil.rmtree, seeds, ignore_errors=True)
        for k, data in enumerate(CORPUS[args.atheris]):
            with open(os.path.join(seeds, str(k)), "wb") as f:
                f.write(data)
        atheris.instrument_all()  # coverage of every Python function loaded
        atheris.Setup([sys.argv[0], *[a for a in rest if a != "--"], seeds],
                      lambda data: target(bytes(data)))
        atheris.Fuzz()
        return 0
    for name in args.target or sorted(TARGETS):
        t0 = time.perf_counter()
        count = 0
        for data in inputs(name, args.inputs, args.seed):
            try:
                TARGETS[name](data)
            except Exception:
                print(f"{name}: input {count} fails: {data!r}", file=sys.stderr)
                raise
            count += 1
        dt = time.perf_counter() - t0
        print(f"{name:<14} {count:>9,} inputs in {dt:7.1f}s ({count / dt:,.0f}/s): "
              "only documented errors", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
