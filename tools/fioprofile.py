#!/usr/bin/env python3
"""Where a FUSE daemon's time goes, per request: a fio job sampled with py-spy.

    tools/fioprofile.py randwrite-4k randread-4k                  # swapfs, dedupe 50
    tools/fioprofile.py randread-4k --target python-fuse-patched  # memfs, to compare
    tools/fioprofile.py seqwrite-1m --target swapfs-nodiscard --raw /tmp/stacks

Sets up a target of ``swapfs bench`` (a file behind a loop device with
direct I/O), fills it once with fio's fill-1m job, then runs each fio job
of tools/fio three times for --runtime seconds:

1. alone: IOPS, and the CPU time of the daemon's main thread (the one that
   serves FUSE; /proc/PID/task/PID/stat) over the run;
2. sampled by ``py-spy record --native --idle``: where the main thread's
   wall clock goes, parked time included;
3. sampled by ``py-spy record --native``: where its CPU time goes (py-spy
   leaves out the samples in which the thread sleeps).

py-spy stops the daemon for each sample (it must, for ``--native``), so
IOPS under sampling is lower; only the shares come from the sampled runs.
Each sample of the main thread falls in the first category of CATEGORIES
that one of its frames matches (below: add one there), else in the last
(pyfuse3 and trio in Python).

The table, in µs per request:

- whole request: iodepth / IOPS, the mean time a request is in flight
  (Little's law: iodepth requests are always in flight); it includes the
  loop device, the kernel's FUSE queue and the wait behind other requests;
- the daemon: 1 / IOPS of wall clock (one thread serves every request, so
  each request has that much of it), CPU seconds of the main thread
  divided by the requests fio completed;
- each category: its share of the samples of run 2 times 1 / IOPS (wall),
  its share of the samples of run 3 times the daemon's CPU per request.

Needs root, fio and py-spy (the ``bench`` extra). Hold the bench lock
(``flock /tmp/swapfs-bench.lock``) like any measurement.
"""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench import DATA, FIO_DIR, QUICK, Plan, fio_report, fio_side  # noqa: E402
from tools.benchtargets import FIO_TARGETS, MIB, cpu_seconds  # noqa: E402


@dataclass(frozen=True)
class Category:
    group: str  # a row of the table
    part: str  # a row under it, when the group has several parts
    patterns: tuple[str, ...]  # regular expressions, searched in each frame


FUSE_LOOP = "FUSE loop between handlers"

#: Where a sample goes: the first category one of whose patterns is found in
#: one of the sample's frames, else the last. A frame reads "function
#: (file:line)" ("Journal.append (swapfs/engine/journal.py:150)", "writev
#: (libc.so.6)"); a function of a compiled module shows without its class
#: ("commit (swapfs/engine/index.py:880)"), a method declared in a ``.pxd``
#: by its C name ("SlotTable_claim"). Only the frames below trio's ``run``
#: count, so that the daemon's own start-up frames (mountd/main.py, ...)
#: match nothing. Order matters: a commit inside a handler is the
#: commit's, not the handler's.
_ENGINE = r"\(swapfs/engine/"
CATEGORIES = [
    Category("hole punch (store.punch, fallocate)", "", (r"^(BlockStore\.)?punch ",
                                                         r"^punch_hole ")),
    Category("commit: journal append, LMDB commit of a batch", "", (
        r"^(Txn\.)?(commit|__exit__) " + _ENGINE + r"index\.py", r"^Journal\.",
        r"^mdb_txn_commit")),
    Category("content and transient caches", "", (r"\(swapfs/cache/",)),
    Category("digest, seal and open, data read/write", "", (
        r"^block_digest ", r"^is_zero ", r"^_verify ", r"blake3", r"^ChainKeys\.",
        r"^(BlockStore\.)?(write_many|_write_run|read_many|write_seals|read_seals) ")),
    Category("slot table, dedup table, file maps and their index puts", "", (
        _ENGINE + r"(slottable|deduptable|filemap)\.py", r"^SlotTable_", r"^DedupTable_",
        r"^(Txn\.)?(get|put|delete)_\w+ " + _ENGINE + r"index\.py",
        r"^(save|finish) " + _ENGINE)),
    Category("other Python (inode and chain lookups, begin, glue)", "",
             (r"\(swapfs/", r"\(mountd/operations\.py:", r"^MemFS\.")),
    Category("daemon tasks (control socket, cache manifest, lease)", "", (r"\(mountd/",)),
    Category(FUSE_LOOP, "reply: writev to /dev/fuse (and the kernel completing the I/O)",
             (r"^writev ",)),
    Category(FUSE_LOOP, "next request: read from /dev/fuse", (r"^read ",)),
    Category(FUSE_LOOP, "epoll: wait (parked time too) and register", (r"^epoll_",)),
    Category(FUSE_LOOP, "pyfuse3's session loop and trio's scheduling, in Python", ()),
]
_PATTERNS = [(category, [re.compile(pattern) for pattern in category.patterns])
             for category in CATEGORIES]
LOOP_ROOT = "run (trio/_core/_run.py:"  # trio.run: the frames below it are the loop's

WARMUP = 1  # seconds of each fio run before py-spy starts, and after it stops
# py-spy from the bench extra, next to this interpreter, else from PATH.
_BESIDE = Path(sys.executable).parent / "py-spy"
PY_SPY = str(_BESIDE) if _BESIDE.exists() else "py-spy"


def classify(frames: list[str]) -> Category:
    """The category of one sample, given its frames from the root down."""
    below = next((frames[n + 1:] for n, frame in enumerate(frames)
                  if frame.startswith(LOOP_ROOT)), frames)
    for category, patterns in _PATTERNS:
        if any(pattern.search(frame) for frame in below for pattern in patterns):
            return category
    return CATEGORIES[-1]


def tally(raw: str, tid: int) -> tuple[Counter[Category], dict[Category, Counter[str]]]:
    """Samples per category in py-spy's raw output (``--threads``), of thread
    *tid* only, and per category the samples of each leaf frame."""
    counts: Counter[Category] = Counter()
    leaves: dict[Category, Counter[str]] = {category: Counter() for category in CATEGORIES}
    prefix = f"thread ({tid})"
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[0].startswith(prefix):
            category = classify(frames[1:])
            counts[category] += int(count)
            leaves[category][frames[-1]] += int(count)
    return counts, leaves


def sample(pid: int, seconds: int, rate: int, idle: bool, out: Path) -> None:
    """py-spy record of *pid* for *seconds*, folded stacks per thread into *out*."""
    command = [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
               "--duration", str(seconds), "--rate", str(rate), "--native", "--threads"]
    result = subprocess.run(command + (["--idle"] if idle else []),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"py-spy: {result.stderr.strip()}")


def sampled_fio(job: str, device: str, plan: Plan, data: str, pid: int, rate: int, idle: bool,
                out: Path) -> dict[str, Any]:
    """fio's report of one run of *job*, sampled by py-spy from WARMUP seconds in."""
    failure: list[BaseException] = []

    def record() -> None:
        time.sleep(WARMUP)
        try:
            sample(pid, plan.runtime - 2 * WARMUP, rate, idle, out)
        except BaseException as exc:  # raised again in the caller's thread
            failure.append(exc)

    spy = threading.Thread(target=record)
    spy.start()
    try:
        report = fio_report(job, device, plan, data)
    finally:
        spy.join()
    if failure:
        raise failure[0]
    return report


def profile_job(job: str, device: str, pid: int, plan: Plan, data: str, rate: int,
                raw_dir: Path) -> dict[str, Any]:
    """The three runs of *job* and what they give per request."""
    cpu_before = cpu_seconds(pid, main_thread=True)
    report = fio_report(job, device, plan, data)
    cpu = cpu_seconds(pid, main_thread=True) - cpu_before
    figures = fio_side(job, report)
    iodepth = int(report["global options"]["iodepth"])
    requests = figures["total_ios"]
    tallies = []
    sampled_iops = []
    for idle in (True, False):
        out = raw_dir / f"{job}-{'wall' if idle else 'cpu'}.txt"
        sampled = sampled_fio(job, device, plan, data, pid, rate, idle, out)
        sampled_iops.append(fio_side(job, sampled)["iops"])
        tallies.append(tally(out.read_text(), pid))
    (wall_counts, _), (cpu_counts, cpu_leaves) = tallies
    if not wall_counts or not cpu_counts:
        raise RuntimeError(f"py-spy recorded no samples of thread {pid} (see {raw_dir})")
    daemon_wall = 1e6 / figures["iops"]
    daemon_cpu = cpu * 1e6 / requests
    wall_total, cpu_total = sum(wall_counts.values()), sum(cpu_counts.values())
    return {
        "job": job, "iops": figures["iops"], "iodepth": iodepth, "requests": requests,
        "fio_mean_latency_us": figures["lat_ns"]["mean"] / 1000,
        "sampled_iops": sampled_iops, "samples": [wall_total, cpu_total],
        "whole_request_us": iodepth * 1e6 / figures["iops"],
        "daemon_wall_us": daemon_wall, "daemon_cpu_us": daemon_cpu,
        "categories": [{"group": category.group, "part": category.part,
                        "wall_us": daemon_wall * wall_counts[category] / wall_total,
                        "cpu_us": daemon_cpu * cpu_counts[category] / cpu_total,
                        "wall_share": wall_counts[category] / wall_total,
                        "cpu_leaves": cpu_leaves[category].most_common(5)}
                       for category in CATEGORIES],
    }


def table(target: str, data: str, row: dict[str, Any], leaves: int) -> str:
    """The per-request table of one job; with *leaves*, each row's most
    sampled leaf frames (of the CPU run) under it."""
    lines = [
        f"{row['job']} on {target}, {data}, iodepth {row['iodepth']}: {row['iops']:.0f} IOPS "
        f"({' and '.join(f'{iops:.0f}' for iops in row['sampled_iops'])} while sampled), "
        f"fio's mean latency {row['fio_mean_latency_us']:.0f} µs; "
        f"{row['samples'][0]} samples with idle, {row['samples'][1]} without", "",
        "| µs per request | wall | daemon CPU | share of wall |", "|---|---:|---:|---:|",
        f"| whole request in flight (iodepth / IOPS) | {row['whole_request_us']:.1f} | | |",
        f"| the daemon (1 / IOPS; CPU / requests) | {row['daemon_wall_us']:.1f} | "
        f"{row['daemon_cpu_us']:.1f} | 100% |"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for category in row["categories"]:
        groups.setdefault(category["group"], []).append(category)
    for group, parts in groups.items():
        rows = [(f"- {group}", parts)]
        if len(parts) > 1:
            rows += [(f"  - {part['part']}", [part]) for part in parts]
        for name, members in rows:
            wall, cpu, share = (sum(member[key] for member in members)
                                for key in ("wall_us", "cpu_us", "wall_share"))
            lines.append(f"| {name} | {wall:.1f} | {cpu:.1f} | {share:.0%} |")
            if leaves and len(members) == 1:
                lines += [f"|     {frame} | | {count} samples | |"
                          for frame, count in members[0]["cpu_leaves"][:leaves]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = sorted(path.stem for path in FIO_DIR.glob("*.fio") if path.stem != "fill-1m")
    parser.add_argument("jobs", nargs="+", choices=jobs, metavar="JOB",
                        help=f"fio jobs of tools/fio ({', '.join(jobs)})")
    daemons = [name for name in FIO_TARGETS if "swapfs" in name or "python-fuse" in name]
    parser.add_argument("--target", default="swapfs", choices=daemons)
    parser.add_argument("--data", default="dedupe-50", choices=list(DATA),
                        help="fio's data for the fill and the jobs (default dedupe-50)")
    parser.add_argument("--runtime", type=int, default=8,
                        help="seconds per fio run, three runs per job (default 8)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--region", type=int, default=256, help="MiB of the target's file")
    parser.add_argument("--raw", type=Path,
                        help="keep py-spy's folded stacks in this directory")
    parser.add_argument("--leaves", type=int, default=0, metavar="N",
                        help="under each row, its N most sampled leaf frames (CPU run)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.runtime < 2 * WARMUP + 1:
        parser.error(f"--runtime must be at least {2 * WARMUP + 1}")
    plan = dataclasses.replace(QUICK, runtime=args.runtime, region=args.region * MIB)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swapfs-profile-") as scratch:
        raw_dir = args.raw or Path(scratch)
        raw_dir.mkdir(parents=True, exist_ok=True)
        with FIO_TARGETS[args.target](plan.region) as device:
            assert device.pid is not None
            fio_report("fill-1m", device.path, plan, args.data)
            for job in args.jobs:
                print(f"profiling {job} on {args.target} ({3 * args.runtime} s)",
                      file=sys.stderr, flush=True)
                rows.append(profile_job(job, device.path, device.pid, plan, args.data,
                                        args.rate, raw_dir))
    if args.json:
        print(json.dumps({"target": args.target, "data": args.data, "jobs": rows}, indent=2))
    else:
        print("\n".join(table(args.target, args.data, row, args.leaves) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
