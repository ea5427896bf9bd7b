"""What the benchmark measures against: each target set up and torn down.

Every target is a context manager that yields a :class:`Device` and undoes
all it set up on the way out (loop devices, mounts, zram, temporary files),
failures and Ctrl-C included. A target this machine cannot offer raises
:class:`Unavailable` with the reason; the benchmark reports it in its row.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapfs.control import protocol
from swapfs.engine import keys
from tools import vmswap

MIB = 1 << 20
TOOLS = Path(__file__).resolve().parent
SWAPFS = [sys.executable, "-m", "swapfs.cli"]
STOCK_VENV = TOOLS.parent / "build" / "stock-pyfuse3-venv"
STATE_FS_SLACK = 256 * MIB  # room for the index and freed slots beyond a file's size


class Unavailable(Exception):
    """This machine cannot provide the target (the message says why)."""


@dataclass
class Device:
    """A block device to run fio on, and for swapfs how to read its figures."""

    path: str
    stats: Callable[[], dict[str, Any]] | None = None
    pid: int | None = None  # the FUSE daemon that serves it, if any
    state_mount: str | None = None  # swapfs: the file system of its state directory


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def _require_root() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="swapfs-bench-", dir="/tmp"))
    try:
        yield path
    finally:
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(path) + "/")]
        if not mounted:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    _require_root()
    device = _run("losetup", "--find", "--show", "--direct-io=on", str(path)).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True)


def mount_of(path: Path) -> str:
    """The file system holding *path*: its source, type and mount options."""
    return " ".join(_run("findmnt", "--noheadings", "--output", "SOURCE,FSTYPE,OPTIONS",
                         "--target", str(path)).split())


@contextlib.contextmanager
def nodiscard_fs(workdir: Path, size: int) -> Iterator[Path]:
    """A fresh ext4 file system of *size* bytes mounted without ``discard``.

    Made on a loop device over a file on the root disk, so that it sits on
    the same disk as the root file system but a hole punched in it frees
    blocks without the discard that the root's ``discard`` option adds.
    Unmounted, detached and removed on the way out.
    """
    with _root_disk_path(size, ".statefs") as image, loop_device(image) as device:
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
             device)
        mnt = workdir / "statefs"
        mnt.mkdir()
        _run("mount", "-t", "ext4", "-o", "nodiscard", device, str(mnt))
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)


@contextlib.contextmanager
def _state_dir(workdir: Path, size: int, nodiscard: bool) -> Iterator[Path]:
    """Where a mount of a *size* byte file keeps its state: in *workdir* (on
    the root file system), or with *nodiscard* on a file system of its own."""
    if not nodiscard:
        yield workdir / "state"
        return
    with nodiscard_fs(workdir, size + STATE_FS_SLACK) as mnt:
        yield mnt / "state"


@contextlib.contextmanager
def swapfs_mount(workdir: Path, *flags: str, state: Path | None = None) -> Iterator[Path]:
    """A fresh swapfs mount; *flags* go to ``swapfs mount``; the state
    directory is *state*, by default ``state`` in *workdir*. Unless *flags*
    say ``--no-encrypt`` it is encrypted, with a master key of its own."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    state = state or workdir / "state"
    if "--no-encrypt" not in flags:
        key = workdir / "master.key"
        if not key.exists():
            keys.generate(key)
        flags = (*flags, "--key-file", str(key))
    _run(*SWAPFS, "mount", *flags, "--state", str(state), str(mnt))
    try:
        yield mnt
    finally:
        result = subprocess.run([*SWAPFS, "umount", str(mnt)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def swapfs_stats(mnt: Path, chain: str) -> dict[str, Any]:
    stats = json.loads(_run(*SWAPFS, "stats", "--json", str(mnt)))
    figures: dict[str, Any] = stats["chains"][chain]
    figures["index_bytes"] = stats["index_bytes"]
    figures["index"] = stats["index"]
    return figures


def daemon_pid(mnt: Path) -> int:
    """The pid of the daemon serving the swapfs mount *mnt*."""
    return int(protocol.request(protocol.socket_of(str(mnt)), {"op": "status"})["pid"])


@contextlib.contextmanager
def _swapfs_file(size: int, *flags: str, nodiscard: bool = False
                 ) -> Iterator[tuple[Path, Path, Path]]:
    """(mount point, file, state directory): a file of *size* in chain "bench"
    on a fresh mount, its state directory on a file system without
    ``discard`` if *nodiscard*."""
    _require_root()
    with _workdir() as workdir, _state_dir(workdir, size, nodiscard) as state, \
            swapfs_mount(workdir, *flags, state=state) as mnt:
        (mnt / "bench").mkdir()
        path = mnt / "bench" / "disk.swap"
        path.touch()
        os.truncate(path, size)
        yield mnt, path, state


@contextlib.contextmanager
def swapfs_plain_file(size: int, *flags: str) -> Iterator[tuple[Path, Path]]:
    """(mount point, file): a file of *size* on a fresh mount (``swapfs mount``
    *flags*), no loop device."""
    with _swapfs_file(size, *flags) as (mnt, path, _state):
        yield mnt, path


@contextlib.contextmanager
def swapfs_kept_file(size: int, config: str) -> Iterator[tuple[Path, Path, Path]]:
    """(mount point, file, state directory): a file of *size* on a fresh mount
    started with the TOML *config* and kept by a standby (``swapfs mount
    --standby``), so that its daemon can be killed and replaced.

    On the way out the mount is unmounted, which ends the standby too; a
    standby still there after that is stopped by its pid.
    """
    _require_root()
    with _workdir() as workdir:
        config_path = workdir / "swapfs.toml"
        config_path.write_text(config)
        standby = None
        try:
            with swapfs_mount(workdir, "--config", str(config_path), "--standby") as mnt:
                status = protocol.request(protocol.socket_of(str(mnt)), {"op": "status"})
                standby = status.get("keeper_pid")
                if status.get("keeper") != "standby" or standby is None:
                    raise RuntimeError(f"no standby keeps {mnt}: {status.get('keeper')}")
                (mnt / "bench").mkdir()
                path = mnt / "bench" / "disk.swap"
                path.touch()
                os.truncate(path, size)
                yield mnt, path, workdir / "state"
        finally:
            if standby is not None:
                _stop(int(standby))


def _stop(pid: int, timeout: float = 10.0) -> None:
    """Wait up to *timeout* for *pid* to exit, then SIGTERM it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def _swapfs_device(size: int, nodiscard: bool, *flags: str) -> Iterator[Device]:
    with _swapfs_file(size, *flags, nodiscard=nodiscard) as (mnt, path, state), \
            loop_device(path) as device:
        yield Device(device, stats=lambda: swapfs_stats(mnt, "bench"), pid=daemon_pid(mnt),
                     state_mount=mount_of(state))


@contextlib.contextmanager
def swapfs_file(size: int) -> Iterator[Device]:
    """A file in a fresh chain on a fresh swapfs mount, behind a loop device."""
    with _swapfs_device(size, nodiscard=False) as device:
        yield device


@contextlib.contextmanager
def swapfs_unencrypted_file(size: int) -> Iterator[Device]:
    """As :func:`swapfs_file`, on an unencrypted state: the cost of encryption."""
    with _swapfs_device(size, False, "--no-encrypt") as device:
        yield device


@contextlib.contextmanager
def swapfs_nodiscard_file(size: int) -> Iterator[Device]:
    """As :func:`swapfs_file`, the state directory on a file system mounted
    without ``discard`` (:func:`nodiscard_fs`)."""
    with _swapfs_device(size, nodiscard=True) as device:
        yield device


def stock_python() -> str:
    """The interpreter of the stock pyfuse3 environment, built on first use
    (a few minutes) by tools/build-stock-pyfuse3.sh."""
    result = subprocess.run(["bash", str(TOOLS / "build-stock-pyfuse3.sh")],
                            env=dict(os.environ, PATCHED_PYTHON=sys.executable,
                                     STOCK_VENV=str(STOCK_VENV)),
                            stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise Unavailable(f"no stock pyfuse3 environment: {result.stderr.strip()[-300:]}")
    return str(STOCK_VENV / "bin" / "python")


@contextlib.contextmanager
def _memfs_file(size: int, python: str) -> Iterator[Device]:
    """tools/memfs.py run by *python*, its file behind a loop device."""
    _require_root()
    with _workdir() as workdir:
        mnt = workdir / "mnt"
        mnt.mkdir()
        read_end, write_end = os.pipe()
        daemon = subprocess.Popen(
            [python, str(TOOLS / "memfs.py"), str(mnt), "--size-mib",
             str(size // MIB), "--ready-fd", str(write_end)],
            pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as ready:
                if ready.read(1) != b"1":
                    raise RuntimeError("memfs did not start")
            with loop_device(mnt / "disk") as device:
                yield Device(device, pid=daemon.pid)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            daemon.terminate()
            daemon.wait(timeout=30)


@contextlib.contextmanager
def python_fuse_stock_file(size: int) -> Iterator[Device]:
    """The stock Python FUSE ceiling: tools/memfs.py on PyPI's pyfuse3."""
    with _memfs_file(size, stock_python()) as device:
        yield device


@contextlib.contextmanager
def python_fuse_patched_file(size: int) -> Iterator[Device]:
    """The patched Python FUSE ceiling: tools/memfs.py on the pyfuse3 that
    swapfs runs on (with our patches, tools/build-pyfuse3.sh)."""
    with _memfs_file(size, sys.executable) as device:
        yield device


@contextlib.contextmanager
def tmpfs_file(size: int) -> Iterator[Device]:
    """The kernel ceiling: a loop device over a file on tmpfs."""
    _require_root()
    with _workdir() as workdir:
        mnt = workdir / "tmpfs"
        mnt.mkdir()
        _run("mount", "-t", "tmpfs", "-o", f"size={size + 64 * MIB}", "tmpfs", str(mnt))
        try:
            path = mnt / "disk"
            with open(path, "wb") as disk:
                disk.truncate(size)
            with loop_device(path) as device:
                yield Device(device)
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)


@contextlib.contextmanager
def _root_disk_path(size: int, suffix: str) -> Iterator[Path]:
    """A fully allocated file of *size* on the root disk, removed afterwards."""
    _require_root()
    path = Path("/var/tmp") / f"swapfs-bench-{os.getpid()}{suffix}"
    with open(path, "wb") as disk:
        os.posix_fallocate(disk.fileno(), 0, size)
    try:
        yield path
    finally:
        path.unlink()


@contextlib.contextmanager
def root_disk_file(size: int) -> Iterator[Device]:
    """A plain file on the root disk, behind a loop device."""
    with _root_disk_path(size, ".img") as path, loop_device(path) as device:
        yield Device(device)


@contextlib.contextmanager
def zram_device(size: int) -> Iterator[Device]:
    """/dev/zram0 sized for the run, reset afterwards; refused if already in use."""
    _require_root()
    sysfs = Path("/sys/block/zram0")
    if not sysfs.exists():
        subprocess.run(["modprobe", "zram"], capture_output=True)
    if not sysfs.exists():
        raise Unavailable("no zram device (zram module not available)")
    if int((sysfs / "disksize").read_text()) != 0:
        raise Unavailable("/dev/zram0 is already in use")
    (sysfs / "disksize").write_text(str(size))
    try:
        yield Device("/dev/zram0", stats=lambda: {"mem_used_total": int(
            (sysfs / "mm_stat").read_text().split()[2])})
    finally:
        for _ in range(50):  # a just-closed device can be busy for a moment
            try:
                (sysfs / "reset").write_text("1")
                break
            except OSError:
                time.sleep(0.1)


FIO_TARGETS = {
    "swapfs": swapfs_file,
    "swapfs-unencrypted": swapfs_unencrypted_file,
    "swapfs-nodiscard": swapfs_nodiscard_file,
    "python-fuse-stock": python_fuse_stock_file,
    "python-fuse-patched": python_fuse_patched_file,
    "kernel": tmpfs_file,
    "zram": zram_device,
    "root-disk": root_disk_file,
}


@dataclass
class SwapTarget:
    """A swap area in service: its name in /proc/swaps and what it stores."""

    name: str
    stored_bytes: Callable[[], int]
    mount: Path | None = None  # the swapfs mount that holds it, if any
    state_mount: str | None = None  # swapfs: the file system of its state directory
    pid: int | None = None  # swapfs: the daemon that serves it


def cpu_seconds(pid: int, main_thread: bool = False) -> float:
    """The CPU time, user and system, that process *pid* has used: all its
    threads, or with *main_thread* its main thread alone."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    # The fields after the command's closing parenthesis; utime and stime
    # are the 14th and 15th of the whole line.
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _swap_used(name: str) -> int:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[0] == name:
            return int(fields[3]) * 1024
    return 0


@contextlib.contextmanager
def swapfs_swap(size: int, *flags: str, nodiscard: bool = False) -> Iterator[SwapTarget]:
    """Swap to a file in chain "bench" on a fresh mount (``swapfs mount``
    *flags*), its state on a file system without ``discard`` if *nodiscard*."""
    with _swapfs_file(size, *flags, nodiscard=nodiscard) as (mnt, path, state):
        state_mount = mount_of(state)
        device = _run(*SWAPFS, "swapon", str(path), "--priority", "32767").strip()
        try:
            yield SwapTarget(device, lambda: int(swapfs_stats(mnt, "bench")["stored_bytes"]),
                             mnt, state_mount, daemon_pid(mnt))
        finally:
            subprocess.run([*SWAPFS, "swapoff", str(path)], capture_output=True)


@contextlib.contextmanager
def swapfs_unencrypted_swap(size: int) -> Iterator[SwapTarget]:
    with swapfs_swap(size, "--no-encrypt") as swap:
        yield swap


@contextlib.contextmanager
def swapfs_nodiscard_swap(size: int) -> Iterator[SwapTarget]:
    with swapfs_swap(size, nodiscard=True) as swap:
        yield swap


@contextlib.contextmanager
def zram_swap(size: int) -> Iterator[SwapTarget]:
    with zram_device(size) as device:
        _run("mkswap", device.path)
        _run("swapon", "--priority", "32767", device.path)
        try:
            assert device.stats is not None
            stats = device.stats
            yield SwapTarget(device.path, lambda: int(stats()["mem_used_total"]))
        finally:
            subprocess.run(["swapoff", device.path], capture_output=True)


@contextlib.contextmanager
def root_disk_swap(size: int) -> Iterator[SwapTarget]:
    with _root_disk_path(size, ".swap") as path:
        _run("mkswap", str(path))
        _run("swapon", "--priority", "32767", str(path))
        try:
            yield SwapTarget(str(path), lambda: _swap_used(str(path)))
        finally:
            subprocess.run(["swapoff", str(path)], capture_output=True)


SWAP_TARGETS = {
    "swapfs": swapfs_swap,
    "swapfs-unencrypted": swapfs_unencrypted_swap,
    "swapfs-nodiscard": swapfs_nodiscard_swap,
    "zram": zram_swap,
    "root-disk": root_disk_swap,
}


@contextlib.contextmanager
def guest_disks(target: str, guests: int, size: int
                ) -> Iterator[tuple[list[Path], Callable[[], int] | None]]:
    """The swap disks of *guests* guests of tools/vmswap.py, with what they
    store if that is known: on "swapfs" files of one chain on a fresh mount
    (the parent's swap file and clones of it), on "root-disk" plain files
    on the root disk, allocated in full."""
    _require_root()
    if target == "swapfs":
        with _workdir() as workdir, swapfs_mount(workdir) as mnt:
            yield (vmswap.chain_disks(mnt, "vms", guests, size),
                   lambda: vmswap.stored_bytes(mnt, "vms"))
        return
    directory = Path(tempfile.mkdtemp(prefix="swapfs-bench-guests-", dir="/var/tmp"))
    try:
        yield vmswap.plain_disks(directory, guests, size), None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
