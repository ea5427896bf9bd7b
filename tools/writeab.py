"""fio 4 KiB random overwrites through swapfs and a loop device, A/B over source trees.

For each round and each source tree in turn (that tree's swapfs runs, by
PYTHONPATH): a fresh mount with its state under /tmp, a file of ``--size``
in a chain, a loop device with direct I/O over it, ``tools/fio/fill-1m.fio``
(dedupe 50), an fsync of the loop device (the daemon syncs its state), then
``tools/fio/randwrite-4k.fio`` (dedupe 50: new data over the filled file)
for ``--runtime`` seconds, then 16 discards of 1 MiB (``BLKDISCARD``),
each timed. Prints each run and, per tree, the medians over the rounds.
Hold the bench lock: alternating rounds let machine noise hit every tree.

Example (the fio figures of docs/performance.md)::

    mkdir /tmp/base && git archive main | tar -x -C /tmp/base
    flock /tmp/swapfs-bench.lock .venv/bin/python tools/writeab.py /tmp/base "$PWD"
"""

import argparse
import fcntl
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.benchtargets import loop_device, swapfs_mount  # noqa: E402

FIO = Path(__file__).resolve().parent / "fio"
MIB = 1 << 20
BLKDISCARD = 0x1277  # _IO(0x12, 119), linux/fs.h


def fio(job: str, device: str, size: int, runtime: int) -> dict[str, float]:
    env = dict(os.environ, TARGET=device, SIZE=str(size), RUNTIME=str(runtime), DEDUPE="50",
               ZERO="0")
    out = subprocess.run(["fio", "--output-format=json", str(FIO / f"{job}.fio")], env=env,
                         capture_output=True, text=True, check=True).stdout
    write = json.loads(out)["jobs"][0]["write"]
    percentile = write["clat_ns"]["percentile"]
    return {"iops": write["iops"], "p50_us": percentile["50.000000"] / 1000,
            "p99_us": percentile["99.000000"] / 1000}


def discards(device: str) -> float:
    """Median milliseconds of 16 discards of 1 MiB, 4 MiB apart."""
    times = []
    fd = os.open(device, os.O_RDWR)
    try:
        for number in range(16):
            start = time.perf_counter()
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", number * 4 * MIB, MIB))
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return statistics.median(times) * 1000


def run(tree: Path, size: int, runtime: int) -> dict[str, float]:
    os.environ["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory(prefix="swapfs-writeab-", dir="/tmp") as workdir, \
            swapfs_mount(Path(workdir)) as mnt:
        (mnt / "c").mkdir()
        path = mnt / "c" / "disk"
        path.touch()
        os.truncate(path, size)
        with loop_device(path) as device:
            fio("fill-1m", device, size, 0)
            fd = os.open(device, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            result = fio("randwrite-4k", device, size, runtime)
            result["discard_1m_ms"] = discards(device)
            return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="swapfs source trees")
    parser.add_argument("--size-mib", type=int, default=256, help="the file's size")
    parser.add_argument("--runtime", type=int, default=15, help="seconds of random writes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[Path, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for number in range(args.rounds):
        for tree in args.trees:
            result = run(tree.resolve(), args.size_mib * MIB, args.runtime)
            results[tree].append(result)
            print(f"round {number + 1} {tree}: {json.dumps(result)}", flush=True)
    for tree, runs in results.items():
        medians: dict[str, Any] = {key: statistics.median(run[key] for run in runs)
                                   for key in runs[0]}
        print(f"median {tree}: " + ", ".join(f"{key} {value:.1f}"
                                              for key, value in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
