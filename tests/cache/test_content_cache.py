"""The content cache and file priorities through a real mount.

One daemon with a small content cache and a short manifest interval; the
figures come from ``swapfs stats --json``, the reads use O_DIRECT so that
the daemon, not the page cache, answers them.
"""

import os
import random
from collections.abc import Iterator

import pytest

from swapfs.cache import read_manifest
from tests.mounting import (
    BLOCK,
    Mount,
    aligned_buffer,
    mounted,
    read_direct,
    remove_tree,
    requires_mount,
    short_tempdir,
    swapfs,
    wait_until,
)

pytestmark = [requires_mount, pytest.mark.mount]

BUDGET_BLOCKS = 64


@pytest.fixture
def cached() -> Iterator[Mount]:
    """A mount whose content cache holds 64 blocks; manifest every 0.2 s."""
    root = short_tempdir()
    config = root / "swapfs.toml"
    config.write_text(f"content_cache_bytes = {BUDGET_BLOCKS * BLOCK}\n"
                      "manifest_interval = 0.2\n")
    try:
        with mounted(root=root, config=config) as mount:
            yield mount
    finally:
        remove_tree(root)


def content(mount: Mount) -> dict[str, int]:
    figures: dict[str, int] = mount.stats()["content_cache"]
    return figures


def test_reads_are_right_and_counted_and_clones_share_one_entry(cached: Mount) -> None:
    os.mkdir(cached.path("web"))
    data = random.Random(5).randbytes(16 * BLOCK)
    cached.path("web", "base").write_bytes(data)
    for number in range(9):
        swapfs("clone", str(cached.path("web", "base")), str(cached.path("web", f"vm{number}")))
    before = content(cached)
    # Block 0 of every clone: one miss (admitted), eight hits.
    for number in range(9):
        assert read_direct(cached.path("web", f"vm{number}"), 0, BLOCK) == data[:BLOCK]
    after = content(cached)
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 8
    assert after["admissions"] - before["admissions"] == 1
    assert after["chains"] == {"web": BLOCK}
    # Everything reads back, over and over, past the budget; never above it.
    for _ in range(3):
        for number in range(9):
            assert read_direct(cached.path("web", f"vm{number}"), 0, 16 * BLOCK) == data
    figures = content(cached)
    assert figures["capacity_bytes"] == BUDGET_BLOCKS * BLOCK
    assert 0 < figures["used_bytes"] <= figures["capacity_bytes"]
    # An overwrite reads back its new content, not the cached old one.
    fresh = random.Random(6).randbytes(BLOCK)
    fd = os.open(cached.path("web", "vm3"), os.O_WRONLY | os.O_DIRECT)
    try:
        buffer = aligned_buffer(BLOCK)
        buffer[:] = fresh
        assert os.pwrite(fd, buffer, 0) == BLOCK
    finally:
        os.close(fd)
    assert read_direct(cached.path("web", "vm3"), 0, 2 * BLOCK) == fresh + data[BLOCK:2 * BLOCK]
    assert read_direct(cached.path("web", "vm4"), 0, BLOCK) == data[:BLOCK]


def test_the_manifest_is_written_and_warms_a_restart(cached: Mount) -> None:
    os.mkdir(cached.path("c"))
    data = random.Random(7).randbytes(8 * BLOCK)
    cached.path("c", "f").write_bytes(data)
    for _ in range(3):
        assert read_direct(cached.path("c", "f"), 0, 8 * BLOCK) == data
    manifest = cached.state / "cache.manifest"
    assert wait_until(lambda: manifest.exists()
                      and len(read_manifest(manifest, BUDGET_BLOCKS)) == 8)
    swapfs("priority", str(cached.path("c", "f")), "3")
    cached.umount()  # the final write carries the priority
    entries = read_manifest(manifest, BUDGET_BLOCKS)
    assert len(entries) == 8 and {entry.priority for entry in entries} == {3}
    cached.mount()
    assert wait_until(lambda: content(cached)["used_bytes"] == 8 * BLOCK)
    assert read_direct(cached.path("c", "f"), 0, 8 * BLOCK) == data
    figures = content(cached)
    assert (figures["hits"], figures["misses"]) == (8, 0)


def test_a_corrupt_manifest_gives_a_cold_cache_and_one_warning(cached: Mount) -> None:
    os.mkdir(cached.path("c"))
    cached.path("c", "f").write_bytes(random.Random(8).randbytes(4 * BLOCK))
    for _ in range(2):
        read_direct(cached.path("c", "f"), 0, 4 * BLOCK)
    cached.umount()
    manifest = cached.state / "cache.manifest"
    raw = bytearray(manifest.read_bytes())
    raw[40] ^= 0xFF
    manifest.write_bytes(bytes(raw))
    cached.mount()
    assert content(cached)["used_bytes"] == 0
    log = (cached.state / "daemon.log").read_text()
    assert log.count("ignoring the cache manifest") == 1
    assert read_direct(cached.path("c", "f"), 0, BLOCK)  # serves on


def test_priority_round_trip_survives_a_remount(cached: Mount) -> None:
    os.mkdir(cached.path("c"))
    path = cached.path("c", "f")
    path.write_bytes(b"x" * BLOCK)
    assert swapfs("priority", str(path)).stdout == "0\n"
    swapfs("priority", str(path), "-7")
    cached.remount()
    assert swapfs("priority", str(path)).stdout == "-7\n"
    assert cached.chain("c")["files"]["f"]["priority"] == -7
    missing = swapfs("priority", str(cached.path("c", "nope")), "1", check=False)
    assert missing.returncode == 1 and "No such file" in missing.stderr
    chain = swapfs("priority", str(cached.path("c")), check=False)
    assert chain.returncode == 1 and "directory" in chain.stderr
    elsewhere = swapfs("priority", "/tmp", check=False)
    assert elsewhere.returncode == 1 and "not a swapfs mount" in elsewhere.stderr
    os.unlink(path)  # its priority goes with it: the fixture's fsck stays clean
