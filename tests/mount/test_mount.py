"""swapfs through a real FUSE mount, with ordinary system calls and tools.

Each test gets a fresh mount (the ``mount`` fixture in conftest), which is
unmounted afterwards and whose state must then pass the offline fsck.
Expected figures come from a model of the data: the distinct non-zero 4 KiB
blocks of a chain's files are exactly what the chain stores.
"""

import contextlib
import errno
import hashlib
import mmap
import multiprocessing
import os
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from mountd.operations import CACHE_TIMEOUT
from swapfs.control import protocol
from swapfs.engine import Volume, keys, punch_hole
from tests.mounting import (
    BLOCK,
    Mount,
    aligned_buffer,
    os_error,
    read_direct,
    requires_mount,
    swapfs,
    wait_until,
)

pytestmark = [pytest.mark.mount, requires_mount]


def randbytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def blocks_of(data: bytes) -> list[bytes]:
    """*data* cut into 4 KiB blocks, the last one zero-padded."""
    padded = data + bytes(-len(data) % BLOCK)
    return [padded[i:i + BLOCK] for i in range(0, len(padded), BLOCK)]


def nonzero_blocks(files: Iterable[bytes]) -> list[bytes]:
    zero = bytes(BLOCK)
    return [block for data in files for block in blocks_of(data) if block != zero]


def unique_blocks(*files: bytes) -> int:
    """How many blocks a chain holding exactly *files* must store."""
    return len(set(nonzero_blocks(files)))


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def du(path: Path) -> int:
    """Disk usage of *path* in bytes, as ``du -s -B1`` reports it, less the
    seal files of an encrypted state: they take the records of 4096 slots at
    a time (128 KiB, asserted where it matters), whatever is stored."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout
    seals = sum(seal.stat().st_blocks * 512 for seal in path.rglob("*.seals"))
    return int(out.split()[0]) - seals


# -- the namespace ---------------------------------------------------------------


def test_chains_are_directories_at_the_root(mount: Mount) -> None:
    """Only chains at the root, only regular files in chains: anything else is EPERM."""
    os.mkdir(mount.path("web"))
    assert sorted(os.listdir(mount.mnt)) == ["web"]
    assert mount.path("web").is_dir()
    assert os_error(os.mkdir, mount.path("web", "nested")) == errno.EPERM
    assert os_error(os.open, mount.path("root.swap"), os.O_CREAT | os.O_WRONLY) == errno.EPERM
    assert os_error(os.symlink, "x", mount.path("web", "link")) == errno.EPERM
    assert os_error(os.symlink, "x", mount.path("link")) == errno.EPERM
    assert os_error(os.mkfifo, mount.path("web", "fifo")) == errno.EPERM
    write_file(mount.path("web", "a.swap"), b"a" * 100)
    assert os_error(os.link, mount.path("web", "a.swap"), mount.path("web", "b")) == errno.EPERM
    assert os_error(os.rmdir, mount.path("web")) == errno.ENOTEMPTY
    assert sorted(os.listdir(mount.path("web"))) == ["a.swap"]
    assert mount.chain("web")["files"].keys() == {"a.swap"}


def test_rename_within_a_chain_but_not_across(mount: Mount) -> None:
    os.mkdir(mount.path("a"))
    os.mkdir(mount.path("b"))
    data = randbytes(3 * BLOCK + 5, 1)
    write_file(mount.path("a", "one"), data)
    os.rename(mount.path("a", "one"), mount.path("a", "two"))
    assert os.listdir(mount.path("a")) == ["two"]
    assert mount.path("a", "two").read_bytes() == data
    assert os_error(os.rename, mount.path("a", "two"), mount.path("b", "two")) == errno.EXDEV
    assert os_error(os.rename, mount.path("a", "two"), mount.path("two")) == errno.EPERM
    # A file renamed over another replaces it; the victim's blocks are freed.
    write_file(mount.path("a", "three"), randbytes(2 * BLOCK, 2))
    os.rename(mount.path("a", "two"), mount.path("a", "three"))
    assert mount.path("a", "three").read_bytes() == data
    assert wait_until(lambda: mount.chain("a")["unique_blocks"] == unique_blocks(data))
    os.rename(mount.path("b"), mount.path("c"))
    assert sorted(os.listdir(mount.mnt)) == ["a", "c"]
    mount.remount()
    assert mount.path("a", "three").read_bytes() == data
    assert sorted(os.listdir(mount.mnt)) == ["a", "c"]


def test_rm_r_of_a_chain(mount: Mount) -> None:
    """Deleting a chain with its files (what ``rm -r`` does) succeeds and frees it."""
    os.mkdir(mount.path("c"))
    for name in ("x", "y", "z"):
        write_file(mount.path("c", name), randbytes(4 * BLOCK, len(name)))
    subprocess.run(["rm", "-r", str(mount.path("c"))], check=True, capture_output=True)
    assert os.listdir(mount.mnt) == []
    assert mount.stats()["chains"] == {}
    assert not any((mount.state / "data").iterdir())


# -- data -------------------------------------------------------------------------


def test_writes_of_any_offset_and_length_read_back(mount: Mount) -> None:
    """Random partial-block writes against a bytearray model, before and after remount."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    rng = random.Random(7)
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for step in range(300):
            offset = rng.randrange(24 * BLOCK)
            length = rng.choice([1, 2, 7, 511, 4095, 4096, 4097, 8191, 8192, 12288, 20000])
            data = bytes(length) if step % 10 == 0 else rng.randbytes(length)
            assert os.pwrite(fd, data, offset) == length
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data
            check = rng.randrange(len(model))
            assert os.pread(fd, 9000, check) == model[check:check + 9000]
        assert os.fstat(fd).st_size == len(model)
        assert os.pread(fd, len(model) + 10, 0) == model
    finally:
        os.close(fd)
    assert read_direct(path, 0, len(model)) == model
    mount.remount()
    assert path.read_bytes() == model
    chain = mount.chain("c")
    assert chain["unique_blocks"] == unique_blocks(bytes(model))
    assert chain["files"]["f"]["mapped_blocks"] == len(nonzero_blocks([bytes(model)]))


def test_write_past_end_leaves_a_hole_and_reads_are_short_at_the_end(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    write_file(path, b"")
    fd = os.open(path, os.O_RDWR)
    try:
        offset = 5 * BLOCK + 100
        assert os.pwrite(fd, b"0123456789", offset) == 10
        size = offset + 10
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, offset, 0) == bytes(offset)
        assert os.pread(fd, 100, size - 3) == b"789"
        assert os.pread(fd, 100, size) == b""
        assert os.pread(fd, 100, size + 10 * BLOCK) == b""
        assert os.fstat(fd).st_blocks == BLOCK // 512  # only the written block is stored
        # Shrinking inside a block then growing again must read zeros past the cut.
        os.ftruncate(fd, offset + 4)
        os.ftruncate(fd, offset + 3 * BLOCK)
        assert os.pread(fd, 20, offset) == b"0123" + bytes(16)
    finally:
        os.close(fd)
    mount.remount()
    data = path.read_bytes()
    assert data == bytes(offset) + b"0123" + bytes(3 * BLOCK - 4)
    assert os.stat(path).st_blocks == BLOCK // 512


def test_zero_writes_store_nothing(mount: Mount) -> None:
    """All-zero blocks are holes: no st_blocks, no stored bytes, yet they read as zeros."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    write_file(path, bytes(64 * BLOCK))
    assert os.stat(path).st_size == 64 * BLOCK
    assert os.stat(path).st_blocks == 0
    chain = mount.chain("c")
    assert (chain["stored_bytes"], chain["logical_bytes"]) == (0, 0)
    assert chain["files"]["f"]["zero_blocks"] == 64
    # Data, then zeros over it: the block is unmapped and no longer stored.
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, randbytes(2 * BLOCK, 3), 10 * BLOCK)
        assert os.fstat(fd).st_blocks == 2 * BLOCK // 512
        assert mount.chain("c")["stored_bytes"] == 2 * BLOCK
        os.pwrite(fd, bytes(BLOCK), 10 * BLOCK)
        assert os.fstat(fd).st_blocks == BLOCK // 512
        assert mount.chain("c")["stored_bytes"] == BLOCK
        os.pwrite(fd, bytes(BLOCK), 11 * BLOCK)
        assert os.fstat(fd).st_blocks == 0
    finally:
        os.close(fd)
    chain = mount.chain("c")
    assert (chain["stored_bytes"], chain["unique_blocks"], chain["zero_blocks"]) == (0, 0, 64)
    assert path.read_bytes() == bytes(64 * BLOCK)


def test_statfs_is_the_backing_file_systems(mount: Mount) -> None:
    ours = os.statvfs(mount.mnt)
    backing = os.statvfs(mount.state)
    assert (ours.f_bsize, ours.f_frsize, ours.f_blocks) == (
        backing.f_bsize, backing.f_frsize, backing.f_blocks)
    # Free space moves with whatever else runs; it must agree within 1%.
    assert abs(ours.f_bavail - backing.f_bavail) <= backing.f_blocks // 100
    assert abs(ours.f_bfree - backing.f_bfree) <= backing.f_blocks // 100
    assert ours.f_namemax == 255


def test_stats_count_requests_by_operation(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    write_file(mount.path("c", "f"), randbytes(2 * BLOCK, 20))
    assert read_direct(mount.path("c", "f"), 0, 2 * BLOCK) == randbytes(2 * BLOCK, 20)
    requests = mount.stats()["requests"]
    assert requests["mkdir"] == 1 and requests["create"] == 1
    assert requests["write"] >= 1 and requests["read"] >= 1
    assert "rmdir" not in requests


def test_stats_count_write_requests_by_size(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    fd = os.open(mount.path("c", "f"), os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    try:
        buffer = aligned_buffer(3 * BLOCK)
        buffer.write(randbytes(3 * BLOCK, 21))
        assert os.pwritev(fd, [memoryview(buffer)[:BLOCK]], 0) == BLOCK
        assert os.pwritev(fd, [buffer], 4 * BLOCK) == 3 * BLOCK
        assert os.pwritev(fd, [buffer], 8 * BLOCK) == 3 * BLOCK
    finally:
        os.close(fd)
    assert mount.stats()["write_blocks"] == {"1": 1, "3": 2}


def test_dedup_within_a_chain_not_across_chains(mount: Mount) -> None:
    data = randbytes(32 * BLOCK, 4)
    repeated = data[:BLOCK] * 16
    os.mkdir(mount.path("a"))
    os.mkdir(mount.path("b"))
    write_file(mount.path("a", "one"), data)
    write_file(mount.path("a", "two"), data)
    write_file(mount.path("a", "rep"), repeated)
    write_file(mount.path("b", "one"), data)
    stats = mount.stats()["chains"]
    a, b = stats["a"], stats["b"]
    assert a["unique_blocks"] == 32
    assert a["stored_bytes"] == 32 * BLOCK
    assert a["logical_bytes"] == (32 + 32 + 16) * BLOCK
    assert a["dedup_ratio"] == pytest.approx(80 / 32)
    assert a["files"]["rep"] == {"size": 16 * BLOCK, "logical_bytes": 16 * BLOCK,
                                 "mapped_blocks": 16, "zero_blocks": 0, "priority": 0}
    assert (b["unique_blocks"], b["stored_bytes"], b["logical_bytes"]) == (
        32, 32 * BLOCK, 32 * BLOCK)
    assert b["dedup_ratio"] == 1.0
    assert a["id"] != b["id"]
    # Each chain really holds its own copy on disk.
    for chain in (a, b):
        assert chain["disk_bytes"] >= 32 * BLOCK
        assert (mount.state / "data" / f"{chain['id']}.blocks").stat().st_blocks * 512 \
            >= 32 * BLOCK
    for name in ("one", "two"):
        assert mount.path("a", name).read_bytes() == data
    assert mount.path("a", "rep").read_bytes() == repeated


def test_clone_shares_blocks_and_clone_empty_has_none(mount: Mount) -> None:
    os.mkdir(mount.path("web"))
    base = randbytes(20 * BLOCK, 5) + bytes(4 * BLOCK) + randbytes(100, 6)
    write_file(mount.path("web", "base.swap"), base)
    before = mount.chain("web")
    swapfs("clone", str(mount.path("web", "base.swap")), str(mount.path("web", "vm1.swap")))
    swapfs("clone", "--empty", str(mount.path("web", "base.swap")),
           str(mount.path("web", "vm2.swap")))
    assert mount.path("web", "vm1.swap").read_bytes() == base
    assert read_direct(mount.path("web", "vm1.swap"), 0, len(base)) == base
    assert os.stat(mount.path("web", "vm2.swap")).st_size == len(base)
    assert os.stat(mount.path("web", "vm2.swap")).st_blocks == 0
    assert mount.path("web", "vm2.swap").read_bytes() == bytes(len(base))
    after = mount.chain("web")
    assert after["stored_bytes"] == before["stored_bytes"] == 21 * BLOCK
    assert after["logical_bytes"] == 2 * before["logical_bytes"]
    assert after["files"]["vm1.swap"] == before["files"]["base.swap"]
    assert after["files"]["vm2.swap"]["logical_bytes"] == 0
    assert after["files"]["vm2.swap"]["size"] == len(base)
    # Copy on write: changing the clone leaves the source alone, and back.
    fd = os.open(mount.path("web", "vm1.swap"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"X" * 10, BLOCK + 7)
    finally:
        os.close(fd)
    changed = base[:BLOCK + 7] + b"X" * 10 + base[BLOCK + 17:]
    assert mount.path("web", "vm1.swap").read_bytes() == changed
    assert mount.path("web", "base.swap").read_bytes() == base
    assert mount.chain("web")["unique_blocks"] == unique_blocks(base, changed)
    # Clones stay in their chain and never replace a file.
    os.mkdir(mount.path("db"))
    across = swapfs("clone", str(mount.path("web", "base.swap")),
                    str(mount.path("db", "x.swap")), check=False)
    assert across.returncode == 1 and "chain" in across.stderr
    onto = swapfs("clone", str(mount.path("web", "base.swap")),
                  str(mount.path("web", "vm1.swap")), check=False)
    assert onto.returncode == 1
    mount.remount()
    assert mount.path("web", "base.swap").read_bytes() == base
    assert mount.path("web", "vm1.swap").read_bytes() == changed
    assert mount.path("web", "vm2.swap").read_bytes() == bytes(len(base))


def test_clone_outlives_changes_to_its_source(mount: Mount) -> None:
    """Truncating, rewriting and deleting the source never changes a clone."""
    os.mkdir(mount.path("c"))
    source, clone = mount.path("c", "src"), mount.path("c", "copy")
    data = randbytes(12 * BLOCK + 300, 21)
    write_file(source, data)
    swapfs("clone", str(source), str(clone))
    os.truncate(source, 5 * BLOCK + 17)
    os.truncate(source, 8 * BLOCK)
    assert source.read_bytes() == data[:5 * BLOCK + 17] + bytes(3 * BLOCK - 17)
    assert clone.read_bytes() == data
    write_file(source, randbytes(2 * BLOCK, 22))
    assert clone.read_bytes() == data
    os.unlink(source)
    assert wait_until(lambda: mount.chain("c")["unique_blocks"] == unique_blocks(data))
    mount.remount()
    assert clone.read_bytes() == data


def test_punching_a_hole_frees_the_blocks(mount: Mount) -> None:
    """What a loop device does with the discards of the swap area on it."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    data = randbytes(16 * BLOCK, 23)
    write_file(path, data)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 4 * BLOCK, 8 * BLOCK)
    finally:
        os.close(fd)
    assert path.read_bytes() == data[:4 * BLOCK] + bytes(8 * BLOCK) + data[12 * BLOCK:]
    assert mount.chain("c")["stored_bytes"] == 8 * BLOCK


def lasting(chains: dict) -> dict:
    """The chains' figures that outlive the daemon: not what its slot tables
    and dedup tables hold in memory, which its scan of them builds."""
    return {name: {key: value for key, value in chain.items()
                   if key not in ("slot_table", "dedup_table")}
            for name, chain in chains.items()}


def test_every_byte_survives_a_remount(mount: Mount) -> None:
    files = {
        ("a", "random"): randbytes(50 * BLOCK + 123, 8),
        ("a", "dup"): randbytes(50 * BLOCK + 123, 8)[: 20 * BLOCK],
        ("a", "sparse"): bytes(30 * BLOCK) + randbytes(BLOCK, 9) + bytes(7),
        ("b", "tiny"): b"x",
        ("b", "empty"): b"",
        ("b", "pattern"): (b"swapfs" * 2000)[:3 * BLOCK - 1],
    }
    for chain in ("a", "b"):
        os.mkdir(mount.path(chain))
    for (chain, name), data in files.items():
        write_file(mount.path(chain, name), data)
    digests = {key: hashlib.sha256(mount.path(*key).read_bytes()).hexdigest()
               for key in files}
    before = lasting(mount.stats()["chains"])
    mount.remount()
    for key, data in files.items():
        got = mount.path(*key).read_bytes()
        assert got == data
        assert hashlib.sha256(got).hexdigest() == digests[key]
        assert os.stat(mount.path(*key)).st_size == len(data)
    assert lasting(mount.stats()["chains"]) == before
    assert before["a"]["unique_blocks"] == unique_blocks(
        *(data for (chain, _), data in files.items() if chain == "a"))


def test_disk_usage_follows_stored_bytes(mount: Mount) -> None:
    """``du`` of the data directory grows with stored blocks and shrinks when they go.

    Slack: file-system metadata (extent blocks) of the data file, 64 KiB at most.
    """
    slack = 16 * BLOCK
    os.mkdir(mount.path("c"))
    data_dir = mount.state / "data"
    base = du(data_dir)
    write_file(mount.path("c", "a"), randbytes(256 * BLOCK, 10))
    write_file(mount.path("c", "b"), randbytes(256 * BLOCK, 10)[: 128 * BLOCK]
               + randbytes(128 * BLOCK, 11))
    chain = mount.chain("c")
    assert chain["stored_bytes"] == 384 * BLOCK
    assert chain["seal_bytes"] == 4096 * 32  # an encrypted state: one step of records
    assert 0 <= du(data_dir) - base - chain["stored_bytes"] <= slack
    assert 0 <= chain["disk_bytes"] - chain["stored_bytes"] <= slack
    os.unlink(mount.path("c", "a"))
    # Half of a's blocks are still used by b; the other half is punched
    # within a few seconds (no new block took their slots).
    assert wait_until(lambda: mount.chain("c")["stored_bytes"] == 256 * BLOCK)
    assert wait_until(lambda: 0 <= du(data_dir) - base - 256 * BLOCK <= slack, timeout=10)
    os.unlink(mount.path("c", "b"))
    assert wait_until(lambda: mount.chain("c")["stored_bytes"] == 0)
    assert wait_until(lambda: du(data_dir) - base <= slack, timeout=10)
    assert mount.chain("c")["files"] == {}


def test_discarded_and_truncated_space_goes_back_within_seconds(mount: Mount) -> None:
    """A discard and a truncate free slots at once; the daemon punches the
    ones that no new block took within a few seconds, so ``du`` falls."""
    slack = 16 * BLOCK
    os.mkdir(mount.path("c"))
    data_dir = mount.state / "data"
    base = du(data_dir)
    path = mount.path("c", "f")
    data = randbytes(256 * BLOCK, 30)
    write_file(path, data)
    assert 0 <= du(data_dir) - base - 256 * BLOCK <= slack
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 0, 128 * BLOCK)  # what a loop device sends for a discard
    finally:
        os.close(fd)
    assert mount.chain("c")["stored_bytes"] == 128 * BLOCK
    assert wait_until(lambda: 0 <= du(data_dir) - base - 128 * BLOCK <= slack, timeout=10)
    os.truncate(path, 192 * BLOCK)
    assert mount.chain("c")["stored_bytes"] == 64 * BLOCK
    assert wait_until(lambda: 0 <= du(data_dir) - base - 64 * BLOCK <= slack, timeout=10)
    assert path.read_bytes() == bytes(128 * BLOCK) + data[128 * BLOCK:192 * BLOCK]


def test_a_new_block_takes_the_slot_freed_last(mount: Mount) -> None:
    """Slots freed by overwrites keep their disk space for a while, and the
    next new block of the chain takes the one freed most recently, once a
    checkpoint covers its freeing (here the fsync; the daemon takes one
    every second)."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    blocks = [randbytes(BLOCK, 40 + n) for n in range(8)]
    write_file(path, b"".join(blocks))  # slots 0 to 7
    new = randbytes(BLOCK, 50)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(BLOCK), BLOCK)  # frees slot 1
        os.pwrite(fd, bytes(BLOCK), 5 * BLOCK)  # then slot 5
        os.fsync(fd)  # a checkpoint: slots 1 and 5 may be reused
        os.pwrite(fd, new, 2 * BLOCK)  # frees slot 2, stores the new block in slot 5
    finally:
        os.close(fd)
    expected = [blocks[0], bytes(BLOCK), new, *blocks[3:5], bytes(BLOCK), *blocks[6:]]
    assert path.read_bytes() == b"".join(expected)
    mount.umount()  # with slots 1 and 2 still pending: the unmount punches them
    assert mount.fsck().clean
    with contextlib.closing(Volume(mount.state, recover=False, master=keys.load())) as volume:
        inode = volume.resolve("c/f")
        assert volume.mapped(inode.ino)[2] == 5
        assert volume.free_slots(inode.chain) == {1, 2}


def test_unlinked_open_file_stays_readable_until_closed(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    data = randbytes(16 * BLOCK, 12)
    write_file(path, data)
    fd = os.open(path, os.O_RDWR)
    direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.unlink(path)
        assert not path.exists()
        assert mount.chain("c")["files"] == {}
        # Reads through the open fds, the O_DIRECT one past the page cache.
        assert os.pread(fd, len(data), 0) == data
        buffer = aligned_buffer(len(data))
        assert os.preadv(direct, [buffer], 0) == len(data)
        assert bytes(buffer) == data
        os.pwrite(fd, b"still here", 0)
        assert os.pread(fd, 10, 0) == b"still here"
        assert mount.chain("c")["stored_bytes"] == 16 * BLOCK
    finally:
        os.close(fd)
        os.close(direct)
    assert wait_until(lambda: mount.chain("c")["stored_bytes"] == 0)
    os.rmdir(mount.path("c"))


# -- tools and I/O paths -------------------------------------------------------------


def test_cp_and_dd(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    source = mount.root / "source"
    source.write_bytes(randbytes(16 * BLOCK + 999, 13))
    patch = mount.root / "patch"
    patch.write_bytes(randbytes(8 * BLOCK, 14))
    target = mount.path("c", "f")

    subprocess.run(["cp", str(source), str(target)], check=True)
    out = mount.root / "out"
    subprocess.run(["cp", str(target), str(out)], check=True)
    model = bytearray(source.read_bytes())
    assert out.read_bytes() == model

    def dd(*args: str) -> None:
        subprocess.run(["dd", *args, "status=none"], check=True)

    dd(f"if={patch}", f"of={target}", "bs=4096", "seek=3", "count=2", "conv=notrunc")
    model[3 * BLOCK:5 * BLOCK] = patch.read_bytes()[:2 * BLOCK]
    dd(f"if={patch}", f"of={target}", "bs=4096", "skip=2", "seek=10", "count=4",
       "conv=notrunc", "oflag=direct")
    model[10 * BLOCK:14 * BLOCK] = patch.read_bytes()[2 * BLOCK:6 * BLOCK]
    assert os.stat(target).st_size == len(model)
    dd(f"if={target}", f"of={out}", "bs=4096", "iflag=direct")
    assert out.read_bytes() == model
    assert target.read_bytes() == model
    # Without notrunc dd truncates after what it wrote.
    dd(f"if={patch}", f"of={target}", "bs=4096", "seek=2", "count=1")
    model = model[:2 * BLOCK] + patch.read_bytes()[:BLOCK]
    assert target.read_bytes() == model
    mount.remount()
    assert target.read_bytes() == model
    assert mount.chain("c")["unique_blocks"] == unique_blocks(bytes(model))


def test_mmap_shared_read_and_write(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    model = bytearray(randbytes(16 * BLOCK, 15))
    write_file(path, bytes(model))
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), len(model), mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert mapping[:] == model
            patch = randbytes(2 * BLOCK + 50, 16)
            mapping[BLOCK - 25:BLOCK - 25 + len(patch)] = patch
            model[BLOCK - 25:BLOCK - 25 + len(patch)] = patch
            mapping[10 * BLOCK:11 * BLOCK] = bytes(BLOCK)
            model[10 * BLOCK:11 * BLOCK] = bytes(BLOCK)
            mapping.flush()
        finally:
            mapping.close()
    # msync sent the pages to the daemon: an O_DIRECT read sees them.
    assert read_direct(path, 0, len(model)) == model
    mount.remount()
    assert path.read_bytes() == model
    assert mount.chain("c")["files"]["f"]["mapped_blocks"] == 15


def test_o_direct_with_aligned_buffers(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    out = aligned_buffer(64 * 1024)
    out[:] = randbytes(64 * 1024, 17)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        assert os.pwrite(fd, out, 2 * BLOCK) == len(out)
        back = aligned_buffer(len(out) + 2 * BLOCK)
        assert os.preadv(fd, [back], 0) == len(out) + 2 * BLOCK
        assert bytes(back) == bytes(2 * BLOCK) + bytes(out)
        # Reading past the end with O_DIRECT is short as well.
        assert os.preadv(fd, [back], len(out)) == 2 * BLOCK
    finally:
        os.close(fd)
    mount.remount()
    assert path.read_bytes() == bytes(2 * BLOCK) + bytes(out)


def test_o_direct_reads_do_not_ask_for_attributes(mount: Mount) -> None:
    """An O_DIRECT open (a loop device with direct I/O makes one) is answered
    with FOPEN_DIRECT_IO: its reads reach the daemon without a GETATTR first,
    even once the attributes the kernel holds have expired. (An ordinary
    open keeps the page cache and shared mappings: the mmap test above.)"""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    data = randbytes(8 * BLOCK, 19)
    write_file(path, data)
    socket_path = protocol.socket_of(str(mount.mnt))  # finding it looks at the mount

    def requests() -> Counter[str]:
        return Counter(protocol.request(socket_path, {"op": "stats"})["requests"])

    buffer = aligned_buffer(BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        time.sleep(CACHE_TIMEOUT + 0.5)  # what the open told the kernel has expired
        before = requests()
        for index in range(8):
            assert os.preadv(fd, [buffer], index * BLOCK) == BLOCK
            assert bytes(buffer) == data[index * BLOCK:(index + 1) * BLOCK]
        asked = requests() - before
    finally:
        os.close(fd)
    assert asked == Counter(read=8)


def test_loop_device_with_direct_io(mount: Mount) -> None:
    """A loop device over a swapfs file (what ``swapon`` on a loop would use)."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "loop.img")
    size = 8 << 20
    write_file(path, b"")
    os.truncate(path, size)
    source = mount.root / "random"
    source.write_bytes(randbytes(4 << 20, 18))
    device = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(path)],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1"
        subprocess.run(["dd", f"if={source}", f"of={device}", "bs=64k", "oflag=direct",
                        "conv=fsync", "status=none"], check=True)
        out = mount.root / "out"
        subprocess.run(["dd", f"if={device}", f"of={out}", "bs=64k", "count=64",
                        "iflag=direct", "status=none"], check=True)
        assert out.read_bytes() == source.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
    assert wait_until(lambda: str(path) not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True).stdout)
    mount.remount()
    data = path.read_bytes()
    assert data[:4 << 20] == source.read_bytes()
    assert data[4 << 20:] == bytes(size - (4 << 20))
    assert mount.chain("c")["files"]["loop.img"]["mapped_blocks"] == (4 << 20) // BLOCK


# -- concurrency ---------------------------------------------------------------------

POOL_BLOCKS = 24
FILE_BLOCKS = 48


def storm(seed: int) -> list[tuple[int, bytes]]:
    """A worker's writes: mostly whole blocks from a shared pool, so files dedup."""
    pool = [randbytes(BLOCK, 1000 + i) for i in range(POOL_BLOCKS)]
    rng = random.Random(seed)
    ops: list[tuple[int, bytes]] = []
    for _ in range(250):
        roll = rng.random()
        if roll < 0.8:
            ops.append((rng.randrange(FILE_BLOCKS) * BLOCK, rng.choice(pool)))
        elif roll < 0.9:
            ops.append((rng.randrange(FILE_BLOCKS) * BLOCK, bytes(BLOCK)))
        else:
            length = rng.randrange(1, 6000)
            ops.append((rng.randrange(FILE_BLOCKS * BLOCK - length), rng.randbytes(length)))
    return ops


def apply(ops: list[tuple[int, bytes]]) -> bytes:
    model = bytearray()
    for offset, data in ops:
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset:offset + len(data)] = data
    return bytes(model)


def storm_worker(path: str, seed: int) -> None:
    """Apply :func:`storm` to *path*, checking reads along the way; fail by raising."""
    ops = storm(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for step, (offset, data) in enumerate(ops):
            assert os.pwrite(fd, data, offset) == len(data)
            if step % 10 == 9:
                model = apply(ops[:step + 1])
                assert os.pread(fd, len(model) + 1, 0) == model, f"{path} step {step}"
    finally:
        os.close(fd)
    model = apply(ops)
    assert read_direct(Path(path), 0, len(model) + 1) == model, path


def test_concurrent_writers_with_overlapping_content(mount: Mount) -> None:
    """Five processes write five files of one chain at once; all data and counts hold."""
    os.mkdir(mount.path("c"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=storm_worker, args=(str(mount.path("c", f"f{i}")), i))
               for i in range(5)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(60)
            assert worker.exitcode == 0, f"worker {worker.name} exited {worker.exitcode}"
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    models = [apply(storm(i)) for i in range(5)]
    for i, model in enumerate(models):
        assert mount.path("c", f"f{i}").read_bytes() == model
    chain = mount.chain("c")
    assert chain["unique_blocks"] == unique_blocks(*models)
    assert chain["logical_bytes"] == len(nonzero_blocks(models)) * BLOCK
    assert chain["dedup_ratio"] > 2
    mount.remount()
    for i, model in enumerate(models):
        assert mount.path("c", f"f{i}").read_bytes() == model
