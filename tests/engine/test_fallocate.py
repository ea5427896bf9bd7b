"""fallocate(2): punch hole and zero range free blocks, so discards reach the store.

Engine tests call :meth:`Volume.fallocate` directly. Mount tests go through
FUSE, which needs pyfuse3 with the fallocate operation (our patch,
docs/pyfuse3-patch.md): ``fallocate`` through ctypes for the modes that
``os.posix_fallocate`` cannot ask for, ``blkdiscard`` on a loop device, and
real kernel swap with discard on and off.
"""

import contextlib
import errno
import json
import mmap
import os
import random
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapfs.cli import swaparea
from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE, MAX_FILE_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import ROOT_INO, Inode
from swapfs.engine.volume import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Volume,
)
from tests.mounting import (
    Mount,
    fallocate,
    loop_device,
    requires_mount,
    swapfs,
    wait_until,
)
from tools.swapload import MIB, MemoryCgroup, run_workload

BS = BLOCK_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE
# Modes swapfs does not support (linux/falloc.h).
NO_HIDE_STALE = 0x04
COLLAPSE_RANGE = 0x08
INSERT_RANGE = 0x20
UNSHARE_RANGE = 0x40

def randbytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def zeroed(data: bytes, offset: int, length: int) -> bytes:
    """*data* with ``[offset, offset + length)`` zeroed (and no longer)."""
    end = min(len(data), offset + length)
    if offset >= end:
        return data
    return data[:offset] + bytes(end - offset) + data[end:]


def distinct_blocks(data: bytes) -> int:
    """How many blocks a chain holding only *data* stores."""
    padded = data + bytes(-len(data) % BS)
    return len({padded[i:i + BS] for i in range(0, len(padded), BS)} - {bytes(BS)})


# -- the engine ----------------------------------------------------------------------


class Engine:
    """A Volume with one chain ``c``, and the figures the tests look at."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)

    def file(self, data: bytes, name: bytes = b"f") -> Inode:
        inode = self.volume.create(self.chain.ino, name, stat.S_IFREG | 0o600, 0, 0)
        if data:
            self.volume.write(inode.ino, 0, data)
        return inode

    def content(self, ino: int) -> bytes:
        size = self.volume.getattr(ino).size
        data = self.volume.read(ino, 0, size + BS)
        assert len(data) == size
        return data

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.volume.stats()["chains"]["c"]
        return stats

    def stored_blocks(self) -> int:
        return int(self.stats()["unique_blocks"])

    def mapped(self, ino: int) -> int:
        return self.volume.getattr(ino).blocks


@pytest.fixture
def engine(volume: Volume) -> Engine:
    return Engine(volume)


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    with pytest.raises(SwapfsError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def test_punch_inside_one_block_zeroes_exactly_that_range(engine: Engine) -> None:
    data = randbytes(3 * BS, 1)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, PUNCH, BS + 100, 200)
    assert engine.content(f.ino) == zeroed(data, BS + 100, 200)
    assert engine.mapped(f.ino) == 3
    assert engine.stored_blocks() == 3  # block 1 is rewritten, not dropped
    assert engine.volume.getattr(f.ino).size == 3 * BS


def test_punch_across_blocks_frees_the_whole_ones_and_keeps_the_edges(
        engine: Engine) -> None:
    data = randbytes(8 * BS, 2)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, PUNCH, BS + 100, 4 * BS + 100)  # to 5*BS + 200
    assert engine.content(f.ino) == zeroed(data, BS + 100, 4 * BS + 100)
    # Blocks 2, 3, 4 are gone; 1 and 5 keep their bytes outside the range.
    assert engine.mapped(f.ino) == 5
    assert engine.stored_blocks() == 5
    stats = engine.stats()
    assert stats["zero_blocks"] == 3
    # The freed slots (blocks 2-4, and the old 1 and 5, rewritten into new
    # slots) keep their space until a checkpoint covers their freeing and
    # the pending punches run.
    assert stats["disk_bytes"] == 10 * BS
    assert engine.volume.punch_pending() == 0, "not before a checkpoint"
    assert engine.stats()["disk_bytes"] == 10 * BS
    engine.volume.sync()
    assert engine.volume.punch_pending() == 5
    stats = engine.stats()
    assert stats["disk_bytes"] == stats["stored_bytes"] == 5 * BS


def test_punching_a_whole_file_frees_everything_and_keeps_the_size(
        engine: Engine) -> None:
    data = randbytes(10 * BS + 123, 3)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, PUNCH, 0, len(data))
    assert engine.content(f.ino) == bytes(len(data))
    assert engine.mapped(f.ino) == 0
    assert engine.volume.punch_pending() == 0, "not before a checkpoint"
    assert engine.stats()["disk_bytes"] == 11 * BS
    engine.volume.sync()
    assert engine.volume.punch_pending() == 11
    stats = engine.stats()
    assert stats["stored_bytes"] == stats["disk_bytes"] == 0
    # The slots are on the free list: new data reuses them.
    engine.volume.write(f.ino, 0, randbytes(BS, 4))
    assert engine.stats()["disk_bytes"] == BS


def test_a_range_reaching_the_end_frees_the_partial_last_block(engine: Engine) -> None:
    data = randbytes(3 * BS + 10, 5)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, PUNCH, 2 * BS, 1 << 40)
    assert engine.content(f.ino) == data[:2 * BS] + bytes(BS + 10)
    assert engine.mapped(f.ino) == 2
    engine.volume.fallocate(f.ino, PUNCH, BS + 1, BS - 1)  # from inside a block to the end
    assert engine.content(f.ino) == data[:BS + 1] + bytes(2 * BS + 9)
    assert engine.mapped(f.ino) == 2


def test_punching_past_the_end_changes_nothing(engine: Engine) -> None:
    data = randbytes(2 * BS, 6)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, PUNCH, 5 * BS, 3 * BS)
    assert engine.content(f.ino) == data
    assert engine.stored_blocks() == 2


def test_punching_unwritten_blocks_stores_nothing(engine: Engine) -> None:
    f = engine.file(b"")
    engine.volume.setattr(f.ino, size=16 * BS)
    engine.volume.fallocate(f.ino, PUNCH, 100, 10 * BS)
    assert engine.content(f.ino) == bytes(16 * BS)
    assert engine.stored_blocks() == 0


def test_punch_drops_refcounts_but_keeps_blocks_a_clone_still_maps(
        engine: Engine) -> None:
    data = randbytes(6 * BS, 7)
    source = engine.file(data, b"source")
    clone = engine.volume.clone(source.ino, engine.chain.ino, b"clone")
    engine.volume.fallocate(source.ino, PUNCH, 0, 6 * BS)
    assert engine.content(source.ino) == bytes(6 * BS)
    assert engine.content(clone.ino) == data
    assert engine.stored_blocks() == 6
    engine.volume.fallocate(clone.ino, PUNCH, 2 * BS, 2 * BS)
    assert engine.content(clone.ino) == zeroed(data, 2 * BS, 2 * BS)
    assert engine.stored_blocks() == 4


def test_punch_of_one_of_two_identical_blocks_keeps_the_other(engine: Engine) -> None:
    page = randbytes(BS, 8)
    f = engine.file(page * 4)
    assert engine.stored_blocks() == 1
    engine.volume.fallocate(f.ino, PUNCH, 0, 3 * BS)
    assert engine.content(f.ino) == bytes(3 * BS) + page
    assert engine.stored_blocks() == 1
    engine.volume.fallocate(f.ino, PUNCH, 3 * BS, BS)
    assert engine.stored_blocks() == 0


def test_a_discard_drops_each_refcount_once_by_its_count(engine: Engine) -> None:
    """Repeated pages in the range lose all their references in one change;
    the maps before and after the range, and of other files, stay."""
    page, other = randbytes(BS, 30), randbytes(2 * BS, 31)
    data = page * 6 + other
    f = engine.file(data)
    g = engine.file(data, b"g")  # the newest file: its entries end the maps database

    def refcounts() -> list[int]:
        return sorted(refcount for _, refcount in engine.volume.blocks(
            engine.chain.chain).values())

    assert refcounts() == [2, 2, 12]
    engine.volume.fallocate(g.ino, PUNCH, BS, 6 * BS)  # 5 repeated pages and 1 other
    assert engine.content(g.ino) == page + bytes(6 * BS) + other[BS:]
    assert refcounts() == [1, 2, 7]
    assert engine.mapped(g.ino) == 2
    engine.volume.fallocate(g.ino, PUNCH, 0, 1 << 40)  # to the end of the database
    assert engine.content(g.ino) == bytes(len(data))
    assert engine.content(f.ino) == data
    assert refcounts() == [1, 1, 6]
    assert engine.mapped(g.ino) == 0 and engine.mapped(f.ino) == 8


@pytest.mark.parametrize("mode", [ZERO, ZERO | KEEP])
def test_zero_range_within_the_file(engine: Engine, mode: int) -> None:
    data = randbytes(6 * BS, 9)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, mode, BS - 10, 3 * BS + 20)
    assert engine.content(f.ino) == zeroed(data, BS - 10, 3 * BS + 20)
    assert engine.stored_blocks() == 3  # 1 to 3 unmapped, 0 and 4 rewritten, 5 kept


def test_zero_range_past_the_end_extends_the_file_unless_keep_size(engine: Engine) -> None:
    data = randbytes(2 * BS + 5, 10)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, ZERO | KEEP, BS, 8 * BS)
    assert engine.content(f.ino) == data[:BS] + bytes(BS + 5)
    engine.volume.fallocate(f.ino, ZERO, BS // 2, 8 * BS)
    assert engine.content(f.ino) == data[:BS // 2] + bytes(8 * BS)
    assert engine.stored_blocks() == 1


def test_mode_0_reserves_nothing_and_extends_past_the_end(engine: Engine) -> None:
    data = randbytes(2 * BS + 7, 11)
    f = engine.file(data)
    engine.volume.fallocate(f.ino, 0, 0, BS)
    engine.volume.fallocate(f.ino, KEEP, 0, 100 * BS)
    assert engine.content(f.ino) == data
    engine.volume.fallocate(f.ino, 0, 2 * BS, 10 * BS)
    assert engine.volume.getattr(f.ino).size == 12 * BS
    assert engine.content(f.ino) == data + bytes(10 * BS - 7)
    assert engine.stored_blocks() == distinct_blocks(data)


@pytest.mark.parametrize("mode", [
    FALLOC_FL_PUNCH_HOLE,  # Linux requires KEEP_SIZE with it
    FALLOC_FL_PUNCH_HOLE | ZERO | KEEP,
    NO_HIDE_STALE,
    COLLAPSE_RANGE,
    INSERT_RANGE,
    UNSHARE_RANGE,
    UNSHARE_RANGE | KEEP,
    0x80,
])
def test_other_modes_are_eopnotsupp_and_change_nothing(engine: Engine, mode: int) -> None:
    data = randbytes(4 * BS, 12)
    f = engine.file(data)
    with raises_errno(errno.EOPNOTSUPP):
        engine.volume.fallocate(f.ino, mode, 0, 2 * BS)
    assert engine.content(f.ino) == data


def test_bad_ranges_and_files(engine: Engine) -> None:
    f = engine.file(randbytes(BS, 13))
    with raises_errno(errno.EINVAL):
        engine.volume.fallocate(f.ino, PUNCH, -1, BS)
    with raises_errno(errno.EINVAL):
        engine.volume.fallocate(f.ino, PUNCH, 0, 0)
    with raises_errno(errno.EFBIG):
        engine.volume.fallocate(f.ino, 0, MAX_FILE_SIZE, 1)
    with raises_errno(errno.EFBIG):
        engine.volume.fallocate(f.ino, ZERO, MAX_FILE_SIZE - BS, 2 * BS)
    with raises_errno(errno.EISDIR):
        engine.volume.fallocate(engine.chain.ino, PUNCH, 0, BS)
    with raises_errno(errno.ENOENT):
        engine.volume.fallocate(999_999, PUNCH, 0, BS)
    # A huge range with KEEP_SIZE is fine: only what is mapped is looked at.
    engine.volume.fallocate(f.ino, PUNCH, 0, 1 << 62)
    assert engine.stored_blocks() == 0


def test_punch_survives_a_reopen_and_fsck_is_clean(state_dir: Path) -> None:
    data = randbytes(32 * BS, 14)
    with contextlib.closing(Volume(state_dir)) as volume:
        engine = Engine(volume)
        f = engine.file(data)
        clone = volume.clone(f.ino, engine.chain.ino, b"clone")
        volume.fallocate(f.ino, PUNCH, 3 * BS + 1, 20 * BS)
        volume.fallocate(clone.ino, ZERO, 31 * BS, 4 * BS)
    report = fsck.check(state_dir)
    assert report.clean, [vars(problem) for problem in report.problems]
    with contextlib.closing(Volume(state_dir)) as volume:
        engine = Engine.__new__(Engine)
        engine.volume = volume
        assert engine.content(f.ino) == zeroed(data, 3 * BS + 1, 20 * BS)
        assert engine.content(clone.ino) == data[:31 * BS] + bytes(4 * BS)


_offsets = st.integers(min_value=0, max_value=20 * BS)
_lengths = st.integers(min_value=1, max_value=12 * BS)
_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), _offsets, st.integers(1, 6 * BS), st.integers(0, 5)),
    st.tuples(st.sampled_from([PUNCH, ZERO, ZERO | KEEP, 0, KEEP]), _offsets, _lengths),
    st.tuples(st.just("clone")),
), max_size=25)


@settings(max_examples=100, deadline=None)
@given(ops=_ops)
def test_fallocate_against_a_model(ops: list[tuple[Any, ...]]) -> None:
    """Writes (from a small pool of patterns, so blocks dedup), fallocates and
    clones: contents follow a bytearray model, stored blocks are exactly the
    distinct non-zero blocks of all files, and fsck is clean."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        with contextlib.closing(Volume(state)) as volume:
            engine = Engine(volume)
            files = {engine.file(b"").ino: bytearray()}
            current = next(iter(files))
            for op in ops:
                model = files[current]
                if op[0] == "write":
                    _, offset, length, seed = op
                    chunk = (randbytes(BS, seed) * (length // BS + 2))[:length]
                    volume.write(current, offset, chunk)
                    model.extend(bytes(max(0, offset + length - len(model))))
                    model[offset:offset + length] = chunk
                elif op[0] == "clone":
                    clone = volume.clone(current, engine.chain.ino, b"f%d" % len(files))
                    files[clone.ino] = bytearray(model)
                    current = clone.ino
                else:
                    mode, offset, length = op
                    volume.fallocate(current, mode, offset, length)
                    if mode & (FALLOC_FL_PUNCH_HOLE | ZERO):
                        end = min(len(model), offset + length)
                        model[offset:end] = bytes(max(0, end - offset))
                    if not mode & KEEP:
                        model.extend(bytes(max(0, offset + length - len(model))))
                assert engine.content(current) == bytes(model)
            everything = b"".join(bytes(m) + bytes(-len(m) % BS) for m in files.values())
            assert engine.stored_blocks() == distinct_blocks(everything)
            for ino, model in files.items():
                assert engine.content(ino) == bytes(model)
        report = fsck.check(state)
        assert report.clean, [vars(problem) for problem in report.problems]


# -- through the mount -------------------------------------------------------------------


def new_file(mount: Mount, data: bytes, name: str = "f") -> Path:
    chain = mount.path("c")
    chain.mkdir(exist_ok=True)
    path = chain / name
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def stored_bytes(mount: Mount, chain: str = "c") -> int:
    return int(mount.chain(chain)["stored_bytes"])


def st_blocks_becomes(path: Path, expected: int) -> bool:
    """st_blocks (in 512-byte units) reaches *expected* once the attribute cache expires."""
    return wait_until(lambda: os.stat(path).st_blocks == expected, timeout=5)


def disk_bytes_becomes(mount: Mount, expected: int, chain: str = "c") -> bool:
    """The chain's data file occupies *expected* bytes once the daemon has
    punched the slots that stayed free (within a few seconds)."""
    return wait_until(lambda: mount.chain(chain)["disk_bytes"] == expected, timeout=10,
                      interval=0.2)


@pytest.mark.mount
@requires_mount
def test_punch_hole_through_the_mount(mount: Mount) -> None:
    data = randbytes(16 * BS, 20)
    path = new_file(mount, data)
    assert stored_bytes(mount) == 16 * BS
    with opened(path) as fd:
        fallocate(fd, PUNCH, 2 * BS + 100, 300)  # inside block 2
        fallocate(fd, PUNCH, 5 * BS + 1, 6 * BS)  # blocks 6..10 whole, 5 and 11 in part
    expected = zeroed(zeroed(data, 2 * BS + 100, 300), 5 * BS + 1, 6 * BS)
    assert path.read_bytes() == expected
    assert stored_bytes(mount) == 11 * BS
    assert st_blocks_becomes(path, 11 * BS // 512)
    assert os.stat(path).st_size == 16 * BS
    # The same through util-linux: the rest of the file.
    subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length",
                    str(16 * BS), str(path)], check=True)
    assert path.read_bytes() == bytes(16 * BS)
    assert stored_bytes(mount) == 0
    assert st_blocks_becomes(path, 0)
    assert disk_bytes_becomes(mount, 0)


@pytest.mark.mount
@requires_mount
def test_zero_range_through_the_mount(mount: Mount) -> None:
    data = randbytes(8 * BS + 17, 21)
    path = new_file(mount, data)
    with opened(path) as fd:
        fallocate(fd, ZERO | KEEP, BS - 1, 3 * BS + 2)
        assert os.fstat(fd).st_size == len(data)
        fallocate(fd, ZERO, 7 * BS, 4 * BS)  # past the end: extends
        assert os.fstat(fd).st_size == 11 * BS
    expected = zeroed(data, BS - 1, 3 * BS + 2)[:7 * BS] + bytes(4 * BS)
    assert path.read_bytes() == expected
    assert stored_bytes(mount) == distinct_blocks(expected) * BS


@pytest.mark.mount
@requires_mount
def test_posix_fallocate_within_and_beyond_the_size(mount: Mount) -> None:
    data = randbytes(3 * BS + 5, 22)
    path = new_file(mount, data)
    with opened(path) as fd:
        os.posix_fallocate(fd, 0, 2 * BS)
        assert os.fstat(fd).st_size == len(data)
        os.posix_fallocate(fd, 2 * BS, 64 * MIB)
        assert os.fstat(fd).st_size == 2 * BS + 64 * MIB
        # glibc emulates posix_fallocate with writes where fallocate(2) fails;
        # fallocate(2) itself has no such fallback.
        fallocate(fd, 0, 100 * MIB, BS)
        assert os.fstat(fd).st_size == 100 * MIB + BS
    assert stored_bytes(mount) == 4 * BS  # nothing reserved, nothing written
    with open(path, "rb") as f:
        assert f.read(len(data)) == data
        f.seek(64 * MIB)
        assert f.read(BS) == bytes(BS)
    assert os.stat(path).st_size == 100 * MIB + BS


@pytest.mark.mount
@requires_mount
def test_unsupported_modes_through_the_mount(mount: Mount) -> None:
    data = randbytes(4 * BS, 23)
    path = new_file(mount, data)
    with opened(path) as fd:
        # Linux answers these itself (the VFS, or FUSE, which passes on
        # only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE); the engine tests
        # cover swapfs's own answer.
        for mode in (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, FALLOC_FL_PUNCH_HOLE):
            with pytest.raises(OSError) as info:
                fallocate(fd, mode, 0, BS)
            assert info.value.errno == errno.EOPNOTSUPP, mode
    assert path.read_bytes() == data
    with opened(path) as fd:
        fallocate(fd, PUNCH, 0, BS)
    assert stored_bytes(mount) == 3 * BS


@pytest.mark.mount
@requires_mount
def test_blkdiscard_on_a_loop_device_frees_the_blocks(mount: Mount) -> None:
    path = new_file(mount, b"", "disk.img")
    os.truncate(path, 64 * MIB)
    data = randbytes(16 * MIB, 24)
    with loop_device(path) as device:
        queue = Path("/sys/block") / Path(device).name / "queue"
        assert int((queue / "discard_max_bytes").read_text()) > 0
        with contextlib.closing(mmap.mmap(-1, len(data))) as aligned:  # for O_DIRECT
            aligned.write(data)
            fd = os.open(device, os.O_RDWR | os.O_DIRECT)
            try:
                assert os.pwrite(fd, aligned, 8 * MIB) == len(data)
            finally:
                os.close(fd)
        assert stored_bytes(mount) == len(data)
        subprocess.run(["blkdiscard", "--offset", str(12 * MIB), "--length", str(4 * MIB),
                        device], check=True)
        assert stored_bytes(mount) == len(data) - 4 * MIB
        with open(device, "rb") as disk:
            disk.seek(8 * MIB)
            assert disk.read(len(data)) == zeroed(data, 4 * MIB, 4 * MIB)
        subprocess.run(["blkdiscard", device], check=True)
        assert stored_bytes(mount) == 0
        # Discard still works: the loop device did not switch it off.
        assert int((queue / "discard_max_bytes").read_text()) > 0
    assert disk_bytes_becomes(mount, 0)
    stats = mount.chain("c")
    assert stats["files"]["disk.img"]["size"] == 64 * MIB
    assert path.read_bytes() == bytes(64 * MIB)


# -- real swap ----------------------------------------------------------------------------


@contextlib.contextmanager
def swap_on(path: Path, discard: bool) -> Iterator[str]:
    """``swapfs swapon [--no-discard]``, always undone (swapoff and detach) afterwards."""
    args = ["swapon", str(path), "--priority", "32767"]
    device = swapfs(*args, *([] if discard else ["--no-discard"])).stdout.strip()
    try:
        yield device
    finally:
        if swaparea.devices_of(str(path)):
            swapfs("swapoff", str(path))


def swap_cluster_bytes() -> int:
    """The kernel's swap cluster: a huge page's worth of slots, else 256 slots."""
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 256 * BS


def stale_allowance(device: str) -> int:
    """What may honestly stay stored once the workload has exited.

    The swap header (mkswap's first page), and the slots still in use (by
    anything else that swaps meanwhile: the area has the top priority).
    The kernel discards a cluster of slots only once every slot in it is
    free, so each slot in use can keep a whole cluster of stale slots
    stored with it.
    """
    used = next((area.used_bytes for area in swaparea.active_areas()
                 if area.device == device), 0)
    return BS + (used // BS) * swap_cluster_bytes() + 16 * BS


def swap_run(mount: Mount, discard: bool, settle_seconds: float
             ) -> tuple[dict[str, int], dict[str, int], int]:
    """Two workers swap out the same 128 MiB table, verify it, and exit.

    Returns the chain's figures right after the workload and after up to
    *settle_seconds* (the kernel discards freed slots asynchronously, and
    the daemon punches them later still), both while swap is still on, and
    the :func:`stale_allowance` then.
    """
    chain = mount.path("web")
    chain.mkdir()
    path = chain / "vm.swap"
    path.touch()
    os.truncate(path, 1024 * MIB)
    with swap_on(path, discard) as device:
        with MemoryCgroup("discard", 96 * MIB) as cgroup:
            result = run_workload(cgroup, workers=2, table_mib=128, device=device)
        assert result.swapped_out_bytes > 128 * MIB
        after = mount.chain("web")
        deadline = time.monotonic() + settle_seconds
        while True:
            settled = mount.chain("web")
            allowance = stale_allowance(device)
            # The daemon punches freed slots a second or two after the discards.
            if (settled["stored_bytes"] <= allowance and settled["disk_bytes"] <= allowance + BS
                    or time.monotonic() > deadline):
                break
            time.sleep(0.5)
        print(json.dumps({"discard": discard, "peak_swap_used": result.peak_swap_used_bytes,
                          "after": after["stored_bytes"], "settled": settled["stored_bytes"],
                          "allowance": allowance}))
    return after, settled, allowance


@pytest.mark.slow
@pytest.mark.mount
@requires_mount
def test_swap_with_discard_gives_the_blocks_back(mount: Mount) -> None:
    _, settled, allowance = swap_run(mount, discard=True, settle_seconds=20)
    # Of the 128 MiB stored, the header and at most a cluster per slot
    # still in use stay: typically 4 KiB to 2 MiB.
    assert settled["stored_bytes"] <= allowance, (settled, allowance)
    assert settled["logical_bytes"] <= allowance, (settled, allowance)
    assert settled["disk_bytes"] <= allowance + BS, (settled, allowance)


@pytest.mark.slow
@pytest.mark.mount
@requires_mount
def test_swap_without_discard_keeps_what_was_swapped_out(mount: Mount) -> None:
    _, settled, _ = swap_run(mount, discard=False, settle_seconds=3)
    # The two identical tables stay stored (once): nothing told swapfs
    # that their slots were freed.
    assert settled["stored_bytes"] >= 120 * MIB, settled
    assert settled["logical_bytes"] >= 240 * MIB, settled
