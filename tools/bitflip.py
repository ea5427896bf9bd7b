"""A bit-flip campaign over the index: what one flipped bit does to reads and to fsck.

With ``--data`` it damages the data files instead, one damage a trial: a
flipped bit, a slot zeroed, or a data file cut short, at a random place.
With ``--encrypt`` the state is encrypted at rest, and ``--data`` damages its
seal files too.

The goals for a damaged index: a read never returns wrong bytes (an error is
fine), fsck reports every flip that changed a read, fsck never crashes, and
nothing dies or hangs. This campaign measures them from outside, through
``Volume`` and ``fsck.check`` alone, so that it measures every index format
alike.

It builds one pristine state with ``tests/fixtures/make_state.py``. Each
trial flips one random bit of one random byte among the pages in use of
``index.lmdb/data.mdb``, in three copies of that state, and runs five steps,
each in a child forked from this process (everything is imported once, so a
fork costs a few milliseconds; LMDB may segfault or abort on a corrupt page,
and a child that does is counted, not fatal; a child still running after
``--timeout`` seconds is killed as hung). Trials run in ``--jobs`` forked
workers at once.

1. ``reads``: open the volume and read every file block by block (4 KiB,
   then one read at the end), comparing with the bytes it should hold;
2. ``fsck``: ``fsck.check`` on the second copy, without repair;
3. ``repair``: ``fsck.check(repair=True)`` on the third copy, then on it
   4. ``reads_after`` (as 1) and 5. ``fsck_after`` (as 2); when the repair
   found nothing, the state is the one 1 and 2 took, and their outcomes
   stand for 4 and 5 (most flips change nothing, so this shortens the run).

Exit code: 0 when every goal held, 1 when one did not (the table says which).

Example (the figures of docs/integrity.md)::

    .venv/bin/python -m tools.bitflip --trials 300 --seed 1

With ``--pristine DIR`` the state is kept, so that a trial can be run
again (same seed, same DIR) and looked at.
"""

import argparse
import collections
import errno
import faulthandler
import gc
import json
import logging
import math
import os
import random
import resource
import select
import selectors
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import lmdb

from swapfs.engine import fsck, keys
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.keys import MasterKey
from swapfs.engine.sealing import SEAL_SIZE
from swapfs.engine.volume import Volume
from tests.fixtures.make_state import expected_contents, make

PAGE_SIZE = 4096
#: How much more address space than its parent a child may take: a corrupt
#: number can make a step build something huge, which must end as a
#: MemoryError, not as a machine out of memory.
MEMORY_ROOM = 256 << 20
INDEX_FILE = Path("index.lmdb") / "data.mdb"
#: The steps of a trial, in the order they run.
STEPS = ("reads", "fsck", "repair", "reads_after", "fsck_after")
#: How many trials that missed a goal the table lists, one a line.
LISTED = 20
#: LMDB's page header flags (mp_flags, a little-endian u16 at offset 10).
PAGE_KINDS = ((0x08, "meta"), (0x01, "branch"), (0x02, "leaf"), (0x04, "overflow"))

#: What each goal asks, by the Summary field that lists the trials missing it.
GOALS = {
    "wrong": "no read returns wrong bytes, before or after repair",
    "fsck_crashes": "fsck never crashes",
    "silent": "fsck reports every flip that changed a read, before and after repair",
    "worse": "a repair never leaves more blocks unreadable than before it",
    "child_crashes": "no child dies by a signal or hangs",
}


@dataclass
class Phase:
    """How one step of a trial ended: ``outcome`` in one word, ``detail`` saying more.

    Outcomes: reads give ``right``, ``error``, ``refused`` (the volume would
    not open) or ``wrong``; fsck gives its exit code (``0``, ``1``, ``4``) or
    ``refused`` (a SwapfsError). Any step may end as ``crash`` (an exception
    other than SwapfsError), ``signal`` (the child died by one) or ``hang``.
    """

    outcome: str
    detail: Any = None


@dataclass
class Reads:
    """What reading every file of a state gave, block by block."""

    right: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # errno name -> blocks
    unnamed: dict[str, int] = field(default_factory=dict)  # not a SwapfsError: type -> blocks
    wrong: dict[str, int] = field(default_factory=dict)  # path -> blocks of wrong bytes

    def failed(self, error: Exception, blocks: int = 1) -> None:
        """Count *blocks* answered with *error* (the daemon answers any non-
        SwapfsError with EIO, but it is a bug that it had no name: kept apart)."""
        counts = self.errors if isinstance(error, SwapfsError) else self.unnamed
        name = _error_name(error)
        counts[name] = counts.get(name, 0) + blocks

    def phase(self) -> Phase:
        outcome = "wrong" if self.wrong else "error" if self.errors or self.unnamed else "right"
        return Phase(outcome, asdict(self))


@dataclass
class Trial:
    """One flipped bit and how each step took it."""

    number: int
    offset: int
    bit: int
    page: int
    kind: str  # by the pristine page's LMDB header: meta, branch, leaf, overflow, other
    reads: Phase
    fsck: Phase
    repair: Phase
    reads_after: Phase
    fsck_after: Phase

    @classmethod
    def from_json(cls, line: bytes) -> "Trial":
        raw = json.loads(line)
        return cls(**{**raw, **{step: Phase(**raw[step]) for step in STEPS}})

    def fsck_phases(self) -> tuple[Phase, Phase, Phase]:
        return self.fsck, self.repair, self.fsck_after

    def phases(self) -> tuple[Phase, ...]:
        return self.reads, self.reads_after, *self.fsck_phases()


@dataclass
class Summary:
    """The campaign's figures, each the numbers of the trials it counts."""

    trials: int
    unchanged: list[int]  # every read right and fsck clean
    reported: list[int]  # fsck found problems (exit 1 or 4) or refused the state
    read_errors: list[int]  # a read answered an error, or the volume would not open
    unnamed: list[int]  # a read raised something other than SwapfsError
    wrong: list[int]  # a read returned wrong bytes, before or after repair
    fsck_crashes: list[int]  # fsck, with or without repair, raised or died
    child_crashes: list[int]  # a step died by a signal or hung
    silent: list[int]  # a read changed (not right) but fsck said clean, before or after repair
    worse: list[int]  # more blocks unreadable after the repair than before it


class Reader(Protocol):
    """What reading a state needs of a Volume (a fake one tests the classifier)."""

    def resolve(self, path: str) -> Any: ...
    def read(self, ino: int, offset: int, size: int) -> bytes: ...


def _error_name(error: Exception) -> str:
    if isinstance(error, SwapfsError):
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__


def read_file(volume: Reader, path: str, want: bytes, reads: Reads) -> None:
    """Read *path* block by block into *reads*; the last read starts at the
    end of *want* (or is its short last block), so a file whose size changed
    reads wrong too."""
    offsets = range(0, len(want) + 1, BLOCK_SIZE)
    try:
        ino = volume.resolve(path).ino
    except Exception as exc:
        reads.failed(exc, len(offsets))
        return
    for offset in offsets:
        try:
            got = volume.read(ino, offset, BLOCK_SIZE)
        except Exception as exc:
            reads.failed(exc)
            continue
        if got == want[offset:offset + BLOCK_SIZE]:
            reads.right += 1
        else:
            reads.wrong[path] = reads.wrong.get(path, 0) + 1


def read_all(state: Path, want: dict[str, bytes], master: MasterKey | None = None) -> Phase:
    """Open the volume in *state* and read every file of *want*."""
    try:
        volume = Volume(state, master=master)
    except Exception as exc:  # a refusal is an answer, not wrong bytes
        return Phase("refused", f"{_error_name(exc)}: {exc}")
    reads = Reads()
    with closing(volume):
        for path, data in want.items():
            read_file(volume, path, data, reads)
    return reads.phase()


def check(state: Path, repair: bool, master: MasterKey | None = None) -> Phase:
    """fsck's exit code and the kinds of problem it found, or its refusal."""
    try:
        report = fsck.check(state, repair=repair, master=master)
    except SwapfsError as exc:
        return Phase("refused", f"{_error_name(exc)}: {exc}")
    return Phase(str(report.exit_code),
                 dict(collections.Counter(problem.kind for problem in report.problems)))


def forked(step: Callable[[], Phase], timeout: float, stderr: int | None = None) -> Phase:
    """Run *step* in a forked child and return its Phase, or how the child died.

    With *stderr* (a descriptor), what the child writes to its standard error,
    the fault handler's report of a fatal signal included, goes there: for a
    step that is meant to die. Otherwise the child writes where this process
    does, so that a child that dies unexpectedly is seen.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(step, write_fd, stderr)
    os.close(write_fd)
    try:
        raw = _drain(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
    if raw is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return Phase("hang", f"killed after {timeout} s")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Phase("signal", signal.Signals(os.WTERMSIG(status)).name)
    if os.waitstatus_to_exitcode(status) != 0 or not raw:
        return Phase("crash", f"exit status {os.waitstatus_to_exitcode(status)}")
    return Phase(**json.loads(raw))


def _child(step: Callable[[], Phase], write_fd: int, stderr: int | None) -> NoReturn:
    """The forked side of :func:`forked`: never returns into the caller's code."""
    status = 70
    try:
        if stderr is not None:
            os.dup2(stderr, 2)
            if faulthandler.is_enabled():  # it may write to a descriptor of its own (pytest's)
                faulthandler.enable(2)
        logging.disable(logging.CRITICAL)  # the outcome says it; no noise per trial
        limit = _address_space() + MEMORY_ROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            phase = step()
        except Exception as exc:
            phase = Phase("crash", f"{type(exc).__name__}: {exc}")
        with os.fdopen(write_fd, "w") as out:
            json.dump(asdict(phase), out)
        status = 0
    finally:
        os._exit(status)


def _address_space() -> int:
    """This process's virtual size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _drain(fd: int, deadline: float) -> bytes | None:
    """Everything written to *fd* until its writer closes it; None at *deadline*."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def copy_state(source: Path, copy: Path) -> None:
    """Copy a state directory, keeping its files' holes: shutil's copy would
    fill the holes of punched slots, which fsck then reports."""
    shutil.copytree(source, copy, copy_function=_copy_sparse)


def _copy_sparse(source: str, copy: str) -> None:
    with open(source, "rb") as src, open(copy, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        at = 0
        while at < size:
            try:
                start = os.lseek(src.fileno(), at, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                break
            at = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            os.pwrite(dst.fileno(), os.pread(src.fileno(), at - start, start), start)
        dst.truncate(size)


def pages_in_use(state: Path, scratch: Path) -> int:
    """How many pages of the index are in use, asked of LMDB on a copy."""
    copy = scratch / "pages"
    copy_state(state / INDEX_FILE.parent, copy)
    env = lmdb.open(str(copy), readonly=True, lock=False)
    try:
        return int(env.info()["last_pgno"]) + 1
    finally:
        env.close()
        shutil.rmtree(copy)


def page_kind(index: bytes, page: int) -> str:
    """The kind of *page* by its LMDB header in the pristine index: cheap, and
    only a hint (a freed page keeps its old header, an overflow page's
    continuation has none)."""
    if page < 2:
        return "meta"
    flags = int.from_bytes(index[page * PAGE_SIZE + 10:page * PAGE_SIZE + 12], "little")
    return next((name for bit, name in PAGE_KINDS if flags & bit), "other")


def flip(path: Path, offset: int, bit: int) -> None:
    """Flip one bit of one byte of *path*, in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ (1 << bit)]))


def damage_data(state: Path, name: str, how: str, offset: int, bit: int) -> None:
    """Damage the data file *name* of *state*: flip *bit* of the byte at
    *offset*, zero the slot holding it, or cut the file there."""
    path = state / "data" / name
    if how == "flip":
        flip(path, offset, bit)
    elif how == "zero":
        with open(path, "r+b") as file:
            file.seek(offset - offset % BLOCK_SIZE)
            file.write(bytes(BLOCK_SIZE))
    else:
        os.truncate(path, offset)


def _in_use(path: Path) -> int:
    """The bytes of a data file, or of a seal file the records of the slots
    its data file has (the rest is room made ahead, which nothing reads)."""
    if path.suffix != ".seals":
        return path.stat().st_size
    slots = path.with_suffix(".blocks").stat().st_size // BLOCK_SIZE
    return min(path.stat().st_size, slots * SEAL_SIZE)


def run_trial(number: int, offset: int, bit: int, pristine: Path, scratch: Path,
              want: dict[str, bytes], kind: str, timeout: float,
              master: MasterKey | None = None) -> Trial:
    """Flip *bit* of the index byte at *offset* in three copies of *pristine*
    (or, for a *kind* ``data <how> <file>``, damage that data file there)
    and take each through its steps."""
    copies = [scratch / f"{number}-{name}" for name in ("reads", "fsck", "repair")]
    copy_state(pristine, copies[0])
    if kind.startswith("data "):
        _, how, name = kind.split()
        damage_data(copies[0], name, how, offset, bit)
    else:
        flip(copies[0] / INDEX_FILE, offset, bit)
    for copy in copies[1:]:
        copy_state(copies[0], copy)
    reads, checked, repaired = copies
    try:
        read = forked(lambda: read_all(reads, want, master), timeout)
        fsck_ = forked(lambda: check(checked, False, master), timeout)
        repair = forked(lambda: check(repaired, True, master), timeout)
        if repair.outcome == "0":  # nothing changed: steps 1 and 2 have taken this state
            after = read, fsck_
        else:
            after = (forked(lambda: read_all(repaired, want, master), timeout),
                     forked(lambda: check(repaired, False, master), timeout))
        return Trial(number, offset, bit, offset // PAGE_SIZE, kind, read, fsck_, repair, *after)
    finally:
        for copy in copies:
            shutil.rmtree(copy)


def summarize(trials: Iterable[Trial]) -> Summary:
    """Sort the trials into the figures (a trial may count in several)."""
    trials = list(trials)

    def which(test: Callable[[Trial], bool]) -> list[int]:
        return [trial.number for trial in trials if test(trial)]

    return Summary(
        trials=len(trials),
        unchanged=which(lambda t: t.reads.outcome == "right" and t.fsck.outcome == "0"),
        reported=which(lambda t: t.fsck.outcome in ("1", "4", "refused")),
        read_errors=which(lambda t: _errored(t.reads)),
        unnamed=which(lambda t: bool(_counts(t.reads, "unnamed"))),
        wrong=which(lambda t: "wrong" in (t.reads.outcome, t.reads_after.outcome)),
        fsck_crashes=which(lambda t: any(p.outcome in ("crash", "signal")
                                         for p in t.fsck_phases())),
        child_crashes=which(lambda t: any(p.outcome in ("signal", "hang")
                                          for p in t.phases())),
        silent=which(lambda t: _silent(t.reads, t.fsck) or _silent(t.reads_after, t.fsck_after)),
        worse=which(lambda t: _unreadable(t.reads_after) > _unreadable(t.reads)),
    )


def _counts(reads: Phase, name: str) -> dict[str, int]:
    """One of the counts of :class:`Reads` that a reads Phase carries."""
    return reads.detail.get(name, {}) if isinstance(reads.detail, dict) else {}


def _errored(reads: Phase) -> bool:
    """Some read answered an error, or the volume would not open."""
    return reads.outcome == "refused" or bool(_counts(reads, "errors") or
                                              _counts(reads, "unnamed"))


def _unreadable(reads: Phase) -> float:
    """How many blocks answered an error (all of them when the volume would
    not open, or the step did not end)."""
    if reads.outcome not in ("right", "error", "wrong"):
        return math.inf
    return sum(_counts(reads, "errors").values()) + sum(_counts(reads, "unnamed").values())


def _silent(reads: Phase, check: Phase) -> bool:
    """Reading gave something else than the right bytes, yet fsck said clean."""
    return reads.outcome != "right" and check.outcome == "0"


def missed_goals(summary: Summary) -> dict[str, list[int]]:
    """The goals some trial missed, each with the trials that missed it."""
    return {name: getattr(summary, name) for name in GOALS if getattr(summary, name)}


def campaign(scratch: Path, trials: int, seed: int, timeout: float = 10.0, jobs: int = 2,
             pristine: Path | None = None, progress: Callable[[int], None] | None = None,
             data: bool = False, encrypt: bool = False) -> tuple[int, list[Trial]]:
    """Run *trials* seeded flips in *scratch*, shared among *jobs* workers:
    the number of pages in use, and every trial in order.

    The seed fixes where the bits flip; the pristine state differs from one
    make to the next (every chain's key is random), and with it the figures.
    A *pristine* state that exists is used as it is (made there otherwise),
    so that a seed flips the same bits of the same index again. With
    *encrypt* the state is encrypted, its master key kept next to it.
    """
    pristine = pristine or scratch / "pristine"
    key_file = pristine.parent / f"{pristine.name}.key"
    master = None
    if encrypt:
        master = keys.read(key_file) if key_file.exists() else keys.generate(key_file)
    if not pristine.exists():
        make(pristine, master)
    want = expected_contents()
    rng = random.Random(seed)
    if data:  # the data files' bytes, flipped, zeroed a slot at a time, or cut
        files = {path.name: _in_use(path) for path in sorted((pristine / "data").iterdir())}
        pages = sum(size // PAGE_SIZE for size in files.values())
        names = list(files)
        damages = []
        for _ in range(trials):
            name = rng.choice(names)
            damages.append((rng.randrange(files[name]), rng.randrange(8),
                            f"data {rng.choice(('flip', 'zero', 'cut'))} {name}"))
    else:
        pages = pages_in_use(pristine, scratch)
        index = (pristine / INDEX_FILE).read_bytes()[:pages * PAGE_SIZE]
        damages = [(offset, rng.randrange(8), page_kind(index, offset // PAGE_SIZE))
                   for offset in (rng.randrange(pages * PAGE_SIZE) for _ in range(trials))]

    def trial(number: int) -> Trial:
        offset, bit, kind = damages[number]
        return run_trial(number, offset, bit, pristine, scratch, want, kind, timeout, master)

    gc.freeze()  # a child's collections then copy none of this process's pages
    try:
        done = in_workers(trial, range(trials), jobs, progress)
    finally:
        gc.unfreeze()
    return pages, sorted(done, key=lambda trial: trial.number)


def in_workers(run: Callable[[int], Trial], numbers: range, jobs: int,
               progress: Callable[[int], None] | None) -> list[Trial]:
    """Run the trials *numbers* in *jobs* forked workers, each sending back
    one JSON line per trial as it ends."""
    pids = {}
    for worker in range(jobs):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _work(run, numbers[worker::jobs], write_fd)
        os.close(write_fd)
        pids[read_fd] = pid
    done: list[Trial] = []
    with selectors.DefaultSelector() as ready:
        for read_fd in pids:
            ready.register(read_fd, selectors.EVENT_READ, [b""])
        while ready.get_map():
            for key, _ in ready.select():
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    ready.unregister(key.fd)
                    os.close(key.fd)
                    continue
                *lines, key.data[0] = (key.data[0] + chunk).split(b"\n")
                done += [Trial.from_json(line) for line in lines]
                if progress is not None:
                    progress(len(done))
    for pid in pids.values():
        os.waitpid(pid, 0)
    if len(done) != len(numbers):
        raise RuntimeError(f"workers ended after {len(done)} of {len(numbers)} trials")
    return done


def _work(run: Callable[[int], Trial], numbers: range, write_fd: int) -> NoReturn:
    """A worker of :func:`in_workers`: never returns into the caller's code."""
    status = 70
    try:
        with os.fdopen(write_fd, "w") as out:
            for number in numbers:
                out.write(json.dumps(asdict(run(number))) + "\n")
                out.flush()
        status = 0
    finally:
        os._exit(status)


def table(summary: Summary, trials: list[Trial]) -> str:
    """The figures as text, then one line for each trial that missed a goal."""
    rows = [
        ("flips that changed nothing (reads right, fsck clean)", summary.unchanged),
        ("flips reported by fsck (exit 1 or 4, or refused)", summary.reported),
        ("reads that gave errors (or the volume refused)", summary.read_errors),
        ("  of which an error other than SwapfsError", summary.unnamed),
        ("trials with wrong bytes", summary.wrong),
        ("fsck crashes", summary.fsck_crashes),
        ("child crashes or hangs", summary.child_crashes),
        ("a read changed, fsck said clean (before or after repair)", summary.silent),
        ("more blocks unreadable after the repair than before", summary.worse),
        ("fewer blocks unreadable after the repair than before",
         [t.number for t in trials if _unreadable(t.reads_after) < _unreadable(t.reads)]),
    ]
    lines = [f"{'trials':58} {summary.trials:6}"]
    lines += [f"{label:58} {len(numbers):6}" for label, numbers in rows]
    missed = sorted({n for numbers in missed_goals(summary).values() for n in numbers})
    for number in missed[:LISTED]:
        trial = trials[number]
        steps = " ".join(f"{step}={getattr(trial, step).outcome}" for step in STEPS)
        wrong = _counts(trial.reads, "wrong") or _counts(trial.reads_after, "wrong")
        lines.append(f"  #{number} byte {trial.offset} bit {trial.bit} (page {trial.page}, "
                     f"{trial.kind}): {steps}" + (f" wrong {wrong}" if wrong else ""))
    if len(missed) > LISTED:
        lines.append(f"  and {len(missed) - LISTED} more trials that missed a goal "
                     "(--json lists them all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300, help="flips to try")
    parser.add_argument("--seed", type=int, default=1, help="seeds the flips' places")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds a step may take before it counts as hung")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="trials run at once (default: one per CPU)")
    parser.add_argument("--pristine", type=Path,
                        help="the pristine state: made there if it does not exist, else "
                             "used as it is (to flip the same bits again)")
    parser.add_argument("--data", action="store_true",
                        help="damage the data files instead of the index: flip a bit, "
                             "zero a slot or cut a file, at random")
    parser.add_argument("--encrypt", action="store_true",
                        help="an encrypted state (with --data, its seal files are damaged too)")
    parser.add_argument("--json", action="store_true", help="print every trial as JSON")
    args = parser.parse_args(argv)

    def progress(done: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{args.trials} trials", end="", file=sys.stderr, flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swapfs-bitflip-") as scratch:
        pages, trials = campaign(Path(scratch), args.trials, args.seed, args.timeout,
                                 args.jobs, args.pristine, progress, data=args.data,
                                 encrypt=args.encrypt)
    seconds = time.monotonic() - started
    if sys.stderr.isatty():
        print(file=sys.stderr)
    summary = summarize(trials)
    if args.json:
        print(json.dumps({"trials": args.trials, "seed": args.seed, "pages": pages,
                          "seconds": round(seconds, 1), "goals": GOALS,
                          "missed": missed_goals(summary), "summary": asdict(summary),
                          "records": [asdict(trial) for trial in trials]}, indent=1))
    else:
        where = "the data files" if args.data else "the index in use"
        print(f"{args.trials} {'damages' if args.data else 'flips'}, seed {args.seed}, "
              f"over {pages} pages of {where}, in {seconds:.1f} s")
        print(table(summary, trials))
    return 1 if missed_goals(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
