"""Checkpoints: after its machine stops, an index opens as at its last
checkpoint, whole, with every block that checkpoint names still on disk.

A power cut itself needs a machine to cut (the QEMU campaign,
tools/powercut.py). Here the process stands in for it: the state is left
without a clean close, as a killed daemon leaves it, and its checkpoint
record made to name another boot, which is what the next boot's open sees.
The page cache is not lost this way, so what these tests show is the rest
of the promise: the checkpoint's tree is still whole in the index file
after many commits since (its pages were not reused), its blocks are still
in the data file (their slots were not reused or punched), and the
rollback happens only when the boot changed.
"""

import os
import stat
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import checkpoint, fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE
BLOCKS = 64


def version(block: int, number: int) -> bytes:
    return (block << 32 | number).to_bytes(8, "little") * (BS // 8)


def other_boot(state: Path) -> None:
    """Make the checkpoint's record name a boot that is not this one, and
    remove the clean mark: the state as the next boot finds it after the
    machine stopped with a daemon running."""
    index = state / "index.lmdb"
    record = checkpoint.read(index)
    assert record is not None
    checkpoint.write(index, checkpoint.Record(record.sequence + 1, bytes(16),
                                              record.page_size, record.metas))
    (index / "clean").unlink(missing_ok=True)


def crash(vol: Volume) -> None:
    """Let go of the state as a killed process does: no close, no sync. Its
    batch is committed first, as a full journal has it: LMDB holds commits
    made since the checkpoint (test_journal.py has a batch cut short)."""
    vol.opened.index.flush()
    vol.opened.index._unpin()  # noqa: SLF001  (a dead process holds no reader)
    vol.opened.index.env.close()
    vol.opened.store.close()
    os.close(vol.opened._lock_fd)  # noqa: SLF001


def written(state: Path) -> tuple[Volume, int]:
    vol = Volume(state)
    chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    ino = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0).ino
    vol.write(ino, 0, b"".join(version(n, 1) for n in range(BLOCKS)))
    return vol, ino


def stopped_after_a_checkpoint(state: Path) -> int:
    """A state whose machine stopped after block 0 was written twice, the
    second time after its last checkpoint; the file's inode."""
    vol, ino = written(state)
    vol.sync()
    vol.write(ino, 0, version(0, 2))
    crash(vol)
    other_boot(state)
    return ino


def test_records_alternate_and_a_torn_one_leaves_the_other(tmp_path: Path) -> None:
    metas = bytes(range(256)) + bytes(range(48))  # two meta pages' 152 bytes
    for sequence in range(3):
        checkpoint.write(tmp_path, checkpoint.Record(sequence, b"b" * 16, 4096, metas))
    assert checkpoint.read(tmp_path) == checkpoint.Record(2, b"b" * 16, 4096, metas)
    raw = bytearray((tmp_path / checkpoint.NAME).read_bytes())
    raw[20] ^= 1  # sequence 2 is in the first record: torn
    (tmp_path / checkpoint.NAME).write_bytes(bytes(raw))
    assert checkpoint.read(tmp_path) == checkpoint.Record(1, b"b" * 16, 4096, metas)


def test_after_its_machine_stopped_an_index_is_as_at_its_checkpoint(tmp_path: Path) -> None:
    """Many commits after the checkpoint free index pages and slots; the
    file then reads exactly as when the last checkpoint was taken (the
    explicit sync, or a later one the index's growth made)."""
    state = tmp_path / "state"
    vol, ino = written(state)
    vol.sync()
    contents = [version(n, 1) for n in range(BLOCKS)]
    at_checkpoint: dict[int, bytes] = {}

    def note() -> None:
        record = vol.opened.index.checkpointed
        assert record is not None
        at_checkpoint.setdefault(record.sequence, b"".join(contents))

    note()
    for number in range(2, 40):
        for block in range(0, BLOCKS, 3):
            vol.write(ino, block * BS, version(block, number))
            contents[block] = version(block, number)
            note()
    last = max(at_checkpoint)
    assert at_checkpoint[last] != b"".join(contents), "commits after the last checkpoint"
    crash(vol)
    other_boot(state)
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is not None
        assert vol.read(ino, 0, BLOCKS * BS) == at_checkpoint[last]
    assert fsck.check(state).clean


def test_in_the_same_boot_nothing_is_rolled_back(tmp_path: Path) -> None:
    """A killed daemon (a takeover) loses no acknowledged write."""
    state = tmp_path / "state"
    vol, ino = written(state)
    vol.sync()
    vol.write(ino, 0, version(0, 2))  # acknowledged, not synced
    crash(vol)
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is None
        assert vol.read(ino, 0, BS) == version(0, 2)
    assert fsck.check(state).clean


def test_a_clean_close_is_not_rolled_back_in_a_later_boot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vol, ino = written(state)
    vol.write(ino, 0, version(0, 2))
    vol.close()
    record = checkpoint.read(state / "index.lmdb")
    assert record is not None
    checkpoint.write(state / "index.lmdb", checkpoint.Record(
        record.sequence + 1, bytes(16), record.page_size, record.metas))
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is None
        assert vol.read(ino, 0, BS) == version(0, 2)


def test_a_rollback_is_made_once_then_the_boot_is_this_one(tmp_path: Path) -> None:
    """After the rollback the record names this boot: writes made after it,
    then a kill, are not rolled back again."""
    state = tmp_path / "state"
    ino = stopped_after_a_checkpoint(state)
    vol = Volume(state)
    assert vol.opened.rolled_back is not None
    vol.write(ino, 0, version(0, 3))
    crash(vol)
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is None
        assert vol.read(ino, 0, BS) == version(0, 3)


def test_a_read_only_check_leaves_the_rollback_to_the_next_open(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ino = stopped_after_a_checkpoint(state)
    record = (state / "index.lmdb" / checkpoint.NAME).read_bytes()
    fsck.check(state)
    assert (state / "index.lmdb" / checkpoint.NAME).read_bytes() == record
    assert not (state / "index.lmdb" / "clean").exists()
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is not None
        assert vol.read(ino, 0, BS) == version(0, 1)


def test_a_slot_freed_after_the_checkpoint_waits_for_the_next(tmp_path: Path) -> None:
    """Its block is the checkpoint's: neither reused nor punched before
    the next checkpoint; after it, reused first."""
    state = tmp_path / "state"
    vol, ino = written(state)
    vol.sync()
    old = vol.mapped(ino)[0]
    vol.write(ino, 0, version(0, 2))  # frees the slot of version 1
    assert vol.punch_pending() == 0
    assert vol.opened.store.holds_data(vol.resolve("c").chain, old)
    newest = vol.mapped(ino)[1]
    vol.write(ino, BS, version(1, 2))
    assert old not in vol.mapped(ino).values(), "not reused before the checkpoint"
    vol.sync()
    vol.write(ino, 2 * BS, version(2, 2))
    assert vol.mapped(ino)[2] == newest, "the newest freed slot covered is taken first"
    vol.close()


@pytest.mark.parametrize("flip", [0, 40, 200])
def test_a_damaged_checkpoint_record_costs_no_rollback_and_no_crash(
        tmp_path: Path, flip: int) -> None:
    state = tmp_path / "state"
    ino = stopped_after_a_checkpoint(state)
    path = state / "index.lmdb" / checkpoint.NAME
    raw = bytearray(path.read_bytes())
    for offset in (flip, flip + len(raw) // 2):  # both records
        raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))
    with closing(Volume(state)) as vol:
        assert vol.opened.rolled_back is None  # nothing to roll back to
        assert vol.read(ino, 0, BS) == version(0, 2)
    assert checkpoint.read(state / "index.lmdb") is not None, "a new record at close"


def test_the_first_write_after_a_crash_in_this_boot_takes_a_checkpoint_first(
        tmp_path: Path) -> None:
    """The commits the dead process made since its last checkpoint are in the
    page cache; the next ones could reuse that checkpoint's pages, which
    nothing pins any more. So the first write transaction makes the tree
    it finds the checkpoint, and pins it, before it changes anything."""
    state = tmp_path / "state"
    vol, ino = written(state)
    vol.sync()
    vol.write(ino, 0, version(0, 2))
    crash(vol)
    with closing(Volume(state, background_scan=True)) as vol:
        record = vol.opened.index.checkpointed
        assert record is not None
        assert vol.read(ino, 0, BS) == version(0, 2), "reads take no checkpoint"
        assert vol.opened.index.checkpointed == record
        vol.write(ino, BS, version(1, 2))
        after = vol.opened.index.checkpointed
        assert after is not None and after.sequence == record.sequence + 1
        assert after.metas != record.metas
