"""The content cache's manifest on disk: warm at start, write while serving.

The daemon runs :meth:`CacheKeeper.run` in its serving nursery: it warms
the content cache from ``<state>/cache.manifest`` (a few hundred blocks at
a time, so FUSE requests are served meanwhile), then rewrites the manifest
every ``manifest_interval`` seconds; :meth:`CacheKeeper.write` once more
after the FUSE loop ends. A manifest that cannot be read (truncated,
garbage, another version) gives a cold cache and one warning, never a
failed start. Format: :mod:`swapfs.manifest`.
"""

import logging

import trio

from swapfs import manifest
from swapfs.cache import BlockCache
from swapfs.volume import Volume
from swapfs.warm import hottest_first, warm

log = logging.getLogger(__name__)

MANIFEST_NAME = "cache.manifest"
#: Blocks warmed between two checkpoints of the trio loop.
WARM_BATCH = 256


class CacheKeeper:
    """One daemon's content cache manifest."""

    def __init__(self, volume: Volume, cache: BlockCache | None, interval: float) -> None:
        self.volume = volume
        self.cache = cache
        self.interval = interval
        self.path = volume.state / MANIFEST_NAME

    def read(self) -> list[manifest.CacheEntry]:
        """The last manifest's entries; none (with one warning) if it is unusable."""
        try:
            return manifest.read_manifest(self.path)
        except FileNotFoundError:
            return []
        except (OSError, manifest.ManifestError) as exc:
            log.warning("ignoring the cache manifest %s (%s): the content cache starts "
                        "cold", self.path, exc)
            return []

    async def warm(self) -> int:
        """Warm the cache from the last manifest, hottest first; blocks loaded."""
        if self.cache is None:
            return 0
        entries = hottest_first(self.read())
        loaded = 0
        for start in range(0, len(entries), WARM_BATCH):
            if not self.cache.free_blocks:
                break
            loaded += warm(self.volume, self.cache, entries[start:start + WARM_BATCH])
            await trio.sleep(0)
        if entries:
            log.info("content cache warmed with %d of %d blocks from %s", loaded,
                     len(entries), self.path)
        return loaded

    def snapshot(self) -> bytes:
        """The manifest of the cache as it is now."""
        assert self.cache is not None
        priorities = self.volume.priorities()
        return manifest.serialize(self.cache.entries(priorities), priorities)

    def write(self) -> None:
        """Write the manifest now (a failure is logged: the cache goes on)."""
        if self.cache is None:
            return
        try:
            manifest.write_manifest(self.path, self.snapshot())
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
            try:
                await trio.to_thread.run_sync(manifest.write_manifest, self.path, raw)
            except OSError as exc:
                log.warning("cannot write the cache manifest %s: %s", self.path, exc)
