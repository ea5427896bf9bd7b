"""A chain's dedup table: which slot holds the block of a digest, in memory.

It is an open-addressing hash table over two arrays: ``slots``, the slot
number plus one of each bucket (0 an empty bucket, 0xFFFFFFFF a removed
entry), and ``tags``, 16 bits of the digest (its first two bytes). A
lookup probes linearly from the bucket its bytes 4 to 7 give (scaled to the
table's size by a multiply and shift, so that a table need not be a power
of two) and compares tags; only a bucket whose tag matches has its slot's digest
read and compared, from the slot table, which may have to read that slot's
run from the index. Without the tags every bucket probed would cost such a
read: the slot table is no longer held whole in memory. A bucket is 6
bytes; a table is built 75% full and keeps taking entries up to 85%, and
its successor is sized for half as many entries again as the table holds,
so an entry costs 7.1 to 12 bytes (8 at the build after an open: 2 MiB
per GiB stored), where a Python dict of digests costs about 130.

A table never rehashes itself: that would read the digest of every entry,
the whole slot table, while a request waits. When it is past 85% full it
asks for room (:attr:`DedupTable.wants_room`), and its slot table builds a
successor in the background from its runs (``swapfs/engine/slottable.py``),
as it builds the first one after an open: larger if its live entries
filled it, the same size if removed ones did (a removed entry stays as a
marker that probes pass over, since moving the entries after it back
would need their digests). Up to 95% full it still takes
entries; past that, or when the budget refuses a larger table, a new block
is simply not named: dedup is advisory, so such a block is stored again in
a slot of its own and everything still reads back right; ``swapfs stats``
counts them (``unindexed``).

The tables of all chains of a volume share a :class:`DedupBudget` of bytes
(``dedup_table_bytes``).
"""

import contextlib
import mmap
from collections.abc import Callable

_EMPTY = 0
_GONE = 0xFFFFFFFF
_MIN_BUCKETS = 1024
BUCKET_BYTES = 6  # a slot number (4) and a tag (2)
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # not shmem, which could swap
_HUGE_PAGE = 2 << 20  # x86-64's PMD size
#: The load a table is built for, asks for room at, and stops taking entries at.
BUILD_LOAD = 0.75
GROW_LOAD = 0.85
FULL_LOAD = 0.95


class DedupBudget:
    """The bytes the dedup tables of one volume may take together (None: any)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0

    def grant(self, more: int) -> bool:
        """Take *more* bytes if the limit allows; True when taken."""
        if self.limit is not None and self.used + more > self.limit:
            return False
        self.used += more
        return True

    def give_back(self, fewer: int) -> None:
        self.used -= fewer


def _bucket(word: int, size: int) -> int:
    """The first bucket of a digest whose first eight bytes are *word*, in a
    table of *size* buckets: its top 32 bits scaled to the size, so that the
    product fits 64 bits in the compiled build. (Its low 16 bits are the tag.)"""
    return (word >> 32) * size >> 32


def _anonymous(length: int) -> mmap.mmap:
    """Private anonymous memory for *length* bytes of buckets, zeros until
    written; in transparent huge pages where it spans one or more.

    A table is filled at random, so all of its pages are touched soon after
    it is built, and at 64 GiB stored it is 134 MiB of them. A killed
    daemon's memory is torn down before its descriptors close, and so
    before a standby can see the death: in 4 KiB pages that took 9-12 ms
    (14-20 ms locked) here, in huge pages 1-2.6 ms. The map is rounded up to
    whole huge pages so that the kernel can align and fill it with them;
    the pages past the table are never touched.
    """
    if length >= _HUGE_PAGE:
        held = mmap.mmap(-1, -(-length // _HUGE_PAGE) * _HUGE_PAGE, flags=_PRIVATE)
        # A kernel without transparent huge pages refuses: 4 KiB pages then.
        with contextlib.suppress(OSError):
            held.madvise(mmap.MADV_HUGEPAGE)
        return held
    return mmap.mmap(-1, length, flags=_PRIVATE)


def buckets_for(entries: int) -> int:
    """The buckets of a table built to hold *entries* at BUILD_LOAD."""
    return max(_MIN_BUCKETS, int(entries / BUILD_LOAD) + 1)


class DedupTable:
    """digest -> slot for one chain; digests are read through *digest_of*.

    *digest_of(slot)* is the digest the slot table holds for a used slot,
    or None for a slot that is free, damaged or beyond the table: an entry
    the table still names after its slot changed (a transaction that
    aborted, a slot freed and taken again) then simply does not match.
    """

    __slots__ = ("_digest_of", "_budget", "slots", "tags", "size", "entries", "_filled",
                 "unindexed", "_maps")

    def __init__(self, digest_of: Callable[[int], bytes | None], budget: DedupBudget,
                 size: int) -> None:
        """A table of *size* buckets, whose bytes *budget* granted already
        (:meth:`for_entries`, :meth:`successor`)."""
        self._digest_of = digest_of
        self._budget = budget
        # Anonymous maps, not arrays: their zeros cost nothing until a bucket
        # is written, so a table sized at open for every block the chain
        # holds touches (and locks) only what the scan then fills; an array
        # wrote all its zeros first (137 MB before a 64 GiB state served).
        self._maps = (_anonymous(4 * size), _anonymous(2 * size))
        self.slots = memoryview(self._maps[0])[:4 * size].cast("I")
        self.tags = memoryview(self._maps[1])[:2 * size].cast("H")
        self.size = size
        self.entries = 0  # live entries
        self._filled = 0  # live and removed ones: what probing walks over
        #: Blocks stored that the table had no room to name.
        self.unindexed = 0

    @classmethod
    def for_entries(cls, digest_of: Callable[[int], bytes | None], budget: DedupBudget,
                    expect: int) -> "DedupTable":
        """A table for *expect* entries if the budget grants its bytes, else
        the smallest one, granted or not: a chain always has one."""
        size = buckets_for(expect)
        if not budget.grant(BUCKET_BYTES * size):
            size = _MIN_BUCKETS
            budget.grant(BUCKET_BYTES * size)
        return cls(digest_of, budget, size)

    def successor(self) -> "DedupTable | None":
        """An empty table to replace this one once filled: sized for its live
        entries and half as many more, at BUILD_LOAD (so a table that filled
        with removed entries is rebuilt at about its size, and one that
        filled with live ones 1.7 times larger: room for the blocks a fast
        fill stores while the scan builds it); None if the budget refuses a
        larger table. One no larger is granted past the budget: this one's bytes
        come back when it is dropped."""
        size = buckets_for(self.entries * 3 // 2)
        if not self._budget.grant(BUCKET_BYTES * size):
            if size > self.size:
                return None
            self._budget.used += BUCKET_BYTES * size
        return DedupTable(self._digest_of, self._budget, size)

    @property
    def size_bytes(self) -> int:
        return BUCKET_BYTES * self.size

    @property
    def wants_room(self) -> bool:
        """Past GROW_LOAD: a successor should be built."""
        return self._filled > self.size * GROW_LOAD

    def find(self, digest: bytes) -> int | None:
        """The slot the table names for *digest*, or None."""
        slots, tags, size = self.slots, self.tags, self.size
        word = int.from_bytes(digest[:8], "little")
        at, tag = _bucket(word, size), word & 0xFFFF
        for _probe in range(size):
            held = slots[at]
            if held == _EMPTY:
                return None
            if held != _GONE and tags[at] == tag and self._digest_of(held - 1) == digest:
                return held - 1
            at += 1
            if at == size:
                at = 0
        return None

    def add(self, digest: bytes, slot: int) -> bool:
        """Name *slot* for *digest* (which the table does not hold yet); False
        when the table is full."""
        if self._filled >= self.size * FULL_LOAD:
            self.unindexed += 1
            return False
        slots, size = self.slots, self.size
        word = int.from_bytes(digest[:8], "little")
        at, tag = _bucket(word, size), word & 0xFFFF
        while slots[at] != _EMPTY and slots[at] != _GONE:
            at += 1
            if at == size:
                at = 0
        if slots[at] == _EMPTY:
            self._filled += 1
        slots[at] = slot + 1
        self.tags[at] = tag
        self.entries += 1
        return True

    def remove(self, digest: bytes, slot: int) -> None:
        """Forget *slot* for *digest*, if the table names it."""
        slots, size = self.slots, self.size
        at = _bucket(int.from_bytes(digest[:8], "little"), size)
        for _probe in range(size):
            held = slots[at]
            if held == _EMPTY:
                return
            if held == slot + 1:
                slots[at] = _GONE
                self.entries -= 1
                return
            at += 1
            if at == size:
                at = 0

    def release(self) -> None:
        """Give the table's bytes back to the budget: it is being dropped."""
        self._budget.give_back(self.size_bytes)
        # The views go first (a map with a view on it cannot close): empty
        # ones, as a released table holds nothing.
        self.slots = memoryview(bytearray()).cast("I")
        self.tags = memoryview(bytearray()).cast("H")
        for held in self._maps:
            held.close()
        self.size = 0
