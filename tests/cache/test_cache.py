"""The block cache, its manifest and warming, engine-level (no mount).

The read path is driven through a Volume with the content cache on; every
figure expected here can be counted on paper.
"""

import errno
import os
import random
import stat
from pathlib import Path

import blake3
import pytest

from swapfs.cache import (
    MAX_OWNERS,
    BlockCache,
    CacheEntry,
    ManifestError,
    hottest_first,
    max_size,
    parse,
    read_manifest,
    serialize,
    warm,
)
from swapfs.engine import BLOCK_SIZE, ROOT_INO, CorruptBlock, Volume, cache_key

BS = BLOCK_SIZE


def key(number: int) -> bytes:
    return cache_key(1, number.to_bytes(16, "big"))


def admit(cache: BlockCache, number: int, ino: int = 0) -> None:
    """Offer a block twice: admission is on the second miss."""
    for _ in range(2):
        cache.offer(key(number), bytes([number % 256]) * BS, ino)


def test_the_budget_is_never_exceeded() -> None:
    cache = BlockCache(range(8))
    rng = random.Random(3)
    for _ in range(2000):
        number = rng.randrange(40)
        if cache.get(key(number)) is None:
            cache.offer(key(number), b"x" * BS)
        assert len(cache) <= 8
    stats = cache.stats()
    assert stats["used_bytes"] == 8 * BS == stats["capacity_bytes"]
    assert stats["admissions"] - stats["evictions"] == 8


def test_figures_follow_a_known_sequence_of_reads() -> None:
    cache = BlockCache(range(2))
    looks = []
    for number in (1, 1, 1, 2, 2, 3, 3, 1):  # get, and offer on a miss
        hit = cache.get(key(number)) is not None
        looks.append(hit)
        if not hit:
            cache.offer(key(number), b"d" * BS)
    # 1: miss, miss (admitted), hit. 2: miss, miss (admitted). 3: miss, miss
    # (admitted, evicts 1, the least recent). 1: miss again.
    assert looks == [False, False, True, False, False, False, False, False]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["admissions"], stats["evictions"]) == (
        1, 7, 3, 1)
    assert stats["chains"] == {1: 2 * BS}


def test_the_content_cache_admits_on_the_first_miss() -> None:
    cache = BlockCache(range(2), admit_first_miss=True)
    looks = []
    for number in (1, 1, 2, 1, 3, 1, 3):  # get, and offer on a miss
        hit = cache.get(key(number)) is not None
        looks.append(hit)
        if not hit:
            cache.offer(key(number), b"d" * BS)
    # 1: miss (admitted), hit. 2: miss (admitted). 1: hit. 3: miss (admitted,
    # evicts 2, the least recent). 1: hit. 3: hit.
    assert looks == [False, True, False, True, False, True, True]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["admissions"], stats["evictions"]) == (
        4, 3, 3, 1)


def test_the_admission_window_holds_one_to_two_generations_of_misses() -> None:
    cache = BlockCache(range(4))  # a generation is 1024 keys (the minimum)
    cache.offer(key(0), b"a" * BS)
    for number in range(1, 1024):  # the first generation fills
        cache.offer(key(number), b"b" * BS)
    cache.offer(key(0), b"a" * BS)  # still remembered: admitted
    assert key(0) in cache
    cache.offer(key(5000), b"c" * BS)
    for number in range(5001, 5001 + 2048):  # two generations of other misses
        cache.offer(key(number), b"d" * BS)
    cache.offer(key(5000), b"c" * BS)  # forgotten: a first miss again
    assert key(5000) not in cache and cache.stats()["admissions"] == 1


def test_an_admission_into_a_full_cache_takes_the_evicted_slot() -> None:
    cache = BlockCache([7, 9])
    admit(cache, 1)
    admit(cache, 2)
    for number in range(3, 6):  # each evicts the least recent
        admit(cache, number)
        assert len(cache) == 2 and cache.free_blocks == 0
    assert key(3) not in cache and cache.get(key(5)) == bytes([5]) * BS
    assert sorted(block.slot for block in cache._blocks.values()) == [7, 9]
    cache.set_slots([9])  # the block in slot 7 goes, the one in slot 9 stays
    assert len(cache) == 1 and cache.revocations == 1 and cache.free_blocks == 0
    other = cache_key(2, (1).to_bytes(16, "big"))
    cache.set_slots([9, 11])
    for _ in range(2):
        cache.offer(other, b"o" * BS)
    assert cache.stats()["chains"] == {1: BS, 2: BS}


def test_heat_counts_reads_and_halves_each_era() -> None:
    cache = BlockCache(range(4))
    admit(cache, 1, ino=10)
    for ino in range(10, 20):  # ten hits by ten files
        assert cache.get(key(1), ino) is not None
    (entry,) = cache.entries({11: 5, 12: -3})
    assert entry.heat == 11 and entry.owners == (10, 11, 12, 13)
    assert len(entry.owners) == MAX_OWNERS and entry.priority == 5
    for _ in range(1024):  # one era of look-ups (the minimum) ends
        cache.get(key(2))
    assert cache.entries()[0].heat == 5


def test_inserting_fills_free_slots_only() -> None:
    cache = BlockCache(range(1))
    assert cache.insert(key(1), b"a" * BS, 7, (3,))
    assert not cache.insert(key(2), b"b" * BS, 9, (3,))
    assert cache.entries() == [CacheEntry(1, key(1)[4:], 7, (3,), 0)]


# -- through a volume ------------------------------------------------------------------


def make_chain(volume: Volume, blocks: list[bytes], clones: int = 0) -> tuple[int, list[int]]:
    """A chain with a file holding *blocks* and *clones* instant copies of it."""
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    file = volume.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
    volume.write(file.ino, 0, b"".join(blocks))
    copies = [volume.clone(file.ino, chain.ino, f"v{n}".encode()).ino for n in range(clones)]
    return chain.chain, [file.ino, *copies]


def test_a_block_shared_by_many_clones_is_cached_once(volume: Volume) -> None:
    content = BlockCache(range(16))
    volume.use_caches(content=content)
    data = random.Random(1).randbytes(BS)
    _chain, files = make_chain(volume, [data], clones=20)
    for ino in files:
        assert volume.read(ino, 0, BS) == data
    assert len(content) == 1
    (entry,) = content.entries()
    assert entry.owners == tuple(files[1:1 + MAX_OWNERS])  # the first miss did not admit
    stats = content.stats()
    assert (stats["hits"], stats["misses"], stats["admissions"]) == (19, 2, 1)


def test_an_overwritten_block_reads_its_new_content(volume: Volume) -> None:
    volume.use_caches(content=BlockCache(range(16)))
    old, new = b"o" * BS, b"n" * BS
    _chain, (ino,) = make_chain(volume, [old, old])
    for _ in range(3):
        assert volume.read(ino, 0, 2 * BS) == old * 2
    volume.write(ino, BS, new)
    assert volume.read(ino, BS, BS) == new
    assert volume.read(ino, 0, 2 * BS) == old + new


def test_a_corrupt_block_is_eio_and_never_admitted(volume: Volume) -> None:
    content = BlockCache(range(16))
    volume.use_caches(content=content)
    chain_id, (ino,) = make_chain(volume, [b"a" * BS, b"b" * BS])
    path = volume.state / "data" / f"{chain_id}.blocks"
    raw = bytearray(path.read_bytes())
    raw[BS + 9] ^= 1
    path.write_bytes(bytes(raw))
    for _ in range(3):
        with pytest.raises(CorruptBlock):
            volume.read(ino, BS, BS)
        with pytest.raises(CorruptBlock):
            volume.read(ino, 0, 2 * BS)
    assert len(content) == 1  # block 0, read three times whole; never block 1
    assert content.stats()["chains"] == {chain_id: BS}
    assert volume.read(ino, 0, BS) == b"a" * BS


def test_warming_loads_hottest_first_and_skips_what_is_gone_or_corrupt(
        volume: Volume) -> None:
    blocks = [bytes([n + 1]) * BS for n in range(6)]
    first = BlockCache(range(8))
    volume.use_caches(content=first)
    chain_id, (ino,) = make_chain(volume, blocks)
    for number in range(6):
        for _ in range(2 + number):  # block n is read 2 + n times
            volume.read(ino, number * BS, BS)
    entries = parse(serialize(first.entries(), {}))
    assert [entry.heat for entry in entries] == [6, 5, 4, 3, 2, 1]
    volume.write(ino, 5 * BS, b"z" * BS)  # the hottest block is gone from the store
    fresh = BlockCache(range(3))
    assert warm(volume, fresh, hottest_first(reversed(entries))) == 3
    assert sorted(entry.heat for entry in fresh.entries()) == [3, 4, 5]
    prefixes = [CacheEntry(entry.chain, entry.digest[:8], entry.heat, entry.owners)
                for entry in entries]
    budgeted = BlockCache(range(8))
    assert warm(volume, budgeted, prefixes, budget=2 * BS) == 2
    assert [entry.digest for entry in budgeted.entries()] == [e.digest for e in entries[1:3]]
    volume.use_caches(content=budgeted)
    hits = budgeted.hits
    assert volume.read(ino, 4 * BS, BS) == blocks[4] and budgeted.hits == hits + 1


# -- the manifest -----------------------------------------------------------------------


def sample_entries() -> list[CacheEntry]:
    return [
        CacheEntry(1, bytes(range(16)), 9, (10, 11), 4),
        CacheEntry(1, bytes(range(1, 17)), 3, (10, 11), 4),
        CacheEntry(1, bytes(16), 0, (), 0),
        CacheEntry(7, b"\xff" * 16, 2**32 - 1, (12, 13, 14, 15), 0),
    ]


SAMPLE_PRIORITIES = {10: 4, 11: -2, 12: -1}


def test_a_manifest_round_trips_in_at_most_32_bytes_per_block() -> None:
    entries = sample_entries()
    raw = serialize(entries, SAMPLE_PRIORITIES)
    assert parse(raw) == entries
    assert parse(serialize([], {})) == []
    many = [CacheEntry(1, n.to_bytes(16, "big"), n, (n % 4,)) for n in range(1000)]
    assert len(serialize(many, {})) - len(serialize([], {})) <= 32 * 1000 + 4 * 12 + 8


def test_every_truncation_of_a_manifest_is_refused() -> None:
    raw = serialize(sample_entries(), SAMPLE_PRIORITIES)
    for length in range(len(raw)):
        with pytest.raises(ManifestError):
            parse(raw[:length])
    with pytest.raises(ManifestError):
        parse(raw + b"\0")


def test_every_bit_flip_of_a_manifest_is_refused() -> None:
    raw = serialize(sample_entries(), SAMPLE_PRIORITIES)
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ManifestError):
            parse(bytes(flipped))


@pytest.mark.parametrize("offset, value, why", [(0, b"SWFSXMAN", "magic"),
                                               (8, b"\0\0\0\2", "version")])
def test_a_wrong_magic_or_version_is_refused(offset: int, value: bytes, why: str) -> None:
    raw = bytearray(serialize(sample_entries(), SAMPLE_PRIORITIES))
    raw[offset:offset + len(value)] = value
    raw[-32:] = blake3.blake3(bytes(raw[:-32])).digest()  # a valid checksum
    with pytest.raises(ManifestError, match=why):
        parse(bytes(raw))


def test_garbage_is_refused(tmp_path: Path) -> None:
    for size in (0, 64, 4096):
        with pytest.raises(ManifestError):
            parse(random.Random(size).randbytes(size))


# -- reading a manifest from disk: as root, locked in memory, maybe a peer's ------------


def worst_case(blocks: int) -> list[CacheEntry]:
    """Blocks that take the most bytes each: a chain, an owner set and four
    files of their own."""
    return [CacheEntry(n, n.to_bytes(16, "big"), 1, tuple(range(4 * n, 4 * n + 4)))
            for n in range(blocks)]


def test_the_size_bound_is_what_the_worst_manifest_of_that_many_blocks_takes(
        tmp_path: Path) -> None:
    path = tmp_path / "cache.manifest"
    for blocks in (0, 1, 7, 300):
        raw = serialize(worst_case(blocks), {})
        assert len(raw) == max_size(blocks)
        path.write_bytes(raw)
        assert read_manifest(path, blocks) == worst_case(blocks)
        if blocks:
            with pytest.raises(ManifestError, match="more than a manifest"):
                read_manifest(path, blocks - 1)


def test_a_small_manifest_of_too_many_blocks_is_refused(tmp_path: Path) -> None:
    """One chain, one owner set: 24 bytes a block, within the size bound of
    fewer blocks, still more blocks than the budget holds."""
    path = tmp_path / "cache.manifest"
    path.write_bytes(serialize([CacheEntry(1, n.to_bytes(16, "big"), 1, (5,))
                                for n in range(100)], {}))
    assert len(read_manifest(path, 100)) == 100
    with pytest.raises(ManifestError, match="holds 100 blocks, more than the 99"):
        read_manifest(path, 99)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """Not even to a good manifest; /dev/zero would be read forever."""
    good = tmp_path / "good"
    good.write_bytes(serialize(sample_entries(), {}))
    for target in (good, Path("/dev/zero")):
        link = tmp_path / "cache.manifest"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(OSError) as refused:
            read_manifest(link, 1 << 20)
        assert refused.value.errno == errno.ELOOP


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "cache.manifest"
    os.mkfifo(fifo)  # nobody ever opens it to write: an open that waited would never end
    for path in (fifo, Path("/dev/zero"), Path("/dev/null")):
        with pytest.raises(ManifestError, match="not a regular file"):
            read_manifest(path, 1 << 20)


def test_an_oversize_file_is_refused_unread(tmp_path: Path) -> None:
    """300 MiB (sparse: nothing to write) against a budget of 16384 blocks:
    refused from its size; were it read, the refusal would take the 300 MiB."""
    path = tmp_path / "cache.manifest"
    with open(path, "wb") as big:
        big.truncate(300 << 20)
    with pytest.raises(ManifestError, match=f"is {300 << 20} bytes, more than"):
        read_manifest(path, 16384)


def test_a_manifest_of_another_owner_is_refused_when_the_owner_is_asked(
        tmp_path: Path) -> None:
    path = tmp_path / "cache.manifest"
    path.write_bytes(serialize(sample_entries(), {}))
    os.chown(path, 65534, 65534)
    assert len(read_manifest(path, 10)) == len(sample_entries())  # owner not asked
    with pytest.raises(ManifestError, match="belongs to uid 65534, not 0"):
        read_manifest(path, 10, owner=0)
