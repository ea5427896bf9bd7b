"""A damaged block heals: found by a read or by fsck, it is set aside.

A stored block whose data no longer matches its digest reads EIO wherever
it is mapped, and no later write may dedup onto it: the next write of the
same content must store a fresh copy that reads back right, across a
reopen too. The mark goes when the slot is freed. (The index's own damage
is docs/integrity.md's; this is the data files'.)
"""

import errno
import os
import random
from pathlib import Path

import pytest

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume
from tests.mounting import Mount, aligned_buffer, os_error, read_direct, requires_mount

PAGE = random.Random(5).randbytes(BLOCK_SIZE)


def damage(state: Path, chain_id: int, slot: int) -> None:
    """Flip a bit of a slot's data in the chain's data file."""
    path = state / "data" / f"{chain_id}.blocks"
    with open(path, "r+b") as data:
        data.seek(slot * BLOCK_SIZE + 100)
        byte = data.read(1)[0]
        data.seek(slot * BLOCK_SIZE + 100)
        data.write(bytes([byte ^ 0x10]))


def refcounts(volume: Volume, chain_id: int) -> dict[int, int]:
    return {slot: refcount for slot, (_, refcount) in volume.blocks(chain_id).items()}


def eio(call: object, *args: object) -> None:
    with pytest.raises(SwapfsError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.errno == errno.EIO


def setup(state: Path) -> tuple[Volume, int, int]:
    """A volume whose chain stores PAGE in slot 0, mapped by file f: (volume, chain, f)."""
    volume = Volume(state)
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    f = volume.create(chain.ino, b"f", 0o600, 0, 0)
    volume.write(f.ino, 0, PAGE)
    volume.sync()
    assert refcounts(volume, chain.chain) == {0: 1}
    return volume, chain.ino, f.ino


def test_a_block_a_read_finds_damaged_is_not_deduplicated_onto(state_dir: Path) -> None:
    volume, chain_dir, f = setup(state_dir)
    chain_id = volume.getattr(f).chain
    damage(state_dir, chain_id, 0)
    try:
        eio(volume.read, f, 0, BLOCK_SIZE)
        g = volume.create(chain_dir, b"g", 0o600, 0, 0).ino
        volume.write(g, 0, PAGE)  # the same content: a fresh copy, not slot 0
        assert volume.read(g, 0, BLOCK_SIZE) == PAGE
        assert refcounts(volume, chain_id) == {0: 1, 1: 1}
        eio(volume.read, f, 0, BLOCK_SIZE)  # what the damage took stays EIO
    finally:
        volume.close()
    volume = Volume(state_dir)  # the mark is durable: no dedup onto slot 0 after a reopen
    try:
        h = volume.create(chain_dir, b"h", 0o600, 0, 0).ino
        volume.write(h, 0, PAGE)
        assert volume.read(h, 0, BLOCK_SIZE) == PAGE
        assert refcounts(volume, chain_id) == {0: 1, 1: 2}
        # Freeing the damaged slot drops its mark: the slot is clean to reuse.
        volume.unlink(chain_dir, b"f", still_open=False)
        assert refcounts(volume, chain_id) == {1: 2}
    finally:
        volume.close()
    report = fsck.check(state_dir)
    assert report.clean, report.problems


def test_fsck_repair_sets_aside_what_it_finds_damaged(state_dir: Path) -> None:
    volume, chain_dir, f = setup(state_dir)
    chain_id = volume.getattr(f).chain
    volume.close()
    damage(state_dir, chain_id, 0)
    report = fsck.check(state_dir)
    assert [problem.kind for problem in report.problems] == ["corrupt-block"]
    report = fsck.check(state_dir, repair=True)
    assert [problem.kind for problem in report.problems] == ["corrupt-block"]
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    volume = Volume(state_dir)
    try:
        g = volume.create(chain_dir, b"g", 0o600, 0, 0).ino
        volume.write(g, 0, PAGE)
        assert volume.read(g, 0, BLOCK_SIZE) == PAGE
        assert refcounts(volume, chain_id) == {0: 1, 1: 1}
    finally:
        volume.close()


def test_a_stale_mark_is_reported_and_repaired(state_dir: Path) -> None:
    volume, chain_dir, f = setup(state_dir)
    chain_id = volume.getattr(f).chain
    try:
        volume.set_aside(chain_id, 0)  # marked, though its data is intact
    finally:
        volume.close()
    report = fsck.check(state_dir, repair=True)
    assert [(p.kind, p.repaired) for p in report.problems] == [("stale-damaged-mark", True)]
    assert fsck.check(state_dir).clean
    volume = Volume(state_dir)
    try:  # dedup onto slot 0 again
        g = volume.create(chain_dir, b"g", 0o600, 0, 0).ino
        volume.write(g, 0, PAGE)
        assert refcounts(volume, chain_id) == {0: 2}
    finally:
        volume.close()


@requires_mount
@pytest.mark.mount
def test_a_write_after_damage_is_acknowledged_and_reads_back(mount: Mount) -> None:
    """Through the mount: a read finds the damage, then the same page written
    again (fsync'd) reads back right, before and after a remount."""
    os.mkdir(mount.path("c"))
    mount.path("c", "f").write_bytes(PAGE)
    chain_id = mount.chain("c")["id"]
    mount.umount()
    damage(mount.state, chain_id, 0)
    mount.mount()
    assert os_error(read_direct, mount.path("c", "f"), 0, BLOCK_SIZE) == errno.EIO
    fd = os.open(mount.path("c", "g"), os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    try:
        buffer = aligned_buffer(BLOCK_SIZE)
        buffer[:] = PAGE
        assert os.pwrite(fd, buffer, 0) == BLOCK_SIZE
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_direct(mount.path("c", "g"), 0, BLOCK_SIZE) == PAGE
    mount.remount()
    assert read_direct(mount.path("c", "g"), 0, BLOCK_SIZE) == PAGE
    os.unlink(mount.path("c", "f"))  # the damaged block goes with it: fsck is clean
