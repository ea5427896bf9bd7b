"""The dedup table: digest -> slot in a few bytes per entry, bounded by a budget.

A model (a dict of digest -> slots) checks it through random adds, removes
and finds, across growth and rebuilds; a volume with a small budget still
reads every byte back right when the table is full, only dedups less.
"""

import random
import stat
from contextlib import closing
from pathlib import Path

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.deduptable import DedupBudget, DedupTable
from swapfs.engine.index import ROOT_INO
from swapfs.engine.slottable import ENTRY
from swapfs.engine.volume import Volume


class Image:
    """Slot table entries whose first 16 bytes are the digest."""

    def __init__(self) -> None:
        self.data = bytearray()

    def put(self, slot: int, digest: bytes) -> None:
        end = (slot + 1) * ENTRY.size
        if len(self.data) < end:
            self.data += bytes(end - len(self.data))
        self.data[slot * ENTRY.size:slot * ENTRY.size + 16] = digest


def test_the_table_agrees_with_a_model_through_growth_and_removals() -> None:
    rng = random.Random(7)
    image = Image()
    table = DedupTable(lambda: image.data, DedupBudget())
    model: dict[bytes, int] = {}
    digests = [rng.randbytes(16) for _ in range(6000)]
    next_slot = 0
    for _ in range(40_000):
        digest = rng.choice(digests)
        if digest in model and rng.random() < 0.4:
            slot = model.pop(digest)
            table.remove(digest, slot)
            image.put(slot, bytes(16))
        elif digest not in model:
            assert table.find(digest) is None
            image.put(next_slot, digest)
            assert table.add(digest, next_slot)
            model[digest] = next_slot
            next_slot += 1
        else:
            assert table.find(digest) == model[digest]
    assert table.entries == len(model)
    for digest in digests:
        assert table.find(digest) == model.get(digest)
    assert table.size_bytes <= 12 * len(model) + 4096 * 4, "a few bytes per entry"


def test_a_full_table_at_its_budget_stops_taking_digests() -> None:
    image = Image()
    budget = DedupBudget(4 * 2048)
    table = DedupTable(lambda: image.data, budget)
    added = 0
    for slot in range(3000):
        digest = slot.to_bytes(16, "little")
        image.put(slot, digest)
        added += table.add(digest, slot)
    assert table.size_bytes == 4 * 2048 and budget.used == 4 * 2048
    assert added == 2048 * 7 // 10 and table.unindexed == 3000 - added
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
        assert stats["dedup_table"]["bytes"] == 4096
        assert stats["dedup_table"]["unindexed"] > 0
        assert 3000 < stats["unique_blocks"] < 6000, "deduped what the table held"
        assert vol.read(first.ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
        assert vol.read(second.ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
    assert fsck.check(state).clean
    with closing(Volume(state)) as vol:  # no bound: every stored block is named again
        assert vol.stats()["chains"]["c"]["dedup_table"]["unindexed"] == 0
        assert vol.read(vol.resolve("c/b").ino, 0, 3000 * BLOCK_SIZE) == b"".join(blocks)
