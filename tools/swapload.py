#!/usr/bin/env python3
"""A swap workload of cloned machines: workers that build the same table.

Clones booted from one image hold largely the same pages. This workload
models that: N worker processes each build the same table of pseudo-random
pages inside a memory cgroup whose limit is well below their total, so the
kernel must swap most of it out; then each worker reads its table back and
checks every byte, which swaps it in again.

Used by the demo, the tests and the benchmark:

    with MemoryCgroup("demo", 192 * MiB) as cgroup:
        result = run_workload(cgroup, workers=4, table_mib=128, device="/dev/loop0")

The worker is this file run as a script; it joins the cgroup itself before
it allocates anything, so no memory of it is ever charged elsewhere.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import blake3

PAGE = 4096
MIB = 1 << 20
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A memory cgroup of our own, removed on exit with whatever runs in it.

    cgroup v1 (``memory.limit_in_bytes``) where the memory controller is
    mounted on its own, else v2 (``memory.max``).
    """

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        if CGROUP_V1.is_dir():
            self.path = CGROUP_V1 / f"swapfs-{name}-{os.getpid()}"
            self._limit_file = "memory.limit_in_bytes"
        else:
            self.path = CGROUP_V2 / f"swapfs-{name}-{os.getpid()}"
            self._limit_file = "memory.max"

    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        try:
            (self.path / self._limit_file).write_text(str(self.limit_bytes))
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def __exit__(self, *exc: object) -> None:
        """Kill what is left in the cgroup (only our workers can be there), remove it."""
        deadline = time.monotonic() + 30
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def swap_traffic() -> tuple[int, int]:
    """Bytes swapped in and out so far, host-wide (pswpin, pswpout of /proc/vmstat)."""
    counters = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(counters["pswpin"]) * PAGE, int(counters["pswpout"]) * PAGE


@dataclass
class WorkloadResult:
    workers: int
    table_bytes: int  # per worker
    build_seconds: float
    verify_seconds: float  # over every verify pass
    swapped_out_bytes: int  # swapped out while building
    swapped_in_bytes: int  # swapped in while verifying, every pass
    peak_swap_used_bytes: int

    @property
    def swap_out_mbps(self) -> float:
        return self.swapped_out_bytes / MIB / self.build_seconds

    @property
    def swap_in_mbps(self) -> float:
        return self.swapped_in_bytes / MIB / self.verify_seconds


def _swap_used(device: str) -> int:
    with open("/proc/swaps") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if os.path.realpath(fields[0]) == os.path.realpath(device):
                return int(fields[3]) * 1024
    return 0


def run_workload(cgroup: MemoryCgroup, workers: int, table_mib: int, device: str,
                 progress: Callable[[str], None] = lambda message: None,
                 on_phase: Callable[[str], None] = lambda name: None,
                 passes: int = 1) -> WorkloadResult:
    """Run the workers in *cgroup*, swapping to *device* (as /proc/swaps names it).

    The workers verify their tables *passes* times, so that swap-in repeats:
    each pass swaps in what the one before pushed out again. The result's
    verify figures are the sum over the passes.

    *on_phase* hears "build" and then "verify" as each phase begins (once
    per pass), and "done" once every worker verified its table.
    Swap traffic is counted host-wide, so nothing else should swap meanwhile.
    """
    command = [sys.executable, __file__, "--cgroup", str(cgroup.path),
               "--table-mib", str(table_mib)]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(workers)]
    try:
        for proc in procs:  # each worker says "joined" once it is in the cgroup
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "joined":
                raise RuntimeError("a worker failed to join the cgroup")
        peak = 0

        def phase(name: str) -> tuple[float, int, int]:
            nonlocal peak
            read0, written0 = swap_traffic()
            on_phase(name)
            start = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(name + "\n")
                proc.stdin.flush()
            for number, proc in enumerate(procs, 1):
                assert proc.stdout is not None
                line = proc.stdout.readline().strip()
                if line != f"{name} ok":
                    raise RuntimeError(f"worker {number} {name}: {line or 'died'}")
                peak = max(peak, _swap_used(device))
                progress(f"{name}: worker {number}/{workers} done, swap used "
                         f"{_swap_used(device) / MIB:.0f} MiB")
            read1, written1 = swap_traffic()
            return time.perf_counter() - start, read1 - read0, written1 - written0

        build_seconds, _, written = phase("build")
        verify_seconds, read = 0.0, 0
        for _ in range(passes):
            seconds, bytes_in, _ = phase("verify")
            verify_seconds += seconds
            read += bytes_in
        on_phase("done")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return WorkloadResult(workers, table_mib * MIB, build_seconds, verify_seconds,
                          written, read, peak)


_TABLE = blake3.blake3(b"swapfs workload table")


def table_chunk(offset: int, length: int) -> bytes:
    """Bytes of the table every worker builds alike: a BLAKE3 output stream.

    Every page differs from every other (no dedup within one table) and
    generating it costs little next to swapping it (gigabytes per second).
    """
    return _TABLE.digest(length, seek=offset)


def _worker(cgroup: Path, table_mib: int) -> int:
    """Join the cgroup, then build and verify the table on the parent's word."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    print("joined", flush=True)
    table = bytearray(table_mib * MIB)
    for command in sys.stdin:
        command = command.strip()
        if command == "build":
            for offset in range(0, len(table), MIB):
                table[offset:offset + MIB] = table_chunk(offset, MIB)
        elif command == "verify":
            for offset in range(0, len(table), MIB):
                if table[offset:offset + MIB] != table_chunk(offset, MIB):
                    print(f"verify: the MiB at {offset} differs", flush=True)
                    return 1
        else:
            print(f"unknown command {command!r}", flush=True)
            return 2
        print(f"{command} ok", flush=True)
    return 0


@contextmanager
def peak_figures(figures: Callable[[], dict[str, int]], keys: tuple[str, ...] = (
        "stored_bytes", "logical_bytes")) -> Iterator[dict[str, int]]:
    """The highest value of each of *keys* in ``figures()`` while the block runs.

    Polled every 0.1 s from a thread: discards lower the figures again as
    soon as the workers free their memory, so reading them afterwards
    would miss the peak.
    """
    peak = dict.fromkeys(keys, 0)
    done = threading.Event()

    def poll() -> None:
        while True:
            latest = figures()
            for key in keys:
                peak[key] = max(peak[key], latest[key])
            if done.wait(0.1):
                return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield peak
    finally:
        done.set()
        poller.join()


@contextmanager
def plain_swap_file(path: Path, size_bytes: int) -> Iterator[str]:
    """A swap file on an ordinary file system, in service while the block runs."""
    with open(path, "wb") as swap_file:
        os.posix_fallocate(swap_file.fileno(), 0, size_bytes)
    try:
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        subprocess.run(["swapon", str(path)], check=True, capture_output=True)
        try:
            yield str(path)
        finally:
            subprocess.run(["swapoff", str(path)], check=True, capture_output=True)
    finally:
        path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description="a worker of the swap workload")
    parser.add_argument("--cgroup", type=Path, required=True)
    parser.add_argument("--table-mib", type=int, required=True)
    args = parser.parse_args()
    return _worker(args.cgroup, args.table_mib)


if __name__ == "__main__":
    sys.exit(main())
