#!/usr/bin/env python3
"""The swapfs demo: a clone chain, then real kernel swap under memory pressure.

1. It mounts swapfs on a temporary state directory, encrypted at rest with
   a master key made for the demo, writes a parent's swap
   file, clones it into VMs (instantly: no data is copied), lets each VM
   diverge a little, and shows what the chain stores.
2. It puts a swap file of the chain into service (loop device, mkswap,
   swapon) and runs four workers that each build the same 128 MiB table,
   as clones booted from one image do, in a memory cgroup limited to
   192 MiB: the kernel swaps most of it to swapfs. Every byte is verified
   after it is swapped back in.
3. A standby keeps the mount (``swapfs standby``) and the workload runs
   again while the daemon is killed with SIGKILL, twice while the workers
   swap out and twice while they swap in: each time the standby starts a
   new daemon on the same connection, the workers carry on and verify
   every byte, and the demo prints how long each takeover took.
4. Three QEMU guests (tools/vmswap.py: Debian's kernel under TCG) swap at
   once to virtio disks that are a parent's swap file on the mount and two
   clones of it; each builds pages the three share and pages of its own,
   more than its RAM, pages all of it out and checks every page it reads
   back; the chain stores the shared pages once.
5. It runs the same workload against a plain swap file on the root disk,
   and prints both side by side.

Everything it sets up (swap areas, loop devices, the mount, the cgroup) is
undone on the way out, on failure and Ctrl-C too. Run it with ``make demo``.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapfs.control import protocol  # noqa: E402
from tools import vmswap  # noqa: E402
from tools.guest import missing as guest_lacks  # noqa: E402
from tools.swapload import (  # noqa: E402
    MIB,
    MemoryCgroup,
    WorkloadResult,
    peak_figures,
    plain_swap_file,
    run_workload,
)
from tools.takeover import Killer, Probe, Takeover, summary  # noqa: E402

PAGE = 4096
SWAPFS = [sys.executable, "-m", "swapfs.cli"]


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def swapfs(*args: str) -> str:
    result = subprocess.run([*SWAPFS, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"swapfs {args[0]}: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def mounted(state: Path, mnt: Path, key: Path) -> Iterator[Path]:
    swapfs("mount", "--state", str(state), "--key-file", str(key), str(mnt))
    try:
        yield mnt
    finally:
        step("unmounting")
        try:
            swapfs("umount", str(mnt))
        except RuntimeError:
            if not serving(protocol.socket_of(str(mnt)), timeout=1):
                # Its daemon is dead and nobody took over: detach the dead mount.
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            raise


def chain_stats(mnt: Path, chain: str) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(swapfs("stats", "--json", str(mnt)))["chains"][chain]
    return stats


def settled_stats(mnt: Path, chain: str, timeout: float = 10.0) -> dict[str, Any]:
    """The chain's figures once discards stop lowering them (the kernel sends
    them asynchronously after the slots are freed)."""
    deadline = time.monotonic() + timeout
    stats = chain_stats(mnt, chain)
    while time.monotonic() < deadline:
        time.sleep(1)
        latest = chain_stats(mnt, chain)
        if latest["stored_bytes"] == stats["stored_bytes"]:
            return latest
        stats = latest
    return stats


@contextlib.contextmanager
def swap_in_service(path: Path) -> Iterator[str]:
    device = swapfs("swapon", str(path), "--priority", "32767").strip()
    try:
        yield device
    finally:
        swapfs("swapoff", str(path))


def page(seed: str, number: int) -> bytes:
    """A reproducible page; every eighth page of an image is zeros."""
    if number % 8 == 7:
        return bytes(PAGE)
    return hashlib.shake_256(f"{seed}:{number}".encode()).digest(PAGE)


def pages(seed: str, mib: int) -> bytes:
    return b"".join(page(seed, number) for number in range(mib * MIB // PAGE))


def clone_chain(mnt: Path, vms: int) -> None:
    """Part 1: a parent's swap file, instant clones, a little divergence."""
    chain = mnt / "web"
    chain.mkdir()
    parent = chain / "base.swap"
    image = pages("parent", 32)
    with open(parent, "wb") as out:
        out.write(image)
        out.truncate(256 * MIB)
    start = time.perf_counter()
    for number in range(1, vms + 1):
        swapfs("clone", str(parent), str(chain / f"vm{number}.swap"))
    step(f"cloned {vms} VMs from a 32 MiB parent in "
         f"{1000 * (time.perf_counter() - start):.0f} ms (no data copied)")
    shared = pages("libshared", 4)
    for number in range(1, vms + 1):
        with open(chain / f"vm{number}.swap", "r+b") as vm:
            vm.write(pages(f"vm{number}", 2))
            vm.write(shared)
    step(f"each VM swapped out 2 MiB of its own and 4 MiB that all {vms} share")
    for number in range(1, vms + 1):
        expected = bytearray(image)
        expected[:6 * MIB] = pages(f"vm{number}", 2) + shared
        with open(chain / f"vm{number}.swap", "rb") as vm:
            if vm.read(len(image)) != expected:
                raise RuntimeError(f"vm{number}.swap does not read back as written")
    step("every byte of every VM reads back as written")


def swap_run(swap_name: str, workers: int, table_mib: int, limit_mib: int,
             killer: Killer | None = None) -> WorkloadResult:
    with MemoryCgroup("demo", limit_mib * MIB) as cgroup:
        return run_workload(cgroup, workers, table_mib, swap_name,
                            progress=lambda message: print(f"    {message}", flush=True),
                            on_phase=killer.enter_phase if killer else lambda name: None)


def swap_used(device: str) -> int:
    with open("/proc/swaps") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[0] == device:
                return int(fields[3]) * 1024
    return 0


def takeovers_under_swap(mnt: Path, device: str, args: argparse.Namespace) -> list[Takeover]:
    """Part 3: the workload again, with a standby, while the daemon is killed."""
    socket_path = protocol.socket_of(str(mnt))
    started = swapfs("standby", str(mnt)).strip()
    print(f"    {started}", flush=True)
    standby = int(started.split()[2])  # "swapfs: standby PID keeps MNT"
    probe_path = mnt / "web" / "probe"
    probe_path.write_bytes(os.urandom(PAGE))
    with Probe(probe_path) as probe:
        pid = int(protocol.request(socket_path, {"op": "status"})["pid"])
        killer = Killer(socket_path, pid, probe, {"build": 2, "verify": 4}, gap=1.0,
                        ready=lambda: swap_used(device) > 64 * MIB)
        killer.start()
        try:
            swap_run(device, args.workers, args.table_mib, args.limit_mib, killer)
        finally:
            try:
                takeovers = killer.finish()
            finally:
                if not serving(socket_path):
                    # No daemon took over: end the connection the standby keeps,
                    # so that swapoff fails at once instead of waiting forever.
                    os.kill(standby, signal.SIGKILL)
    probe_path.unlink()
    for kill in takeovers:
        print(f"    SIGKILL {kill.number} while the workers {PHASES[kill.phase]}: the probe's "
              f"read answered {1000 * kill.probe_seconds:.0f} ms after the kill; daemon "
              f"{kill.pid} served {1000 * (kill.daemon_seconds or 0):.0f} ms after the "
              f"standby noticed the death", flush=True)
    return takeovers


def serving(socket_path: str, timeout: float = 30.0) -> bool:
    """Does a daemon answer on *socket_path* within *timeout* seconds?"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            protocol.request(socket_path, {"op": "status"}, timeout=5)
            return True
        except protocol.ControlError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


PHASES = {"build": "swapped out", "verify": "swapped in", "": "started"}


def report(name: str, result: WorkloadResult, stored: int | None) -> str:
    stored_text = f"{stored / MIB:9.0f}" if stored is not None else f"{'-':>9}"
    return (f"{name:<24} {result.peak_swap_used_bytes / MIB:10.0f} {stored_text} "
            f"{result.swap_out_mbps:12.0f} {result.swap_in_mbps:11.0f}")


def run(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    state, mnt, key = workdir / "state", workdir / "mnt", workdir / "master.key"
    mnt.mkdir()
    figures: dict[str, Any] = {}
    swapfs("keygen", str(key))
    step(f"mounting swapfs: state {state}, mount point {mnt}, encrypted at rest with "
         f"master key {key}")
    with mounted(state, mnt, key):
        clone_chain(mnt, vms=4)
        print(swapfs("stats", str(mnt)))
        in_clear = [page("parent", 0), page("libshared", 0)]
        found = sum(path.read_bytes().count(known) for known in in_clear
                    for path in (state / "data").iterdir())
        step(f"the state directory holds {found} of those pages in the clear "
             "(encrypted at rest)")
        if found:
            raise RuntimeError("stored pages are on disk unencrypted")

        swap_file = mnt / "web" / "swap0.swap"
        swap_file.touch()
        os.truncate(swap_file, args.swap_mib * MIB)
        with swap_in_service(swap_file) as device:
            step(f"{swap_file.name} is swap on {device}; {args.workers} workers build the "
                 f"same {args.table_mib} MiB table under a {args.limit_mib} MiB cgroup limit")
            before = chain_stats(mnt, "web")
            # The figures peak while the workers run: swap is on with discard,
            # so the kernel frees their slots, and swapfs their blocks, when
            # they exit.
            with peak_figures(lambda: chain_stats(mnt, "web")) as peak:
                result = swap_run(device, args.workers, args.table_mib, args.limit_mib)
            logical = peak["logical_bytes"] - before["logical_bytes"]
            stored = peak["stored_bytes"] - before["stored_bytes"]
            step(f"every byte verified after swap-in; at the peak the swap file mapped "
                 f"{logical / MIB:.0f} MiB and the chain stored {stored / MIB:.0f} MiB more")
            figures["swapfs"] = (result, stored, logical)
            after = settled_stats(mnt, "web")
            step(f"the workers exited and the kernel discarded their swap slots: the chain "
                 f"now stores {(after['stored_bytes'] - before['stored_bytes']) / MIB:.1f} "
                 f"MiB more than before the run")
            if not args.no_takeover:
                step("a standby keeps the mount; the same workload again, and the daemon is "
                     "killed with SIGKILL while the workers swap")
                takeovers = takeovers_under_swap(mnt, device, args)
                step(f"every byte verified through {len(takeovers)} takeovers: "
                     f"{summary(takeovers)}")
                figures["takeovers"] = takeovers
        if not args.no_guests:
            guests(mnt)
    if not args.no_baseline:
        step("the same workload on a plain swap file on the root disk")
        with plain_swap_file(Path("/var/tmp") / f"swapfs-demo-{os.getpid()}.swap",
                             args.swap_mib * MIB) as swap_name:
            baseline = swap_run(swap_name, args.workers, args.table_mib, args.limit_mib)
        figures["root disk"] = (baseline, baseline.peak_swap_used_bytes, None)
    fsck = subprocess.run([*SWAPFS, "fsck", "--state", str(state), "--key-file", str(key)],
                          capture_output=True, text=True)
    step(f"fsck: {fsck.stdout.strip()} (exit {fsck.returncode})")
    if fsck.returncode != 0:
        raise RuntimeError("fsck found problems")
    return figures


def guests(mnt: Path, count: int = 3, shared_mib: int = 160, own_mib: int = 96) -> None:
    """Guests swapping to a parent's swap file and clones of it (tools/vmswap.py)."""
    lacks = guest_lacks()
    if lacks:
        step(f"no guests: a QEMU guest needs {'; '.join(lacks)} (tools/setup.sh installs it)")
        return
    disks = vmswap.chain_disks(mnt, "vms", count, vmswap.disk_bytes(shared_mib, own_mib))
    step(f"{count} QEMU guests of 256 MiB swap at once to {disks[0].name} and "
         f"{count - 1} clones of it, each building {shared_mib} MiB of pages they share "
         f"and {own_mib} MiB of its own")
    reports = vmswap.run_guests(disks, shared_mib, own_mib)
    failed = [report for report in reports if not report.ok]
    if failed:
        raise RuntimeError(f"guest vm{failed[0].vm} failed: {failed[0].error or failed[0].report}")
    figures = vmswap.summary(reports, shared_mib, own_mib, vmswap.stored_bytes(mnt, "vms"))
    step(f"every page of every guest read back as written; they swapped out "
         f"{figures['swapped_out_bytes'] / MIB:.0f} MiB and the chain stores "
         f"{figures['stored_bytes'] / MIB:.0f} MiB: the pages they share once "
         f"(ideal {figures['ideal_bytes'] / MIB:.0f} MiB, the rest other pages of their memory)")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--table-mib", type=int, default=128)
    parser.add_argument("--limit-mib", type=int, default=192)
    parser.add_argument("--swap-mib", type=int, default=1024)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the plain swap file on the root disk")
    parser.add_argument("--no-takeover", action="store_true",
                        help="skip the daemon kills with a standby")
    parser.add_argument("--no-guests", action="store_true",
                        help="skip the QEMU guests swapping to a chain")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo mounts file systems and turns on swap: run it as root",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="swapfs-demo-", dir="/tmp"))
    try:
        figures = run(workdir, args)
    except KeyboardInterrupt:
        print("interrupted; everything set up was undone", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if os.path.ismount(workdir / "mnt"):
            print(f"{workdir / 'mnt'} is still mounted; left in place", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'swap target':<24} {'swap used':>10} {'stored':>9} {'swap-out':>12} "
          f"{'swap-in':>11}")
    print(f"{'':<24} {'MiB':>10} {'MiB':>9} {'MB/s':>12} {'MB/s':>11}")
    takeovers = figures.pop("takeovers", None)
    for name, (result, stored, _logical) in figures.items():
        print(report(name, result, stored))
    result, stored, logical = figures["swapfs"]
    print(f"\nswapfs: {result.peak_swap_used_bytes / MIB:.0f} MiB of kernel swap held in "
          f"{stored / MIB:.0f} MiB stored: dedup ratio "
          f"{logical / stored if stored else 1:.2f}x for this swap file")
    if takeovers:
        print(f"takeover under swap: {summary(takeovers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
