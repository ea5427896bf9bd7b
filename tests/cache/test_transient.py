"""The transient cache: capacity from reported extents, admission, revocation.

Engine-level: extents are built by hand here (the scan that finds them in
real processes is tested in test_codescan.py), so every expected slot and
capacity can be computed on paper.
"""

import random
import stat
from pathlib import Path

from swapfs.cache import TransientCache
from swapfs.control import Extent
from swapfs.engine import BLOCK_SIZE, ROOT_INO, Volume

BS = BLOCK_SIZE


def extent(length: int, inode: int = 1, segment: int = 0, part: str = "tail",
           pid: int = 100) -> Extent:
    return Extent(pid=pid, path=f"/bin/prog{inode}", device="fe:00", inode=inode,
                  address=0x1000, length=length, segment=segment, part=part)


def key(number: int) -> bytes:
    return number.to_bytes(20, "big")


def fill(cache: TransientCache, count: int) -> None:
    """Admit *count* blocks (each offered twice: admission is on second access)."""
    for number in range(count):
        cache.offer(key(number), bytes([number]) * BS)
        cache.offer(key(number), bytes([number]) * BS)


def test_capacity_is_the_physical_total_in_whole_blocks() -> None:
    cache = TransientCache(max_bytes=1 << 30)
    grant = cache.update("vm1", [extent(5000, inode=1), extent(3192, inode=2),
                                 extent(100, inode=3)])
    # Segments laid end to end: [0, 5000) [5000, 8192) [8192, 8292): two whole slots.
    assert cache.capacity_bytes == 2 * BS
    assert cache.stats()["physical_bytes"] == 8292
    assert grant.capacity_bytes == 8292 and grant.driver == "vm1" and len(grant.token) == 32


def test_a_file_mapped_by_many_processes_counts_once() -> None:
    cache = TransientCache(max_bytes=1 << 30)
    cache.update("vm1", [extent(BS, pid=pid) for pid in (1, 2, 3)])
    assert cache.stats()["physical_bytes"] == BS
    cache.update("vm2", [extent(BS, pid=7)])  # the same file in another guest is other memory
    assert cache.stats()["physical_bytes"] == 2 * BS


def test_capacity_is_bounded_by_the_configured_maximum() -> None:
    cache = TransientCache(max_bytes=3 * BS + 100)
    cache.update("vm1", [extent(BS, inode=inode) for inode in range(10)])
    assert cache.capacity_bytes == 3 * BS
    fill(cache, 10)
    assert cache.stats()["used_bytes"] == 3 * BS


def test_blocks_are_admitted_on_their_second_access() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    cache.update("vm1", [extent(4 * BS)])
    cache.offer(key(1), b"a" * BS)
    assert cache.get(key(1)) is None
    cache.offer(key(1), b"a" * BS)
    assert cache.get(key(1)) == b"a" * BS
    assert cache.stats()["admissions"] == 1 and cache.stats()["hits"] == 1


def test_the_least_recently_used_block_is_evicted() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    cache.update("vm1", [extent(2 * BS)])
    fill(cache, 2)
    assert cache.get(key(0)) is not None  # block 1 is now the least recent
    cache.offer(key(2), b"c" * BS)
    cache.offer(key(2), b"c" * BS)
    assert cache.get(key(1)) is None
    assert cache.get(key(0)) is not None and cache.get(key(2)) is not None
    assert cache.stats()["evictions"] == 1


def test_a_shrinking_report_drops_exactly_the_blocks_in_its_segments() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    a, b, c = extent(BS, inode=1), extent(BS, inode=2), extent(BS, inode=3)
    cache.update("vm1", [a, b, c])  # slots 0, 1, 2
    fill(cache, 3)  # the free list hands out slot 0, 1, 2 in order
    cache.update("vm1", [a, c])  # the process mapping inode 2 exited
    assert cache.capacity_bytes == 2 * BS
    assert [cache.get(key(number)) is not None for number in range(3)] == [True, False, True]
    assert cache.stats()["revocations"] == 1
    # The freed capacity is gone with the segment; a new block must evict.
    cache.offer(key(9), b"z" * BS)
    cache.offer(key(9), b"z" * BS)
    assert cache.stats()["used_bytes"] == 2 * BS


def test_a_block_across_two_segments_goes_with_either() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    half = BS // 2
    cache.update("vm1", [extent(half, inode=1), extent(half, inode=2)])
    assert cache.capacity_bytes == BS
    fill(cache, 1)
    cache.update("vm1", [extent(half, inode=2)])
    assert cache.get(key(0)) is None and cache.capacity_bytes == 0


def test_revoking_a_driver_empties_its_share() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    cache.update("vm1", [extent(2 * BS, inode=1)])
    cache.update("vm2", [extent(2 * BS, inode=2)])
    fill(cache, 4)
    cache.revoke("vm1")
    assert cache.capacity_bytes == 2 * BS
    assert sum(cache.get(key(number)) is not None for number in range(4)) == 2
    assert cache.token_of("vm1") is None and "vm1" not in cache.stats()["drivers"]
    assert cache.stats()["revocations"] == 2


def test_held_slots_come_out_of_the_share_and_go_with_it() -> None:
    cache = TransientCache(max_bytes=1 << 20)
    cache.update("vm1", [extent(3 * BS, inode=1)])
    cache.update("vm2", [extent(2 * BS, inode=2)])
    fill(cache, 5)
    cache.hold("vm1", 2)  # the driver manager keeps records in two slots
    assert cache.capacity_bytes == 3 * BS and cache.stats()["revocations"] == 2
    assert cache.share_slots("vm1") == 3
    assert cache.share_slots("vm1", [extent(BS, inode=5)]) == 1  # a report not yet made
    assert cache.share_slots("vm1") == 3
    cache.hold("vm1", 9)  # never more than the share
    assert cache.capacity_bytes == 2 * BS
    cache.update("vm1", [extent(3 * BS, inode=1)], held_slots=1)
    assert cache.capacity_bytes == 4 * BS
    cache.update("vm1", [extent(3 * BS, inode=1), extent(BS, inode=3)])  # held as before
    assert cache.capacity_bytes == 5 * BS
    cache.revoke("vm1")
    cache.update("vm1", [extent(BS, inode=4)])  # a new registration holds nothing
    assert cache.capacity_bytes == 3 * BS


def _volume_with_blocks(state: Path, count: int) -> tuple[Volume, int, list[bytes]]:
    volume = Volume(state)
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    file = volume.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
    blocks = [random.Random(number).randbytes(BS) for number in range(count)]
    volume.write(file.ino, 0, b"".join(blocks))
    return volume, file.ino, blocks


def test_a_skewed_read_workload_hits_and_reads_stay_right(tmp_path: Path) -> None:
    volume, ino, blocks = _volume_with_blocks(tmp_path / "state", 512)
    cache = TransientCache(max_bytes=1 << 20)
    cache.update("vm1", [extent(64 * BS)])
    volume.use_caches(transient=cache)
    rng = random.Random(7)
    for _ in range(4000):  # 90% of reads go to 10% of the blocks
        number = rng.randrange(51) if rng.random() < 0.9 else rng.randrange(512)
        assert volume.read(ino, number * BS, BS) == blocks[number]
    assert volume.read(ino, 0, 8 * BS) == b"".join(blocks[:8])  # multi-block path
    stats = volume.stats()["transient_cache"]
    assert stats["hits"] > 2 * stats["misses"]
    assert stats["used_bytes"] == 64 * BS
    cache.revoke("vm1")  # write-through: dropping every block loses nothing
    assert all(volume.read(ino, number * BS, BS) == blocks[number] for number in range(512))
    volume.close()
