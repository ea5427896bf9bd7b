"""The fail-over planner: which cached blocks a replacement daemon loads.

Each daemon keeps a content-based read cache of blocks keyed by (chain,
digest). When a daemon dies, the daemon that takes over its mount builds
its cache from the dead daemon's last manifest and the caches of the
survivors on the host; when a host dies, a standby elsewhere combines the
caches of the daemons that failed. Whatever is combined must fit the
host's cache budget. :func:`plan` decides which blocks to load. It is a
pure function over plain data: the daemon gathers the sources and loads
the result.

This docstring is the reference for the rules; the tests check them.

**Inputs.** A sequence of :class:`Source` (a name, unique, and its blocks;
a key at most once per source; heats not negative), a budget in blocks
(not negative) and an order of strategy names (each one of
:data:`STRATEGIES`, none twice). Anything else raises ValueError.

**Merge.** A block held by several sources counts once. Its merged heat is
the sum of its heats: every reader that warmed it will read it again from
the one copy, so the demand adds up. Its merged priority is the maximum:
the most important file that owns it decides. It is *common* when two or
more sources hold it. Ties in every order below are broken by key,
ascending, so a plan is reproducible.

**Strategies.** Each has a *must-keep* set and an order. It *fits* when its
must-keep set is no larger than the budget. The first strategy of the given
order that fits wins; its plan keeps the must-keep set and fills the rest
of the budget in the strategy's order, so it keeps ``min(budget, union)``
blocks. The must-keep sets name what losing would hurt most; a strategy that
would have to drop some of it is not applied at all, and the next is tried.

- ``union``: must keep every block. Order: merged heat, descending.
- ``priority``: must keep every block of merged priority above the
  default, 0. Order: merged priority descending, then merged heat
  descending. The plan is the first ``budget`` blocks of that order.
- ``common``: must keep every common block. Order: number of holders
  descending, then merged heat descending. The plan is the first
  ``budget`` blocks of that order.
- ``share``: each source's share of the budget is proportional to its size
  (its number of blocks): ``budget * size // total``, where total is the
  sum of the sizes; the slots left over go one each to the sources with the
  largest remainders ``budget * size % total``, the earlier source first on
  equal remainders. Then the sources, in the given order, each walk their
  own blocks hottest first (their own heat descending) and take every block
  not taken yet, until they have taken as many as their share; a block an
  earlier source took is skipped and does not count against the share.
  What budget is left (shared blocks, sources smaller than their share) is
  filled by merged heat. Must keep: each source's *hot set*, its blocks of
  own heat 2 or more (read more than once), must be no larger than its
  share; the walk then takes all of it. Share is for sources that are all
  worth keeping: each keeps its hottest part, none crowds out the others.

**Eviction fallback** (reported as ``"evict"``), when no strategy of the
order fits. The combination starts as the union. Turns go round-robin over
the sources in the given order, starting with the first. On its turn a
source evicts the coldest block it has not evicted yet (its own heat
ascending); a source with nothing left to evict is skipped. A block leaves
the combination when the last source holding it has evicted it, so blocks
held by several sources last longer. The combination is checked before
every turn, and eviction stops as soon as it fits. Every turn evicts one
block and a block is evicted at most once per holder, so this ends, at the
latest when every source has evicted everything (the empty combination fits
any budget). The plan is the combination, ``min(budget, union)`` blocks.

**A budget of 0** needs no special case. The plan is empty. The strategy
reported is the first of the order whose must-keep set is empty (``union``
only when there is nothing at all), else ``"evict"`` with every source
having evicted all its blocks.

**Reported.** :class:`Plan`: the winning strategy's name, the keys to load
(in the strategy's order: priority order for ``priority``, common order for
``common``, merged heat for the others), per source how many kept blocks it
contributed, per source how many blocks it evicted (the fallback only;
empty otherwise), and the budget. A kept block is contributed by the first
source in the given order that holds it, except that a block taken in
``share``'s walk is contributed by the source that took it. So the
contributions add up to the number of keys.

**Cost.** With N blocks over all sources and U distinct ones: one pass to
merge, a sort of U for the winning strategy (or of each source's blocks for
``share`` and the fallback): O(N log N) time, O(N) memory.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: A block's identity: (chain id, digest).
Block = tuple[int, bytes]

#: The strategies :func:`plan` knows, in the default order.
STRATEGIES = ("union", "priority", "common", "share")
#: The name reported when no strategy fits and blocks were evicted.
EVICT = "evict"
#: A block read at least this often is in its source's hot set.
HOT_HEAT = 2


@dataclass(frozen=True, slots=True)
class Cached:
    """One block in one source's cache."""

    key: Block
    heat: int  # how often it was read recently, >= 0
    priority: int = 0  # the highest priority of the swap files that own it


@dataclass(frozen=True, slots=True)
class Source:
    """One daemon's cache, or the manifest a dead daemon left."""

    name: str
    blocks: Sequence[Cached]


@dataclass(frozen=True)
class Plan:
    """What to load, and how it was decided."""

    strategy: str  # one of STRATEGIES, or EVICT
    keys: list[Block]  # to load, most important first
    per_source: dict[str, int]  # kept blocks each source contributed
    evicted: dict[str, int]  # blocks each source evicted; empty unless EVICT
    budget: int


@dataclass(slots=True)
class _Merged:
    heat: int  # sum of the holders' heats
    priority: int  # max of the holders' priorities
    holders: int
    first: int  # index of the first source holding it


#: A strategy's choice: the keys in its order, and who took what (share only);
#: None when its must-keep set does not fit.
_Choice = tuple[list[Block], dict[Block, int]] | None
_Rule = Callable[[Sequence[Source], dict[Block, _Merged], int], _Choice]


def plan(sources: Sequence[Source], budget_blocks: int,
         order: Sequence[str] = STRATEGIES) -> Plan:
    """Choose the blocks to load; see the module docstring for the rules."""
    _check(sources, budget_blocks, order)
    merged = _merge(sources)
    for name in order:
        choice = _RULES[name](sources, merged, budget_blocks)
        if choice is not None:
            keys, takers = choice
            return Plan(name, keys, _contributions(sources, merged, keys, takers), {},
                        budget_blocks)
    keys, evicted = _evict(sources, merged, budget_blocks)
    return Plan(EVICT, keys, _contributions(sources, merged, keys, {}),
                {source.name: count for source, count in zip(sources, evicted, strict=True)},
                budget_blocks)


def _check(sources: Sequence[Source], budget_blocks: int, order: Sequence[str]) -> None:
    if budget_blocks < 0:
        raise ValueError(f"budget_blocks must not be negative, not {budget_blocks}")
    for name in order:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if len(set(order)) != len(order):
        raise ValueError(f"a strategy is named twice in {list(order)}")
    names: set[str] = set()
    for source in sources:
        if source.name in names:
            raise ValueError(f"two sources are named {source.name!r}")
        names.add(source.name)
        keys: set[Block] = set()
        for cached in source.blocks:
            if cached.key in keys:
                raise ValueError(f"source {source.name!r} holds {cached.key!r} twice")
            if cached.heat < 0:
                raise ValueError(f"source {source.name!r}: negative heat for {cached.key!r}")
            keys.add(cached.key)


def _merge(sources: Sequence[Source]) -> dict[Block, _Merged]:
    merged: dict[Block, _Merged] = {}
    for index, source in enumerate(sources):
        for cached in source.blocks:
            entry = merged.get(cached.key)
            if entry is None:
                merged[cached.key] = _Merged(cached.heat, cached.priority, 1, index)
            else:
                entry.heat += cached.heat
                entry.priority = max(entry.priority, cached.priority)
                entry.holders += 1
    return merged


def _by_heat(merged: dict[Block, _Merged], keys: list[Block]) -> list[Block]:
    return sorted(keys, key=lambda key: (-merged[key].heat, key))


def _union(sources: Sequence[Source], merged: dict[Block, _Merged], budget: int) -> _Choice:
    if len(merged) > budget:
        return None
    return _by_heat(merged, list(merged)), {}


def _priority(sources: Sequence[Source], merged: dict[Block, _Merged], budget: int) -> _Choice:
    if sum(entry.priority > 0 for entry in merged.values()) > budget:
        return None
    ranked = sorted(merged, key=lambda key: (-merged[key].priority, -merged[key].heat, key))
    return ranked[:budget], {}


def _common(sources: Sequence[Source], merged: dict[Block, _Merged], budget: int) -> _Choice:
    if sum(entry.holders > 1 for entry in merged.values()) > budget:
        return None
    ranked = sorted(merged, key=lambda key: (-merged[key].holders, -merged[key].heat, key))
    return ranked[:budget], {}


def _shares(sizes: Sequence[int], budget: int) -> list[int]:
    """Split *budget* in proportion to *sizes*; the largest remainders get the leftover."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    result = [budget * size // total for size in sizes]
    leftover = budget - sum(result)
    by_remainder = sorted(range(len(sizes)), key=lambda index: (-(budget * sizes[index] % total),
                                                                index))
    for index in by_remainder[:leftover]:
        result[index] += 1
    return result


def _share(sources: Sequence[Source], merged: dict[Block, _Merged], budget: int) -> _Choice:
    allowed = _shares([len(source.blocks) for source in sources], budget)
    for source, share in zip(sources, allowed, strict=True):
        if sum(cached.heat >= HOT_HEAT for cached in source.blocks) > share:
            return None
    takers: dict[Block, int] = {}
    for index, (source, share) in enumerate(zip(sources, allowed, strict=True)):
        room = share
        for cached in sorted(source.blocks, key=lambda cached: (-cached.heat, cached.key)):
            if room == 0:
                break
            if cached.key not in takers:
                takers[cached.key] = index
                room -= 1
    rest = _by_heat(merged, [key for key in merged if key not in takers])
    keys = [*takers, *rest[:budget - len(takers)]]
    return _by_heat(merged, keys), takers


_RULES: dict[str, _Rule] = {
    "union": _union, "priority": _priority, "common": _common, "share": _share,
}


def _evict(sources: Sequence[Source], merged: dict[Block, _Merged],
           budget: int) -> tuple[list[Block], list[int]]:
    """The fallback: returns the kept keys and how many blocks each source evicted."""
    coldest = [sorted(source.blocks, key=lambda cached: (cached.heat, cached.key))
               for source in sources]
    holding = {key: entry.holders for key, entry in merged.items()}  # holders not yet evicted
    size = len(merged)
    evicted = [0] * len(sources)
    while size > budget:  # then some block is held by a source that has not evicted it
        for index, blocks in enumerate(coldest):
            if size <= budget:
                break
            if evicted[index] == len(blocks):
                continue
            key = blocks[evicted[index]].key
            evicted[index] += 1
            holding[key] -= 1
            if holding[key] == 0:
                size -= 1
    return _by_heat(merged, [key for key, count in holding.items() if count]), evicted


def _contributions(sources: Sequence[Source], merged: dict[Block, _Merged],
                   keys: list[Block], takers: dict[Block, int]) -> dict[str, int]:
    counts = [0] * len(sources)
    for key in keys:
        counts[takers.get(key, merged[key].first)] += 1
    return {source.name: count for source, count in zip(sources, counts, strict=True)}
