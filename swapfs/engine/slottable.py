"""A chain's slot table: what each slot of its data file holds.

Slot *n* of a chain holds one stored block. Its entry in the table is 24
bytes, ``digest (16) | refcount (u32) | CRC-32 (u32)``, little-endian; the
CRC covers the chain id, the slot number, the digest and the refcount, so a
flipped bit in an entry, or an entry that moved, does not verify. A free
slot has refcount 0 and a zero digest. The index keeps the table in runs
of :data:`SLOT_RUN` entries (4,080 bytes: one LMDB overflow page each, as
the file maps' runs, ``swapfs/engine/filemap.py``), every
run below the chain's ``next_slot`` present.

:class:`SlotTable` is the table as this process uses it, and nothing in it
is read at open: the chain's record says how many slots it has and how many
hold a block, and a run is read from the index, and its entries verified,
the first time one of its slots is asked about. Runs are kept as they are
stored (a changed run goes back to LMDB as it is, with no encoding), up to
a bound; beyond it the runs least recently loaded that no transaction
changed are dropped, and read again when needed. So an open, and the first
request after a takeover, cost the same whatever the chain holds.

What is derived from the whole table is found by a *scan*, a walk over the
runs a step at a time (:meth:`SlotTable.scan_step`) that the daemon runs in
the background while it serves (each write of the chain taking a step too,
``State.change``), and that an open without a daemon runs at once: the
dedup table (digest -> slot, ``swapfs/engine/deduptable.py``), the free
slots whose space is punched, and the entries that do not verify.
Until the scan has passed a slot, a write of the same content stores a
second copy, and a new block takes a slot at the end of the data file
rather than a free one below: dedup and reuse are late, never wrong. The
same walk builds a new dedup table when the one in use fills.

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
from collections.abc import Callable, Collection, Iterable, Iterator

from zlib_ng.zlib_ng import crc32

from swapfs.engine.deduptable import DedupBudget, DedupTable
from swapfs.engine.digest import DIGEST_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.index import STORED_UNKNOWN, Chain, CorruptIndex, Txn

SLOT_RUN = 170
ENTRY = struct.Struct("<16sII")  # digest, refcount, CRC-32
RUN_BYTES = SLOT_RUN * ENTRY.size
#: The bytes of runs a table keeps in memory by default (about 10 GiB of blocks).
SLOT_CACHE_BYTES = 16 << 20
#: Slots are named by u32 in the file maps, where 0 means a hole.
MAX_SLOTS = (1 << 32) - 1
_FREE_DIGEST = bytes(16)
_COVERED = struct.Struct("<IQ16sI")  # what an entry's CRC covers

#: Reads one run of a chain's slot table from the index: its stored bytes,
#: or None if the index has no such run.
RunSource = Callable[[int], bytes | None]


def entry_crc(chain_id: int, slot: int, digest: bytes, refcount: int) -> int:
    return crc32(_COVERED.pack(chain_id, slot, digest, refcount))


def _spans(raw: bytearray, changed: Collection[int]) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the entries *changed* of run *raw*, those next to
    each other in one span."""
    size = ENTRY.size
    spans = []
    ordered = sorted(changed)
    first = last = ordered[0]
    for at in [*ordered[1:], -1]:
        if at != last + 1:
            spans.append((first * size, bytes(raw[first * size:(last + 1) * size])))
            first = at
        last = at
    return spans


def _free_run(chain_id: int, run: int) -> bytearray:
    """A run of free entries, each with its CRC."""
    raw = bytearray(RUN_BYTES)
    for at in range(SLOT_RUN):
        slot = run * SLOT_RUN + at
        ENTRY.pack_into(raw, at * ENTRY.size, _FREE_DIGEST, 0,
                        entry_crc(chain_id, slot, _FREE_DIGEST, 0))
    return raw


class SlotTable:
    """One chain's slot table, dedup table and free slots."""

    __slots__ = ("chain", "chain_id", "runs", "next_slot", "stored", "dedup", "bad",
                 "damaged", "runs_kept", "scanned", "runs_loaded", "_source", "_dirty", "_lost",
                 "_damaged_dirty", "_saved", "_free", "_free_runs", "free_count",
                 "_scan_at", "_building", "_named_in_scan", "_unnamed")

    def __init__(self, chain: Chain, source: RunSource, budget: DedupBudget | None = None,
                 damaged: Iterable[int] = (),
                 runs_kept: int = SLOT_CACHE_BYTES // RUN_BYTES) -> None:
        """The table of *chain* as its record says, nothing read yet; its runs
        come from *source* as they are needed."""
        if chain.stored == STORED_UNKNOWN:
            raise CorruptIndex(f"chain {chain.id_} does not count its blocks: "
                               "its index needs converting (swapfs fsck --upgrade)")
        #: The chain's record, kept with its table: its ``next_slot`` and
        #: ``stored`` follow the table's, and are saved with its runs.
        self.chain = chain
        self.chain_id = chain.id_
        self._source = source
        #: The runs in memory, by number, least recently loaded first.
        self.runs: dict[int, bytearray] = {}
        self.runs_kept = runs_kept
        #: Runs read from the index since the table was made.
        self.runs_loaded = 0
        self.next_slot = chain.next_slot
        #: Slots with a refcount above zero.
        self.stored = chain.stored
        self._saved = (chain.next_slot, chain.stored)
        budget = budget or DedupBudget()
        #: The dedup table: a slot for each digest stored, as room allows.
        self.dedup = DedupTable.for_entries(self._digest_of, budget, self.stored)
        #: Slots whose entry is missing or does not verify: never read as
        #: data, never handed out. Known for the runs read so far.
        self.bad: set[int] = set()
        #: Used slots set aside as damaged: their data does not match their
        #: digest, so the dedup table does not name them.
        self.damaged: set[int] = set(damaged)
        #: The runs changed since the last save: the entries changed in
        #: each, or None for a run to be saved whole (a new one).
        self._dirty: dict[int, set[int] | None] = {}
        #: Runs the index lacks (read as entries that do not verify): saved
        #: whole once changed, there being nothing to patch.
        self._lost: set[int] = set()
        self._damaged_dirty: set[int] = set()  # slots whose mark changed
        #: Free slots whose disk space is punched: a bit mask per run, and the
        #: runs that have any (a heap, lowest first; stale entries skipped).
        self._free: dict[int, int] = {}
        self._free_runs: list[int] = []
        self.free_count = 0
        #: The next run the scan reads; True once it has read them all.
        self._scan_at = 0
        self.scanned = not chain.next_slot  # nothing to scan in a new chain
        #: The dedup table the scan is filling, once the one in use
        #: asked for room.
        self._building: DedupTable | None = None
        #: Slots named in the table being filled since its scan began: the
        #: scan passes over them (without this it would look up every
        #: digest before naming it, which doubles its cost).
        self._named_in_scan: set[int] = set()
        #: The digests the transaction in progress took out of the dedup
        #: tables (with their slots): named again if it aborts.
        self._unnamed: list[tuple[bytes, int]] = []

    @classmethod
    def load(cls, txn: Txn, chain: Chain, unpunched: Collection[int] = (),
             budget: DedupBudget | None = None) -> "SlotTable":
        """A chain's table read and verified whole through *txn*, as fsck and
        a reseal need it; free slots in *unpunched* stay out of the free ones.
        A record of format 4, which does not count its blocks, has them counted."""
        if chain.stored == STORED_UNKNOWN:
            chain.stored = cls.count_used(txn, chain)
        table = cls(chain, lambda run: txn.get_slot_run(chain.id_, run), budget,
                    txn.iter_damaged(chain.id_), runs_kept=1 << 32)
        table.give_free(table.scan_step(None, unpunched))
        return table

    @classmethod
    def blank(cls, chain: Chain) -> "SlotTable":
        """A table of ``chain.next_slot`` free slots, all its runs to be saved."""
        table = cls(Chain(chain.id_, chain.key), lambda run: None, runs_kept=1 << 32)
        table.scanned = True
        for _ in range(chain.next_slot):
            table.grow()
        return table

    @staticmethod
    def count_used(txn: Txn, chain: Chain) -> int:
        """The chain's slots with a refcount above zero whose entry verifies."""
        used = 0
        for run, raw in txn.iter_slot_runs(chain.id_):
            if len(raw) == RUN_BYTES:
                for at, (digest, refcount, crc) in enumerate(ENTRY.iter_unpack(raw)):
                    slot = run * SLOT_RUN + at
                    if (refcount and slot < chain.next_slot
                            and crc == entry_crc(chain.id_, slot, digest, refcount)):
                        used += 1
        return used

    # -- runs ---------------------------------------------------------------

    def _read(self, run: int) -> bytearray | None:
        """Run *run* as the index holds it, its bad entries noted in ``bad``;
        None if the index has no such run (all its slots bad)."""
        first, stop = run * SLOT_RUN, min((run + 1) * SLOT_RUN, self.next_slot)
        raw = self._source(run)
        self.runs_loaded += 1
        if raw is None or len(raw) != RUN_BYTES:
            self.bad.update(range(first, stop))
            return None
        chain_id, covered = self.chain_id, _COVERED.pack
        bad = self.bad
        for slot, (digest, refcount, crc) in enumerate(
                ENTRY.iter_unpack(raw[:(stop - first) * ENTRY.size]), first):
            if crc != crc32(covered(chain_id, slot, digest, refcount)):
                bad.add(slot)
            elif slot in bad:
                bad.discard(slot)  # rebuilt by fsck since it was read
        return bytearray(raw)

    def _run(self, run: int) -> bytearray:
        """Run *run* in memory, read and verified first if it is not. A run
        the index lacks reads as free entries, every slot of it bad."""
        held = self.runs.get(run)
        if held is not None:
            return held
        held = self._read(run)
        if held is None:
            held = bytearray(RUN_BYTES)  # entries that do not verify, as it is lost
            self._lost.add(run)
        if len(self.runs) >= self.runs_kept:
            self._trim()
        self.runs[run] = held
        return held

    def _trim(self) -> None:
        """Drop the runs loaded longest ago that no transaction changed,
        down to three quarters of the bound."""
        keep = self.runs_kept * 3 // 4
        for run in [run for run in self.runs if run not in self._dirty][:max(
                len(self.runs) - keep, 0)]:
            del self.runs[run]

    def _entry(self, slot: int) -> tuple[bytes, int]:
        """(digest, refcount) of a slot below next_slot whose entry verifies."""
        if slot >= self.next_slot:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        run, at = divmod(slot, SLOT_RUN)
        raw = self._run(run)
        if slot in self.bad:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        digest, refcount, _ = ENTRY.unpack_from(raw, at * ENTRY.size)
        return digest, refcount

    def _digest_of(self, slot: int) -> bytes | None:
        """The dedup table's check of a candidate: the digest of a used,
        valid, undamaged slot, else None."""
        if slot >= self.next_slot or slot in self.damaged:
            return None
        try:
            digest, refcount = self._entry(slot)
        except CorruptIndex:
            return None
        return digest if refcount else None

    # -- reading ------------------------------------------------------------

    def digest(self, slot: int) -> bytes:
        """The digest of the block in a used slot; CorruptIndex if the slot's
        entry is damaged, or free (a map naming a free slot is damage too)."""
        digest, refcount = self._entry(slot)
        if not refcount:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} is mapped but free")
        return digest

    def refcount(self, slot: int) -> int:
        return self._entry(slot)[1]

    def find(self, digest: bytes) -> int | None:
        """A slot holding the block *digest*, if the dedup table knows one, or
        the one the scan is filling (which names every block stored since it
        began, even those the full table in use could not take)."""
        slot = self.dedup.find(digest)
        if slot is None and self._building is not None:
            slot = self._building.find(digest)
        return slot

    def find_prefix(self, prefix: bytes) -> tuple[bytes, int] | None:
        """(digest, slot) of a block whose digest is, or starts with, *prefix*:
        a whole digest through the dedup table, a shorter prefix by a walk
        over the slot table (for the rare caller that lacks the digest)."""
        if len(prefix) == DIGEST_SIZE:
            slot = self.find(prefix)
            return None if slot is None else (prefix, slot)
        for slot, digest, _ in self.used():
            if digest.startswith(prefix):
                return digest, slot
        return None

    def used(self) -> Iterator[tuple[int, bytes, int]]:
        """(slot, digest, refcount) of every used slot with a valid entry, every
        run read (those not in memory are not kept)."""
        for run in range(-(-self.next_slot // SLOT_RUN)):
            raw = self.runs.get(run) or self._read(run)
            if raw is None:
                continue
            first = run * SLOT_RUN
            stop = min(first + SLOT_RUN, self.next_slot)
            for slot, (digest, refcount, _) in enumerate(
                    ENTRY.iter_unpack(raw[:(stop - first) * ENTRY.size]), first):
                if refcount and slot not in self.bad:
                    yield slot, digest, refcount

    # -- the scan -----------------------------------------------------------

    def scan_step(self, max_runs: int | None, pending: Collection[int] = ()) -> list[int]:
        """Read up to *max_runs* more runs (all with None): name their used
        slots in the dedup table being filled, and, in the first scan after
        the table was made, return their free slots not known yet and not in
        *pending* (the caller punches them if they may hold data, then gives
        them back with :meth:`give_free`). Runs in memory are read there,
        others from the index and not kept."""
        if not self.scanning:
            return []
        initial = not self.scanned
        target = self.dedup if self._building is None else self._building
        runs = -(-self.next_slot // SLOT_RUN)
        stop = runs if max_runs is None else min(runs, self._scan_at + max_runs)
        found: list[int] = []
        named = self._named_in_scan
        for run in range(self._scan_at, stop):
            raw = self.runs.get(run) or self._read(run)
            if raw is None:
                continue
            first = run * SLOT_RUN
            end = min(first + SLOT_RUN, self.next_slot)
            known = self._free.get(run, 0)
            for slot, (digest, refcount, _) in enumerate(
                    ENTRY.iter_unpack(raw[:(end - first) * ENTRY.size]), first):
                if slot in self.bad:
                    continue
                if refcount:
                    if slot not in self.damaged and slot not in named:
                        target.add(digest, slot)
                elif initial and not known >> (slot - first) & 1 and slot not in pending:
                    found.append(slot)
        self._scan_at = stop
        if stop >= runs:
            self._scan_at = 0
            self.scanned = True
            named.clear()
            if self._building is not None and not initial:
                self.dedup.release()
                self.dedup, self._building = self._building, None
        return found

    @property
    def scanning(self) -> bool:
        """Whether a scan is under way or due: after the table was made, or
        to fill a new dedup table."""
        return not self.scanned or self._building is not None

    # -- changing -----------------------------------------------------------

    def _set(self, slot: int, digest: bytes, refcount: int) -> None:
        run, at = divmod(slot, SLOT_RUN)
        raw = self._run(run)
        ENTRY.pack_into(raw, at * ENTRY.size, digest, refcount,
                        entry_crc(self.chain_id, slot, digest, refcount))
        self._changed(run, at)

    def _changed(self, run: int, at: int) -> None:
        """Entry *at* of run *run* is changed: saved at the next save."""
        dirty = self._dirty
        if run in dirty:
            changed = dirty[run]
            if changed is not None:
                changed.add(at)
        else:
            dirty[run] = {at}

    def _index(self, digest: bytes, slot: int) -> None:
        self.dedup.add(digest, slot)
        if not self.scanned:
            self._named_in_scan.add(slot)
        if self._building is not None:
            self._building.add(digest, slot)
            self._named_in_scan.add(slot)
        elif self.scanned and self.dedup.wants_room:
            # A scan fills its successor while this one still serves.
            self._building = self.dedup.successor()

    def _unindex(self, digest: bytes, slot: int) -> None:
        self._unnamed.append((digest, slot))
        self.dedup.remove(digest, slot)
        if self._building is not None:
            self._building.remove(digest, slot)

    def claim(self, slot: int, digest: bytes, refcount: int = 1) -> None:
        """A free slot now holds the block *digest*, used *refcount* times."""
        self._set(slot, digest, refcount)
        self.stored += 1
        self._index(digest, slot)

    def ref(self, slot: int, count: int = 1) -> None:
        digest, refcount = self._entry(slot)
        if not refcount:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} has no valid entry")
        self._set(slot, digest, refcount + count)

    def unref(self, slot: int, count: int = 1) -> bool:
        """Drop *count* references to a slot; True when that freed it."""
        digest, refcount = self._entry(slot)
        if refcount < count:
            raise CorruptIndex(f"chain {self.chain_id} slot {slot} counts {refcount} "
                               f"references, {count} dropped")
        refcount -= count
        if refcount:
            self._set(slot, digest, refcount)
            return False
        self._unindex(digest, slot)
        self._set(slot, _FREE_DIGEST, 0)
        self.stored -= 1
        self.clear_mark(slot)  # freed: its space is punched, its mark goes
        return True

    def set_aside(self, slot: int) -> bool:
        """Mark a used slot damaged (its data does not match its digest): the
        dedup table forgets it, so a write of the same content stores a fresh
        copy. False if it is not a used slot with a valid entry, or is marked."""
        if slot in self.damaged:
            return False
        try:
            digest, refcount = self._entry(slot)
        except CorruptIndex:
            return False
        if not refcount:
            return False
        self._unindex(digest, slot)
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
        digest, refcount = self._entry(slot)
        if refcount:
            self._index(digest, slot)

    def rebuild(self, slot: int, digest: bytes | None, refcount: int) -> None:
        """A new entry for a slot whose entry was lost (fsck): *digest* and
        *refcount* as the data file and the maps show them, or free (None).
        The count of blocks stored is the caller's to set (fsck counts them
        after its repairs): whether the lost entry was counted is unknown."""
        self._run(slot // SLOT_RUN)  # read, and its entries verified, first
        self.bad.discard(slot)
        if digest is None or not refcount:
            self._set(slot, _FREE_DIGEST, 0)
            return
        self._set(slot, digest, refcount)
        if slot not in self.damaged:
            self._index(digest, slot)

    def lose(self, slot: int) -> None:
        """Give a slot an entry that does not verify, as a lost one reads (a
        reseal keeps a lost entry lost: ``swapfs fsck --repair`` rebuilds it)."""
        run, at = divmod(slot, SLOT_RUN)
        ENTRY.pack_into(self._run(run), at * ENTRY.size, _FREE_DIGEST, 0,
                        entry_crc(self.chain_id, slot, _FREE_DIGEST, 0) ^ 0xFFFFFFFF)
        self._changed(run, at)
        self.bad.add(slot)

    def take_free(self) -> int | None:
        """The lowest punched free slot known, or None."""
        masks, heap = self._free, self._free_runs
        while heap:
            run = heap[0]
            mask = masks.get(run, 0)
            if not mask:
                heapq.heappop(heap)
                continue
            low = mask & -mask
            if mask == low:
                del masks[run]
                heapq.heappop(heap)
            else:
                masks[run] = mask ^ low
            self.free_count -= 1
            slot = run * SLOT_RUN + low.bit_length() - 1
            try:
                if self._entry(slot)[1] == 0:
                    return slot
            except CorruptIndex:
                pass  # its entry went bad since: never handed out
        return None

    def give_free(self, slots: Collection[int]) -> None:
        """Free slots whose space is now punched."""
        masks = self._free
        for slot in slots:
            run, at = divmod(slot, SLOT_RUN)
            mask = masks.get(run, 0)
            bit = 1 << at
            if mask & bit:
                continue
            if not mask:
                heapq.heappush(self._free_runs, run)
            masks[run] = mask | bit
            self.free_count += 1

    def grow(self) -> int:
        """A new slot at the end of the chain's data file."""
        slot = self.next_slot
        if slot >= MAX_SLOTS:
            raise SwapfsError(errno.ENOSPC, f"chain {self.chain_id} has no slot left")
        run = slot // SLOT_RUN
        if slot % SLOT_RUN == 0:
            if len(self.runs) >= self.runs_kept:
                self._trim()
            self.runs[run] = _free_run(self.chain_id, run)
            self._dirty[run] = None
        self.next_slot = self.chain.next_slot = slot + 1
        return slot

    def save(self, txn: Txn) -> None:
        """Write the runs changed since the last save, the damaged marks, and
        the chain's record if its counts changed."""
        for run in sorted(self._dirty):
            changed, raw = self._dirty[run], self.runs[run]
            if changed is None or run in self._lost:
                txn.put_slot_run(self.chain_id, run, raw)
                self._lost.discard(run)
            else:
                txn.patch_slot_run(self.chain_id, run, raw, _spans(raw, changed))
        self._dirty.clear()
        if self._damaged_dirty:
            for slot in sorted(self._damaged_dirty):
                if slot in self.damaged:
                    txn.put_damaged(self.chain_id, slot)
                else:
                    txn.delete_damaged(self.chain_id, slot)
            self._damaged_dirty.clear()
        self.chain.next_slot, self.chain.stored = self.next_slot, self.stored
        if (self.next_slot, self.stored) != self._saved:
            txn.put_chain(self.chain)
            self._saved = (self.next_slot, self.stored)

    def release(self) -> None:
        """Give the dedup tables' bytes back to the budget: the table is dropped."""
        self.dedup.release()
        if self._building is not None:
            self._building.release()
            self._building = None

    def rollback(self, committed: Chain, damaged: Collection[int]) -> None:
        """Forget what a transaction that aborted changed: its runs are read
        again, the counts and marks are the last commit's (*committed*,
        *damaged*). The dedup table may still name slots the transaction
        took; those entries no longer match, and cost a miss. The digests it
        took out, of slots the transaction freed, are named again."""
        self.runs.clear()
        self._dirty.clear()
        self._lost.clear()
        self._damaged_dirty.clear()
        self.next_slot = self.chain.next_slot = committed.next_slot
        self.stored = self.chain.stored = committed.stored
        self._saved = (committed.next_slot, committed.stored)
        self.damaged = set(damaged)
        self.bad = {slot for slot in self.bad if slot < self.next_slot}
        unnamed, self._unnamed = self._unnamed, []
        for digest, slot in unnamed:
            if self._digest_of(slot) == digest and self.find(digest) is None:
                self._index(digest, slot)

    def committed(self) -> None:
        """The transaction in progress committed: nothing to name again."""
        self._unnamed.clear()
