"""What a 4 KiB overwrite and a discard cost in the engine alone (no FUSE).

Fills one file sequentially with data of which ``--dedupe`` percent repeats
earlier blocks (as fio's ``dedupe_percentage``), syncs, then overwrites
it at random block offsets with new data of the same kind, ``--request-blocks``
4 KiB blocks a request (1 by default; real swap-out writes 56 on average,
docs/performance.md), timing each ``Volume.write`` and reporting the time
per block; every second of it, as the daemon does, a checkpoint is taken
(``Volume.sync``) and the slots freed before the last such second and not
reused since are punched (``Volume.punch_pending``), both timed apart
(reported together as the punches after it). Then discards (``fallocate``
PUNCH_HOLE | KEEP_SIZE, what a loop device sends) 1 MiB ranges of its first
half, and its second half (64 MiB with the default size) at once, timing
each ``Volume.fallocate`` and the punch of the slots it freed.

The state directory is made under ``--dir`` (default: the system's temporary
directory), so the data files live on that file system and its mount
options count (``docs/benchmarks.md`` compares ext4 with and without ``discard``).

Each figure is also given against the *floor* measured in the same run:
what a new block costs at least, whatever the metadata around it costs,
timed on that run's own new blocks: its keyed digest, in an encrypted
state its block key and AES-GCM seal (``ChainKeys.digest`` and ``seal``),
and one 4 KiB ``pwritev`` of it to a random slot of a scratch file of the
file's size beside the state (of the block as it is: sealed, it is the
same size).

Example (the figures of docs/performance.md)::

    PYTHONPATH=$PWD python tools/writecost.py --file-mib 128 --writes 20000
"""

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from swapfs.engine import (
    BLOCK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    ROOT_INO,
    Volume,
    keys,
)

MIB = 1 << 20
DISCARD = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class Blocks:
    """4 KiB blocks of which *dedupe* percent repeat a block made before."""

    def __init__(self, dedupe: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.dedupe = dedupe
        self.made: list[bytes] = []

    def next(self) -> bytes:
        if self.made and self.rng.randrange(100) < self.dedupe:
            return self.rng.choice(self.made)
        block = self.rng.randbytes(BLOCK_SIZE)
        self.made.append(block)
        return block


def fill(volume: Volume, ino: int, blocks: int, data: Blocks) -> None:
    """Write the file from start to end in 256 KiB requests."""
    per_request = 64
    for first in range(0, blocks, per_request):
        count = min(per_request, blocks - first)
        volume.write(ino, first * BLOCK_SIZE, b"".join(data.next() for _ in range(count)))


def figures(seconds: list[float]) -> dict[str, float]:
    micros = sorted(s * 1e6 for s in seconds)
    return {"mean_us": statistics.fmean(micros), "median_us": micros[len(micros) // 2],
            "p99_us": micros[min(len(micros) - 1, len(micros) * 99 // 100)],
            "count": len(micros)}


def overwrite(volume: Volume, ino: int, blocks: int, writes: int, data: Blocks,
              seed: int, per_request: int = 1) -> dict[str, Any]:
    """Time *writes* blocks of new data, written *per_request* at a time;
    the figures are per block."""
    rng = random.Random(seed)
    requests = -(-writes // per_request)
    offsets = [rng.randrange(blocks - per_request + 1) * BLOCK_SIZE for _ in range(requests)]
    buffers = [b"".join(data.next() for _ in range(per_request)) for _ in range(requests)]
    clock = time.perf_counter
    times = []
    punching = 0.0
    punched = 0
    previous = time.monotonic()
    next_round = clock() + 1.0
    for offset, buffer in zip(offsets, buffers, strict=True):
        start = clock()
        volume.write(ino, offset, buffer)
        end = clock()
        times.append((end - start) / per_request)
        if end >= next_round:  # the daemon's round of a checkpoint and punches
            cutoff, previous = previous, time.monotonic()
            volume.sync()
            punched += volume.punch_pending(freed_before=cutoff)
            punching += clock() - end
            next_round = clock() + 1.0
    start = clock()
    punched += volume.punch_pending()  # what is left at close
    punching += clock() - start
    written = requests * per_request
    return {**figures(times), "punched_per_write": punched / written,
            "punch_us_per_write": punching * 1e6 / written}


def floor(volume: Volume, ino: int, directory: Path, blocks: int, data: list[bytes]
          ) -> dict[str, float]:
    """The primitives' cost per new block (see the module's docstring), in
    µs, with the keys of the chain of file *ino*."""
    opened = volume.opened
    with opened.index.begin() as txn:
        record = txn.get_chain(volume.getattr(ino).chain)
    assert record is not None
    chain = opened.chain_keys(record)
    rng = random.Random(4)
    clock = time.perf_counter
    digests, sealing = [], 0.0
    start = clock()
    for block in data:
        digests.append(chain.digest(block))
    digesting = clock() - start
    if chain.sealed:
        seal = chain.seal
        start = clock()
        for digest, block in zip(digests, data, strict=True):
            seal(digest, block)  # kept, the sealed blocks would cost page faults
        sealing = clock() - start
    path = directory / "floor.blocks"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # as the block store does
        for first in range(0, blocks, 64):
            os.pwrite(fd, secrets.token_bytes(BLOCK_SIZE) * min(64, blocks - first),
                      first * BLOCK_SIZE)
        os.fsync(fd)
        offsets = [rng.randrange(blocks) * BLOCK_SIZE for _ in data]
        start = clock()
        for offset, block in zip(offsets, data, strict=True):
            os.pwritev(fd, [block], offset)
        writing = clock() - start
    finally:
        os.close(fd)
        path.unlink()
    per_block = 1e6 / len(data)
    return {"digest_us": digesting * per_block, "seal_us": sealing * per_block,
            "pwritev_us": writing * per_block,
            "floor_us": (digesting + sealing + writing) * per_block}


def discards(volume: Volume, ino: int, ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """Discard each (offset, length) range, then punch the slots it freed."""
    times = []
    punching = 0.0
    for offset, length in ranges:
        start = time.perf_counter()
        volume.fallocate(ino, DISCARD, offset, length)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        volume.punch_pending()
        punching += time.perf_counter() - start
    return {**figures(times), "punch_us_per_discard": punching * 1e6 / len(ranges)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file-mib", type=int, default=128, help="the file's size")
    parser.add_argument("--writes", type=int, default=20000, help="4 KiB blocks overwritten")
    parser.add_argument("--request-blocks", type=int, default=1,
                        help="blocks a write request overwrites")
    parser.add_argument("--dedupe", type=int, default=50, help="percent of repeated blocks")
    parser.add_argument("--discards", type=int, default=16, help="1 MiB discards timed")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the state directory is made")
    parser.add_argument("--encrypt", action="store_true",
                        help="an encrypted state (a master key made for the run)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    blocks = args.file_mib * MIB // BLOCK_SIZE
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="swapfs-writecost-", dir=args.dir) as state:
        master = keys.generate(Path(state) / "master.key") if args.encrypt else None
        volume = Volume(Path(state) / "state", master=master)
        try:
            data = Blocks(args.dedupe, seed=1)
            chain = volume.mkdir(ROOT_INO, b"chain", 0o755, 0, 0)
            target = volume.create(chain.ino, b"file", 0o600, 0, 0)
            fill(volume, target.ino, blocks, data)
            volume.sync()
            results[f"overwrite {args.request_blocks * 4}k"] = overwrite(
                volume, target.ino, blocks, args.writes, data, seed=2,
                per_request=args.request_blocks)
            fresh = Blocks(0, seed=5)
            results["floor"] = floor(volume, target.ino, Path(state), blocks,
                                     [fresh.next() for _ in range(min(args.writes, 20000))])
            half = blocks * BLOCK_SIZE // 2
            ranges = random.Random(3).sample(range(half // MIB), min(args.discards, half // MIB))
            results["discard 1m"] = discards(volume, target.ino,
                                             [(number * MIB, MIB) for number in ranges])
            results[f"discard {half // MIB}m"] = discards(volume, target.ino, [(half, half)])
        finally:
            volume.close()
    least = results["floor"]
    print(f"floor         {least['floor_us']:9.1f} µs a new block: digest {least['digest_us']:.1f},"
          f" seal {least['seal_us']:.1f}, pwritev {least['pwritev_us']:.1f}", file=sys.stderr)
    for name, figure in results.items():
        if name == "floor":
            continue
        ratio = (f"; {figure['median_us'] / least['floor_us']:.1f}x the floor"
                 if name.startswith("overwrite") else "")
        punch = figure.get("punch_us_per_write", figure.get("punch_us_per_discard"))
        print(f"{name:13} mean {figure['mean_us']:9.1f} µs  median {figure['median_us']:9.1f}"
              f" µs  p99 {figure['p99_us']:9.1f} µs  ({figure['count']} timed);"
              f" punches after it {punch:9.1f} µs{ratio}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
