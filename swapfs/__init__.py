"""swapfs: a FUSE file system for swap files, deduplicated per clone chain.

The library holds the storage engine and its FUSE front; the daemon that
wires them to a mount lives in :mod:`mountd`. Some engine modules run
compiled where the build could compile them (:mod:`swapfs.compiled`).
"""

from swapfs import compiled

__version__ = "0.1.0"

compiled.install()
