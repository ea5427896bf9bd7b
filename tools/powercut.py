#!/usr/bin/env python3
"""swapfs powercut: cut a guest's power while it fsyncs swapfs files, and check what is left.

swapfs promises that an ``fsync`` survives power loss, and that after a
power cut the state mounts without a human and never returns wrong bytes.
This campaign tests both with real cuts: a QEMU guest (tools/guest.py) runs
swapfs on a state kept on a virtio disk (a raw image file, ext4 in the
guest), and the host kills QEMU with SIGKILL while the guest writes. What
the guest's kernel had not yet written to the disk is lost with it, as in
a power cut; what reached the image stays.

Each cycle is one boot of the guest, which runs this file (``--guest``):

1. **check** what the previous cycle left: ``swapfs fsck --json`` on the
   state (read only: exit code and problems recorded), then ``swapfs
   mount``, then every block of the files read with ``O_DIRECT`` and
   judged against what the host knows was written and acknowledged;
2. **write**: batches of writes to two files of one chain (data, some of
   it the same in both files so that it is deduplicated, zeros, and
   punched holes), each batch followed by an ``fsync`` of both files, and
   an acknowledgement on the console once the fsyncs have returned. Each
   data block describes itself: its number, its version (cycle, batch,
   operation) and a checksum of both, so that any other bytes are wrong.
   Before a batch starts it is announced, the console drained
   (``tcdrain``): nothing is ever written that the host was not told of.
3. the host kills QEMU at a random moment after the first acknowledgement.

A block is then judged, in the next cycle, as

- **wrong bytes**: neither zeros nor a version that was written there (a
  checksum that does not match, another block's data, a version never
  written to that block of that file);
- **missing acknowledgement**: older than the last version acknowledged
  for it (an fsync that returned and did not last), zeros where a data
  version was acknowledged and no zeros were written since, or ``EIO``
  where anything was acknowledged. An acknowledgement also covers what the
  previous check read (an fsync makes everything before it durable);
- ``EIO`` is also counted on its own.

A state that ``swapfs mount`` refuses needs a human: it is counted, and
the lane starts again on a fresh state (a fresh ext4 image) so that the
remaining cuts still test something. The cuts are shared among lanes
(``--lanes``, two by default: a guest under TCG keeps one CPU busy), each
a guest after another on a state disk of its own; the last boot of a lane
only checks. ``--no-fsync`` is the control: batches acknowledged without
an fsync, whose cuts must be seen to lose acknowledged writes, or the
campaign could not tell.

Runs repeat: every plan of writes and every cut's delay comes from
``--seed`` (the guest's speed still varies, so the moment of a cut within
the writes does too). It prints a table per cycle, and with ``--json`` or
``--out`` the figures as JSON::

    python tools/powercut.py                      # 20 cuts
    python tools/powercut.py --cuts 5 --seed 7 --out results/

Runs as root (the guest reads the host's files over 9p as QEMU's user).
Exit codes: 0 nothing wrong found, 1 something was (or a cycle failed), 2
refused (not root, QEMU or a kernel missing). Whatever it started is
stopped (QEMU by its pid) and its work directory removed (``--keep``
keeps it) on success, failure, Ctrl-C and SIGTERM.
"""

import argparse
import bisect
import ctypes
import ctypes.util
import errno
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.guest import Guest, GuestError, kill_all, missing, precompile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4096
MIB = 1 << 20
#: The chain and its two files.
CHAIN = "pc"
FILES = ("a.swap", "b.swap")
#: Where the guest mounts its state disk and swapfs.
DISK_MOUNT = "/tmp/disk"
MOUNTPOINT = "/tmp/m"
#: Most writes land in the first blocks of a file, so that blocks are
#: overwritten, freed and their slots reused across batches and cycles.
HOT_BLOCKS = 1024
#: Bytes read per O_DIRECT request by the check.
READ_BYTES = MIB
PREFIX = "powercut:"

_HEADER = struct.Struct("<8sQIII4x")  # magic, block, cycle, batch, op
_MAGIC = b"SWPCUT01"
_FILL = BLOCK - _HEADER.size - 32
ZERO = bytes(BLOCK)


# -- what the writer writes, and when --------------------------------------------------

Key = tuple[int, int, int]  # (cycle, batch, op): a version; later ones are greater


def content(block: int, key: Key) -> bytes:
    """Version *key* of *block*: a header naming both, a filler derived from
    the header, and a checksum of all that."""
    header = _HEADER.pack(_MAGIC, block, *key)
    filler = hashlib.blake2b(header).digest() * (_FILL // 64)
    body = header + filler
    return body + hashlib.blake2b(body, digest_size=32).digest()


def decode(data: bytes, block: int) -> Key | None:
    """The version that *data* holds of *block*; None if it is not one
    (a bad checksum, another block's data, any other bytes)."""
    body, checksum = data[:-32], data[-32:]
    if hashlib.blake2b(body, digest_size=32).digest() != checksum:
        return None
    magic, number, cycle, batch, op = _HEADER.unpack_from(body)
    if magic != _MAGIC or number != block or content(block, (cycle, batch, op)) != data:
        return None
    return cycle, batch, op


@dataclass(frozen=True)
class Op:
    """One operation of a batch: *count* blocks from *start* of *files*."""

    index: int
    kind: str  # "data", "zero" (written as zeros) or "punch" (a hole punched)
    files: tuple[str, ...]
    start: int
    count: int


def plan(seed: str, cycle: int, batch: int, file_blocks: int) -> list[Op]:
    """The operations of batch *batch* of cycle *cycle*: the same for the
    same arguments, on the host and in the guest."""
    rng = random.Random(f"{seed}:{cycle}:{batch}")
    ops = []
    for index in range(rng.randint(1, 6)):
        kind = rng.choices(("data", "zero", "punch"), (8, 1, 1))[0]
        files = rng.choices(((FILES[0],), (FILES[1],), FILES), (9, 7, 4))[0]
        count = rng.choice((1, 1, 1, 2, 4, 8, 16))
        region = HOT_BLOCKS if rng.random() < 0.7 else file_blocks
        start = rng.randrange(0, min(region, file_blocks) - count + 1)
        ops.append(Op(index, kind, files, start, count))
    return ops


@dataclass
class CycleRecord:
    """What the host learned of one cycle: the batches begun and
    acknowledged (-1: none), and the versions newer than the acknowledged
    ones that its check read (file, block, cycle, batch, op)."""

    cycle: int
    begun: int = -1
    acked: int = -1
    newer: list[list[Any]] = field(default_factory=list)


class Model:
    """For each block of each file: the last version acknowledged (the
    floor, with its kind), every data version written there, and every
    version that wrote zeros there, from the records of the cycles so far
    (since the state was made)."""

    def __init__(self, seed: str, file_blocks: int, history: list[CycleRecord]) -> None:
        self.floor: dict[tuple[str, int], tuple[Key, str]] = {}
        self.data: dict[tuple[str, int], set[Key]] = {}
        self.zeros: dict[tuple[str, int], list[Key]] = {}
        #: The files exist for sure once a batch was acknowledged.
        self.files_acked = any(record.acked >= 0 for record in history)
        for record in history:
            if record.acked >= 0:  # its fsyncs made what its check read durable
                for name, block, cycle, batch, op in record.newer:
                    self._raise(name, block, (cycle, batch, op), "data")
            for batch in range(record.begun + 1):
                for op in plan(seed, record.cycle, batch, file_blocks):
                    version = (record.cycle, batch, op.index)
                    for name in op.files:
                        for block in range(op.start, op.start + op.count):
                            if op.kind == "data":
                                self.data.setdefault((name, block), set()).add(version)
                            else:
                                self.zeros.setdefault((name, block), []).append(version)
                            if batch <= record.acked:
                                self._raise(name, block, version, op.kind)
        for keys in self.zeros.values():
            keys.sort()

    def _raise(self, name: str, block: int, key: Key, kind: str) -> None:
        current = self.floor.get((name, block))
        if current is None or current[0] < key:
            self.floor[(name, block)] = (key, "data" if kind == "data" else "zero")

    def judge(self, name: str, block: int, data: bytes | None) -> tuple[str, Key | None]:
        """("ok" | "wrong" | "missing" | "eio-missing" | "eio", version) of a
        block that read as *data* (None: EIO)."""
        floor = self.floor.get((name, block))
        if data is None:
            return ("eio" if floor is None else "eio-missing"), None
        if data == ZERO:
            if floor is None or floor[1] == "zero":
                return "ok", None
            zeros = self.zeros.get((name, block), [])
            later = bisect.bisect_right(zeros, floor[0]) < len(zeros)
            return ("ok" if later else "missing"), None
        key = decode(data, block)
        if key is None or key not in self.data.get((name, block), ()):
            return "wrong", key
        if floor is not None and key < floor[0]:
            return "missing", key
        return "ok", key

    def is_newer(self, name: str, block: int, key: Key) -> bool:
        floor = self.floor.get((name, block))
        return floor is None or floor[0] < key


# -- the guest's side ----------------------------------------------------------------


def say(kind: str, payload: Any = None) -> None:
    """One line on the console, drained to the host before this returns
    (``tcdrain``), so that the host has it before anything that follows."""
    text = f"{PREFIX} {kind}" if payload is None else f"{PREFIX} {kind} " + json.dumps(
        payload, separators=(",", ":"))
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if os.isatty(sys.stdout.fileno()):
        termios.tcdrain(sys.stdout.fileno())


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch(fd: int, offset: int, length: int) -> None:
    """fallocate(2) punching a hole, as a discard through a loop device does
    (the os module has only posix_fallocate)."""
    if _libc.fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def swapfs_command(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "swapfs"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "swapfs.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def read_blocks(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """Every block of *path* (block number, bytes; None for EIO), read with
    O_DIRECT so that swapfs answers each; a request that fails is read
    again block by block, so that EIO is told per block."""
    size = path.stat().st_size
    buffer = mmap.mmap(-1, READ_BYTES)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(0, size, READ_BYTES):
            length = min(READ_BYTES, size - offset)
            try:
                done = os.preadv(fd, [memoryview(buffer)[:length]], offset)
                chunk = bytes(buffer[:done]).ljust(length, b"\0")
                if chunk == bytes(length):  # most of a sparse file: no block to copy
                    for at in range(0, length, BLOCK):
                        yield (offset + at) // BLOCK, ZERO
                    continue
                for at in range(0, length, BLOCK):
                    yield (offset + at) // BLOCK, chunk[at:at + BLOCK]
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                for at in range(0, length, BLOCK):
                    yield (offset + at) // BLOCK, _read_one(fd, buffer, offset + at)
    finally:
        os.close(fd)


def _read_one(fd: int, buffer: mmap.mmap, offset: int) -> bytes | None:
    try:
        done = os.preadv(fd, [memoryview(buffer)[:BLOCK]], offset)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        return None
    return bytes(buffer[:done]).ljust(BLOCK, b"\0")


def check(model: Model, mnt: Path, file_blocks: int) -> dict[str, Any]:
    """Read every block of both files and judge it; the counts, a few
    examples of each problem, and the versions newer than acknowledged."""
    counts = {"blocks": 0, "data": 0, "zero": 0, "wrong": 0, "missing": 0, "eio": 0,
              "missing_files": 0}
    examples: list[str] = []
    newer: list[list[Any]] = []
    for name in FILES:
        path = mnt / CHAIN / name
        if not path.exists():
            if model.files_acked:
                counts["missing_files"] += 1
                counts["missing"] += sum(1 for key in model.floor if key[0] == name)
                examples.append(f"{name}: missing")
            continue
        if path.stat().st_size != file_blocks * BLOCK:
            examples.append(f"{name}: size {path.stat().st_size}")
            counts["wrong"] += 1
        for block, data in read_blocks(path):
            counts["blocks"] += 1
            verdict, key = model.judge(name, block, data)
            counts["zero" if data == ZERO else "eio" if data is None else "data"] += 1
            if verdict in ("wrong", "missing", "eio-missing"):
                counts["missing" if verdict == "eio-missing" else verdict] += 1
                if len(examples) < 20:
                    read = ("EIO" if data is None else "zeros" if data == ZERO
                            else key or "other bytes")
                    examples.append(f"{name} block {block}: {verdict}, read {read}, "
                                    f"acknowledged {model.floor.get((name, block))}")
            elif key is not None and model.is_newer(name, block, key):
                newer.append([name, block, *key])
    return {"counts": counts, "examples": examples, "newer": newer}


def write(seed: str, cycle: int, mnt: Path, file_blocks: int, seconds: float,
          fsync: bool = True) -> None:
    """Batches of writes, each fsynced (unless not *fsync*: the control) and
    acknowledged, until killed (or *seconds* have passed: then it says so
    and stops)."""
    chain = mnt / CHAIN
    chain.mkdir(exist_ok=True)
    fds = {}
    for name in FILES:
        fds[name] = os.open(chain / name, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        if os.fstat(fds[name]).st_size != file_blocks * BLOCK:
            os.ftruncate(fds[name], file_blocks * BLOCK)
    buffer = mmap.mmap(-1, 16 * BLOCK)
    deadline = time.monotonic() + seconds
    batch = 0
    while time.monotonic() < deadline:
        say("begin", batch)
        for op in plan(seed, cycle, batch, file_blocks):
            length = op.count * BLOCK
            if op.kind == "data":
                for i in range(op.count):
                    buffer[i * BLOCK:(i + 1) * BLOCK] = content(op.start + i,
                                                                (cycle, batch, op.index))
            elif op.kind == "zero":
                buffer[:length] = bytes(length)
            for name in op.files:
                if op.kind == "punch":
                    punch(fds[name], op.start * BLOCK, length)
                else:
                    os.pwritev(fds[name], [memoryview(buffer)[:length]], op.start * BLOCK)
        for fd in fds.values() if fsync else ():
            os.fsync(fd)
        say("ack", batch)
        batch += 1
    say("writer-stopped", batch)


def guest_cycle(spec: dict[str, Any]) -> int:
    """One boot's work (run inside the guest): check, then write until cut."""
    say("up", float(Path("/proc/uptime").read_text().split()[0]))
    disk, mnt = Path(DISK_MOUNT), Path(MOUNTPOINT)
    disk.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "ext4", spec["device"], str(disk)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        say("disk", {"ok": False, "error": result.stderr.strip()})
        return 1
    state = disk / "state"
    key = ["--key-file", spec["key_file"]]
    file_blocks = spec["file_blocks"]
    history = [CycleRecord(**record) for record in spec["history"]]
    if (state / "index.lmdb").exists():
        start = time.monotonic()
        fsck = swapfs_command("fsck", "--state", str(state), "--json", *key)
        try:
            report = json.loads(fsck.stdout)
        except ValueError:
            report = {"problems": [], "error": (fsck.stdout + fsck.stderr).strip()[-2000:]}
        problems = report.get("problems", [])
        say("fsck", {"rc": fsck.returncode, "seconds": time.monotonic() - start,
                     "blocks_checked": report.get("blocks_checked"),
                     # The serious ones first: the list is cut at 20.
                     "problems": sorted(problems, key=lambda problem: bool(
                         problem.get("info")))[:20],
                     "problem_count": len(problems),
                     # Not those for information (what the next mount fixes by itself).
                     "serious_count": sum(1 for problem in problems if not problem.get("info")),
                     "error": report.get("error")})
    start = time.monotonic()
    mounted = swapfs_command("mount", "--state", str(state), *key, str(mnt))
    log = state / "daemon.log"
    say("mount", {"rc": mounted.returncode, "seconds": time.monotonic() - start,
                  "error": mounted.stderr.strip()[-2000:],
                  "log": log.read_text(errors="replace")[-2000:]
                  if mounted.returncode and log.exists() else ""})
    if mounted.returncode != 0:
        return 1
    if history:
        start = time.monotonic()
        model = Model(spec["seed"], file_blocks, history)
        report = check(model, mnt, file_blocks)
        report["seconds"] = time.monotonic() - start
        say("check", report)
    if spec["write_seconds"] > 0:
        write(spec["seed"], spec["cycle"], mnt, file_blocks, spec["write_seconds"],
              spec["fsync"])
        return 0
    unmounted = swapfs_command("umount", str(mnt))
    subprocess.run(["umount", str(disk)], check=False)
    say("done", {"umount_rc": unmounted.returncode})
    return 0


# -- the host's side -----------------------------------------------------------------

_LINE = re.compile(rf"{PREFIX} (\S+)(?: (.*))?$")


@dataclass
class Cycle:
    """The figures of one boot."""

    lane: int
    cycle: int
    epoch: int  # which fresh state (a new one after a state that did not mount)
    boot_seconds: float | None = None  # QEMU started -> the guest's script up
    fsck: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    begun: int = -1
    acked: int = -1
    first_ack_seconds: float | None = None  # QEMU started -> the first ack
    cut_delay: float | None = None  # planned: first ack -> the cut
    cut_seconds: float | None = None  # QEMU started -> the cut
    seconds: float = 0.0  # the whole cycle
    error: str | None = None

    @property
    def wrong(self) -> int:
        return int(self.check["counts"]["wrong"]) if self.check else 0

    @property
    def missing(self) -> int:
        return int(self.check["counts"]["missing"]) if self.check else 0

    @property
    def needs_human(self) -> bool:
        return self.mount is not None and self.mount["rc"] != 0


@dataclass(frozen=True)
class Settings:
    """What every lane's cycles share."""

    file_mib: int = 64
    write_seconds: float = 4.0
    memory_mib: int = 1024
    cpus: int = 1
    disk_mib: int = 1024
    boot_timeout: float = 300.0
    #: False for the control: acknowledgements without fsyncs, which a cut
    #: should be seen to lose (else the campaign could not tell).
    fsync: bool = True


class Campaign:
    """One lane of cycles, on a state disk of its own: the guests, the
    records. Lanes run side by side, each in a thread of its own (which
    starts and kills its own guests); *stop* ends them all."""

    def __init__(self, lane: int, workdir: Path, seed: str, settings: Settings,
                 key_file: Path, stop: threading.Event) -> None:
        self.lane = lane
        self.workdir = workdir
        self.seed = seed
        self.settings = settings
        self.file_blocks = settings.file_mib * MIB // BLOCK
        self.key_file = key_file
        self.stop = stop
        self.image = workdir / "state.img"
        self.history: list[CycleRecord] = []
        self.epoch = 0
        self.cycles: list[Cycle] = []

    def fresh_state(self) -> None:
        """A new, empty ext4 image: the next boot makes a new state on it."""
        with open(self.image, "wb") as image:
            image.truncate(self.settings.disk_mib * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(self.image)], check=True, capture_output=True)
        self.history = []

    def run(self, cuts: int, progress: Callable[[Cycle], None] | None = None) -> None:
        """*cuts* cycles that end in a cut, and one that only checks the last."""
        self.workdir.mkdir()
        self.fresh_state()
        for number in range(cuts + 1):
            if self.stop.is_set():
                return
            cycle = self.boot(number, last=number == cuts)
            if progress is not None and not self.stop.is_set():
                progress(cycle)

    def boot(self, number: int, last: bool) -> Cycle:
        """One cycle: boot, let the guest check and write, cut its power."""
        settings = self.settings
        cycle = Cycle(self.lane, number, self.epoch)
        cut_delay = random.Random(f"{self.seed}:cut:{number}").uniform(0, settings.write_seconds)
        spec = {"cycle": number, "seed": self.seed, "device": "/dev/vda",
                "key_file": str(self.key_file), "file_blocks": self.file_blocks,
                "write_seconds": 0 if last else settings.write_seconds * 3 + 60,
                "fsync": settings.fsync,
                "history": [asdict(record) for record in self.history]}
        spec_path = self.workdir / f"cycle-{number}.json"
        spec_path.write_text(json.dumps(spec))
        # -S: the guest's side needs only the standard library (it runs swapfs
        # as commands), and the site's start-up is slow under TCG.
        script = (f"cd {ROOT} && exec {sys.executable} -S {Path(__file__).resolve()} "
                  f"--guest {spec_path}")
        guest_dir = self.workdir / f"guest-{number}"
        guest_dir.mkdir()
        start = time.monotonic()
        cut_at: float | None = None
        with Guest(script, [self.image], settings.memory_mib, settings.cpus,
                   guest_dir) as guest:
            deadline = start + settings.boot_timeout
            while not self.stop.is_set():
                now = time.monotonic()
                until = (cut_at if cut_at is not None else deadline) - now
                if until <= 0:
                    if cut_at is None:
                        cycle.error = f"no acknowledgement within {settings.boot_timeout:.0f} s"
                    guest.kill()  # the power cut
                    cycle.cut_seconds = time.monotonic() - start
                    break
                try:
                    line = guest.readline(min(until, 1.0))
                except TimeoutError:
                    continue
                if line is None:
                    break
                self._take(cycle, line, start)
                if cycle.acked >= 0 and cut_at is None and not last:
                    cycle.first_ack_seconds = time.monotonic() - start
                    cycle.cut_delay = cut_delay
                    cut_at = time.monotonic() + cut_delay
            guest.kill()
            for line in guest.lines(30):  # what QEMU printed before it died
                self._take(cycle, line, start)
            if last and guest.status != 0 and cycle.error is None:
                cycle.error = f"the check-only boot ended with status {guest.status}"
            if cycle.error or (cycle.mount is not None and cycle.mount["rc"] != 0):
                tail = guest.transcript.read_text(errors="replace").splitlines()[-40:]
                cycle.error = (cycle.error or "swapfs mount failed") + "\n" + "\n".join(tail)
        cycle.seconds = time.monotonic() - start
        if self.stop.is_set():
            return cycle  # interrupted: neither a cut nor a check
        record = CycleRecord(number, cycle.begun, cycle.acked,
                             cycle.check["newer"] if cycle.check else [])
        if cycle.needs_human or (cycle.mount is None and not last):
            self.epoch += 1
            self.fresh_state()  # the rest of the lane still tests something
        else:
            self.history.append(record)
        self.cycles.append(cycle)
        return cycle

    def _take(self, cycle: Cycle, line: str, start: float) -> None:
        matched = _LINE.search(line)
        if matched is None:
            return
        kind = matched.group(1)
        try:
            payload = json.loads(matched.group(2) or "null")
        except ValueError:
            # Another line (a kernel message) cut into it: what it said is not
            # known, and a batch the host was not told of would look wrong.
            cycle.error = f"a garbled console line: {line!r}"
            return
        if kind == "up":
            cycle.boot_seconds = time.monotonic() - start
        elif kind == "begin":
            cycle.begun = max(cycle.begun, int(payload))
        elif kind == "ack":
            cycle.acked = max(cycle.acked, int(payload))
            cycle.begun = max(cycle.begun, cycle.acked)
        elif kind in ("fsck", "mount", "check"):
            setattr(cycle, kind, payload)
        elif kind == "disk":
            cycle.error = f"the state disk did not mount: {payload['error']}"
        elif kind == "writer-stopped":
            cycle.error = "the writer stopped before the cut"


def _swapfs() -> list[str]:
    script = Path(sys.executable).parent / "swapfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "swapfs.cli"]


def summary(cycles: list[Cycle]) -> dict[str, Any]:
    checked = [cycle for cycle in cycles if cycle.check is not None]
    fscked = [cycle for cycle in cycles if cycle.fsck is not None]
    per_cycle = [cycle.seconds for cycle in cycles]
    return {
        "cuts": sum(1 for cycle in cycles if cycle.acked >= 0),
        "checks": len(checked),
        "wrong_blocks": sum(cycle.wrong for cycle in cycles),
        "missing_acks": sum(cycle.missing for cycle in cycles),
        "eio_blocks": sum(int(cycle.check["counts"]["eio"]) for cycle in checked
                          if cycle.check is not None),
        # Versions newer than acknowledged that a check read: the cuts came
        # while writes were on their way.
        "newer_blocks": sum(len(cycle.check["newer"]) for cycle in checked
                            if cycle.check is not None),
        "needs_human": sum(1 for cycle in cycles if cycle.needs_human),
        "fsck_not_clean": sum(1 for cycle in fscked if cycle.fsck and cycle.fsck["rc"] != 0),
        "fsck_serious_problems": sum(int(cycle.fsck.get("serious_count") or 0)
                                     for cycle in fscked if cycle.fsck),
        "fsck_exit_codes": sorted({cycle.fsck["rc"] for cycle in fscked if cycle.fsck}),
        "failed_cycles": sum(1 for cycle in cycles if cycle.error),
        "acked_batches": sum(cycle.acked + 1 for cycle in cycles),
        "seconds": sum(per_cycle),
        "seconds_per_cycle": sum(per_cycle) / len(per_cycle) if per_cycle else 0.0,
    }


def table(cycles: list[Cycle]) -> str:
    lines = ["lane  cycle  boot s  fsck  mount  blocks  data  wrong  missing  eio  "
             "acked  cut after s  cycle s"]
    for cycle in cycles:
        counts = cycle.check["counts"] if cycle.check else None
        lines.append(
            f"{cycle.lane:>4}  {cycle.cycle:>5}  {_shown(cycle.boot_seconds, '6.1f')}  "
            f"{cycle.fsck['rc'] if cycle.fsck else '-':>4}  "
            f"{('ok' if cycle.mount['rc'] == 0 else 'FAIL') if cycle.mount else '-':>5}  "
            f"{counts['blocks'] if counts else '-':>6}  {counts['data'] if counts else '-':>4}  "
            f"{counts['wrong'] if counts else '-':>5}  {counts['missing'] if counts else '-':>7}  "
            f"{counts['eio'] if counts else '-':>3}  {cycle.acked + 1:>5}  "
            f"{_shown(cycle.cut_delay, '11.1f')}  {cycle.seconds:>7.1f}"
            + (f"  error: {cycle.error.splitlines()[0]}" if cycle.error else ""))
    return "\n".join(lines)


def _shown(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else "-".rjust(width)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(cuts: int, seed: int, settings: Settings, lanes: int = 2, keep: bool = False,
        progress: Callable[[Cycle], None] | None = None) -> dict[str, Any]:
    """*cuts* power cuts over *lanes* lanes side by side, each cut checked
    by the next boot of its lane; the figures. The work directory is kept
    (and named) with *keep* or when a cycle failed."""
    workdir = Path(tempfile.mkdtemp(prefix="swapfs-powercut-", dir="/var/tmp"))
    previous = signal.signal(signal.SIGTERM, _interrupted)
    stop = threading.Event()
    key_file = workdir / "master.key"
    campaigns = [Campaign(lane, workdir / f"lane-{lane}", f"{seed}/{lane}", settings, key_file,
                          stop) for lane in range(lanes)]
    failures: list[BaseException] = []

    def lane_run(campaign: Campaign, count: int) -> None:
        try:
            campaign.run(count, progress)
        except Exception as exc:  # handed to the main thread, which raises it
            failures.append(exc)
            stop.set()

    start = time.monotonic()
    threads = [threading.Thread(target=lane_run, name=f"lane-{campaign.lane}",
                                args=(campaign, cuts // lanes + (lane < cuts % lanes)))
               for lane, campaign in enumerate(campaigns)]
    try:
        precompile(ROOT / "swapfs", ROOT / "mountd", ROOT / "tools")
        made = subprocess.run([*_swapfs(), "keygen", str(key_file)], capture_output=True,
                              text=True)
        if made.returncode != 0:
            raise GuestError(f"swapfs keygen: {made.stderr.strip()}")
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # in slices, so that Ctrl-C and SIGTERM are seen
        if failures:
            raise failures[0]
    except BaseException:
        _stop_lanes(stop, threads)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        _stop_lanes(stop, threads)
        signal.signal(signal.SIGTERM, previous)
    cycles = [cycle for campaign in campaigns for cycle in campaign.cycles]
    failed = any(cycle.error for cycle in cycles)
    if not keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"seed": seed, "cuts_asked": cuts, "lanes": lanes, "settings": asdict(settings),
            "workdir": str(workdir) if keep or failed else None,
            "wall_seconds": time.monotonic() - start,
            "summary": summary(cycles), "cycles": [asdict(cycle) for cycle in cycles]}


def _stop_lanes(stop: threading.Event, threads: list[threading.Thread]) -> None:
    """Stop every lane and its guest, and wait for the lanes to end (before
    their work directory goes)."""
    stop.set()
    kill_all()
    for thread in threads:
        if thread.is_alive():
            thread.join(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="power cuts of a QEMU guest writing and fsyncing swapfs files",
        epilog="example: python tools/powercut.py --cuts 20 --seed 1 --out results/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, default=20, help="power cuts (default 20)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the run's seed (default: a random one, printed)")
    parser.add_argument("--file-mib", type=int, default=64,
                        help="logical size of each of the two files (default 64)")
    parser.add_argument("--write-seconds", type=float, default=4.0,
                        help="a cut comes up to this long after the first "
                             "acknowledgement (default 4)")
    parser.add_argument("--lanes", type=int, default=2,
                        help="guests running side by side, each on a state of its own "
                             "(default 2)")
    parser.add_argument("--memory-mib", type=int, default=1024, help="guest RAM (default 1024)")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per guest (default 1)")
    parser.add_argument("--no-fsync", dest="fsync", action="store_false",
                        help="the control: acknowledge batches without fsyncing them "
                             "(cuts should then be seen to lose acknowledged writes)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (the image, the consoles)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--out", type=Path, help="also write powercut.json in this directory")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest is not None:
        return guest_cycle(json.loads(args.guest.read_text()))
    if args.cuts < 1 or not 1 <= args.lanes <= args.cuts:
        parser.error("at least one cut, and from one lane to one per cut")
    if os.geteuid() != 0:
        print("swapfs powercut: needs root (the guest reads the host's files)", file=sys.stderr)
        return 2
    lacks = missing()
    if lacks:
        print(f"swapfs powercut: refused: missing {'; '.join(lacks)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"swapfs powercut: seed {seed}", file=sys.stderr)

    print(table([]), file=sys.stderr, flush=True)

    def progress(cycle: Cycle) -> None:
        print(table([cycle]).splitlines()[1], file=sys.stderr, flush=True)

    try:
        settings = Settings(args.file_mib, args.write_seconds, args.memory_mib, args.cpus,
                            fsync=args.fsync)
        results = run(args.cuts, seed, settings, args.lanes, args.keep, progress)
    except (GuestError, OSError, subprocess.CalledProcessError) as exc:
        print(f"swapfs powercut: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swapfs powercut: interrupted; every guest was stopped", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        cycles = [Cycle(**cycle) for cycle in results["cycles"]]
        print(table(cycles))
        print(json.dumps(results["summary"], indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "powercut.json").write_text(json.dumps(results, indent=2) + "\n")
    found = results["summary"]
    bad = found["wrong_blocks"] or found["missing_acks"] or found["needs_human"] \
        or found["failed_cycles"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
