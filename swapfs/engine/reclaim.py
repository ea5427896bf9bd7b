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
Everything listed here is also free (refcount 0) in the committed slot
table, but out of the table's punched free slots; this list
lives in memory only, so a crash forgets it and the next mount punches every
free slot (:class:`~swapfs.engine.state.State` does at open).
"""

import collections
import itertools
from collections.abc import Collection


class PendingPunches:
    """Per chain, the free slots not punched yet, in the order they were freed.

    A slot is added when the transaction that freed it has committed, and
    leaves either by :meth:`take` (reused: the newest) or by :meth:`batch`
    (to be punched: the oldest). Both ends of one deque, so neither ever
    searches.
    """

    __slots__ = ("_chains",)

    def __init__(self) -> None:
        #: chain id -> (slot, when it was freed), oldest on the left.
        self._chains: dict[int, collections.deque[tuple[int, float]]] = {}

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._chains.values())

    def add(self, chain_id: int, slots: Collection[int], now: float) -> None:
        """Slots of *chain_id* that a committed transaction left free, freed at *now*.

        They are queued highest first, so that :meth:`take` hands them out
        in ascending order: a write of many blocks that reuses the slots of
        the one before it lays them out in file order again, and a
        sequential read of them stays one ``pread`` per run of slots.
        """
        queue = self._chains.get(chain_id)
        if queue is None:
            queue = self._chains[chain_id] = collections.deque()
        if len(slots) == 1:  # a 4 KiB overwrite's: the common case
            (slot,) = slots
            queue.append((slot, now))
        else:
            queue.extend(zip(sorted(slots, reverse=True), itertools.repeat(now)))

    def take(self, chain_id: int) -> int | None:
        """The lowest slot of the chain's newest freeing commit, no longer
        pending; None if none is."""
        queue = self._chains.get(chain_id)
        return queue.pop()[0] if queue else None

    def batch(self, max_slots: int | None = None, freed_before: float | None = None
              ) -> dict[int, list[int]]:
        """Take the oldest pending slots to punch them: at most *max_slots* (all
        with None), and only those freed before *freed_before* if given."""
        out: dict[int, list[int]] = {}
        left = max_slots
        for chain_id, queue in self._chains.items():
            slots = []
            while queue and left != 0 and (freed_before is None or queue[0][1] < freed_before):
                slots.append(queue.popleft()[0])
                if left is not None:
                    left -= 1
            if slots:
                out[chain_id] = slots
            if left == 0:
                break
        return out

    def slots(self, chain_id: int) -> set[int]:
        """The chain's pending slots."""
        return {slot for slot, _ in self._chains.get(chain_id, ())}

    def drop(self, chain_id: int) -> None:
        """Forget a chain's slots (its data file is gone)."""
        self._chains.pop(chain_id, None)

    def clear(self) -> None:
        """Forget every slot (all free slots were just punched)."""
        self._chains.clear()
