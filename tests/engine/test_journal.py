"""The journal (swapfs/engine/journal.py): write transactions share LMDB's
transaction in batches, and each is appended to the journal before its
caller hears of it. A killed process loses no acknowledged write; a batch
given up (an abort, a full map) keeps the writes before it; a journal that
is damaged, cut short or of another boot costs the records from the damage
on, never wrong bytes or a state that does not open.

The kills here are real: a child process writes, reports what it was told
was written, and is killed with SIGKILL while its batch is open.
"""

import errno
import os
import signal
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import lmdb
import pytest

from swapfs.engine import checkpoint, fsck, journal
from swapfs.engine import index as index_module
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE
BLOCKS = 64
ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import os, signal, sys
from pathlib import Path
from swapfs.engine.volume import Volume
state, blocks, commit_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vol = Volume(state)
ino = vol.resolve("c/f").ino
for block in range(blocks):
    if block == commit_after // 2:
        vol.sync()  # a checkpoint
    if block in (commit_after, commit_after + 8):
        vol.opened.index.flush()  # LMDB commits, as a full journal has it
    vol.write(ino, block * 4096, (block << 32 | 2).to_bytes(8, "little") * 512)
print(len(vol.opened.index._records), flush=True)  # noqa: SLF001
os.kill(os.getpid(), signal.SIGKILL)
"""


def version(block: int, number: int) -> bytes:
    return (block << 32 | number).to_bytes(8, "little") * (BS // 8)


def made(state: Path) -> None:
    """A state whose file holds version 1 of every block, closed cleanly."""
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        ino = vol.create(chain.ino, b"f", 0o100600, 0, 0).ino
        vol.write(ino, 0, b"".join(version(n, 1) for n in range(BLOCKS)))


def killed_while_writing(state: Path, blocks: int = BLOCKS, commit_after: int = -1) -> int:
    """Write version 2 of the first *blocks* blocks, one request each, in a
    process then killed (if *commit_after* is given: a checkpoint before
    half that block, LMDB committing its batch before that block and 8
    blocks later); the write transactions its batch still held."""
    child = subprocess.run([sys.executable, "-c", _CHILD, str(state), str(blocks),
                            str(commit_after)],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    return int(child.stdout)


def written_in_a_batch(vol: Volume, blocks: int = 8) -> int:
    """Write version 2 of the first *blocks* blocks, one request each, the
    last of them at least in the journal only; the file's inode."""
    ino = vol.resolve("c/f").ino
    for block in range(blocks):
        vol.write(ino, block * BS, version(block, 2))
    assert vol.opened.index._records  # noqa: SLF001
    return ino


def records_end(raw: bytes | bytearray) -> int:
    """Where the records of the journal *raw* end, read by their headers
    (magic, boot, base, sequence number, then the body's length)."""
    at = 0
    while raw[at:at + 4] == b"SWJR":
        at += 40 + int.from_bytes(raw[at + 32:at + 36], "little")
    return at


def versions(state: Path) -> list[int]:
    """The version each block of the file reads as (EIO fails the test)."""
    with closing(Volume(state)) as vol:
        data = vol.read(vol.resolve("c/f").ino, 0, BLOCKS * BS)
    found = []
    for block in range(BLOCKS):
        chunk = data[block * BS:(block + 1) * BS]
        number = next((n for n in (1, 2) if chunk == version(block, n)), None)
        assert number is not None, f"block {block} reads bytes never written there"
        found.append(number)
    return found


def test_a_killed_process_loses_no_acknowledged_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    made(state)
    held = killed_while_writing(state)
    assert held > 0  # the kill found them in the journal only, not in LMDB
    # Past what the open reads first: the records are read on as they go.
    monkeypatch.setattr(journal, "READ_FIRST", 4096)
    assert records_end((state / "index.lmdb" / journal.NAME).read_bytes()) > 2 * 4096
    assert versions(state) == [2] * BLOCKS
    assert fsck.check(state).clean


def test_a_write_that_aborts_keeps_the_batch_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    made(state)
    with closing(Volume(state)) as vol:
        ino = written_in_a_batch(vol)

        def full(*_: object) -> None:
            raise SwapfsError(errno.ENOSPC, "no room")

        monkeypatch.setattr(type(vol.opened.store), "write_many", full)
        with pytest.raises(SwapfsError) as refused:
            vol.write(ino, 8 * BS, version(8, 2))
        assert refused.value.errno == errno.ENOSPC
        monkeypatch.undo()
        # LMDB's transaction went with the abort; the eight before it are made again.
        assert vol.read(ino, 0, 9 * BS) == b"".join(
            [version(n, 2) for n in range(8)] + [version(8, 1)])
        vol.write(ino, 9 * BS, version(9, 2))
    assert versions(state) == [2] * 8 + [1, 2] + [1] * (BLOCKS - 10)
    assert fsck.check(state).clean


def test_a_batch_is_bounded_by_the_journal(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """However many writes, LMDB commits before the journal is full: what
    an open replays is bounded."""
    state = tmp_path / "state"
    made(state)
    monkeypatch.setattr(journal, "JOURNAL_BYTES", 64 << 10)  # a few hundred records
    with closing(Volume(state)) as vol:
        ino = vol.resolve("c/f").ino
        index = vol.opened.index
        first = index.env.info()["last_txnid"]
        for round_ in range(3, 40):
            for block in range(BLOCKS):
                vol.write(ino, block * BS, version(block, round_))
                assert index.journal is not None
                assert index.journal.end <= 64 << 10
        assert index.env.info()["last_txnid"] > first + 1
        assert len(index._records) < BLOCKS * 37  # noqa: SLF001


def test_a_lone_overwrite_journals_the_entries_it_changed(tmp_path: Path) -> None:
    """A 4 KiB overwrite changes an entry of its file's map and entries of
    its chain's slot table: the journal names those, not the 4 KiB runs
    that hold them, and the values wait in the overlay, where reads find
    them, until LMDB commits the batch."""
    state = tmp_path / "state"
    made(state)
    with closing(Volume(state)) as vol:
        ino = vol.resolve("c/f").ino
        index = vol.opened.index
        assert index.journal is not None
        vol.write(ino, 0, version(0, 2))  # the batch begun
        start = index.journal.end
        vol.write(ino, 5 * BS, version(5, 2))
        assert index.journal.end - start < 1024
        ops = index._records[-1]  # noqa: SLF001
        patched = {name for kind, name, _, _ in ops if kind == journal.PATCH}
        assert patched == {b"filemaps", b"slots"}
        assert all(len(value) < 100 for kind, _, _, value in ops if kind == journal.PATCH)
        assert index.overlay and vol.read(ino, 5 * BS, BS) == version(5, 2)
    assert versions(state) == [2] + [1] * 4 + [2] + [1] * (BLOCKS - 6)
    assert fsck.check(state).clean


def test_an_overwrite_keeps_its_times_in_memory_until_the_batch_settles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write over mapped blocks within the file's size changes only the
    file's times: the journal does not name its inode, readers see the new
    times at once, and the batch's commit stores them. A write that maps a
    block or grows the file journals its inode, and an aborted write
    transaction leaves no time of its own to be stored later."""
    state = tmp_path / "state"
    made(state)
    with closing(Volume(state)) as vol:
        ino = vol.resolve("c/f").ino
        index = vol.opened.index
        before = vol.getattr(ino).mtime_ns
        vol.write(ino, 5 * BS, version(5, 2))
        assert not any(name == b"inodes" for _, name, _, _ in index._records[-1])  # noqa: SLF001
        touched = vol.getattr(ino)
        assert touched.mtime_ns > before and touched.ctime_ns == touched.mtime_ns
        assert ino in index.lazy_times
        # Its put waits for the batch's commit, and the map's room for it is
        # reckoned with the overlay's values.
        held = sum(index.value_room(key, value) for values in index.overlay.values()
                   for key, value in values.items())
        key = index_module._U64.pack(ino)  # noqa: SLF001
        assert index.overlay_bytes == held + index.value_room(key, touched.pack())
        vol.write(ino, BLOCKS * BS, version(BLOCKS, 2))  # grows the file
        size = vol.getattr(ino).size
        assert size == (BLOCKS + 1) * BS
        assert any(name == b"inodes" for _, name, _, _ in index._records[-1])  # noqa: SLF001
        assert ino not in index.lazy_times
        vol.write(ino, 7 * BS, bytes(BS))  # unmaps block 7
        vol.write(ino, 6 * BS, version(6, 2))
        last = vol.getattr(ino).mtime_ns
        assert ino in index.lazy_times

        def full(*_: object) -> None:
            raise SwapfsError(errno.ENOSPC, "no room")

        # Mapping block 7 again counts it in the inode before the data
        # write fails: that count must not reach the index with the times.
        monkeypatch.setattr(type(vol.opened.store), "write_many", full)
        with pytest.raises(SwapfsError):
            vol.write(ino, 7 * BS, version(7, 2))
        monkeypatch.undo()
        assert not index.lazy_times
        vol.sync()
    with closing(Volume(state)) as vol:
        stored = vol.getattr(ino)
        assert (stored.size, stored.blocks) == (size, BLOCKS)
        assert before < stored.mtime_ns <= last
    assert fsck.check(state).clean


def test_a_patch_never_makes_a_damaged_value_whole(tmp_path: Path) -> None:
    """Made again from the journal, a patch changes the payload of the value
    it names, which is checksummed again; a value missing or damaged since
    (it does not verify) is left as it is, for reads to answer EIO, and so
    are the later patches of it."""
    tag = index_module._CHECKSUMMED[b"filemaps"]  # noqa: SLF001
    good, damaged, gone = b"good" + bytes(8), b"damaged" + bytes(5), b"gone" + bytes(8)
    stored = index_module.checksummed(tag, damaged, b"12345678")
    env = lmdb.open(str(tmp_path), max_dbs=4)
    named = {b"filemaps": env.open_db(b"filemaps"), b"slots": env.open_db(b"slots")}
    with env.begin(write=True) as txn:
        txn.put(good, index_module.checksummed(tag, good, bytes(range(1, 9))),
                db=named[b"filemaps"])
        txn.put(damaged, bytes([stored[0] ^ 1]) + stored[1:], db=named[b"filemaps"])
        txn.put(good, b"abcdef", db=named[b"slots"])

    def patch(name: bytes, key: bytes, offset: int, data: bytes) -> journal.Op:
        return journal.PATCH, name, key, offset.to_bytes(4, "little") + data

    records = [[patch(b"filemaps", good, 4, b"\xff\xfe"), patch(b"filemaps", damaged, 0, b"x"),
                patch(b"filemaps", gone, 0, b"x")],
               [patch(b"filemaps", good, 12, b"\x09"), patch(b"filemaps", damaged, 1, b"y"),
                patch(b"slots", good, 2, b"XY")]]
    with env.begin(write=True) as txn:
        index_module._apply(txn, named, records)  # noqa: SLF001
    with env.begin() as txn:
        patched = txn.get(good, db=named[b"filemaps"])
        assert patched is not None and index_module.verified(tag, good, patched, "") == (
            bytes([1, 2, 3, 4, 0xFF, 0xFE, 7, 8]) + bytes(4) + b"\x09")
        assert txn.get(damaged, db=named[b"filemaps"]) == bytes([stored[0] ^ 1]) + stored[1:]
        assert txn.get(gone, db=named[b"filemaps"]) is None
        # A slot table's run has no checksum of its own: its entries carry theirs.
        assert txn.get(good, db=named[b"slots"]) == b"abXYef"
    env.close()


@pytest.mark.parametrize("damage", ["flip", "cut short", "garbage"])
def test_a_damaged_journal_costs_the_records_from_the_damage_on(
        tmp_path: Path, damage: str) -> None:
    state = tmp_path / "state"
    made(state)
    killed_while_writing(state)
    path = state / "index.lmdb" / journal.NAME
    raw = bytearray(path.read_bytes())
    middle = records_end(raw) // 2
    if damage == "flip":
        raw[middle] ^= 0x10
    elif damage == "cut short":
        raw[middle:] = bytes(len(raw) - middle)
    else:
        raw[:] = os.urandom(len(raw))
    path.write_bytes(bytes(raw))
    found = versions(state)
    # Each request wrote the next block: what is left is a prefix of them.
    kept = found.count(2)
    assert found == [2] * kept + [1] * (BLOCKS - kept)
    assert kept < BLOCKS
    assert fsck.check(state).clean


def test_a_journal_of_another_boot_is_not_replayed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """After a power cut the index is as at its checkpoint: a record of the
    boot before, whatever of it reached the disk, is not made again."""
    state = tmp_path / "state"
    made(state)
    held = killed_while_writing(state)
    assert held > 0
    monkeypatch.setattr(checkpoint, "boot_id", lambda: bytes(range(16)))
    # The index is as at its last checkpoint: no write of the batch is there.
    found = versions(state)
    kept = found.count(2)
    assert found == [2] * kept + [1] * (BLOCKS - kept)
    assert kept <= BLOCKS - held
    assert fsck.check(state).clean


def test_a_read_only_check_sees_the_journal_and_leaves_it(tmp_path: Path) -> None:
    """fsck without --repair checks the index as the next open will find it,
    the journal's records made (in a transaction it does not commit), and
    leaves the journal for that open."""
    state = tmp_path / "state"
    made(state)
    vol = Volume(state)
    chain = vol.mkdir(ROOT_INO, b"d", 0o755, 0, 0)  # a chain only the journal names
    ino = vol.create(chain.ino, b"g", 0o100600, 0, 0).ino
    vol.write(ino, 0, version(0, 3))
    assert vol.opened.index._records  # noqa: SLF001
    # Let go of the state as a killed process does: no commit, no close.
    vol.opened.index._give_up_batch()  # noqa: SLF001
    vol.opened.index._unpin()  # noqa: SLF001
    vol.opened.index.env.close()
    vol.opened.store.close()
    os.close(vol.opened._lock_fd)  # noqa: SLF001
    path = state / "index.lmdb" / journal.NAME
    records = path.read_bytes()
    report = fsck.check(state)
    assert report.clean, [vars(problem) for problem in report.problems]
    assert path.read_bytes() == records
    with closing(Volume(state)) as vol:
        assert vol.read(vol.resolve("d/g").ino, 0, BS) == version(0, 3)
    assert fsck.check(state).clean


def test_a_full_map_mid_batch_grows_it_and_keeps_the_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write transaction that finds the map full gives up LMDB's
    transaction; the index grows, the batch's earlier write transactions
    are made again, and the write runs again."""
    state = tmp_path / "state"
    made(state)
    with closing(Volume(state)) as vol:
        ino = written_in_a_batch(vol)
        index = vol.opened.index
        size = index.map_size
        # An overwrite puts nothing whole: its map and slot table entries
        # are patches (its inode's times wait in memory).
        patch = index_module._Recorder.patch  # noqa: SLF001
        calls: list[int] = []

        def full_once(self: object, *args: object, **kwargs: object) -> None:
            if not calls:
                calls.append(1)
                raise lmdb.MapFullError("full")
            patch(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(index_module._Recorder, "patch", full_once)  # noqa: SLF001
        vol.write(ino, 8 * BS, version(8, 2))
        monkeypatch.undo()
        assert calls and index.map_size > size
        assert vol.read(ino, 0, 9 * BS) == b"".join(version(n, 2) for n in range(9))
    assert versions(state) == [2] * 9 + [1] * (BLOCKS - 9)
    assert fsck.check(state).clean


def test_a_read_only_check_keeps_the_checkpoint_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed process committed in LMDB after its checkpoint, freeing pages
    of the checkpoint's tree, then journaled more. A read-only check makes
    the journal's records again in free pages, so it takes a checkpoint of
    the tree as it is first (Index._take_up): a power cut after it still
    finds a whole tree to roll back to, holding at least the writes before
    the first commit. (Whether the records land on the old checkpoint's
    pages depends on LMDB's choice of free pages: this sequence did not
    tear the tree here without that checkpoint, though it did in others.)"""
    state = tmp_path / "state"
    made(state)
    killed_while_writing(state, blocks=48, commit_after=32)
    assert fsck.check(state).clean
    monkeypatch.setattr(checkpoint, "boot_id", lambda: bytes(range(16)))  # the power cut
    found = versions(state)
    kept = found.count(2)
    assert found == [2] * kept + [1] * (BLOCKS - kept)
    assert kept >= 16
    assert fsck.check(state).clean
