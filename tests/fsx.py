"""Random file operations on a real swapfs mount, checked against a model.

In the spirit of xfstests' fsx (which Debian does not package): a seeded
random sequence of operations on a few swap files of one chain, each file
shadowed by a ``bytearray`` that says what every byte must be. Every read
is compared with the model at once; the whole of every file, its size and
the chain's figures (``stats``) are compared at checkpoints: every
:data:`CHECK_EVERY` operations, and after each restart of the daemon, which
is a clean unmount and mount, a SIGKILL and mount, or a SIGKILL that a
standby's new daemon takes over while the files stay open. At the end the
mount goes and the offline fsck must find nothing.

The operations, each through the system calls a program would make:

- writes with ``pwrite`` (buffered), ``O_DIRECT`` (aligned), a shared
  mapping (within the size) and ``copy_file_range`` from another file, at
  aligned and unaligned offsets and lengths, past the end too; their data is
  random, all zeros, blocks repeated from a small palette (so whole blocks
  deduplicate) or bytes of another file;
- reads, buffered (across the end of the file), ``O_DIRECT`` and through a
  mapping;
- ``ftruncate`` up and down to unaligned sizes; ``fallocate`` with
  ``PUNCH_HOLE | KEEP_SIZE``, ``ZERO_RANGE`` with and without ``KEEP_SIZE``,
  and plain allocation (mode 0 and ``KEEP_SIZE``); ``fsync``;
- clones (full and ``--empty``) through the control socket, as ``swapfs
  clone`` makes them; create, rename (over a file too), unlink while open,
  close of an unlinked file, close and open again.

An operation that fails or a byte that differs raises :class:`FsxFailure`,
whose message names the seed and the last :data:`HISTORY` operations, so
``python -m tests.fsx --seed N --ops M`` replays the run. The sequence
depends on the seed alone, never on timing.
"""

import argparse
import collections
import contextlib
import functools
import mmap
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from swapfs.control import protocol
from tests.mounting import BLOCK, Mount, aligned_buffer, fallocate, mounted, wait_until

# fallocate(2) modes (linux/falloc.h).
KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10

#: The chain (a directory at the root of the mount) the files live in.
CHAIN = "fsx"
#: Largest size a file reaches, unaligned so that the last block is partial.
MAX_SIZE = 160 * BLOCK + 1234
#: Longest single write, read or range.
MAX_LENGTH = 24 * BLOCK
#: Named files kept between these bounds (files unlinked while open come on top).
MIN_FILES, MAX_FILES = 2, 6
#: Blocks a palette write repeats, so that whole blocks are stored once.
PALETTE = 6
#: Operations between two full checks.
CHECK_EVERY = 400
#: Operations the failure message lists.
HISTORY = 20
#: The ways to restart the daemon, in the order a run uses them.
RESTARTS = ("remount", "kill", "takeover")
#: How often each operation is chosen, relatively. Creating, cloning and
#: unlinking keep the named files between MIN_FILES and MAX_FILES; closing
#: an unlinked file is weighed by how many there are.
WEIGHTS = {
    "write": 30, "write direct": 6, "write mapped": 4, "copy range": 4,
    "read": 18, "read direct": 8, "read mapped": 4,
    "truncate": 6, "punch": 5, "zero range": 5, "allocate": 2, "fsync": 2,
    "reopen": 2, "rename": 1, "clone": 3, "create": 1, "unlink": 2, "close unlinked": 3,
}


class FsxFailure(AssertionError):
    """A byte, a size or a figure differed from the model, or an operation failed."""


@dataclass
class File:
    """One swap file: its model and the descriptors kept open on it."""

    label: str  # stable name in the history: "f3"
    name: str | None  # its name in the chain; None once unlinked (kept alive by fd)
    data: bytearray
    fd: int = -1  # buffered, O_RDWR
    direct: int = -1  # O_RDWR | O_DIRECT

    @property
    def shown(self) -> str:
        """The label, with the name when it differs: "f3", "f3(f5)", "f3(unlinked)"."""
        if self.name == self.label:
            return self.label
        return f"{self.label}({self.name or 'unlinked'})"


@dataclass
class Fsx:
    """One run: a mount, a seed, the files and their models."""

    mount: Mount
    seed: int
    rng: random.Random = field(init=False)
    files: list[File] = field(default_factory=list)
    history: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY))
    done: int = 0
    #: The arguments of :meth:`run`, for the failure message's replay line.
    replay: str = ""
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    _next_label: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.palette = [self.rng.randbytes(BLOCK) for _ in range(PALETTE)]

    # -- the run -------------------------------------------------------------------

    def run(self, ops: int, restarts: Sequence[str] = RESTARTS) -> None:
        """*ops* random operations with the *restarts* spread evenly among them;
        then unmount and require a clean fsck."""
        first = restarts.index("takeover") if "takeover" in restarts else len(restarts)
        if any(how != "takeover" for how in restarts[first:]):
            raise ValueError("a takeover leaves a standby on the mount: only takeovers follow it")
        self.replay = (f"python -m tests.fsx --seed {self.seed} --ops {ops} "
                       f"--restarts {shlex.quote(','.join(restarts))}")
        os.mkdir(self.mount.path(CHAIN))
        while len(self.files) < MIN_FILES:
            self._step("create", self.op_create)
        restart_at = {ops * (i + 1) // (len(restarts) + 1): how
                      for i, how in enumerate(restarts)}
        for number in range(ops):
            if number in restart_at:
                how = restart_at[number]
                self._step(how, functools.partial(self.restart, how))
            elif number and number % CHECK_EVERY == 0:
                self._step("check", self.check_all)
            name, op = self._choose()
            self._step(name, op)
        self._step("check", self.check_all)
        self._step("umount and fsck", self.finish)

    def _step(self, name: str, op: Callable[[], None]) -> None:
        """Run one operation; on any failure, raise with the seed and history."""
        self.done += 1
        self.history.append(f"#{self.done} {name}")
        try:
            op()
        except FsxFailure as exc:
            raise self._failure(str(exc)) from exc
        except (AssertionError, OSError, protocol.ControlError) as exc:
            raise self._failure(f"{type(exc).__name__}: {exc}") from exc
        self.counts[name] += 1

    def _note(self, detail: str) -> None:
        """Add what an operation chose to its line of the history, before it
        acts, so that the line of an operation that fails says what it did."""
        self.history[-1] += f" {detail}"

    def _failure(self, what: str) -> FsxFailure:
        last = "\n  ".join(self.history)
        return FsxFailure(f"fsx seed {self.seed} failed at operation {self.done}: {what}\n"
                          f"replay: {self.replay}\n"
                          f"last operations:\n  {last}")

    # -- choosing ------------------------------------------------------------------------

    def _choose(self) -> tuple[str, Callable[[], None]]:
        """The next operation, drawn by WEIGHTS (``"zero range"`` is ``op_zero_range``)."""
        named = len(self._named())
        weights = dict(WEIGHTS)
        if named >= MAX_FILES:
            weights["clone"] = weights["create"] = 0
        if named <= MIN_FILES:
            weights["unlink"] = 0
        weights["close unlinked"] *= len(self.files) - named
        name = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        op: Callable[[], None] = getattr(self, "op_" + name.replace(" ", "_"))
        return name, op

    def _named(self) -> list[File]:
        return [file for file in self.files if file.name is not None]

    def _pick(self, named: bool = False) -> File:
        return self.rng.choice(self._named() if named else self.files)

    def _offset(self, file: File, aligned: bool) -> int:
        """Mostly inside the file, sometimes at or past its end."""
        size = len(file.data)
        upper = min(MAX_SIZE - 1, size + 4 * BLOCK) if self.rng.random() < 0.2 else size
        offset = self.rng.randrange(max(upper, 1))
        return offset - offset % BLOCK if aligned else offset

    def _length(self, aligned: bool) -> int:
        """Short, around a block or long; whole blocks when *aligned*."""
        if aligned:
            return BLOCK * self.rng.choice((1, 1, 2, 3, self.rng.randint(4, MAX_LENGTH // BLOCK)))
        kind = self.rng.random()
        if kind < 0.3:
            return self.rng.randint(1, 100)
        if kind < 0.6:
            return self.rng.randint(BLOCK - 100, BLOCK + 100)
        return self.rng.randint(1, MAX_LENGTH)

    def _range(self, file: File, limit: int = MAX_SIZE) -> tuple[int, int]:
        """An offset and a length, aligned or not, ending at or before *limit*."""
        aligned = self.rng.random() < 0.4
        offset = min(self._offset(file, aligned), limit - 1)
        if aligned:
            offset -= offset % BLOCK
        length = min(self._length(aligned), limit - offset)
        return offset, length

    def _content(self, offset: int, length: int) -> tuple[bytes, str]:
        """Data to write at *offset*, and what kind it is."""
        kind = self.rng.random()
        if kind < 0.4:
            return self.rng.randbytes(length), "random"
        if kind < 0.55:
            return bytes(length), "zeros"
        if kind < 0.85:
            # Palette blocks laid on the file's block grid: whole ones deduplicate.
            head = offset % BLOCK
            count = -(-(head + length) // BLOCK)
            blocks = b"".join(self.rng.choice(self.palette) for _ in range(count))
            return blocks[head:head + length], "palette"
        source = self._pick()
        start = self.rng.randrange(max(len(source.data), 1))
        # At the same place in its block, so that whole blocks match.
        start = max(start - (start - offset) % BLOCK, 0)
        piece = bytes(source.data[start:start + length])
        return piece + bytes(length - len(piece)), f"copy of {source.label}@{start}"

    # -- model ---------------------------------------------------------------------------

    @staticmethod
    def _model_write(file: File, offset: int, data: bytes) -> None:
        if offset > len(file.data):
            file.data.extend(bytes(offset - len(file.data)))
        file.data[offset:offset + len(data)] = data

    @staticmethod
    def _model_resize(file: File, size: int) -> None:
        if size < len(file.data):
            del file.data[size:]
        else:
            file.data.extend(bytes(size - len(file.data)))

    @staticmethod
    def _model_zero(file: File, offset: int, length: int) -> None:
        end = min(offset + length, len(file.data))
        if offset < end:
            file.data[offset:end] = bytes(end - offset)

    def _expect(self, file: File, offset: int, got: bytes, want: bytes, how: str) -> None:
        if got == want:
            return
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        raise FsxFailure(
            f"{how} of {file.shown} at {offset}: {len(got)} bytes, model {len(want)}; first "
            f"difference at byte {offset + first} (block {(offset + first) // BLOCK}): "
            f"read {got[first:first + 16].hex()} model {want[first:first + 16].hex()}; "
            f"model size {len(file.data)}")

    def _expect_size(self, file: File) -> None:
        size = os.fstat(file.fd).st_size
        if size != len(file.data):
            raise FsxFailure(f"{file.shown} has size {size}, model {len(file.data)}")

    # -- files ---------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return str(self.mount.path(CHAIN, name))

    def _open(self, file: File) -> None:
        assert file.name is not None
        file.fd = os.open(self._path(file.name), os.O_RDWR)
        file.direct = os.open(self._path(file.name), os.O_RDWR | os.O_DIRECT)

    @staticmethod
    def _close(file: File) -> None:
        """Close both descriptors; on a dead mount the close may fail, which is fine."""
        for fd in (file.fd, file.direct):
            with contextlib.suppress(OSError):
                os.close(fd)
        file.fd = file.direct = -1

    def _close_all(self) -> None:
        for file in self.files:
            self._close(file)

    def _new_label(self) -> str:
        self._next_label += 1
        return f"f{self._next_label}"

    def op_create(self) -> None:
        label = self._new_label()
        self._note(label)
        file = File(label, label, bytearray())
        file.fd = os.open(self._path(label), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        file.direct = os.open(self._path(label), os.O_RDWR | os.O_DIRECT)
        self.files.append(file)

    def op_clone(self) -> None:
        """A clone as ``swapfs clone`` makes it: a request on the control socket."""
        source = self._pick(named=True)
        assert source.name is not None
        empty = self.rng.random() < 0.25
        label = self._new_label()
        self._note(f"{label} of {source.shown}{' empty' if empty else ''}")
        socket = protocol.socket_of(str(self.mount.mnt))
        protocol.request(socket, {"op": "clone", "source": f"{CHAIN}/{source.name}",
                                 "target": f"{CHAIN}/{label}", "empty": empty})
        data = bytearray(len(source.data)) if empty else bytearray(source.data)
        file = File(label, label, data)
        self.files.append(file)
        self._open(file)
        self._expect_size(file)

    def op_unlink(self) -> None:
        file = self._pick(named=True)
        assert file.name is not None
        self._note(f"{file.shown} (still open)")
        os.unlink(self._path(file.name))
        file.name = None

    def op_close_unlinked(self) -> None:
        file = self.rng.choice([file for file in self.files if file.name is None])
        self._note(file.label)
        self._close(file)
        self.files.remove(file)

    def op_rename(self) -> None:
        file = self._pick(named=True)
        assert file.name is not None
        others = [other for other in self._named() if other is not file]
        over = len(others) >= MIN_FILES and self.rng.random() < 0.5
        victim = self.rng.choice(others) if over else None
        target = victim.name if victim is not None else self._new_label()
        assert target is not None
        self._note(f"{file.shown} -> {target}" + (f" over {victim.label}" if victim else ""))
        os.rename(self._path(file.name), self._path(target))
        if victim is not None:
            victim.name = None  # still open: it lives on, unnamed
        file.name = target

    def op_reopen(self) -> None:
        file = self._pick(named=True)
        self._note(file.shown)
        self._close(file)
        self._open(file)
        self._expect_size(file)

    # -- data ----------------------------------------------------------------------------

    def op_write(self) -> None:
        file = self._pick()
        offset, length = self._range(file)
        data, kind = self._content(offset, length)
        self._note(f"{file.shown} {offset}+{length} {kind}")
        written = os.pwrite(file.fd, data, offset)
        if written != length:
            raise FsxFailure(f"pwrite of {length} bytes wrote {written}")
        self._model_write(file, offset, data)

    def op_write_direct(self) -> None:
        file = self._pick()
        offset = min(self._offset(file, aligned=True), (MAX_SIZE // BLOCK - 1) * BLOCK)
        length = min(self._length(aligned=True), (MAX_SIZE - offset) // BLOCK * BLOCK)
        data, kind = self._content(offset, length)
        self._note(f"{file.shown} {offset}+{length} {kind}")
        buffer = aligned_buffer(length)
        buffer[:] = data
        written = os.pwrite(file.direct, buffer, offset)
        if written != length:
            raise FsxFailure(f"O_DIRECT pwrite of {length} bytes wrote {written}")
        self._model_write(file, offset, data)

    def op_write_mapped(self) -> None:
        file = self._pick()
        size = len(file.data)
        if not size:
            self._note(f"{file.shown} (empty: nothing to map)")
            return
        offset, length = self._range(file, limit=size)
        data, kind = self._content(offset, length)
        self._note(f"{file.shown} {offset}+{length} {kind}")
        with mmap.mmap(file.fd, size, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            mapping[offset:offset + length] = data
            mapping.flush()  # msync: the daemon has the pages before the mapping goes
        self._model_write(file, offset, data)

    def op_copy_range(self) -> None:
        # Two files: copy_file_range refuses overlapping ranges of one file.
        source, target = self.rng.sample(self.files, 2)
        offset, length = self._range(target)
        start = self.rng.randrange(max(len(source.data), 1))
        if self.rng.random() < 0.5:
            start = max(start - (start - offset) % BLOCK, 0)
        self._note(f"{source.shown}@{start} -> {target.shown} {offset}+{length}")
        copied = os.copy_file_range(source.fd, target.fd, length, start, offset)
        want = bytes(source.data[start:start + length])
        if copied != len(want):
            raise FsxFailure(f"copy_file_range copied {copied} bytes, model {len(want)}")
        if want:  # copying nothing changes nothing, not even the size
            self._model_write(target, offset, want)

    def op_read(self) -> None:
        file = self._pick()
        offset, length = self._range(file)
        self._note(f"{file.shown} {offset}+{length}")
        got = os.pread(file.fd, length, offset)
        self._expect(file, offset, got, bytes(file.data[offset:offset + length]), "pread")
        self._expect_size(file)

    def op_read_direct(self) -> None:
        file = self._pick()
        offset = self._offset(file, aligned=True)
        length = self._length(aligned=True)
        self._note(f"{file.shown} {offset}+{length}")
        buffer = aligned_buffer(length)
        done = os.preadv(file.direct, [buffer], offset)
        want = bytes(file.data[offset:offset + length])
        self._expect(file, offset, bytes(buffer[:done]), want, "O_DIRECT read")

    def op_read_mapped(self) -> None:
        file = self._pick()
        size = len(file.data)
        if not size:
            self._note(f"{file.shown} (empty: nothing to map)")
            return
        offset, length = self._range(file, limit=size)
        self._note(f"{file.shown} {offset}+{length}")
        with mmap.mmap(file.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapping:
            got = mapping[offset:offset + length]
        self._expect(file, offset, got, bytes(file.data[offset:offset + length]),
                     "mapped read")

    def op_truncate(self) -> None:
        file = self._pick()
        kind = self.rng.random()
        if kind < 0.1:
            size = 0
        elif kind < 0.5:  # a little up or down from where it is
            size = len(file.data) + self.rng.randint(-2 * BLOCK, 2 * BLOCK)
        else:
            size = self.rng.randrange(MAX_SIZE)
        size = min(max(size, 0), MAX_SIZE)
        if self.rng.random() < 0.3:
            size -= size % BLOCK
        self._note(f"{file.shown} {len(file.data)} -> {size}")
        os.ftruncate(file.fd, size)
        self._model_resize(file, size)
        self._expect_size(file)

    def op_punch(self) -> None:
        file = self._pick()
        offset, length = self._range(file)
        self._note(f"{file.shown} {offset}+{length}")
        fallocate(file.fd, PUNCH_HOLE | KEEP_SIZE, offset, length)
        self._model_zero(file, offset, length)
        self._expect_size(file)

    def op_zero_range(self) -> None:
        file = self._pick()
        offset, length = self._range(file)
        keep = self.rng.random() < 0.5
        self._note(f"{file.shown} {offset}+{length}{' keep size' if keep else ''}")
        fallocate(file.fd, ZERO_RANGE | (KEEP_SIZE if keep else 0), offset, length)
        self._model_zero(file, offset, length)
        if not keep and offset + length > len(file.data):
            self._model_resize(file, offset + length)
        self._expect_size(file)

    def op_allocate(self) -> None:
        file = self._pick()
        offset, length = self._range(file)
        keep = self.rng.random() < 0.5
        self._note(f"{file.shown} {offset}+{length}{' keep size' if keep else ''}")
        fallocate(file.fd, KEEP_SIZE if keep else 0, offset, length)
        if not keep and offset + length > len(file.data):
            self._model_resize(file, offset + length)
        self._expect_size(file)

    def op_fsync(self) -> None:
        file = self._pick()
        self._note(file.shown)
        os.fsync(file.fd)

    # -- checkpoints ---------------------------------------------------------------------

    def _settle(self) -> None:
        """Wait until the daemon has handled the release of every file closed.

        FUSE sends releases in the background: ``close`` returns before the
        daemon has seen it, and a file unlinked while open is purged only
        then. The daemon counts the files the kernel holds open; once that is
        the number this run holds, every release has been handled.
        """
        held = len(self.files)
        if not wait_until(lambda: self.mount.status()["open_files"] == held):
            raise FsxFailure(f"the daemon counts {self.mount.status()['open_files']} "
                             f"files open, the run holds {held}")

    def check_all(self) -> None:
        """Every file read whole (buffered and O_DIRECT) against its model, and
        the chain's figures against what the models say it must store."""
        for file in self.files:
            self._expect_size(file)
            want = bytes(file.data)
            self._expect(file, 0, os.pread(file.fd, len(want) + BLOCK, 0), want, "pread")
            buffer = aligned_buffer((len(want) // BLOCK + 1) * BLOCK)
            done = os.preadv(file.direct, [buffer], 0)
            self._expect(file, 0, bytes(buffer[:done]), want, "O_DIRECT read")
        self._settle()
        stats = protocol.request(protocol.socket_of(str(self.mount.mnt)), {"op": "stats"})
        chain = stats["chains"][CHAIN]
        stored = set()
        for file in self.files:
            blocks = _nonzero_blocks(file.data)
            stored.update(blocks)
            if file.name is None:
                continue
            figures = chain["files"].get(file.name)
            want_figures = {"size": len(file.data), "mapped_blocks": len(blocks)}
            got_figures = None if figures is None else {key: figures[key] for key in want_figures}
            if got_figures != want_figures:
                raise FsxFailure(f"stats of {file.shown}: {got_figures}, model {want_figures}")
        names = sorted(file.name for file in self.files if file.name is not None)
        if sorted(chain["files"]) != names:
            raise FsxFailure(f"chain lists {sorted(chain['files'])}, model {names}")
        if chain["unique_blocks"] != len(stored):
            raise FsxFailure(f"chain stores {chain['unique_blocks']} blocks, "
                             f"model {len(stored)} distinct non-zero ones")
        self._note(f"{len(self.files)} files, {len(stored)} blocks stored")

    def restart(self, how: str) -> None:
        """Restart the daemon *how*; then check everything.

        ``remount`` closes every file first (an unmount waits for that) and
        ``kill`` leaves them open on the dead mount, so files unlinked while
        open are gone afterwards; ``takeover`` keeps every descriptor, and
        the unlinked files with them. Before a takeover's kill the daemon
        must have handled every release: one it answered just before dying
        can be lost, as the memo errs towards counts too high
        (docs/takeover.md), and the closed file would stay stored until the
        next fresh mount (``test_a_release_just_before_a_takeover_is_not_lost``
        in tests/takeover/test_takeover.py). Between the daemons, the offline fsck
        must find nothing after an unmount, and after a SIGKILL nothing but
        free slots not punched yet (docs/write-ordering.md, rule 3).
        """
        if how == "takeover":
            if self.mount.standby_pid is None:
                self.mount.start_standby()
            self._settle()
            self.mount.kill_for_takeover()
        else:
            if how == "remount":
                self._close_all()
                self.mount.umount()
                self._fsck()
            elif how == "kill":
                self.mount.kill()
                self._close_all()
                self._fsck(allowed={"unpunched-free-slot"})
            else:
                raise ValueError(f"no restart {how!r}")
            self.files = [file for file in self.files if file.name is not None]
            self.mount.mount()
            for file in self.files:
                self._open(file)
        self.check_all()

    def _fsck(self, allowed: Collection[str] = ()) -> None:
        """The offline check of the state, which must find no problem but the
        *allowed* kinds (a clean one exits 0)."""
        report = self.mount.fsck()
        problems = [vars(problem) for problem in report.problems
                    if problem.kind not in allowed]
        if problems or (not allowed and report.exit_code != 0):
            raise FsxFailure(f"fsck exited {report.exit_code}: {problems}")
        self._note(f"fsck: {report.blocks_checked} blocks checked, "
                   f"{len(report.problems)} allowed problems")

    def finish(self) -> None:
        """Close everything, unmount, and require the offline fsck to be clean."""
        self._close_all()
        self.files = []
        self.mount.umount()
        self._fsck()

    def close(self) -> None:
        """Close every descriptor left (after a failure), so the mount can go."""
        self._close_all()


def _nonzero_blocks(data: bytearray) -> list[bytes]:
    """*data*'s 4 KiB blocks (the last zero-padded) that are not all zeros."""
    zero = bytes(BLOCK)
    blocks = (bytes(data[i:i + BLOCK]).ljust(BLOCK, b"\0") for i in range(0, len(data), BLOCK))
    return [block for block in blocks if block != zero]


def run(mount: Mount, seed: int, ops: int, restarts: Sequence[str] = RESTARTS) -> Fsx:
    """A whole run on *mount*, which it leaves unmounted; the descriptors are
    closed even when it fails, so that the mount's cleanup can unmount."""
    fsx = Fsx(mount, seed)
    try:
        fsx.run(ops, restarts)
    finally:
        fsx.close()
    return fsx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fsx",
        description="Random operations on a fresh swapfs mount, checked against a model "
                    "(root and /dev/fuse needed).",
        epilog="example: python -m tests.fsx --seed 7 --ops 20000")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--restarts", default=",".join(RESTARTS),
                        help=f"comma-separated, of {', '.join(RESTARTS)} (default: all)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    restarts = [how for how in args.restarts.split(",") if how]
    print(f"fsx seed {seed}, {args.ops} operations, restarts {restarts}", flush=True)
    started = time.monotonic()
    with mounted(check_fsck=False) as mount:
        try:
            fsx = run(mount, seed, args.ops, restarts)
        except FsxFailure as exc:
            print(exc, file=sys.stderr)
            return 1
    print(f"passed in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{name} {count}" for name, count in sorted(fsx.counts.items())))
    return 0


__all__ = ["FsxFailure", "Fsx", "main", "run"]


if __name__ == "__main__":
    sys.exit(main())
