"""The storage engine: chains, swap files and their deduplicated blocks.

A :class:`Volume` is one state directory: the LMDB index and the chains'
data files. Every public method runs as one LMDB write (or read)
transaction and returns only after it committed, so a method either
happened completely or not at all, and callers on one thread need no locks.
A method whose transaction finds the index's map full runs again once the
index has grown (:meth:`swapfs.engine.index.Index.grow`).

The write path, for each 4 KiB block a request touches::

    patch the old block (read-modify-write) unless the block is whole
    all zeros?         -> unmap it; stores nothing
    digest (keyed)     -> in the chain's dedup table? raise that slot's refcount
                          new? take a free slot, write the data there
    map the file's logical block to the slot; drop the old slot's reference
    commit; then the slots whose refcount reached zero may be reused

The file maps and slot tables are kept in memory (``swapfs/engine/filemap.py``,
``swapfs/engine/slottable.py``), loaded and verified the first time they are used;
a transaction writes the runs it changed back to LMDB, and one that aborts
makes the volume forget what it changed in memory, to load it again.

A freed slot keeps its disk space until :meth:`Volume.punch_pending` punches
it, so that the next new block of its chain can take it without the file
system allocating anything (``swapfs/engine/reclaim.py``). Without a daemon calling
that method, freed slots are punched at :meth:`Volume.close`.

Why this order is crash-safe is in ``docs/write-ordering.md``.
"""

import collections
import errno
import fcntl
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import lmdb

from swapfs.engine import keys, reseal, statedir, upgrade
from swapfs.engine.blocks import (
    BLOCK_SIZE,
    MAX_FILE_SIZE,
    ZERO_BLOCK,
    blocks_for,
    is_zero,
    pieces,
)
from swapfs.engine.deduptable import DedupBudget
from swapfs.engine.digest import new_key
from swapfs.engine.errors import CorruptBlock, CorruptIndex, SwapfsError
from swapfs.engine.filemap import FileMap
from swapfs.engine.index import (
    FORMAT_VERSION,
    KIND_DIR,
    KIND_FILE,
    ROOT_INO,
    Chain,
    Index,
    Inode,
    Txn,
)
from swapfs.engine.readcache import ReadCache, cache_key
from swapfs.engine.reclaim import PendingPunches
from swapfs.engine.sealing import BLOCK_KEYS, LEGACY, PLAIN, ChainKeys
from swapfs.engine.slottable import SlotTable
from swapfs.engine.store import BlockStore

log = logging.getLogger(__name__)

NAME_MAX = 255
INDEX_NAME = "index.lmdb"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


P = ParamSpec("P")
R = TypeVar("R")


def _writes_index(method: "Callable[Concatenate[Volume, P], R]"
                  ) -> "Callable[Concatenate[Volume, P], R]":
    """Run a method that writes the index: again, once the index has grown,
    when its transaction found the index's map full (so nothing of it
    happened; Index.grow answers ENOSPC when the disk has no room); after
    it, let the index keep room ahead of the next one. A block it found
    damaged is set aside before the EIO goes out (Volume.found_damaged)."""
    @functools.wraps(method)
    def run(self: "Volume", *args: P.args, **kwargs: P.kwargs) -> R:
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


class Volume:
    """One state directory: the index, the data files and the lock on both."""

    def __init__(self, state: Path, recover: bool = True,
                 still_open: Collection[int] = (),
                 claim: Callable[[], int | None] | None = None, create: bool = True,
                 upgrade: bool = True, dedup_table_bytes: int | None = None,
                 master: keys.MasterKey | None = None, encrypt: bool | None = None,
                 guard: Callable[[], None] | None = None,
                 restamp: Callable[[int], int] | None = None,
                 progress: Callable[[], None] | None = None,
                 reseal_to: keys.MasterKey | None = None) -> None:
        """Open (or create) the volume in *state*, locking it for this process.

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
        and seal write: once it refuses, the volume writes nothing more and
        its reads answer EIO, since another host may own the state.
        *restamp* is called with the generation the index records when it
        is not below the claimed one (the lease file lost its generation
        since: broken when corrupt, or removed): it re-stamps the lease
        above it and returns the new generation (``Lease.restamp_above``).
        *progress* is called at each step of the opening (a chain's slot
        table loaded, an orphan purged), which a large state takes long
        for: the daemon reports it to whoever waits for its start.
        Without *create*, a state with no index is an error (ENOENT): a
        daemon taking over a live mount must serve the state the kernel
        knows, never a new, empty one. Without *upgrade*, an index of an
        earlier format is an error (:class:`OldFormat`) rather than
        converted (``swapfs/engine/upgrade.py``). *dedup_table_bytes* bounds the
        memory of all chains' dedup tables (``swapfs/engine/deduptable.py``; None:
        no bound).

        An encrypted state opens only with its *master* key (ENOKEY without
        one, EKEYREJECTED with another). A new state is encrypted if
        *encrypt* says so, or, with *encrypt* None, if a *master* key is
        given. With *encrypt* True or False, a state in the other mode is
        refused (EINVAL): a state is wholly encrypted or wholly plain.
        An encrypted state of format 3 is converted by sealing it again
        (:meth:`reseal`), under *reseal_to* if given (``swapfs rekey
        --reseal``), else under *master*; *progress* is called at each
        batch of blocks sealed again.
        """
        if not create and not ((state / INDEX_NAME / "data.mdb").is_file()
                               or reseal.pending(state)):
            raise SwapfsError(errno.ENOENT, f"{state} holds no swapfs index")
        state.mkdir(mode=statedir.DIR_MODE, parents=True, exist_ok=True)
        self.state = state
        self._lock_fd = _lock_state(state)
        try:
            # The lease first: another host's live one refuses this process
            # before it changes anything of the state, modes included.
            generation = claim() if claim is not None else None
            statedir.secure(state)
            if guard is not None:
                guard()  # the lease may have lapsed while it was claimed
            reseal.finish(state)  # one a crash interrupted
            self._progress = progress
            self.index = Index(state / INDEX_NAME, guard, generation or 0)
            if generation and restamp is not None:
                recorded = self.index.recorded_generation()
                if recorded >= generation:
                    self.index.generation = restamp(recorded)
            self.store = BlockStore(state / "data", guard)
            #: Free slots whose disk space is not given back yet (punch_pending).
            self.pending = PendingPunches()
            #: In-memory maps and slot tables, by inode and chain (see _map, _table).
            self._maps: dict[int, FileMap] = {}
            self._tables: dict[int, SlotTable] = {}
            self.dedup_budget = DedupBudget(dedup_table_bytes)
            #: The read caches, asked in this order before the store (use_caches).
            self.pool: ReadCache | None = None
            self.content_cache: ReadCache | None = None
            self._caches: tuple[ReadCache, ...] = ()
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
            if recover:
                self._purge_orphans(still_open)
                self._punch_free()
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

    def use_caches(self, pool: ReadCache | None = None,
                   content: ReadCache | None = None) -> None:
        """Read through the transient *pool*, then the *content* cache, then the store."""
        self.pool, self.content_cache = pool, content
        self._caches = tuple(cache for cache in (pool, content) if cache is not None)

    def close(self) -> None:
        """Punch what is pending, flush everything to disk, release the state
        directory. A volume that may no longer write (fenced, or its lease
        lapsed) punches and flushes nothing: another host may own the state."""
        if self.index.writable():
            self.punch_pending()
            self.sync()
        self.store.close()
        self.index.close()
        os.close(self._lock_fd)

    def sync(self) -> None:
        """Make every committed change durable: data files first, then the index.
        EROFS once this process may no longer write the state."""
        self._check_writable(errno.EROFS)
        self.store.sync()
        self.index.sync()

    def punch_pending(self, max_slots: int | None = None,
                      freed_before: float | None = None) -> int:
        """Give back the disk space of free slots that still hold it, oldest first.

        At most *max_slots* slots (all with None), and only those freed
        before *freed_before* (a ``time.monotonic()`` time) if given; each run
        of consecutive slots is one hole punch. Returns how many slots were
        punched. Every slot punched is free in the committed index and taken
        by no transaction, so nothing live is lost; a volume whose writes are
        fenced punches nothing, since another host may own its data files.
        """
        if not self.index.writable():
            return 0
        batch = self.pending.batch(max_slots, freed_before)
        for chain_id, slots in batch.items():
            self.store.punch(chain_id, slots)
            table = self._tables.get(chain_id)
            if table is not None:
                table.give_free(slots)
        return sum(len(slots) for slots in batch.values())

    def _check_writable(self, err: int) -> None:
        """SwapfsError(*err*) once this process may no longer own the state."""
        if not self.index.writable():
            raise SwapfsError(err, self.index.fenced or f"the lease on {self.state} has "
                                                        "lapsed: another host may own it")

    # -- set-up ---------------------------------------------------------------

    @_writes_index
    def _format(self, create: bool, allow_upgrade: bool, encrypt: bool | None) -> bool:
        """Format a new index, or convert an old one; True for an encrypted
        state of format 3, which is converted by sealing it again once its
        key is checked (swapfs/engine/reseal.py)."""
        with self.index.begin(write=True) as txn:
            version = upgrade.format_of(txn)
            if version == FORMAT_VERSION:
                return False
            if version in (1, 2, 3):
                if not allow_upgrade:
                    raise OldFormat(f"{self.state} holds an index of format {version}: "
                                    "mount it, or run swapfs fsck --upgrade")
                if version == 1:
                    upgrade.from_format_1(txn)
                if version <= 2:
                    upgrade.from_format_2(txn)
                if txn.get_meta(b"cipher") == LEGACY:
                    return True
                upgrade.from_format_3(txn)
                return False
            if version is not None:
                raise SwapfsError(errno.EINVAL, f"unknown index format {version}")
            if not create:
                raise SwapfsError(errno.ENOENT, f"{self.state} holds an empty swapfs index")
            if encrypt is None:
                encrypt = self.master is not None
            if encrypt:
                if self.master is None:
                    raise SwapfsError(errno.ENOKEY, f"cannot create an encrypted state in "
                                      f"{self.state} without a master key")
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
            raise CorruptIndex(f"{self.state} stores blocks in an unknown way ({cipher})")
        self.encrypted = encrypted = cipher != PLAIN
        self.legacy = cipher == LEGACY
        if encrypt is not None and encrypt != encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.state} holds "
                              + ("encrypted swap, and encryption is off" if encrypted else
                                 "unencrypted swap, and encryption is on")
                              + "; a state is never mixed (docs/encryption.md)")
        if not encrypted:
            return
        if key_id is None:
            raise CorruptIndex(f"{self.state} is encrypted but names no master key")
        if cipher == BLOCK_KEYS and self.state_id is None:
            # Its chain keys' wrap is bound to its UUID; one unbound (format
            # 3's) is never taken for it.
            raise CorruptIndex(f"{self.state} is encrypted but holds no state UUID")
        if self.master is None:
            raise SwapfsError(errno.ENOKEY, f"{self.state} is encrypted, and no master key "
                              f"was given (it needs key {keys.key_id_text(key_id)})")
        if self.master.key_id != key_id:
            raise SwapfsError(errno.EKEYREJECTED, f"{self.master.source} is key "
                              f"{keys.key_id_text(self.master.key_id)}, and {self.state} "
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

    def _new_chain_key(self, chain_id: int) -> bytes:
        """A new chain's key as its record keeps it: wrapped if encrypted."""
        if not self.encrypted:
            return new_key()
        assert self.master is not None
        assert self.state_id is not None
        return self.master.wrap(self.state_id, chain_id, keys.new_chain_secret())

    @_writes_index
    def rekey(self, new: keys.MasterKey) -> int:
        """Wrap every chain's secret under the master key *new* instead of
        the one this volume was opened with, in one transaction; no block
        is rewritten. Returns the number of chains."""
        if not self.encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.state} is not encrypted")
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
        for chain_id in list(self._tables):  # they hold the old chain records
            self._drop_table(chain_id)
        return len(chains)

    def reseal(self, new: keys.MasterKey | None,
               progress: reseal.Progress | None = None) -> int:
        """Give every chain a new secret, seal every block again under it,
        and wrap the secrets under the master key *new*, leaving nothing of
        the old secrets or ciphertext in the state (``swapfs/engine/reseal.py``;
        *progress* is told as blocks are sealed). Returns the number of
        chains. The volume is open again afterwards, on the new state, with
        *new*."""
        if not self.encrypted:
            raise SwapfsError(errno.EINVAL, f"{self.state} is not encrypted")
        if new is None:
            raise SwapfsError(errno.ENOKEY, f"{self.state} is sealed again only with a "
                              "master key")
        chains = reseal.build(self.state, self.index, self.store, self.chain_keys, new,
                              self.index.guard, progress)
        guard, generation = self.index.guard, self.index.generation
        self.store.close()
        self.index.close()
        reseal.finish(self.state)
        self.index = Index(self.state / INDEX_NAME, guard, generation)
        self.store = BlockStore(self.state / "data", guard)
        for chain_id in list(self._tables):  # they hold the old digests
            self._drop_table(chain_id)
        self._maps.clear()
        self._keys.clear()
        self.pending.clear()
        self.master = new
        self._check_key(True)
        return chains

    def _purge_orphans(self, still_open: Collection[int]) -> None:
        """Delete files unlinked while open that nothing holds open any more."""
        with self.index.begin() as txn:
            orphans = [ino for ino in txn.iter_orphans() if ino not in still_open]
        for ino in orphans:
            log.info("purging orphaned file %d", ino)
            self.purge(ino)
            if self._progress is not None:
                self._progress()

    def _punch_free(self) -> None:
        """Punch every free slot: a crash between a commit and its punch, or a
        write that failed after filling a free slot, leaves them on disk."""
        self.pending.clear()  # all punched below, those of the orphans just purged too
        for chain_id in list(self._tables):
            self._drop_table(chain_id)  # loaded with pending slots left out of free
        with self.index.begin() as txn:
            for chain in txn.iter_chains():
                table = self._table(txn, chain.id_)
                self.store.punch(chain.id_, table.free)
                if self._progress is not None:
                    self._progress()

    def _change(self, txn: Txn, chain_id: int) -> "_ChainWrite":
        return _ChainWrite(self, txn, self._table(txn, chain_id))

    def _table(self, txn: Txn, chain_id: int) -> SlotTable:
        """The chain's slot table (and record), loaded and verified at its first use."""
        table = self._tables.get(chain_id)
        if table is None:
            table = SlotTable.load(txn, _chain(txn, chain_id),
                                   self.pending.slots(chain_id), self.dedup_budget,
                                   self._progress)
            self._tables[chain_id] = table
        return table

    def _drop_table(self, chain_id: int) -> None:
        table = self._tables.pop(chain_id, None)
        if table is not None:
            table.dedup.release()

    def _map(self, txn: Txn, inode: Inode) -> FileMap:
        """The file's map, loaded and verified at its first use."""
        fmap = self._maps.get(inode.ino)
        if fmap is None:
            fmap = self._maps[inode.ino] = FileMap.load(txn, inode)
        return fmap

    def _forget(self, chain_id: int, inos: Collection[int]) -> None:
        """Drop what a transaction that aborted changed in memory."""
        self._drop_table(chain_id)
        for ino in inos:
            self._maps.pop(ino, None)

    # -- lookups --------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        with self.index.begin() as txn:
            return _inode(txn, ino)

    def lookup(self, parent: int, name: bytes) -> Inode:
        with self.index.begin() as txn:
            _dir(txn, parent)
            child = txn.get_dirent(parent, name)
            if child is None:
                raise SwapfsError(errno.ENOENT)
            return _inode(txn, child)

    def resolve(self, path: str) -> Inode:
        """The inode at a mount-relative path such as ``web/vm1.swap``."""
        inode = self.getattr(ROOT_INO)
        for part in path.strip("/").split("/"):
            if part:
                inode = self.lookup(inode.ino, os.fsencode(part))
        return inode

    def readdir(self, ino: int, after_ino: int = 0) -> list[tuple[bytes, Inode]]:
        """Entries of a directory ordered by inode number, past *after_ino*.

        Inode numbers only grow, so they make resumption points that stay
        valid while entries come and go.
        """
        with self.index.begin() as txn:
            _dir(txn, ino)
            entries = [(name, child) for name, child in txn.iter_dirents(ino)
                       if child > after_ino]
            entries.sort(key=lambda entry: entry[1])
            return [(name, _inode(txn, child)) for name, child in entries]

    def nlink(self, inode: Inode) -> int:
        if inode.ino == ROOT_INO:
            with self.index.begin() as txn:
                return 2 + sum(1 for _ in txn.iter_dirents(ROOT_INO))
        return 2 if inode.is_dir else 1

    # -- namespace --------------------------------------------------------------

    @_writes_index
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create a chain: a directory at the root, with a fresh key."""
        _check_name(name)
        with self.index.begin(write=True) as txn:
            _dir(txn, parent)
            if parent != ROOT_INO:
                raise SwapfsError(errno.EPERM, "chains cannot be nested")
            _check_absent(txn, parent, name)
            chain_id = txn.next_id(b"next_chain")
            chain = Chain(chain_id, self._new_chain_key(chain_id))
            txn.put_chain(chain)
            inode = _new_inode(txn, KIND_DIR, stat.S_IFDIR | (mode & 0o7777), uid, gid,
                               chain.id_)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @_writes_index
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create an empty swap file in a chain, readable by its owner alone
        (group and other bits cleared whatever *mode* asks: swap holds what
        processes had in memory); clones keep its mode."""
        _check_name(name)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode) != 0:
            raise SwapfsError(errno.EPERM, "a chain holds regular files only")
        with self.index.begin(write=True) as txn:
            chain_dir = _chain_dir(txn, parent)
            _check_absent(txn, parent, name)
            inode = _new_inode(txn, KIND_FILE, stat.S_IFREG | (mode & 0o7700), uid, gid,
                               chain_dir.chain)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @_writes_index
    def clone(self, src: int, parent: int, name: bytes, empty: bool = False) -> Inode:
        """A new file in *src*'s chain: an instant copy of it, or empty of its size.

        The copy shares every block: its map is the source's map and each
        block's refcount rises by the number of places it is mapped. No data
        is read or written.
        """
        _check_name(name)
        with self.index.begin(write=True) as txn:
            source = _file(txn, src)
            chain_dir = _chain_dir(txn, parent)
            if chain_dir.chain != source.chain:
                raise SwapfsError(errno.EXDEV, "a clone stays in its source's chain")
            _check_absent(txn, parent, name)
            inode = _new_inode(txn, KIND_FILE, source.mode, source.uid, source.gid,
                               source.chain)
            inode.size = source.size
            if not empty:
                change = self._change(txn, source.chain)
                change.copy_map(source, inode)
                change.finish()
            txn.put_inode(inode)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @_writes_index
    def unlink(self, parent: int, name: bytes, still_open: bool) -> int:
        """Remove a file's name; its data goes now, or at :meth:`purge` if open.

        Returns the inode number so that the caller can purge it later.
        """
        with self.index.begin(write=True) as txn:
            _chain_dir(txn, parent)
            ino = _existing(txn, parent, name)
            _file(txn, ino)
            txn.delete_dirent(parent, name)
            txn.put_orphan(ino)
            _touch_dir(txn, parent)
        if not still_open:
            self.purge(ino)
        return ino

    def is_orphan(self, ino: int) -> bool:
        with self.index.begin() as txn:
            return txn.is_orphan(ino)

    @_writes_index
    def purge(self, ino: int) -> None:
        """Drop an unlinked file: unmap all its blocks, then forget it."""
        with self.index.begin(write=True) as txn:
            inode = _file(txn, ino)
            change = self._change(txn, inode.chain)
            change.unmap_range(inode, 0)
            change.finish()
            txn.delete_map_runs(ino)  # and any run too damaged to load
            txn.delete_inode(ino)
            txn.delete_orphan(ino)
            txn.delete_priority(ino)
        self._maps.pop(ino, None)

    @_writes_index
    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty chain, its key and its data file."""
        with self.index.begin(write=True) as txn:
            _dir(txn, parent)
            ino = _existing(txn, parent, name)
            inode = _dir(txn, ino)
            if next(txn.iter_dirents(ino), None) is not None:
                raise SwapfsError(errno.ENOTEMPTY)
            if any(_inode(txn, orphan).chain == inode.chain for orphan in txn.iter_orphans()):
                raise SwapfsError(errno.EBUSY, "a file of this chain is still open")
            txn.delete_slot_runs(inode.chain)
            txn.delete_chain(inode.chain)
            txn.delete_inode(ino)
            txn.delete_dirent(parent, name)
            _touch_dir(txn, parent)
        self.pending.drop(inode.chain)
        self._drop_table(inode.chain)
        self.store.remove(inode.chain)

    @_writes_index
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, target_open: bool) -> int | None:
        """Rename a file within its chain, or a chain at the root.

        Returns the inode number of a replaced file that is still open (the
        caller purges it on its last close), else None.
        """
        _check_name(new_name)
        if flags & RENAME_EXCHANGE:
            raise SwapfsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        replaced_open = None
        with self.index.begin(write=True) as txn:
            ino = _existing(txn, old_parent, old_name)
            inode = _inode(txn, ino)
            destination = _dir(txn, new_parent)
            if inode.is_dir:
                if new_parent != ROOT_INO:
                    raise SwapfsError(errno.EPERM, "chains live at the root")
            elif new_parent == ROOT_INO:
                raise SwapfsError(errno.EPERM, "swap files live inside a chain")
            elif destination.chain != inode.chain:
                raise SwapfsError(errno.EXDEV, "files cannot move between chains")
            target = txn.get_dirent(new_parent, new_name)
            if target == ino:
                return None
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise SwapfsError(errno.EEXIST)
                victim = _inode(txn, target)
                if victim.is_dir != inode.is_dir:
                    raise SwapfsError(errno.EISDIR if victim.is_dir else errno.ENOTDIR)
                if victim.is_dir:
                    raise SwapfsError(errno.ENOTEMPTY if next(
                        txn.iter_dirents(target), None) else errno.EBUSY,
                        "replacing a chain is not supported")
                txn.delete_dirent(new_parent, new_name)
                txn.put_orphan(target)
                replaced_open = target
            txn.delete_dirent(old_parent, old_name)
            txn.put_dirent(new_parent, new_name, ino)
            inode.ctime_ns = time.time_ns()
            txn.put_inode(inode)
            _touch_dir(txn, old_parent)
            _touch_dir(txn, new_parent)
        if replaced_open is not None and not target_open:
            self.purge(replaced_open)
            return None
        return replaced_open

    @_writes_index
    def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> Inode:
        """Change a file's or directory's attributes; a new size truncates or extends."""
        with self.index.begin(write=True) as txn:
            inode = _inode(txn, ino)
            change: _ChainWrite | None = None
            if size is not None:
                if inode.is_dir:
                    raise SwapfsError(errno.EISDIR)
                _check_size(size)
                change = self._change(txn, inode.chain)
                change.resize(inode, size)
                inode.mtime_ns = time.time_ns()
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = time.time_ns()
            txn.put_inode(inode)
            if change is not None:
                change.finish()
        return inode

    # -- data -----------------------------------------------------------------

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to *size* bytes at *offset*; short at the end of the file. A
        block found damaged is set aside and the read answers EIO."""
        if offset < 0 or size < 0:
            raise SwapfsError(errno.EINVAL)
        if self.index.guard is not None or self.index.fenced is not None:
            self._check_writable(errno.EIO)  # what it holds may be stale: never answer it
        # A file in use has its inode, map and slot table in memory, which
        # hold what the last commit says: no LMDB transaction is needed.
        inode = self.index.inode_cache.get(ino)
        fmap = self._maps.get(ino)
        table = None if inode is None else self._tables.get(inode.chain)
        if inode is None or fmap is None or table is None or inode.is_dir:
            with self.index.begin() as txn:
                inode = _file(txn, ino)
                table = self._table(txn, inode.chain)
                fmap = self._map(txn, inode)
        try:
            return self._read(inode, fmap, table, offset, size)
        except CorruptBlock as exc:
            self.found_damaged(exc)
            raise

    def _read(self, inode: Inode, fmap: FileMap, table: SlotTable, offset: int,
              size: int) -> bytes:
        ino, chain = inode.ino, self.chain_keys(table.chain)
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        if offset % BLOCK_SIZE == 0 and end - offset == BLOCK_SIZE:
            # One whole block, the kernel's most frequent swap-in.
            slot = fmap.get(offset // BLOCK_SIZE)
            if slot is None:
                return ZERO_BLOCK
            return self._load(ino, chain, slot, table.digest(slot))
        first, stop = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        mapped = []  # (logical block, slot), in file order
        for block in range(first, stop):
            slot = fmap.get(block)
            if slot is not None:
                mapped.append((block, slot))
        datas = self._load_many(ino, chain, [(slot, table.digest(slot))
                                             for _, slot in mapped])
        if (offset % BLOCK_SIZE == 0 and end - offset == len(mapped) * BLOCK_SIZE):
            # Whole blocks, all mapped (the kernel's swap-in): no zero fill.
            return b"".join(datas)
        out = bytearray(end - offset)
        for (block, _), data in zip(mapped, datas, strict=True):
            block_start = block * BLOCK_SIZE
            lo = max(offset, block_start)
            hi = min(end, block_start + BLOCK_SIZE)
            out[lo - offset:hi - offset] = data[lo - block_start:hi - block_start]
        return bytes(out)

    def _load(self, ino: int, chain: ChainKeys, slot: int, digest: bytes) -> bytes:
        """A block's verified data: from the first cache that has it, else from
        the store (and then offered to every cache, which decides to admit it)."""
        if not self._caches:
            return load_block(self.store, chain, slot, digest)
        key = cache_key(chain.chain_id, digest)  # built once, used by every cache
        data = self._cached(key, ino)
        if data is None:
            data = load_block(self.store, chain, slot, digest)
            for cache in self._caches:
                cache.offer(key, data, ino)
        return data

    def _load_many(self, ino: int, chain: ChainKeys, blocks: list[tuple[int, bytes]]
                   ) -> list[bytes]:
        """Verified data of each (slot, digest): cached blocks as in
        :meth:`_load`, the others from the store, reading runs of consecutive
        slots at once."""
        caches = self._caches
        datas: list[bytes] = [b""] * len(blocks)
        misses = []  # (position, digest, cache key or b"" without caches, slot)
        for position, (slot, digest) in enumerate(blocks):
            key = cache_key(chain.chain_id, digest) if caches else b""
            hit = self._cached(key, ino) if caches else None
            if hit is None:
                misses.append((position, digest, key, slot))
            else:
                datas[position] = hit
        slots = [slot for *_, slot in misses]
        read = self.store.read_many(chain.chain_id, slots)
        records: list[bytes] | list[None] = (self.store.read_seals(chain.chain_id, slots)
                                             if chain.sealed else [None] * len(slots))
        for (position, digest, key, slot), data, record in zip(misses, read, records,
                                                               strict=True):
            data = chain.open(slot, digest, data, record)
            datas[position] = data
            for cache in caches:
                cache.offer(key, data, ino)
        return datas

    def _cached(self, key: bytes, ino: int) -> bytes | None:
        """The block from the first cache that has it, offered to the caches
        before that one (they share the one bytes object: no copy)."""
        for depth, cache in enumerate(self._caches):
            data = cache.get(key, ino)
            if data is not None:
                for earlier in self._caches[:depth]:
                    earlier.offer(key, data, ino)
                return data
        return None

    @_writes_index
    def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write *data* at *offset*, extending the file past its end."""
        if offset < 0:
            raise SwapfsError(errno.EINVAL)
        end = offset + len(data)
        _check_size(end)
        with self.index.begin(write=True) as txn:
            inode = _file(txn, ino)
            if not data:
                return 0  # POSIX: writing nothing changes nothing, not even the size
            change = self._change(txn, inode.chain)
            blocks = []
            for piece in pieces(offset, len(data)):
                chunk = data[piece.buf_start:piece.buf_start + piece.end - piece.start]
                if not piece.whole:
                    old = change.mapped_block(inode, piece.block)
                    chunk = old[:piece.start] + chunk + old[piece.end:]
                blocks.append((piece.block, chunk))
            change.set_blocks(inode, blocks)
            inode.size = max(inode.size, end)
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
            txn.put_inode(inode)
            change.finish()
        return len(data)

    @_writes_index
    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a file: punch a hole, zero a range, or "allocate".

        ``PUNCH_HOLE | KEEP_SIZE`` (what a loop device sends for a discard)
        and ``ZERO_RANGE`` (with or without ``KEEP_SIZE``) unmap the blocks
        the range covers whole and drop their refcounts, so a block no file
        maps any more is freed (and its slot punched by :meth:`punch_pending`
        unless a new block takes it first); partial
        blocks at either edge are rewritten with zeros over the range.
        Without ``KEEP_SIZE``, zeroing past the end extends the file. Plain
        allocation (mode 0, or ``KEEP_SIZE`` alone) reserves nothing, since
        every block is stored on demand; mode 0 extends a file that ends
        before the range. Any other mode is EOPNOTSUPP, as is ``PUNCH_HOLE``
        without ``KEEP_SIZE`` (Linux refuses it too).
        """
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or (
                mode & FALLOC_FL_PUNCH_HOLE
                and mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            raise SwapfsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        if offset < 0 or length <= 0:
            raise SwapfsError(errno.EINVAL)
        end = offset + length
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        if not keep_size:
            _check_size(end)
        with self.index.begin(write=True) as txn:
            inode = _file(txn, ino)
            change: _ChainWrite | None = None
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                # Nothing is mapped past the end, and the bytes of the last
                # block past the end are zeros: a range that reaches the end
                # covers that block whole.
                stop = min(end, inode.size)
                if end >= inode.size:
                    stop = blocks_for(inode.size) * BLOCK_SIZE
                if offset < stop:
                    change = self._change(txn, inode.chain)
                    first, head = divmod(offset, BLOCK_SIZE)
                    last, tail = divmod(stop, BLOCK_SIZE)
                    if head:  # the range starts inside block *first*
                        old = change.mapped_block(inode, first)
                        cut = min(BLOCK_SIZE, head + stop - offset)
                        change.set_block(inode, first,
                                         old[:head] + bytes(cut - head) + old[cut:])
                        first += 1
                    if tail and last >= first:  # the range ends inside block *last*
                        old = change.mapped_block(inode, last)
                        change.set_block(inode, last, bytes(tail) + old[tail:])
                    change.unmap_range(inode, first, last)
                inode.mtime_ns = inode.ctime_ns = time.time_ns()
            if not keep_size and end > inode.size:
                inode.size = end
                inode.mtime_ns = inode.ctime_ns = time.time_ns()
            txn.put_inode(inode)
            if change is not None:
                change.finish()

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
                table = self._table(txn, chain_id)
                if not table.set_aside(slot):
                    return
                table.save(txn)
        except (SwapfsError, lmdb.Error) as exc:
            log.warning("chain %d slot %d is damaged; cannot record it: %s",
                        chain_id, slot, exc)
            return
        log.warning("chain %d slot %d is damaged: set aside, the next write of its "
                    "content stores a fresh copy", chain_id, slot)

    def find_block(self, chain_id: int, prefix: bytes) -> tuple[bytes, bytes] | None:
        """(digest, verified data) of a stored block of the chain whose digest
        is (or starts with) *prefix*; None if the chain's dedup table knows
        none or its data is corrupt."""
        with self.index.begin() as txn:
            chain = txn.get_chain(chain_id)
            if chain is None:
                return None
            found = self._table(txn, chain_id).find_prefix(prefix)
            if found is None:
                return None
            digest, slot = found
            try:
                return digest, load_block(self.store, self.chain_keys(chain), slot, digest)
            except CorruptBlock:
                return None

    # -- file priorities ----------------------------------------------------------

    def priority(self, ino: int) -> int:
        """A swap file's priority (0 unless set)."""
        with self.index.begin() as txn:
            _file(txn, ino)
            return txn.get_priority(ino)

    @_writes_index
    def set_priority(self, ino: int, priority: int) -> None:
        """Set a swap file's priority, a signed 32-bit number (default 0)."""
        if not -(1 << 31) <= priority < 1 << 31:
            raise SwapfsError(errno.EINVAL, "a priority is a 32-bit signed integer")
        with self.index.begin(write=True) as txn:
            _file(txn, ino)
            txn.put_priority(ino, priority)

    def priorities(self) -> dict[int, int]:
        """Every file's priority that is not 0, by inode number."""
        with self.index.begin() as txn:
            return dict(txn.iter_priorities())

    # -- inspection -----------------------------------------------------------------

    def blocks(self, chain_id: int) -> dict[int, tuple[bytes, int]]:
        """The chain's used slots: slot -> (digest, refcount)."""
        with self.index.begin() as txn:
            return {slot: (digest, refcount)
                    for slot, digest, refcount in self._table(txn, chain_id).used()}

    def free_slots(self, chain_id: int) -> set[int]:
        """The chain's free slots, punched or not."""
        with self.index.begin() as txn:
            table = self._table(txn, chain_id)
            return set(range(table.next_slot)) - table.bad - {
                slot for slot, _, _ in table.used()}

    def mapped(self, ino: int) -> dict[int, int]:
        """The file's mapped blocks: logical block -> slot."""
        with self.index.begin() as txn:
            return dict(self._map(txn, _file(txn, ino)).mapped())

    # -- reporting ----------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        """The backing file system's figures: its free space is ours."""
        return os.statvfs(self.state)

    def stats(self) -> dict[str, Any]:
        """Per chain and per file: logical, stored and zero blocks, dedup ratio;
        the index's bytes per database and per block."""
        chains: dict[str, Any] = {}
        with self.index.begin() as txn:
            for chain_name, chain_ino in txn.iter_dirents(ROOT_INO):
                chain_dir = _inode(txn, chain_ino)
                chain = _chain(txn, chain_dir.chain)
                files = {}
                for file_name, file_ino in txn.iter_dirents(chain_ino):
                    inode = _inode(txn, file_ino)
                    files[os.fsdecode(file_name)] = {
                        "size": inode.size,
                        "logical_bytes": inode.blocks * BLOCK_SIZE,
                        "mapped_blocks": inode.blocks,
                        "zero_blocks": blocks_for(inode.size) - inode.blocks,
                        "priority": txn.get_priority(file_ino),
                    }
                logical = sum(f["logical_bytes"] for f in files.values())
                table = self._table(txn, chain.id_)
                unique = table.stored
                stored = unique * BLOCK_SIZE
                chains[os.fsdecode(chain_name)] = {
                    "id": chain.id_,
                    "logical_bytes": logical,
                    "stored_bytes": stored,
                    "unique_blocks": unique,
                    "zero_blocks": sum(f["zero_blocks"] for f in files.values()),
                    "dedup_ratio": logical / stored if stored else 1.0,
                    "disk_bytes": self.store.disk_bytes(chain.id_),
                    "seal_bytes": self.store.disk_bytes(chain.id_, seals=True),
                    "dedup_table": {"bytes": table.dedup.size_bytes,
                                    "entries": table.dedup.entries,
                                    "unindexed": table.dedup.unindexed},
                    "files": files,
                }
            # Over every file and chain, unlinked files still open included:
            # their map entries and blocks are in the index too.
            logical = sum(inode.blocks for inode in txn.iter_inodes() if not inode.is_dir)
            stored = sum(self._table(txn, chain.id_).stored for chain in txn.iter_chains())
            index = txn.space().figures(logical, stored)
        report: dict[str, Any] = {"chains": chains, "index_bytes": self.index.file_bytes(),
                                  "index": index, "encrypted": self.encrypted}
        names = {chain["id"]: name for name, chain in chains.items()}
        for name, cache in (("transient_cache", self.pool),
                            ("content_cache", self.content_cache)):
            if cache is not None:
                report[name] = cache.stats()
                report[name]["chains"] = name_chains(report[name]["chains"], names)
        return report


def name_chains(by_id: dict[int, int], names: dict[int, str]) -> dict[str, int]:
    """A cache's bytes per chain id, by chain name (a chain removed meanwhile
    keeps its id as its name)."""
    return {names.get(chain_id, str(chain_id)): count for chain_id, count in by_id.items()}


# -- helpers that run inside one transaction ------------------------------------


def _lock_state(state: Path) -> int:
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SwapfsError(errno.EBUSY, f"state directory {state} is in use") from None
    return fd


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise SwapfsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise SwapfsError(errno.EINVAL, f"invalid name {name!r}")


def _check_size(size: int) -> None:
    if size < 0:
        raise SwapfsError(errno.EINVAL)
    if size > MAX_FILE_SIZE:
        raise SwapfsError(errno.EFBIG)


def _check_absent(txn: Txn, parent: int, name: bytes) -> None:
    if txn.get_dirent(parent, name) is not None:
        raise SwapfsError(errno.EEXIST)


def _existing(txn: Txn, parent: int, name: bytes) -> int:
    ino = txn.get_dirent(parent, name)
    if ino is None:
        raise SwapfsError(errno.ENOENT)
    return ino


def _inode(txn: Txn, ino: int) -> Inode:
    inode = txn.get_inode(ino)
    if inode is None:
        raise SwapfsError(errno.ENOENT)
    return inode


def _dir(txn: Txn, ino: int) -> Inode:
    inode = _inode(txn, ino)
    if not inode.is_dir:
        raise SwapfsError(errno.ENOTDIR)
    return inode


def _chain_dir(txn: Txn, ino: int) -> Inode:
    inode = _dir(txn, ino)
    if ino == ROOT_INO:
        raise SwapfsError(errno.EPERM, "swap files live inside a chain")
    return inode


def _file(txn: Txn, ino: int) -> Inode:
    inode = _inode(txn, ino)
    if inode.is_dir:
        raise SwapfsError(errno.EISDIR)
    return inode


def _chain(txn: Txn, chain_id: int) -> Chain:
    chain = txn.get_chain(chain_id)
    if chain is None:
        raise CorruptBlock(f"chain {chain_id} is missing from the index")
    return chain


def _new_inode(txn: Txn, kind: int, mode: int, uid: int, gid: int, chain: int) -> Inode:
    now = time.time_ns()
    inode = Inode(txn.next_id(b"next_ino"), kind, mode, uid, gid, chain,
                  atime_ns=now, mtime_ns=now, ctime_ns=now)
    txn.put_inode(inode)
    return inode


def _touch_dir(txn: Txn, ino: int) -> None:
    inode = _inode(txn, ino)
    inode.mtime_ns = inode.ctime_ns = time.time_ns()
    txn.put_inode(inode)


def load_block(store: BlockStore, chain: ChainKeys, slot: int, digest: bytes) -> bytes:
    """The block named *digest* that *slot* holds, checked and, in an
    encrypted chain, opened (CorruptBlock, EIO, unless it is that block)."""
    return chain.open(slot, digest, *store.read_slot(chain.chain_id, slot, chain.sealed))


class _ChainWrite:
    """One write transaction's changes to one chain's maps and slots.

    The changes go to the in-memory maps and slot table at once and to
    LMDB at :meth:`finish`. Slots whose refcount reaches zero are collected
    in ``freed``: none of them is handed out again by this transaction, and
    they become pending punches (the first choice of later allocations) only
    once it has committed. Slots this transaction took from the free slots
    are remembered in ``taken``: if it aborts they are free again, and may
    hold the data it wrote there, so they go back to the pending punches,
    and the volume forgets the in-memory state this transaction changed.
    """

    __slots__ = ("volume", "store", "txn", "chain", "keys", "table", "freed", "taken", "inos",
                 "_saved")

    def __init__(self, volume: Volume, txn: Txn, table: SlotTable) -> None:
        self.volume = volume
        self.store = volume.store
        self.txn = txn
        self.chain = table.chain
        self.keys = volume.chain_keys(table.chain)
        self.table = table
        self.freed: list[int] = []
        self.taken: list[int] = []
        self.inos: set[int] = set()
        self._saved = table.next_slot
        txn.after(self._ended)

    def _fmap(self, inode: Inode) -> FileMap:
        self.inos.add(inode.ino)
        return self.volume._map(self.txn, inode)

    def mapped_block(self, inode: Inode, block: int) -> bytes:
        slot = self._fmap(inode).get(block)
        if slot is None:
            return ZERO_BLOCK
        return load_block(self.store, self.keys, slot, self.table.digest(slot))

    def set_block(self, inode: Inode, block: int, data: bytes) -> None:
        self.set_blocks(inode, [(block, data)])

    def set_blocks(self, inode: Inode, blocks: list[tuple[int, bytes]]) -> None:
        """Point logical blocks of *inode* at new data, deduplicated within the chain.

        New blocks take free slots (or grow the data file), and their data
        (sealed, in an encrypted state) is written, in runs of consecutive
        slots, before the index names them.
        Old blocks lose their references last, so a block that this very
        call both drops and writes again keeps its slot.
        """
        fmap, table, chain_keys = self._fmap(inode), self.table, self.keys
        new_data: list[tuple[int, bytes]] = []  # (slot, data) to write
        seals: list[tuple[int, bytes]] = []  # (slot, seal record), if encrypted
        dropped: list[int] = []  # old slots losing one reference each
        for block, data in blocks:
            old = fmap.get(block)
            if is_zero(data):
                if old is not None:
                    fmap.set(block, None)
                    inode.blocks -= 1
                    dropped.append(old)
                continue
            digest = chain_keys.digest(data)
            if old is not None and table.digest(old) == digest:
                continue
            slot = table.find(digest)
            if slot is None:
                slot = self.allocate()
                table.claim(slot, digest)
                if chain_keys.sealed:
                    data, record = chain_keys.seal(digest, data)
                    seals.append((slot, record))
                new_data.append((slot, data))
            else:
                table.ref(slot)
            fmap.set(block, slot)
            if old is None:
                inode.blocks += 1
            else:
                dropped.append(old)
        # The data reaches its slots before the transaction naming them commits.
        self.store.write_many(self.chain.id_, new_data)
        if seals:
            self.store.write_seals(self.chain.id_, seals)
        for slot in dropped:
            if table.unref(slot):
                self.freed.append(slot)

    def allocate(self) -> int:
        """A slot for a new block: a slot of the chain's last commit that freed
        any, still holding its disk space (lowest first), else a punched free
        slot (lowest first), else a new slot at the end of the data file."""
        chain_id = self.chain.id_
        slot = self.volume.pending.take(chain_id)
        if slot is None:
            slot = self.table.take_free()
        if slot is None:
            slot = self.table.grow()  # and the chain's next_slot with it
        else:
            self.taken.append(slot)
        return slot

    def copy_map(self, source: Inode, inode: Inode) -> None:
        """Give *inode* the map of *source*: every slot gains the references."""
        fmap = self._fmap(source)
        if not fmap.complete:
            raise CorruptIndex(f"the map of file {source.ino} is damaged: no clone of it")
        uses = collections.Counter(slot for _, slot in fmap.mapped())
        for slot, count in uses.items():
            self.table.ref(slot, count)
        self.volume._maps[inode.ino] = fmap.copy(inode.ino)
        self.inos.add(inode.ino)
        inode.blocks = source.blocks

    def unmap_range(self, inode: Inode, first: int, stop: int | None = None) -> None:
        """Unmap the blocks of *inode* in ``[first, stop)`` (to its end without
        *stop*), lowering each slot's refcount once by the number of blocks
        that named it."""
        slots = self._fmap(inode).pop_range(first, stop)
        inode.blocks -= len(slots)
        for slot, count in collections.Counter(slots).items():
            if self.table.unref(slot, count):
                self.freed.append(slot)

    def resize(self, inode: Inode, size: int) -> None:
        if size < inode.size:
            self.unmap_range(inode, blocks_for(size))
            tail = size % BLOCK_SIZE
            if tail:
                # Bytes past the new end must read as zeros if the file grows again.
                last = size // BLOCK_SIZE
                data = self.mapped_block(inode, last)
                self.set_block(inode, last, data[:tail] + bytes(BLOCK_SIZE - tail))
        inode.size = size

    def finish(self) -> None:
        """Last step before commit: write the changed runs of the maps and the
        slot table; the chain's record only if it grew."""
        for ino in self.inos:
            fmap = self.volume._maps.get(ino)
            if fmap is not None:
                fmap.save(self.txn)
        self.table.save(self.txn)
        if self.chain.next_slot != self._saved:
            self.txn.put_chain(self.chain)

    def _ended(self, committed: bool) -> None:
        pending = self.volume.pending
        if committed:
            if self.freed:
                pending.add(self.chain.id_, self.freed, time.monotonic())
            return
        self.volume._forget(self.chain.id_, self.inos)
        if self.taken:
            pending.add(self.chain.id_, self.taken, time.monotonic())
