"""The fail-over planner: the rules of swapfs/cache/failover.py's docstring, checked.

Property tests draw a few sources over a small key space, so that blocks
are often shared; every expectation is computed here again from the rules
as written, not with the module's helpers. The examples at the end show
each strategy winning on inputs small enough to check on paper.
"""

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapfs.cache import EVICT, STRATEGIES, Block, Cached, Plan, Source, plan

FAST = settings(max_examples=200, deadline=None)


def key(number: int, chain: int = 1) -> Block:
    return (chain, bytes([number]) * 32)


block_keys = st.builds(key, st.integers(0, 5), st.integers(0, 1))
entries = st.tuples(st.integers(0, 10), st.integers(-2, 3))  # (heat, priority)
source_lists = st.lists(st.dictionaries(block_keys, entries, max_size=8), max_size=5).map(
    lambda caches: [Source(f"s{index}", [Cached(block, heat, priority)
                                         for block, (heat, priority) in cache.items()])
                    for index, cache in enumerate(caches)])
budgets = st.integers(0, 60)
orders = st.lists(st.sampled_from(STRATEGIES), unique=True, max_size=4)


# -- the rules, restated ---------------------------------------------------------------

def union_of(sources: Sequence[Source]) -> set[Block]:
    return {cached.key for source in sources for cached in source.blocks}


def heat_of(sources: Sequence[Source], block: Block) -> int:
    return sum(cached.heat for source in sources for cached in source.blocks
               if cached.key == block)


def priority_of(sources: Sequence[Source], block: Block) -> int:
    return max(cached.priority for source in sources for cached in source.blocks
               if cached.key == block)


def holders_of(sources: Sequence[Source], block: Block) -> list[Source]:
    return [source for source in sources if any(c.key == block for c in source.blocks)]


def shares_of(sources: Sequence[Source], budget: int) -> list[int]:
    """Largest remainders: floors of the exact quotas, then +1 by fraction, earlier first."""
    total = sum(len(source.blocks) for source in sources)
    if total == 0:
        return [0] * len(sources)
    quotas = [Fraction(budget * len(source.blocks), total) for source in sources]
    floors = [int(quota) for quota in quotas]
    left = budget - sum(floors)
    lucky = sorted(range(len(sources)), key=lambda i: (floors[i] - quotas[i], i))[:left]
    return [floor + (index in lucky) for index, floor in enumerate(floors)]


def hot_set(source: Source) -> set[Block]:
    return {cached.key for cached in source.blocks if cached.heat >= 2}


def fits(name: str, sources: Sequence[Source], budget: int) -> bool:
    union = union_of(sources)
    if name == "union":
        return len(union) <= budget
    if name == "priority":
        return sum(priority_of(sources, block) > 0 for block in union) <= budget
    if name == "common":
        return sum(len(holders_of(sources, block)) >= 2 for block in union) <= budget
    assert name == "share"
    return all(len(hot_set(source)) <= share
               for source, share in zip(sources, shares_of(sources, budget), strict=True))


def hottest_first(source: Source) -> list[Block]:
    return [c.key for c in sorted(source.blocks, key=lambda c: (-c.heat, c.key))]


def coldest_first(source: Source) -> list[Block]:
    return [c.key for c in sorted(source.blocks, key=lambda c: (c.heat, c.key))]


def copy(sources: Sequence[Source], reverse: bool = False) -> list[Source]:
    """Equal sources built anew, each one's blocks in the other order if *reverse*."""
    return [Source(source.name, [Cached(c.key, c.heat, c.priority)
                                 for c in (reversed(source.blocks) if reverse
                                           else source.blocks)])
            for source in sources]


# -- every plan --------------------------------------------------------------------------

@FAST
@given(source_lists, budgets, orders)
def test_a_plan_fits_and_accounts_for_every_block(sources: list[Source], budget: int,
                                                   order: list[str]) -> None:
    result = plan(sources, budget, order)
    union = union_of(sources)
    kept = set(result.keys)
    assert len(result.keys) == len(kept) == min(budget, len(union))  # the budget is used fully
    assert kept <= union
    assert result.budget == budget
    assert list(result.per_source) == [source.name for source in sources]
    assert sum(result.per_source.values()) == len(result.keys)
    for source in sources:  # a source contributes only blocks it holds
        assert result.per_source[source.name] <= len(kept & {c.key for c in source.blocks})
    if result.strategy == EVICT:
        assert list(result.evicted) == [source.name for source in sources]
    else:
        assert result.evicted == {}


@FAST
@given(source_lists, budgets, orders)
def test_the_first_strategy_whose_must_keep_set_fits_wins(sources: list[Source], budget: int,
                                                          order: list[str]) -> None:
    expected = next((name for name in order if fits(name, sources, budget)), EVICT)
    assert plan(sources, budget, order).strategy == expected


@FAST
@given(source_lists, budgets, orders)
def test_the_union_when_it_fits(sources: list[Source], budget: int, order: list[str]) -> None:
    union = union_of(sources)
    result = plan(sources, budget, ["union", *(name for name in order if name != "union")])
    assert (result.strategy == "union") == (len(union) <= budget)
    if len(union) <= budget:
        assert set(result.keys) == union
        first_holder = {block: holders_of(sources, block)[0].name for block in union}
        assert result.per_source == {source.name: list(first_holder.values()).count(source.name)
                                     for source in sources}
        assert result.keys == sorted(union, key=lambda b: (-heat_of(sources, b), b))


@FAST
@given(source_lists, budgets, st.sampled_from(["priority", "common"]))
def test_priority_and_common_keep_a_prefix_of_their_order(sources: list[Source], budget: int,
                                                          name: str) -> None:
    def rank(block: Block) -> tuple[Any, ...]:
        first = (priority_of(sources, block) if name == "priority"
                 else len(holders_of(sources, block)))
        return (-first, -heat_of(sources, block), block)

    result = plan(sources, budget, [name])
    if result.strategy != name:
        return
    union = union_of(sources)
    must = {block for block in union
            if (priority_of(sources, block) > 0 if name == "priority"
                else len(holders_of(sources, block)) >= 2)}
    kept = set(result.keys)
    assert must <= kept
    assert result.keys == sorted(kept, key=rank)
    for dropped in union - kept:
        assert all(rank(block) < rank(dropped) for block in kept)


@FAST
@given(source_lists, budgets)
def test_share_keeps_each_sources_hottest_share_then_fills_by_heat(sources: list[Source],
                                                                    budget: int) -> None:
    result = plan(sources, budget, ["share"])
    if result.strategy != "share":
        return
    kept = set(result.keys)
    for source, share in zip(sources, shares_of(sources, budget), strict=True):
        assert hot_set(source) <= kept
        # Its walk stops only after taking `share` blocks, so it passed its first `share`.
        assert set(hottest_first(source)[:share]) <= kept
    # A kept block colder than a dropped one was taken in some holder's walk: everything
    # that holder ranks above it is kept. The others came from the fill, hottest first.
    dropped = union_of(sources) - kept
    hottest_dropped = min(((-heat_of(sources, b), b) for b in dropped), default=None)
    for block in kept:
        if hottest_dropped is not None and (-heat_of(sources, block), block) > hottest_dropped:
            assert any(set(hottest_first(holder)[:hottest_first(holder).index(block)]) <= kept
                       for holder in holders_of(sources, block))
    assert result.keys == sorted(kept, key=lambda b: (-heat_of(sources, b), b))


@FAST
@given(source_lists, budgets)
def test_share_walks_the_sources_in_order(sources: list[Source], budget: int) -> None:
    """The walk and the fill, restated step by step; blocks others took are skipped free."""
    result = plan(sources, budget, ["share"])
    if result.strategy != "share":
        return
    taker: dict[Block, str] = {}
    for source, share in zip(sources, shares_of(sources, budget), strict=True):
        mine = [block for block in hottest_first(source) if block not in taker]
        taker.update((block, source.name) for block in mine[:share])
    rest = sorted(union_of(sources) - set(taker), key=lambda b: (-heat_of(sources, b), b))
    for block in rest[:budget - len(taker)]:
        taker[block] = holders_of(sources, block)[0].name
    assert set(result.keys) == set(taker)
    assert result.per_source == {source.name: list(taker.values()).count(source.name)
                                 for source in sources}


@FAST
@given(source_lists, budgets)
def test_eviction_takes_each_sources_coldest_in_turn(sources: list[Source],
                                                     budget: int) -> None:
    result = plan(sources, budget, [])  # no strategy: the fallback alone
    assert result.strategy == EVICT
    kept = set(result.keys)
    evicted = [result.evicted[source.name] for source in sources]
    for source, count in zip(sources, evicted, strict=True):
        order = coldest_first(source)
        assert set(order[count:]) <= kept  # what it has not evicted stays
        for block in order[:count]:  # an evicted block stays only while another holds it
            if block in kept:
                assert any(block not in coldest_first(holder)[:result.evicted[holder.name]]
                           for holder in holders_of(sources, block))
    # Round-robin from the first source: k rounds done, then a first part of round k + 1;
    # a source runs out early at its own size.
    sizes = [len(source.blocks) for source in sources]
    assert any(evicted == [min(size, rounds + (index < part))
                           for index, size in enumerate(sizes)]
               for rounds in range(max(evicted, default=0) + 1)
               for part in range(len(sources) + 1))
    # Stopped as soon as it fitted: with one turn fewer it would not have.
    if len(union_of(sources)) > budget:
        assert len(kept) == budget
    else:
        assert evicted == [0] * len(sources)


@FAST
@given(source_lists, budgets, orders)
def test_eviction_when_no_strategy_fits(sources: list[Source], budget: int,
                                        order: list[str]) -> None:
    result = plan(sources, budget, order)
    if result.strategy != EVICT:
        return
    assert len(union_of(sources)) > budget or "union" not in order
    assert len(result.keys) == min(budget, len(union_of(sources)))
    total = sum(result.evicted.values())
    assert total >= len(union_of(sources)) - len(result.keys)


@FAST
@given(source_lists, budgets, orders)
def test_the_same_input_gives_the_same_plan(sources: list[Source], budget: int,
                                            order: list[str]) -> None:
    result = plan(sources, budget, order)
    assert plan(copy(sources), budget, list(order)) == result
    # Ties are broken by key, never by where a block sits in its source.
    assert plan(copy(sources, reverse=True), budget, order) == result


# -- examples ---------------------------------------------------------------------------

K1, K2, K3, K4, K5, K6 = (key(number) for number in range(1, 7))
C1, C2, C3, C4 = (key(number, chain=2) for number in range(1, 5))


def test_union_wins_when_everything_fits() -> None:
    a = Source("a", [Cached(K1, 3), Cached(K2, 1)])
    b = Source("b", [Cached(K1, 1)])
    assert plan([a, b], 2) == Plan("union", [K1, K2], {"a": 2, "b": 0}, {}, 2)


def test_priority_wins_when_the_prioritized_blocks_fit() -> None:
    a = Source("a", [Cached(K1, 5), Cached(K2, 1, priority=2), Cached(K3, 0)])
    b = Source("b", [Cached(K4, 4)])
    # K2 for its priority, then the hottest of the rest.
    assert plan([a, b], 2) == Plan("priority", [K2, K1], {"a": 2, "b": 0}, {}, 2)


def test_common_wins_when_the_shared_blocks_fit() -> None:
    a = Source("a", [Cached(K1, 1, 1), Cached(K2, 1, 1), Cached(K3, 1, 1), Cached(K4, 0)])
    b = Source("b", [Cached(K4, 0), Cached(K5, 9)])
    # Three prioritized blocks do not fit in two; the one common block does.
    assert plan([a, b], 2) == Plan("common", [K4, K5], {"a": 1, "b": 1}, {}, 2)


def test_share_wins_when_each_hot_set_fits_its_share() -> None:
    a = Source("a", [Cached(K1, 5, 1), *(Cached(c, 0, 1) for c in (C1, C2, C3, C4))])
    b = Source("b", [Cached(K2, 3), *(Cached(c, 0) for c in (C1, C2, C3, C4))])
    # Five prioritized and four common blocks do not fit in three. Shares: 3 * 5 / 10 = 1.5
    # each; the leftover slot goes to a, the earlier. a takes K1 and C1 (the lower key of
    # its cold blocks), b takes K2.
    assert plan([a, b], 3) == Plan("share", [K1, K2, C1], {"a": 2, "b": 1}, {}, 3)


def test_eviction_when_nothing_fits() -> None:
    a = Source("a", [Cached(K1, 2, 1), Cached(K2, 3, 1), Cached(K3, 0)])
    b = Source("b", [Cached(K1, 2), Cached(K2, 2), Cached(K4, 1)])
    # Budget 1: two prioritized, two common; shares a 1, b 0, but a's hot set is two.
    # Turns: a evicts K3 (gone), b K4 (gone), a K1 (b still holds it), b K1 (gone): fits.
    assert plan([a, b], 1) == Plan(EVICT, [K2], {"a": 1, "b": 0}, {"a": 2, "b": 2}, 1)


def test_a_budget_of_zero() -> None:
    a = Source("a", [Cached(K1, 1)])
    b = Source("b", [Cached(K2, 0, priority=1)])
    # The first strategy with nothing it must keep: here common (no block is shared).
    assert plan([a, b], 0) == Plan("common", [], {"a": 0, "b": 0}, {}, 0)
    assert plan([], 0) == Plan("union", [], {}, {}, 0)
    assert plan([Source("a", [Cached(K1, 3)])], 0, ["share"]) == Plan(
        EVICT, [], {"a": 0}, {"a": 1}, 0)


def test_shares_follow_the_largest_remainders() -> None:
    # Budget 5 of 10 blocks: quotas 1.5, 1.5 and 2, floors 1, 1 and 2; the leftover slot
    # goes to s0, the earlier of the two with remainder one half.
    numbers = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    sources = [Source(f"s{index}", [Cached(key(n), 2 if n in part[:2] else 1) for n in part])
               for index, part in enumerate(numbers)]
    assert shares_of(sources, 5) == [2, 1, 2]
    assert plan(sources, 5, ["share"]).strategy == EVICT  # s1's two hot blocks, one slot
    # Budget 6: quotas 1.8, 1.8 and 2.4; the two slots left go to s0 and s1.
    assert shares_of(sources, 6) == [2, 2, 2]
    assert plan(sources, 6, ["share"]).keys == sorted(
        [key(n) for part in numbers for n in part[:2]], key=lambda block: block)


@pytest.mark.parametrize("sources, budget, order, message", [
    ([], -1, STRATEGIES, "budget_blocks must not be negative"),
    ([], 1, ["union", "lru"], "unknown strategy 'lru'; valid: union, priority, common, share"),
    ([], 1, ["union", "union"], "named twice"),
    ([Source("a", [Cached(K1, 1), Cached(K1, 2)])], 1, STRATEGIES, "holds .* twice"),
    ([Source("a", []), Source("a", [])], 1, STRATEGIES, "two sources are named 'a'"),
    ([Source("a", [Cached(K1, -1)])], 1, STRATEGIES, "negative heat"),
])
def test_bad_input_is_refused(sources: list[Source], budget: int, order: list[str],
                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(sources, budget, order)
