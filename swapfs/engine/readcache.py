"""What the engine asks of a read cache, and the key every cache files a block under.

The caches live a floor above the engine (:mod:`swapfs.cache`): the
engine reads through whichever it is given (``Volume.use_caches``) and
needs only the calls below of them. Keys are per chain because digests
are: a digest keyed with one chain's secret says nothing in another.
"""

from typing import Any, Protocol


class ReadCache(Protocol):
    """A cache the read path asks before the store, and offers what it read."""

    def get(self, key: bytes, ino: int) -> bytes | None:
        """The block filed under *key*, read by file *ino*, if cached."""

    def offer(self, key: bytes, data: bytes, ino: int) -> None:
        """A block read (verified) for *ino*: the cache decides to admit it."""

    def stats(self) -> dict[str, Any]:
        """The cache's figures, for ``swapfs stats``."""


def cache_key(chain_id: int, digest: bytes) -> bytes:
    """A block's key in every cache: digests are per chain."""
    return chain_id.to_bytes(4, "big") + digest
