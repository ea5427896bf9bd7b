"""The dedup table: digest -> slot in a few bytes per entry, bounded by a budget.

A model (a dict of digest -> slots) checks it through random adds, removes
and finds; a volume with a small budget still
reads every byte back right when the table is full, only dedups less.
"""

import math
import random
import re
import stat
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.deduptable import (
    BUCKET_BYTES,
    BUILD_LOAD,
    FULL_LOAD,
    GROW_LOAD,
    DedupBudget,
    DedupTable,
)
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume


class Digests:
    """What a slot table answers the dedup table: each used slot's digest."""

    def __init__(self) -> None:
        self.held: dict[int, bytes] = {}

    def __call__(self, slot: int) -> bytes | None:
        return self.held.get(slot)


def _huge_page_ready() -> dict[tuple[int, int], bool]:
    """This process's mappings, by (start, end): may each hold transparent
    huge pages (smaps' THPeligible)?"""
    ready = {}
    span = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        found = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if found:
            span = (int(found[1], 16), int(found[2], 16))
        elif line.startswith("THPeligible:") and span is not None:
            ready[span] = line.split()[1] == "1"
    return ready


def test_a_large_table_asks_for_huge_pages() -> None:
    """A table of 12 MiB is mapped where the kernel may use 2 MiB pages:
    a killed daemon's table is then freed a few pages at a time, not 3,000,
    before a standby can see the death (docs/performance.md, scale)."""
    if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages are off on this machine")
    before = _huge_page_ready()
    table = DedupTable(Digests(), DedupBudget(), (2 << 20) // BUCKET_BYTES * 6)
    try:
        ready = sum(end - start for (start, end), eligible in _huge_page_ready().items()
                    if eligible and (start, end) not in before)
        assert ready >= 6 * table.size
    finally:
        table.release()


def test_the_table_agrees_with_a_model_through_removals() -> None:
    rng = random.Random(7)
    digests_of = Digests()
    table = DedupTable.for_entries(digests_of, DedupBudget(), 6000)
    model: dict[bytes, int] = {}
    digests = [rng.randbytes(16) for _ in range(6000)]
    next_slot = 0
    for _ in range(40_000):
        digest = rng.choice(digests)
        if digest in model and rng.random() < 0.4:
            slot = model.pop(digest)
            table.remove(digest, slot)
            del digests_of.held[slot]
        elif digest not in model:
            assert table.find(digest) is None
            digests_of.held[next_slot] = digest
            assert table.add(digest, next_slot)
            model[digest] = next_slot
            next_slot += 1
        else:
            assert table.find(digest) == model[digest]
    assert table.entries == len(model)
    for digest in digests:
        assert table.find(digest) == model.get(digest)
    assert table.size_bytes <= BUCKET_BYTES * 6000 / BUILD_LOAD + BUCKET_BYTES


def test_a_name_whose_slot_changed_is_a_miss_not_that_slot() -> None:
    """An entry left behind (an aborted transaction, a slot taken again)
    names a slot whose digest no longer matches: find passes over it."""
    digests_of = Digests()
    table = DedupTable.for_entries(digests_of, DedupBudget(), 10)
    digest = bytes(range(16))
    digests_of.held[5] = digest
    table.add(digest, 5)
    digests_of.held[5] = bytes(16)  # the slot now holds something else
    assert table.find(digest) is None


def test_a_filling_table_asks_for_room_then_stops_taking_digests() -> None:
    digests_of = Digests()
    budget = DedupBudget(BUCKET_BYTES * 1024)
    table = DedupTable.for_entries(digests_of, budget, 100)
    assert table.size == 1024 and budget.used == BUCKET_BYTES * 1024
    added = 0
    for slot in range(1100):
        digest = slot.to_bytes(16, "little")
        digests_of.held[slot] = digest
        added += table.add(digest, slot)
        if slot == int(1024 * GROW_LOAD) + 1:
            assert table.wants_room
    assert table.successor() is None, "the budget refuses a larger table"
    assert added == math.ceil(1024 * FULL_LOAD) and table.unindexed == 1100 - added
    for slot in range(added):
        assert table.find(slot.to_bytes(16, "little")) == slot
    table.release()
    assert budget.used == 0


def test_a_volume_with_a_small_budget_reads_right_and_checks_clean(tmp_path: Path) -> None:
    """Past the budget dedup is advisory: blocks are stored again, nothing is lost."""
    state = tmp_path / "state"
    blocks = [random.Random(n).randbytes(BLOCK_SIZE) for n in range(3000)]
    with closing(Volume(state, dedup_table_bytes=4096)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        first = vol.create(chain.ino, b"a", stat.S_IFREG | 0o600, 0, 0)
        second = vol.create(chain.ino, b"b", stat.S_IFREG | 0o600, 0, 0)
        vol.write(first.ino, 0, b"".join(blocks))
        vol.write(second.ino, 0, b"".join(blocks))  # the same data again
        stats = vol.stats()["chains"]["c"]
        assert stats["dedup_table"]["bytes"] == BUCKET_BYTES * 1024, "the least a chain has"
        assert stats["dedup_table"]["unindexed"] > 0
        assert 3000 < stats["unique_blocks"] < 6000, "deduped what the table held"
        assert vol.read(first.ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
        assert vol.read(second.ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
    assert fsck.check(state).clean
    with closing(Volume(state)) as vol:  # no bound: every stored block is named again
        assert vol.stats()["chains"]["c"]["dedup_table"]["unindexed"] == 0
        assert vol.read(vol.resolve("c/b").ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)


def test_a_chain_outgrowing_its_table_dedups_every_block(tmp_path: Path) -> None:
    """A table that fills is replaced by a larger one, built from the slot
    table while the old one serves: no digest is forgotten on the way."""
    blocks = [random.Random(n).randbytes(BLOCK_SIZE) for n in range(3000)]
    with closing(Volume(tmp_path / "state")) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        first = vol.create(chain.ino, b"a", stat.S_IFREG | 0o600, 0, 0)
        second = vol.create(chain.ino, b"b", stat.S_IFREG | 0o600, 0, 0)
        for n, block in enumerate(blocks):
            vol.write(first.ino, n * BLOCK_SIZE, block)
        vol.write(second.ino, 0, b"".join(blocks))
        stats = vol.stats()["chains"]["c"]
        assert stats["unique_blocks"] == 3000
        assert stats["dedup_table"]["entries"] == 3000
        assert stats["dedup_table"]["bytes"] > BUCKET_BYTES * 3000
        assert vol.read(second.ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
