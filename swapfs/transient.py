"""The transient cache: hot blocks held in space nobody uses.

Drivers (``swapfs-driver``) report the unused bytes of code pages in their
guest (:mod:`swapfs.codescan`). The cache manager aggregates the reports
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

**Write-through, content-keyed.** Blocks are keyed by chain and digest,
and a digest names its content forever, so a write never makes a cached
block stale and the store always holds every block: dropping one loses
nothing.

**Admission on second access.** A block is admitted the second time it
misses within a window of recently missed keys (twice the pool's slots,
at least 1024). Swap is read once per swap-in: one-off reads would only
push out the blocks that come back (the shared pages of cloned guests,
read by every clone). Eviction is least recently used.
"""

import secrets
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from swapfs.blocks import BLOCK_SIZE
from swapfs.codescan import Extent

#: A segment's identity: (driver, device, inode, program header, "head"/"tail").
SegmentKey = tuple[str, str, int, int, str]


@dataclass(frozen=True)
class Grant:
    """What a driver gets back for its report."""

    cache_id: str  # this daemon's cache, stable while it runs
    driver: str
    capacity_bytes: int  # the driver's share: its own segments' total
    token: str  # proves later reports come from the same driver


class TransientCache:
    """The pool, its segments, and the blocks in it."""

    def __init__(self, max_bytes: int) -> None:
        self.cache_id = uuid.uuid4().hex
        self.max_slots = max(0, max_bytes) // BLOCK_SIZE
        self._segments: dict[SegmentKey, tuple[int, int]] = {}  # key -> (start, length)
        self._arena_end = 0
        self._drivers: dict[str, set[SegmentKey]] = {}
        self._tokens: dict[str, str] = {}
        self._usable: list[int] = []  # usable slots, lowest first, at most max_slots
        self._free: list[int] = []
        self._blocks: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()  # LRU first
        self._ghosts: OrderedDict[bytes, None] = OrderedDict()
        self.hits = self.misses = self.admissions = self.evictions = 0
        self.revocations = 0  # blocks dropped because their segments left

    # -- the manager's side ---------------------------------------------------------

    def update(self, driver: str, extents: Iterable[Extent]) -> Grant:
        """Replace *driver*'s report with *extents*; the pool follows at once."""
        keys: set[SegmentKey] = set()
        for extent in extents:
            key = (driver, *extent.physical_key)
            keys.add(key)
            if key not in self._segments:
                self._segments[key] = (self._arena_end, extent.length)
                self._arena_end += extent.length
        for key in self._drivers.get(driver, set()) - keys:
            del self._segments[key]
        self._drivers[driver] = keys
        token = self._tokens.setdefault(driver, secrets.token_hex(16))
        self._relayout()
        return Grant(self.cache_id, driver, self.driver_bytes(driver), token)

    def revoke(self, driver: str) -> None:
        """A driver disconnected or fell silent: its segments leave the pool."""
        for key in self._drivers.pop(driver, set()):
            del self._segments[key]
        self._tokens.pop(driver, None)
        self._relayout()

    def token_of(self, driver: str) -> str | None:
        return self._tokens.get(driver)

    def driver_bytes(self, driver: str) -> int:
        return sum(self._segments[key][1] for key in self._drivers.get(driver, ()))

    def _relayout(self) -> None:
        """Recompute the usable slots; drop the blocks whose slots went."""
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
        self._usable = usable[:self.max_slots]
        live = set(self._usable)
        for key, (slot, _data) in list(self._blocks.items()):
            if slot not in live:
                del self._blocks[key]
                self.revocations += 1
        taken = {slot for slot, _data in self._blocks.values()}
        self._free = [slot for slot in reversed(self._usable) if slot not in taken]

    # -- the read path's side ----------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        entry = self._blocks.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._blocks.move_to_end(key)
        self.hits += 1
        return entry[1]

    def offer(self, key: bytes, data: bytes) -> None:
        """A block just read from the store (and verified): admit it on its second miss."""
        if not self._usable or key in self._blocks:
            return
        if key not in self._ghosts:
            self._ghosts[key] = None
            if len(self._ghosts) > max(1024, 2 * len(self._usable)):
                self._ghosts.popitem(last=False)
            return
        del self._ghosts[key]
        if self._free:
            slot = self._free.pop()
        else:
            _old, (slot, _data) = self._blocks.popitem(last=False)
            self.evictions += 1
        self._blocks[key] = (slot, data)
        self.admissions += 1

    # -- reporting -------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return len(self._usable) * BLOCK_SIZE

    def stats(self) -> dict[str, Any]:
        return {
            "cache_id": self.cache_id,
            "physical_bytes": sum(length for _start, length in self._segments.values()),
            "capacity_bytes": self.capacity_bytes,
            "max_bytes": self.max_slots * BLOCK_SIZE,
            "used_bytes": len(self._blocks) * BLOCK_SIZE,
            "hits": self.hits,
            "misses": self.misses,
            "admissions": self.admissions,
            "evictions": self.evictions,
            "revocations": self.revocations,
            "drivers": {driver: {"segments": len(keys), "bytes": self.driver_bytes(driver)}
                        for driver, keys in sorted(self._drivers.items())},
        }
