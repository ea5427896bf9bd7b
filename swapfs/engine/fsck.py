"""The offline checker: recompute what the index claims from first principles.

It verifies the checksum of every record, rebuilds every refcount from the
files' maps and every count from the entries it counts, and every digest
from the data in its slot (opening it, in an encrypted state), then reports
each difference. With ``repair`` it
fixes what can be fixed without inventing data: refcounts, leaked and
unpunched slots, maps past the end of a file, dangling directory entries,
orphans and priorities of missing files, the files' run directories; and
it sets aside each block whose data no longer matches its digest
(swapfs/engine/slottable.py), so that no write dedups onto it. Damage it cannot undo (a record
that does not verify, a map that lost a run, a block whose data no longer
matches its digest) is reported and left alone; reads of what it touches
keep answering EIO rather than returning wrong bytes. While any record is
damaged, refcounts are only ever raised, never lowered: a damaged map run
may hold references that nothing else shows.

Exit codes of ``swapfs fsck`` follow e2fsck: 0 clean (or only information:
what the next mount fixes by itself, such as free slots a crash left
unpunched), 1 problems found and all repaired, 4 problems left
(unrepairable or not asked to repair), 8 the check could not run (no
state, the state in use: ``swapfs fsck``) or stopped (an error no check
foresaw, logged with its traceback).
"""

import collections
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from swapfs.engine.blocks import blocks_for
from swapfs.engine.chainwrite import load_block
from swapfs.engine.errors import CorruptBlock, SwapfsError
from swapfs.engine.filemap import MAP_RUN, FileMap
from swapfs.engine.index import ROOT_INO, Chain, CorruptIndex, Inode, Txn
from swapfs.engine.keys import MasterKey
from swapfs.engine.slottable import RUN_BYTES, SLOT_RUN, SlotTable
from swapfs.engine.state import OldFormat, State

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_UNREPAIRED = 4
EXIT_FAILED = 8

#: The problem of a check that could not finish (exit code 8).
CHECK_FAILED = "check-failed"


@dataclass
class Problem:
    """One difference between the index and what it should say. One that is
    *info* only (the next mount fixes it by itself) counts for no exit code."""

    kind: str
    detail: str
    repaired: bool = False
    info: bool = False


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    blocks_checked: int = 0

    @property
    def serious(self) -> list[Problem]:
        """The problems that are not information only."""
        return [problem for problem in self.problems if not problem.info]

    @property
    def clean(self) -> bool:
        return not self.serious

    @property
    def exit_code(self) -> int:
        serious = self.serious
        if not serious:
            return EXIT_CLEAN
        if any(problem.kind == CHECK_FAILED for problem in serious):
            return EXIT_FAILED
        if all(problem.repaired for problem in serious):
            return EXIT_REPAIRED
        return EXIT_UNREPAIRED


class _Checker:
    def __init__(self, opened: State, txn: Txn, repair: bool, report: Report) -> None:
        self.opened = opened
        self.txn = txn
        self.repair = repair
        self.report = report
        self.punch: dict[int, list[int]] = collections.defaultdict(list)
        self.remove: list[int] = []  # chains whose stray data files go
        #: A record did not verify: what it held is unknown, so nothing that
        #: might be its (maps, slot runs) is deleted and no refcount lowered.
        self.damaged = False
        #: Per chain, slots whose references a repair removed from a map.
        self.released: dict[int, collections.Counter[int]] = collections.defaultdict(
            collections.Counter)

    def problem(self, kind: str, detail: str, repairable: bool, info: bool = False) -> bool:
        """Record a problem; True when the caller should repair it now."""
        fix = self.repair and repairable
        self.report.problems.append(Problem(kind, detail, repaired=fix, info=info))
        log.info("%s: %s%s", kind, detail, " (repaired)" if fix else "")
        return fix

    def run(self) -> None:
        self.check_records()
        self.check_namespace()
        self.check_maps_and_slots()
        self.check_data_files()

    def check_data_files(self) -> None:
        """Every data and seal file belongs to a chain (rmdir may die before
        deleting them)."""
        chains = {chain.id_ for chain in self.txn.iter_chains()}
        for chain_id, path in self.opened.store.chain_files():
            if chain_id not in chains and self.problem(
                    "stray-data-file", f"{path} belongs to no chain", True):
                self.remove.append(chain_id)

    def check_namespace(self) -> None:
        """Every entry names a live inode; every file has a name or is an orphan."""
        txn = self.txn
        inodes = {inode.ino: inode for inode in txn.iter_inodes()}
        chains = {chain.id_ for chain in txn.iter_chains()}
        named: set[int] = {ROOT_INO}
        for parent, name, child in list(txn.iter_all_dirents()):
            if child not in inodes or parent not in inodes:
                if self.problem("dangling-entry", f"{parent}/{name!r} -> {child}", True):
                    txn.delete_dirent(parent, name)
                continue
            named.add(child)
        for ino in list(txn.iter_orphans()):
            if ino not in inodes:
                if self.problem("dangling-orphan", f"orphan {ino} has no inode", True):
                    txn.delete_orphan(ino)
            else:
                named.add(ino)  # unlinked while open: the next mount purges it
        for ino, inode in inodes.items():
            if inode.chain and inode.chain not in chains:
                self.problem("missing-chain", f"inode {ino} belongs to missing chain "
                             f"{inode.chain}", False)
            if ino not in named and self.problem(
                    "unnamed-inode", f"inode {ino} has no directory entry", not inode.is_dir):
                self.forget_file(ino)
        for ino, _priority in list(txn.iter_priorities()):
            owner = inodes.get(ino)
            if (owner is None or owner.is_dir) and self.problem(
                    "stray-priority", f"priority of missing file {ino}", True):
                txn.delete_priority(ino)

    def forget_file(self, ino: int) -> None:
        """Drop a file that nothing names; the refcount pass frees its blocks."""
        self.txn.delete_map_runs(ino)
        self.txn.delete_inode(ino)
        self.txn.delete_orphan(ino)
        self.txn.delete_priority(ino)

    def check_records(self) -> None:
        """Every checksummed record verifies; iterators skip those that do not.
        A run directory is left to check_map_dir: it says nothing that the
        runs do not, and is rebuilt from them."""
        for db, key in self.txn.corrupt_records():
            if db == "mapdirs":
                continue
            self.damaged = True
            self.problem("corrupt-record", f"{db} record {key.hex()} does not verify", False)
        self.txn.lenient = True

    def check_maps_and_slots(self) -> None:
        txn = self.txn
        inodes = {inode.ino: inode for inode in txn.iter_inodes()}
        uses: dict[int, collections.Counter[int]] = collections.defaultdict(
            collections.Counter)
        maps = {}
        for ino in list(txn.iter_mapped_inos()):
            inode = inodes.get(ino)
            if inode is None or inode.is_dir:
                if self.problem("stray-map", f"map of missing file {ino}", not self.damaged):
                    txn.delete_map_runs(ino)
                continue
            maps[ino] = FileMap.load(txn, inode)
        for ino, inode in inodes.items():
            if inode.is_dir:
                continue
            fmap = maps.get(ino) or FileMap.load(txn, inode)
            for run in sorted(fmap.bad_runs):
                self.damaged = True
                self.problem("corrupt-map-run", f"file {ino} blocks {run * MAP_RUN}.."
                             f"{(run + 1) * MAP_RUN - 1}: the map run does not verify", False)
            past = [block for block, _ in fmap.mapped(blocks_for(inode.size))]
            if past and self.problem("map-past-end", f"file {ino} maps {len(past)} blocks "
                                     f"past its size {inode.size}", True):
                dropped = fmap.pop_range(blocks_for(inode.size))
                inode.blocks -= len(dropped)
                fmap.save(txn)
                txn.put_inode(inode)
                self.released[inode.chain].update(dropped)
            mapped = sum(1 for _ in fmap.mapped())
            if not fmap.bad_runs and mapped != inode.blocks:
                self.damaged = True
                self.problem("block-count", f"file {ino} counts {inode.blocks} blocks, its "
                             f"map holds {mapped}: a run of it may be lost", False)
            uses[inode.chain].update(slot for _, slot in fmap.mapped())
            self.check_map_dir(inode, fmap)
        self.check_stray_map_dirs(inodes)
        # Every record and map verified: the maps alone say which slots are
        # used and how often, so a lost slot entry can be rebuilt.
        maps_intact = not self.damaged
        for chain in list(txn.iter_chains()):
            self.check_chain(chain, uses.pop(chain.id_, collections.Counter()), maps_intact)
        for chain_id, counter in uses.items():
            if counter:
                self.problem("missing-chain", f"files map {sum(counter.values())} blocks of "
                             f"missing chain {chain_id}", False)
        self.check_strays()

    def check_map_dir(self, inode: Inode, fmap: FileMap) -> None:
        """The file's run directory names exactly the runs of its map that
        LMDB holds. While the runs do not add up to the inode's count, a run
        named but missing is a lost run, not a wrong name: it stays named, so
        that its blocks read EIO and not zeros; and a directory missing or
        damaged then is not rebuilt (the file's map is read whole instead)."""
        txn, ino = self.txn, inode.ino
        present = fmap.directory()
        try:
            stored = txn.get_map_dir(ino)
        except CorruptIndex:
            stored, what = None, "does not verify"
        else:
            if stored is None and not present:
                return
            what = "is missing" if stored is None else "names other runs than its map has"
        want: bytes | None = present
        if not fmap.complete:
            want = None if stored is None else _union(stored, present)
        if stored is not None and stored == want:
            return
        if self.problem("map-directory", f"file {ino}: its run directory {what}"
                        + ("" if want is not None else ", and a run of its map is lost"),
                        want is not None) and want is not None:
            if want:
                txn.put_map_dir(ino, want)
            else:
                txn.delete_map_dir(ino)

    def check_stray_map_dirs(self, inodes: dict[int, Inode]) -> None:
        """Every run directory belongs to a file."""
        for key in self.txn.keys_of(b"mapdirs"):
            owner = inodes.get(int.from_bytes(key, "big")) if len(key) == 8 else None
            if (owner is None or owner.is_dir) and self.problem(
                    "stray-map-directory", f"mapdirs key {key.hex()} belongs to no file",
                    True):
                self.txn.delete_key(b"mapdirs", key)

    def check_strays(self) -> None:
        """Slot runs and damaged marks under no chain: every key of those
        databases is read, whatever its prefix (a chain's own are checked
        with it)."""
        txn = self.txn
        chains = {chain.id_ for chain in txn.iter_chains()}
        for name, kind in ((b"slots", "stray-slot-run"), (b"damaged", "stale-damaged-mark")):
            for key in txn.keys_of(name):
                if len(key) == 8 and int.from_bytes(key[:4], "big") in chains:
                    continue
                if self.problem(kind, f"{name.decode()} key {key.hex()} belongs to no chain",
                                not self.damaged):
                    txn.delete_key(name, key)

    def check_chain(self, chain: Chain, uses: collections.Counter[int],
                    maps_intact: bool) -> None:
        txn, store = self.txn, self.opened.store
        chain_id = chain.id_
        keys = self.opened.chain_keys(chain)
        table = SlotTable.load(txn, chain)
        for run, raw in list(txn.iter_slot_runs(chain_id)):
            if run * SLOT_RUN >= chain.next_slot or len(raw) != RUN_BYTES:
                beyond = run * SLOT_RUN >= chain.next_slot
                if self.problem("stray-slot-run", f"chain {chain_id} slot run {run} is "
                                + ("past the end" if beyond else "malformed"),
                                beyond and not self.damaged):
                    txn.delete_slot_run(chain_id, run)
        lost = bool(table.bad)
        for slot in sorted(table.bad):
            # A lost entry is rebuilt from what is on disk: its digest from the
            # slot's data (keyed, so only this chain's key makes it) or from
            # its verified seal record, its refcount from the maps, which must
            # all have verified; a slot no map names is then provably free.
            want = uses.get(slot, 0)
            digest = (keys.recover_digest(slot, *store.read_slot(chain_id, slot, keys.sealed))
                      if want else None)
            rebuildable = maps_intact and (not want or digest is not None)
            if self.problem("corrupt-slot", f"chain {chain_id} slot {slot}: its entry is "
                            "missing or does not verify"
                            + (f" ({want} blocks map it)" if want else ""), rebuildable):
                table.rebuild(slot, digest, want)
            else:
                self.damaged = True
        for slot in sorted(set(txn.iter_damaged(chain_id)) - table.damaged):
            if self.problem("stale-damaged-mark", f"chain {chain_id} slot {slot} is marked "
                            "damaged but holds no block", not self.damaged):
                txn.delete_damaged(chain_id, slot)
        for slot in sorted(set(uses) - set(range(chain.next_slot))):
            self.problem("missing-block", f"chain {chain_id} slot {slot} past the end is "
                         f"mapped {uses[slot]} times", False)
        punch = self.punch[chain_id]
        for slot, count in self.released.pop(chain_id, {}).items():
            if table.unref(slot, count):  # references of map entries repaired away
                punch.append(slot)
        for slot in range(chain.next_slot):
            if slot in table.bad:
                continue
            want = uses.get(slot, 0)
            have = table.refcount(slot)
            if have == 0:
                if want:
                    self.problem("missing-block", f"chain {chain_id} slot {slot} is free "
                                 f"but mapped {want} times", False)
                elif store.holds_data(chain_id, slot) and self.problem(
                        "unpunched-free-slot", f"chain {chain_id} free slot {slot} still "
                        "occupies disk space (the next mount punches it)", True, info=True):
                    punch.append(slot)
                continue
            self.report.blocks_checked += 1
            digest = table.digest(slot)
            if want != have and self.problem(
                    "refcount", f"chain {chain_id} slot {slot} counts {have} references, "
                    f"is mapped {want} times", want > have or not self.damaged):
                if want > have:
                    table.ref(slot, want - have)
                elif table.unref(slot, have - want):
                    punch.append(slot)
            if not want:
                continue  # nothing reads it: its data does not matter
            try:
                load_block(store, keys, slot, digest)
            except CorruptBlock:
                # Its data is lost; set aside (with --repair), no write dedups onto it.
                self.problem("corrupt-block", f"chain {chain_id} slot {slot} does not "
                             f"match digest {digest.hex()}", False)
                table.set_aside(slot)
                continue
            if slot in table.damaged and self.problem(
                    "stale-damaged-mark", f"chain {chain_id} slot {slot} is marked damaged "
                    "but its data matches its digest", True):
                table.clear_mark(slot)
        used = sum(1 for _ in table.used())
        if used != table.stored and (lost or self.problem(
                "chain-count", f"chain {chain_id} counts {table.stored} blocks stored, "
                f"holds {used}", True)):
            table.stored = used  # a lost entry may or may not have been counted
        table.save(txn)


def _union(one: bytes, other: bytes) -> bytes:
    """The runs either of two run directories names."""
    return (int.from_bytes(one, "little") | int.from_bytes(other, "little")).to_bytes(
        max(len(one), len(other)), "little").rstrip(b"\0")


def check(state: Path, repair: bool = False, upgrade: bool = False,
          master: MasterKey | None = None, claim: Callable[[], int | None] | None = None,
          guard: Callable[[], None] | None = None,
          restamp: Callable[[int], int] | None = None) -> Report:
    """Check (and optionally repair) the state directory of an unmounted swapfs,
    opened with its *master* key if it is encrypted.

    An index of an earlier format is converted first with *upgrade* or
    *repair*; otherwise it is reported as ``old-format`` and left as it is.
    *claim*, *guard* and *restamp* take, check and re-stamp the state's
    lease (``State``; ``swapfs.engine.lease.Offline``).
    """
    try:
        opened = State(state, recover=False, upgrade=upgrade or repair, master=master,
                       claim=claim, guard=guard, restamp=restamp, restore_metas=repair)
    except (CorruptIndex, OldFormat, lmdb.Error) as exc:  # nothing is readable as it stands
        return _unreadable(exc)
    try:
        while True:
            try:
                report = _check(opened, repair)
                if opened.restored is not None:
                    report.problems.insert(0, Problem("meta-pages", opened.restored, True))
                return report
            except lmdb.MapFullError:  # the repairs need a bigger index: again
                opened.index.grow()
            except lmdb.Error as exc:
                return _unreadable(exc)
            except Exception as exc:  # a damage no check foresaw: say so, as e2fsck does
                log.exception("the check stopped")
                report = Report()
                report.problems.append(Problem(CHECK_FAILED, f"the check stopped: {exc!r}"))
                return report
    finally:
        opened.close()


def _unreadable(exc: Exception) -> Report:
    """The report of an index that cannot be checked as it stands: an old
    format, or an index damaged past reading (its format record, its meta
    pages, pages LMDB itself finds damaged)."""
    report = Report()
    kind = "old-format" if isinstance(exc, OldFormat) else "corrupt-index"
    if isinstance(exc, lmdb.Error):
        exc = SwapfsError(errno.EIO, f"LMDB finds the index damaged: {exc}")
    report.problems.append(Problem(kind, str(exc)))
    return report


def _check(opened: State, repair: bool) -> Report:
    report = Report()
    txn = opened.index.begin(write=True)
    try:
        checker = _Checker(opened, txn, repair, report)
        checker.run()
    except BaseException:
        txn.abort()
        raise
    if not repair:
        txn.abort()
        return report
    txn.commit()
    opened.sync()  # the blocks the repairs freed are the last checkpoint's until then
    for chain_id, slots in checker.punch.items():
        opened.store.punch(chain_id, slots)
    for chain_id in checker.remove:
        opened.store.remove(chain_id)
    return report
