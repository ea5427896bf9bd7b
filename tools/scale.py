#!/usr/bin/env python3
"""swapfs scale: how remount, takeover and the daemon's memory grow with the data stored.

For each size, in turn:

1. **build** a state holding that much unique data through the engine (a
   :class:`~swapfs.engine.Volume`, no mount): encrypted under a master key
   of the run's own, handed to every daemon as systemd's credential
   (``$CREDENTIALS_DIRECTORY``), one chain and one file in it, written in
   large requests of distinct blocks (a random buffer reused, each block
   stamped with its number: nothing dedups), then closed;
2. **mount** it with ``swapfs mount``, time ``swapfs umount`` followed by
   ``swapfs mount`` (the remount), and read the daemon's ``VmRSS``,
   ``VmHWM`` and ``VmLck`` from ``/proc/PID/status``, again once its
   background scan of the slot tables is done, and again a few seconds
   later, once it has taken the index pages the scan read out of its page
   tables (mountd/lifecycle.py);
3. start ``swapfs standby`` and SIGKILL the daemon (by its pid) a few
   times, timing each kill until a probe's ``O_DIRECT`` read of the file
   is answered (tools/takeover.py: ``Probe``, ``kill_daemon``);
4. unmount, delete the state, and go on to the next size.

It prints a table and, with ``--json`` or ``--out``, writes the figures as
JSON. Every state lives in a directory of its own under ``--dir`` (default:
a fresh directory under /var/tmp, removed at the end). A size that would
leave less than 10 GiB free on that file system is refused before anything
is written. Whatever it set up is undone on success, failure, Ctrl-C and
SIGTERM: the mount detached (lazily if need be), the daemons and the
standby it started stopped (by pid, nothing else), the state deleted.

    python tools/scale.py                          # 1, 4 and 16 GiB
    python tools/scale.py --sizes 1,4 --json       # the JSON on stdout
    python tools/scale.py --sizes-mib 64 --kills 2 --out results/

Runs as root (FUSE). Exit codes: 0 measured, 1 a step failed, 2 refused
(not root, not enough free space, bad arguments).
"""

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mountd.daemon import UNLOCK_INTERVAL  # noqa: E402
from swapfs.control import protocol  # noqa: E402
from swapfs.engine import BLOCK_SIZE, ROOT_INO, Volume, keys  # noqa: E402
from tools.takeover import Probe, TakeoverError, alive, kill_daemon  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
#: Free space a run must leave on the file system of its states.
KEEP_FREE = 10 * GIB
#: Blocks per engine write while building (256 blocks: 1 MiB).
REQUEST_BLOCKS = 256
_STAMP = struct.Struct("<QQ")
_SCRIPT = Path(sys.executable).parent / "swapfs"
SWAPFS: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "swapfs.cli"]


class ScaleError(Exception):
    """A step of the run that failed; the message says which."""


class Refused(ScaleError):
    """A run that would not start (free space, not root)."""


def progress(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def swapfs(*args: str, timeout: float = 600.0) -> str:
    """Run the ``swapfs`` command line; its output, or ScaleError."""
    result = subprocess.run([*SWAPFS, *args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ScaleError(f"swapfs {' '.join(args)} exited {result.returncode}: "
                         f"{result.stderr.strip()}")
    return result.stdout


def mounted_paths() -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line.split()[1].encode().decode("unicode_escape") for line in mounts]


def wait_until(predicate: Any, timeout: float, what: str = "") -> bool:
    """Poll *predicate* until true; False after *timeout* (ScaleError if *what*)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if what:
                raise ScaleError(f"timed out waiting for {what}")
            return False
        time.sleep(0.02)
    return True


def memory(pid: int) -> dict[str, float]:
    """The daemon's VmRSS (and of it RssAnon, its own memory, and RssFile,
    the pages of the files it maps: the index), VmHWM and VmLck in MiB
    (/proc/PID/status)."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "VmLck"):
                figures[name] = int(value.split()[0]) / 1024  # kB
    return figures


# -- what a run set up, and undoing it ------------------------------------------------


class Setup:
    """Everything a run made, undone by :meth:`undo` in every case: it never
    raises, and never deletes a directory with something mounted under it."""

    def __init__(self) -> None:
        self.mountpoints: list[Path] = []
        self.pids: set[int] = set()  # daemons and standbys this run started
        self.directories: list[Path] = []

    def undo(self) -> None:
        self.stop()
        for directory in reversed(self.directories):
            remove_tree(directory)
        self.directories.clear()

    def remove(self, directory: Path) -> None:
        """Delete one directory of the run's now (a size's state)."""
        self.stop()
        remove_tree(directory)
        self.directories.remove(directory)

    def stop(self) -> None:
        """Unmount, then wait for (or kill) every process the run started."""
        for mnt in reversed(self.mountpoints):
            self._unmount(mnt)
        self.mountpoints.clear()
        for pid in sorted(self.pids):
            if not wait_until(lambda pid=pid: not alive(pid), 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_until(lambda pid=pid: not alive(pid), 10)
        self.pids.clear()

    def _unmount(self, mnt: Path) -> None:
        if not is_mounted(mnt):
            return
        with contextlib.suppress(ScaleError, subprocess.TimeoutExpired):
            swapfs("umount", str(mnt), timeout=60)
        if is_mounted(mnt):  # a daemon that did not answer: kill ours, detach
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mounted_paths()


def remove_tree(root: Path) -> None:
    """Delete *root*, never through a mount still attached under it."""
    prefix = os.path.realpath(root) + "/"
    inside = [path for path in mounted_paths() if path.startswith(prefix)]
    if inside:
        progress(f"left {root} in place: still mounted under it: {inside}")
        return
    shutil.rmtree(root, ignore_errors=True)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the steps ------------------------------------------------------------------------


def check_space(directory: Path, size: int) -> None:
    """Refuse a state of *size* bytes that would leave less than KEEP_FREE."""
    fs = os.statvfs(directory)
    free = fs.f_bavail * fs.f_frsize
    # The data file holds the blocks, their seals and the index a little more.
    need = size + size // 16 + 64 * MIB
    if free - need < KEEP_FREE:
        raise Refused(f"{size / GIB:g} GiB would leave {(free - need) / GIB:.1f} GiB free on "
                      f"{directory} ({free / GIB:.1f} GiB free now); at least "
                      f"{KEEP_FREE / GIB:g} GiB must stay free")


def build(state: Path, size: int, master: keys.MasterKey,
          request_blocks: int = REQUEST_BLOCKS) -> float:
    """A state holding *size* bytes of distinct blocks in /scale/data; seconds taken."""
    base = bytearray(os.urandom(request_blocks * BLOCK_SIZE))
    start = time.monotonic()
    shown = start
    volume = Volume(state, master=master)
    try:
        chain = volume.mkdir(ROOT_INO, b"scale", 0o755, 0, 0)
        data = volume.create(chain.ino, b"data", 0o600, 0, 0)
        block = 0
        total = size // BLOCK_SIZE
        while block < total:
            count = min(request_blocks, total - block)
            for i in range(count):  # the block's number makes it unlike any other
                _STAMP.pack_into(base, i * BLOCK_SIZE, block + i, 0x5CA1E)
            volume.write(data.ino, block * BLOCK_SIZE, bytes(base[:count * BLOCK_SIZE]))
            block += count
            now = time.monotonic()
            if now - shown >= 5:
                shown = now
                rate = block * BLOCK_SIZE / MIB / (now - start)
                progress(f"built {block * BLOCK_SIZE / GIB:.2f} of {size / GIB:g} GiB, "
                         f"{rate:.0f} MiB/s")
    finally:
        volume.close()
    return time.monotonic() - start


def mount(state: Path, mnt: Path, setup: Setup) -> int:
    """``swapfs mount``; the daemon's pid."""
    setup.mountpoints.append(mnt)
    out = swapfs("mount", "--state", str(state), str(mnt))
    printed = re.search(r"\(pid (\d+)\)", out)
    if printed is None:
        raise ScaleError(f"swapfs mount printed no pid: {out.strip()}")
    pid = int(printed.group(1))
    setup.pids.add(pid)
    return pid


def umount(mnt: Path, pid: int, setup: Setup) -> None:
    swapfs("umount", str(mnt))
    wait_until(lambda: not alive(pid), 30, f"daemon {pid} to exit")
    setup.pids.discard(pid)


def status(socket_path: str) -> dict[str, Any]:
    return protocol.request(socket_path, {"op": "status"}, timeout=30)


def scanned(socket_path: str, timeout: float = 600.0) -> float:
    """Seconds until the daemon has scanned every chain's slot table."""
    start = time.monotonic()
    wait_until(lambda: all(chain["dedup_table"]["scanned"] for chain in protocol.request(
        socket_path, {"op": "stats"}, timeout=30)["chains"].values()), timeout,
        "the slot tables to be scanned")
    return time.monotonic() - start


def takeovers(mnt: Path, state: Path, pid: int, kills: int, gap: float,
              setup: Setup) -> tuple[list[float], int]:
    """Start the standby, kill the daemon *kills* times; the seconds from
    each kill to the probe's read answered, and the last daemon's pid."""
    out = swapfs("standby", str(mnt))
    printed = re.search(r"standby (\d+) keeps", out)
    if printed is None:
        raise ScaleError(f"swapfs standby printed no pid: {out.strip()}")
    setup.pids.add(int(printed.group(1)))
    socket_path = protocol.socket_of(str(mnt))
    wait_until(lambda: status(socket_path).get("keeper") == "standby", 60,
               "the standby to keep the mount")
    log = state / "standby.log"
    seconds = []
    with Probe(mnt / "scale" / "data") as probe:
        for number in range(1, kills + 1):
            time.sleep(gap)  # the standby's spare daemon started and waiting
            kill = kill_daemon(socket_path, pid, probe, timeout=600)
            setup.pids.discard(pid)
            pid = kill.pid
            setup.pids.add(pid)
            wait_until(lambda pid=pid: f"daemon {pid} serves" in log.read_text(errors="replace"),
                       60, f"the standby to keep daemon {pid}")
            seconds.append(kill.probe_seconds)
            progress(f"takeover {number}: {kill.probe_seconds * 1000:.0f} ms")
    return seconds, pid


def measure(root: Path, size: int, kills: int, gap: float, master: keys.MasterKey,
            setup: Setup) -> dict[str, Any]:
    """One size, built, measured and removed: its row."""
    check_space(root, size)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{size // MIB}m-", dir=root))
    setup.directories.append(work)
    state, mnt = work / "state", work / "mnt"
    mnt.mkdir()
    progress(f"{size / GIB:g} GiB: building {state}")
    build_seconds = build(state, size, master)
    progress(f"built {size / GIB:g} GiB in {build_seconds:.1f} s "
             f"({size / MIB / build_seconds:.0f} MiB/s)")
    stored = sum(path.stat().st_blocks * 512 for path in state.rglob("*") if path.is_file())
    pid = mount(state, mnt, setup)
    start = time.monotonic()
    umount(mnt, pid, setup)
    umount_seconds = time.monotonic() - start
    start = time.monotonic()
    pid = mount(state, mnt, setup)
    mount_seconds = time.monotonic() - start
    after_mount = memory(pid)
    scan_seconds = scanned(protocol.socket_of(str(mnt)))
    after_scan = memory(pid)
    # The daemon takes the index pages the scan read out of its page tables.
    time.sleep(UNLOCK_INTERVAL + 1)
    settled = memory(pid)
    progress(f"remount {umount_seconds + mount_seconds:.2f} s "
             f"(umount {umount_seconds:.2f}, mount {mount_seconds:.2f}); "
             f"RSS {after_mount['VmRSS']:.0f} MiB; scanned in {scan_seconds:.1f} s more, "
             f"RSS {after_scan['VmRSS']:.0f} MiB ({after_scan['RssAnon']:.0f} its own), "
             f"{settled['VmRSS']:.0f} MiB {UNLOCK_INTERVAL + 1:g} s later")
    probe_seconds, pid = takeovers(mnt, state, pid, kills, gap, setup)
    after_takeover = memory(pid)
    umount(mnt, pid, setup)
    setup.mountpoints.remove(mnt)
    setup.remove(work)  # the standby gone, the state deleted before the next size
    gib = size / GIB
    return {
        "size_gib": gib,
        "state_bytes": stored,
        "build_seconds": build_seconds,
        "build_mib_per_second": size / MIB / build_seconds,
        "umount_seconds": umount_seconds,
        "mount_seconds": mount_seconds,
        "remount_seconds": umount_seconds + mount_seconds,
        "takeover_ms": [seconds * 1000 for seconds in probe_seconds],
        "takeover_median_ms": statistics.median(probe_seconds) * 1000,
        "takeover_worst_ms": max(probe_seconds) * 1000,
        "rss_mib": after_mount["VmRSS"],
        "hwm_mib": after_mount["VmHWM"],
        "locked_mib": after_mount["VmLck"],
        "rss_mib_per_gib": after_mount["VmRSS"] / gib,
        "scan_seconds": scan_seconds,
        "rss_scanned_mib": after_scan["VmRSS"],
        "anon_scanned_mib": after_scan["RssAnon"],
        "file_scanned_mib": after_scan["RssFile"],
        "locked_scanned_mib": after_scan["VmLck"],
        "anon_scanned_mib_per_gib": after_scan["RssAnon"] / gib,
        "rss_settled_mib": settled["VmRSS"],
        "file_settled_mib": settled["RssFile"],
        "rss_settled_mib_per_gib": settled["VmRSS"] / gib,
        "rss_after_takeover_mib": after_takeover["VmRSS"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["size GiB  build s  remount s  takeover median/worst ms  RSS MiB  "
             "scan s  scanned: RSS MiB  own MiB  own MiB/GiB  settled RSS MiB"]
    for row in rows:
        lines.append(f"{row['size_gib']:>8g}  {row['build_seconds']:>7.1f}  "
                     f"{row['remount_seconds']:>9.2f}  "
                     f"{row['takeover_median_ms']:>12.0f} / {row['takeover_worst_ms']:<9.0f}  "
                     f"{row['rss_mib']:>7.0f}  {row['scan_seconds']:>6.1f}  "
                     f"{row['rss_scanned_mib']:>16.0f}  {row['anon_scanned_mib']:>7.0f}  "
                     f"{row['anon_scanned_mib_per_gib']:>11.1f}  "
                     f"{row['rss_settled_mib']:>15.0f}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release,
            "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime())}


def run(chosen: list[int], root: Path | None, kills: int = 5, gap: float = 2.0
        ) -> dict[str, Any]:
    """Measure each size of *chosen* (bytes) in turn, under *root* (None: a fresh
    directory in /var/tmp); the figures. Refused before anything is built if
    a size would leave too little free space."""
    setup = Setup()
    credentials_before = os.environ.get("CREDENTIALS_DIRECTORY")
    atexit.register(setup.undo)
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="swapfs-scale-", dir="/var/tmp"))
            setup.directories.append(root)
        for size in chosen:  # refuse up front, before hours of building
            check_space(root, size)
        work = Path(tempfile.mkdtemp(prefix="scale-key-", dir=root))
        setup.directories.append(work)
        credentials = work / "credentials"
        credentials.mkdir(mode=0o700)
        master = keys.generate(credentials / keys.CREDENTIAL)
        os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)  # for every daemon
        rows = [measure(root, size, kills, gap, master, setup) for size in chosen]
        return {"machine": machine(), "kills": kills, "directory": str(root), "rows": rows}
    finally:
        setup.undo()
        if credentials_before is None:
            os.environ.pop("CREDENTIALS_DIRECTORY", None)
        else:
            os.environ["CREDENTIALS_DIRECTORY"] = credentials_before
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        atexit.unregister(setup.undo)


def sizes(text: str, unit: int = GIB) -> list[int]:
    """Comma-separated sizes in *unit*, as bytes (whole requests of the build)."""
    return [int(float(part) * unit) // (REQUEST_BLOCKS * BLOCK_SIZE)
            * (REQUEST_BLOCKS * BLOCK_SIZE) or REQUEST_BLOCKS * BLOCK_SIZE
            for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="remount, takeover and daemon memory by size stored",
        epilog="example: python tools/scale.py --sizes 1,4,16 --out results/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    chosen_sizes = parser.add_mutually_exclusive_group()
    chosen_sizes.add_argument("--sizes", default="1,4,16",
                       help="comma-separated GiB of unique data to store (default 1,4,16)")
    chosen_sizes.add_argument("--sizes-mib", help="the same in MiB (small runs, tests)")
    parser.add_argument("--dir", type=Path,
                        help="where the states go (default: a fresh directory in /var/tmp)")
    parser.add_argument("--kills", type=int, default=5, help="takeovers per size (default 5)")
    parser.add_argument("--gap", type=float, default=2.0,
                        help="seconds between a takeover and the next kill (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--out", type=Path, help="also write scale.json in this directory")
    args = parser.parse_args(argv)
    chosen = sizes(args.sizes_mib, MIB) if args.sizes_mib else sizes(args.sizes)
    if not chosen or args.kills < 1:
        parser.error("give at least one size and one kill")
    if os.geteuid() != 0:
        print("swapfs scale: mounting needs root", file=sys.stderr)
        return 2
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(chosen, args.dir, args.kills, args.gap)
    except Refused as exc:
        print(f"swapfs scale: refused: {exc}", file=sys.stderr)
        return 2
    except (ScaleError, TakeoverError, OSError, protocol.ControlError) as exc:
        print(f"swapfs scale: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swapfs scale: interrupted; everything it set up is undone", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else table(results["rows"]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
