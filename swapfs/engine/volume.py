"""The namespace and the data path of an open state: chains, swap files, blocks.

A :class:`Volume` serves one state directory, opened as a
:class:`~swapfs.engine.state.State` (the lock, the lease, the format, the
keys, recovery at open): its chains (directories at the root) and their
swap files, and the reads and writes of their blocks. Every public method
runs as one LMDB write (or read) transaction and returns only after it
committed, so a method either happened completely or not at all, and
callers on one thread need no locks. A method whose transaction finds the
index's map full runs again once the index has grown
(:meth:`swapfs.engine.index.Index.grow`).

A write patches the old block of each piece it covers only in part
(read-modify-write), then hands the whole blocks to the chain's
:class:`~swapfs.engine.chainwrite.ChainWrite`, which dedups, allocates,
writes and maps them; the commit makes them the file's. A read is served
from the file's map and the chain's slot table in memory, through the read
caches (:meth:`Volume.use_caches`) before the store.

A freed slot keeps its disk space until :meth:`Volume.punch_pending` punches
it, so that the next new block of its chain can take it without the file
system allocating anything (``swapfs/engine/reclaim.py``). Without a daemon calling
that method, freed slots are punched at :meth:`Volume.close`.

Why this order is crash-safe is in ``docs/write-ordering.md``.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec

from swapfs.engine import keys, report, reseal
from swapfs.engine.blocks import BLOCK_SIZE, MAX_FILE_SIZE, ZERO_BLOCK, blocks_for, pieces
from swapfs.engine.chainwrite import ChainWrite, load_block
from swapfs.engine.errors import CorruptBlock, SwapfsError
from swapfs.engine.filemap import FileMap
from swapfs.engine.index import KIND_DIR, KIND_FILE, ROOT_INO, Chain, Index, Inode, Txn
from swapfs.engine.lookup import chain_dir_of, dir_of, file_of, inode_of
from swapfs.engine.readcache import ReadCache, cache_key
from swapfs.engine.sealing import ChainKeys
from swapfs.engine.slottable import SlotTable
from swapfs.engine.state import State, writes_index
from swapfs.engine.store import BlockStore

log = logging.getLogger(__name__)

NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


P = ParamSpec("P")


def _opening(open_state: Callable[P, State]
             ) -> Callable[[Callable[[Any, State], None]], Callable[Concatenate[Any, P], None]]:
    """A constructor that takes the arguments of *open_state* and is handed
    the State it opens: Volume's arguments are State's, written once."""
    def decorate(init: Callable[[Any, State], None]) -> Callable[Concatenate[Any, P], None]:
        @functools.wraps(init)
        def opens(self: Any, *args: P.args, **kwargs: P.kwargs) -> None:
            init(self, open_state(*args, **kwargs))
        return opens
    return decorate


class Volume:
    """The chains, files and blocks of one open state directory."""

    @_opening(State)
    def __init__(self, opened: State) -> None:
        """Open (or create) a state directory, locking it for this process:
        ``Volume(path, ...)`` takes :class:`State`'s arguments, which says
        what each does."""
        #: The state directory.
        self.state = opened.path
        #: The open state: index, data files, keys, maps and slot tables.
        self.opened = opened
        #: The read caches, asked in this order before the store (use_caches).
        self.transient_cache: ReadCache | None = None
        self.content_cache: ReadCache | None = None
        self._caches: tuple[ReadCache, ...] = ()

    # The open state's parts that callers read (an index and a store are
    # replaced when the state is sealed again: never keep them).

    @property
    def index(self) -> Index:
        """The state's LMDB index."""
        return self.opened.index

    @property
    def store(self) -> BlockStore:
        """The state's data (and seal) files."""
        return self.opened.store

    @property
    def encrypted(self) -> bool:
        """Are the state's blocks sealed (docs/encryption.md)?"""
        return self.opened.encrypted

    @property
    def state_id(self) -> bytes | None:
        """The state's UUID (None in a state of format 3)."""
        return self.opened.state_id

    @property
    def converted(self) -> int | None:
        """The chains sealed again as the state was converted (format 3,
        encrypted), else None."""
        return self.opened.converted

    def use_caches(self, transient: ReadCache | None = None,
                   content: ReadCache | None = None) -> None:
        """Read through the *transient* cache, then the *content* cache, then
        the store."""
        self.transient_cache, self.content_cache = transient, content
        self._caches = tuple(cache for cache in (transient, content) if cache is not None)

    def close(self) -> None:
        """Punch what is pending, flush everything, release the state (:meth:`State.close`)."""
        self.opened.close()

    def sync(self) -> None:
        """Make every committed change durable: a checkpoint (EROFS once fenced)."""
        self.opened.sync()

    def synced(self) -> bool:
        """Whether every commit is durable already (:meth:`State.synced`)."""
        return self.opened.synced()

    def punch_pending(self, max_slots: int | None = None,
                      freed_before: float | None = None) -> int:
        """Give back the disk space of free slots that still hold it
        (:meth:`State.punch_pending`); returns how many slots were punched."""
        return self.opened.punch_pending(max_slots, freed_before)

    def scan_step(self, max_runs: int) -> bool:
        """Scan a step of a slot table that needs it (:meth:`State.scan_step`);
        True while some still do."""
        return self.opened.scan_step(max_runs)

    def rekey(self, new: keys.MasterKey) -> int:
        """Wrap every chain's secret under *new* (:meth:`State.rekey`)."""
        return self.opened.rekey(new)

    def reseal(self, new: keys.MasterKey | None,
               progress: reseal.Progress | None = None) -> int:
        """Seal every block again under new chain secrets (:meth:`State.reseal`)."""
        return self.opened.reseal(new, progress)

    # -- reporting ----------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        """The backing file system's figures: its free space is ours."""
        return report.statfs(self.state)

    def stats(self) -> dict[str, Any]:
        """What ``swapfs stats`` shows (:func:`swapfs.engine.report.stats`)."""
        return report.stats(self.opened, (("transient_cache", self.transient_cache),
                                          ("content_cache", self.content_cache)))

    # -- lookups --------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        with self.opened.index.begin() as txn:
            return inode_of(txn, ino)

    def lookup(self, parent: int, name: bytes) -> Inode:
        with self.opened.index.begin() as txn:
            dir_of(txn, parent)
            child = txn.get_dirent(parent, name)
            if child is None:
                raise SwapfsError(errno.ENOENT)
            return inode_of(txn, child)

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
        with self.opened.index.begin() as txn:
            dir_of(txn, ino)
            entries = [(name, child) for name, child in txn.iter_dirents(ino)
                       if child > after_ino]
            entries.sort(key=lambda entry: entry[1])
            return [(name, inode_of(txn, child)) for name, child in entries]

    def nlink(self, inode: Inode) -> int:
        if inode.ino == ROOT_INO:
            with self.opened.index.begin() as txn:
                return 2 + sum(1 for _ in txn.iter_dirents(ROOT_INO))
        return 2 if inode.is_dir else 1

    # -- namespace --------------------------------------------------------------

    @writes_index
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create a chain: a directory at the root, with a fresh key."""
        _check_name(name)
        with self.opened.index.begin(write=True) as txn:
            dir_of(txn, parent)
            if parent != ROOT_INO:
                raise SwapfsError(errno.EPERM, "chains cannot be nested")
            _check_absent(txn, parent, name)
            chain_id = txn.next_id(b"next_chain")
            chain = Chain(chain_id, self.opened.new_chain_key(chain_id))
            txn.put_chain(chain)
            inode = _new_inode(txn, KIND_DIR, stat.S_IFDIR | (mode & 0o7777), uid, gid,
                               chain.id_)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @writes_index
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """Create an empty swap file in a chain, readable by its owner alone
        (group and other bits cleared whatever *mode* asks: swap holds what
        processes had in memory); clones keep its mode."""
        _check_name(name)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode) != 0:
            raise SwapfsError(errno.EPERM, "a chain holds regular files only")
        with self.opened.index.begin(write=True) as txn:
            chain_dir = chain_dir_of(txn, parent)
            _check_absent(txn, parent, name)
            inode = _new_inode(txn, KIND_FILE, stat.S_IFREG | (mode & 0o7700), uid, gid,
                               chain_dir.chain)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @writes_index
    def clone(self, src: int, parent: int, name: bytes, empty: bool = False) -> Inode:
        """A new file in *src*'s chain: an instant copy of it, or empty of its size.

        The copy shares every block: its map is the source's map and each
        block's refcount rises by the number of places it is mapped. No data
        is read or written.
        """
        _check_name(name)
        with self.opened.index.begin(write=True) as txn:
            source = file_of(txn, src)
            chain_dir = chain_dir_of(txn, parent)
            if chain_dir.chain != source.chain:
                raise SwapfsError(errno.EXDEV, "a clone stays in its source's chain")
            _check_absent(txn, parent, name)
            inode = _new_inode(txn, KIND_FILE, source.mode, source.uid, source.gid,
                               source.chain)
            inode.size = source.size
            if not empty:
                change = self.opened.change(txn, source.chain)
                change.copy_map(source, inode)
                change.finish()
            txn.put_inode(inode)
            txn.put_dirent(parent, name, inode.ino)
            _touch_dir(txn, parent)
        return inode

    @writes_index
    def unlink(self, parent: int, name: bytes, still_open: bool) -> int:
        """Remove a file's name; its data goes now, or at :meth:`purge` if open.

        Returns the inode number so that the caller can purge it later.
        """
        with self.opened.index.begin(write=True) as txn:
            chain_dir_of(txn, parent)
            ino = _existing(txn, parent, name)
            file_of(txn, ino)
            txn.delete_dirent(parent, name)
            txn.put_orphan(ino)
            _touch_dir(txn, parent)
        if not still_open:
            self.purge(ino)
        return ino

    def is_orphan(self, ino: int) -> bool:
        with self.opened.index.begin() as txn:
            return txn.is_orphan(ino)

    def purge(self, ino: int) -> None:
        """Drop an unlinked file: unmap all its blocks, then forget it."""
        self.opened.purge(ino)

    @writes_index
    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty chain, its key and its data file."""
        with self.opened.index.begin(write=True) as txn:
            dir_of(txn, parent)
            ino = _existing(txn, parent, name)
            inode = dir_of(txn, ino)
            if next(txn.iter_dirents(ino), None) is not None:
                raise SwapfsError(errno.ENOTEMPTY)
            if any(inode_of(txn, orphan).chain == inode.chain for orphan in txn.iter_orphans()):
                raise SwapfsError(errno.EBUSY, "a file of this chain is still open")
            txn.delete_slot_runs(inode.chain)
            txn.delete_chain(inode.chain)
            txn.delete_inode(ino)
            txn.delete_dirent(parent, name)
            _touch_dir(txn, parent)
        self.opened.remove_chain(inode.chain)

    @writes_index
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
        with self.opened.index.begin(write=True) as txn:
            ino = _existing(txn, old_parent, old_name)
            inode = inode_of(txn, ino)
            destination = dir_of(txn, new_parent)
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
                victim = inode_of(txn, target)
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

    @writes_index
    def setattr(self, ino: int, *, size: int | None = None, mode: int | None = None,
                uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> Inode:
        """Change a file's or directory's attributes; a new size truncates or extends."""
        with self.opened.index.begin(write=True) as txn:
            inode = inode_of(txn, ino)
            change: ChainWrite | None = None
            if size is not None:
                if inode.is_dir:
                    raise SwapfsError(errno.EISDIR)
                _check_size(size)
                change = self.opened.change(txn, inode.chain)
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
        opened = self.opened
        index = opened.index
        if index.guard is not None or index.fenced is not None:
            opened.check_writable(errno.EIO)  # what it holds may be stale: never answer it
        # A file in use has its inode, map and slot table in memory, which
        # hold what the last commit says: no LMDB transaction is needed.
        inode = index.inode_cache.get(ino)
        fmap = opened.maps.get(ino)
        table = None if inode is None else opened.tables.get(inode.chain)
        if inode is None or fmap is None or table is None or inode.is_dir:
            with index.begin() as txn:
                inode = file_of(txn, ino)
                table = opened.table(txn, inode.chain)
                fmap = opened.map(txn, inode)
        try:
            return self._read(inode, fmap, table, offset, size)
        except CorruptBlock as exc:
            self.found_damaged(exc)
            raise

    def _read(self, inode: Inode, fmap: FileMap, table: SlotTable, offset: int,
              size: int) -> bytes:
        ino, chain = inode.ino, self.opened.chain_keys(table.chain)
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
            return load_block(self.opened.store, chain, slot, digest)
        key = cache_key(chain.chain_id, digest)  # built once, used by every cache
        data = self._cached(key, ino)
        if data is None:
            data = load_block(self.opened.store, chain, slot, digest)
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
        read = self.opened.store.read_many(chain.chain_id, slots)
        records: list[bytes] | list[None] = (self.opened.store.read_seals(chain.chain_id, slots)
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

    @writes_index
    def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write *data* at *offset*, extending the file past its end."""
        if offset < 0:
            raise SwapfsError(errno.EINVAL)
        end = offset + len(data)
        _check_size(end)
        with self.opened.index.begin(write=True) as txn:
            inode = file_of(txn, ino)
            if not data:
                return 0  # POSIX: writing nothing changes nothing, not even the size
            change = self.opened.change(txn, inode.chain)
            blocks = []
            for piece in pieces(offset, len(data)):
                chunk = data[piece.buf_start:piece.buf_start + piece.end - piece.start]
                if not piece.whole:
                    old = change.mapped_block(inode, piece.block)
                    chunk = old[:piece.start] + chunk + old[piece.end:]
                blocks.append((piece.block, chunk))
            mapped = inode.blocks
            change.set_blocks(inode, blocks)
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
            if end > inode.size or inode.blocks != mapped:
                inode.size = max(inode.size, end)
                txn.put_inode(inode)
            else:  # a swap-out over pages it wrote before: only the times change
                txn.touch_inode(inode)
            change.finish()
        return len(data)

    @writes_index
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
        with self.opened.index.begin(write=True) as txn:
            inode = file_of(txn, ino)
            change: ChainWrite | None = None
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                # Nothing is mapped past the end, and the bytes of the last
                # block past the end are zeros: a range that reaches the end
                # covers that block whole.
                stop = min(end, inode.size)
                if end >= inode.size:
                    stop = blocks_for(inode.size) * BLOCK_SIZE
                if offset < stop:
                    change = self.opened.change(txn, inode.chain)
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
        self.opened.found_damaged(exc)

    def set_aside(self, chain_id: int, slot: int) -> None:
        """Take a used slot whose data was found damaged out of dedup
        (:meth:`State.set_aside`)."""
        self.opened.set_aside(chain_id, slot)

    def find_block(self, chain_id: int, prefix: bytes) -> tuple[bytes, bytes] | None:
        """(digest, verified data) of a stored block of the chain whose digest
        is (or starts with) *prefix*; None if the chain's dedup table knows
        none or its data is corrupt."""
        with self.opened.index.begin() as txn:
            chain = txn.get_chain(chain_id)
            if chain is None:
                return None
            found = self.opened.table(txn, chain_id).find_prefix(prefix)
            if found is None:
                return None
            digest, slot = found
            try:
                return digest, load_block(self.opened.store, self.opened.chain_keys(chain),
                                          slot, digest)
            except CorruptBlock:
                return None

    # -- file priorities ----------------------------------------------------------

    def priority(self, ino: int) -> int:
        """A swap file's priority (0 unless set)."""
        with self.opened.index.begin() as txn:
            file_of(txn, ino)
            return txn.get_priority(ino)

    @writes_index
    def set_priority(self, ino: int, priority: int) -> None:
        """Set a swap file's priority, a signed 32-bit number (default 0)."""
        if not -(1 << 31) <= priority < 1 << 31:
            raise SwapfsError(errno.EINVAL, "a priority is a 32-bit signed integer")
        with self.opened.index.begin(write=True) as txn:
            file_of(txn, ino)
            txn.put_priority(ino, priority)

    def priorities(self) -> dict[int, int]:
        """Every file's priority that is not 0, by inode number."""
        with self.opened.index.begin() as txn:
            return dict(txn.iter_priorities())

    # -- inspection -----------------------------------------------------------------

    def blocks(self, chain_id: int) -> dict[int, tuple[bytes, int]]:
        """The chain's used slots: slot -> (digest, refcount)."""
        with self.opened.index.begin() as txn:
            return {slot: (digest, refcount)
                    for slot, digest, refcount in self.opened.table(txn, chain_id).used()}

    def free_slots(self, chain_id: int) -> set[int]:
        """The chain's free slots, punched or not."""
        with self.opened.index.begin() as txn:
            table = self.opened.table(txn, chain_id)
            used = {slot for slot, _, _ in table.used()}  # finds the bad ones too
            return set(range(table.next_slot)) - table.bad - used

    def mapped(self, ino: int) -> dict[int, int]:
        """The file's mapped blocks: logical block -> slot."""
        with self.opened.index.begin() as txn:
            return dict(self.opened.map(txn, file_of(txn, ino)).mapped())


# -- helpers that run inside one transaction ------------------------------------


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


def _new_inode(txn: Txn, kind: int, mode: int, uid: int, gid: int, chain: int) -> Inode:
    now = time.time_ns()
    inode = Inode(txn.next_id(b"next_ino"), kind, mode, uid, gid, chain,
                  atime_ns=now, mtime_ns=now, ctime_ns=now)
    txn.put_inode(inode)
    return inode


def _touch_dir(txn: Txn, ino: int) -> None:
    inode = inode_of(txn, ino)
    inode.mtime_ns = inode.ctime_ns = time.time_ns()
    txn.put_inode(inode)
