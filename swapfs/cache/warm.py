"""Warming a block cache from a list of entries: a manifest's, or a planner's.

Each entry names a block by chain and digest (or a digest's prefix). The
block is looked up in the chain's dedup table, read from the store and
verified against its full digest; a block that no longer exists or fails
verification is skipped, never cached. Entries go in in the order given
(the planner's, or :func:`hottest_first`) until the budget or the cache's
free slots run out.
"""

import logging
from collections.abc import Iterable

from swapfs.cache.blockcache import BlockCache, CacheEntry
from swapfs.engine import BLOCK_SIZE, Volume, cache_key

log = logging.getLogger(__name__)


def hottest_first(entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """Hottest first; among equally hot, higher priority first."""
    return sorted(entries, key=lambda entry: (-entry.heat, -entry.priority))


def warm(volume: Volume, cache: BlockCache, entries: Iterable[CacheEntry],
         budget: int | None = None) -> int:
    """Load *entries* into *cache*, in their order, at most *budget* bytes (None:
    as many as it has free slots); returns the number of blocks loaded."""
    room = cache.free_blocks if budget is None else min(cache.free_blocks,
                                                        budget // BLOCK_SIZE)
    loaded = 0
    for entry in entries:
        if loaded >= room:
            break
        found = volume.find_block(entry.chain, entry.digest)
        if found is None:
            log.debug("chain %d block %s is gone or corrupt: not warmed", entry.chain,
                      entry.digest.hex())
            continue
        digest, data = found
        if cache.insert(cache_key(entry.chain, digest), data, max(1, entry.heat),
                        entry.owners):
            loaded += 1
    return loaded
