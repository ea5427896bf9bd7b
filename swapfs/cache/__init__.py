"""The read caches over the engine, and the pure decisions about them.

- :class:`BlockCache` (``blockcache.py``): verified blocks in slots, with
  heat, owners, admission and eviction; the daemon's content cache is one,
  with slots of host memory.
- :class:`TransientCache` (``transient.py``): the pool, a block cache whose
  slots are the unused code-page bytes the guests' drivers report; some of a
  driver's share may be held back from the blocks (its sealed records).
- The manifest (``manifest.py``): a content cache's blocks as bytes and
  back, read and written atomically; :func:`warm` (``warm.py``) loads the
  blocks an entry list names.
- The fail-over planner (``failover.py``): :func:`plan`, a pure function
  choosing which cached blocks a replacement daemon loads.

This package imports only the engine. Its daemon-side parts live in the
daemon: ``mountd/cachekeeper.py`` writes the manifests and warms the
content cache at start, ``mountd/peers.py`` reads the other daemons'
manifests for the planner, and ``mountd/drivers.py`` feeds the pool from
the drivers' reports and keeps their records.
"""

from swapfs.cache.blockcache import MAX_OWNERS, BlockCache, CacheEntry
from swapfs.cache.failover import EVICT, STRATEGIES, Block, Cached, Plan, Source, plan
from swapfs.cache.manifest import (
    ManifestError,
    max_size,
    parse,
    read_manifest,
    serialize,
    write_manifest,
)
from swapfs.cache.transient import Grant, TransientCache
from swapfs.cache.warm import hottest_first, warm

__all__ = [
    # The caches.
    "BlockCache",
    "CacheEntry",
    "MAX_OWNERS",
    "TransientCache",
    "Grant",
    # The manifest, and warming a cache from one.
    "ManifestError",
    "parse",
    "serialize",
    "max_size",
    "read_manifest",
    "write_manifest",
    "hottest_first",
    "warm",
    # The fail-over planner.
    "plan",
    "Plan",
    "Source",
    "Cached",
    "Block",
    "STRATEGIES",
    "EVICT",
]
