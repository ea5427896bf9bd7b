"""The offline checker: recompute what the index claims from first principles.

It rebuilds every refcount from the files' maps, every counter from the
entries it counts, and every digest from the data in its slot, then reports
each difference. With ``repair`` it fixes what can be fixed without
inventing data: counters, refcounts, free lists, leaked slots, dangling
directory entries, orphans and priorities of missing files. A block whose data no longer matches its
digest cannot be repaired; reads of it keep answering EIO rather than
returning wrong bytes.

Exit codes of ``swapfs fsck`` follow e2fsck: 0 clean, 1 problems found and
all repaired, 4 problems left (unrepairable or not asked to repair).
"""

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from swapfs.blocks import BLOCK_SIZE, blocks_for
from swapfs.digest import block_digest
from swapfs.index import ROOT_INO, BlockRef, Txn
from swapfs.volume import Volume

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_UNREPAIRED = 4


@dataclass
class Problem:
    """One difference between the index and what it should say."""

    kind: str
    detail: str
    repaired: bool = False


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    blocks_checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return EXIT_CLEAN
        if all(problem.repaired for problem in self.problems):
            return EXIT_REPAIRED
        return EXIT_UNREPAIRED


class _Checker:
    def __init__(self, volume: Volume, txn: Txn, repair: bool, report: Report) -> None:
        self.volume = volume
        self.txn = txn
        self.repair = repair
        self.report = report
        self.punch: dict[int, list[int]] = collections.defaultdict(list)
        self.remove: list[int] = []  # chains whose stray data files go

    def problem(self, kind: str, detail: str, repairable: bool) -> bool:
        """Record a problem; True when the caller should repair it now."""
        fix = self.repair and repairable
        self.report.problems.append(Problem(kind, detail, repaired=fix))
        log.info("%s: %s%s", kind, detail, " (repaired)" if fix else "")
        return fix

    def run(self) -> None:
        self.check_namespace()
        self.check_maps_and_blocks()
        self.check_data_files()

    def check_data_files(self) -> None:
        """Every data file belongs to a chain (rmdir may die before deleting it)."""
        chains = {chain.id_ for chain in self.txn.iter_chains()}
        for chain_id, path in sorted(self.volume.store.chain_files().items()):
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
        self.txn.pop_maps(ino, 0)
        self.txn.delete_inode(ino)
        self.txn.delete_orphan(ino)
        self.txn.delete_priority(ino)

    def check_maps_and_blocks(self) -> None:
        txn = self.txn
        inodes = {inode.ino: inode for inode in txn.iter_inodes()}
        uses: dict[int, collections.Counter[bytes]] = collections.defaultdict(
            collections.Counter)
        mapped: collections.Counter[int] = collections.Counter()
        for ino, block, digest in list(txn.iter_all_maps()):
            inode = inodes.get(ino)
            if inode is None or inode.is_dir:
                if self.problem("stray-map", f"map entry of missing file {ino}", True):
                    txn.delete_map(ino, block)
                continue
            if block >= blocks_for(inode.size):
                if self.problem("map-past-end", f"file {ino} maps block {block} past "
                                f"its size {inode.size}", True):
                    txn.delete_map(ino, block)
                continue
            uses[inode.chain][digest] += 1
            mapped[ino] += 1
        for ino, inode in inodes.items():
            if not inode.is_dir and inode.blocks != mapped[ino] and self.problem(
                    "block-count", f"file {ino} counts {inode.blocks} blocks, "
                    f"maps {mapped[ino]}", True):
                inode.blocks = mapped[ino]
                txn.put_inode(inode)
        for chain in list(txn.iter_chains()):
            self.check_chain(chain.id_, uses[chain.id_])

    def check_chain(self, chain_id: int, uses: collections.Counter[bytes]) -> None:
        txn = self.txn
        chain = txn.get_chain(chain_id)
        assert chain is not None
        store = self.volume.store
        owner: dict[int, bytes] = {}
        stored = 0
        for digest, ref in list(txn.iter_blocks(chain_id)):
            want = uses.pop(digest, 0)
            if want == 0:
                if self.problem("unreferenced-block", f"chain {chain_id} block "
                                f"{digest.hex()} (slot {ref.slot}) is mapped by nothing",
                                True):
                    txn.delete_block(chain_id, digest)
                    continue
            elif ref.refcount != want and self.problem(
                    "refcount", f"chain {chain_id} block {digest.hex()} "
                    f"counts {ref.refcount}, is mapped {want} times", True):
                txn.put_block(chain_id, digest, BlockRef(ref.slot, want))
            stored += 1
            self.report.blocks_checked += 1
            if ref.slot in owner:
                self.problem("shared-slot", f"chain {chain_id} slot {ref.slot} holds two "
                             "digests", False)
            owner[ref.slot] = digest
            if ref.slot >= chain.next_slot and self.problem(
                    "slot-past-end", f"chain {chain_id} slot {ref.slot} is past "
                    f"next_slot {chain.next_slot}", True):
                chain.next_slot = ref.slot + 1
            data = store.read(chain_id, ref.slot)
            if len(data) != BLOCK_SIZE or block_digest(chain.key, data) != digest:
                self.problem("corrupt-block", f"chain {chain_id} slot {ref.slot} does not "
                             f"match digest {digest.hex()}", False)
        for digest, count in uses.items():
            self.problem("missing-block", f"chain {chain_id} has no block {digest.hex()} "
                         f"mapped {count} times", False)
        if chain.stored != stored and self.problem(
                "stored-count", f"chain {chain_id} counts {chain.stored} stored "
                f"blocks, holds {stored}", True):
            chain.stored = stored
        free = set(txn.iter_free(chain_id))
        for slot in sorted(free & owner.keys()):
            if self.problem("free-in-use", f"chain {chain_id} slot {slot} is free and used",
                            True):
                txn.delete_free(chain_id, slot)
        for slot in sorted(free):
            if slot >= chain.next_slot and self.problem(
                    "free-past-end", f"chain {chain_id} free slot {slot} is past the end",
                    True):
                txn.delete_free(chain_id, slot)
        leaked = set(range(chain.next_slot)) - free - owner.keys()
        for slot in sorted(free - owner.keys()):
            if slot < chain.next_slot and store.holds_data(chain_id, slot) and self.problem(
                    "unpunched-free-slot", f"chain {chain_id} free slot {slot} still occupies "
                    "disk space", True):
                self.punch[chain_id].append(slot)
        for slot in sorted(leaked):
            if self.problem("leaked-slot", f"chain {chain_id} slot {slot} is neither used "
                            "nor free", True):
                txn.put_free(chain_id, slot)
                self.punch[chain_id].append(slot)
        txn.put_chain(chain)


def check(state: Path, repair: bool = False) -> Report:
    """Check (and optionally repair) the state directory of an unmounted volume."""
    volume = Volume(state, recover=False)
    try:
        while True:
            try:
                return _check(volume, repair)
            except lmdb.MapFullError:  # the repairs need a bigger index: again
                volume.index.grow()
    finally:
        volume.close()


def _check(volume: Volume, repair: bool) -> Report:
    report = Report()
    txn = volume.index.begin(write=True)
    try:
        checker = _Checker(volume, txn, repair, report)
        checker.run()
    except BaseException:
        txn.abort()
        raise
    if not repair:
        txn.abort()
        return report
    txn.commit()
    for chain_id, slots in checker.punch.items():
        volume.store.punch(chain_id, slots)
    for chain_id in checker.remove:
        volume.store.remove(chain_id)
    return report
