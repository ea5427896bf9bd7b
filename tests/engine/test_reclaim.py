"""The pending punches alone: reuse takes the newest (one commit's slots in
ascending order), punching the oldest."""

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from swapfs.engine.reclaim import PendingPunches


def test_take_gives_the_most_recently_freed_slots_in_ascending_order() -> None:
    pending = PendingPunches()
    pending.add(1, [7, 4], now=1.0)
    pending.add(1, [5, 2, 3], now=2.0)
    pending.add(2, [9], now=3.0)
    assert [pending.take(1) for _ in range(6)] == [2, 3, 5, 4, 7, None]
    assert pending.take(3) is None
    assert len(pending) == 1


def test_batch_takes_the_oldest_within_its_bounds() -> None:
    pending = PendingPunches()
    pending.add(1, [10, 11], now=1.0)
    pending.add(2, [20], now=1.5)
    pending.add(1, [12], now=2.0)
    assert pending.batch(1) == {1: [11]}
    assert pending.batch(freed_before=1.6) == {1: [10], 2: [20]}
    assert pending.batch(freed_before=1.6) == {}
    assert pending.batch() == {1: [12]}
    assert len(pending) == 0


def test_drop_and_clear_forget_slots() -> None:
    pending = PendingPunches()
    pending.add(1, [1], now=0.0)
    pending.add(2, [2], now=0.0)
    pending.drop(1)
    assert pending.batch() == {2: [2]}
    pending.add(3, [3], now=0.0)
    pending.clear()
    assert len(pending) == 0 and pending.take(3) is None


operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 3), st.lists(st.integers(0, 50), max_size=4)),
    st.tuples(st.just("take"), st.integers(1, 3)),
    st.tuples(st.just("batch"), st.one_of(st.none(), st.integers(0, 5)),
              st.one_of(st.none(), st.integers(0, 30))),
), max_size=40)


@given(operations)
def test_every_slot_leaves_once_by_take_or_batch(ops: list[tuple[Any, ...]]) -> None:
    """Against a list per chain, each commit's slots queued highest first:
    take pops the newest, batch the oldest ones freed before the cutoff; no
    slot is lost or handed out twice."""
    pending = PendingPunches()
    model: dict[int, list[tuple[int, float]]] = {1: [], 2: [], 3: []}
    clock = 0.0
    for op in ops:
        if op[0] == "add":
            _, chain, slots = op
            clock += 1
            pending.add(chain, slots, now=clock)
            model[chain].extend((slot, clock) for slot in sorted(slots, reverse=True))
        elif op[0] == "take":
            _, chain = op
            expected = model[chain].pop()[0] if model[chain] else None
            assert pending.take(chain) == expected
        else:
            _, max_slots, cutoff = op
            got = pending.batch(max_slots, None if cutoff is None else float(cutoff))
            left = max_slots
            for chain, slots in got.items():
                queue = model[chain]
                count = len(slots)
                assert [slot for slot, _ in queue[:count]] == slots
                assert all(cutoff is None or freed < cutoff for _, freed in queue[:count])
                del queue[:count]
                if left is not None:
                    left -= count
            assert left is None or left >= 0
            if left != 0:  # nothing eligible was left behind
                assert not any(queue and (cutoff is None or queue[0][1] < cutoff)
                               for queue in model.values())
        assert len(pending) == sum(len(queue) for queue in model.values())
