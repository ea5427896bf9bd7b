"""The read caches over the engine: the content cache, the transient pool,
manifests, warm-up and the fail-over planner. Imports only the engine."""

from swapfs.cache import failover, manifest
from swapfs.cache.blockcache import MAX_OWNERS, BlockCache, CacheEntry
from swapfs.cache.failover import EVICT, STRATEGIES, Block, Cached, Plan, Source, plan
from swapfs.cache.manifest import ManifestError, max_size, parse, read_manifest, serialize
from swapfs.cache.transient import Grant, TransientCache
from swapfs.cache.warm import hottest_first, warm

__all__ = [
    "Block",
    "BlockCache",
    "CacheEntry",
    "Cached",
    "EVICT",
    "Grant",
    "MAX_OWNERS",
    "ManifestError",
    "Plan",
    "STRATEGIES",
    "Source",
    "TransientCache",
    "failover",
    "hottest_first",
    "manifest",
    "max_size",
    "parse",
    "plan",
    "read_manifest",
    "serialize",
    "warm",
]
