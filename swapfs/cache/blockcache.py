"""Blocks kept in memory: the one cache mechanism behind both read caches.

A :class:`BlockCache` keeps verified blocks by key (chain id, 4 bytes
big-endian, + digest), each with its heat and the files that read it. Its
capacity is a list of **slots** that a source hands it:

- the transient pool (:mod:`swapfs.cache.transient`) gives the slots of the code
  pages that drivers reported, and takes them back when a report shrinks:
  exactly the blocks in the lost slots are dropped (revoked);
- the content cache gives ``budget // 4096`` slots of host memory, once.

Blocks are named by their content, so a write never makes one stale, and
the store keeps every block: dropping one loses nothing. Design, figures
and the choice of policy: ``docs/caches.md``.

**Admission** is the source's choice. The content cache admits on the
first miss: clones swap in the same pages within moments of each other,
and a block cached at its first read serves every clone after the first
(75% of look-ups hit under real swap-in of four clones' identical pages,
against 50% on the second miss). The transient pool admits on the second
miss within a window of recently missed keys (the last one to two
generations of misses, a generation being as many keys as slots, at least
1024), so that its few slots go to blocks that came back. **Eviction** is
least recently used; the evicted block's entry and slot take the admitted
one.
**Heat** counts reads with a decay: every ``len(slots)`` look-ups (at
least 1024) an era ends and every heat halves, lazily (an entry's heat is
shifted right by the eras since it was last read).
"""

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from swapfs.engine import BLOCK_SIZE

#: Files remembered per block; a block read by more keeps its first ones.
MAX_OWNERS = 4
#: Fewest look-ups per heat era, and fewest keys in the admission window.
_MIN_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached block as the manifest and the fail-over planner see it."""

    chain: int
    digest: bytes
    heat: int
    owners: tuple[int, ...]  # inode numbers of files that read it, at most MAX_OWNERS
    priority: int = 0  # the highest priority of its owners

    @property
    def key(self) -> tuple[int, bytes]:
        return (self.chain, self.digest)


class _Block:
    __slots__ = ("data", "slot", "heat", "era", "owners")

    def __init__(self, data: bytes, slot: int, heat: int, era: int,
                 owners: tuple[int, ...]) -> None:
        self.data = data
        self.slot = slot
        self.heat = heat
        self.era = era
        self.owners = owners


class BlockCache:
    """Verified blocks in slots, with heat, owners, admission and eviction."""

    def __init__(self, slots: Iterable[int] = (), admit_first_miss: bool = False) -> None:
        self._admit_first_miss = admit_first_miss  # else on the second, through the window
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recent first
        # The admission window: keys missed once, this generation and the one before.
        self._missed: set[bytes] = set()
        self._missed_before: set[bytes] = set()
        self._generation = _MIN_WINDOW  # keys per generation
        self._slots: list[int] = []
        self._free: list[int] = []
        self._era = 0
        self._era_left = self._era_length = _MIN_WINDOW
        self.hits = self.misses = self.admissions = self.evictions = 0
        self.revocations = 0  # blocks dropped because their slots went
        self.set_slots(slots)

    # -- the capacity source's side ---------------------------------------------------

    def set_slots(self, slots: Iterable[int]) -> None:
        """Use exactly *slots* from now on; blocks in slots not among them go."""
        self._slots = list(slots)
        live = set(self._slots)
        for key, block in list(self._blocks.items()):
            if block.slot not in live:
                del self._blocks[key]
                self.revocations += 1
        taken = {block.slot for block in self._blocks.values()}
        self._free = [slot for slot in reversed(self._slots) if slot not in taken]
        self._era_length = self._generation = max(_MIN_WINDOW, len(self._slots))

    # -- the read path's side ----------------------------------------------------------
    #
    # A miss costs get() (the era's countdown, one dictionary look-up) and
    # offer(): an admission, or (admitting on the second miss) one look-up
    # in each generation of the window, and a set.add.
    # Heat and owners are touched on hits and admissions only.

    def get(self, key: bytes, ino: int = 0) -> bytes | None:
        """The block's data if it is cached (a hit warms it), else None."""
        self._era_left -= 1
        if not self._era_left:
            self._era += 1
            self._era_left = self._era_length
        block = self._blocks.get(key)
        if block is None:
            self.misses += 1
            return None
        self.hits += 1
        self._blocks.move_to_end(key)
        block.heat = (block.heat >> (self._era - block.era)) + 1
        block.era = self._era
        if ino and ino not in block.owners and len(block.owners) < MAX_OWNERS:
            block.owners += (ino,)
        return block.data

    def offer(self, key: bytes, data: bytes, ino: int = 0) -> None:
        """A block just read from the store and verified: admit it on its first
        miss, or its second if this cache admits on the second."""
        if not self._slots or key in self._blocks:
            return
        if not self._admit_first_miss and not self._missed_before_now(key):
            return
        owners = (ino,) if ino else ()
        if self._free:
            self._blocks[key] = _Block(data, self._free.pop(), 1, self._era, owners)
        else:  # the least recent block makes way: its entry and slot take this one
            _, block = self._blocks.popitem(last=False)
            block.data, block.heat, block.era, block.owners = data, 1, self._era, owners
            self._blocks[key] = block
            self.evictions += 1
        self.admissions += 1

    def _missed_before_now(self, key: bytes) -> bool:
        """Whether *key* is in the admission window (it leaves it); if not, it
        enters it, to be remembered for one to two generations of misses."""
        if key in self._missed:
            self._missed.remove(key)
            return True
        if key in self._missed_before:
            self._missed_before.remove(key)
            return True
        self._missed.add(key)
        if len(self._missed) >= self._generation:
            self._missed_before, self._missed = self._missed, set()
        return False

    def insert(self, key: bytes, data: bytes, heat: int, owners: tuple[int, ...]) -> bool:
        """Put a verified block in a free slot (warming): False if none is free."""
        if key in self._blocks or not self._free:
            return False
        self._blocks[key] = _Block(data, self._free.pop(), heat, self._era, owners[:MAX_OWNERS])
        return True

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    # -- reporting -------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return len(self._slots) * BLOCK_SIZE

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def entries(self, priorities: Mapping[int, int] | None = None) -> list[CacheEntry]:
        """Every cached block with its heat now, hottest first.

        *priorities* (inode number -> priority; absent means 0) gives each
        block the highest priority of the files that read it.
        """
        priorities = priorities or {}
        found = []
        for key, block in self._blocks.items():
            found.append(CacheEntry(
                int.from_bytes(key[:4], "big"), key[4:], block.heat >> (self._era - block.era),
                block.owners, max((priorities.get(ino, 0) for ino in block.owners), default=0)))
        found.sort(key=lambda entry: (-entry.heat, -entry.priority))
        return found

    def stats(self) -> dict[str, Any]:
        chains = Counter(key[:4] for key in self._blocks)
        return {
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": len(self._blocks) * BLOCK_SIZE,
            "hits": self.hits,
            "misses": self.misses,
            "admissions": self.admissions,
            "evictions": self.evictions,
            "revocations": self.revocations,
            # chain id -> bytes, counted here rather than on every admission and
            # eviction; Volume.stats names the chains.
            "chains": {int.from_bytes(chain, "big"): count * BLOCK_SIZE
                       for chain, count in sorted(chains.items())},
        }
