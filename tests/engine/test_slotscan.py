"""Slot tables read on demand: an open reads none of a chain's slot table,
the first request reads what it touches, and a scan in steps finds what
needs the whole table (dedup table, free slots, unpunched space), while
everything reads back right at every point of it.
"""

import errno
import stat
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import fsck
from swapfs.engine import index as index_module
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import ROOT_INO, Chain
from swapfs.engine.slottable import RUN_BYTES, SLOT_RUN
from swapfs.engine.state import INLINE_SCAN_SLOTS
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE


def distinct(count: int, seed: int = 0) -> list[bytes]:
    return [(seed * 1_000_003 + n + 1).to_bytes(8, "little") * (BS // 8) for n in range(count)]


def fill(state: Path, blocks: list[bytes]) -> int:
    """A state with one chain and one file holding *blocks*; the file's inode."""
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        for first in range(0, len(blocks), 256):
            vol.write(file.ino, first * BS, b"".join(blocks[first:first + 256]))
        return file.ino


def runs_read(vol: Volume) -> int:
    return sum(table.runs_loaded for table in vol.opened.tables.values())


def test_open_and_a_first_read_read_the_same_runs_whatever_the_chain_holds(
        tmp_path: Path) -> None:
    """The slot-table side of flatness: runs read at open and at a first
    read, for a chain of 1 run and one of 60 runs."""
    seen = []
    for count in (100, 60 * SLOT_RUN):
        state = tmp_path / str(count)
        blocks = distinct(count)
        ino = fill(state, blocks)
        with closing(Volume(state, background_scan=True)) as vol:
            at_open = runs_read(vol)
            assert vol.read(ino, (count - 1) * BS, BS) == blocks[-1]
            seen.append((at_open, runs_read(vol)))
    assert seen[0] == seen[1] == (0, 1), seen


def test_writes_before_the_scan_store_again_and_read_right(tmp_path: Path) -> None:
    """A chain too large to scan at a write's request (INLINE_SCAN_SLOTS):
    each write scans WRITE_SCAN_RUNS runs of it, from the first; a block
    stored in a later run is not named yet, and stored again."""
    state = tmp_path / "state"
    blocks = distinct(INLINE_SCAN_SLOTS + SLOT_RUN)
    ino = fill(state, blocks)
    with closing(Volume(state, background_scan=True)) as vol:
        other = vol.create(vol.resolve("c").ino, b"g", stat.S_IFREG | 0o600, 0, 0)
        vol.write(other.ino, 0, blocks[-1])  # not named yet: a second copy
        assert vol.stats()["chains"]["c"]["unique_blocks"] == len(blocks) + 1
        vol.write(other.ino, BS, blocks[0])  # in the runs scanned: deduplicated
        assert vol.stats()["chains"]["c"]["unique_blocks"] == len(blocks) + 1
        while vol.scan_step(16):
            pass
        assert vol.stats()["chains"]["c"]["dedup_table"]["scanned"]
        vol.write(other.ino, 2 * BS, blocks[-2])  # named now: deduplicated
        assert vol.stats()["chains"]["c"]["unique_blocks"] == len(blocks) + 1
        assert vol.read(ino, 0, len(blocks) * BS) == b"".join(blocks)
        assert vol.read(other.ino, 0, 3 * BS) == blocks[-1] + blocks[0] + blocks[-2]
    assert fsck.check(state).clean


def test_a_small_slot_cache_drops_runs_and_reads_them_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    blocks = distinct(40 * SLOT_RUN)
    with closing(Volume(state, slot_cache_bytes=16 * RUN_BYTES)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        for first in range(0, len(blocks), 300):
            vol.write(file.ino, first * BS, b"".join(blocks[first:first + 300]))
        table = vol.opened.tables[chain.chain]
        assert len(table.runs) <= 16
        # Overwrite every other block with its neighbour's content: refs go
        # up and down across runs that were dropped and read again.
        for n in range(0, len(blocks) - 1, 2):
            vol.write(file.ino, n * BS, blocks[n + 1])
        want = [blocks[n + 1] if n % 2 == 0 and n + 1 < len(blocks) else blocks[n]
                for n in range(len(blocks))]
        assert vol.read(file.ino, 0, len(blocks) * BS) == b"".join(want)
        assert len(table.runs) <= 16
        assert vol.stats()["chains"]["c"]["unique_blocks"] == len(set(want))
    assert fsck.check(state).clean


def test_the_scan_punches_free_slots_a_crash_left_holding_data(tmp_path: Path) -> None:
    """After a stop with no clean mark, a free slot the scan finds may hold
    data: it goes to the pending punches, and is punched (and then taken
    first) once a checkpoint covers the state that says it is free. (After a
    clean close the scan takes free slots as punched: the crash is simulated
    whole, the clean mark removed too.)"""
    state = tmp_path / "state"
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        vol.write(file.ino, 0, b"\1" * BS + b"\2" * BS)
        vol.write(file.ino, 0, b"\3" * BS)  # slot 0 freed
        data_file = vol.store.path(chain.chain)
    with open(data_file, "r+b") as data:
        data.write(b"\1" * BS)  # as if its punch had never happened
    (state / "index.lmdb" / "clean").unlink()  # nor the clean close
    with closing(Volume(state, background_scan=True)) as vol:
        assert data_file.stat().st_blocks * 512 == 3 * BS, "the open punches nothing"
        while vol.scan_step(8):
            pass
        assert vol.opened.pending.slots(chain.chain) == {0}
        assert vol.opened.tables[chain.chain].free_count == 0
        assert vol.punch_pending() == 0, "not before a checkpoint"
        assert data_file.stat().st_blocks * 512 == 3 * BS
        vol.sync()
        assert vol.punch_pending() == 1
        assert data_file.stat().st_blocks * 512 == 2 * BS  # slots 1 and 2
        assert vol.opened.tables[chain.chain].free_count == 1
        vol.write(file.ino, 2 * BS, b"\4" * BS)
        assert vol.mapped(file.ino)[2] == 0, "the punched slot is taken first"
        assert vol.read(file.ino, 0, 3 * BS) == b"\3" * BS + b"\2" * BS + b"\4" * BS
    assert fsck.check(state).clean


def test_an_entry_damaged_on_disk_is_found_at_first_touch(tmp_path: Path) -> None:
    state = tmp_path / "state"
    blocks = distinct(2 * SLOT_RUN)
    ino = fill(state, blocks)
    with closing(Volume(state)) as vol, vol.index.begin(write=True) as txn:
        chain_id = vol.resolve("c").chain
        raw = bytearray(txn.get_slot_run(chain_id, 1) or b"")
        raw[5 * 24 + 2] ^= 0x10  # slot SLOT_RUN + 5's digest
        txn.put_slot_run(chain_id, 1, bytes(raw))
    with closing(Volume(state, background_scan=True)) as vol:
        assert vol.read(ino, 0, BS) == blocks[0]
        with pytest.raises(SwapfsError) as info:
            vol.read(ino, (SLOT_RUN + 5) * BS, BS)
        assert info.value.errno == errno.EIO
        assert vol.read(ino, (SLOT_RUN + 6) * BS, BS) == blocks[SLOT_RUN + 6]
    assert not fsck.check(state).clean


def test_the_chain_record_counts_what_is_stored(tmp_path: Path) -> None:
    """The count an open takes from the chain's record, not from the table."""
    state = tmp_path / "state"
    blocks = distinct(500)
    ino = fill(state, blocks + blocks[:100])
    with closing(Volume(state)) as vol:
        vol.fallocate(ino, 0x02 | 0x01, 100 * BS, 50 * BS)  # punch: 50 blocks go
        chain_id = vol.resolve("c").chain
    with closing(Volume(state, background_scan=True)) as vol:
        with vol.index.begin() as txn:
            record = txn.get_chain(chain_id)
        assert isinstance(record, Chain) and record.stored == 450
        assert vol.stats()["chains"]["c"]["unique_blocks"] == 450
        assert runs_read(vol) == 0


def test_a_format_4_chain_record_is_counted_at_conversion(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fill(state, distinct(300) * 2)
    with closing(Volume(state)) as vol, vol.index.begin(write=True) as txn:
        chain = next(txn.iter_chains())
        old_record = chain.key + chain.next_slot.to_bytes(8, "big")  # no count
        txn._put(vol.index.chains, index_module._CHAINS,  # noqa: SLF001
                 chain.id_.to_bytes(4, "big"), old_record)
        txn.put_meta(b"format", 4)
    with closing(Volume(state, background_scan=True)) as vol, vol.index.begin() as txn:
        assert next(txn.iter_chains()).stored == 300
        assert txn.get_meta(b"format") == 5
    assert fsck.check(state).clean


def test_churn_names_every_block_once(tmp_path: Path) -> None:
    """Overwrites free as many digests as they add: the removed entries they
    leave fill a small table, whose successor is built before it turns
    blocks away, so nothing is stored twice."""
    state = tmp_path / "state"
    blocks = 256
    with closing(Volume(state, background_scan=True)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        files = [vol.create(chain.ino, name, stat.S_IFREG | 0o600, 0, 0).ino
                 for name in (b"a", b"b")]
        for step in range(4000):
            block = (step * 7919) % blocks
            data = (block << 32 | step + 1).to_bytes(8, "little") * (BS // 8)
            for ino in files:  # both files the same: one copy
                vol.write(ino, block * BS, data)
        figures = vol.stats()["chains"]["c"]
        held = {vol.read(files[0], n * BS, BS) for n in range(blocks)} - {bytes(BS)}
        assert figures["unique_blocks"] == figures["dedup_table"]["entries"] == len(held)
        assert figures["dedup_table"]["unindexed"] == 0
        assert vol.read(files[1], 0, blocks * BS) == vol.read(files[0], 0, blocks * BS)
    assert fsck.check(state).clean
