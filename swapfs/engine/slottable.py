"""A chain's slot table: what each slot of its data file holds, in memory.

Slot *n* of a chain holds one stored block. Its entry in the table is 24
bytes, ``digest (16) | refcount (u32) | CRC-32 (u32)``, little-endian; the
CRC covers the chain id, the slot number, the digest and the refcount, so a
flipped bit in an entry, or an entry that moved, does not verify. A free
slot has refcount 0 and a zero digest. The index keeps the table in runs
of :data:`SLOT_RUN` entries (4,080 bytes: one LMDB overflow page each, as
the file maps' runs, ``swapfs/engine/filemap.py``), every
run below the chain's ``next_slot`` present.

:class:`SlotTable` is the table as this process uses it: one ``bytearray``
laid out exactly as the runs are stored (so that a changed run goes back to
LMDB as a slice, with no encoding), plus what is derived from it at load:
the dedup table (digest -> slot, ``swapfs/engine/deduptable.py``), the free slots
whose space was punched, the number of blocks stored, and the slots whose
entry did not verify. Memory per slot: the entry's 24 bytes, plus 6 to 12
bytes of dedup table for each block stored.

Dedup is advisory: a block whose digest the dedup table does not name is
simply stored again. Correctness rests on the refcounts, which count map
entries per slot. That is also how a damaged block heals: a used slot whose
data was found not to match its digest is *set aside* (:meth:`SlotTable.set_aside`,
kept in the index's ``damaged`` database): out of the dedup table, so that
the next write of the same content stores a fresh copy, while the map
entries that name it keep answering EIO. The mark goes when the slot is freed.
"""

import errno
import heapq
import struct
import zlib
from array import array
from collections.abc import Callable, Collection, Iterator

from swapfs.engine.deduptable import DedupBudget, DedupTable
from swapfs.engine.digest import DIGEST_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import Chain, CorruptIndex, Txn

SLOT_RUN = 170
ENTRY = struct.Struct("<16sII")  # digest, refcount, CRC-32
RUN_BYTES = SLOT_RUN * ENTRY.size
#: Runs SlotTable.load verifies between two calls of its progress callback
#: (about 5 GiB of stored blocks).
PROGRESS_RUNS = 8192
#: Slots are named by u32 in the file maps, where 0 means a hole.
MAX_SLOTS = (1 << 32) - 1
_FREE_DIGEST = bytes(16)
_COVERED = struct.Struct("<IQ16sI")  # what an entry's CRC covers


def entry_crc(chain_id: int, slot: int, digest: bytes, refcount: int) -> int:
    return zlib.crc32(_COVERED.pack(chain_id, slot, digest, refcount))


class SlotTable:
    """One chain's slot table, dedup table and free slots, in memory."""

    __slots__ = ("chain", "chain_id", "image", "next_slot", "stored", "dedup", "free",
                 "bad", "damaged", "_dirty", "_damaged_dirty")

    def __init__(self, chain: Chain, budget: DedupBudget | None = None,
                 expect: int = 0) -> None:
        #: The chain's record, kept with its table: its ``next_slot`` follows
        #: the table's as it grows.
        self.chain = chain
        self.chain_id = chain.id_
        self.image = bytearray()
        self.next_slot = 0
        #: Slots with a refcount above zero.
        self.stored = 0
        #: The dedup table: a slot for each digest stored, as room allows.
        self.dedup = DedupTable(lambda: self.image, budget or DedupBudget(), expect)
        #: Free slots whose disk space is punched (a heap: lowest first).
        self.free: list[int] = []
        #: Slots whose entry is missing or does not verify: never read as
        #: data, never handed out.
        self.bad: set[int] = set()
        #: Used slots set aside as damaged: their data does not match their
        #: digest, so the dedup table does not name them.
        self.damaged: set[int] = set()
        self._dirty: set[int] = set()
        self._damaged_dirty: set[int] = set()  # slots whose mark changed

    @classmethod
    def load(cls, txn: Txn, chain: Chain, unpunched: Collection[int] = (),
             budget: DedupBudget | None = None,
             progress: Callable[[], None] | None = None) -> "SlotTable":
        """Read and verify a chain's table. Free slots in *unpunched* (still
        holding disk space, reused first by the caller) stay out of ``free``;
        the dedup table takes its room from *budget*. *progress* is called
        every PROGRESS_RUNS runs verified: a large chain takes long."""
        runs = -(-chain.next_slot // SLOT_RUN)
        damaged = set(txn.iter_damaged(chain.id_))
        image = bytearray(runs * RUN_BYTES)
        found = set()
        for run, raw in txn.iter_slot_runs(chain.id_):
            if run >= runs or len(raw) != RUN_BYTES:
                continue  # fsck reports it; nothing below next_slot is in it
            image[run * RUN_BYTES:(run + 1) * RUN_BYTES] = raw
            found.add(run)
        chain_id, covered, crc32 = chain.id_, _COVERED.pack, zlib.crc32
        # 4 bytes a used slot while the table is read: the dedup table reads
        # their digests from the image (a list of (digest, slot) tuples took
        # about 140 bytes a block, three times the open state's memory).
        used = array("I")
        free: list[int] = []
        bad: set[int] = set()
        view = memoryview(image)
        for run in range(runs):
            if progress is not None and run % PROGRESS_RUNS == PROGRESS_RUNS - 1:
                progress()
            first, stop = run * SLOT_RUN, min((run + 1) * SLOT_RUN, chain.next_slot)
            if run not in found:
                bad.update(range(first, stop))
                continue
            entries = ENTRY.iter_unpack(view[first * ENTRY.size:stop * ENTRY.size])
            for slot, (digest, refcount, crc) in enumerate(entries, first):
                if crc != crc32(covered(chain_id, slot, digest, refcount)):
                    bad.add(slot)
                elif refcount:
                    used.append(slot)
                elif slot not in unpunched:
                    free.append(slot)  # ascending: a heap already
        view.release()
        if damaged:  # set aside: used, but not for dedup
            table_damaged = {slot for slot in used if slot in damaged}
            indexed = array("I", (slot for slot in used if slot not in table_damaged))
        else:
            table_damaged, indexed = set(), used
        table = cls(chain, budget, len(indexed))
        table.image, table.next_slot, table.free, table.bad = image, chain.next_slot, free, bad
        table.damaged = table_damaged
        table.stored = len(used)
        del used
        table.dedup.add_all(indexed)
        return table

    @classmethod
    def blank(cls, chain: Chain) -> "SlotTable":
        """A table of ``chain.next_slot`` free slots, all its runs to be saved."""
        table = cls(Chain(chain.id_, chain.key), expect=chain.next_slot)
        for _ in range(chain.next_slot):
            table.grow()
        return table

    # -- reading ------------------------------------------------------------

    def digest(self, slot: int) -> bytes:
        """The digest of the block in a used slot; CorruptIndex if the slot's
        entry is damaged, or free (a map naming a free slot is damage too)."""
        if slot in self.bad or slot >= self.next_slot:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        offset = slot * ENTRY.size
        if not self.image[offset + 16:offset + 20].strip(b"\0"):
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} is mapped but free")
        return bytes(self.image[offset:offset + 16])

    def refcount(self, slot: int) -> int:
        if slot in self.bad:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        return int(ENTRY.unpack_from(self.image, slot * ENTRY.size)[1])

    def find(self, digest: bytes) -> int | None:
        """A slot holding the block *digest*, if the dedup table knows one."""
        return self.dedup.find(digest)

    def find_prefix(self, prefix: bytes) -> tuple[bytes, int] | None:
        """(digest, slot) of a block whose digest is, or starts with, *prefix*:
        a whole digest through the dedup table, a shorter prefix by a scan
        of the slot table (for the rare caller that lacks the digest)."""
        if len(prefix) == DIGEST_SIZE:
            slot = self.dedup.find(prefix)
            return None if slot is None else (prefix, slot)
        for slot, digest, _ in self.used():
            if digest.startswith(prefix):
                return digest, slot
        return None

    def used(self) -> Iterator[tuple[int, bytes, int]]:
        """(slot, digest, refcount) of every used slot with a valid entry."""
        image, unpack = self.image, ENTRY.unpack_from
        for slot in range(self.next_slot):
            if slot not in self.bad:
                digest, refcount, _ = unpack(image, slot * ENTRY.size)
                if refcount:
                    yield slot, digest, refcount

    # -- changing ---------------------------------------------------------------

    def _set(self, slot: int, digest: bytes, refcount: int) -> None:
        ENTRY.pack_into(self.image, slot * ENTRY.size, digest, refcount,
                        entry_crc(self.chain_id, slot, digest, refcount))
        self._dirty.add(slot // SLOT_RUN)

    def claim(self, slot: int, digest: bytes, refcount: int = 1) -> None:
        """A free slot now holds the block *digest*, used *refcount* times."""
        self._set(slot, digest, refcount)
        self.stored += 1
        self.dedup.add(digest, slot)

    def ref(self, slot: int, count: int = 1) -> None:
        digest, refcount, _ = ENTRY.unpack_from(self.image, slot * ENTRY.size)
        if slot in self.bad or not refcount:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        self._set(slot, digest, refcount + count)

    def unref(self, slot: int, count: int = 1) -> bool:
        """Drop *count* references to a slot; True when that freed it."""
        if slot in self.bad or slot >= self.next_slot:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        digest, refcount, _ = ENTRY.unpack_from(self.image, slot * ENTRY.size)
        if refcount < count:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} counts {refcount} "
                               f"references, {count} dropped")
        refcount -= count
        if refcount:
            self._set(slot, digest, refcount)
            return False
        self.dedup.remove(digest, slot)
        self._set(slot, _FREE_DIGEST, 0)
        self.stored -= 1
        self.clear_mark(slot)  # freed: its space is punched, its mark goes
        return True

    def set_aside(self, slot: int) -> bool:
        """Mark a used slot damaged (its data does not match its digest): the
        dedup table forgets it, so a write of the same content stores a fresh
        copy. False if it is not a used slot with a valid entry, or is marked."""
        if slot in self.bad or slot in self.damaged or slot >= self.next_slot:
            return False
        digest, refcount, _ = ENTRY.unpack_from(self.image, slot * ENTRY.size)
        if not refcount:
            return False
        self.dedup.remove(digest, slot)
        self.damaged.add(slot)
        self._damaged_dirty.add(slot)
        return True

    def clear_mark(self, slot: int) -> None:
        """Drop *slot*'s damaged mark, if it has one (freed, or its data found
        to match after all); a used slot's digest goes back in the dedup table."""
        if slot not in self.damaged:
            return
        self.damaged.discard(slot)
        self._damaged_dirty.add(slot)
        digest, refcount, _ = ENTRY.unpack_from(self.image, slot * ENTRY.size)
        if refcount:
            self.dedup.add(digest, slot)

    def rebuild(self, slot: int, digest: bytes | None, refcount: int) -> None:
        """A new entry for a slot whose entry was lost (fsck): *digest* and
        *refcount* as the data file and the maps show them, or free (None)."""
        self.bad.discard(slot)
        if digest is None or not refcount:
            self._set(slot, _FREE_DIGEST, 0)
            return
        self._set(slot, digest, refcount)
        self.stored += 1
        if slot not in self.damaged:
            self.dedup.add(digest, slot)

    def lose(self, slot: int) -> None:
        """Give a slot an entry that does not verify, as a lost one reads (a
        reseal keeps a lost entry lost: ``swapfs fsck --repair`` rebuilds it)."""
        ENTRY.pack_into(self.image, slot * ENTRY.size, _FREE_DIGEST, 0,
                        entry_crc(self.chain_id, slot, _FREE_DIGEST, 0) ^ 0xFFFFFFFF)
        self._dirty.add(slot // SLOT_RUN)
        self.bad.add(slot)

    def take_free(self) -> int | None:
        """The lowest punched free slot, or None."""
        return heapq.heappop(self.free) if self.free else None

    def give_free(self, slots: Collection[int]) -> None:
        """Free slots whose space is now punched."""
        for slot in slots:
            heapq.heappush(self.free, slot)

    def grow(self) -> int:
        """A new slot at the end of the chain's data file."""
        slot = self.next_slot
        if slot >= MAX_SLOTS:
            raise SwapfsError(errno.ENOSPC, f"chain {self.chain_id} has no slot left")
        if slot % SLOT_RUN == 0:
            self.image += bytes(RUN_BYTES)
            for free in range(slot, slot + SLOT_RUN):
                self._set(free, _FREE_DIGEST, 0)
        self.next_slot = self.chain.next_slot = slot + 1
        return slot

    def save(self, txn: Txn) -> None:
        """Write the runs changed since the last save, and the damaged marks."""
        view = memoryview(self.image)
        for run in sorted(self._dirty):
            txn.put_slot_run(self.chain_id, run, view[run * RUN_BYTES:(run + 1) * RUN_BYTES])
        self._dirty.clear()
        if self._damaged_dirty:
            for slot in sorted(self._damaged_dirty):
                if slot in self.damaged:
                    txn.put_damaged(self.chain_id, slot)
                else:
                    txn.delete_damaged(self.chain_id, slot)
            self._damaged_dirty.clear()
