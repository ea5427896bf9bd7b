"""Real kernel swap through swapfs: loop devices, swapon, a memory cgroup.

These tests turn swap on. Every swap area and loop device they create is
taken down in a ``finally`` before the mount is closed, so swap is never
left active on a file whose daemon is gone.
"""

import contextlib
import json
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapfs.cli import swaparea
from tests.mounting import (
    Mount,
    alive,
    is_mounted,
    loop_device,
    requires_mount,
    swapfs,
    wait_until,
)
from tools.swapload import MIB, MemoryCgroup, peak_figures, run_workload

pytestmark = [requires_mount, pytest.mark.mount, pytest.mark.slow]


@contextlib.contextmanager
def swap_on(path: Path) -> Iterator[str]:
    """``swapfs swapon``, always undone (swapoff and loop detach) afterwards."""
    device = swapfs("swapon", str(path), "--priority", "32767").stdout.strip()
    try:
        yield device
    finally:
        if swaparea.devices_of(str(path)):
            swapfs("swapoff", str(path))


def swap_file(mount: Mount, name: str, mib: int) -> Path:
    chain = mount.path("web")
    chain.mkdir(exist_ok=True)
    path = chain / name
    path.touch()
    os.truncate(path, mib * MIB)
    return path


def test_clones_swapping_the_same_table_store_one_copy(mount: Mount) -> None:
    """The demo's scenario: 4 workers x 128 MiB alike, 192 MiB limit, all verified."""
    path = swap_file(mount, "vm.swap", 1024)
    with swap_on(path) as device:
        before = mount.chain("web")["stored_bytes"]
        # While the workers run: swap is on with discard, so the blocks of
        # their slots are freed once they exit.
        with MemoryCgroup("test", 192 * MIB) as cgroup, \
                peak_figures(lambda: mount.chain("web")) as peak:
            # run_workload raises if any worker finds a byte that differs.
            result = run_workload(cgroup, workers=4, table_mib=128, device=device)
    table = 128 * MIB
    assert result.swapped_out_bytes > 2 * table  # most of the 512 MiB went to swap
    assert result.peak_swap_used_bytes > 2 * table
    stored = peak["stored_bytes"] - before
    # Four identical tables are stored about once (plus the swap header and
    # the odd page of other memory), not four times.
    assert table * 0.9 <= stored <= table * 1.1, stored / MIB
    assert peak["logical_bytes"] >= result.peak_swap_used_bytes * 0.9


def test_three_clone_disks_receiving_the_same_writes_store_them_once(mount: Mount) -> None:
    """Three loop devices over three files of one chain, as three clones' swap disks."""
    data = os.urandom(16 * MIB)
    paths = [swap_file(mount, f"vm{number}.swap", 64) for number in range(3)]
    with contextlib.ExitStack() as stack:
        devices = [stack.enter_context(loop_device(path)) for path in paths]
        aligned = mmap.mmap(-1, len(data))  # O_DIRECT wants page-aligned buffers
        aligned.write(data)
        for device in devices:
            fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
            try:
                assert os.pwrite(fd, aligned, MIB) == len(data)
            finally:
                os.close(fd)
        for device in devices:
            with open(device, "rb") as disk:
                disk.seek(MIB)
                assert disk.read(len(data)) == data
    web = mount.chain("web")
    assert web["logical_bytes"] == 3 * len(data)
    assert web["stored_bytes"] == len(data)
    for path in paths:
        assert path.read_bytes()[MIB:MIB + len(data)] == data


def test_umount_and_sigterm_refused_while_swap_is_active(mount: Mount) -> None:
    path = swap_file(mount, "vm.swap", 64)
    with swap_on(path) as device:
        status = json.loads(swapfs("status", "--json").stdout)
        loops = status["mounts"][str(mount.mnt)]["loop_devices"]
        assert [(loop["device"], loop["file"]) for loop in loops] == [(device, str(path))]
        assert loops[0]["swap"]["size_bytes"] > 0

        refused = swapfs("umount", str(mount.mnt), check=False)
        assert refused.returncode == 1
        assert "swap is active" in refused.stderr and str(path) in refused.stderr
        assert is_mounted(mount.mnt)

        assert mount.pid is not None
        os.kill(mount.pid, signal.SIGTERM)
        # The daemon logs its refusal and keeps serving.
        assert wait_until(lambda: "refusing to unmount" in
                          (mount.state / "daemon.log").read_text())
        assert alive(mount.pid) and is_mounted(mount.mnt)
        assert mount.status()["open_files"] == 1
    assert swaparea.devices_of(str(path)) == []
    mount.umount()
    mount.mount()


def test_swapon_refuses_files_elsewhere_and_twice(mount: Mount, tmp_path: Path) -> None:
    elsewhere = tmp_path / "plain.swap"
    elsewhere.write_bytes(bytes(MIB))
    result = swapfs("swapon", str(elsewhere), check=False)
    assert result.returncode == 1 and "not on a swapfs mount" in result.stderr
    path = swap_file(mount, "vm.swap", 64)
    with swap_on(path):
        again = swapfs("swapon", str(path), check=False)
        assert again.returncode == 1 and "already attached" in again.stderr


def test_swapon_prints_the_device_and_reports_page_cluster(mount: Mount) -> None:
    path = swap_file(mount, "vm.swap", 64)
    result = swapfs("swapon", str(path), "--priority", "32767")
    try:
        # stdout is the device alone (scripts read it); the host setting is on stderr.
        assert result.stdout == f"{swaparea.devices_of(str(path))[0]}\n"
        value = swaparea.page_cluster()
        assert f"vm.page-cluster = {value}" in result.stderr
        advice = f"{swaparea.RECOMMENDED_PAGE_CLUSTER} is recommended"
        assert (advice in result.stderr) == (value != swaparea.RECOMMENDED_PAGE_CLUSTER)
    finally:
        if swaparea.devices_of(str(path)):
            swapfs("swapoff", str(path))


def test_page_cluster_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    setting = tmp_path / "page-cluster"
    monkeypatch.setattr(swaparea, "PAGE_CLUSTER", setting)
    assert "unknown" in swaparea.page_cluster_advice()
    recommended = swaparea.RECOMMENDED_PAGE_CLUSTER
    setting.write_text(f"{recommended}\n")
    assert swaparea.page_cluster_advice() == f"vm.page-cluster = {recommended} (recommended)"
    setting.write_text(f"{recommended - 2}\n")
    advice = swaparea.page_cluster_advice()
    assert advice.startswith(f"vm.page-cluster = {recommended - 2};")
    assert f"sysctl vm.page-cluster={recommended}" in advice


def test_killing_the_workload_leaves_nothing_behind(mount: Mount) -> None:
    """Workers killed mid-swap: swap, loop device and cgroup all go cleanly."""
    path = swap_file(mount, "vm.swap", 512)
    with swap_on(path) as device, MemoryCgroup("kill", 64 * MIB) as cgroup:
        outcome: list[BaseException] = []

        def workload() -> None:
            try:
                run_workload(cgroup, workers=2, table_mib=96, device=device)
            except BaseException as exc:  # the kill makes it fail: expected
                outcome.append(exc)

        runner = threading.Thread(target=workload)
        runner.start()
        assert wait_until(lambda: swaparea.active_areas([str(mount.mnt)])[0].used_bytes
                          > 32 * MIB, timeout=60)
        for pid in cgroup.pids():
            os.kill(pid, signal.SIGKILL)
        runner.join(timeout=60)
        assert not runner.is_alive() and outcome
    cgroup_path = cgroup.path
    assert not cgroup_path.exists()
    assert swaparea.devices_of(str(path)) == []
    assert str(path) not in Path("/proc/swaps").read_text()
    assert mount.pid is not None and alive(mount.pid)
