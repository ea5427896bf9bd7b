"""Unit tests of the storage engine's Volume, without FUSE.

Besides what each call returns, the tests look at the index itself (maps,
refcounts, free list) and at the data files' disk usage, because
deduplication and space reclaim are invisible through read() alone.
"""

import collections
import errno
import os
import stat
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest

from swapfs.engine import fsck
from swapfs.engine import index as index_module
from swapfs.engine.blocks import BLOCK_SIZE, MAX_FILE_SIZE
from swapfs.engine.chainwrite import ChainWrite
from swapfs.engine.errors import CorruptBlock, SwapfsError
from swapfs.engine.index import MAP_STEP, ROOT_INO, Inode
from swapfs.engine.volume import RENAME_EXCHANGE, RENAME_NOREPLACE, Volume

BS = BLOCK_SIZE


# -- helpers -----------------------------------------------------------------------


def mkchain(vol: Volume, name: bytes = b"chain") -> Inode:
    return vol.mkdir(ROOT_INO, name, 0o755, 0, 0)


def mkfile(vol: Volume, chain: Inode, name: bytes = b"f.swap") -> Inode:
    return vol.create(chain.ino, name, stat.S_IFREG | 0o600, 0, 0)


def block(n: int, size: int = BS) -> bytes:
    """A distinctive non-zero block (or piece of one) for each n."""
    return (b"%08d" % n * (size // 8 + 1))[:size]


def read_all(vol: Volume, ino: int) -> bytes:
    size = vol.getattr(ino).size
    data = vol.read(ino, 0, size + BS)
    assert len(data) == size
    return data


def chain_stats(vol: Volume, name: str = "chain") -> dict[str, Any]:
    stats: dict[str, Any] = vol.stats()["chains"][name]
    return stats


def refcounts(vol: Volume, chain_id: int) -> dict[bytes, int]:
    return {digest: refcount for digest, refcount in vol.blocks(chain_id).values()}


def slots(vol: Volume, chain_id: int) -> dict[bytes, int]:
    return {digest: slot for slot, (digest, _) in vol.blocks(chain_id).items()}


def map_uses(vol: Volume, *inos: int) -> collections.Counter[bytes]:
    """How many map entries, over the given files, name each digest."""
    uses: collections.Counter[bytes] = collections.Counter()
    for ino in inos:
        table = vol.blocks(vol.getattr(ino).chain)
        uses.update(table[slot][0] for slot in vol.mapped(ino).values())
    return uses


def digest_at(vol: Volume, ino: int, block_no: int) -> bytes:
    """The digest of the block that logical block *block_no* of file *ino* maps to."""
    slot = vol.mapped(ino)[block_no]
    return vol.blocks(vol.getattr(ino).chain)[slot][0]


def free_slots(vol: Volume, chain_id: int) -> set[int]:
    return vol.free_slots(chain_id)


def next_slot(vol: Volume, chain_id: int) -> int:
    with vol.index.begin() as txn:
        chain = txn.get_chain(chain_id)
        assert chain is not None
        return chain.next_slot


def data_file(state: Path, chain_id: int) -> Path:
    return state / "data" / f"{chain_id}.blocks"


def disk_usage(state: Path) -> int:
    """Bytes the data files of all chains really occupy on disk."""
    return sum(p.stat().st_blocks * 512 for p in (state / "data").glob("*.blocks"))


@contextmanager
def raises_errno(code: int) -> Iterator[None]:
    with pytest.raises(SwapfsError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


@pytest.fixture
def chain(volume: Volume) -> Inode:
    return mkchain(volume)


@pytest.fixture
def file(volume: Volume, chain: Inode) -> Inode:
    return mkfile(volume, chain)


# -- chains and files ---------------------------------------------------------------


def test_mkdir_creates_a_chain_at_the_root(volume: Volume) -> None:
    a = mkchain(volume, b"a")
    b = mkchain(volume, b"b")
    assert a.is_dir and b.is_dir
    assert a.chain and b.chain and a.chain != b.chain
    assert volume.lookup(ROOT_INO, b"a").ino == a.ino
    assert set(volume.stats()["chains"]) == {"a", "b"}
    assert [name for name, _ in volume.readdir(ROOT_INO)] == [b"a", b"b"]


def test_nested_mkdir_is_eperm(volume: Volume, chain: Inode) -> None:
    with raises_errno(errno.EPERM):
        volume.mkdir(chain.ino, b"sub", 0o755, 0, 0)
    assert volume.readdir(chain.ino) == []


def test_create_at_the_root_is_eperm(volume: Volume) -> None:
    with raises_errno(errno.EPERM):
        volume.create(ROOT_INO, b"f.swap", stat.S_IFREG | 0o600, 0, 0)
    with raises_errno(errno.ENOENT):
        volume.lookup(ROOT_INO, b"f.swap")


def test_create_a_non_regular_file_is_eperm(volume: Volume, chain: Inode) -> None:
    with raises_errno(errno.EPERM):
        volume.create(chain.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 0)


def test_create_files_in_a_chain(volume: Volume, chain: Inode) -> None:
    f = mkfile(volume, chain, b"one")
    assert not f.is_dir and f.chain == chain.chain and f.size == 0
    assert stat.S_ISREG(f.mode) and stat.S_IMODE(f.mode) == 0o600
    assert volume.lookup(chain.ino, b"one").ino == f.ino
    assert read_all(volume, f.ino) == b""


def test_existing_names_are_eexist(volume: Volume, chain: Inode, file: Inode) -> None:
    with raises_errno(errno.EEXIST):
        mkchain(volume)
    with raises_errno(errno.EEXIST):
        mkfile(volume, chain)


def test_names_longer_than_255_bytes_are_enametoolong(
        volume: Volume, chain: Inode, file: Inode) -> None:
    long = b"x" * 256
    for call in (
        lambda: mkchain(volume, long),
        lambda: mkfile(volume, chain, long),
        lambda: volume.clone(file.ino, chain.ino, long),
        lambda: volume.rename(chain.ino, b"f.swap", chain.ino, long, 0, False),
    ):
        with raises_errno(errno.ENAMETOOLONG):
            call()
    assert mkfile(volume, chain, b"y" * 255).ino


# -- reading and writing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, BS),
        (1, BS),
        (BS - 1, 2),
        (BS, 3 * BS),
        (100, 3 * BS + 17),
        (5 * BS + 7, 10),
    ],
)
def test_write_then_read_at_any_offset(
        volume: Volume, file: Inode, offset: int, length: int) -> None:
    data = block(offset, length)
    assert volume.write(file.ino, offset, data) == length
    assert volume.getattr(file.ino).size == offset + length
    assert volume.read(file.ino, offset, length) == data
    assert read_all(volume, file.ino) == bytes(offset) + data


def test_partial_overwrites_keep_the_surrounding_bytes(volume: Volume, file: Inode) -> None:
    """Read-modify-write of partial blocks patches only the bytes written."""
    model = bytearray(block(1, 4 * BS))
    volume.write(file.ino, 0, bytes(model))
    for offset, length in [(10, 5), (BS - 3, 6), (2 * BS + 1, BS), (4 * BS - 1, 1)]:
        patch = bytes([0xEE]) * length
        volume.write(file.ino, offset, patch)
        model[offset:offset + length] = patch
    assert read_all(volume, file.ino) == model
    assert volume.read(file.ino, BS - 5, 10) == model[BS - 5:BS + 5]


def test_reads_past_the_end_are_short(volume: Volume, file: Inode) -> None:
    size = 2 * BS + 100
    data = block(2, size)
    volume.write(file.ino, 0, data)
    assert volume.read(file.ino, size - 10, 100) == data[-10:]
    assert volume.read(file.ino, size, 10) == b""
    assert volume.read(file.ino, size + 5 * BS, BS) == b""
    assert volume.read(file.ino, 0, 0) == b""


def test_writes_past_the_end_extend_with_zeros(volume: Volume, file: Inode) -> None:
    volume.write(file.ino, 0, b"abc")
    volume.write(file.ino, 3 * BS + 5, b"xyz")
    inode = volume.getattr(file.ino)
    assert inode.size == 3 * BS + 8
    assert read_all(volume, file.ino) == b"abc" + bytes(3 * BS + 2) + b"xyz"
    files = chain_stats(volume)["files"]["f.swap"]
    assert (files["mapped_blocks"], files["zero_blocks"]) == (2, 2)


def test_an_empty_write_changes_nothing(volume: Volume, file: Inode) -> None:
    """POSIX: a write of zero bytes has no other results, so no extension either."""
    volume.write(file.ino, 0, b"data")
    mtime = volume.getattr(file.ino).mtime_ns
    assert volume.write(file.ino, 10 * BS, b"") == 0
    inode = volume.getattr(file.ino)
    assert (inode.size, inode.mtime_ns) == (4, mtime)


def test_all_zero_blocks_store_nothing(volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, bytes(3 * BS))
    volume.write(file.ino, 5 * BS + 11, bytes(BS))  # unaligned: patches two holes
    assert volume.getattr(file.ino).size == 6 * BS + 11
    assert read_all(volume, file.ino) == bytes(6 * BS + 11)
    stats = chain_stats(volume)
    assert stats["stored_bytes"] == 0
    assert stats["files"]["f.swap"]["mapped_blocks"] == 0
    assert next_slot(volume, chain.chain) == 0


def test_overwriting_a_block_with_zeros_unmaps_and_frees_it(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) + block(2))
    slot = slots(volume, chain.chain)
    volume.write(file.ino, BS, bytes(BS))
    assert read_all(volume, file.ino) == block(1) + bytes(BS)
    assert chain_stats(volume)["files"]["f.swap"]["mapped_blocks"] == 1
    assert chain_stats(volume)["stored_bytes"] == BS
    freed = set(slot.values()) - set(slots(volume, chain.chain).values())
    assert len(freed) == 1 and free_slots(volume, chain.chain) == freed


def test_zeroing_part_of_a_block_keeps_it_mapped(volume: Volume, file: Inode) -> None:
    volume.write(file.ino, 0, block(1))
    volume.write(file.ino, 0, bytes(BS - 1))
    assert read_all(volume, file.ino) == bytes(BS - 1) + block(1)[-1:]
    assert chain_stats(volume)["files"]["f.swap"]["mapped_blocks"] == 1


def test_identical_blocks_in_one_chain_are_stored_once(
        volume: Volume, chain: Inode) -> None:
    a = mkfile(volume, chain, b"a")
    b = mkfile(volume, chain, b"b")
    for n in (0, 1, 3, 7):
        volume.write(a.ino, n * BS, block(9))
    volume.write(b.ino, 0, block(9) * 2)
    stats = chain_stats(volume)
    assert stats["unique_blocks"] == 1
    assert stats["stored_bytes"] == BS
    assert stats["logical_bytes"] == 6 * BS
    assert stats["dedup_ratio"] == 6.0
    assert list(refcounts(volume, chain.chain).values()) == [6]
    assert read_all(volume, b.ino) == block(9) * 2


def test_identical_blocks_in_two_chains_are_stored_twice(volume: Volume) -> None:
    """Dedup stops at the chain boundary; the keyed digests differ too."""
    files = [mkfile(volume, mkchain(volume, name)) for name in (b"x", b"y")]
    for f in files:
        volume.write(f.ino, 0, block(5))
    stats = volume.stats()["chains"]
    assert stats["x"]["stored_bytes"] == stats["y"]["stored_bytes"] == BS
    (x_digest,) = refcounts(volume, files[0].chain)
    (y_digest,) = refcounts(volume, files[1].chain)
    assert x_digest != y_digest


def test_negative_offsets_and_sizes_are_einval(volume: Volume, file: Inode) -> None:
    with raises_errno(errno.EINVAL):
        volume.write(file.ino, -1, b"x")
    with raises_errno(errno.EINVAL):
        volume.read(file.ino, -1, 10)
    with raises_errno(errno.EINVAL):
        volume.read(file.ino, 0, -1)
    with raises_errno(errno.EINVAL):
        volume.setattr(file.ino, size=-1)


def test_files_larger_than_max_file_size_are_efbig(volume: Volume, file: Inode) -> None:
    with raises_errno(errno.EFBIG):
        volume.write(file.ino, MAX_FILE_SIZE - 1, b"xy")
    with raises_errno(errno.EFBIG):
        volume.setattr(file.ino, size=MAX_FILE_SIZE + 1)
    assert volume.getattr(file.ino).size == 0


def test_the_last_byte_below_max_file_size_is_writable(volume: Volume, file: Inode) -> None:
    volume.write(file.ino, MAX_FILE_SIZE - 1, b"z")
    assert volume.getattr(file.ino).size == MAX_FILE_SIZE
    assert volume.read(file.ino, MAX_FILE_SIZE - 2, 10) == b"\0z"
    assert chain_stats(volume)["files"]["f.swap"]["mapped_blocks"] == 1


def test_data_calls_on_a_directory_are_eisdir(volume: Volume, chain: Inode) -> None:
    with raises_errno(errno.EISDIR):
        volume.read(chain.ino, 0, 1)
    with raises_errno(errno.EISDIR):
        volume.write(chain.ino, 0, b"x")
    with raises_errno(errno.EISDIR):
        volume.setattr(chain.ino, size=0)


def test_a_corrupt_block_reads_as_eio_never_wrong_data(
        volume: Volume, state_dir: Path, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) + block(2))
    slot = slots(volume, chain.chain)[digest_at(volume, file.ino, 0)]
    with open(data_file(state_dir, chain.chain), "r+b") as f:
        f.seek(slot * BS + 123)
        byte = f.read(1)[0]
        f.seek(slot * BS + 123)
        f.write(bytes([byte ^ 0x01]))
    for offset, length in [(0, 2 * BS), (0, 1), (BS - 1, 2)]:
        with pytest.raises(CorruptBlock) as info:
            volume.read(file.ino, offset, length)
        assert info.value.errno == errno.EIO
    assert volume.read(file.ino, BS, BS) == block(2), "other blocks stay readable"
    # A partial write must read the old block to patch it: that fails too.
    with raises_errno(errno.EIO):
        volume.write(file.ino, 1, b"x")
    # A whole-block overwrite does not need the old data, and repairs the file.
    volume.write(file.ino, 0, block(3))
    assert read_all(volume, file.ino) == block(3) + block(2)


# -- clones ----------------------------------------------------------------------------


def test_clone_shares_every_block(volume: Volume, chain: Inode, file: Inode) -> None:
    content = block(1) + bytes(BS) + block(2) + block(1) + block(3, 100)
    volume.write(file.ino, 0, content)
    before = chain_stats(volume)
    copy = volume.clone(file.ino, chain.ino, b"copy")
    assert copy.size == len(content) and copy.blocks == 4
    assert read_all(volume, copy.ino) == content
    after = chain_stats(volume)
    assert after["stored_bytes"] == before["stored_bytes"] == 3 * BS
    assert after["logical_bytes"] == 2 * before["logical_bytes"]
    uses = map_uses(volume, file.ino, copy.ino)
    assert refcounts(volume, chain.chain) == dict(uses)
    assert sorted(uses.values()) == [2, 2, 4]


def test_writing_a_clone_leaves_its_source_alone(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) + block(2))
    copy = volume.clone(file.ino, chain.ino, b"copy")
    volume.write(copy.ino, 10, b"changed")
    volume.setattr(copy.ino, size=BS)
    assert read_all(volume, file.ino) == block(1) + block(2)
    assert read_all(volume, copy.ino) == block(1)[:10] + b"changed" + block(1)[17:]
    assert refcounts(volume, chain.chain) == dict(map_uses(volume, file.ino, copy.ino))
    assert chain_stats(volume)["unique_blocks"] == 3


def test_clone_of_a_file_with_many_blocks(volume: Volume, chain: Inode, file: Inode) -> None:
    """Enough map entries that LMDB splits pages while the clone's map is written."""
    count = 600
    for n in range(count):
        volume.write(file.ino, n * BS, block(n))
    copy = volume.clone(file.ino, chain.ino, b"copy")
    assert volume.getattr(copy.ino).blocks == count
    assert read_all(volume, copy.ino) == read_all(volume, file.ino)
    assert set(refcounts(volume, chain.chain).values()) == {2}
    assert len(map_uses(volume, copy.ino)) == count


def test_empty_clone_keeps_the_size_and_maps_nothing(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) * 3)
    before = refcounts(volume, chain.chain)
    empty = volume.clone(file.ino, chain.ino, b"empty", empty=True)
    assert empty.size == 3 * BS and empty.blocks == 0
    assert read_all(volume, empty.ino) == bytes(3 * BS)
    assert map_uses(volume, empty.ino) == collections.Counter()
    assert refcounts(volume, chain.chain) == before == {next(iter(before)): 3}


def test_clone_errors(volume: Volume, chain: Inode, file: Inode) -> None:
    other = mkchain(volume, b"other")
    with raises_errno(errno.EXDEV):
        volume.clone(file.ino, other.ino, b"copy")
    with raises_errno(errno.EEXIST):
        volume.clone(file.ino, chain.ino, b"f.swap")
    with raises_errno(errno.EPERM):
        volume.clone(file.ino, ROOT_INO, b"copy")
    with raises_errno(errno.EISDIR):
        volume.clone(chain.ino, chain.ino, b"copy")
    assert [name for name, _ in volume.readdir(chain.ino)] == [b"f.swap"]
    assert volume.readdir(other.ino) == []


# -- truncation -------------------------------------------------------------------------


def test_shrinking_zeroes_the_tail_of_the_last_block(volume: Volume, file: Inode) -> None:
    """Bytes cut off inside the last block must not come back when the file grows."""
    volume.write(file.ino, 0, bytes([0xAB]) * 3 * BS)
    volume.setattr(file.ino, size=BS + 100)
    assert read_all(volume, file.ino) == bytes([0xAB]) * (BS + 100)
    volume.setattr(file.ino, size=3 * BS)
    assert read_all(volume, file.ino) == bytes([0xAB]) * (BS + 100) + bytes(2 * BS - 100)
    # A write past the end after the shrink must not reveal old bytes either.
    volume.setattr(file.ino, size=BS + 50)
    volume.write(file.ino, 2 * BS, b"!")
    assert read_all(volume, file.ino) == bytes([0xAB]) * (BS + 50) + bytes(BS - 50) + b"!"


def test_shrinking_frees_the_blocks_past_the_end(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) + block(2) + block(3))
    volume.setattr(file.ino, size=BS)
    stats = chain_stats(volume)
    assert stats["stored_bytes"] == BS
    assert stats["files"]["f.swap"] == {
        "size": BS, "logical_bytes": BS, "mapped_blocks": 1, "zero_blocks": 0,
        "priority": 0}
    assert len(free_slots(volume, chain.chain)) == 2


def test_shrinking_to_zero_bytes_of_the_last_block_unmaps_it(
        volume: Volume, file: Inode) -> None:
    """A cut that leaves only zeros in the last block turns it into a hole."""
    volume.write(file.ino, 0, bytes(100) + block(1, BS - 100))
    volume.setattr(file.ino, size=50)
    assert read_all(volume, file.ino) == bytes(50)
    assert chain_stats(volume)["stored_bytes"] == 0


def test_growing_maps_nothing(volume: Volume, file: Inode) -> None:
    volume.write(file.ino, 0, b"x")
    volume.setattr(file.ino, size=10 * BS + 1)
    assert read_all(volume, file.ino) == b"x" + bytes(10 * BS)
    files = chain_stats(volume)["files"]["f.swap"]
    assert (files["mapped_blocks"], files["zero_blocks"]) == (1, 10)


# -- unlink, purge and space reclaim ---------------------------------------------------


def roomy(volume: Volume) -> None:
    """Grow the new state's index now: its growth takes a checkpoint (the map
    is resized with no transaction open, the pin included), which would make
    freed slots reusable at a moment the test does not choose."""
    volume.index.grow()


def test_unlink_frees_blocks_whose_refcount_drops_to_zero(
        volume: Volume, state_dir: Path, chain: Inode) -> None:
    roomy(volume)
    a = mkfile(volume, chain, b"a")
    b = mkfile(volume, chain, b"b")
    volume.write(a.ino, 0, block(1) + block(2))
    volume.write(b.ino, 0, block(2))
    only_a = slots(volume, chain.chain)[digest_at(volume, a.ino, 0)]
    usage = disk_usage(state_dir)
    assert usage == 2 * BS
    volume.unlink(chain.ino, b"a", still_open=False)
    with raises_errno(errno.ENOENT):
        volume.getattr(a.ino)
    assert free_slots(volume, chain.chain) == {only_a}
    assert list(refcounts(volume, chain.chain).values()) == [1]
    assert chain_stats(volume)["stored_bytes"] == BS
    assert disk_usage(state_dir) == usage, "the freed slot waits to be punched"
    assert volume.punch_pending() == 0, "not before a checkpoint covers its freeing"
    assert disk_usage(state_dir) == usage
    volume.sync()
    assert volume.punch_pending() == 1
    assert disk_usage(state_dir) == usage - BS, "the freed slot is hole-punched"
    assert read_all(volume, b.ino) == block(2)


def test_a_freed_slot_is_reused(volume: Volume, chain: Inode) -> None:
    roomy(volume)
    a = mkfile(volume, chain, b"a")
    b = mkfile(volume, chain, b"b")
    volume.write(a.ino, 0, block(1))
    volume.write(b.ino, 0, block(2))
    freed = slots(volume, chain.chain)[digest_at(volume, a.ino, 0)]
    volume.unlink(chain.ino, b"a", still_open=False)
    top = next_slot(volume, chain.chain)
    volume.write(b.ino, BS, block(3))  # before a checkpoint: a new slot
    assert slots(volume, chain.chain)[digest_at(volume, b.ino, 1)] == top
    assert next_slot(volume, chain.chain) == top + 1
    assert free_slots(volume, chain.chain) == {freed}
    volume.sync()  # the checkpoint covers the unlink: the slot may be reused
    volume.write(b.ino, 2 * BS, block(4))
    assert next_slot(volume, chain.chain) == top + 1
    assert free_slots(volume, chain.chain) == set()
    assert slots(volume, chain.chain)[digest_at(volume, b.ino, 2)] == freed
    assert read_all(volume, b.ino) == block(2) + block(3) + block(4)


def test_unpunched_slots_are_reused_newest_first_then_punched_ones_then_new(
        volume: Volume, state_dir: Path, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, b"".join(block(n) for n in range(4)))  # slots 0-3
    volume.write(file.ino, 0, bytes(BS))  # frees slot 0...
    assert volume.punch_pending() == 0  # ...which waits for a checkpoint,
    volume.sync()
    assert volume.punch_pending() == 1  # ...and then is punched
    volume.write(file.ino, 2 * BS, bytes(BS))  # frees slot 2, then
    volume.write(file.ino, BS, bytes(BS))  # slot 1: both keep their space
    volume.sync()  # and may be reused once a checkpoint covers their freeing
    assert free_slots(volume, chain.chain) == {0, 1, 2}
    usage = disk_usage(state_dir)
    assert usage == 3 * BS
    taken = []
    for n in range(4):
        volume.write(file.ino, (4 + n) * BS, block(10 + n))
        taken.append(slots(volume, chain.chain)[digest_at(volume, file.ino, 4 + n)])
    assert taken == [1, 2, 0, 4]
    assert disk_usage(state_dir) == usage + 2 * BS, "slots 1 and 2 were still allocated"
    assert free_slots(volume, chain.chain) == set()
    assert volume.punch_pending() == 0


def test_a_sequential_overwrite_reuses_slots_in_file_order(
        volume: Volume, chain: Inode, file: Inode) -> None:
    """Each 64 KiB write takes the slots the one before it freed (a checkpoint
    in between, as the daemon's every second): in ascending order, so that
    the file's blocks stay in runs of consecutive slots (one pread each when
    read back sequentially)."""
    for round_ in range(3):
        for chunk in range(4):
            volume.write(file.ino, chunk * 16 * BS, b"".join(
                block(1000 * round_ + 16 * chunk + n) for n in range(16)))
            volume.sync()
    # 64 slots, and the 16 the first overwrite took before any was free.
    assert next_slot(volume, chain.chain) == 80, "the overwrites reused slots"
    by_digest = slots(volume, chain.chain)
    placed = [by_digest[digest_at(volume, file.ino, n)] for n in range(64)]
    breaks = sum(1 for a, b in zip(placed, placed[1:], strict=False) if b != a + 1)
    assert breaks <= 4, placed


def test_punch_pending_takes_the_oldest_first_within_its_bounds(
        volume: Volume, state_dir: Path, chain: Inode, file: Inode) -> None:
    roomy(volume)
    volume.write(file.ino, 0, b"".join(block(n) for n in range(6)))  # slots 0-5
    for n in (5, 0, 3):
        volume.write(file.ino, n * BS, bytes(BS))
    freed_by_now = time.monotonic()
    volume.write(file.ino, BS, bytes(BS))
    assert disk_usage(state_dir) == 6 * BS
    assert volume.punch_pending() == 0, "nothing before a checkpoint"
    assert disk_usage(state_dir) == 6 * BS
    volume.sync()
    assert volume.punch_pending(2) == 2
    assert [volume.store.holds_data(chain.chain, slot) for slot in range(6)] == [
        False, True, True, True, True, False]
    assert volume.punch_pending(freed_before=freed_by_now) == 1  # slot 3, not slot 1
    assert volume.store.holds_data(chain.chain, 1)
    assert volume.punch_pending() == 1
    assert disk_usage(state_dir) == 2 * BS
    assert read_all(volume, file.ino) == (bytes(2 * BS) + block(2) + bytes(BS) + block(4)
                                          + bytes(BS))


def test_a_slot_is_not_reused_by_the_transaction_that_frees_it(
        volume: Volume, chain: Inode, file: Inode) -> None:
    """One write frees slot 0 (block 0) and stores a new block (block 1): the
    new block goes to a new slot, since slot 0 must keep its data until the
    commit that frees it (docs/write-ordering.md, rule 2). Nor does a later
    transaction reuse it before a checkpoint covers that commit: until then
    the checkpoint's tree still names its block."""
    volume.write(file.ino, 0, block(1))
    volume.write(file.ino, 0, block(2) + block(3))
    assert slots(volume, chain.chain) == {digest_at(volume, file.ino, 0): 1,
                                          digest_at(volume, file.ino, 1): 2}
    assert free_slots(volume, chain.chain) == {0}
    volume.write(file.ino, 2 * BS, block(4))  # a later transaction, before a checkpoint
    assert slots(volume, chain.chain)[digest_at(volume, file.ino, 2)] == 3
    assert free_slots(volume, chain.chain) == {0}
    volume.sync()
    volume.write(file.ino, 3 * BS, block(5))  # one after the checkpoint may reuse it
    assert slots(volume, chain.chain)[digest_at(volume, file.ino, 3)] == 0


def test_a_failed_write_gives_its_slots_back_to_the_pending_punches(
        volume: Volume, state_dir: Path, chain: Inode, file: Inode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    volume.write(file.ino, 0, block(1) + block(2))
    volume.write(file.ino, 0, bytes(2 * BS))  # slots 0 and 1 pending
    volume.sync()  # and ready: the next write takes them
    with monkeypatch.context() as patch:
        def full(chain_id: int, blocks: list[tuple[int, bytes]]) -> None:
            for slot, data in blocks:  # the data lands, then the disk is full
                with open(data_file(state_dir, chain_id), "r+b") as out:
                    out.seek(slot * BS)
                    out.write(data)
            raise SwapfsError(errno.ENOSPC)
        patch.setattr(volume.store, "write_many", full)
        with raises_errno(errno.ENOSPC):
            volume.write(file.ino, 0, block(3) + block(4))
    assert read_all(volume, file.ino) == bytes(2 * BS)
    # What the aborted write changed in memory (the inode's count, the map,
    # the slot table) is forgotten: the volume holds what the index commits.
    assert volume.getattr(file.ino).blocks == 0 and volume.mapped(file.ino) == {}
    assert free_slots(volume, chain.chain) == {0, 1}
    assert volume.opened.pending.slots(chain.chain) == {0, 1}
    volume.sync()
    assert volume.punch_pending() == 2
    assert disk_usage(state_dir) == 0


def test_a_write_retried_after_a_full_map_leaves_no_slot_to_two_blocks(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File A is overwritten by a write whose first attempt finds the
    index's map full after it freed A's old slots and took new ones: the
    attempt aborts and runs again (Volume's retry). Then file B is written.
    No slot the aborted attempt freed or took may end up holding two files'
    blocks: A reads its own bytes, B its own, fsck is clean, and every
    pending slot is a free one."""
    vol = Volume(state_dir)
    try:
        chain = mkchain(vol)
        a, b = mkfile(vol, chain, b"a.swap"), mkfile(vol, chain, b"b.swap")
        vol.write(a.ino, 0, b"".join(block(n) for n in range(8)))
        vol.write(a.ino, 0, bytes(4 * BS))  # four slots pending, four in use
        vol.sync()  # the four may be reused now
        attempts = []
        finish = ChainWrite.finish

        def full_once(change: ChainWrite) -> None:
            attempts.append((list(change.freed), list(change.taken)))
            if len(attempts) == 1:
                raise lmdb.MapFullError("the index's map is full")
            finish(change)

        with monkeypatch.context() as patch:
            patch.setattr(ChainWrite, "finish", full_once)
            new_a = b"".join(block(n) for n in range(100, 108))
            vol.write(a.ino, 0, new_a)
        (freed, taken), _ = attempts
        assert freed and taken, "the aborted attempt freed and took slots"
        new_b = b"".join(block(n) for n in range(200, 216))
        vol.write(b.ino, 0, new_b)
        assert read_all(vol, a.ino) == new_a
        assert read_all(vol, b.ino) == new_b
        pending = vol.opened.pending.slots(chain.chain)
        assert pending <= free_slots(vol, chain.chain)
        assert set(vol.mapped(a.ino).values()).isdisjoint(vol.mapped(b.ino).values())
    finally:
        vol.close()
    assert fsck.check(state_dir).clean


def test_a_truncate_that_fails_on_a_damaged_tail_leaves_its_freed_slots_in_use(
        volume: Volume, state_dir: Path, chain: Inode) -> None:
    """A truncate into the middle of a block unmaps the blocks past the new
    end (freeing their slots), then reads the tail block to zero its rest:
    that block is damaged, so the truncate fails with EIO and aborts. The
    slots it freed are still the file's: a later write of another file
    takes none of them."""
    a, b = mkfile(volume, chain, b"a.swap"), mkfile(volume, chain, b"b.swap")
    old_a = b"".join(block(n) for n in range(8))
    volume.write(a.ino, 0, old_a)
    tail = volume.mapped(a.ino)[3]
    with open(data_file(state_dir, chain.chain), "r+b") as f:
        f.seek(tail * BS + 7)
        byte = f.read(1)[0]
        f.seek(tail * BS + 7)
        f.write(bytes([byte ^ 0x01]))
    with raises_errno(errno.EIO):
        volume.setattr(a.ino, size=3 * BS + 100)
    assert volume.getattr(a.ino).size == 8 * BS
    volume.sync()  # had the slots gone to the pending punches, b could take them now
    new_b = b"".join(block(n) for n in range(200, 216))
    volume.write(b.ino, 0, new_b)
    assert read_all(volume, b.ino) == new_b
    for n in (0, 1, 2, 4, 5, 6, 7):
        assert volume.read(a.ino, n * BS, BS) == block(n)
    assert set(volume.mapped(a.ino).values()).isdisjoint(volume.mapped(b.ino).values())
    assert volume.opened.pending.slots(chain.chain) <= free_slots(volume, chain.chain)


def test_a_fenced_volume_punches_nothing(
        volume: Volume, state_dir: Path, file: Inode) -> None:
    volume.write(file.ino, 0, block(1))
    volume.write(file.ino, 0, block(2))
    volume.sync()  # the freed slot is ready: only the fence keeps it
    volume.index.fence("the lease is lost")
    assert volume.punch_pending() == 0
    assert disk_usage(state_dir) == 2 * BS


def test_close_punches_what_is_pending(state_dir: Path) -> None:
    vol = Volume(state_dir)
    chain = mkchain(vol)
    file = mkfile(vol, chain)
    vol.write(file.ino, 0, block(1) + block(2))
    vol.write(file.ino, 0, block(3))
    assert disk_usage(state_dir) == 3 * BS
    vol.close()
    assert disk_usage(state_dir) == 2 * BS


def test_unlink_while_open_keeps_the_data_until_purge(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1))
    assert volume.unlink(chain.ino, b"f.swap", still_open=True) == file.ino
    with raises_errno(errno.ENOENT):
        volume.lookup(chain.ino, b"f.swap")
    assert volume.is_orphan(file.ino)
    assert read_all(volume, file.ino) == block(1)
    volume.write(file.ino, BS, block(2))
    assert read_all(volume, file.ino) == block(1) + block(2)
    assert chain_stats(volume)["stored_bytes"] == 2 * BS
    volume.purge(file.ino)
    assert not volume.is_orphan(file.ino)
    with raises_errno(errno.ENOENT):
        volume.getattr(file.ino)
    assert chain_stats(volume)["stored_bytes"] == 0
    assert refcounts(volume, chain.chain) == {}


def test_reopening_purges_orphans(state_dir: Path) -> None:
    with closing(Volume(state_dir)) as vol:
        chain = mkchain(vol)
        f = mkfile(vol, chain)
        vol.write(f.ino, 0, block(1) + block(2))
        vol.unlink(chain.ino, b"f.swap", still_open=True)
    with closing(Volume(state_dir)) as vol:
        assert not vol.is_orphan(f.ino)
        with raises_errno(errno.ENOENT):
            vol.getattr(f.ino)
        assert chain_stats(vol)["stored_bytes"] == 0
        assert free_slots(vol, chain.chain) == {0, 1}
    assert disk_usage(state_dir) == 0


def test_unlink_errors(volume: Volume, chain: Inode, file: Inode) -> None:
    with raises_errno(errno.ENOENT):
        volume.unlink(chain.ino, b"missing", still_open=False)
    with raises_errno(errno.EPERM):
        volume.unlink(ROOT_INO, b"chain", still_open=False)
    assert volume.lookup(chain.ino, b"f.swap").ino == file.ino


# -- rename ----------------------------------------------------------------------------


def test_rename_within_a_chain(volume: Volume, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1))
    assert volume.rename(chain.ino, b"f.swap", chain.ino, b"g.swap", 0, False) is None
    assert volume.lookup(chain.ino, b"g.swap").ino == file.ino
    with raises_errno(errno.ENOENT):
        volume.lookup(chain.ino, b"f.swap")
    assert read_all(volume, file.ino) == block(1)


def test_rename_a_chain(volume: Volume, chain: Inode, file: Inode) -> None:
    volume.rename(ROOT_INO, b"chain", ROOT_INO, b"renamed", 0, False)
    assert volume.lookup(ROOT_INO, b"renamed").ino == chain.ino
    assert volume.lookup(chain.ino, b"f.swap").ino == file.ino


def test_rename_errors(volume: Volume, chain: Inode, file: Inode) -> None:
    other = mkchain(volume, b"other")
    mkfile(volume, chain, b"g.swap")
    with raises_errno(errno.EXDEV):
        volume.rename(chain.ino, b"f.swap", other.ino, b"f.swap", 0, False)
    with raises_errno(errno.EPERM):
        volume.rename(chain.ino, b"f.swap", ROOT_INO, b"f.swap", 0, False)
    with raises_errno(errno.EPERM):
        volume.rename(ROOT_INO, b"other", chain.ino, b"other", 0, False)
    with raises_errno(errno.EEXIST):
        volume.rename(chain.ino, b"f.swap", chain.ino, b"g.swap", RENAME_NOREPLACE, False)
    with raises_errno(errno.EINVAL):
        volume.rename(chain.ino, b"f.swap", chain.ino, b"h.swap", RENAME_EXCHANGE, False)
    with raises_errno(errno.ENOENT):
        volume.rename(chain.ino, b"missing", chain.ino, b"h.swap", 0, False)
    assert sorted(name for name, _ in volume.readdir(chain.ino)) == [b"f.swap", b"g.swap"]
    assert volume.readdir(other.ino) == []


def test_rename_over_a_file_frees_its_blocks(volume: Volume, chain: Inode) -> None:
    a = mkfile(volume, chain, b"a")
    b = mkfile(volume, chain, b"b")
    volume.write(a.ino, 0, block(1))
    volume.write(b.ino, 0, block(2) + block(3))
    assert volume.rename(chain.ino, b"a", chain.ino, b"b", 0, False) is None
    assert volume.lookup(chain.ino, b"b").ino == a.ino
    with raises_errno(errno.ENOENT):
        volume.getattr(b.ino)
    assert read_all(volume, a.ino) == block(1)
    assert chain_stats(volume)["stored_bytes"] == BS
    assert len(free_slots(volume, chain.chain)) == 2


def test_rename_over_an_open_file_orphans_it(volume: Volume, chain: Inode) -> None:
    a = mkfile(volume, chain, b"a")
    b = mkfile(volume, chain, b"b")
    volume.write(b.ino, 0, block(2))
    assert volume.rename(chain.ino, b"a", chain.ino, b"b", 0, True) == b.ino
    assert volume.is_orphan(b.ino)
    assert read_all(volume, b.ino) == block(2)
    volume.purge(b.ino)
    assert chain_stats(volume)["stored_bytes"] == 0
    assert volume.lookup(chain.ino, b"b").ino == a.ino


# -- rmdir -----------------------------------------------------------------------------


def test_rmdir_of_a_non_empty_chain_is_enotempty(
        volume: Volume, chain: Inode, file: Inode) -> None:
    with raises_errno(errno.ENOTEMPTY):
        volume.rmdir(ROOT_INO, b"chain")
    assert volume.lookup(ROOT_INO, b"chain").ino == chain.ino


def test_rmdir_with_an_open_orphan_is_ebusy(
        volume: Volume, chain: Inode, file: Inode) -> None:
    volume.unlink(chain.ino, b"f.swap", still_open=True)
    with raises_errno(errno.EBUSY):
        volume.rmdir(ROOT_INO, b"chain")
    volume.purge(file.ino)
    volume.rmdir(ROOT_INO, b"chain")


def test_rmdir_removes_the_chain_and_its_data_file(
        volume: Volume, state_dir: Path, chain: Inode, file: Inode) -> None:
    volume.write(file.ino, 0, block(1) + block(2))
    volume.setattr(file.ino, size=BS)  # leaves a free slot behind
    assert data_file(state_dir, chain.chain).exists()
    volume.unlink(chain.ino, b"f.swap", still_open=False)
    volume.sync()  # both freed slots are ready to be punched
    volume.rmdir(ROOT_INO, b"chain")
    assert not data_file(state_dir, chain.chain).exists()
    assert volume.punch_pending() == 0, "the chain's pending punches went with it"
    assert not data_file(state_dir, chain.chain).exists()
    with raises_errno(errno.ENOENT):
        volume.lookup(ROOT_INO, b"chain")
    with volume.index.begin() as txn:
        assert txn.get_chain(chain.chain) is None
        assert list(txn.iter_slot_runs(chain.chain)) == []
    assert volume.stats()["chains"] == {}


def test_rmdir_of_a_file_is_enotdir(volume: Volume, chain: Inode, file: Inode) -> None:
    with raises_errno(errno.ENOTDIR):
        volume.rmdir(chain.ino, b"f.swap")


# -- the state directory -------------------------------------------------------------


def test_a_second_volume_on_the_same_state_is_ebusy(volume: Volume, state_dir: Path) -> None:
    with raises_errno(errno.EBUSY):
        Volume(state_dir)
    mkchain(volume)  # the first one still works


def test_the_lock_is_released_on_close(state_dir: Path) -> None:
    """Opening again after close() must not fail with EBUSY."""
    Volume(state_dir).close()
    with closing(Volume(state_dir)) as vol:
        assert vol.getattr(ROOT_INO).is_dir


def lasting(chains: dict) -> dict:
    """The chains' figures that outlive the process: not what its slot
    tables hold in memory."""
    return {name: {key: value for key, value in chain.items() if key != "slot_table"}
            for name, chain in chains.items()}


def test_everything_survives_close_and_reopen(state_dir: Path) -> None:
    content = block(1) + bytes(BS) + block(2) + block(1, 77)
    with closing(Volume(state_dir)) as vol:
        chain = mkchain(vol)
        f = mkfile(vol, chain)
        vol.write(f.ino, 0, content)
        vol.clone(f.ino, chain.ino, b"copy")
        vol.clone(f.ino, chain.ino, b"empty", empty=True)
        vol.setattr(f.ino, mode=0o640)
        stats = lasting(vol.stats()["chains"])
        counts = refcounts(vol, chain.chain)
    with closing(Volume(state_dir)) as vol:
        assert read_all(vol, f.ino) == content
        assert read_all(vol, vol.resolve("chain/copy").ino) == content
        assert read_all(vol, vol.resolve("chain/empty").ino) == bytes(len(content))
        assert stat.S_IMODE(vol.getattr(f.ino).mode) == 0o640
        assert lasting(vol.stats()["chains"]) == stats
        assert refcounts(vol, chain.chain) == counts
        # New allocations carry on where the old volume stopped.
        vol.write(f.ino, 0, block(3))
        assert slots(vol, chain.chain)[digest_at(vol, f.ino, 0)] == 3
        assert next_slot(vol, chain.chain) == 4


def test_disk_usage_tracks_stored_bytes(volume: Volume, state_dir: Path) -> None:
    """Data files occupy exactly the stored blocks once a checkpoint let the
    pending punches run: holes for zeros, punched frees."""
    a_chain, b_chain = mkchain(volume, b"a"), mkchain(volume, b"b")
    a, b = mkfile(volume, a_chain), mkfile(volume, b_chain)

    def check() -> None:
        volume.sync()
        volume.punch_pending()
        stats = volume.stats()["chains"]
        stored = sum(c["stored_bytes"] for c in stats.values())
        assert disk_usage(state_dir) == stored
        for c in stats.values():
            assert c["disk_bytes"] == c["stored_bytes"]

    volume.write(a.ino, 0, b"".join(block(n) for n in range(8)))
    check()
    volume.write(b.ino, 0, block(1) * 4 + bytes(4 * BS))
    check()
    volume.write(a.ino, 2 * BS, bytes(3 * BS))
    check()
    volume.clone(a.ino, a_chain.ino, b"copy")
    volume.setattr(a.ino, size=BS + 1)
    check()
    volume.unlink(a_chain.ino, b"copy", still_open=False)
    check()
    assert chain_stats(volume, "a")["stored_bytes"] == 2 * BS
    volume.write(b.ino, 0, block(2))
    check()


def a_free_slot_holding_data(state: Path, clean: bool) -> tuple[Path, int, int]:
    """A state whose chain's slot 0 is free but holds data, as a crash between
    a commit and its hole punch leaves it: closed cleanly, or not (no clean
    mark). Its data file, chain id and file's inode."""
    vol = Volume(state)
    chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
    vol.write(file.ino, 0, b"\1" * BLOCK_SIZE + b"\2" * BLOCK_SIZE)
    vol.write(file.ino, 0, b"\3" * BLOCK_SIZE)  # into slot 2; slot 0 is freed
    data_file = vol.store.path(chain.chain)
    vol.close()  # punches slot 0
    with open(data_file, "r+b") as data:
        data.write(b"\1" * BLOCK_SIZE)  # as if the punch had never happened
    if not clean:
        (state / "index.lmdb" / "clean").unlink()  # nor the clean close
    assert data_file.stat().st_blocks * 512 == 3 * BLOCK_SIZE
    return data_file, chain.chain, file.ino


def test_reopening_punches_free_slots_that_hold_data(state_dir: Path) -> None:
    """After a stop with no clean mark, the open's scan puts a free slot in the
    pending punches: punched once a checkpoint covers the state that says it
    is free, not before."""
    data_file, chain_id, ino = a_free_slot_holding_data(state_dir, clean=False)
    with closing(Volume(state_dir)) as vol:
        assert vol.opened.pending.slots(chain_id) == {0}
        assert vol.punch_pending() == 0, "not before a checkpoint"
        assert data_file.stat().st_blocks * 512 == 3 * BLOCK_SIZE
        vol.sync()
        assert vol.punch_pending() == 1
        assert data_file.stat().st_blocks * 512 == 2 * BLOCK_SIZE
        assert read_all(vol, ino) == b"\3" * BLOCK_SIZE + b"\2" * BLOCK_SIZE
    assert fsck.check(state_dir).clean


def test_reopening_after_a_crash_punches_free_slots_at_close(state_dir: Path) -> None:
    """A close checkpoints, then punches what the scan found."""
    data_file, _, _ = a_free_slot_holding_data(state_dir, clean=False)
    Volume(state_dir).close()
    assert data_file.stat().st_blocks * 512 == 2 * BLOCK_SIZE


def test_after_a_clean_close_free_slots_are_punched_too(state_dir: Path) -> None:
    """A clean close punches what its process knew free, but a scan it had
    not finished may have left free slots it never knew: the open's scan
    puts every free slot it finds in the pending punches, ready at once
    (every commit is durable after a clean close), punched at the next
    round; then the slot is handed out as a punched free one."""
    data_file, chain_id, ino = a_free_slot_holding_data(state_dir, clean=True)
    with closing(Volume(state_dir)) as vol:
        assert vol.opened.pending.slots(chain_id) == {0}
        assert vol.punch_pending() == 1, "no checkpoint needed"
        assert data_file.stat().st_blocks * 512 == 2 * BLOCK_SIZE
        vol.write(ino, 2 * BS, b"\4" * BS)
        assert vol.mapped(ino)[2] == 0


# -- the index's map -------------------------------------------------------------------


def index_file(state: Path) -> os.stat_result:
    return (state / "index.lmdb" / "data.mdb").stat()


def test_the_index_file_has_no_holes(volume: Volume, state_dir: Path) -> None:
    """LMDB writes through a shared map: a hole there on a full disk would be
    SIGBUS, so the file is the map's size and allocated in full."""
    info = index_file(state_dir)
    assert info.st_size == volume.index.map_size
    assert info.st_size % MAP_STEP == 0
    assert info.st_blocks * 512 >= info.st_size


#: Blocks of a file whose map takes about 80 KiB: 24 clones fill 2 MiB.
MANY = 20480


@pytest.mark.parametrize("ahead", [True, False])
def test_the_index_grows_when_its_map_is_full(
        state_dir: Path, ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ahead of need, or (without that) when a transaction finds the map
    full: that one runs again once the map has grown."""
    vol = Volume(state_dir)
    chain = mkchain(vol)
    source = mkfile(vol, chain)
    vol.write(source.ino, 0, block(1) * MANY)  # one block, MANY map entries
    size = vol.index.map_size
    grown = []
    grow = vol.index.grow

    def counted() -> None:
        grown.append(vol.index.map_size)
        grow()

    monkeypatch.setattr(vol.index, "grow", counted)
    if not ahead:
        monkeypatch.setattr(vol.index, "keep_room", lambda: None)
    clones = [vol.clone(source.ino, chain.ino, b"clone%d" % n) for n in range(24)]
    assert grown and vol.index.map_size > size, "about 2 MiB of map runs"
    info = index_file(state_dir)
    assert info.st_size == vol.index.map_size and info.st_blocks * 512 >= info.st_size
    assert refcounts(vol, chain.chain) == {digest_at(vol, source.ino, 0): 25 * MANY}
    assert read_all(vol, clones[-1].ino) == block(1) * MANY
    size = vol.index.map_size
    vol.close()
    with closing(Volume(state_dir)) as again:
        assert again.index.map_size >= size
        assert read_all(again, clones[-1].ino) == block(1) * MANY
    assert fsck.check(state_dir).clean


def test_an_index_with_no_room_to_grow_answers_enospc(
        volume: Volume, chain: Inode, file: Inode, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    volume.write(file.ino, 0, block(1) * MANY)
    size = volume.index.map_size
    monkeypatch.setattr(index_module, "preallocate", full)
    with raises_errno(errno.ENOSPC):
        for n in range(24):
            volume.clone(file.ino, chain.ino, b"clone%d" % n)
    assert volume.index.map_size == size
    made = len(volume.readdir(chain.ino)) - 1
    assert 0 < made < 24, "the clone that found the map full did not happen"
    monkeypatch.undo()
    volume.clone(file.ino, chain.ino, b"at last")
    assert refcounts(volume, chain.chain) == {digest_at(volume, file.ino, 0): (made + 2) * MANY}


def test_a_takeover_never_creates_a_new_state(tmp_path: Path) -> None:
    """Without *create*, a missing or empty index is ENOENT, never a new state."""
    with pytest.raises(SwapfsError) as missing:
        Volume(tmp_path / "none", create=False)
    assert missing.value.errno == errno.ENOENT and not (tmp_path / "none").exists()
    (tmp_path / "empty" / "index.lmdb").mkdir(parents=True)
    lmdb.open(str(tmp_path / "empty" / "index.lmdb")).close()  # a data.mdb with no swapfs
    with pytest.raises(SwapfsError) as empty:
        Volume(tmp_path / "empty", create=False)
    assert empty.value.errno == errno.ENOENT
    Volume(tmp_path / "real").close()
    Volume(tmp_path / "real", create=False).close()


def test_lmdb_finding_a_damaged_page_is_eio(
        volume: Volume, chain: Inode, file: Inode, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMDB's own errors on a damaged page (what a flipped bit in a branch
    page gives) reach the caller as EIO, like a record that does not verify."""
    volume.write(file.ino, 0, block(1))

    def damaged(*args: Any, **kwargs: Any) -> None:
        raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type")

    volume.index.inode_cache.clear()
    monkeypatch.setattr(index_module, "verified", damaged)
    with raises_errno(errno.EIO):
        volume.getattr(file.ino)
