"""Helpers for tests that go through a real swapfs mount.

A :class:`Mount` drives the daemon the way an operator does: ``swapfs mount``
and ``swapfs umount`` as subprocesses, ``swapfs stats --json`` for figures,
and the control socket for the daemon's pid. It can also kill the daemon
with SIGKILL (by that pid only) and lazily detach the dead mount, then mount
the same state again.

Everything a test sets up here is undone by :meth:`Mount.close`, which never
raises for a cleanup step that fails half-way and refuses to delete a
directory that still has something mounted under it.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mountd.takeover import handover
from swapfs.control import protocol
from swapfs.engine import fsck, keys
from tools.takeover import alive

BLOCK = 4096

#: How the tests run the ``swapfs`` command: the venv's script when present.
_SCRIPT = Path(sys.executable).parent / "swapfs"
SWAPFS: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "swapfs.cli"]

#: Skips mount tests where they cannot run (not root, no FUSE).
requires_mount = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse")
    or shutil.which("fusermount3") is None,
    reason="needs root, /dev/fuse and fusermount3",
)


def swapfs(*args: str, check: bool = True, timeout: float = 90.0
           ) -> subprocess.CompletedProcess[str]:
    """Run the ``swapfs`` command line; with *check*, fail on a non-zero exit."""
    if args[:1] == ("swapon",):
        needs_marker("slow", "turns on kernel swap")
    result = subprocess.run([*SWAPFS, *args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"swapfs {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result


def mounted_paths() -> list[str]:
    """Mount points listed in /proc/mounts (octal escapes decoded)."""
    with open("/proc/mounts") as mounts:
        return [line.split()[1].encode().decode("unicode_escape") for line in mounts]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mounted_paths()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll *predicate* until it is true or *timeout* seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def lazy_unmount(path: Path) -> None:
    """Detach whatever is mounted on *path*, even a dead FUSE mount."""
    if not is_mounted(path):
        return
    result = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    if result.returncode != 0 or is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


#: Every directory short_tempdir made; what its test left is removed when
#: the session ends (conftest.py), so that no run leaves any behind.
_SCRATCH: list[Path] = []
#: The test running now (set by conftest.py), whose markers must say what it uses.
running: pytest.Item | None = None


def short_tempdir() -> Path:
    """A fresh directory with a short path (Unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="swapfs-", dir="/tmp"))
    _SCRATCH.append(path)
    return path


def remove_scratch() -> None:
    """Remove what short_tempdir made and a test left, detaching any mount
    a failed test left inside first."""
    while _SCRATCH:
        root = _SCRATCH.pop()
        prefix = os.path.realpath(root) + "/"
        for path in sorted(mounted_paths(), reverse=True):
            if path.startswith(prefix):
                lazy_unmount(Path(path))
        shutil.rmtree(root, ignore_errors=True)


def needs_marker(marker: str, what: str) -> None:
    """Fail the running test unless it is marked *marker*: a test that *what*
    must say so, so that ``-m "not mount"`` or ``-m "not slow"`` leaves it out."""
    if running is not None and running.get_closest_marker(marker) is None:
        pytest.fail(f"{running.nodeid} {what} but is not marked {marker!r}", pytrace=False)


def remove_tree(root: Path) -> None:
    """Delete *root*, but never through a mount that is still attached under it."""
    prefix = os.path.realpath(root) + "/"
    inside = [path for path in mounted_paths() if path.startswith(prefix)]
    if inside:
        raise AssertionError(f"still mounted under {root}: {inside}")
    shutil.rmtree(root, ignore_errors=True)


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer, as O_DIRECT I/O needs."""
    return mmap.mmap(-1, size)


def read_direct(path: Path | str, offset: int, size: int) -> bytes:
    """Up to *size* bytes at *offset* (block-aligned) read with O_DIRECT, so
    that the daemon answers, not the page cache."""
    buffer = aligned_buffer(-(-size // BLOCK) * BLOCK or BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        done = os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)
    return bytes(buffer[:min(done, size)])


def receive_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram or message and the descriptors it carries (SCM_RIGHTS)."""
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    return data, handover.fds_in(ancillary)


class Mount:
    """One state directory and one mount point, driven through the CLI."""

    def __init__(self, root: Path, state: Path | None = None,
                 config: Path | None = None) -> None:
        self.root = root
        self.state = state if state is not None else root / "s"
        #: The daemon's configuration file (``swapfs mount --config``), if any.
        self.config = config
        self.mnt = root / "m"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.pid: int | None = None
        #: Set by a test that corrupts the state on purpose.
        self.expect_clean_fsck = True
        #: Daemons that died without being killed or unmounted by the test.
        self.unexpected_deaths: list[int] = []
        #: The ``swapfs standby`` process keeping the mount, if the test started one.
        self.standby_pid: int | None = None

    # -- life cycle -------------------------------------------------------------

    def mount(self) -> None:
        """``swapfs mount``; then learn the daemon's pid from its control socket."""
        needs_marker("mount", "mounts swapfs")
        config = ["--config", str(self.config)] if self.config is not None else []
        result = swapfs("mount", *config, "--state", str(self.state), str(self.mnt))
        printed = re.search(r"\(pid (\d+)\)", result.stdout)
        # The printed pid only serves cleanup if the control socket does not answer.
        self.pid = int(printed.group(1)) if printed else None
        self.pid = int(self.status()["pid"])
        assert printed is not None and int(printed.group(1)) == self.pid, result.stdout

    def status(self) -> dict[str, Any]:
        return protocol.request(protocol.socket_of(str(self.mnt)), {"op": "status"})

    def start_standby(self) -> int:
        """``swapfs standby``; its pid, which :meth:`close` kills if it outlives the mount."""
        result = swapfs("standby", str(self.mnt))
        printed = re.search(r"standby (\d+) keeps", result.stdout)
        assert printed is not None, result.stdout
        self.standby_pid = int(printed.group(1))
        return self.standby_pid

    def kill_for_takeover(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGKILL the daemon (by its pid); wait for the standby's new daemon
        to answer; return its status. The mount is never detached."""
        assert self.pid is not None, "not mounted"
        old = self.pid
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: not alive(old)), f"daemon {old} survived SIGKILL"
        socket_path = str(self.state / "control.sock")
        status: dict[str, Any] = {}

        def answered() -> bool:
            nonlocal status
            try:
                status = protocol.request(socket_path, {"op": "status"}, timeout=5)
            except protocol.ControlError:
                return False
            return bool(status["pid"] != old)

        assert wait_until(answered, timeout), "no daemon took over:\n" + daemon_log_tail(self)
        self.pid = int(status["pid"])
        return status

    def umount(self) -> None:
        """``swapfs umount``, which returns once the daemon has exited."""
        self._check_alive()
        swapfs("umount", str(self.mnt))
        assert self.pid is None or not alive(self.pid)
        assert not is_mounted(self.mnt)
        self.pid = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill(self) -> None:
        """SIGKILL the daemon (by its pid) and detach the dead mount."""
        assert self.pid is not None, "not mounted"
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(pid)), f"daemon {pid} survived SIGKILL"
        lazy_unmount(self.mnt)
        assert not is_mounted(self.mnt)

    def _check_alive(self) -> None:
        if self.pid is not None and not alive(self.pid):
            self.unexpected_deaths.append(self.pid)
            self.pid = None

    def close(self) -> None:
        """Unmount (or kill) and detach; never raises for one failed step."""
        self._check_alive()
        if self.pid is not None:
            try:
                swapfs("umount", str(self.mnt), timeout=30)
            except (AssertionError, subprocess.TimeoutExpired):
                # Something still holds a file open: fall back to the hard way.
                pid = self.pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not alive(pid))
            self.pid = None
        lazy_unmount(self.mnt)
        if self.standby_pid is not None:
            # It exits by itself once the mount is gone (tests check that); never linger.
            standby, self.standby_pid = self.standby_pid, None
            if not wait_until(lambda: not alive(standby), 10):
                os.kill(standby, signal.SIGKILL)
                wait_until(lambda: not alive(standby))

    def fsck(self, repair: bool = False) -> fsck.Report:
        """The offline check of the state (the daemon must have exited)."""
        return fsck.check(self.state, repair=repair, master=keys.load())

    # -- queries ------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def stats(self) -> dict[str, Any]:
        """``swapfs stats --json`` of the mount."""
        result: dict[str, Any] = json.loads(swapfs("stats", "--json", str(self.mnt)).stdout)
        return result

    def chain(self, name: str) -> dict[str, Any]:
        """The stats of one chain."""
        chain: dict[str, Any] = self.stats()["chains"][name]
        return chain


@contextlib.contextmanager
def mounted(root: Path | None = None, state: Path | None = None,
            check_fsck: bool = True, config: Path | None = None) -> Iterator[Mount]:
    """A mounted :class:`Mount`, closed and removed afterwards, failures included.

    After a test that passed, the daemon must not have died on its own and
    the offline check of the state must be clean (unless the test said it
    corrupted the state on purpose).
    """
    own_root = root is None
    root = root if root is not None else short_tempdir()
    mount = Mount(root, state, config)
    try:
        mount.mount()
        yield mount
        mount._check_alive()
        assert not mount.unexpected_deaths, (
            f"daemon {mount.unexpected_deaths} died; log:\n" + daemon_log_tail(mount))
        mount.close()
        if check_fsck and mount.expect_clean_fsck:
            report = mount.fsck()
            assert report.clean, [vars(problem) for problem in report.problems]
    finally:
        mount.close()
        if own_root:
            remove_tree(root)


def daemon_log_tail(mount: Mount, lines: int = 30) -> str:
    try:
        return "\n".join((mount.state / "daemon.log").read_text(
            errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """A loop device with direct I/O over *path*, always detached afterwards."""
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(path)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


@contextlib.contextmanager
def _mounted_on(directory: Path, *mount_args: str) -> Iterator[Path]:
    """``mount *mount_args* directory``, always unmounted afterwards (lazily
    if it is busy)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *mount_args, str(directory)], check=True)
    try:
        yield directory
    finally:
        result = subprocess.run(["umount", str(directory)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def tmpfs(directory: Path, size: str) -> contextlib.AbstractContextManager[Path]:
    """A tmpfs of *size* mounted on *directory*, always unmounted afterwards."""
    return _mounted_on(directory, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


@contextlib.contextmanager
def ext4_image(directory: Path, size_mib: int) -> Iterator[Path]:
    """A fresh ext4 file system of *size_mib* MiB, in an image file beside
    *directory*, loop-mounted on it; always unmounted (and its loop device
    freed) and the image removed afterwards."""
    image = directory.with_name(directory.name + ".ext4")
    with open(image, "wb") as out:
        out.truncate(size_mib << 20)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        with _mounted_on(directory, "-o", "loop", str(image)) as mounted_dir:
            yield mounted_dir
    finally:
        image.unlink(missing_ok=True)


def fill_until_enospc(path: Path, rng: random.Random, chunk: int, limit: int = 10_000
                      ) -> list[bytes]:
    """Write random chunks to *path* until its file system is full (ENOSPC,
    and no other error); what was written."""
    written: list[bytes] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            data = rng.randbytes(chunk)
            try:
                os.pwrite(fd, data, len(written) * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written.append(data)
            assert len(written) < limit, "the file system never filled up"
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks (it has only posix_fallocate)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def os_error(call: Any, *args: Any) -> int:
    """The errno that ``call(*args)`` fails with (AssertionError if it succeeds)."""
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    shown = ", ".join(repr(arg)[:40] for arg in args)
    raise AssertionError(f"{getattr(call, '__name__', call)}({shown}) did not fail")


__all__ = [
    "BLOCK", "SWAPFS", "Mount", "aligned_buffer", "alive", "daemon_log_tail", "ext4_image",
    "fallocate", "fill_until_enospc", "is_mounted", "lazy_unmount", "loop_device", "mounted",
    "os_error", "read_direct", "receive_with_fds", "remove_tree", "requires_mount",
    "short_tempdir", "swapfs", "tmpfs", "wait_until",
]
