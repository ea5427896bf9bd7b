#!/usr/bin/env python3
"""swapfs bench: fio and end-to-end swap against the baselines, in one run.

Every figure is measured in the same run on the same machine and reported
as a ratio to three ceilings measured alongside it: the thinnest possible
Python FUSE file system (tools/memfs.py: what any pyfuse3 file system can
reach here) on PyPI's pyfuse3 ("python-fuse-stock", in
build/stock-pyfuse3-venv, built on first use by
tools/build-stock-pyfuse3.sh) and on the pyfuse3 swapfs runs on, with our
patches ("python-fuse-patched"), and the kernel (a loop device over a tmpfs
file). swapfs runs twice: with its state directory on the root file system
("swapfs"), and on an ext4 file system of its own mounted without
``discard`` ("swapfs-nodiscard": a loop device over a file on the root
disk), which says what the root's mount options cost (with ``discard``,
ext4 discards the blocks that each hole punch of a freed slot gives back);
the header gives both state directories' mount options. The issue's targets (swapfs against
the stock ceiling at dedupe 50, and end to end against a swap file on the
root disk) close the table, met or not.

    swapfs bench --quick            # a few minutes: the core rows
    swapfs bench --out results/     # the full matrix
    swapfs bench --quick --no-fio --no-e2e --no-guests --no-pool --no-content   # the takeover rows
    swapfs bench --quick --targets swapfs --data dedupe-0,dedupe-50,dedupe-90 --fill-only \
        --no-e2e --no-guests --no-pool --no-content --no-takeover   # the space and index rows
    swapfs bench --quick --no-fio --no-e2e --no-guests --no-pool --no-content --no-takeover \
        --scale 1,4,16

fio jobs (tools/fio/*.fio, usable by hand): 4 KiB random write and read,
1 MiB sequential write and read; queue depth 16, libaio, direct I/O, on a
loop device with direct I/O over each target's file; data with fio's
dedupe_percentage 0, 50 and 90, and all-zero buffers. After the fill of
each data set, swapfs's space row: bytes stored against the ideal, and the
index's bytes by LMDB database and per logical and per stored block (what
``swapfs stats`` reports). End to end: the
demo's workload (workers building the same table in a memory cgroup) with
real kernel swap on swapfs (both state directories), zram and a swap file
on the root disk. Guests (``--no-guests`` skips them): QEMU guests that
swap at once to files of one chain on swapfs, then to plain files on the
root disk, each checking every page it paged out (tools/vmswap.py): MB/s
inside the guests, and what the chain stores against the ideal.
Transient cache: a skewed (zipf 1.2) 4 KiB random read on swapfs with the
pool off and on; the pool's size comes from a synthetic driver report (a
real host's code pages rarely give more than a few hundred KiB), and the
content cache is off. Content cache: 4 KiB random reads, uniform and zipf
1.2, with the content cache off (budget 0) and on (64 MiB), in the same run.

Takeover, warm against cold: a zipf 1.2 4 KiB random read with a fixed
seed (every run reads the same blocks in the same order: fio places zipf's
hot blocks by its seed) of a 128 MiB file on a mount kept by a standby (content cache 128 MiB, a
manifest every 0.5 s, through ``swapfs mount --config``). After a fill and a
priming read, the daemon is killed (SIGKILL, by the pid its status gives)
and a first 4 KiB read times the way back (kill to first read answered);
then fio reads for the window (10 s, ``--takeover-window``) and the content
cache's hit rate over it, and over its first second, is taken from the new
daemon's stats. Cold: the dead daemon's ``cache.manifest`` is removed once
it is gone and before the new daemon reads it (a missing manifest gives an
empty cache; ``manifest_blocks`` in the row shows that it read none).
Warm: the manifest stays and the new daemon warms with the fail-over
planner's choice of it. Steady: the same read between the two, no kill: the
ceiling. fio rather than real kernel swap, because a swapped-in page stays
in memory until reclaim picks it again, so how often the kernel re-reads a
page (and so the hit rate) is reclaim's choice, not the working set's, and
varies from run to run; and because a daemon killed under active kernel
swap stalls every process of the host that swaps until the takeover ends,
or for good if it fails. The loop device with direct I/O over a swapfs file
is the I/O path swap takes, and the zipf read a working set re-read at will.

Scale (``--scale 1,4,16``, off unless asked: it builds a state of each size
in GiB, under /var/tmp, refusing one that would leave less than 10 GiB
free): remount time, takeover time (kill to a probe's O_DIRECT read
answered, median and worst of five) and the daemon's memory by size
stored, from tools/scale.py.

Writes results.json, results.md and results.png to --out.
"""

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import platform
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3  # noqa: E402

from swapfs.control import protocol  # noqa: E402
from swapfs.engine import FORMAT_VERSION  # noqa: E402
from swapfs.guest import scan  # noqa: E402
from tools import vmswap  # noqa: E402
from tools.benchtargets import (  # noqa: E402
    FIO_TARGETS,
    MIB,
    SWAP_TARGETS,
    Device,
    Unavailable,
    cpu_seconds,
    guest_disks,
    loop_device,
    swapfs_kept_file,
    swapfs_plain_file,
)
from tools.guest import missing as guest_lacks  # noqa: E402
from tools.scale import Refused, sizes  # noqa: E402
from tools.scale import run as run_scale  # noqa: E402
from tools.swapload import MemoryCgroup, run_workload  # noqa: E402

FIO_DIR = Path(__file__).resolve().parent / "fio"
GIB = 1 << 30
JOBS = ["randwrite-4k", "randread-4k", "seqwrite-1m", "seqread-1m"]
DATA = {"dedupe-0": (0, 0), "dedupe-50": (50, 0), "dedupe-90": (90, 0), "zeros": (0, 1)}
#: Each ceiling and the key of a row's IOPS as a ratio of it.
CEILINGS = {"python-fuse-stock": "vs_python_fuse_stock",
            "python-fuse-patched": "vs_python_fuse_patched",
            "kernel": "vs_kernel"}
SWAPFS_TARGETS = ["swapfs", "swapfs-unencrypted", "swapfs-nodiscard"]
#: Encryption at rest should keep at least this share of the unencrypted throughput.
ENCRYPTION_GOAL = 0.9
PAGE = 4096

#: The issue's targets: (what, fio job or e2e key, at least this ratio). The fio
#: ones are swapfs against the stock Python FUSE ceiling at dedupe 50; the e2e
#: ones against a swap file on the root disk.
TARGET_DATA = "dedupe-50"
TARGET_CEILING = "python-fuse-stock"
GOALS = [
    ("4 KiB random write", "randwrite-4k", 1.0),
    ("4 KiB random read", "randread-4k", 1.2),
    ("1 MiB sequential write", "seqwrite-1m", 0.5),
    ("1 MiB sequential read", "seqread-1m", 0.8),
    ("end-to-end swap-out", "out_vs_root_disk", 0.9),
    ("end-to-end swap-in", "in_vs_root_disk", 0.7),
]


@dataclass
class Plan:
    targets: list[str]
    data: list[str]
    jobs: list[str]  # run on each target after its fill; none: the space rows alone
    runtime: int  # seconds per fio run
    repeats: int  # runs per job; the median is reported
    region: int  # bytes each target's file spans
    e2e_workers: int
    e2e_table_mib: int
    e2e_limit_mib: int
    e2e_targets: list[str] = field(default_factory=lambda: list(SWAP_TARGETS))
    pool: bool = True  # the transient cache rows
    content: bool = True  # the content cache rows
    takeover: bool = True  # the warm against cold takeover rows
    takeover_window: int = 10  # seconds read after each takeover
    scale: list[int] = field(default_factory=list)  # bytes stored per scale row; none: off
    guests: int = 2  # QEMU guests swapping at once (tools/vmswap.py); 0: off
    guest_shared_mib: int = 64  # pages every guest builds alike
    guest_own_mib: int = 32  # pages of each guest's own
    guest_memory_mib: int = 160  # each guest's RAM


QUICK = Plan(list(FIO_TARGETS), ["dedupe-50"], list(JOBS), runtime=5, repeats=1, region=256 * MIB,
             e2e_workers=4, e2e_table_mib=64, e2e_limit_mib=96)
FULL = Plan(list(FIO_TARGETS), list(DATA), list(JOBS), runtime=5, repeats=3, region=256 * MIB,
            e2e_workers=6, e2e_table_mib=128, e2e_limit_mib=256, guests=3,
            guest_shared_mib=160, guest_own_mib=96, guest_memory_mib=256)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- fio -------------------------------------------------------------------------


def fio_report(job: str, device: str, plan: Plan, data: str) -> dict[str, Any]:
    """One fio run of a job in tools/fio/ on *device*: fio's JSON report."""
    dedupe, zero = DATA[data]
    env = dict(os.environ, TARGET=device, SIZE=str(plan.region), RUNTIME=str(plan.runtime),
               DEDUPE=str(dedupe), ZERO=str(zero))
    result = subprocess.run(["fio", "--output-format=json", str(FIO_DIR / f"{job}.fio")],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fio {job} on {device}: {result.stderr.strip()}")
    report: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{"):])
    return report


def fio_side(job: str, report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the direction *job* measures (its reads or its writes)."""
    figures: dict[str, Any] = report["jobs"][0]["read" if "read" in job else "write"]
    return figures


def run_fio(job: str, device: str, plan: Plan, data: str) -> dict[str, float]:
    """One fio run; IOPS, MB/s and completion latency percentiles in µs."""
    figures = fio_side(job, fio_report(job, device, plan, data))
    percentiles = figures["clat_ns"].get("percentile", {})
    return {
        "iops": figures["iops"],
        "mbps": figures["bw_bytes"] / 1e6,
        "p50_us": percentiles.get("50.000000", 0) / 1000,
        "p99_us": percentiles.get("99.000000", 0) / 1000,
    }


def ideal_blocks(device: str, size: int) -> int:
    """Distinct non-zero 4 KiB blocks on *device*: what perfect dedup stores."""
    seen: set[bytes] = set()
    zero = bytes(PAGE)
    with open(device, "rb") as disk:
        for _ in range(0, size, MIB):
            chunk = disk.read(MIB)
            for offset in range(0, len(chunk), PAGE):
                block = chunk[offset:offset + PAGE]
                if block != zero:
                    seen.add(blake3.blake3(block).digest(16))
    return len(seen)


def space_row(device: Device, plan: Plan, data: str) -> dict[str, Any]:
    """What a fill stored against the ideal, and what the index takes for it
    (by database, and per logical and per stored block)."""
    assert device.stats is not None
    stats = device.stats()
    ideal = ideal_blocks(device.path, plan.region)
    stored = stats["stored_bytes"]
    index = stats["index"]
    return {
        "data": data,
        "logical_bytes": stats["logical_bytes"],
        "stored_bytes": stored,
        "ideal_bytes": ideal * PAGE,
        "stored_vs_ideal": stored / (ideal * PAGE) if ideal else (1.0 if not stored else 0),
        "metadata_bytes": stats["index_bytes"],
        "metadata_per_stored_block": stats["index_bytes"] / stats["unique_blocks"]
        if stats["unique_blocks"] else None,
        "logical_blocks": index["logical_blocks"],
        "stored_blocks": index["stored_blocks"],
        "maps_bytes": index["maps_bytes"],
        "other_bytes": index["other_bytes"],
        "unused_bytes": index["unused_bytes"],
        "maps_per_logical_block": index["bytes_per_logical_block"],
        "other_per_stored_block": index["bytes_per_stored_block"],
        "databases": index["databases"],
        "main_bytes": index["main_bytes"],
    }


def fio_matrix(plan: Plan, state_fs: dict[str, str]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fio rows and swapfs's space rows; each swapfs target's state
    directory mount goes into *state_fs*."""
    rows: list[dict[str, Any]] = []
    space: list[dict[str, Any]] = []
    total = len(plan.data) * len(plan.targets) * len(plan.jobs)
    done = 0
    for data in plan.data:
        for target in plan.targets:
            try:
                with FIO_TARGETS[target](plan.region) as device:
                    if device.state_mount:
                        state_fs[target] = device.state_mount
                    run_fio("fill-1m", device.path, plan, data)
                    if target == "swapfs":
                        space.append(space_row(device, plan, data))
                        progress(_space_line(space[-1]))
                    for job in plan.jobs:
                        runs = [run_fio(job, device.path, plan, data)
                                for _ in range(plan.repeats)]
                        median = sorted(runs, key=lambda run: run["iops"])[len(runs) // 2]
                        rows.append({"target": target, "job": job, "data": data, **median})
                        done += 1
                        progress(f"[{done}/{total}] {target:<12} {job:<13} {data:<10} "
                                 f"{median['iops']:>9.0f} IOPS {median['mbps']:>8.1f} MB/s")
            except Unavailable as exc:
                for job in plan.jobs:
                    rows.append({"target": target, "job": job, "data": data,
                                 "unavailable": str(exc)})
                done += len(plan.jobs)
                progress(f"[{done}/{total}] {target}: unavailable ({exc})")
    add_ratios(rows)
    return rows, space


def _space_line(row: dict[str, Any]) -> str:
    def per_block(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} B"
    return (f"swapfs {row['data']}: stored {row['stored_bytes'] / MIB:.1f} MiB, index "
            f"{row['metadata_bytes'] / MIB:.2f} MiB, maps "
            f"{per_block(row['maps_per_logical_block'])} per logical block, the rest "
            f"{per_block(row['other_per_stored_block'])} per stored block")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's IOPS as a ratio of each ceiling's for the same job and data."""
    by_key = {(row["target"], row["job"], row["data"]): row for row in rows}
    for row in rows:
        for ceiling, key in CEILINGS.items():
            base = by_key.get((ceiling, row["job"], row["data"]), {})
            if "iops" in row and base.get("iops"):
                row[key] = row["iops"] / base["iops"]


# -- end to end --------------------------------------------------------------------


def e2e_rows(plan: Plan, state_fs: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    swap_size = (plan.e2e_workers * plan.e2e_table_mib + 256) * MIB
    for target in plan.e2e_targets:
        progress(f"end to end: {target}, {plan.e2e_workers} workers x {plan.e2e_table_mib} MiB "
                 f"under {plan.e2e_limit_mib} MiB")
        try:
            with SWAP_TARGETS[target](swap_size) as swap:
                if swap.state_mount:
                    state_fs.setdefault(target, swap.state_mount)
                stored = 0

                def sample(message: str) -> None:
                    nonlocal stored
                    stored = max(stored, swap.stored_bytes())

                cpu = 0.0 if swap.pid is None else cpu_seconds(swap.pid)
                with MemoryCgroup("bench", plan.e2e_limit_mib * MIB) as cgroup:
                    result = run_workload(cgroup, plan.e2e_workers, plan.e2e_table_mib,
                                          swap.name, progress=sample)
                row = {
                    "target": target, "swap_out_mbps": result.swap_out_mbps,
                    "swap_in_mbps": result.swap_in_mbps,
                    "swapped_out_bytes": result.swapped_out_bytes,
                    "peak_swap_used_bytes": result.peak_swap_used_bytes,
                    "stored_bytes": stored,
                }
                if swap.pid is not None:
                    # Its own threads, the background ones included (the
                    # checkpoints, the scan): what swapping costs the host.
                    swapped = result.swapped_out_bytes + result.swapped_in_bytes
                    row["daemon_cpu_s_per_gib"] = (cpu_seconds(swap.pid) - cpu) / (
                        swapped / GIB)
                rows.append(row)
                progress(f"  swap-out {result.swap_out_mbps:.0f} MB/s, swap-in "
                         f"{result.swap_in_mbps:.0f} MB/s, stored {stored / MIB:.0f} MiB")
        except Unavailable as exc:
            rows.append({"target": target, "unavailable": str(exc)})
            progress(f"  unavailable ({exc})")
    base = next((row for row in rows if row["target"] == "root-disk" and
                 "swap_out_mbps" in row), None)
    for row in rows:
        if base and "swap_out_mbps" in row:
            row["out_vs_root_disk"] = row["swap_out_mbps"] / base["swap_out_mbps"]
            row["in_vs_root_disk"] = row["swap_in_mbps"] / base["swap_in_mbps"]
    return rows


# -- guests ------------------------------------------------------------------------

GUEST_TARGETS = ("swapfs", "root-disk")


def guest_rows(plan: Plan) -> list[dict[str, Any]]:
    """tools/vmswap.py's guests on swapfs (files of one chain) and on plain
    files on the root disk: MB/s inside the guests, and what swapfs stores."""
    if not plan.guests:
        return []
    lacks = guest_lacks()
    if lacks:
        return [{"target": target, "unavailable": f"a QEMU guest needs: {'; '.join(lacks)}"}
                for target in GUEST_TARGETS]
    rows: list[dict[str, Any]] = []
    size = vmswap.disk_bytes(plan.guest_shared_mib, plan.guest_own_mib)
    for target in GUEST_TARGETS:
        progress(f"guests: {plan.guests} on {target}, {plan.guest_shared_mib} MiB shared and "
                 f"{plan.guest_own_mib} MiB own each, {plan.guest_memory_mib} MiB of RAM")
        with guest_disks(target, plan.guests, size) as (disks, stored):
            reports = vmswap.run_guests(disks, plan.guest_shared_mib, plan.guest_own_mib,
                                        plan.guest_memory_mib)
            figures = vmswap.summary(reports, plan.guest_shared_mib, plan.guest_own_mib,
                                     stored() if stored is not None else None)
        rows.append({"target": target, **figures,
                     "errors": [report.error for report in reports if report.error]})
        progress(f"  swap-out {figures['swap_out_mbps']:.1f} MB/s, swap-in "
                 f"{figures['swap_in_mbps']:.1f} MB/s inside them, {figures['failed']} failed")
    base = rows[-1]
    for row in rows:
        if base["swap_out_mbps"] and base["swap_in_mbps"]:
            row["out_vs_root_disk"] = row["swap_out_mbps"] / base["swap_out_mbps"]
            row["in_vs_root_disk"] = row["swap_in_mbps"] / base["swap_in_mbps"]
    return rows


# -- the transient cache -------------------------------------------------------------

POOL_REGION = 64 * MIB  # the file the skewed reads go to
POOL_BYTES = 16 * MIB  # the pool the synthetic driver report gives


@contextlib.contextmanager
def synthetic_driver(mnt: Path, pool_bytes: int) -> Iterator[None]:
    """A driver reporting *pool_bytes* of made-up 4 KiB extents, registered while
    the block runs (its connection is its registration)."""
    extents = [{"pid": 1, "path": f"/synthetic/{n}", "device": "00:00", "inode": n,
                "address": 0, "length": PAGE, "segment": 0, "part": "tail"}
               for n in range(pool_bytes // PAGE)]
    with protocol.Connection(protocol.socket_of(str(mnt))) as connection:
        connection.request({"op": "driver.register", "driver": "bench", "extents": extents})
        yield


def _pool_stats(mnt: Path) -> dict[str, Any]:
    stats: dict[str, Any] = protocol.request(protocol.socket_of(str(mnt)),
                                            {"op": "stats"})["transient_cache"]
    return stats


def pool_rows(plan: Plan) -> list[dict[str, Any]]:
    """zipf 4 KiB random reads with the pool off (no driver) and on."""
    if not plan.pool:
        return []
    region_plan = dataclasses.replace(plan, region=POOL_REGION)
    rows: list[dict[str, Any]] = []
    host = scan().physical_bytes
    try:
        with swapfs_plain_file(POOL_REGION, "--content-cache-bytes", "0") as (mnt, path), \
                loop_device(path) as device:
            run_fio("fill-1m", device, region_plan, "dedupe-0")
            for pool_bytes in (0, POOL_BYTES):
                driver = synthetic_driver(mnt, pool_bytes) if pool_bytes \
                    else contextlib.nullcontext()
                with driver:
                    before = _pool_stats(mnt)
                    figures = run_fio("randread-4k-zipf", device, region_plan, "dedupe-0")
                    after = _pool_stats(mnt)
                hits = after["hits"] - before["hits"]
                looked_up = hits + after["misses"] - before["misses"]
                rows.append({"pool_bytes": after["capacity_bytes"], **figures,
                             "hit_rate": hits / looked_up if looked_up else 0.0,
                             "host_code_page_bytes": host})
                progress(f"transient cache {after['capacity_bytes'] // MIB} MiB: "
                         f"{figures['iops']:.0f} IOPS, hit rate {rows[-1]['hit_rate']:.1%}")
    except Unavailable as exc:
        return [{"unavailable": str(exc)}]
    for row in rows:
        row["speedup"] = row["iops"] / rows[0]["iops"]
    return rows


# -- the content cache ---------------------------------------------------------------

CONTENT_BYTES = 64 * MIB  # the default budget
CONTENT_JOBS = ["randread-4k", "randread-4k-zipf"]


def _content_stats(mnt: Path) -> dict[str, Any]:
    stats: dict[str, Any] = protocol.request(protocol.socket_of(str(mnt)),
                                            {"op": "stats"}).get("content_cache", {})
    return stats


def content_rows(plan: Plan) -> list[dict[str, Any]]:
    """4 KiB random reads, uniform and zipf, with the content cache off and on."""
    if not plan.content:
        return []
    rows: list[dict[str, Any]] = []
    try:
        for budget in (0, CONTENT_BYTES):
            flags = ("--content-cache-bytes", str(budget))
            with swapfs_plain_file(plan.region, *flags) as (mnt, path), \
                    loop_device(path) as device:
                run_fio("fill-1m", device, plan, "dedupe-0")
                for job in CONTENT_JOBS:
                    before = _content_stats(mnt)
                    figures = run_fio(job, device, plan, "dedupe-0")
                    after = _content_stats(mnt)
                    hits = after.get("hits", 0) - before.get("hits", 0)
                    looked_up = hits + after.get("misses", 0) - before.get("misses", 0)
                    rows.append({"job": job, "cache_bytes": budget, **figures,
                                 "hit_rate": hits / looked_up if looked_up else 0.0})
                    progress(f"content cache {budget // MIB} MiB, {job}: "
                             f"{figures['iops']:.0f} IOPS, hit rate {rows[-1]['hit_rate']:.1%}")
    except Unavailable as exc:
        return [{"unavailable": str(exc)}]
    for row in rows:
        base = next(other for other in rows if other["job"] == row["job"])
        row["vs_off"] = row["iops"] / base["iops"]
    return rows


# -- takeover: a warm cache against a cold one ---------------------------------------

TAKEOVER_REGION = 128 * MIB  # the file the skewed reads go to
TAKEOVER_CACHE = 128 * MIB  # the content cache: the whole region fits
MANIFEST_INTERVAL = 0.5  # seconds between two manifests
TAKEOVER_JOB = "randread-4k-zipf-repeat"  # one working set: the same blocks every run


def _takeover_config() -> str:
    return (f"content_cache_bytes = {TAKEOVER_CACHE}\n"
            f"manifest_interval = {MANIFEST_INTERVAL}\n")


def _status(mnt: Path) -> dict[str, Any]:
    status: dict[str, Any] = protocol.request(protocol.socket_of(str(mnt)), {"op": "status"})
    return status


def _wait(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _wait_for_manifest(state: Path, after: float) -> None:
    """Until the daemon has written a manifest later than wall-clock *after*."""
    path = state / "cache.manifest"
    _wait(lambda: path.exists() and path.stat().st_mtime > after, "a new cache manifest")


def _first_read(device: str) -> None:
    """One 4 KiB direct read of *device*: returns once a daemon answers it."""
    buffer = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buffer], 0)
    finally:
        os.close(fd)
        buffer.close()


def _kill_and_take_over(mnt: Path, state: Path, device: str, cold: bool) -> dict[str, Any]:
    """SIGKILL the daemon; with *cold*, remove its manifest before the new
    daemon reads it. Return the seconds from the kill to the first read
    answered and the new daemon's pid once the standby keeps it."""
    old = _status(mnt)["pid"]
    pidfd = os.pidfd_open(old)
    try:
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        select.select([pidfd], [], [], 30)  # gone: it writes nothing more
    finally:
        os.close(pidfd)
    if cold:
        with contextlib.suppress(FileNotFoundError):
            (state / "cache.manifest").unlink()
    _first_read(device)
    first_read = time.monotonic() - killed
    new = _status(mnt)["pid"]
    if new == old:
        raise RuntimeError(f"daemon {old} still answers after SIGKILL")
    # The standby logs this once it holds the new daemon: only then may it die again.
    _wait(lambda: f"daemon {new} serves" in (state / "standby.log").read_text(errors="replace"),
          f"the standby to keep daemon {new}")
    return {"first_read_seconds": first_read}


def _measured_window(mnt: Path, device: str, plan: Plan) -> dict[str, Any]:
    """The zipf read for the takeover window, and the content cache's hit rate over it."""
    window = dataclasses.replace(plan, region=TAKEOVER_REGION, runtime=plan.takeover_window)
    before = _content_stats(mnt)
    first_second: dict[str, Any] = {}

    def sample() -> None:  # the cache's figures one second into the window
        first_second.update(_content_stats(mnt))

    sampler = threading.Timer(1.0, sample)
    sampler.start()
    try:
        figures = run_fio(TAKEOVER_JOB, device, window, "dedupe-0")
    finally:
        sampler.cancel()
        sampler.join()
    after = _content_stats(mnt)
    return {**figures, "hit_rate": _hit_rate(before, after),
            "hit_rate_first_second": _hit_rate(before, first_second or after),
            "cache_used_bytes": after.get("used_bytes", 0)}


def _hit_rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    hits = after.get("hits", 0) - before.get("hits", 0)
    looked_up = hits + after.get("misses", 0) - before.get("misses", 0)
    return hits / looked_up if looked_up else 0.0


def takeover_rows(plan: Plan) -> list[dict[str, Any]]:
    """Reads right after a takeover, the new cache warmed by the planner or cold.

    One mount kept by a standby: fill, prime the cache, then kill the daemon
    and remove its manifest (cold), read for the window; read for the window
    again with no kill (steady); kill with the manifest in place (warm), read
    for the window.
    """
    if not plan.takeover:
        return []
    region_plan = dataclasses.replace(plan, region=TAKEOVER_REGION)
    rows: list[dict[str, Any]] = []
    try:
        with swapfs_kept_file(TAKEOVER_REGION, _takeover_config()) as (mnt, path, state), \
                loop_device(path) as device:
            run_fio("fill-1m", device, region_plan, "dedupe-0")
            run_fio(TAKEOVER_JOB, device, region_plan, "dedupe-0")  # prime the cache
            for case in ("cold", "steady", "warm"):
                row: dict[str, Any] = {"case": case}
                if case != "steady":
                    _wait_for_manifest(state, time.time())
                    row.update(_kill_and_take_over(mnt, state, device, cold=case == "cold"))
                row.update(_measured_window(mnt, device, plan))
                if case != "steady":
                    last = _status(mnt)["last_takeover"] or {}
                    row.update({"takeover_seconds": last.get("seconds"),
                                "strategy": last.get("strategy"),
                                "manifest_blocks": last.get("manifest_blocks", 0),
                                "warmed_bytes": last.get("warmed_bytes", 0)})
                if case == "cold" and row["manifest_blocks"]:
                    progress("note: the new daemon read the manifest before it was removed: "
                             "the cold row is not cold")
                rows.append(row)
                progress(f"takeover {case}: {row['mbps']:.1f} MB/s, hit rate "
                         f"{row['hit_rate']:.1%}, warmed {row.get('warmed_bytes', 0) / MIB:.1f}"
                         f" MiB, first read after {row.get('first_read_seconds', 0):.2f} s")
    except Unavailable as exc:
        return [{"unavailable": str(exc)}]
    cold = next(row for row in rows if row["case"] == "cold")
    steady = next(row for row in rows if row["case"] == "steady")
    for row in rows:
        row["vs_cold"] = row["mbps"] / cold["mbps"] if cold["mbps"] else None
        row["vs_steady"] = row["mbps"] / steady["mbps"] if steady["mbps"] else None
    return rows


# -- the targets ---------------------------------------------------------------------


# -- scale: open, takeover and memory by size stored ---------------------------------


def scale_rows(plan: Plan) -> list[dict[str, Any]]:
    """tools/scale.py's rows for the sizes of ``--scale`` (none without it)."""
    if not plan.scale:
        return []
    progress(f"scale: {', '.join(f'{size / (1 << 30):g}' for size in plan.scale)} GiB stored")
    try:
        rows: list[dict[str, Any]] = run_scale(plan.scale, None)["rows"]
    except Refused as exc:
        return [{"unavailable": str(exc)}]
    return rows


def goal_rows(fio: list[dict[str, Any]], e2e: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of the issue's targets with every swapfs target's figure, met or not."""
    ceiling_key = CEILINGS[TARGET_CEILING]
    rows: list[dict[str, Any]] = []
    for what, key, goal in GOALS:
        measured: dict[str, dict[str, Any]] = {}
        for target in SWAPFS_TARGETS:
            if key in JOBS:
                figure = next((row.get(ceiling_key) for row in fio if row["target"] == target
                               and row["job"] == key and row["data"] == TARGET_DATA), None)
            else:
                figure = next((row.get(key) for row in e2e if row["target"] == target), None)
            if figure is not None:
                measured[target] = {"ratio": figure, "met": figure >= goal}
        rows.append({"what": what, "key": key, "goal": goal,
                     "against": TARGET_CEILING if key in JOBS else "root-disk",
                     "measured": measured})
    return rows


def encryption_rows(fio: list[dict[str, Any]], e2e: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """Throughput encrypted ("swapfs") against unencrypted, measured in the
    same run: each fio job and data kind, then swap-out and swap-in."""
    rows: list[dict[str, Any]] = []
    plain = {(row["job"], row["data"]): row for row in fio
             if row["target"] == "swapfs-unencrypted" and "mbps" in row}
    for row in fio:
        base = plain.get((row["job"], row["data"]))
        if row["target"] == "swapfs" and "mbps" in row and base and base["mbps"]:
            rows.append({"what": f"fio {row['job']} {row['data']}", "encrypted": row["mbps"],
                         "unencrypted": base["mbps"], "ratio": row["mbps"] / base["mbps"]})
    runs = {row["target"]: row for row in e2e if "swap_out_mbps" in row}
    if "swapfs" in runs and "swapfs-unencrypted" in runs:
        for key, what in (("swap_out_mbps", "swap-out"), ("swap_in_mbps", "swap-in")):
            base = runs["swapfs-unencrypted"][key]
            rows.append({"what": f"end-to-end {what}", "encrypted": runs["swapfs"][key],
                         "unencrypted": base,
                         "ratio": runs["swapfs"][key] / base if base else None})
    for row in rows:
        row["met"] = row["ratio"] is not None and row["ratio"] >= ENCRYPTION_GOAL
    return rows


# -- output --------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", f"Run: {results['started']}, "
             f"{results['plan']['runtime']} s per fio run, median of "
             f"{results['plan']['repeats']}"]
    for target, mount in results.get("state_fs", {}).items():
        lines.append(f"State directory of {target}: {mount}")
    if results["fio"]:  # none with --no-fio or --fill-only
        lines += ["", "| target | job | data | IOPS | MB/s | p50 µs | p99 µs | vs stock pyfuse3 "
                  "| vs patched pyfuse3 | vs kernel |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += _rows(results["fio"], 10, lambda row: (
        f"| {row['target']} | {row['job']} | {row['data']} | {row['iops']:.0f} | "
        f"{row['mbps']:.1f} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | "
        + " | ".join(_ratio(row.get(key)) for key in CEILINGS.values()) + " |"),
        named=("target", "job", "data"))
    if results["space"]:
        lines += ["", "Space (swapfs, after one full write of the region):", "",
                  "| data | logical MiB | stored MiB | ideal MiB | stored / ideal "
                  "| index MiB | index bytes per stored block |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in results["space"]:
            per_block = row["metadata_per_stored_block"]
            lines.append(
                f"| {row['data']} | {row['logical_bytes'] / MIB:.1f} | "
                f"{row['stored_bytes'] / MIB:.1f} | {row['ideal_bytes'] / MIB:.1f} | "
                f"{row['stored_vs_ideal']:.3f} | {row['metadata_bytes'] / MIB:.2f} | "
                f"{per_block:.1f} |" if per_block is not None else
                f"| {row['data']} | {row['logical_bytes'] / MIB:.1f} | 0 | 0 | - | "
                f"{row['metadata_bytes'] / MIB:.2f} | - |")
    lines += _index_markdown(results)
    if results["e2e"]:
        plan = results["plan"]
        lines += ["", f"End to end: {plan['e2e_workers']} workers each build the same "
                  f"{plan['e2e_table_mib']} MiB table under a {plan['e2e_limit_mib']} MiB "
                  "memory cgroup, then verify it:", "",
                  "| swap target | swap-out MB/s | swap-in MB/s | vs root disk (out / in) "
                  "| peak swap used MiB | stored MiB | daemon CPU s per GiB swapped |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["e2e"], 7, lambda row: (
                f"| {row['target']} | {row['swap_out_mbps']:.0f} | {row['swap_in_mbps']:.0f} "
                f"| {_ratio(row.get('out_vs_root_disk'))} / "
                f"{_ratio(row.get('in_vs_root_disk'))} | "
                f"{row['peak_swap_used_bytes'] / MIB:.0f} | {row['stored_bytes'] / MIB:.0f} | "
                + (f"{row['daemon_cpu_s_per_gib']:.1f} |" if "daemon_cpu_s_per_gib" in row
                   else "- |")),
            named=("target",))
    if results.get("guests"):
        plan = results["plan"]
        lines += ["", f"Guests: {plan['guests']} QEMU guests (TCG, "
                  f"{plan['guest_memory_mib']} MiB of RAM each) swap at once to a disk each, "
                  f"each building {plan['guest_shared_mib']} MiB of pages they share and "
                  f"{plan['guest_own_mib']} MiB of its own, paging all of it out and "
                  "checking every page (tools/vmswap.py); MB/s inside the guests, summed:", "",
                  "| disks | failed | swap-out MB/s | swap-in MB/s | vs root disk (out / in) "
                  "| swapped out MiB | stored MiB | ideal MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["guests"], 8, lambda row: (
                f"| {row['target']} | {row['failed']} | {row['swap_out_mbps']:.1f} | "
                f"{row['swap_in_mbps']:.1f} | {_ratio(row.get('out_vs_root_disk'))} / "
                f"{_ratio(row.get('in_vs_root_disk'))} | "
                f"{row['swapped_out_bytes'] / MIB:.0f} | "
                + ("-" if row["stored_bytes"] is None else f"{row['stored_bytes'] / MIB:.0f}")
                + f" | {row['ideal_bytes'] / MIB:.0f} |"),
            named=("target",))
    if results.get("pool"):
        lines += ["", f"Transient cache: zipf 1.2 4 KiB random read of a "
                  f"{POOL_REGION // MIB} MiB swapfs file, the pool off and on. The pool's "
                  "size comes from a synthetic driver report; this host's code pages give "
                  f"{results['pool'][0].get('host_code_page_bytes', 0) / 1024:.0f} KiB:", "",
                  "| pool MiB | IOPS | MB/s | p50 µs | p99 µs | hit rate | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["pool"], 7, lambda row: (
                f"| {row['pool_bytes'] / MIB:.0f} | {row['iops']:.0f} | {row['mbps']:.1f} | "
                f"{row['p50_us']:.0f} | {row['p99_us']:.0f} | {row['hit_rate']:.1%} | "
                f"{_ratio(row['speedup'])} |"))
    if results.get("content"):
        lines += ["", f"Content cache: 4 KiB random reads of a {results['plan']['region'] // MIB}"
                  " MiB swapfs file, the content cache off (0) and on:", "",
                  "| job | cache MiB | IOPS | MB/s | p50 µs | p99 µs | hit rate | vs off |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["content"], 8, lambda row: (
                f"| {row['job']} | {row['cache_bytes'] / MIB:.0f} | {row['iops']:.0f} | "
                f"{row['mbps']:.1f} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | "
                f"{row['hit_rate']:.1%} | {_ratio(row['vs_off'])} |"))
    if results.get("takeover"):
        lines += ["", "Takeover: zipf 1.2 4 KiB random read (one fixed sequence) of a "
                  f"{TAKEOVER_REGION // MIB} MiB "
                  f"swapfs file for the {results['plan']['takeover_window']} s after the daemon "
                  "was killed and a standby's new daemon answered, its content cache "
                  f"({TAKEOVER_CACHE // MIB} MiB) warmed by the planner from the dead daemon's "
                  "manifest (warm) or started empty (cold); steady: no kill:", "",
                  "| case | IOPS | MB/s | p50 µs | p99 µs | hit rate | hit rate, 1st s "
                  "| warmed MiB | takeover s | first read s | vs cold | vs steady |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["takeover"], 12, _takeover_row)
    if results.get("scale"):
        lines += ["", "Scale: a state of unique blocks built through the engine, remounted "
                  "(umount + mount), then killed five times under a standby (kill -> a "
                  "probe's O_DIRECT read answered); the daemon's memory after the remount, "
                  "and once its background scan of the slot tables is done (own: RssAnon, "
                  "without the index pages it maps), and a few seconds later, once it has "
                  "taken the index pages it read out of its page tables (settled):", "",
                  "| GiB stored | build s | remount s | takeover median ms | takeover worst ms "
                  "| RSS MiB | scan s | RSS scanned MiB | own MiB | own MiB per GiB "
                  "| RSS settled MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _rows(results["scale"], 11, lambda row: (
                f"| {row['size_gib']:g} | {row['build_seconds']:.1f} | "
                f"{row['remount_seconds']:.2f} | {row['takeover_median_ms']:.0f} | "
                f"{row['takeover_worst_ms']:.0f} | {row['rss_mib']:.0f} | "
                f"{row['scan_seconds']:.1f} | {row['rss_scanned_mib']:.0f} | "
                f"{row['anon_scanned_mib']:.0f} | {row['anon_scanned_mib_per_gib']:.1f} | "
                f"{row['rss_settled_mib']:.0f} |"))
    if results.get("encryption"):
        lines += ["", "Encryption at rest: swapfs (encrypted) against swapfs-unencrypted, "
                  f"MB/s, in this run (goal >= {ENCRYPTION_GOAL}x):", "",
                  "| what | encrypted | unencrypted | ratio |", "|---|---:|---:|---:|"]
        for row in results["encryption"]:
            lines.append(f"| {row['what']} | {row['encrypted']:.1f} | "
                         f"{row['unencrypted']:.1f} | {_ratio(row['ratio'])} "
                         f"{'met' if row['met'] else 'not met'} |")
    lines += _goals_markdown(results.get("goals", []))
    return "\n".join(lines) + "\n"


def _rows(rows: list[dict[str, Any]], columns: int, render: Callable[[dict[str, Any]], str],
          named: tuple[str, ...] = ()) -> list[str]:
    """A table's lines, one a row: *render*'s, or for a row that could not
    be measured the values of its *named* keys, then the reason, then empty
    cells up to *columns*."""
    lines = []
    for row in rows:
        if "unavailable" in row:
            cells = [*(str(row[key]) for key in named), f"unavailable: {row['unavailable']}"]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (columns - len(cells)))
        else:
            lines.append(render(row))
    return lines


def _takeover_row(row: dict[str, Any]) -> str:
    """One row of the takeover table: a case after a kill (warm or cold), or steady."""
    warmed, takeover, first = (row.get(key) for key in (
        "warmed_bytes", "takeover_seconds", "first_read_seconds"))
    return (
        f"| {row['case']} | {row['iops']:.0f} | {row['mbps']:.1f} | "
        f"{row['p50_us']:.0f} | {row['p99_us']:.0f} | {row['hit_rate']:.1%} | "
        f"{row['hit_rate_first_second']:.1%} | "
        f"{'-' if warmed is None else f'{warmed / MIB:.1f}'} | "
        f"{'-' if takeover is None else f'{takeover:.2f}'} | "
        f"{'-' if first is None else f'{first:.2f}'} | "
        f"{_ratio(row['vs_cold'])} | {_ratio(row['vs_steady'])} |")


def _index_markdown(results: dict[str, Any]) -> list[str]:
    """The index size table: what the fills of the space table cost in the index."""
    rows = [row for row in results["space"] if "maps_bytes" in row]
    if not rows:
        return []
    lines = ["", f"Index size (swapfs, index format {results['index_format']}, after the same "
             "fills): the files' maps per logical block mapped, the other databases (and "
             "LMDB's main one) per block stored, and the whole index, pages that no database "
             "holds (unused: freed by a commit, for later ones to reuse) included:", "",
             "| data | logical blocks | stored blocks | maps bytes per logical block "
             "| other bytes per stored block | index bytes | by database, KiB |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        maps, other = row["maps_per_logical_block"], row["other_per_stored_block"]
        trees = sorted(row["databases"].items(), key=lambda item: -item[1])
        parts = [f"{name} {used / 1024:.0f}" for name, used in trees if used]
        parts += [f"main {row['main_bytes'] / 1024:.0f}",
                  f"unused {row['unused_bytes'] / 1024:.0f}"]
        lines.append(
            f"| {row['data']} | {row['logical_blocks']} | {row['stored_blocks']} | "
            f"{'-' if maps is None else f'{maps:.1f}'} | "
            f"{'-' if other is None else f'{other:.1f}'} | {row['metadata_bytes']} | "
            + ", ".join(parts) + " |")
    return lines


def _goals_markdown(goals: list[dict[str, Any]]) -> list[str]:
    targets = [target for target in SWAPFS_TARGETS
               if any(target in row["measured"] for row in goals)]
    if not targets:
        return []
    lines = ["", f"Against the targets: fio at {TARGET_DATA}, IOPS against {TARGET_CEILING}; "
             "end to end, MB/s against a swap file on the root disk:", "",
             "| target | goal | " + " | ".join(targets) + " |",
             "|---|---:|" + "---:|" * len(targets)]
    for row in goals:
        cells = []
        for target in targets:
            figure = row["measured"].get(target)
            cells.append("-" if figure is None else
                         f"{_ratio(figure['ratio'])} {'met' if figure['met'] else 'not met'}")
        lines.append(f"| {row['what']} | >= {row['goal']:.1f}x | " + " | ".join(cells) + " |")
    return lines


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fio = [row for row in results["fio"] if "mbps" in row]
    targets = list(dict.fromkeys(row["target"] for row in fio))
    data_kinds = list(dict.fromkeys(row["data"] for row in fio))
    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    width = 0.8 / max(1, len(targets))
    for axis, job in zip(axes.flat, JOBS, strict=False):
        for number, target in enumerate(targets):
            values = [next((row["mbps"] for row in fio if row["target"] == target
                            and row["job"] == job and row["data"] == data), 0)
                      for data in data_kinds]
            axis.bar([x + number * width for x in range(len(data_kinds))], values, width,
                     label=target)
        axis.set_title(job)
        axis.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(data_kinds))])
        axis.set_xticklabels(data_kinds)
        axis.set_ylabel("MB/s")
        axis.set_yscale("log")
    if targets:
        axes.flat[0].legend(fontsize="small")
    e2e = [row for row in results["e2e"] if "swap_out_mbps" in row]
    for axis, key, title in ((axes.flat[4], "swap_out_mbps", "end to end: swap-out"),
                             (axes.flat[5], "swap_in_mbps", "end to end: swap-in")):
        axis.bar([row["target"] for row in e2e], [row[key] for row in e2e])
        axis.set_title(title)
        axis.set_ylabel("MB/s")
    figure.suptitle(f"swapfs bench, {results['machine']}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    return f"{os.cpu_count()} cores ({cpu}), {memory} GiB, Linux {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swapfs bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the core rows, a few minutes")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output directory")
    parser.add_argument("--runtime", type=int, help="seconds per fio run")
    parser.add_argument("--targets", help="comma-separated targets "
                        f"({', '.join(FIO_TARGETS)}); those that swap run end to end too")
    parser.add_argument("--data", help="comma-separated data sets "
                        f"({', '.join(DATA)}; --quick: dedupe-50)")
    parser.add_argument("--fill-only", action="store_true",
                        help="fill each target with each data set and run no fio job: "
                        "with --targets swapfs, the space and index size rows alone")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end swap runs")
    parser.add_argument("--no-pool", action="store_true",
                        help="skip the transient cache rows")
    parser.add_argument("--no-content", action="store_true",
                        help="skip the content cache rows")
    parser.add_argument("--no-takeover", action="store_true",
                        help="skip the takeover rows (warm cache against cold)")
    parser.add_argument("--takeover-window", type=int,
                        help="seconds read after each takeover (default 10)")
    parser.add_argument("--no-guests", action="store_true",
                        help="skip the guests' rows (QEMU guests swapping to a chain)")
    parser.add_argument("--no-fio", action="store_true",
                        help="skip the fio matrix (the targets against the ceilings)")
    parser.add_argument("--scale", metavar="GIB",
                        help="also the scale rows at these GiB stored, e.g. 1,4,16 "
                        "(tools/scale.py; off by default)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.runtime:
        plan.runtime = args.runtime
    if args.targets:
        plan.targets = [name for name in args.targets.split(",") if name]
        unknown = set(plan.targets) - set(FIO_TARGETS)
        if unknown:
            parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
        plan.e2e_targets = [name for name in plan.e2e_targets if name in plan.targets]
    if args.data:
        plan.data = [name for name in args.data.split(",") if name]
        unknown = set(plan.data) - set(DATA)
        if unknown:
            parser.error(f"unknown data sets: {', '.join(sorted(unknown))}")
    if args.fill_only:
        plan.jobs = []
    if args.no_e2e:
        plan.e2e_targets = []
    if args.no_pool:
        plan.pool = False
    if args.no_content:
        plan.content = False
    if args.no_fio:
        plan.targets = []
    if args.no_guests:
        plan.guests = 0
    if args.no_takeover:
        plan.takeover = False
    if args.takeover_window:
        plan.takeover_window = args.takeover_window
    if args.scale:
        plan.scale = sizes(args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if Path("/proc/swaps").read_text().splitlines()[1:]:
        progress("note: other swap areas are active; the targets run at the highest priority")
    state_fs: dict[str, str] = {}
    fio_rows, space = fio_matrix(plan, state_fs)
    e2e = e2e_rows(plan, state_fs)
    guests = guest_rows(plan)
    pool = pool_rows(plan)
    content = content_rows(plan)
    takeover = takeover_rows(plan)
    scale = scale_rows(plan)
    results = {"machine": machine(), "started": started, "plan": asdict(plan),
               "index_format": FORMAT_VERSION,
               "state_fs": state_fs, "fio": fio_rows, "space": space, "e2e": e2e,
               "guests": guests, "pool": pool, "content": content, "takeover": takeover,
               "scale": scale,
               "goals": goal_rows(fio_rows, e2e), "encryption": encryption_rows(fio_rows, e2e)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    chart(results, args.out / "results.png")
    print(table)
    progress(f"wrote {args.out}/results.json, results.md and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
