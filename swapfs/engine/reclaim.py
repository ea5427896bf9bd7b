"""Free slots that still occupy disk: reused first, hole-punched later.

A slot whose block's refcount reached zero is free in the index as soon as
that transaction commits, but its 4 KiB stay allocated in the data file
until they are hole-punched. Punching at every commit made a swap-out that
overwrites a page pay a hole punch, and the next new block then had
the file system allocate the same space again. So the slots freed by a
commit wait here instead: the next allocation of their chain takes one of
those freed most recently (its space is still allocated, so writing it allocates
nothing), and the ones that stay free are punched in bounded batches, oldest
first (:meth:`swapfs.engine.state.State.punch_pending`, which the daemon calls
every second).

Only committed frees come in, so a slot is never reused before the
transaction that freed it has committed (docs/write-ordering.md, rule 2).
Nor before a checkpoint has covered that transaction
(``swapfs/engine/checkpoint.py``): until then the checkpoint's tree still
names the slot's block, and a power cut rolls the index back to that tree,
so the block must still be there. A slot freed since the last checkpoint
waits; the next checkpoint makes it ready (:meth:`PendingPunches.covered`).
Everything listed here is also free (refcount 0) in the committed slot
table, but out of the table's punched free slots; this list lives in
memory only, so a crash forgets it, and the scan of the slot tables after
the next open finds those slots again (``swapfs/engine/slottable.py``).
"""

import collections
import itertools
from collections.abc import Collection
from collections.abc import Set as AbstractSet


class PendingPunches:
    """Per chain, the free slots not punched yet, in the order they were freed.

    A slot is added when the transaction that freed it has committed, and
    waits for the next checkpoint; then it is ready, and leaves either by
    :meth:`take` (reused: the newest) or by :meth:`batch` (to be punched:
    the oldest). Both ends of one deque, so neither ever searches.
    """

    __slots__ = ("_ready", "_waiting", "_members")

    def __init__(self) -> None:
        #: chain id -> (slot, when it was freed), oldest on the left: the
        #: slots a checkpoint covers, and those freed since.
        self._ready: dict[int, collections.deque[tuple[int, float]]] = {}
        self._waiting: dict[int, list[tuple[int, float]]] = {}
        #: chain id -> how often each slot is in either, for :meth:`slots`.
        self._members: dict[int, collections.Counter[int]] = {}

    def __len__(self) -> int:
        return (sum(len(queue) for queue in self._ready.values())
                + sum(len(queue) for queue in self._waiting.values()))

    def add(self, chain_id: int, slots: Collection[int], now: float) -> None:
        """Slots of *chain_id* that a committed transaction left free, freed at *now*.

        They are queued highest first, so that :meth:`take` hands them out
        in ascending order: a write of many blocks that reuses the slots of
        the one before it lays them out in file order again, and a
        sequential read of them stays one ``pread`` per run of slots.
        """
        waiting = self._waiting.setdefault(chain_id, [])
        members = self._members.get(chain_id)
        if members is None:
            members = self._members[chain_id] = collections.Counter()
        if len(slots) == 1:  # a 4 KiB overwrite's: the common case
            (slot,) = slots
            waiting.append((slot, now))
            members[slot] += 1  # Counter.update costs a microsecond more
        else:
            waiting.extend(zip(sorted(slots, reverse=True), itertools.repeat(now)))
            members.update(slots)

    def covered(self) -> None:
        """A checkpoint has covered every commit so far: what waited is ready."""
        for chain_id, waiting in self._waiting.items():
            queue = self._ready.get(chain_id)
            if queue is None:
                queue = self._ready[chain_id] = collections.deque()
            queue.extend(waiting)
        self._waiting.clear()

    def take(self, chain_id: int) -> int | None:
        """The lowest slot of the chain's newest freeing commit that a
        checkpoint covers, no longer pending; None if none is."""
        queue = self._ready.get(chain_id)
        if not queue:
            return None
        slot = queue.pop()[0]
        self._leave(chain_id, (slot,))
        return slot

    def batch(self, max_slots: int | None = None, freed_before: float | None = None
              ) -> dict[int, list[int]]:
        """Take the oldest ready slots to punch them: at most *max_slots* (all
        with None), and only those freed before *freed_before* if given."""
        out: dict[int, list[int]] = {}
        left = max_slots
        for chain_id, queue in self._ready.items():
            slots = []
            while queue and left != 0 and (freed_before is None or queue[0][1] < freed_before):
                slots.append(queue.popleft()[0])
                if left is not None:
                    left -= 1
            if slots:
                out[chain_id] = slots
                self._leave(chain_id, slots)
            if left == 0:
                break
        return out

    def _leave(self, chain_id: int, slots: Collection[int]) -> None:
        members = self._members[chain_id]
        for slot in slots:
            members[slot] -= 1
            if not members[slot]:
                del members[slot]

    def slots(self, chain_id: int) -> AbstractSet[int]:
        """The chain's pending slots, ready or waiting (kept as they change,
        not gathered: the scan of a slot table asks at every step)."""
        members = self._members.get(chain_id)
        return frozenset() if members is None else members.keys()

    def drop(self, chain_id: int) -> None:
        """Forget a chain's slots (its data file is gone)."""
        self._ready.pop(chain_id, None)
        self._waiting.pop(chain_id, None)
        self._members.pop(chain_id, None)

    def clear(self) -> None:
        """Forget every slot."""
        self._ready.clear()
        self._waiting.clear()
        self._members.clear()
