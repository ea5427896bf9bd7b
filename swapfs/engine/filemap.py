"""A file's block map: which slot of its chain each logical block names.

The index keeps a file's map in runs of :data:`MAP_RUN` logical blocks, one
LMDB value each, sized to fill one overflow page exactly (4,080 bytes):
LMDB then keeps each full run on a page of its own, whatever order the
runs were written in, where values of half a page leave most pages half
empty after its splits. The run's entries are little-endian u32,
the slot number plus one, 0 for a hole, with trailing holes left out, and a
CRC-32 of the key and entries (``swapfs/engine/index.py``). A run with no mapped
block has no value. So a mapped block costs about 4 bytes of index, and a
hole nothing.

Which runs a file has is kept apart, in its run directory (``mapdirs``): a
bitmap, bit *r* set when run *r* has a value, written in the transaction
that makes a run appear or go (rare: a run gains its first mapped block, or
loses its last), so that a lost run is noticed without reading the others.

:class:`FileMap` is the map as this process uses it: the directory, and
the runs read so far, each an ``array('I')`` (4 bytes per logical block).
A run is read from LMDB and verified the first time a block in it is asked
for, so the first read of a file after an open costs its directory and one
run, whatever the file's size. A run the directory names that LMDB lacks,
or that does not verify, makes its blocks unknown: reading one is
CorruptIndex (EIO), never a hole's zeros. A run the directory does not name
is holes. A file whose directory is missing, does not verify, or names too
few runs for its inode's count of mapped blocks, is read whole instead, and
its runs' mapped blocks counted against the inode's count: a count that
does not add up (a run lost) makes every block outside the runs found
unknown. fsck reports such a directory and rebuilds it; the next write of a
file whose runs did add up writes it again too.

The runs of every map of a State share one bound (:class:`RunCache`, 8 MiB
by default, ``State(map_cache_bytes=...)``): past it, the run read longest
ago is dropped, and read again when it is next needed (first in, first out,
so that a block read costs no bookkeeping). A run a transaction changed is
kept until that transaction has ended, outside the bound: read again before
its commit, it would be the old value.
"""

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator

from swapfs.engine.index import CorruptIndex, Inode, Txn

MAP_RUN = 1019  # 4 bytes each and a CRC: 4,080 bytes, a page less its header
#: A run's entries in memory.
_RUN_BYTES = 4 * MAP_RUN
#: The default bound of the map runs a State holds in memory (RunCache).
MAP_CACHE_BYTES = 8 << 20
_EMPTY = bytes(_RUN_BYTES)
_SWAP = sys.byteorder == "big"  # runs are little-endian on disk


def _decode(payload: bytes) -> array:
    entries = array("I", payload + _EMPTY[len(payload):])
    if _SWAP:
        entries.byteswap()
    return entries


def _le(entries: array) -> bytes:
    """Entries as they are stored, little-endian, none left out."""
    if _SWAP:
        entries = array("I", entries)
        entries.byteswap()
    return entries.tobytes()


def _encode(entries: array) -> bytes:
    """A run's value: its entries as stored, trailing holes left out."""
    raw = _le(entries)
    if entries[-1]:  # nothing to trim: the common case of a run in use
        return raw
    raw = raw.rstrip(b"\0")
    return raw + bytes(-len(raw) % 4)


def _mark(bitmap: bytearray, run: int, present: bool) -> None:
    """Set or clear bit *run* of a directory."""
    byte, bit = run >> 3, 1 << (run & 7)
    if byte >= len(bitmap):
        if not present:
            return
        bitmap.extend(bytes(byte + 1 - len(bitmap)))
    if present:
        bitmap[byte] |= bit
    else:
        bitmap[byte] &= ~bit & 0xFF


def run_directory(txn: Txn, ino: int) -> bytes:
    """The directory of the runs of file *ino*'s map that LMDB holds, verified
    or not, as it is saved (a conversion, fsck's rebuild)."""
    bitmap = bytearray()
    for run, _ in txn.iter_map_runs(ino):
        if run >= 0:
            _mark(bitmap, run, True)
    return bytes(bitmap).rstrip(b"\0")


class RunCache:
    """The runs of the maps of one State held in memory, within one bound.

    Only runs unchanged since they were read (or since the transaction
    that changed them ended) count, and are dropped oldest first past the
    bound; a map reads a run again when it needs it.
    """

    __slots__ = ("read", "limit", "loads", "_clean")

    def __init__(self, read: Callable[[int, int], bytes | None],
                 limit_bytes: int = MAP_CACHE_BYTES) -> None:
        #: ``read(ino, run)``: a run's verified value, None if it has none,
        #: read outside any transaction (a short read transaction).
        self.read = read
        #: How many unchanged runs stay in memory (at least one).
        self.limit = max(1, limit_bytes // _RUN_BYTES)
        #: Runs read from LMDB so far: how tests see what a read cost.
        self.loads = 0
        self._clean: OrderedDict[tuple[FileMap, int], None] = OrderedDict()

    def add(self, fmap: "FileMap", run: int) -> None:
        """Hold a run read, or one no longer changed; drop the oldest past the bound."""
        clean = self._clean
        clean[fmap, run] = None
        while len(clean) > self.limit:
            (old, old_run), _ = clean.popitem(last=False)
            old.runs.pop(old_run, None)

    def discard(self, fmap: "FileMap", run: int) -> None:
        """Take a run out of the bound: it is changed, or its map dropped."""
        self._clean.pop((fmap, run), None)


class FileMap:
    """One file's map: its run directory, the runs in memory, and what of it
    could not be verified."""

    __slots__ = ("ino", "runs", "bad_runs", "complete", "_named", "_named_changed",
                 "_dirty", "_pinned", "_cache", "_txn")

    def __init__(self, ino: int, cache: RunCache | None = None) -> None:
        """An empty map (a new file's). Its runs count against *cache*'s
        bound; without one, none is ever dropped (a map used alone)."""
        self.ino = ino
        #: The runs in memory.
        self.runs: dict[int, array] = {}
        #: Runs named whose value is missing or did not verify: their blocks
        #: are unknown.
        self.bad_runs: set[int] = set()
        #: False when the map was read whole and its runs did not add up to
        #: the inode's count (a run lost): every block outside the runs the
        #: directory names is unknown, and the directory is never saved.
        self.complete = True
        self._named = bytearray()  # the run directory
        self._named_changed = False  # to be saved
        #: The runs changed since the last save: the bounds of the entries
        #: changed in each, ``[lo, hi]``, or None for a run to be saved whole
        #: (new, or changed by a range).
        self._dirty: dict[int, list[int] | None] = {}
        self._pinned: set[int] = set()  # runs changed in the transaction in use
        self._cache = cache
        self._txn: Txn | None = None

    @classmethod
    def open(cls, txn: Txn, inode: Inode, cache: RunCache) -> "FileMap":
        """The map of *inode*, whose runs are read as they are used: only
        its directory is read now, unless it cannot be used (:meth:`load`)."""
        try:
            named = txn.get_map_dir(inode.ino)
        except CorruptIndex:
            named = None
        if named is None or _count(named) * MAP_RUN < inode.blocks:
            fmap = cls.load(txn, inode, cache)
            fmap._named_changed = fmap.complete  # the next save writes it again
            return fmap
        fmap = cls(inode.ino, cache)
        fmap._named = bytearray(named)
        return fmap

    @classmethod
    def load(cls, txn: Txn, inode: Inode, cache: RunCache | None = None) -> "FileMap":
        """The map of *inode* read whole and verified (fsck; a file whose
        directory cannot be used), its directory made from the runs found."""
        fmap = cls(inode.ino, cache)
        mapped = 0
        lost = False
        for run, payload in txn.iter_map_runs(inode.ino):
            if run < 0:  # a key that is not a run's: some run may be lost
                lost = True
                continue
            _mark(fmap._named, run, True)
            if payload is None or len(payload) % 4 or len(payload) > len(_EMPTY):
                fmap.bad_runs.add(run)
                continue
            entries = fmap._hold(run, _decode(payload))
            mapped += MAP_RUN - entries.count(0)
        fmap.complete = not lost and not fmap.bad_runs and mapped == inode.blocks
        return fmap

    def use(self, txn: Txn) -> None:
        """Read runs through *txn* while it lasts (a write transaction's
        changes are its own), and keep the runs changed meanwhile in memory
        until it has ended."""
        if self._txn is not txn:
            self._txn = txn
            txn.after(lambda _committed: self._ended(txn))

    def _ended(self, txn: Txn) -> None:
        if self._txn is txn:
            self._txn = None
        cache = self._cache
        if cache is not None:
            for run in self._pinned:
                if run in self.runs and run not in self._dirty:
                    cache.add(self, run)
        self._pinned.clear()

    def release(self) -> None:
        """Drop every run from memory: the file is gone, or a transaction
        that changed its map aborted (the map is not used again)."""
        if self._cache is not None:
            for run in self.runs:
                self._cache.discard(self, run)
        self.runs = {}
        self._pinned.clear()

    def _unknown(self, block: int) -> CorruptIndex:
        return CorruptIndex(f"the map of file {self.ino} is damaged at block {block}")

    def _names(self, run: int) -> bool:
        byte = run >> 3
        return byte < len(self._named) and bool(self._named[byte] >> (run & 7) & 1)

    def _name(self, run: int, present: bool) -> None:
        _mark(self._named, run, present)
        self._named_changed = True

    def _hold(self, run: int, entries: array) -> array:
        """Keep a run read from LMDB in memory."""
        self.runs[run] = entries
        cache = self._cache
        if cache is not None:
            cache.loads += 1
            cache.add(self, run)
        return entries

    def _read(self, run: int) -> array | None:
        """A run the directory names, read from LMDB and verified; None (and
        noted in bad_runs) when LMDB lacks it or it does not verify."""
        if run in self.bad_runs:
            return None
        try:
            if self._txn is not None:
                payload = self._txn.get_map_run(self.ino, run)
            else:
                # Only a map that open() made names runs it has not read.
                assert self._cache is not None
                payload = self._cache.read(self.ino, run)
        except CorruptIndex:
            payload = None
        if payload is None or len(payload) % 4 or len(payload) > len(_EMPTY):
            self.bad_runs.add(run)
            return None
        return self._hold(run, _decode(payload))

    def _load(self, run: int, block: int) -> array | None:
        """Run *run*, not in memory: read now, or None for a run of holes;
        CorruptIndex when *block* is unknown."""
        if not self._names(run):
            if self.complete:
                return None
            raise self._unknown(block)
        entries = self._read(run)
        if entries is None:
            raise self._unknown(block)
        return entries

    def _change(self, run: int, at: int = -1) -> None:
        """A run is changed, at entry *at* alone or (-1) as a whole: saved
        at the next save, and in memory until then and until the
        transaction in use has ended."""
        dirty = self._dirty
        if run in dirty:
            bounds = dirty[run]
            if bounds is not None:
                if at < 0:
                    dirty[run] = None
                elif at < bounds[0]:
                    bounds[0] = at
                elif at >= bounds[1]:
                    bounds[1] = at + 1
            return
        dirty[run] = None if at < 0 else [at, at + 1]
        if self._cache is not None:
            self._cache.discard(self, run)
            self._pinned.add(run)

    def get(self, block: int) -> int | None:
        """The slot logical block *block* maps to; None for a hole."""
        run, at = divmod(block, MAP_RUN)
        entries = self.runs.get(run)
        if entries is None:
            entries = self._load(run, block)
            if entries is None:
                return None
        slot = entries[at]
        return slot - 1 if slot else None

    def set(self, block: int, slot: int | None) -> None:
        """Map *block* to *slot*, or make it a hole with None."""
        run, at = divmod(block, MAP_RUN)
        entries = self.runs.get(run)
        if entries is None:
            entries = self._load(run, block)
            if entries is None:
                if slot is None:
                    return
                entries = self.runs[run] = array("I", _EMPTY)
                self._name(run, True)
                self._change(run)  # a new run: saved whole
        self._change(run, at)
        entries[at] = 0 if slot is None else slot + 1

    def _named_runs(self, first: int, stop: int | None) -> Iterator[int]:
        """The runs the directory names from run *first* to run *stop*
        (excluded; None: to the end), in order."""
        named = self._named
        for byte in range(first >> 3, len(named)):
            bits = named[byte]
            while bits:
                low = bits & -bits
                bits ^= low
                run = byte * 8 + low.bit_length() - 1
                if stop is not None and run >= stop:
                    return
                if run >= first:
                    yield run

    def _within(self, first: int, stop: int | None) -> Iterator[tuple[int, int, int]]:
        """(run, lo, hi) of each run named that ``[first, stop)`` touches, in
        order: its entries ``[lo, hi)`` are those in the range."""
        last = None if stop is None else -(-stop // MAP_RUN)
        for run in self._named_runs(first // MAP_RUN, last):
            base = run * MAP_RUN
            hi = MAP_RUN if stop is None else min(stop - base, MAP_RUN)
            yield run, max(first - base, 0), hi

    def mapped(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """(block, slot) of the mapped blocks in ``[first, stop)``, in order,
        reading runs as it goes; a run lost or damaged is left out (and
        found in bad_runs)."""
        for run, lo, hi in self._within(first, stop):
            entries = self.runs.get(run)
            if entries is None:
                entries = self._read(run)
                if entries is None:
                    continue
            base = run * MAP_RUN
            for at in range(lo, hi):
                slot = entries[at]
                if slot:
                    yield base + at, slot - 1

    def pop_range(self, first: int, stop: int | None = None) -> list[int]:
        """Unmap the blocks in ``[first, stop)`` (to the end without *stop*);
        return the slots they named. A lost or damaged run wholly inside the
        range goes too (its slots' references leak until fsck recounts
        them); one partly inside is CorruptIndex, after which the map is not
        to be saved (its transaction aborts, and the map is dropped)."""
        slots: list[int] = []
        if stop is not None and stop <= first:
            return slots
        for run, lo, hi in self._within(first, stop):
            entries = self.runs.get(run)
            if entries is None:
                entries = self._read(run)
            self._change(run)
            if entries is None:
                if lo or hi < MAP_RUN:
                    raise self._unknown(max(run * MAP_RUN, first))
                self.bad_runs.discard(run)
                self._name(run, False)  # and its value deleted at save
                continue
            slots.extend(slot - 1 for slot in entries[lo:hi] if slot)
            entries[lo:hi] = array("I", bytes(4 * (hi - lo)))
        return slots

    def copy(self, ino: int) -> "FileMap":
        """The same map for another file (a clone), every run read, to be
        saved, and kept in memory until the transaction in use has ended.
        CorruptIndex if a run is lost or damaged."""
        other = FileMap(ino, self._cache)
        other.complete = self.complete
        for run in self._named_runs(0, None):
            entries = self.runs.get(run)
            if entries is None:
                entries = self._read(run)
                if entries is None:
                    raise self._unknown(run * MAP_RUN)
            other.runs[run] = array("I", entries)
            other._name(run, True)
            other._change(run)
        if self._txn is not None:
            other.use(self._txn)
        return other

    def directory(self) -> bytes:
        """The run directory as it is saved: trailing zero bytes left out."""
        return bytes(self._named).rstrip(b"\0")

    def save(self, txn: Txn) -> None:
        """Write the runs changed since the last save, dropping runs left
        empty, and the directory if a run appeared or went (a file with no
        run has none)."""
        for run in sorted(self._dirty):
            entries = self.runs.get(run)
            raw = b"" if entries is None else _encode(entries)
            bounds = self._dirty[run]
            if entries is not None and raw and bounds is not None:
                lo, hi = bounds
                txn.patch_map_run(self.ino, run, raw, [(4 * lo, _le(entries[lo:hi]))])
            elif raw:
                txn.put_map_run(self.ino, run, raw)
            else:
                self.runs.pop(run, None)
                self._name(run, False)
                txn.delete_map_run(self.ino, run)
        self._dirty.clear()
        if self._named_changed and self.complete:
            named = self.directory()
            if named:
                txn.put_map_dir(self.ino, named)
            else:
                txn.delete_map_dir(self.ino)
            self._named_changed = False


def _count(bitmap: bytes) -> int:
    """How many runs a directory names."""
    return int.from_bytes(bitmap, "little").bit_count()
