"""A chain's dedup table: which slot holds the block of a digest, in memory.

It is an open-addressing hash table over one ``array('I')`` of slot
numbers plus one (0 an empty bucket, 0xFFFFFFFF a removed entry), probed
linearly from a bucket given by the digest's first eight bytes; the digest
itself is not stored but compared with the slot table's entry (the keyed
BLAKE3 digests are uniform, so they need no further hashing). A bucket is
4 bytes and the table is kept at most 70% full, so an entry costs 5.7 to
11.4 bytes, where a Python dict of digests costs about 130.

The tables of all chains of a volume share a :class:`DedupBudget` of
bytes (``dedup_table_bytes``). A table that is full and may not grow
stops taking new digests: dedup is advisory, so a block it does not know
is stored again in a slot of its own, and everything still reads back
right; ``swapfs stats`` counts such blocks (``unindexed``).
"""

from array import array
from collections.abc import Callable, Sequence

_EMPTY = 0
_GONE = 0xFFFFFFFF
_MIN_BUCKETS = 1024
_DIGEST = 16
_ENTRY = 24  # a slot table entry, whose first 16 bytes are its digest


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


class DedupTable:
    """digest -> slot for one chain, reading digests from its slot table."""

    __slots__ = ("_image", "_budget", "buckets", "_mask", "entries", "_filled",
                 "unindexed")

    def __init__(self, image: Callable[[], bytearray], budget: DedupBudget,
                 expect: int = 0) -> None:
        #: The slot table's entries (a callable: the table may replace them).
        self._image = image
        self._budget = budget
        size = _MIN_BUCKETS
        while size * 7 < expect * 10:
            size *= 2
        if not budget.grant(4 * size):
            size = _MIN_BUCKETS
            budget.grant(4 * size)  # the least a chain has, even past the limit
        self.buckets = array("I", bytes(4 * size))
        self._mask = size - 1
        self.entries = 0  # live entries
        self._filled = 0  # live and removed ones: what probing walks over
        #: Blocks stored that the table had no room to name.
        self.unindexed = 0

    @property
    def size_bytes(self) -> int:
        return 4 * len(self.buckets)

    def find(self, digest: bytes) -> int | None:
        """The slot the table names for *digest*, or None."""
        buckets, mask, image = self.buckets, self._mask, self._image()
        at = int.from_bytes(digest[:8], "little") & mask
        while True:
            held = buckets[at]
            if held == _EMPTY:
                return None
            if held != _GONE:
                offset = (held - 1) * _ENTRY
                if image[offset:offset + _DIGEST] == digest:
                    return held - 1
            at = (at + 1) & mask

    def add(self, digest: bytes, slot: int) -> bool:
        """Name *slot* for *digest* (which the table does not hold yet); False
        when the table is full and may not grow."""
        if (self._filled + 1) * 10 > len(self.buckets) * 7 and not self._make_room():
            self.unindexed += 1
            return False
        buckets, mask = self.buckets, self._mask
        at = int.from_bytes(digest[:8], "little") & mask
        while buckets[at] not in (_EMPTY, _GONE):
            at = (at + 1) & mask
        if buckets[at] == _EMPTY:
            self._filled += 1
        buckets[at] = slot + 1
        self.entries += 1
        return True

    def add_all(self, slots: Sequence[int]) -> None:
        """:meth:`add` each used slot, its digest read from the slot table, as
        a state's table is loaded."""
        with memoryview(self._image()) as image:
            if (self._filled + len(slots)) * 10 > len(self.buckets) * 7:
                for slot in slots:  # past the room it was sized for
                    offset = slot * _ENTRY
                    self.add(bytes(image[offset:offset + _DIGEST]), slot)
                return
            buckets, mask, from_bytes = self.buckets, self._mask, int.from_bytes
            for slot in slots:
                offset = slot * _ENTRY
                at = from_bytes(image[offset:offset + 8], "little") & mask
                while buckets[at]:  # a fresh table: no removed entries yet
                    at = (at + 1) & mask
                buckets[at] = slot + 1
        self.entries += len(slots)
        self._filled += len(slots)

    def remove(self, digest: bytes, slot: int) -> None:
        """Forget *slot* for *digest*, if the table names it."""
        buckets, mask = self.buckets, self._mask
        at = int.from_bytes(digest[:8], "little") & mask
        while True:
            held = buckets[at]
            if held == _EMPTY:
                return
            if held == slot + 1:
                buckets[at] = _GONE
                self.entries -= 1
                return
            at = (at + 1) & mask

    def release(self) -> None:
        """Give the table's bytes back to the budget: it is being dropped."""
        self._budget.give_back(self.size_bytes)
        self.buckets = array("I")

    def _make_room(self) -> bool:
        """Double the table (if the budget allows), or else rebuild it at its
        size when removed entries take the room; False if neither helps."""
        size = len(self.buckets)
        if self._budget.grant(4 * size):
            self._rebuild(2 * size)
            return True
        if (self.entries + 1) * 10 <= size * 7:
            self._rebuild(size)
            return True
        return False

    def _rebuild(self, size: int) -> None:
        old = self.buckets
        self.buckets = array("I", bytes(4 * size))
        self._mask = size - 1
        self.entries = self._filled = 0
        image = self._image()
        for held in old:
            if held != _EMPTY and held != _GONE:
                offset = (held - 1) * _ENTRY
                self.add(bytes(image[offset:offset + _DIGEST]), held - 1)
