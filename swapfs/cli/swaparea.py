"""Putting swap files on a swapfs mount into service, and out of it.

Linux refuses ``swapon`` on a FUSE file, so a swap file goes into service
through a loop device opened with direct I/O: the kernel's swap writes go
straight to swapfs without a second copy in the page cache, and the
loop device turns the kernel's discards into hole punches on the file.
This module drives the ordinary tools (losetup, mkswap, swapon, swapoff)
and reads the kernel's tables (/proc/swaps, /proc/mounts, sysfs).
"""

import errno
import logging
import os
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swapfs.engine import SwapfsError

log = logging.getLogger(__name__)

#: mkswap's signature sits in the last 10 bytes of the first page.
_SIGNATURES = (b"SWAPSPACE2", b"SWAP-SPACE")
_SIGNATURE_OFFSET = 4096 - 10
_MIN_SWAP_BYTES = 40 * 1024

PAGE_CLUSTER = Path("/proc/sys/vm/page-cluster")
#: vm.page-cluster for swap on swapfs: the kernel reads up to 2**N pages per
#: swap-in, and on swapfs a larger read costs little more than a small one
#: (docs/configuration.md, "Host settings").
RECOMMENDED_PAGE_CLUSTER = 5


@dataclass
class SwapArea:
    """A swap area the kernel uses whose backing file lives on swapfs."""

    device: str
    file: str
    size_bytes: int
    used_bytes: int
    priority: int


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SwapfsError(errno.EIO, f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def swapfs_mounts() -> list[str]:
    """Mount points of every swapfs file system on this host."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "fuse.swapfs":
                mounts.append(fields[1].replace("\\040", " "))
    return mounts


def loop_devices() -> dict[str, str]:
    """Attached loop devices: device -> backing file."""
    devices = {}
    for entry in Path("/sys/block").glob("loop*"):
        backing = entry / "loop" / "backing_file"
        try:
            devices[f"/dev/{entry.name}"] = backing.read_text().strip()
        except OSError:
            continue
    return devices


def _kernel_swaps() -> dict[str, tuple[int, int, int]]:
    """Active swap areas: device -> (size, used, priority), in bytes."""
    areas = {}
    with open("/proc/swaps") as table:
        next(table)
        for line in table:
            name, _kind, size, used, priority = line.split()
            areas[name] = (int(size) * 1024, int(used) * 1024, int(priority))
    return areas


def _on_mounts(path: str, mounts: list[str]) -> bool:
    return any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in mounts)


def active_areas(mounts: list[str] | None = None) -> list[SwapArea]:
    """Swap areas backed by files on the given swapfs mounts (default: all)."""
    mounts = swapfs_mounts() if mounts is None else mounts
    devices = loop_devices()
    areas = []
    for device, (size, used, priority) in _kernel_swaps().items():
        backing = devices.get(device)
        if backing is not None and _on_mounts(backing, mounts):
            areas.append(SwapArea(device, backing, size, used, priority))
    return areas


def devices_of(path: str) -> list[str]:
    """Loop devices whose backing file is *path*."""
    return [device for device, backing in loop_devices().items() if backing == path]


def _has_signature(path: str) -> bool:
    with open(path, "rb") as swap_file:
        swap_file.seek(_SIGNATURE_OFFSET)
        return swap_file.read(10) in _SIGNATURES


def page_cluster() -> int | None:
    """The host's vm.page-cluster, or None where it cannot be read."""
    try:
        return int(PAGE_CLUSTER.read_text())
    except (OSError, ValueError):
        return None


def page_cluster_advice() -> str:
    """One line on vm.page-cluster: its value, and the recommended one if it differs."""
    value = page_cluster()
    if value is None:
        return "vm.page-cluster: unknown (cannot read /proc/sys/vm/page-cluster)"
    if value == RECOMMENDED_PAGE_CLUSTER:
        return f"vm.page-cluster = {value} (recommended)"
    return (f"vm.page-cluster = {value}; {RECOMMENDED_PAGE_CLUSTER} is recommended for swap "
            f"on swapfs (sysctl vm.page-cluster={RECOMMENDED_PAGE_CLUSTER}; "
            "docs/configuration.md)")


def swap_on(path: str, priority: int | None = None, discard: bool = True) -> str:
    """Put a swapfs file into service as swap; returns its loop device.

    The file gets a swap signature (mkswap) only if it has none, so that a
    file that was in service before keeps its label and UUID. With
    *discard* (``swapon --discard``) the kernel discards freed swap slots,
    and swapfs frees the blocks that held them.
    """
    path = os.path.realpath(path)
    if not _on_mounts(path, swapfs_mounts()):
        raise SwapfsError(errno.EINVAL, f"{path} is not on a swapfs mount")
    info = os.stat(path)
    if info.st_mode & 0o077:
        # util-linux's swapon warns; swap holds what processes had in
        # memory, so this refuses: nobody else may read the file.
        raise SwapfsError(errno.EACCES, f"{path} has insecure permissions "
                          f"{stat.S_IMODE(info.st_mode):04o}: others could read swapped-out "
                          "memory; chmod 0600 it first")
    size = info.st_size
    if size < _MIN_SWAP_BYTES:
        raise SwapfsError(errno.EINVAL, f"{path} is too small for swap ({size} bytes)")
    busy = devices_of(path)
    if busy:
        raise SwapfsError(errno.EBUSY, f"{path} is already attached to {', '.join(busy)}")
    device = _run("losetup", "--find", "--show", "--direct-io=on", path).strip()
    try:
        if not _has_signature(path):
            _run("mkswap", device)
        command = ["swapon", "--discard"] if discard else ["swapon"]
        if priority is not None:
            command += ["--priority", str(priority)]
        _run(*command, device)
    except BaseException:
        subprocess.run(["losetup", "--detach", device], capture_output=True)
        raise
    log.info("swap on %s through %s", path, device)
    return device


def swap_off(path: str) -> list[str]:
    """Take a swapfs file out of service and detach its loop devices."""
    path = os.path.realpath(path)
    devices = devices_of(path)
    if not devices:
        raise SwapfsError(errno.ENOENT, f"{path} is not attached to a loop device")
    active = _kernel_swaps()
    for device in devices:
        if device in active:
            _run("swapoff", device)
        _run("losetup", "--detach", device)
    return devices


def status() -> dict[str, Any]:
    """Every swapfs mount, and the swap areas and loop devices on each."""
    mounts = swapfs_mounts()
    devices = loop_devices()
    active = {area.device: area for area in active_areas(mounts)}
    report: dict[str, Any] = {"mounts": {}}
    for mount in mounts:
        loops = [{"device": device, "file": backing,
                  "swap": asdict(active[device]) if device in active else None}
                 for device, backing in sorted(devices.items())
                 if _on_mounts(backing, [mount])]
        report["mounts"][mount] = {"loop_devices": loops}
    return report
