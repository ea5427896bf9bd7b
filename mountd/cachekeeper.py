"""The content cache's manifest on disk: warm at start, write while serving.

The daemon runs :meth:`CacheKeeper.run` in its serving nursery: it warms
the content cache from ``<state>/cache.manifest``, the last manifest of
this state's previous daemon (a few hundred blocks at a time, so FUSE
requests are served meanwhile), then rewrites the manifest every
``manifest_interval`` seconds; :meth:`CacheKeeper.write` once more after
the FUSE loop ends.

Which of the manifest's blocks it loads is the fail-over planner's choice
(:mod:`swapfs.cache.failover`): the sources are that manifest and the manifests
of the other daemons on this host (:mod:`mountd.peers`), the budget the
host's (``host_cache_bytes``; by default this cache's capacity plus what
the others hold, so that the others keep what they have). The plan that
won is kept in :attr:`CacheKeeper.last_plan` for ``swapfs status``. A
manifest that cannot be read (truncated, garbage, another version, not a
regular file, more blocks than the budget holds) gives a cold cache and one
warning, never a failed start. Format: :mod:`swapfs.cache.manifest`.
"""

import logging
from collections.abc import Sequence
from typing import Any

import trio

from mountd import peers
from swapfs.cache import (
    STRATEGIES,
    BlockCache,
    Cached,
    CacheEntry,
    ManifestError,
    Plan,
    Source,
    plan,
    read_manifest,
    serialize,
    warm,
    write_manifest,
)
from swapfs.engine import BLOCK_SIZE, Volume

log = logging.getLogger(__name__)

MANIFEST_NAME = peers.MANIFEST_NAME
#: The planner's name for this state's own last manifest.
OWN = "this state's last manifest"
#: Runs of a slot table scanned between two checkpoints of the trio loop
#: while the warm-up waits for the scan (as mountd/daemon.py steps it).
SCAN_RUNS = 16
#: Blocks warmed between two checkpoints of the trio loop.
WARM_BATCH = 256


class CacheKeeper:
    """One daemon's content cache manifest."""

    def __init__(self, volume: Volume, cache: BlockCache | None, interval: float,
                 strategies: Sequence[str] = STRATEGIES,
                 host_cache_bytes: int = 0) -> None:
        self.volume = volume
        self.cache = cache
        self.interval = interval
        self.strategies = list(strategies)
        self.host_cache_bytes = host_cache_bytes
        self.path = volume.state / MANIFEST_NAME
        #: The warm-up's plan: strategy, budget, blocks per source, bytes warmed.
        self.last_plan: dict[str, Any] | None = None

    @property
    def max_blocks(self) -> int:
        """The most blocks a manifest may hold to be read, this state's or a
        peer's: what the host's budget holds, or this cache if it is larger."""
        assert self.cache is not None
        return max(self.cache.capacity_bytes, self.host_cache_bytes) // BLOCK_SIZE

    def read(self) -> list[CacheEntry]:
        """The last manifest's entries; none (with one warning) if it is
        unusable or larger than :attr:`max_blocks`."""
        try:
            return read_manifest(self.path, self.max_blocks)
        except FileNotFoundError:
            return []
        except (OSError, ManifestError) as exc:
            log.warning("ignoring the cache manifest %s (%s): the content cache starts "
                        "cold", self.path, exc)
            return []

    def plan(self, own: list[CacheEntry], others: list[peers.PeerDaemon]
             ) -> tuple[Plan, list[CacheEntry]]:
        """The planner's choice over *own* and the peers' manifests, and the
        entries of *own* it keeps, in the plan's order (pure but for the log)."""
        assert self.cache is not None
        sources = [Source(OWN, [Cached(e.key, e.heat, e.priority) for e in own])]
        sources += [Source(peer.mountpoint, [Cached(e.key, e.heat, e.priority)
                                             for e in peer.entries]) for peer in others]
        budget = (self.host_cache_bytes // BLOCK_SIZE if self.host_cache_bytes
                  else self.cache.capacity_bytes // BLOCK_SIZE
                  + sum(len(peer.entries) for peer in others))
        chosen = plan(sources, budget, self.strategies)
        rank = {key: i for i, key in enumerate(chosen.keys)}
        kept = sorted((e for e in own if e.key in rank), key=lambda e: rank[e.key])
        return chosen, kept

    async def warm(self) -> int:
        """Warm the cache with the planner's choice of the last manifest's
        blocks, most important first; returns the blocks loaded."""
        if self.cache is None:
            return 0
        own = self.read()
        others = await trio.to_thread.run_sync(peers.peers, self.volume.state,
                                               self.max_blocks)
        chosen, entries = await trio.to_thread.run_sync(self.plan, own, others)
        # Blocks are found by digest, in the dedup tables that the scan of
        # the slot tables builds after the open: it is driven to its end
        # first (the daemon's own scan task steps it too).
        while self.volume.scan_step(SCAN_RUNS):
            await trio.sleep(0)
        loaded = 0
        for start in range(0, len(entries), WARM_BATCH):
            if not self.cache.free_blocks:
                break
            loaded += warm(self.volume, self.cache, entries[start:start + WARM_BATCH])
            await trio.sleep(0)
        self.last_plan = {"strategy": chosen.strategy,
                          "budget_bytes": chosen.budget * BLOCK_SIZE,
                          "blocks": chosen.per_source, "evicted": chosen.evicted,
                          "manifest_blocks": len(own), "warmed_bytes": loaded * BLOCK_SIZE}
        if own:
            log.info("content cache warmed with %d of %d blocks from %s (plan: %s, "
                     "%d peer(s))", loaded, len(own), self.path, chosen.strategy, len(others))
        return loaded

    def snapshot(self) -> bytes:
        """The manifest of the cache as it is now."""
        assert self.cache is not None
        priorities = self.volume.priorities()
        return serialize(self.cache.entries(priorities), priorities)

    def write(self) -> None:
        """Write the manifest now."""
        if self.cache is not None:
            self._store(self.snapshot())

    def _store(self, raw: bytes) -> None:
        """Write *raw* as the manifest (a failure is logged: the cache goes on),
        unless the volume may no longer write: once its lease lapsed, another
        host may own the state directory, manifest included."""
        if not self.volume.index.writable():
            log.debug("the cache manifest %s is not written: the state is fenced", self.path)
            return
        try:
            write_manifest(self.path, raw)
        except OSError as exc:
            log.warning("cannot write the cache manifest %s: %s", self.path, exc)

    async def run(self) -> None:
        """Warm, then write every interval until cancelled."""
        if self.cache is None:
            return
        await self.warm()
        while True:
            await trio.sleep(self.interval)
            raw = self.snapshot()  # on the trio thread: the cache does not move meanwhile
            await trio.to_thread.run_sync(self._store, raw)
