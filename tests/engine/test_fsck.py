"""fsck: a clean volume checks clean; each injected fault is found and, if it can
be, repaired so that a second check is clean again.

Faults are injected by writing the index directly through ``Txn`` accessors
(or by flipping a byte of a data file) on a closed volume, the way a crash or
a bug would leave it.
"""

import errno
import stat
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE, blocks_for
from swapfs.engine.errors import SwapfsError
from swapfs.engine.filemap import MAP_RUN, FileMap
from swapfs.engine.index import ROOT_INO, Inode, Txn
from swapfs.engine.slottable import SlotTable
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE


def block(n: int, size: int = BS) -> bytes:
    return (b"%08d" % n * (size // 8 + 1))[:size]


@dataclass
class Workload:
    """What :func:`workload` left behind, and the contents each file should have."""

    chain: Inode  # the chain directory "vms"
    contents: dict[str, bytes]  # "chain/file" -> expected bytes
    inos: dict[str, int]  # "chain/file" -> inode number


def workload(state: Path) -> Workload:
    """A varied history: two chains, dedup, holes, clones, truncation, unlink, orphan."""
    contents: dict[str, bytes] = {}
    with closing(Volume(state)) as vol:
        vms = vol.mkdir(ROOT_INO, b"vms", 0o755, 0, 0)
        other = vol.mkdir(ROOT_INO, b"other", 0o755, 0, 0)
        mode = stat.S_IFREG | 0o600
        base = vol.create(vms.ino, b"base", mode, 0, 0)
        vol.write(base.ino, 0, block(1) + block(2) + bytes(BS) + block(1) + block(3, 99))
        vol.write(base.ino, BS + 7, b"patched")
        vol.clone(base.ino, vms.ino, b"clone")
        vol.clone(base.ino, vms.ino, b"empty", empty=True)
        clone = vol.lookup(vms.ino, b"clone")
        vol.write(clone.ino, 6 * BS, block(4))
        vol.setattr(clone.ino, size=2 * BS + 10)
        gone = vol.create(vms.ino, b"gone", mode, 0, 0)
        vol.write(gone.ino, 0, block(5) + block(6))
        vol.unlink(vms.ino, b"gone", still_open=False)  # frees two slots
        open_ = vol.create(vms.ino, b"open", mode, 0, 0)
        vol.write(open_.ino, 0, block(7))
        vol.unlink(vms.ino, b"open", still_open=True)  # an orphan fsck must accept
        solo = vol.create(other.ino, b"solo", mode, 0, 0)
        vol.write(solo.ino, 0, block(1) + bytes(3 * BS) + block(8))
        vol.rename(other.ino, b"solo", other.ino, b"solo2", 0, False)
        inos = {}
        for path in ("vms/base", "vms/clone", "vms/empty", "other/solo2"):
            ino = vol.resolve(path).ino
            inos[path] = ino
            contents[path] = vol.read(ino, 0, 1 << 20)
    return Workload(vms, contents, inos)


def inject(state: Path, fault: Callable[[Txn], None]) -> None:
    """Apply *fault* to the index in one transaction of a fresh Volume, then close it."""
    with closing(Volume(state)) as vol, vol.index.begin(write=True) as txn:
        fault(txn)


def assert_contents(state: Path, wl: Workload) -> None:
    with closing(Volume(state)) as vol:
        for path, data in wl.contents.items():
            assert vol.read(wl.inos[path], 0, 1 << 20) == data, path


def kinds(report: fsck.Report) -> set[str]:
    return {problem.kind for problem in report.problems}


@pytest.fixture
def wl(state_dir: Path) -> Workload:
    return workload(state_dir)


def test_a_clean_volume_checks_clean(state_dir: Path, wl: Workload) -> None:
    report = fsck.check(state_dir)
    assert report.clean, report.problems
    assert report.exit_code == fsck.EXIT_CLEAN
    with closing(Volume(state_dir, recover=False)) as vol:
        stats = vol.stats()["chains"]
    assert report.blocks_checked == sum(c["unique_blocks"] for c in stats.values())
    assert report.blocks_checked > 0


def test_repair_of_a_clean_volume_changes_nothing(state_dir: Path, wl: Workload) -> None:
    assert fsck.check(state_dir, repair=True).exit_code == fsck.EXIT_CLEAN
    assert_contents(state_dir, wl)


def test_check_needs_the_volume_closed(state_dir: Path, wl: Workload) -> None:
    with closing(Volume(state_dir)), pytest.raises(SwapfsError) as info:
        fsck.check(state_dir)
    assert info.value.errno == errno.EBUSY


# -- repairable faults -----------------------------------------------------------------


def table_of(txn: Txn, wl: Workload) -> SlotTable:
    chain = txn.get_chain(wl.chain.chain)
    assert chain is not None
    return SlotTable.load(txn, chain)


def shared_slot(table: SlotTable) -> int:
    for slot, _, refcount in table.used():
        if refcount > 1:
            return slot
    raise AssertionError("the workload shares no block")


def wrong_refcount(wl: Workload) -> Callable[[Txn], None]:
    def fault(txn: Txn) -> None:
        table = table_of(txn, wl)
        table.ref(next(table.used())[0], 5)
        table.save(txn)
    return fault


def refcount_too_low(wl: Workload) -> Callable[[Txn], None]:
    """Dangerous direction: a later unref would free a block still mapped."""
    def fault(txn: Txn) -> None:
        table = table_of(txn, wl)
        slot = shared_slot(table)
        table.unref(slot, table.refcount(slot) - 1)
        table.save(txn)
    return fault


def unreferenced_slot(wl: Workload) -> Callable[[Txn], None]:
    """A free slot that claims a block nothing maps: a leak."""
    def fault(txn: Txn) -> None:
        table = table_of(txn, wl)
        free = [slot for slot in range(table.next_slot) if not table.refcount(slot)]
        assert free, "the workload frees slots"
        table.claim(free[0], b"\x17" * 16)
        table.save(txn)
    return fault


def map_past_end(wl: Workload) -> Callable[[Txn], None]:
    """A block mapped past the end of its file, counted: invisible, but it holds a ref."""
    def fault(txn: Txn) -> None:
        inode = txn.get_inode(wl.inos["vms/clone"])
        assert inode is not None
        fmap = FileMap.load(txn, inode)
        table = table_of(txn, wl)
        slot = next(table.used())[0]
        fmap.set(blocks_for(inode.size) + 3, slot)
        fmap.save(txn)
        table.ref(slot)
        table.save(txn)
        inode.blocks += 1
        txn.put_inode(inode)
    return fault


def dangling_entry(wl: Workload) -> Callable[[Txn], None]:
    def fault(txn: Txn) -> None:
        txn.put_dirent(wl.chain.ino, b"ghost", 999_999)
    return fault


REPAIRABLE = {
    "refcount": wrong_refcount,
    "refcount-low": refcount_too_low,
    "refcount-unreferenced": unreferenced_slot,
    "map-past-end": map_past_end,
    "dangling-entry": dangling_entry,
}


@pytest.mark.parametrize("name", REPAIRABLE)
def test_a_repairable_fault_is_found_and_repaired(
        state_dir: Path, wl: Workload, name: str) -> None:
    kind = name.split("-")[0] if name.startswith("refcount") else name
    inject(state_dir, REPAIRABLE[name](wl))

    found = fsck.check(state_dir)
    assert kinds(found) == {kind}, found.problems
    assert found.exit_code == fsck.EXIT_UNREPAIRED, "found but not asked to repair"
    assert not any(problem.repaired for problem in found.problems)
    assert kinds(fsck.check(state_dir)) == {kind}, "a check without repair changes nothing"

    repaired = fsck.check(state_dir, repair=True)
    assert kinds(repaired) == {kind}
    assert repaired.exit_code == fsck.EXIT_REPAIRED
    assert all(problem.repaired for problem in repaired.problems)

    again = fsck.check(state_dir)
    assert again.clean and again.exit_code == fsck.EXIT_CLEAN, again.problems
    assert_contents(state_dir, wl)


def test_a_repaired_volume_keeps_working(state_dir: Path, wl: Workload) -> None:
    """After repairing a refcount too low, new writes must not overwrite the block."""
    inject(state_dir, refcount_too_low(wl))
    fsck.check(state_dir, repair=True)
    with closing(Volume(state_dir)) as vol:
        scratch = vol.create(wl.chain.ino, b"scratch", stat.S_IFREG | 0o600, 0, 0)
        for n in range(10):
            vol.write(scratch.ino, n * BS, block(100 + n))
        vol.unlink(wl.chain.ino, b"clone", still_open=False)  # drops shared references
        assert vol.read(scratch.ino, 0, 10 * BS) == b"".join(
            block(100 + n) for n in range(10))
    del wl.contents["vms/clone"]
    assert_contents(state_dir, wl)
    assert fsck.check(state_dir).clean


def test_a_leaked_slot_is_freed_for_reuse(state_dir: Path, wl: Workload) -> None:
    with closing(Volume(state_dir)) as vol:
        free_before = vol.free_slots(wl.chain.chain)
    inject(state_dir, unreferenced_slot(wl))
    fsck.check(state_dir, repair=True)
    with closing(Volume(state_dir)) as vol:
        assert vol.free_slots(wl.chain.chain) == free_before


# -- unrepairable faults -----------------------------------------------------------------


def test_a_corrupt_block_is_reported_not_repaired(state_dir: Path, wl: Workload) -> None:
    with closing(Volume(state_dir)) as vol:
        slot = vol.mapped(wl.inos["other/solo2"])[0]
        path = state_dir / "data" / f"{vol.resolve('other').chain}.blocks"
    with open(path, "r+b") as f:
        f.seek(slot * BS + 4000)
        f.write(b"\xff\x00")

    for repair in (False, True):
        report = fsck.check(state_dir, repair=repair)
        assert kinds(report) == {"corrupt-block"}
        assert report.exit_code == fsck.EXIT_UNREPAIRED
        assert not report.problems[0].repaired
    with closing(Volume(state_dir)) as vol, pytest.raises(SwapfsError) as info:
        vol.read(wl.inos["other/solo2"], 0, BS)
    assert info.value.errno == errno.EIO


def map_free_slot(wl: Workload, path: str, block_no: int) -> Callable[[Txn], None]:
    """Map a hole of *path* to a free slot, and count it, so that only the
    missing block is wrong."""
    def fault(txn: Txn) -> None:
        inode = txn.get_inode(wl.inos[path])
        assert inode is not None
        fmap = FileMap.load(txn, inode)
        assert fmap.get(block_no) is None
        table = table_of(txn, wl)
        fmap.set(block_no, next(s for s in range(table.next_slot) if not table.refcount(s)))
        fmap.save(txn)
        inode.blocks += 1
        txn.put_inode(inode)
    return fault


def test_a_map_entry_without_a_block_is_reported_not_repaired(
        state_dir: Path, wl: Workload) -> None:
    ino = wl.inos["vms/base"]
    inject(state_dir, map_free_slot(wl, "vms/base", 2))  # block 2 of base is a hole
    for repair in (False, True):
        report = fsck.check(state_dir, repair=repair)
        assert kinds(report) == {"missing-block"}
        assert report.exit_code == fsck.EXIT_UNREPAIRED
    with closing(Volume(state_dir)) as vol:
        assert vol.read(ino, 0, 2 * BS) == wl.contents["vms/base"][:2 * BS]
        with pytest.raises(SwapfsError) as info:
            vol.read(ino, 2 * BS, BS)
    assert info.value.errno == errno.EIO


def test_a_lost_map_run_is_reported_and_reads_eio(state_dir: Path, wl: Workload) -> None:
    """A map that holds fewer blocks than its file counts has lost a run: the
    blocks outside the runs left are unknown, so they read EIO, not zeros."""
    ino = wl.inos["vms/base"]
    with closing(Volume(state_dir)) as vol:
        vol.write(ino, (MAP_RUN + 1) * BS, block(42))  # the second block of run 1
    inject(state_dir, lambda txn: txn.delete_map_run(ino, 1))
    for repair in (False, True):
        report = fsck.check(state_dir, repair=repair)
        # The block's slot counts a reference nothing left shows; while a run
        # is lost, fsck never lowers a refcount: that run may hold it.
        assert kinds(report) == {"block-count", "refcount"}
        assert report.exit_code == fsck.EXIT_UNREPAIRED
        assert not any(problem.repaired for problem in report.problems)
    with closing(Volume(state_dir)) as vol:
        assert vol.read(ino, 0, 3 * BS) == wl.contents["vms/base"][:3 * BS], "run 0 is known"
        for lost in (MAP_RUN + 1, MAP_RUN):  # the block, and the hole before it
            with pytest.raises(SwapfsError) as info:
                vol.read(ino, lost * BS, BS)
            assert info.value.errno == errno.EIO


def test_repairable_and_unrepairable_faults_together_exit_4(
        state_dir: Path, wl: Workload) -> None:
    inject(state_dir, wrong_refcount(wl))
    inject(state_dir, map_free_slot(wl, "vms/empty", 0))
    report = fsck.check(state_dir, repair=True)
    assert kinds(report) == {"refcount", "missing-block"}
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    assert {p.kind for p in report.problems if p.repaired} == {"refcount"}
    assert kinds(fsck.check(state_dir)) == {"missing-block"}


def test_a_data_file_of_no_chain_is_removed(state_dir: Path) -> None:
    """rmdir commits before it deletes the chain's data file; a crash between leaves it."""
    workload(state_dir)
    stray = state_dir / "data" / "99.blocks"
    stray.write_bytes(block(9))
    report = fsck.check(state_dir)
    assert [problem.kind for problem in report.problems] == ["stray-data-file"]
    assert fsck.check(state_dir, repair=True).exit_code == fsck.EXIT_REPAIRED
    assert not stray.exists()
    assert fsck.check(state_dir).clean


def test_a_free_slot_that_still_holds_data_is_punched(state_dir: Path) -> None:
    """A crash while its punch was pending (or a write that filled it and failed,
    if the daemon died before punching it)."""
    with closing(Volume(state_dir)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        vol.write(file.ino, 0, block(1) + block(2))
        vol.write(file.ino, 0, block(3))  # slot 0 is freed (and punched at close)
        assert vol.free_slots(chain.chain) == {0}
        data_file = vol.store.path(chain.chain)
    with open(data_file, "r+b") as data:
        data.write(block(1))  # slot 0 occupies disk space again
    report = fsck.check(state_dir)
    assert [problem.kind for problem in report.problems] == ["unpunched-free-slot"]
    # The next mount punches it by itself: information, not a problem.
    assert report.problems[0].info and report.clean and report.exit_code == fsck.EXIT_CLEAN
    repaired = fsck.check(state_dir, repair=True)
    assert repaired.problems[0].repaired and repaired.exit_code == fsck.EXIT_CLEAN
    assert fsck.check(state_dir).problems == []
    assert data_file.stat().st_blocks * 512 == 2 * BS


def test_priorities_are_clean_and_a_stray_one_is_repaired(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with closing(Volume(state)) as volume:
        chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        kept = volume.create(chain.ino, b"a", stat.S_IFREG | 0o600, 0, 0)
        gone = volume.create(chain.ino, b"b", stat.S_IFREG | 0o600, 0, 0)
        volume.set_priority(kept.ino, 5)
        volume.set_priority(gone.ino, -1)
        volume.unlink(chain.ino, b"b", still_open=False)  # its priority goes with it
        assert volume.priorities() == {kept.ino: 5}
        with volume.index.begin(write=True) as txn:
            txn.put_priority(999, 3)  # a priority of no file
    report = fsck.check(state, repair=True)
    assert [problem.kind for problem in report.problems] == ["stray-priority"]
    assert report.exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state).clean


def test_a_check_that_cannot_finish_exits_8(
        state_dir: Path, wl: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error no check foresaw (a damage of a kind not yet met) is a report
    with e2fsck's exit code 8, never a traceback out of fsck."""
    def broken(self: object, *args: object) -> None:
        raise ValueError("unforeseen")

    monkeypatch.setattr(fsck._Checker, "check_chain", broken)
    report = fsck.check(state_dir, repair=True)
    assert [problem.kind for problem in report.problems] == [fsck.CHECK_FAILED]
    assert report.exit_code == fsck.EXIT_FAILED
    monkeypatch.undo()
    assert fsck.check(state_dir).clean, "nothing was committed"


def flip_entry(wl: Workload, slot: int) -> Callable[[Txn], None]:
    """Flip a bit of slot *slot*'s entry in the vms chain's slot table."""
    def fault(txn: Txn) -> None:
        chain_id = wl.chain.chain
        raw = bytearray(dict(txn.iter_slot_runs(chain_id))[0])
        raw[slot * 24 + 3] ^= 0x04
        txn.put_slot_run(chain_id, 0, bytes(raw))
    return fault


def test_a_lost_slot_entry_is_rebuilt_from_the_data_and_the_maps(
        state_dir: Path, wl: Workload) -> None:
    with closing(Volume(state_dir)) as vol:
        used = vol.mapped(wl.inos["vms/base"])[0]
        free = min(vol.free_slots(wl.chain.chain))
        refcounts = {slot: rc for slot, (_, rc) in vol.blocks(wl.chain.chain).items()}
    inject(state_dir, flip_entry(wl, used))
    inject(state_dir, flip_entry(wl, free))
    report = fsck.check(state_dir)
    assert kinds(report) == {"corrupt-slot"} and len(report.problems) == 2
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    with closing(Volume(state_dir)) as vol, pytest.raises(SwapfsError) as info:
        vol.read(wl.inos["vms/base"], 0, BS)
    assert info.value.errno == errno.EIO
    report = fsck.check(state_dir, repair=True)
    assert {p.kind for p in report.problems} <= {"corrupt-slot", "unpunched-free-slot"}
    assert report.exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state_dir).clean
    assert_contents(state_dir, wl)
    with closing(Volume(state_dir)) as vol:
        assert {slot: rc for slot, (_, rc) in vol.blocks(wl.chain.chain).items()} == refcounts
        assert free in vol.free_slots(wl.chain.chain)


def test_a_whole_lost_slot_run_is_rebuilt(state_dir: Path, wl: Workload) -> None:
    inject(state_dir, lambda txn: txn.delete_slot_run(wl.chain.chain, 0))
    assert fsck.check(state_dir).exit_code == fsck.EXIT_UNREPAIRED
    assert fsck.check(state_dir, repair=True).exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state_dir).clean
    assert_contents(state_dir, wl)


def test_a_lost_slot_entry_is_left_alone_while_a_map_is_damaged(
        state_dir: Path, wl: Workload) -> None:
    """With a map run lost, the maps no longer say which slots are used:
    nothing proves the slot free, so its entry is not rebuilt."""
    ino = wl.inos["vms/base"]
    with closing(Volume(state_dir)) as vol:
        used = vol.mapped(ino)[0]
        vol.write(ino, (MAP_RUN + 1) * BS, block(42))
    inject(state_dir, flip_entry(wl, used))
    inject(state_dir, lambda txn: txn.delete_map_run(ino, 1))
    report = fsck.check(state_dir, repair=True)
    assert "corrupt-slot" in kinds(report)
    assert not any(p.repaired for p in report.problems if p.kind == "corrupt-slot")
    assert report.exit_code == fsck.EXIT_UNREPAIRED


def test_keys_under_no_chain_are_found_whatever_their_prefix(
        state_dir: Path, wl: Workload) -> None:
    def fault(txn: Txn) -> None:
        txn.put_slot_run(999, 0, bytes(4080))
        txn.put_damaged(999, 5)
    inject(state_dir, fault)
    report = fsck.check(state_dir)
    assert kinds(report) == {"stray-slot-run", "stale-damaged-mark"}
    assert fsck.check(state_dir, repair=True).exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state_dir).clean
    assert_contents(state_dir, wl)
