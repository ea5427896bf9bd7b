"""The pending punches alone: a freed slot waits until a checkpoint covers
the commit that freed it (:meth:`PendingPunches.covered`); then reuse takes
the newest (one commit's slots in ascending order), punching the oldest."""

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from swapfs.engine.reclaim import PendingPunches


def test_take_gives_the_most_recently_freed_slots_in_ascending_order() -> None:
    pending = PendingPunches()
    pending.add(1, [7, 4], now=1.0)
    pending.add(1, [5, 2, 3], now=2.0)
    pending.add(2, [9], now=3.0)
    pending.covered()
    assert [pending.take(1) for _ in range(6)] == [2, 3, 5, 4, 7, None]
    assert pending.take(3) is None
    assert len(pending) == 1


def test_batch_takes_the_oldest_within_its_bounds() -> None:
    pending = PendingPunches()
    pending.add(1, [10, 11], now=1.0)
    pending.add(2, [20], now=1.5)
    pending.add(1, [12], now=2.0)
    pending.covered()
    assert pending.batch(1) == {1: [11]}
    assert pending.batch(freed_before=1.6) == {1: [10], 2: [20]}
    assert pending.batch(freed_before=1.6) == {}
    assert pending.batch() == {1: [12]}
    assert len(pending) == 0


def test_drop_and_clear_forget_slots() -> None:
    pending = PendingPunches()
    pending.add(1, [1], now=0.0)
    pending.add(2, [2], now=0.0)
    pending.covered()
    pending.add(1, [4], now=1.0)  # waiting: drop forgets those too
    pending.drop(1)
    assert pending.slots(1) == set()
    assert pending.batch() == {2: [2]}
    pending.add(3, [3], now=0.0)
    pending.covered()
    pending.add(3, [5], now=1.0)
    pending.clear()
    assert len(pending) == 0 and pending.take(3) is None
    pending.covered()  # nothing was left waiting either
    assert pending.take(3) is None and pending.batch() == {}


def test_slots_freed_since_the_last_checkpoint_wait_for_the_next() -> None:
    """Slots added after the last covered() are neither taken nor batched,
    though slots() and len() count them; the next covered() makes them ready."""
    pending = PendingPunches()
    pending.add(1, [3], now=1.0)
    pending.add(2, [8], now=1.0)
    assert pending.take(1) is None and pending.take(2) is None
    assert pending.batch() == {}
    assert pending.slots(1) == {3} and pending.slots(2) == {8} and len(pending) == 2
    pending.covered()
    pending.add(1, [6, 5], now=2.0)
    assert pending.slots(1) == {3, 5, 6}, "ready and waiting"
    assert len(pending) == 4
    assert pending.take(1) == 3, "not 5: the newest ready, not the newest freed"
    assert pending.take(1) is None
    assert pending.batch() == {2: [8]}
    assert pending.batch() == {} and pending.slots(1) == {5, 6}
    pending.covered()
    assert pending.take(1) == 5
    assert pending.batch() == {1: [6]}
    assert len(pending) == 0


operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 3), st.lists(st.integers(0, 50), max_size=4)),
    st.tuples(st.just("covered")),
    st.tuples(st.just("take"), st.integers(1, 3)),
    st.tuples(st.just("batch"), st.one_of(st.none(), st.integers(0, 5)),
              st.one_of(st.none(), st.integers(0, 30))),
), max_size=40)


@given(operations)
def test_every_slot_leaves_once_by_take_or_batch(ops: list[tuple[Any, ...]]) -> None:
    """Against two lists per chain, each commit's slots queued highest first:
    those added since the last covered() wait, and covered() appends them to
    the ready ones; take pops the newest ready, batch the oldest ready ones
    freed before the cutoff; no slot is lost or handed out twice, and none
    before a covered() following its add."""
    pending = PendingPunches()
    ready: dict[int, list[tuple[int, float]]] = {1: [], 2: [], 3: []}
    waiting: dict[int, list[tuple[int, float]]] = {1: [], 2: [], 3: []}
    clock = 0.0
    for op in ops:
        if op[0] == "add":
            _, chain, slots = op
            clock += 1
            pending.add(chain, slots, now=clock)
            waiting[chain].extend((slot, clock) for slot in sorted(slots, reverse=True))
        elif op[0] == "covered":
            pending.covered()
            for chain, queue in waiting.items():
                ready[chain].extend(queue)
                queue.clear()
        elif op[0] == "take":
            _, chain = op
            expected = ready[chain].pop()[0] if ready[chain] else None
            assert pending.take(chain) == expected
        else:
            _, max_slots, cutoff = op
            got = pending.batch(max_slots, None if cutoff is None else float(cutoff))
            left = max_slots
            for chain, slots in got.items():
                queue = ready[chain]
                count = len(slots)
                assert [slot for slot, _ in queue[:count]] == slots
                assert all(cutoff is None or freed < cutoff for _, freed in queue[:count])
                del queue[:count]
                if left is not None:
                    left -= count
            assert left is None or left >= 0
            if left != 0:  # nothing eligible was left behind
                assert not any(queue and (cutoff is None or queue[0][1] < cutoff)
                               for queue in ready.values())
        assert len(pending) == sum(len(queue) for queues in (ready, waiting)
                                   for queue in queues.values())
        for chain in (1, 2, 3):
            assert pending.slots(chain) == {slot for slot, _ in ready[chain] + waiting[chain]}
