"""Opening a state directory, and what is held while it is open.

A :class:`State` is one state directory, open and locked for this process:
the LMDB index (:class:`~swapfs.engine.index.Index`), the chains' data
files (:class:`~swapfs.engine.store.BlockStore`) and the keys. Opening it
takes the lock and the lease, secures the modes, checks (and converts) the
index's format (rolling it back to its checkpoint if its machine stopped
while it was in use, ``swapfs/engine/checkpoint.py``), checks the master
key, and, unless told otherwise, purges the files left unlinked-while-open.
Changing
the keys of the whole state (:meth:`State.rekey`, :meth:`State.reseal`)
is done here too, as is closing it.

While it is open, a State also keeps runs of the file maps and the chains'
slot tables in memory (``swapfs/engine/filemap.py``, ``swapfs/engine/slottable.py``),
each read and verified the first time it is used, within the bounds
``map_cache_bytes`` and ``slot_cache_bytes``, and the scan of the slot
tables that finds their free slots and builds their dedup tables
(:meth:`State.scan_step`); every transaction that
changes them does so through a :class:`~swapfs.engine.chainwrite.ChainWrite`
(:meth:`State.change`). ``fsck`` and ``swapfs rekey`` use a State alone;
:class:`~swapfs.engine.volume.Volume` builds the namespace and the data path
on one.
"""

import errno
import fcntl
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import lmdb

from swapfs.engine import cleanmark, keys, reseal, statedir, upgrade
from swapfs.engine.chainwrite import ChainWrite
from swapfs.engine.deduptable import DedupBudget
from swapfs.engine.digest import new_key
from swapfs.engine.errors import CorruptBlock, CorruptIndex, SwapfsError
from swapfs.engine.filemap import MAP_CACHE_BYTES, FileMap, RunCache
from swapfs.engine.index import FORMAT_VERSION, KIND_DIR, ROOT_INO, Chain, Index, Inode, Txn
from swapfs.engine.lookup import chain_of, file_of
from swapfs.engine.reclaim import PendingPunches
from swapfs.engine.sealing import BLOCK_KEYS, LEGACY, PLAIN, ChainKeys
from swapfs.engine.slottable import RUN_BYTES, SLOT_CACHE_BYTES, SLOT_RUN, SlotTable
from swapfs.engine.store import BlockStore

log = logging.getLogger(__name__)

INDEX_NAME = "index.lmdb"


class IndexWriter(Protocol):
    """What :func:`writes_index` needs of the object whose method it runs."""

    @property
    def index(self) -> Index: ...

    def found_damaged(self, exc: CorruptBlock) -> None: ...


W = TypeVar("W", bound=IndexWriter)
P = ParamSpec("P")
R = TypeVar("R")


def writes_index(method: Callable[Concatenate[W, P], R]) -> Callable[Concatenate[W, P], R]:
    """Run a method that writes the index: again, once the index has grown,
    when its transaction found the index's map full (so nothing of it
    happened; Index.grow answers ENOSPC when the disk has no room); after
    it, let the index keep room ahead of the next one. A block it found
    damaged is set aside before the EIO goes out (State.found_damaged)."""
    @functools.wraps(method)
    def run(self: W, *args: P.args, **kwargs: P.kwargs) -> R:
        while True:
            try:
                result = method(self, *args, **kwargs)
            except lmdb.MapFullError:
                self.index.grow()
                continue
            except CorruptBlock as exc:
                self.found_damaged(exc)
                raise
            self.index.keep_room()
            return result
    return run


class OldFormat(SwapfsError):
    """An index of an earlier format, opened without leave to convert it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


#: A slot table of at most this many slots is scanned at once when a write
#: finds it needs a scan (about 2 ms), even where the scan runs in the
#: background: a small chain's dedup table fills fastest under churn.
INLINE_SCAN_SLOTS = 64 * SLOT_RUN
#: Runs of a larger table's scan each write transaction takes on (about
#: 1,400 slots, well under a millisecond), besides the background's steps.
WRITE_SCAN_RUNS = 8


class State:
    """One state directory: the index, the data files, the keys and the lock on them."""

    def __init__(self, path: Path, recover: bool = True,
                 still_open: Collection[int] = (),
                 claim: Callable[[], int | None] | None = None, create: bool = True,
                 upgrade: bool = True, dedup_table_bytes: int | None = None,
                 master: keys.MasterKey | None = None, encrypt: bool | None = None,
                 guard: Callable[[], None] | None = None,
                 restamp: Callable[[int], int] | None = None,
                 progress: Callable[[], None] | None = None,
                 reseal_to: keys.MasterKey | None = None,
                 restore_metas: bool = False, background_scan: bool = False,
                 slot_cache_bytes: int = SLOT_CACHE_BYTES,
                 map_cache_bytes: int = MAP_CACHE_BYTES) -> None:
        """Open (or create) the state directory *path*, locking it for this process.

        *recover* purges files left unlinked-while-open by the last mount,
        except those in *still_open*: a daemon taking over a live connection
        names the files the kernel still holds open. fsck opens without
        *recover* so that it sees the state exactly as left. *claim* runs
        once this process holds the state's flock and before its first
        write: where the state is shared between hosts, it takes the lease
        and returns its generation, which every write transaction checks
        against the one the index records (``Index.generation``);
        *guard* then raises (EROFS) whenever the lease does not allow a
        write, and is called before every write transaction and every data
        and seal write: once it refuses, the state is written no more and
        reads answer EIO, since another host may own it.
        *restamp* is called with the generation the index records when it
        is not below the claimed one (the lease file lost its generation
        since: broken when corrupt, or removed): it re-stamps the lease
        above it and returns the new generation (``Lease.restamp_above``).
        *progress* is called at each step of the opening (an orphan purged,
        a batch of blocks of a conversion sealed again), which can take
        long: the daemon reports it to whoever waits for its start.
        Without *create*, a state with no index is an error (ENOENT): a
        daemon taking over a live mount must serve the state the kernel
        knows, never a new, empty one. Without *upgrade*, an index of an
        earlier format is an error (:class:`OldFormat`) rather than
        converted (``swapfs/engine/upgrade.py``). *dedup_table_bytes* bounds the
        memory of all chains' dedup tables (``swapfs/engine/deduptable.py``; None:
        no bound). *map_cache_bytes* bounds the memory of the runs of the
        file maps read (``swapfs/engine/filemap.py``, :class:`RunCache`):
        past it, runs read longest ago are dropped, to be read again.

        An encrypted state opens only with its *master* key (ENOKEY without
        one, EKEYREJECTED with another). A new state is encrypted if
        *encrypt* says so, or, with *encrypt* None, if a *master* key is
        given. With *encrypt* True or False, a state in the other mode is
        refused (EINVAL): a state is wholly encrypted or wholly plain.
        An encrypted state of format 3 is converted by sealing it again
        (:meth:`reseal`), under *reseal_to* if given (``swapfs rekey
        --reseal``), else under *master*; *progress* is called at each
        batch of blocks sealed again.

        With *restore_metas* (``fsck --repair``), LMDB's meta pages are
        written back as the clean mark has them where they differ, or a
        damaged mark removed, under the flock and the lease, before LMDB
        reads them (``swapfs/engine/cleanmark.py``); ``restored`` says what.

        Nothing of a chain's slot table is read at open: its runs are read
        as they are used, at most *slot_cache_bytes* of them kept per chain.
        Its dedup table and free slots come from a scan of the whole table
        (``swapfs/engine/slottable.py``), made when the table is first used,
        or, with *background_scan*, by the caller a step at a time
        (:meth:`scan_step`), so that the open costs the same whatever the
        state holds. With *recover*, the scan punches the free slots it
        finds: a crash between a commit and its punch, or a write that
        failed after filling a free slot, leaves them holding data.
        """
        if not create and not ((path / INDEX_NAME / "data.mdb").is_file()
                               or reseal.pending(path)):
            raise SwapfsError(errno.ENOENT, f"{path} holds no swapfs index")
        path.mkdir(mode=statedir.DIR_MODE, parents=True, exist_ok=True)
        self.path = path
        self._lock_fd = _lock_state(path)
        try:
            # The lease first: another host's live one refuses this process
            # before it changes anything of the state, modes included.
            generation = claim() if claim is not None else None
            statedir.secure(path)
            if guard is not None:
                guard()  # the lease may have lapsed while it was claimed
            reseal.finish(path)  # one a crash interrupted
            #: What the repair of the meta pages did, if it did anything.
            self.restored = cleanmark.restore(path / INDEX_NAME) if restore_metas else None
            self._progress = progress
            self._background_scan = background_scan
            self._slot_runs_kept = max(slot_cache_bytes // RUN_BYTES, 16)
            #: A read-only check (fsck without --repair) syncs, checkpoints
            #: and punches nothing, even at close.
            self._writes = recover or restore_metas
            self._all_tables = False
            self.index = Index(path / INDEX_NAME, guard, generation or 0,
                               roll_back=recover or restore_metas)
            #: What the open did to roll the index back to its checkpoint
            #: after its machine stopped (swapfs/engine/checkpoint.py), if anything.
            self.rolled_back = self.index.rolled_back
            if generation and restamp is not None:
                recorded = self.index.recorded_generation()
                if recorded >= generation:
                    self.index.generation = restamp(recorded)
            self.store = BlockStore(path / "data", guard)
            #: Free slots whose disk space is not given back yet (punch_pending).
            self.pending = PendingPunches()
            self._hook_checkpoints()
            #: The file maps and slot tables in memory, by inode and chain
            #: (:meth:`map`, :meth:`table`); read them, change them only
            #: through a ChainWrite (:meth:`change`).
            self.maps: dict[int, FileMap] = {}
            #: The runs of those maps in memory, within their bound.
            self.map_runs = RunCache(self._read_map_run, map_cache_bytes)
            self.tables: dict[int, SlotTable] = {}
            self.dedup_budget = DedupBudget(dedup_table_bytes)
            self.master = master
            #: Each chain's keys, made when the chain is first used (chain_keys).
            self._keys: dict[int, ChainKeys] = {}
            legacy = self._format(create, upgrade, encrypt)
            self._check_key(encrypt)
            #: The chains sealed again as the state was converted (format 3,
            #: encrypted), else None.
            self.converted: int | None = None
            if legacy:
                self.converted = self.reseal(reseal_to or self.master, self._reseal_step)
                self._add_map_dirs()
            if recover:
                self._purge_orphans(still_open)
            if not background_scan:
                self._scan_all()
            if self._writes and self.index.checkpointed is None and self.index.writable():
                self.sync()  # a new index, or one of a format before checkpoints
            self._progress = None  # open: no more steps to report
        except BaseException:
            # Refused (wrong key, wrong mode, old format) or failed: nothing
            # stays open, so that the state can be opened again.
            if hasattr(self, "store"):
                self.store.close()
            if hasattr(self, "index"):
                self.index.close()
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        """Punch what is pending, flush everything to disk, release the state
        directory. A state that may no longer be written (fenced, or its lease
        lapsed) punches and flushes nothing: another host may own it."""
        if self._writes and self.index.writable():
            self.sync()
            self.punch_pending()
        self.store.close()
        self.index.close()
        os.close(self._lock_fd)

    def _hook_checkpoints(self) -> None:
        """Have the index flush the data files before each checkpoint, and
        make the slots freed so far reusable after it."""
        self.index.flush_data = self.store.sync
        self.index.checkpoint_taken = self.pending.covered

    def sync(self) -> None:
        """Make every committed change durable: a checkpoint (data files
        first, then the index, swapfs/engine/checkpoint.py), after which the
        slots freed so far may be reused and punched. EROFS once this
        process may no longer write the state."""
        self.check_writable(errno.EROFS)
        self.index.checkpoint()

    def synced(self) -> bool:
        """Whether every commit is durable already (:meth:`sync` has nothing to do)."""
        return self.index.commits == 0

    def punch_pending(self, max_slots: int | None = None,
                      freed_before: float | None = None) -> int:
        """Give back the disk space of free slots that still hold it, oldest first.

        At most *max_slots* slots (all with None), and only those freed
        before *freed_before* (a ``time.monotonic()`` time) if given; each run
        of consecutive slots is one hole punch. Returns how many slots were
        punched. Every slot punched is free in the committed index and taken
        by no transaction, so nothing live is lost; a state whose writes are
        fenced punches nothing, since another host may own its data files.
        """
        if not self.index.writable():
            return 0
        batch = self.pending.batch(max_slots, freed_before)
        for chain_id, slots in batch.items():
            self.store.punch(chain_id, slots)
            table = self.tables.get(chain_id)
            if table is not None:
                table.give_free(slots)
        return sum(len(slots) for slots in batch.values())

    def check_writable(self, err: int) -> None:
        """SwapfsError(*err*) once this process may no longer own the state."""
        if not self.index.writable():
            raise SwapfsError(err, self.index.fenced or f"the lease on {self.path} has "
                                                        "lapsed: another host may own it")

    # -- format and keys --------------------------------------------------------

    @writes_index
    def _format(self, create: bool, allow_upgrade: bool, encrypt: bool | None) -> bool:
        """Format a new index, or convert an old one; True for an encrypted
        state of format 3, which is converted by sealing it again once its
        key is checked (swapfs/engine/reseal.py)."""
        with self.index.begin() as txn:
            if upgrade.format_of(txn) == FORMAT_VERSION:
                return False  # no write: a read-only check stays one
        with self.index.begin(write=True) as txn:
            version = upgrade.format_of(txn)
            if version == FORMAT_VERSION:
                return False
            if version in (1, 2, 3, 4):
                if not allow_upgrade:
                    raise OldFormat(f"{self.path} holds an index of format {version}: "
                                    "mount it, or run swapfs fsck --upgrade")
                if version == 1:
                    upgrade.from_format_1(txn)
                if version <= 2:
                    upgrade.from_format_2(txn)
                if version <= 3:
                    if txn.get_meta(b"cipher") == LEGACY:
                        return True  # sealed again: format 5 at once
                    upgrade.from_format_3(txn)
                upgrade.from_format_4(txn)
                return False
            if version is not None:
                raise SwapfsError(errno.EINVAL, f"unknown index format {version}")
            if not create:
                raise SwapfsError(errno.ENOENT, f"{self.path} holds an empty swapfs index")
            if encrypt is None:
                encrypt = self.master is not None
            if encrypt:
                if self.master is None:
                    raise SwapfsError(errno.ENOKEY, f"cannot create an encrypted state in "
                                      f"{self.path} without a master key")
                txn.put_meta(b"cipher", BLOCK_KEYS)
                txn.put_meta(b"key_id", self.master.key_id)
            else:
                txn.put_meta(b"cipher", PLAIN)
            txn.put_meta(b"format", FORMAT_VERSION)
            txn.put_state_id(keys.new_state_id())
            txn.put_meta(b"next_ino", ROOT_INO + 1)
            txn.put_meta(b"next_chain", 1)
            now = time.time_ns()
            txn.put_inode(Inode(ROOT_INO, KIND_DIR, stat.S_IFDIR | 0o755, os.getuid(),
                                os.getgid(), 0, atime_ns=now, mtime_ns=now, ctime_ns=now))
            return False

    @writes_index
    def _add_map_dirs(self) -> None:
        """Give the files of a state converted from format 3 by a reseal
        their run directories: that format had none, and the reseal copies
        the maps as they are."""
        with self.index.begin(write=True) as txn:
            upgrade.add_map_dirs(txn)

    def _reseal_step(self, _chain_id: int, _done: int, _total: int) -> None:
        """A batch of blocks sealed again while the state opens: a step."""
        if self._progress is not None:
            self._progress()

    def _check_key(self, encrypt: bool | None) -> None:
        """Is the state encrypted (``encrypted``), and sealed as format 3 did
        (``legacy``)? Refuse it in the wrong mode or without its key."""
        with self.index.begin() as txn:
            cipher = txn.get_meta(b"cipher")
            key_id = txn.get_meta(b"key_id")
            #: The state's UUID, which its chain keys' wrap is bound to
            #: (None in a state of format 3).
            self.state_id = txn.get_state_id()
        if cipher not in (PLAIN, LEGACY, BLOCK_KEYS):
            raise CorruptIndex(f"{self.path} stores blocks in an unknown way ({cipher})")
        self.encrypted = encrypted = cipher != PLAIN
        self.legacy = cipher == LEGACY
        if encrypt is not None and encrypt != encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.path} holds "
                              + ("encrypted swap, and encryption is off" if encrypted else
                                 "unencrypted swap, and encryption is on")
                              + "; a state is never mixed (docs/encryption.md)")
        if not encrypted:
            return
        if key_id is None:
            raise CorruptIndex(f"{self.path} is encrypted but names no master key")
        if cipher == BLOCK_KEYS and self.state_id is None:
            # Its chain keys' wrap is bound to its UUID; one unbound (format
            # 3's) is never taken for it.
            raise CorruptIndex(f"{self.path} is encrypted but holds no state UUID")
        if self.master is None:
            raise SwapfsError(errno.ENOKEY, f"{self.path} is encrypted, and no master key "
                              f"was given (it needs key {keys.key_id_text(key_id)})")
        if self.master.key_id != key_id:
            raise SwapfsError(errno.EKEYREJECTED, f"{self.master.source} is key "
                              f"{keys.key_id_text(self.master.key_id)}, and {self.path} "
                              f"is encrypted with key {keys.key_id_text(key_id)}")

    def chain_keys(self, chain: Chain) -> ChainKeys:
        """The keys that name and seal the blocks of *chain*."""
        found = self._keys.get(chain.id_)
        if found is None:
            if self.encrypted:
                assert self.master is not None
                secret = self.master.unwrap(self.state_id, chain.id_, chain.key)
                found = ChainKeys.from_secret(chain.id_, secret, self.legacy)
            else:
                found = ChainKeys(chain.id_, chain.key)
            self._keys[chain.id_] = found
        return found

    def new_chain_key(self, chain_id: int) -> bytes:
        """A new chain's key as its record keeps it: wrapped if encrypted."""
        if not self.encrypted:
            return new_key()
        assert self.master is not None
        assert self.state_id is not None
        return self.master.wrap(self.state_id, chain_id, keys.new_chain_secret())

    @writes_index
    def rekey(self, new: keys.MasterKey) -> int:
        """Wrap every chain's secret under the master key *new* instead of
        the one this state was opened with, in one transaction; no block
        is rewritten. Returns the number of chains."""
        if not self.encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.path} is not encrypted")
        assert self.master is not None
        with self.index.begin(write=True) as txn:
            chains = list(txn.iter_chains())
            for chain in chains:
                secret = self.master.unwrap(self.state_id, chain.id_, chain.key)
                assert self.state_id is not None
                chain.key = new.wrap(self.state_id, chain.id_, secret)
                txn.put_chain(chain)
            txn.put_meta(b"key_id", new.key_id)
        self.master = new
        for chain_id in list(self.tables):  # they hold the old chain records
            self.drop_table(chain_id)
        return len(chains)

    def reseal(self, new: keys.MasterKey | None,
               progress: reseal.Progress | None = None) -> int:
        """Give every chain a new secret, seal every block again under it,
        and wrap the secrets under the master key *new*, leaving nothing of
        the old secrets or ciphertext in the state (``swapfs/engine/reseal.py``;
        *progress* is told as blocks are sealed). Returns the number of
        chains. The state is open again afterwards, on the new index and
        data files, with *new*."""
        if not self.encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.path} is not encrypted")
        if new is None:
            raise SwapfsError(errno.ENOKEY, f"{self.path} is sealed again only with a "
                              "master key")
        chains = reseal.build(self.path, self.index, self.store, self.chain_keys, new,
                              self.index.guard, progress)
        guard, generation = self.index.guard, self.index.generation
        self.store.close()
        self.index.close()
        reseal.finish(self.path)
        self.index = Index(self.path / INDEX_NAME, guard, generation)
        self.store = BlockStore(self.path / "data", guard)
        self.pending.clear()
        self._hook_checkpoints()
        for chain_id in list(self.tables):  # they hold the old digests
            self.drop_table(chain_id)
        self.maps.clear()
        self._keys.clear()
        self.master = new
        self._check_key(True)
        return chains

    # -- recovery at open -------------------------------------------------------

    def _purge_orphans(self, still_open: Collection[int]) -> None:
        """Delete files unlinked while open that nothing holds open any more."""
        with self.index.begin() as txn:
            orphans = [ino for ino in txn.iter_orphans() if ino not in still_open]
        for ino in orphans:
            log.info("purging orphaned file %d", ino)
            self.purge(ino)
            if self._progress is not None:
                self._progress()

    @writes_index
    def purge(self, ino: int) -> None:
        """Drop an unlinked file: unmap all its blocks, then forget it."""
        with self.index.begin(write=True) as txn:
            inode = file_of(txn, ino)
            change = self.change(txn, inode.chain)
            change.unmap_range(inode, 0)
            change.finish()
            txn.delete_map_runs(ino)  # and any run too damaged to load
            txn.delete_inode(ino)
            txn.delete_orphan(ino)
            txn.delete_priority(ino)
        self._drop_map(ino)

    # -- damage -----------------------------------------------------------------

    def found_damaged(self, exc: CorruptBlock) -> None:
        """A request found the block *exc* names damaged: set it aside."""
        if exc.chain_id is not None and exc.slot is not None:
            self.set_aside(exc.chain_id, exc.slot)

    def set_aside(self, chain_id: int, slot: int) -> None:
        """Take a used slot whose data was found damaged out of dedup, for
        good (swapfs/engine/slottable.py). Recording it is best effort: if the index
        cannot be written (fenced, full) the mark holds in memory only, and a
        later write that dedups onto the slot reads EIO, never other bytes."""
        try:
            with self.index.begin(write=True) as txn:
                table = self.table(txn, chain_id)
                if not table.set_aside(slot):
                    return
                table.save(txn)
        except (SwapfsError, lmdb.Error) as exc:
            log.warning("chain %d slot %d is damaged; cannot record it: %s",
                        chain_id, slot, exc)
            return
        log.warning("chain %d slot %d is damaged: set aside, the next write of its "
                    "content stores a fresh copy", chain_id, slot)

    # -- maps and slot tables in memory -------------------------------------------

    def change(self, txn: Txn, chain_id: int) -> ChainWrite:
        """The changes *txn* makes to the chain's maps and slots."""
        table = self.table(txn, chain_id)
        if table.scanning:
            # A small table at once; a large one a step with each write, so
            # that the scan keeps ahead of a fill even when requests leave
            # the daemon's background task no turn.
            small = not self._background_scan or table.next_slot <= INLINE_SCAN_SLOTS
            self._scan(table, None if small else WRITE_SCAN_RUNS)
        return ChainWrite(txn, table, self.chain_keys(table.chain), self.store,
                          self.pending, self)

    def table(self, txn: Txn, chain_id: int) -> SlotTable:
        """The chain's slot table (and record), made at its first use: read
        nothing yet, or scanned whole unless the scan runs in the background."""
        table = self.tables.get(chain_id)
        if table is None:
            table = SlotTable(chain_of(txn, chain_id), functools.partial(
                self._slot_run, chain_id), self.dedup_budget,
                txn.iter_damaged(chain_id), self._slot_runs_kept)
            self.tables[chain_id] = table
            if not self._background_scan:
                self._scan(table, None)
        return table

    def _slot_run(self, chain_id: int, run: int) -> bytes | None:
        """A run of a slot table as the transaction in progress sees it, or
        as the last commit left it when none is."""
        txn = self.index.writer
        if txn is not None:
            return txn.get_slot_run(chain_id, run)
        with self.index.begin() as txn:
            return txn.get_slot_run(chain_id, run)

    def _scan(self, table: SlotTable, max_runs: int | None) -> None:
        found = table.scan_step(max_runs, self.pending.slots(table.chain_id))
        if not found:
            return
        # Maybe holding data (a crash, a scan a close cut short): punched, like
        # any slot a commit freed, once a checkpoint covers the state that
        # says they are free.
        self.pending.add(table.chain_id, found, time.monotonic())
        if self.index.commits == 0:
            self.pending.covered()  # every commit is durable: so is their freeing

    def _scan_all(self) -> None:
        """Make every chain's slot table, each scanned whole."""
        with self.index.begin() as txn:
            for chain in txn.iter_chains():
                self.table(txn, chain.id_)

    def scan_step(self, max_runs: int) -> bool:
        """Scan up to *max_runs* runs of a slot table that needs it, every
        chain's made first; True while some still do."""
        if not self._all_tables:
            with self.index.begin() as txn:
                for chain in txn.iter_chains():
                    self.table(txn, chain.id_)
            self._all_tables = True  # a chain made later has nothing to scan
        for table in list(self.tables.values()):
            if table.scanning:
                self._scan(table, max_runs)
                return True
        return False

    def drop_table(self, chain_id: int) -> None:
        """Forget the chain's slot table (made again at its next use)."""
        table = self.tables.pop(chain_id, None)
        if table is not None:
            table.release()

    def remove_chain(self, chain_id: int) -> None:
        """Forget a chain just removed from the index, and delete its data files,
        after a checkpoint: the one before still names its blocks."""
        if self.index.writable():
            self.sync()
        self.pending.drop(chain_id)
        self.drop_table(chain_id)
        self.store.remove(chain_id)

    def map(self, txn: Txn, inode: Inode) -> FileMap:
        """The file's map, its directory read at its first use; its runs are
        read as they are used, through *txn* while it lasts."""
        fmap = self.maps.get(inode.ino)
        if fmap is None:
            fmap = self.maps[inode.ino] = FileMap.open(txn, inode, self.map_runs)
        fmap.use(txn)
        return fmap

    def _read_map_run(self, ino: int, run: int) -> bytes | None:
        """A run of a file's map as the last commit left it (a read outside
        any transaction: Volume.read)."""
        with self.index.begin() as txn:
            return txn.get_map_run(ino, run)

    def _drop_map(self, ino: int) -> None:
        """Forget a file's map, and its runs' room in the bound."""
        fmap = self.maps.pop(ino, None)
        if fmap is not None:
            fmap.release()

    def adopt_map(self, fmap: FileMap) -> None:
        """Keep a map made in memory (a clone's) as its file's."""
        self.maps[fmap.ino] = fmap

    def forget(self, chain_id: int, inos: Collection[int]) -> None:
        """Drop what a transaction that aborted changed in memory."""
        for ino in inos:
            self._drop_map(ino)
        table = self.tables.get(chain_id)
        if table is None:
            return
        try:
            with self.index.begin() as txn:
                chain = txn.get_chain(chain_id)
                damaged = list(txn.iter_damaged(chain_id))
        except BaseException:
            # The batch could not be made again (a full disk): the table is
            # read anew once it can.
            self.drop_table(chain_id)
            raise
        if chain is None:
            self.drop_table(chain_id)
        else:
            table.rollback(chain, damaged)


def _lock_state(path: Path) -> int:
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SwapfsError(errno.EBUSY, f"state directory {path} is in use") from None
    return fd
