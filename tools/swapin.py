#!/usr/bin/env python3
"""Real kernel swap-in through swapfs: the content cache off and on, page clusters.

The demo's workload (tools/swapload.py): workers in a memory cgroup build
the same table, bigger than the cgroup's limit, so the kernel swaps most
of it to one swap file on a fresh swapfs mount, and the pages of the
workers' tables are identical within the file's chain; then they verify
every byte of their tables, *passes* times, so swap-in repeats. Each
round runs it on fresh mounts, the content cache off
(``content_cache_bytes = 0``) and then on (the budget given, in a config
passed to ``swapfs mount --config``; ``--cache`` runs one of the two),
and reports per run swap-out and swap-in MB/s (host-wide ``pswpout`` and
``pswpin``, so nothing else should swap meanwhile), the verify passes'
wall time, and the content cache's hits, misses, admissions and
evictions over the verify passes (``swapfs stats --json``).

    PYTHONPATH=$PWD python tools/swapin.py                     # 1 round, the demo's sizes
    PYTHONPATH=$PWD python tools/swapin.py --rounds 2 --passes 3 --json
    PYTHONPATH=$PWD python tools/swapin.py --cache on --page-cluster 3 5 --rounds 3

With ``--page-cluster N ...`` each round runs once per value, in the order
given, with the host's ``vm.page-cluster`` set to it; the host's own value
is put back afterwards, on failure, Ctrl-C and SIGTERM too. Compare the
verify passes' wall time as well as MB/s: a larger page cluster may swap
in pages the workers never touch, and MB/s counts them.

Every swap area, loop device, mount and cgroup it sets up is undone on the
way out, on failure and Ctrl-C too (tools/benchtargets.py,
tools/swapload.py). Exit code 0, 1 if a run failed (the error on
stderr), 130 if interrupted. Needs root.
"""

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapfs.cli import PAGE_CLUSTER, page_cluster  # noqa: E402
from tools.benchtargets import MIB, SWAPFS, swapfs_swap  # noqa: E402
from tools.swapload import MemoryCgroup, run_workload  # noqa: E402

TRAFFIC = ("hits", "misses", "admissions", "evictions")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _content_cache(mount: Path) -> dict[str, int]:
    """The content cache's counters; zeros when it is off."""
    result = subprocess.run([*SWAPFS, "stats", "--json", str(mount)], capture_output=True,
                            text=True, check=True)
    cache = json.loads(result.stdout).get("content_cache", {})
    return {key: int(cache.get(key, 0)) for key in TRAFFIC}


@contextlib.contextmanager
def host_page_cluster(value: int | None) -> Iterator[int | None]:
    """vm.page-cluster set to *value* while the block runs (None: left as it
    is), and the host's own value put back afterwards."""
    original = page_cluster()
    if value is None:
        yield original
        return
    if original is None:
        raise RuntimeError(f"cannot read {PAGE_CLUSTER}")
    PAGE_CLUSTER.write_text(str(value))
    try:
        yield value
    finally:
        PAGE_CLUSTER.write_text(str(original))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that SIGTERM unwinds and undoes like Ctrl-C


def run_once(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """One run of the workload on a fresh mount with a content cache of *budget* bytes."""
    swap_size = (args.workers * args.table_mib + 256) * MIB
    with tempfile.TemporaryDirectory(prefix="swapfs-swapin-") as scratch:
        config = Path(scratch) / "swapfs.toml"
        config.write_text(f"content_cache_bytes = {budget}\n")
        with swapfs_swap(swap_size, "--config", str(config)) as swap:
            assert swap.mount is not None
            mount = swap.mount
            counters: dict[str, dict[str, int]] = {}

            def on_phase(name: str) -> None:
                if name not in counters:  # the first verify pass, and the end
                    counters[name] = _content_cache(mount)
                progress(f"  {name}")

            with MemoryCgroup("swapin", args.limit_mib * MIB) as cgroup:
                result = run_workload(cgroup, args.workers, args.table_mib, swap.name,
                                      on_phase=on_phase, passes=args.passes)
    traffic = {key: counters["done"][key] - counters["verify"][key] for key in TRAFFIC}
    looked_up = traffic["hits"] + traffic["misses"]
    return {
        "cache_bytes": budget,
        "swap_out_mbps": result.swap_out_mbps,
        "swap_in_mbps": result.swap_in_mbps,
        "swapped_out_bytes": result.swapped_out_bytes,
        "swapped_in_bytes": result.swapped_in_bytes,
        "verify_seconds": result.verify_seconds,
        **traffic,
        "hit_rate": traffic["hits"] / looked_up if looked_up else 0.0,
    }


def _line(row: dict[str, Any]) -> str:
    return (f"round {row['round']}, page-cluster {row['page_cluster']}, "
            f"cache {row['cache_bytes'] // MIB:>3} MiB: "
            f"swap-out {row['swap_out_mbps']:6.1f} MB/s, "
            f"swap-in {row['swap_in_mbps']:6.1f} MB/s "
            f"({row['swapped_in_bytes'] / MIB:.0f} MiB in {row['verify_seconds']:.1f} s), "
            f"hit rate {row['hit_rate']:6.1%} "
            f"(hits {row['hits']}, misses {row['misses']}, "
            f"admissions {row['admissions']}, evictions {row['evictions']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    parser.add_argument("--table-mib", type=int, default=128, help="each worker's table (128)")
    parser.add_argument("--limit-mib", type=int, default=192,
                        help="the memory cgroup's limit (192)")
    parser.add_argument("--passes", type=int, default=3, help="verify passes (3)")
    parser.add_argument("--cache-mib", type=int, default=64,
                        help="the content cache's budget when on (64, the default)")
    parser.add_argument("--cache", choices=("both", "off", "on"), default="both",
                        help="run with the content cache off, on, or both, off first (both)")
    parser.add_argument("--page-cluster", type=int, nargs="+", metavar="N",
                        help="vm.page-cluster values to run each round with, in turn "
                             "(default: the host's, untouched)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (1)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    budgets = {"both": (0, args.cache_mib * MIB), "off": (0,),
               "on": (args.cache_mib * MIB,)}[args.cache]
    signal.signal(signal.SIGTERM, _interrupt)
    rows = []
    try:
        for number in range(1, args.rounds + 1):
            for cluster in args.page_cluster or [None]:
                with host_page_cluster(cluster) as value:
                    for budget in budgets:
                        progress(f"round {number}/{args.rounds}, page-cluster {value}, "
                                 f"content cache {budget // MIB} MiB: {args.workers} workers "
                                 f"x {args.table_mib} MiB under {args.limit_mib} MiB, "
                                 f"{args.passes} verify passes")
                        rows.append({"round": number, "page_cluster": value,
                                     **run_once(args, budget)})
                        progress(_line(rows[-1]))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        progress(f"swapin: {exc}")
        return 1
    except KeyboardInterrupt:
        progress("swapin: interrupted; everything set up was undone")
        return 130
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(_line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
