"""What a 4 KiB read costs in the engine alone, with the read caches off and on.

Writes one file of random blocks into a fresh volume, then times
``Volume.read`` of one whole block at a time: uniform offsets (almost every
read a miss, like a swap-in) and zipf 1.2 offsets (mostly hits), for three
set-ups of the caches, each with fresh caches, best of ``--repeat``:

- ``none``: no cache at all;
- ``pool``: the transient pool alone, empty (a daemon without drivers);
- ``pool+content``: the empty pool and a content cache of ``--content-mib``.

Example (the figures of docs/caches.md)::

    PYTHONPATH=$PWD python tools/readcost.py --file-mib 256 --content-mib 64
"""

import argparse
import bisect
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from swapfs.cache import BlockCache, TransientCache
from swapfs.engine import BLOCK_SIZE, ROOT_INO, Volume, keys

MIB = 1 << 20


def offsets(blocks: int, reads: int, zipf: float | None, seed: int) -> list[int]:
    """Byte offsets of *reads* whole blocks, uniform or zipf(*zipf*) by rank."""
    rng = random.Random(seed)
    if zipf is None:
        return [rng.randrange(blocks) * BLOCK_SIZE for _ in range(reads)]
    weights = itertools.accumulate(1 / rank ** zipf for rank in range(1, blocks + 1))
    cumulative = list(weights)
    ranks = list(range(blocks))
    rng.shuffle(ranks)  # the hot blocks are anywhere in the file
    total = cumulative[-1]
    return [ranks[bisect.bisect_left(cumulative, rng.random() * total)] * BLOCK_SIZE
            for _ in range(reads)]


def caches(setup: str, content_mib: int) -> tuple[TransientCache | None, BlockCache | None]:
    pool = TransientCache(256 * MIB) if setup != "none" else None
    content = (BlockCache(range(content_mib * MIB // BLOCK_SIZE), admit_first_miss=True)
               if setup == "pool+content" else None)
    return pool, content


def time_reads(volume: Volume, ino: int, reads: list[int]) -> float:
    """Seconds per read."""
    read = volume.read
    start = time.perf_counter()
    for offset in reads:
        read(ino, offset, BLOCK_SIZE)
    return (time.perf_counter() - start) / len(reads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file-mib", type=int, default=256, help="the file's size")
    parser.add_argument("--content-mib", type=int, default=64, help="the content cache")
    parser.add_argument("--reads", type=int, default=100000, help="reads per timing")
    parser.add_argument("--repeat", type=int, default=3, help="timings per figure; best kept")
    parser.add_argument("--encrypt", action="store_true",
                        help="an encrypted state (a master key made for the run)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    blocks = args.file_mib * MIB // BLOCK_SIZE
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="swapfs-readcost-") as state:
        master = keys.generate(Path(state) / "master.key") if args.encrypt else None
        volume = Volume(Path(state) / "state", master=master)
        chain = volume.mkdir(ROOT_INO, b"chain", 0o755, 0, 0)
        inode = volume.create(chain.ino, b"file", 0o600, 0, 0)
        for block in range(blocks):
            volume.write(inode.ino, block * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
        for name, zipf in (("uniform", None), ("zipf 1.2", 1.2)):
            reads = offsets(blocks, args.reads, zipf, seed=1)
            for setup in ("none", "pool", "pool+content"):
                best = float("inf")
                hit_rate = 0.0
                for _ in range(args.repeat):
                    pool, content = caches(setup, args.content_mib)
                    volume.use_caches(transient=pool, content=content)
                    best = min(best, time_reads(volume, inode.ino, reads))
                    if content is not None:
                        hit_rate = content.hits / (content.hits + content.misses)
                results.setdefault(name, {})[setup] = {"us": best * 1e6, "hit_rate": hit_rate}
                print(f"{name:9} {setup:13} {best * 1e6:6.2f} µs per read"
                      f"  (content cache hit rate {hit_rate:.1%})", file=sys.stderr)
        volume.close()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
