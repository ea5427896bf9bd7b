"""One write transaction's changes to one chain: the per-block write path.

A :class:`ChainWrite` is made for each write transaction that changes a
chain's maps or slots (``State.change``): a write, a truncation, a
clone, a purge. It gets everything it uses at construction, so it runs
the same whoever opened the state: the transaction, the chain's slot
table and keys, the block store, the pending punches, and the
:class:`LoadedMaps` that keeps the file maps in memory.

For each block it is given, the write path (``docs/write-ordering.md``)::

    all zeros?         -> unmap it; stores nothing
    digest (keyed)     -> in the chain's dedup table? raise that slot's refcount
                          new? take a slot (ChainWrite.allocate), write the data there
    map the file's logical block to the slot; drop the old slot's reference
"""

import collections
import time
from collections.abc import Collection
from typing import Protocol

from swapfs.engine.blocks import BLOCK_SIZE, ZERO_BLOCK, blocks_for, is_zero
from swapfs.engine.errors import CorruptIndex
from swapfs.engine.filemap import FileMap
from swapfs.engine.index import Inode, Txn
from swapfs.engine.reclaim import PendingPunches
from swapfs.engine.sealing import ChainKeys
from swapfs.engine.slottable import SlotTable
from swapfs.engine.store import BlockStore


class LoadedMaps(Protocol):
    """Where the file maps live in memory between transactions (``State``)."""

    def map(self, txn: Txn, inode: Inode) -> FileMap:
        """The file's map, loaded and verified at its first use."""

    def adopt_map(self, fmap: FileMap) -> None:
        """Keep a map made in memory (a clone's) as its file's."""

    def forget(self, chain_id: int, inos: Collection[int]) -> None:
        """Undo what an aborted transaction changed in memory: the chain's
        slot table and these files' maps."""


def load_block(store: BlockStore, chain: ChainKeys, slot: int, digest: bytes) -> bytes:
    """The block named *digest* that *slot* holds, checked and, in an
    encrypted chain, opened (CorruptBlock, EIO, unless it is that block)."""
    return chain.open(slot, digest, *store.read_slot(chain.chain_id, slot, chain.sealed))


class ChainWrite:
    """One write transaction's changes to one chain's maps and slots.

    The changes go to the in-memory maps and slot table at once and to
    LMDB at :meth:`finish`. Slots whose refcount reaches zero are collected
    in ``freed``: none of them is handed out again by this transaction, and
    they become pending punches (the first choice of later allocations) only
    once it has committed. Slots this transaction took from the free slots
    are remembered in ``taken``: if it aborts they are free again, and may
    hold the data it wrote there, so they go back to the pending punches,
    and *loaded* forgets the in-memory state this transaction changed.
    """

    __slots__ = ("loaded", "store", "pending", "txn", "chain", "keys", "table", "freed",
                 "taken", "maps")

    def __init__(self, txn: Txn, table: SlotTable, keys: ChainKeys, store: BlockStore,
                 pending: PendingPunches, loaded: LoadedMaps) -> None:
        self.loaded = loaded
        self.store = store
        self.pending = pending
        self.txn = txn
        self.chain = table.chain
        self.keys = keys
        self.table = table
        self.freed: list[int] = []
        self.taken: list[int] = []
        #: The maps this transaction changed, by inode number (saved at finish).
        self.maps: dict[int, FileMap] = {}
        txn.after(self._ended)

    def _fmap(self, inode: Inode) -> FileMap:
        fmap = self.maps.get(inode.ino)
        if fmap is None:
            fmap = self.maps[inode.ino] = self.loaded.map(self.txn, inode)
        return fmap

    def mapped_block(self, inode: Inode, block: int) -> bytes:
        """The data of a logical block of *inode* (zeros where nothing is mapped)."""
        slot = self._fmap(inode).get(block)
        if slot is None:
            return ZERO_BLOCK
        return load_block(self.store, self.keys, slot, self.table.digest(slot))

    def set_block(self, inode: Inode, block: int, data: bytes) -> None:
        """Point one logical block of *inode* at *data* (:meth:`set_blocks`)."""
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
        slot = self.pending.take(self.chain.id_)
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
        copy = self.maps[inode.ino] = fmap.copy(inode.ino)
        self.loaded.adopt_map(copy)
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
        """Make *inode* *size* bytes long: a shorter file loses the blocks past
        its end and has the rest of its last block zeroed."""
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
        slot table, and the chain's record if its counts changed."""
        for fmap in self.maps.values():
            fmap.save(self.txn)
        self.table.save(self.txn)

    def _ended(self, committed: bool) -> None:
        if committed:
            self.table.committed()
            if self.freed:
                self.pending.add(self.chain.id_, self.freed, time.monotonic())
            return
        if self.taken:
            self.pending.add(self.chain.id_, self.taken, time.monotonic())
        self.loaded.forget(self.chain.id_, self.maps)
