"""Real kernel swap through swapfs while its daemon is killed with SIGKILL.

With a standby keeping the connection, the workload of the demo (workers
that build a table bigger than their memory cgroup allows, then verify
every byte after swap-in) runs through several kills, in both phases, and
loses nothing. Without a keeper, one kill costs the workers their pages.

Swap is always taken down before the mount is closed: swapoff, then the
loop device, then the mount.
"""

import contextlib
import errno
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tools.swapload
from swapfs.cli import swaparea
from swapfs.control import ControlError
from tests.mounting import BLOCK, Mount, alive, is_mounted, lazy_unmount, requires_mount, swapfs
from tests.mounting import wait_until as wait_for
from tests.swap.test_swap import swap_file, swap_on
from tools.swapload import MIB, MemoryCgroup, run_workload
from tools.takeover import Killer, Probe, summary

pytestmark = [requires_mount, pytest.mark.mount, pytest.mark.slow]

#: Kills made by the end of each phase of the workload: up to three while the
#: workers swap out, the rest of six while they swap in.
KILLS = {"build": 3, "verify": 6}
#: Each worker's table: four of them make 768 MiB under a 192 MiB limit, which
#: keeps both phases long enough for three kills a second or so apart.
TABLE_MIB = 192


def swap_used(mount: Mount) -> int:
    return sum(area.used_bytes for area in swaparea.active_areas([str(mount.mnt)]))


@contextlib.contextmanager
def probe_file(mount: Mount) -> Iterator[Probe]:
    """A probe reading a block of a small file in the chain with O_DIRECT."""
    path = mount.path("web", "probe")
    path.write_bytes(os.urandom(BLOCK))
    with Probe(path) as probe:
        yield probe


FUSECTL = Path("/sys/fs/fuse/connections")


@contextlib.contextmanager
def fusectl() -> Iterator[None]:
    """The FUSE control file system, mounted for the block if it was not
    (the daemon reads how many requests waited at a takeover there)."""
    if is_mounted(FUSECTL):
        yield
        return
    subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(FUSECTL)], capture_output=True)


def serving_daemon(mount: Mount) -> int | None:
    """The pid of the daemon serving *mount*; None if none answers within
    30 s, and then the standby is killed: the connection it kept aborts, so
    swapoff fails fast instead of waiting for a daemon forever."""
    pids: list[int] = []

    def answers() -> bool:
        with contextlib.suppress(ControlError):
            pids.append(int(mount.status()["pid"]))
        return bool(pids)

    if wait_for(answers, timeout=30, interval=0.1):
        return pids[0]
    if mount.standby_pid is not None:
        os.kill(mount.standby_pid, signal.SIGKILL)
    return None


def test_swap_workload_survives_sigkills_with_a_standby(
        mount: Mount, record_property: Callable[[str, object], None]) -> None:
    """Four workers x 192 MiB under a 192 MiB limit; the daemon is killed
    every second or so once 64 MiB are swapped out, up to three times while
    they swap out and the rest of six times while they swap in. Every byte verifies, each
    kill is one takeover, and the timings are reported (never asserted)."""
    path = swap_file(mount, "vm.swap", 1024)
    mount.start_standby()
    socket_path = str(mount.state / "control.sock")
    with fusectl(), swap_on(path) as device, probe_file(mount) as probe, \
            MemoryCgroup("takeover", 192 * MIB) as cgroup:
        assert mount.pid is not None
        killer = Killer(socket_path, mount.pid, probe, KILLS,
                        gap=1.0, ready=lambda: swap_used(mount) > 64 * MIB)
        killer.start()
        try:
            # Raises if a worker died or found a byte that differs.
            result = run_workload(cgroup, workers=4, table_mib=TABLE_MIB, device=device,
                                  on_phase=killer.enter_phase)
        finally:
            takeovers = killer.finish()
            # The daemon serving now, whatever happened: the mount closes that one.
            mount.pid = serving_daemon(mount)
    table = TABLE_MIB * MIB
    assert result.swapped_out_bytes > 2 * table
    assert result.swapped_in_bytes > table
    print(f"\n{summary(takeovers)}")
    for kill in takeovers:
        print(f"  takeover {kill.number} ({kill.phase}): probe {kill.probe_seconds:.3f} s, "
              f"daemon {kill.daemon_seconds} s, {kill.waiting} requests waiting")
    record_property("kills", len(takeovers))
    record_property("probe_seconds", [round(kill.probe_seconds, 4) for kill in takeovers])
    record_property("daemon_seconds", [kill.daemon_seconds for kill in takeovers])
    probe_seconds = [kill.probe_seconds for kill in takeovers]
    record_property("probe_median_seconds", round(statistics.median(probe_seconds), 4))
    record_property("probe_worst_seconds", round(max(probe_seconds), 4))

    phases = [kill.phase for kill in takeovers]
    assert phases.count("build") >= 1 and phases.count("verify") >= 1, phases
    assert len(takeovers) >= 5, phases
    # One takeover per kill, in order, each with the lost requests resent.
    assert [kill.number for kill in takeovers] == list(range(1, len(takeovers) + 1))
    assert all(kill.resent for kill in takeovers)
    status = mount.status()
    assert status["takeovers"] == len(takeovers)  # no death but the kills
    assert status["pid"] == takeovers[-1].pid
    assert status["keeper"] == "standby"
    assert swaparea.devices_of(str(path)) == []
    assert not Path(cgroup.path).exists()


# -- without a keeper ------------------------------------------------------------


def swapped_by(pids: list[int]) -> int:
    """Bytes of swap the page tables of *pids* point to (VmSwap)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmSwap:"):
                    total += int(line.split()[1]) * 1024
    return total


def start_workers(cgroup: MemoryCgroup, count: int, table_mib: int
                  ) -> list[subprocess.Popen[str]]:
    """The workload's workers, driven one by one (run_workload stops at the
    first failure; here every worker's fate is the point)."""
    command = [sys.executable, tools.swapload.__file__, "--cgroup", str(cgroup.path),
               "--table-mib", str(table_mib)]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in range(count)]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "joined"
    return workers


def tell(worker: subprocess.Popen[str], command: str) -> None:
    assert worker.stdin is not None
    worker.stdin.write(command + "\n")
    worker.stdin.flush()


def fates(workers: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Let every worker finish its build, then verify; what became of each:
    "verified", "killed by SIGxxx", "exit N: <its last words>" or "hung"
    (still silent after *timeout* seconds)."""
    fate: dict[int, str] = {}
    said: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(fate) < len(workers) and time.monotonic() < deadline:
        waiting = {worker.stdout: worker for worker in workers
                   if worker.pid not in fate and worker.stdout is not None}
        readable, _, _ = select.select(list(waiting), [], [], 0.2)
        for stream in readable:
            worker = waiting[stream]
            line = stream.readline().strip()
            if line == "build ok":
                tell(worker, "verify")
            elif line == "verify ok":
                fate[worker.pid] = "verified"
            elif line:
                said[worker.pid] = line
            else:
                code = worker.wait(timeout=10)
                fate[worker.pid] = (f"killed by {signal.Signals(-code).name}" if code < 0
                                    else f"exit {code}: {said.get(worker.pid, '')}")
    return [fate.get(worker.pid) or f"hung ({where(worker.pid)})" for worker in workers]


def where(pid: int) -> str:
    """A process's state letter and kernel wait channel."""
    try:
        with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/wchan") as wchan:
            return f"{stat.read().rsplit(')', 1)[1].split()[0]} {wchan.read() or '-'}"
    except OSError:
        return "gone"


def swap_active(device: str) -> bool:
    with open("/proc/swaps") as table:
        return any(line.split()[0] == device for line in table.readlines()[1:])


@contextlib.contextmanager
def swap_on_dead_mount(path: Path) -> Iterator[str]:
    """``swapfs swapon``, taken down afterwards even when the daemon is gone:
    swapoff (bounded in time), losetup --detach, no swapfs command involved."""
    device = swapfs("swapon", str(path), "--priority", "32767").stdout.strip()
    try:
        yield device
    finally:
        if swap_active(device):
            subprocess.run(["swapoff", device], capture_output=True, timeout=120)
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


def test_without_keeper_one_sigkill_costs_the_workers_their_pages(mount: Mount) -> None:
    """The same workload, no standby, one SIGKILL once 64 MiB are swapped out.

    What it does on Linux 6.18: without a keeper the connection aborts, so
    the loop device's reads and writes fail at once (EIO, nothing hangs).
    Workers that touch a page left on swap die of SIGBUS ("Read-error on
    swap-device"); pages whose swap-out fails stay in memory, so the cgroup
    runs out of memory and its OOM killer sends SIGKILL, or, in some runs,
    workers stay stuck in the cgroup's reclaim (still there after 30 s; the
    test then kills them by pid, which works); a worker whose pages all
    stayed in memory may still verify its table. No worker ever reads a
    wrong byte. swapoff succeeds at once, even with workers still alive
    (only pages still in memory come back), then the loop device detaches
    and the dead mount unmounts lazily. The mount needs no fusectl
    abort: the dead daemon held the only descriptor of the connection.

    Swap areas are host-wide: a process of anyone's that swapped to this
    area would lose its pages too. So the kill happens only once every
    page on the area belongs to the workers (their VmSwap accounts for all
    of it); otherwise the test is skipped, after cleaning up.
    """
    path = swap_file(mount, "vm.swap", 1024)
    with swap_on_dead_mount(path) as device, MemoryCgroup("nokeeper", 192 * MIB) as cgroup:
        # 128 MiB tables, as in the demo: with 192 MiB the cgroup spends half a
        # minute reclaiming in vain (every swap-out fails) before its OOM kills.
        workers = start_workers(cgroup, 4, 128)
        try:
            for worker in workers:
                tell(worker, "build")

            def ours_only() -> bool:
                used = sum(area.used_bytes for area in swaparea.active_areas([str(mount.mnt)]))
                return used > 64 * MIB and used <= swapped_by([w.pid for w in workers])

            if not wait_for(ours_only, timeout=60, interval=0.005):
                pytest.skip("other processes swap to this area too: killing the daemon "
                            "would cost them their pages")
            pid, mount.pid = mount.pid, None
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: not alive(pid))
            outcome = fates(workers, timeout=30)
            start = time.monotonic()
            swapoff = subprocess.run(["swapoff", device], capture_output=True, text=True,
                                     timeout=120)
            swapoff_seconds = time.monotonic() - start
            # What swapoff does to a worker still stuck in its cgroup's reclaim.
            stuck = [worker for worker, fate in zip(workers, outcome, strict=True)
                     if fate.startswith("hung")]
            after = fates(stuck, timeout=10) if stuck else []
            mounted = subprocess.run(["stat", str(path)], capture_output=True, text=True,
                                     timeout=30)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                worker.wait(timeout=60)  # raises if even SIGKILL cannot end it
    lazy_unmount(mount.mnt)
    print(f"\nno keeper, one SIGKILL: workers {outcome}; swapoff exit {swapoff.returncode} "
          f"in {swapoff_seconds:.2f} s {swapoff.stderr.strip()}; after it, the stuck ones: "
          f"{after}; stat: {mounted.stderr.strip()}")
    # Each worker verified, died of SIGBUS or the OOM killer's SIGKILL, or
    # hung in reclaim (and then SIGKILL ended it); none read a wrong byte.
    for fate in outcome + after:
        assert fate in ("verified", "killed by SIGBUS", "killed by SIGKILL") or \
            fate.startswith("hung"), outcome
    assert any(fate != "verified" for fate in outcome), outcome
    assert swapoff.returncode == 0, swapoff.stderr
    assert os.strerror(errno.ENOTCONN) in mounted.stderr
    assert not swap_active(device) and not swaparea.devices_of(str(path))
    assert not is_mounted(mount.mnt)
