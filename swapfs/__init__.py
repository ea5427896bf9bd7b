"""swapfs: a FUSE file system for swap files, deduplicated per clone chain.

The library is built in floors, each a package that imports only the ones
below it (docs/design.md; tests/test_layers.py holds the rules):

- :mod:`swapfs.engine`: the storage engine, the one compiled package:
  blocks, digests, the LMDB index, file maps, slot and dedup tables, the
  block store, keys and sealing, the lease, fsck;
- :mod:`swapfs.cache`: the read caches over the engine: the content cache,
  the transient pool, manifests, warm-up and the fail-over planner;
- :mod:`swapfs.control`: what the daemon and its peers say to each other:
  the control protocol, the drivers' sealed records;
- :mod:`swapfs.guest`: the driver that runs beside the swapping processes;
- :mod:`swapfs.cli`: the operator's command line.

The daemon that wires them to a FUSE mount lives in :mod:`mountd`.
"""

__version__ = "0.1.0"
