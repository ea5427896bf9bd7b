"""The connection memo: what it keeps, and what a new daemon refuses to load.

A damaged memo must fail the takeover with a clear error: libfuse takes any
bytes for the INIT it replays, and a session fed anything but an INIT
request answers every later request EIO while the daemon reports it serves.
A memo torn by a death in the middle of an update is not damaged: the slot
written before holds the record before, and a takeover goes on from it
(the same through a real standby: test_torn_memo.py).
"""

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mountd.operations import Operations, handle_ino
from mountd.takeover import fusedev
from mountd.takeover.memo import SLOT_SIZE, ConnectionMemo, MemoError
from swapfs.engine import ROOT_INO, Volume


def init_request(extra: bytes = b"") -> bytes:
    """A FUSE_INIT request as the kernel sends it (protocol 7.40)."""
    body = struct.pack("<IIIII", 7, 40, 131072, 0, 0) + extra
    return struct.pack("<IIQQIIII", 40 + len(body), fusedev.FUSE_INIT, 2, 0, 0, 0, 0, 0) + body


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-memo", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def write_legacy(fd: int, record: dict[str, object]) -> None:
    """A memo as a daemon from before the slots wrote it: u32 length, JSON."""
    data = json.dumps(record).encode()
    os.pwrite(fd, struct.pack("<I", len(data)) + data, 0)


def write_slot(fd: int, slot: int, sequence: int, record: dict[str, object]) -> None:
    """A slot as the module docstring lays it out, written independently."""
    data = json.dumps(record).encode()
    fields = struct.pack("<QI", sequence, len(data))
    header = b"SWFSMEMO" + fields + struct.pack("<I", zlib.crc32(fields + data))
    os.pwrite(fd, header + data, slot * SLOT_SIZE)


def record_of(init: bytes, handles: int, takeovers: int = 0) -> dict[str, object]:
    return {"init": init.hex(), "takeovers": takeovers,
            "open": {str(fh): 1 for fh in range(1 << 40, (1 << 40) + handles)}}


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
    ConnectionMemo(memfd, init).save()
    with pytest.raises(MemoError, match=why):
        ConnectionMemo.load(memfd)


@pytest.mark.parametrize("raw", [b"", b"\x10\0\0\0{\"in", b"\xff\xff\xff\xff",
                                 struct.pack("<I", 2) + b"[]"],
                         ids=["empty", "truncated", "too-long", "not-an-object"])
def test_a_damaged_record_is_refused(memfd: int, raw: bytes) -> None:
    os.pwrite(memfd, raw, 0)
    with pytest.raises(MemoError):
        ConnectionMemo.load(memfd)


def test_a_memo_from_before_the_slots_is_read(memfd: int) -> None:
    """A new daemon takes over an older one's connection: its single record."""
    write_legacy(memfd, record_of(init_request(), 3, takeovers=2))
    loaded = ConnectionMemo.load(memfd)
    assert (len(loaded.open_files), loaded.takeovers) == (3, 2)
    loaded.open_files = {}
    loaded.save()  # into slot 1; the old record stays readable until then
    assert ConnectionMemo.load(memfd).open_files == {}


def test_records_alternate_slots_and_the_highest_sequence_wins(memfd: int) -> None:
    init = init_request()
    write_slot(memfd, 0, 6, record_of(init, 6))
    write_slot(memfd, 1, 7, record_of(init, 7))
    loaded = ConnectionMemo.load(memfd)
    assert (len(loaded.open_files), loaded.sequence) == (7, 7)
    loaded.open_files = {}
    loaded.save()  # sequence 8: slot 0, never the slot of the latest record
    assert ConnectionMemo.load(memfd).sequence == 8
    assert os.pread(memfd, 16, 0) == b"SWFSMEMO" + struct.pack("<Q", 8)
    assert os.pread(memfd, 16, SLOT_SIZE) == b"SWFSMEMO" + struct.pack("<Q", 7)


class _Killed(Exception):
    """The daemon died in the middle of a pwrite."""


_pwrite = os.pwrite


def _torn_pwrite(fd: int, data: bytes, offset: int) -> int:
    """What the kernel leaves of a pwrite whose writer is killed after its
    first page: that page written, the rest not."""
    _pwrite(fd, data[:mmap.PAGESIZE - offset % mmap.PAGESIZE], offset)
    raise _Killed


@pytest.mark.parametrize("handles", [300, 3000])
def test_an_update_torn_between_pages_leaves_the_record_before(
        memfd: int, monkeypatch: pytest.MonkeyPatch, handles: int) -> None:
    """Past a couple of hundred handles a record spans pages: a death between
    two of them (here in a release, which shifts every handle after it) must
    leave the previous record, whichever slot it tore."""
    memo = ConnectionMemo(memfd, init_request())
    for round_ in range(3):  # the torn update lands in each slot in turn
        memo.open_files = {(1 << 40) + fh: 1 for fh in range(handles + round_)}
        memo.save()
        before = dict(memo.open_files)
        del memo.open_files[1 << 40]
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwrite", _torn_pwrite)
            with pytest.raises(_Killed):
                memo.save()
        memo = ConnectionMemo.load(memfd)
        assert memo.open_files == before


def test_a_corrupt_byte_in_the_latest_slot_falls_back_to_the_other(memfd: int) -> None:
    memo = ConnectionMemo(memfd, init_request(), {5: 1})
    memo.save()
    memo.open_files = {5: 1, 6: 1}
    memo.save()
    offset = (memo.sequence % 2) * SLOT_SIZE + 40
    os.pwrite(memfd, bytes([os.pread(memfd, 1, offset)[0] ^ 0x20]), offset)
    assert ConnectionMemo.load(memfd).open_files == {5: 1}


def test_both_slots_torn_is_refused(memfd: int) -> None:
    init = init_request()
    write_slot(memfd, 0, 2, record_of(init, 1))
    write_slot(memfd, 1, 3, record_of(init, 1))
    for slot in (0, 1):
        os.pwrite(memfd, b"\xff", slot * SLOT_SIZE + 30)
    with pytest.raises(MemoError, match="no whole record"):
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
