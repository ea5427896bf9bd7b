"""swapfs: a FUSE file system for swap files, deduplicated per clone chain.

The library holds the storage engine and its FUSE front; the daemon that
wires them to a mount lives in :mod:`mountd`.
"""

__version__ = "0.1.0"
