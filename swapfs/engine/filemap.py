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

:class:`FileMap` is the map as this process uses it: each run an
``array('I')`` in memory (loaded in full the first time the file is used,
4 bytes per logical block of every run present), so that a read finds its
slot without asking LMDB. Loading verifies each run, and the number of
mapped blocks against the inode's count: a run that does not verify, or a
count that does not add up (a run lost), makes the blocks it could hold
unknown, and reading one is CorruptIndex (EIO), never a hole's zeros.
"""

import sys
from array import array
from collections.abc import Iterator

from swapfs.engine.index import CorruptIndex, Inode, Txn

MAP_RUN = 1019  # 4 bytes each and a CRC: 4,080 bytes, a page less its header
_EMPTY = bytes(4 * MAP_RUN)
_SWAP = sys.byteorder == "big"  # runs are little-endian on disk


def _decode(payload: bytes) -> array:
    entries = array("I", payload + _EMPTY[len(payload):])
    if _SWAP:
        entries.byteswap()
    return entries


def _encode(entries: array) -> bytes:
    if _SWAP:
        entries = array("I", entries)
        entries.byteswap()
    raw = entries.tobytes()
    if entries[-1]:  # nothing to trim: the common case of a run in use
        return raw
    raw = raw.rstrip(b"\0")
    return raw + bytes(-len(raw) % 4)


class FileMap:
    """One file's map, in memory, with what of it could not be verified."""

    __slots__ = ("ino", "runs", "bad_runs", "complete", "_dirty")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.runs: dict[int, array] = {}
        #: Runs whose value did not verify: their blocks are unknown.
        self.bad_runs: set[int] = set()
        #: False when the runs that verified do not add up to the inode's
        #: count: some run is lost, so every block outside them is unknown.
        self.complete = True
        self._dirty: set[int] = set()

    @classmethod
    def load(cls, txn: Txn, inode: Inode) -> "FileMap":
        fmap = cls(inode.ino)
        mapped = 0
        lost = False
        for run, payload in txn.iter_map_runs(inode.ino):
            if run < 0:  # a key that is not a run's: some run may be lost
                lost = True
                continue
            if payload is None or len(payload) % 4 or len(payload) > len(_EMPTY):
                fmap.bad_runs.add(run)
                continue
            entries = _decode(payload)
            fmap.runs[run] = entries
            mapped += MAP_RUN - entries.count(0)
        fmap.complete = not lost and not fmap.bad_runs and mapped == inode.blocks
        return fmap

    def _unknown(self, block: int) -> CorruptIndex:
        return CorruptIndex(f"the map of file {self.ino} is damaged at block {block}")

    def get(self, block: int) -> int | None:
        """The slot logical block *block* maps to; None for a hole."""
        run, at = divmod(block, MAP_RUN)
        entries = self.runs.get(run)
        if entries is None:
            if self.complete:
                return None
            raise self._unknown(block)
        slot = entries[at]
        return slot - 1 if slot else None

    def set(self, block: int, slot: int | None) -> None:
        """Map *block* to *slot*, or make it a hole with None."""
        run, at = divmod(block, MAP_RUN)
        entries = self.runs.get(run)
        if entries is None:
            if not self.complete:
                raise self._unknown(block)
            if slot is None:
                return
            entries = self.runs[run] = array("I", _EMPTY)
        entries[at] = 0 if slot is None else slot + 1
        self._dirty.add(run)

    def _within(self, first: int, stop: int | None) -> Iterator[tuple[int, int, int]]:
        """(run, lo, hi) of each run present that ``[first, stop)`` touches,
        in order: its entries ``[lo, hi)`` are those in the range."""
        for run in sorted(self.runs):
            base = run * MAP_RUN
            if stop is not None and base >= stop:
                return
            if base + MAP_RUN > first:
                hi = MAP_RUN if stop is None else min(stop - base, MAP_RUN)
                yield run, max(first - base, 0), hi

    def mapped(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """(block, slot) of the mapped blocks in ``[first, stop)``, in order."""
        for run, lo, hi in self._within(first, stop):
            entries, base = self.runs[run], run * MAP_RUN
            for at in range(lo, hi):
                slot = entries[at]
                if slot:
                    yield base + at, slot - 1

    def pop_range(self, first: int, stop: int | None = None) -> list[int]:
        """Unmap the blocks in ``[first, stop)`` (to the end without *stop*);
        return the slots they named. A damaged run wholly inside the range
        goes too (its slots' references leak until fsck recounts them); one
        partly inside is CorruptIndex."""
        slots: list[int] = []
        if stop is not None and stop <= first:
            return slots
        for run in sorted(self.bad_runs):
            base = run * MAP_RUN
            inside = base >= first and (stop is None or base + MAP_RUN <= stop)
            overlaps = base + MAP_RUN > first and (stop is None or base < stop)
            if inside:
                self.bad_runs.discard(run)
                self._dirty.add(run)
            elif overlaps:
                raise self._unknown(max(base, first))
        for run, lo, hi in self._within(first, stop):
            entries = self.runs[run]
            part = entries[lo:hi]
            slots.extend(slot - 1 for slot in part if slot)
            entries[lo:hi] = array("I", bytes(4 * (hi - lo)))
            self._dirty.add(run)
        return slots

    def copy(self, ino: int) -> "FileMap":
        """The same map for another file (a clone), every run to be saved."""
        other = FileMap(ino)
        other.runs = {run: array("I", entries) for run, entries in self.runs.items()}
        other._dirty = set(other.runs)
        return other

    def save(self, txn: Txn) -> None:
        """Write the runs changed since the last save; drop runs left empty."""
        for run in sorted(self._dirty):
            entries = self.runs.get(run)
            raw = b"" if entries is None else _encode(entries)
            if raw:
                txn.put_map_run(self.ino, run, raw)
            else:
                self.runs.pop(run, None)
                txn.delete_map_run(self.ino, run)
        self._dirty.clear()
