"""The connection memo: what it keeps, and what a new daemon refuses to load.

A damaged memo must fail the takeover with a clear error: libfuse takes any
bytes for the INIT it replays, and a session fed anything but an INIT
request answers every later request EIO while the daemon reports it serves.
"""

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mountd import fusedev
from mountd.memo import ConnectionMemo, MemoError
from swapfs.fs import Operations, handle_ino
from swapfs.index import ROOT_INO
from swapfs.volume import Volume


def init_request(extra: bytes = b"") -> bytes:
    """A FUSE_INIT request as the kernel sends it (protocol 7.40)."""
    body = struct.pack("<IIIII", 7, 40, 131072, 0, 0) + extra
    return struct.pack("<IIQQIIII", 40 + len(body), fusedev.FUSE_INIT, 2, 0, 0, 0, 0, 0) + body


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-memo", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def write_record(fd: int, record: dict[str, object]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, struct.pack("<I", len(data)) + data, 0)


def test_a_memo_reads_back() -> None:
    memo = ConnectionMemo.create(init_request(b"\0" * 44))
    try:
        memo.open_files = {5: 2}
        memo.takeovers = 3
        memo.save()
        loaded = ConnectionMemo.load(memo.fd)
        assert (loaded.init, loaded.open_files, loaded.takeovers) == (memo.init, {5: 2}, 3)
    finally:
        os.close(memo.fd)


@pytest.mark.parametrize("init, why", [
    (init_request()[:20], "short INIT request"),
    (bytes(len(init_request())), "is not FUSE_INIT"),
    (init_request() + b"\0" * 8, "says 60 bytes and holds 68"),
], ids=["short", "not-init", "wrong-length"])
def test_a_damaged_init_is_refused(memfd: int, init: bytes, why: str) -> None:
    write_record(memfd, {"init": init.hex(), "open": {}, "takeovers": 0})
    with pytest.raises(MemoError, match=why):
        ConnectionMemo.load(memfd)


@pytest.mark.parametrize("raw", [b"", b"\x10\0\0\0{\"in", b"\xff\xff\xff\xff",
                                 struct.pack("<I", 2) + b"[]"],
                         ids=["empty", "truncated", "too-long", "not-an-object"])
def test_a_damaged_record_is_refused(memfd: int, raw: bytes) -> None:
    os.pwrite(memfd, raw, 0)
    with pytest.raises(MemoError):
        ConnectionMemo.load(memfd)


def test_handles_make_a_resent_release_harmless(tmp_path: Path) -> None:
    """Each open has its own handle, saved before the reply: releasing it
    twice (the second a resend after a takeover) drops one open, not two.
    An older daemon's handle (the inode number, shared by its opens) is
    counted, and its release is saved only after the reply."""
    volume = Volume(tmp_path / "state")
    saved: list[tuple[dict[int, int], bool]] = []
    try:
        chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        ino = volume.create(chain.ino, b"f", 0o600, 0, 0).ino
        ops = Operations(volume, {ino: 2},
                         lambda handles, late: saved.append((dict(handles), late)))

        async def scenario() -> None:
            info = await ops.open(ino, os.O_RDWR, None)  # type: ignore[arg-type]
            fh = info.fh
            assert fh != ino and handle_ino(fh) == ino
            assert saved[-1] == ({ino: 2, fh: 1}, False)
            await ops.release(fh)
            assert saved[-1] == ({ino: 2}, False)
            await ops.release(fh)  # resent: already done
            assert len(saved) == 2 and ops.open_files() == 1
            await ops.release(ino)  # the older daemon's handle
            assert saved[-1] == ({ino: 1}, True)
            assert ops.open_files() == 1

        trio.run(scenario)
    finally:
        volume.close()
