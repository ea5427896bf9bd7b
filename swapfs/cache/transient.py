"""The transient cache: hot blocks held in space nobody uses.

Drivers (``swapfs-driver``) report the unused bytes of code pages in their
guest (:mod:`swapfs.guest.codescan`). The cache manager aggregates the reports
into a pool whose capacity is their physical total, bounded by a
configured maximum, and the read path keeps hot blocks there.

**Segments.** Each physical extent — one driver's (device, inode,
segment, head or tail), however many of its processes map it — is one
segment of the pool. Segments are laid end to end in the pool's address
space in the order they first appear; a block occupies a 4 KiB-aligned
slot of that space, and a slot is usable only while every segment under it
is live. When a report shrinks (a process exited) or a driver goes away,
its segments leave and exactly the blocks whose slots they held are
dropped. The space of a gone segment is not reused; the address space is
only numbers.

**Held slots.** Some of a driver's share may be held back from the blocks:
the daemon's driver manager (``mountd/drivers.py``) keeps the driver's
sealed records there, and says how many whole slots they take. The pool
keeps that many fewer slots for blocks, never more than the driver's share,
and forgets them with the share; what is held, and wiping it, is the
manager's.

**The blocks.** Keeping the blocks (heat, owners, admission on second
miss, LRU eviction, revocation of the blocks in lost slots) is
:class:`swapfs.cache.blockcache.BlockCache`, which this class extends with the
segments that give it its slots; the content cache is the same class with
slots of host memory.
"""

import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from swapfs.cache.blockcache import BlockCache
from swapfs.engine import BLOCK_SIZE

#: A segment's identity: (driver, device, inode, program header, "head"/"tail").
SegmentKey = tuple[str, str, int, int, str]


class Region(Protocol):
    """What the pool needs of one reported region of unused bytes (a driver's
    ``swapfs.control.Extent`` is one): which physical bytes, and how many. The
    pool knows no more of the guest side than this."""

    @property
    def physical_key(self) -> tuple[str, int, int, str]: ...

    @property
    def length(self) -> int: ...


@dataclass(frozen=True)
class Grant:
    """What a driver gets back for its report."""

    cache_id: str  # this daemon's cache, stable while it runs
    driver: str
    capacity_bytes: int  # the driver's share: its own segments' total
    token: str  # proves later reports come from the same driver


class TransientCache(BlockCache):
    """The pool: its segments give the slots of its blocks."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.cache_id = uuid.uuid4().hex
        self.max_slots = max(0, max_bytes) // BLOCK_SIZE
        self._segments: dict[SegmentKey, tuple[int, int]] = {}  # key -> (start, length)
        self._arena_end = 0
        self._drivers: dict[str, set[SegmentKey]] = {}
        self._tokens: dict[str, str] = {}
        #: Driver -> whole slots of its share held back from the blocks.
        self._held: dict[str, int] = {}

    # -- the manager's side ---------------------------------------------------------

    def update(self, driver: str, extents: Iterable[Region],
               held_slots: int | None = None) -> Grant:
        """Replace *driver*'s report with *extents*, holding back *held_slots*
        of its new share (as many as before if None); the pool follows at once."""
        keys = self._report(driver, extents)
        for key, length in keys.items():
            if key not in self._segments:
                self._segments[key] = (self._arena_end, length)
                self._arena_end += length
        for key in self._drivers.get(driver, set()) - keys.keys():
            del self._segments[key]
        self._drivers[driver] = set(keys)
        token = self._tokens.setdefault(driver, secrets.token_hex(16))
        self._hold(driver, self._held.get(driver, 0) if held_slots is None else held_slots)
        self._relayout()
        return Grant(self.cache_id, driver, self.driver_bytes(driver), token)

    def revoke(self, driver: str) -> None:
        """A driver disconnected or fell silent: its segments leave the pool,
        and with them the slots it held back."""
        for key in self._drivers.pop(driver, set()):
            del self._segments[key]
        self._tokens.pop(driver, None)
        self._held.pop(driver, None)
        self._relayout()

    def hold(self, driver: str, slots: int) -> None:
        """Hold *slots* whole slots of *driver*'s share back from the blocks
        (at most its share: see share_slots)."""
        self._hold(driver, slots)
        self._relayout()

    def share_slots(self, driver: str, extents: Iterable[Region] | None = None) -> int:
        """The whole slots of *driver*'s share, which is what it may hold back:
        as it is, or as a report of *extents* would make it (nothing changes)."""
        if extents is None:
            return self.driver_bytes(driver) // BLOCK_SIZE
        return sum(self._report(driver, extents).values()) // BLOCK_SIZE

    def token_of(self, driver: str) -> str | None:
        return self._tokens.get(driver)

    def driver_bytes(self, driver: str) -> int:
        return sum(self._segments[key][1] for key in self._drivers.get(driver, ()))

    def _report(self, driver: str, extents: Iterable[Region]) -> dict[SegmentKey, int]:
        """The segments of a report of *extents* by *driver* and their lengths:
        a segment already in the pool keeps its length, a new one has its
        first extent's."""
        report: dict[SegmentKey, int] = {}
        for extent in extents:
            key = (driver, *extent.physical_key)
            if key not in report:
                known = self._segments.get(key)
                report[key] = extent.length if known is None else known[1]
        return report

    def _hold(self, driver: str, slots: int) -> None:
        held = min(max(0, slots), self.share_slots(driver))
        if held:
            self._held[driver] = held
        else:
            self._held.pop(driver, None)

    def _relayout(self) -> None:
        """Recompute the usable slots (at most max_slots, lowest first); the
        blocks whose slots went are dropped."""
        ranges = sorted(self._segments.values())
        usable: list[int] = []
        run_start, run_end = 0, 0
        for start, length in [*ranges, (-1, 0)]:
            if start == run_end and start >= 0:
                run_end += length
                continue
            first = -(-run_start // BLOCK_SIZE)
            usable.extend(range(first, run_end // BLOCK_SIZE))
            run_start, run_end = start, start + length
        usable = usable[:self.max_slots]
        self.set_slots(usable[:max(0, len(usable) - sum(self._held.values()))])

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "cache_id": self.cache_id,
            "physical_bytes": sum(length for _start, length in self._segments.values()),
            "max_bytes": self.max_slots * BLOCK_SIZE,
            "drivers": {driver: {"segments": len(keys), "bytes": self.driver_bytes(driver)}
                        for driver, keys in sorted(self._drivers.items())},
        }
