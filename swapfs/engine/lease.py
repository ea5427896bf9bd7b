"""A lease that fences a state directory across hosts.

``State`` takes an flock on its state directory, which keeps a second
daemon on the same host away. When the state directory sits on storage that
two hosts reach, flock fences nothing across them; this lease does. A live
daemon holds it and renews it every third of its duration; a standby takes
the directory over only after the lease has lapsed by its full duration plus
a clock-skew margin; and a holder that cannot renew stops writing, on its
own, before a standby may take over: every write it makes is preceded by
:meth:`Lease.guard`, which reads CLOCK_BOOTTIME at that moment. A renewal
first flushes what was written under the old stamp, and never lands after
its holder gave the lease up; a record of a lower generation is a late
write of an earlier holder.

The lease is one small file, ``<state>/lease``, always replaced whole (write
a temporary file, fsync, rename, fsync the directory), so a reader sees the
old record or the new one, never a mix. Taking it is a delta lease: write a
claim, wait a settle delay long enough for any other contender's claim to
land, read it back, and own it only if it still names us. The protocol, the
byte layout and what is and is not guaranteed are in ``docs/lease.md``.

Example::

    lease = acquire(state, duration=10.0)          # LeaseHeld if a live holder has it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_renewed, lease, stop_writing)
        ...                                        # lease.guard() before every write
    lease.release()
"""

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import blake3
import trio

from swapfs.engine.errors import SwapfsError
from swapfs.engine.statedir import sync_directory

log = logging.getLogger(__name__)

#: The lease file's name inside the state directory.
LEASE_NAME = "lease"
#: Seconds by which the hosts' wall clocks may disagree. A contender treats a
#: lease as lapsed only once its renewal stamp is older than its duration plus
#: this margin, so a holder whose clock is up to this much behind is still safe.
SKEW_MARGIN = 2.0
#: Seconds a contender waits between writing its claim and reading it back.
#: A claim whose read-to-landed time exceeds half of this is abandoned, which
#: is what makes the wait long enough for every other contender's claim.
SETTLE = 2.0

MAGIC = b"SWAPLEAS"
VERSION = 1
HOLDER_SIZE = 16
HOST_SIZE = 64
CHECKSUM_SIZE = 32
#: magic, version, pid, generation, renewed (ns), duration (ns), holder, host.
_BODY = struct.Struct(f"<8sIIQQQ{HOLDER_SIZE}s{HOST_SIZE}s")
#: A lease file holds one record: its body, then the BLAKE3 checksum of it.
LEASE_SIZE = _BODY.size + CHECKSUM_SIZE
#: The holder id of a lease given up: a free lease that keeps its generation.
FREE = bytes(HOLDER_SIZE)
#: Largest read of the lease file: enough to tell "too long" from the record.
_READ_LIMIT = LEASE_SIZE + 1
#: Duration of the lease an offline command (fsck, rekey) takes on a state
#: whose lease record is free, and so names no duration.
OFFLINE_SECONDS = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def clock() -> float:
    """Seconds on CLOCK_BOOTTIME, the clock a holder's validity is measured on.

    Unlike CLOCK_MONOTONIC it keeps counting while the machine is suspended
    (and, like it, while the process is stopped): a holder that wakes up
    after a suspend longer than its lease sees it lapsed, as the other host
    does.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def sync_file_system(state: Path) -> None:
    """syncfs(2) of the file system that holds *state*: the data files, seal
    files and index pages written so far reach storage (a renewal's first
    step). OSError if the file system reports a write error."""
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {state}: {os.strerror(err)}")
    finally:
        os.close(fd)


class LeaseError(SwapfsError):
    """A lease operation failed; the message says why."""


class LeaseCorrupt(LeaseError):
    """The lease file is not a valid lease record; it is never overwritten silently."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.EUCLEAN, f"lease file {path} is corrupt: {reason}; if no daemon "
                                        f"serves {path.parent}, break it "
                                        f"('swapfs lease --state {path.parent} --break')")
        self.path = path
        self.reason = reason


class LeaseHeld(LeaseError):
    """Another holder has the lease and it has not lapsed."""

    def __init__(self, info: "LeaseInfo", expires_in: float, note: str = "") -> None:
        super().__init__(errno.EBUSY, f"{note}lease held by {info.holder_hex} on host "
                                      f"{info.host!r} (pid {info.pid}, generation "
                                      f"{info.generation}); free in {expires_in:.1f} s "
                                      f"unless renewed")
        self.info = info
        self.holder = info.holder_hex
        self.host = info.host
        self.expires_in = expires_in


class LeaseLost(LeaseError):
    """This holder no longer has the lease: it lapsed, or someone broke or took it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOLCK, message)


@dataclass(frozen=True)
class LeaseInfo:
    """One lease record, as read from or written to the lease file."""

    holder: bytes
    host: str
    pid: int
    generation: int
    #: Wall-clock time of the last renewal, in seconds since the epoch.
    renewed: float
    #: Seconds the holder may go without renewing.
    duration: float

    @property
    def holder_hex(self) -> str:
        return self.holder.hex()

    @property
    def free(self) -> bool:
        """Given up by its last holder (released or broken)."""
        return self.holder == FREE

    def expires_in(self, now: float, skew_margin: float = SKEW_MARGIN) -> float:
        """Seconds from wall-clock *now* until a contender may take the lease."""
        if self.free:
            return 0.0
        return self.renewed + self.duration + skew_margin - now

    def to_json(self, now: float, skew_margin: float = SKEW_MARGIN) -> dict[str, object]:
        expires_in = self.expires_in(now, skew_margin)
        return {
            "state": "free" if self.free else "held" if expires_in > 0 else "expired",
            "holder": self.holder_hex, "host": self.host, "pid": self.pid,
            "generation": self.generation, "renewed": self.renewed,
            "age_seconds": now - self.renewed, "duration_seconds": self.duration,
            "expires_in_seconds": max(expires_in, 0.0),
        }


def encode(info: LeaseInfo) -> bytes:
    """The record's bytes: a fixed body and the BLAKE3 digest of it."""
    host = info.host.encode()[:HOST_SIZE]
    host = host.decode(errors="ignore").encode()  # never cut a character in half
    body = _BODY.pack(MAGIC, VERSION, info.pid, info.generation,
                      round(info.renewed * 1e9), round(info.duration * 1e9), info.holder, host)
    return body + blake3.blake3(body).digest(CHECKSUM_SIZE)


def decode(data: bytes, path: Path) -> LeaseInfo:
    """Parse a record; anything that is not exactly a valid one raises LeaseCorrupt."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        what = "empty" if not data else "no lease magic at its start"
        raise LeaseCorrupt(path, what)
    if len(data) != LEASE_SIZE:
        raise LeaseCorrupt(path, f"{len(data)}{'+' if len(data) >= _READ_LIMIT else ''} "
                                 f"bytes, a lease record has {LEASE_SIZE}")
    body, checksum = data[:_BODY.size], data[_BODY.size:]
    if blake3.blake3(body).digest(CHECKSUM_SIZE) != checksum:
        raise LeaseCorrupt(path, "checksum mismatch")
    _, version, pid, generation, renewed_ns, duration_ns, holder, host = _BODY.unpack(body)
    if version != VERSION:
        raise LeaseCorrupt(path, f"format version {version}, this swapfs reads {VERSION}")
    try:
        host_name = host.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise LeaseCorrupt(path, "host name is not UTF-8") from None
    if duration_ns == 0 and holder != FREE:
        raise LeaseCorrupt(path, "a held lease with no duration")
    return LeaseInfo(holder=holder, host=host_name, pid=pid, generation=generation,
                     renewed=renewed_ns / 1e9, duration=duration_ns / 1e9)


def lease_path(state: Path) -> Path:
    return Path(state) / LEASE_NAME


def read_lease(state: Path) -> LeaseInfo | None:
    """The lease record of *state*, or None when there is no lease file.

    Raises LeaseCorrupt for anything that is not a valid record (including a
    directory or other non-file in its place) and LeaseError for a file that
    cannot be read (permissions, I/O error).
    """
    path = lease_path(state)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LeaseCorrupt(path, "a symbolic link, not a lease file") from None
        raise LeaseError(exc.errno or errno.EIO, f"cannot read lease file {path}: "
                                                 f"{exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise LeaseCorrupt(path, f"{kind}, not a lease file")
        data = os.read(fd, _READ_LIMIT)
    except OSError as exc:
        raise LeaseError(exc.errno or errno.EIO, f"cannot read lease file {path}: "
                                                 f"{exc.strerror}") from None
    finally:
        os.close(fd)
    return decode(data, path)


def _write_lease(state: Path, info: LeaseInfo,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Replace the lease file with *info*: temp file, fsync, rename, fsync the directory.

    Each writer has its own temporary name (its holder id), so two contenders
    never write into one temporary file. *before_rename* runs right before
    the rename and may raise to call it off (the temporary file is removed):
    a renewal that was slow to get there must not replace the lease once its
    holder has given it up.
    """
    state = Path(state)
    temp = state / f".{LEASE_NAME}.{info.holder_hex}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, encode(info))
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
        os.rename(temp, state / LEASE_NAME)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise LeaseError(exc.errno or errno.EIO, f"cannot write the lease in {state}: "
                                                     f"{exc.strerror}") from None
        raise
    _sync_dir(state)


def _sync_dir(state: Path) -> None:
    try:
        sync_directory(state)
    except OSError as exc:
        raise LeaseError(exc.errno or errno.EIO, f"cannot sync {state}: {exc.strerror}") from None


def new_holder() -> bytes:
    """A random holder id: one per daemon instance."""
    return secrets.token_bytes(HOLDER_SIZE)


class Lease:
    """A lease this process holds on a state directory.

    The holder keeps it by calling :meth:`renew` every ``duration / 3`` (or
    running :func:`keep_renewed`, or a :class:`Renewer`), and must not write
    to the state directory once :meth:`valid_for` reaches zero: it cannot
    know whether a standby has taken over since. :meth:`guard` is that check,
    made right before each write.
    """

    __slots__ = ("state", "holder", "host", "generation", "duration", "flush", "_deadline",
                 "_lost", "_stamping")

    def __init__(self, state: Path, info: LeaseInfo, deadline: float) -> None:
        self.state = Path(state)
        self.holder = info.holder
        self.host = info.host
        self.generation = info.generation
        self.duration = info.duration
        #: What a renewal makes durable before it stamps the lease: by
        #: default everything written to the state's file system so far.
        self.flush: Callable[[], None] = lambda: sync_file_system(self.state)
        #: clock() (CLOCK_BOOTTIME) at which this holder's own view of the lease lapses.
        self._deadline = deadline
        self._lost: str | None = None
        #: Held while a renewal or a re-stamp writes the lease file: both use
        #: this holder's temporary file, and each checks the generation the
        #: other may be changing.
        self._stamping = threading.Lock()

    @property
    def holder_hex(self) -> str:
        return self.holder.hex()

    @property
    def renew_interval(self) -> float:
        """How often to renew: a third of the duration (see docs/lease.md)."""
        return self.duration / 3

    def valid_for(self) -> float:
        """Seconds this holder may still write, by CLOCK_BOOTTIME, read now.

        Counted from the moment the last successful renewal started, so it
        never outlasts what any contender grants the lease. Zero once lost
        or given up.
        """
        if self._lost is not None:
            return 0.0
        return max(self._deadline - clock(), 0.0)

    def guard(self, err: int = errno.EROFS) -> None:
        """Raise SwapfsError(*err*) unless this holder may write now.

        Called right before every write to the state (each write transaction
        and each data or seal write): validity read from the clock at that
        moment, not a flag that a renewal sets later.
        """
        if self.valid_for() <= 0:
            raise SwapfsError(err, self._lost or f"the lease on {self.state} has lapsed: "
                                                 "another host may own the state now")

    def give_up(self, reason: str) -> None:
        """Stop holding: valid_for() is 0 from now on, and a renewal in
        flight does not replace the lease file any more."""
        self._lost = self._lost or reason

    def renew(self) -> None:
        """Make everything written so far durable, then stamp the lease afresh.

        The flush comes first, so whatever was written under the old stamp
        reached storage before the lease is extended. Raises LeaseLost when
        the file names another holder or a higher generation (broken, taken
        over, corrupt, removed), when the lease had already lapsed in this
        holder's view, or when it was given up meanwhile; after that the
        lease is lost for good. A record of a lower generation is a late
        write of an earlier holder, replaced by this stamp. Raises LeaseError
        for an I/O failure that a later renewal may get past.
        """
        with self._stamping:
            self._renew()

    def _renew(self) -> None:
        if self._lost is not None:
            raise LeaseLost(self._lost)
        start = clock()
        if start >= self._deadline:
            try:
                self._check_ours()  # says who took it, when someone did
            except LeaseLost:
                raise
            except LeaseError:
                pass
            self._lose(f"lease on {self.state} lapsed before it was renewed")
        try:
            self.flush()
        except OSError as exc:
            raise LeaseError(exc.errno or errno.EIO, f"cannot flush {self.state} before "
                                                     f"renewing its lease: {exc}") from None
        self._check_ours()
        _write_lease(self.state, LeaseInfo(
            holder=self.holder, host=self.host, pid=os.getpid(), generation=self.generation,
            renewed=time.time(), duration=self.duration), self._still_ours)
        if clock() >= self._deadline:
            # The new stamp landed after our lease had lapsed, so it may have
            # overwritten a contender's claim: this holder must not go on.
            self._lose(f"renewal of the lease on {self.state} landed after it had lapsed")
        self._deadline = start + self.duration

    def restamp_above(self, recorded: int) -> int:
        """Re-stamp this lease at generation *recorded* + 1 when the state's
        index records *recorded*, a generation above this holder's own; the
        generation held afterwards.

        That happens only when the lease file lost its generation (a corrupt
        one broken, a removed one) after holders of higher generations wrote
        the index: this holder's claim started again from 1, and the index
        would refuse each of its writes. The file must still name this
        holder and generation (LeaseLost otherwise: another holder took the
        state over, and its higher generation in the index is what fences
        this one); the deadline is not extended. The caller passes what the
        index records (``State(..., restamp=...)``); this module never
        reads the index.
        """
        with self._stamping:  # not while a renewal (the Renewer thread) writes
            if recorded < self.generation:
                return self.generation
            if self._lost is not None:
                raise LeaseLost(self._lost)
            if clock() >= self._deadline:
                self._lose(f"lease on {self.state} lapsed before it was re-stamped")
            self._check_ours()
            old, self.generation = self.generation, recorded + 1
            # Set before the write: one that fails before its rename leaves
            # a lower generation in the file, which the next renewal stamps
            # over (a late write, to it).
            _write_lease(self.state, LeaseInfo(
                holder=self.holder, host=self.host, pid=os.getpid(),
                generation=self.generation, renewed=time.time(), duration=self.duration),
                self._still_ours)
        log.warning("lease on %s re-stamped from generation %d to %d: the index records "
                    "generation %d, written before its lease file lost its generation",
                    self.state, old, self.generation, recorded)
        return self.generation

    def _still_ours(self) -> None:
        """Right before a renewal's rename: not given up, not lapsed."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if clock() >= self._deadline:
            self._lose(f"lease on {self.state} lapsed while it was being renewed")

    def release(self) -> None:
        """Give the lease up if it is still ours, keeping its generation.

        The file is rewritten as a free record (no holder), so a contender may
        take it at once and the next holder's generation is still higher.
        A lease already lost or lapsed is left alone.
        """
        if self.valid_for() <= 0:
            self._lost = self._lost or "released"
            return
        try:
            self._check_ours()
            _write_lease(self.state, LeaseInfo(
                holder=FREE, host="", pid=0, generation=self.generation, renewed=time.time(),
                duration=0.0), self._still_ours)
        except LeaseLost:
            return
        self._lost = "released"

    def _check_ours(self) -> None:
        try:
            info = read_lease(self.state)
        except LeaseCorrupt as exc:
            self._lose(f"lease lost: {exc}")
        if info is None:
            self._lose(f"lease on {self.state} lost: the lease file was removed")
        if info.generation < self.generation:
            log.warning("lease on %s: a late write of generation %d (holder %s, host %r) "
                        "replaced generation %d; stamped over", self.state, info.generation,
                        info.holder_hex, info.host, self.generation)
            return
        if info.holder != self.holder or info.generation != self.generation:
            who = ("nobody (it was released or broken)" if info.free
                   else f"{info.holder_hex} on host {info.host!r}")
            self._lose(f"lease on {self.state} lost: generation {info.generation} "
                       f"is now held by {who}")

    def _lose(self, reason: str) -> NoReturn:
        self._lost = self._lost or reason
        raise LeaseLost(reason)

    def __repr__(self) -> str:
        return (f"Lease({self.state}, holder={self.holder_hex}, generation={self.generation}, "
                f"valid_for={self.valid_for():.1f})")


def acquire(state: Path, duration: float, *, holder: bytes | None = None,
            host: str | None = None, wait: bool = False, timeout: float | None = None,
            settle: float = SETTLE, skew_margin: float = SKEW_MARGIN,
            reclaim_local: bool = False) -> Lease:
    """Take the lease on *state* if it is free or lapsed.

    *holder* defaults to a fresh random id (:func:`new_holder`); ids must be
    unique per daemon instance. Without *wait*, a live lease raises
    LeaseHeld at once. With *wait* (implied by a *timeout*), acquire sleeps
    until the lease lapses and tries again, raising LeaseHeld when *timeout*
    seconds have passed. A corrupt lease file raises LeaseCorrupt and is left
    as it is: :func:`break_lease` clears it.

    Each attempt takes at least *settle* seconds (the delta-lease wait).

    *reclaim_local* is for a caller that holds the state directory's flock
    (a daemon replacing one that died on this host): a live lease whose
    holder is this host and whose process is gone is taken over. Without
    the settle delay only while it is clearly live (more than *settle* plus
    twice *skew_margin* before it may be taken): no other host can be
    claiming it then, and the flock keeps out every other contender on this
    host. Nearer its lapse another host's standby may read it as lapsed and
    claim at once, so the reclaim is a full delta-lease claim.
    """
    if duration <= 0:
        raise ValueError("a lease duration must be positive")
    state = Path(state)
    holder = holder or new_holder()
    if len(holder) != HOLDER_SIZE or holder == FREE:
        raise ValueError(f"a holder id is {HOLDER_SIZE} bytes, not all zero")
    host = socket.gethostname() if host is None else host
    give_up = None if timeout is None else time.monotonic() + timeout
    wait = wait or timeout is not None
    while True:
        try:
            return _attempt(state, duration, holder, host, settle, skew_margin,
                            reclaim_local)
        except LeaseHeld as held:
            if not wait:
                raise
            pause = max(held.expires_in, 0.0) + settle / 4
            if give_up is not None:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise
                pause = min(pause, left)
            log.info("%s; waiting %.1f s", held, pause)
            time.sleep(pause)


def _attempt(state: Path, duration: float, holder: bytes, host: str, settle: float,
             skew_margin: float, reclaim_local: bool = False) -> Lease:
    """One delta-lease attempt: read, claim, settle, read back."""
    start = clock()
    now = time.time()  # taken before the read: see docs/lease.md, "Why it is safe"
    current = read_lease(state)
    if current is not None and current.expires_in(now, skew_margin) > 0:
        expires_in = current.expires_in(now, skew_margin)
        if not (reclaim_local and current.host == host and not _process_alive(current.pid)):
            raise LeaseHeld(current, expires_in)
        if expires_in > settle + 2 * skew_margin:
            # Clearly live: no other host's contender reads it as lapsed
            # before this claim has landed, so none can be claiming.
            log.info("lease on %s held by pid %d of this host, which is gone: reclaimed",
                     state, current.pid)
            settle = 0.0
        else:
            log.info("lease on %s held by pid %d of this host, which is gone, lapses in "
                     "%.1f s: reclaimed with a full claim", state, current.pid, expires_in)
    generation = (current.generation if current is not None else 0) + 1
    stamped = clock()
    claim = LeaseInfo(holder=holder, host=host, pid=os.getpid(), generation=generation,
                      renewed=time.time(), duration=duration)
    _write_lease(state, claim)
    landed = clock() - start
    if settle and landed > settle / 2:
        # Another contender may already have confirmed its claim and we may
        # have overwritten it; it will lose the lease at its next renewal.
        raise LeaseHeld(claim, claim.expires_in(time.time(), skew_margin),
                        note=f"claim abandoned: it took {landed:.2f} s to land, more than "
                             f"half the settle delay ({settle} s); this claim's ")
    time.sleep(settle)
    now = time.time()
    confirmed = read_lease(state)
    if confirmed is None or confirmed.holder != holder or confirmed.generation != generation:
        if confirmed is None:
            raise LeaseError(errno.EAGAIN, f"the lease file in {state} was removed "
                                           "while claiming it")
        raise LeaseHeld(confirmed, confirmed.expires_in(now, skew_margin))
    log.info("lease on %s taken: holder %s, generation %d", state, holder.hex(), generation)
    return Lease(state, claim, stamped + duration)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def break_lease(state: Path, *, force: bool = False,
                skew_margin: float = SKEW_MARGIN) -> LeaseInfo | None:
    """Clear a corrupt or lapsed lease so that acquire can take it; the operator's tool.

    A corrupt file (or an empty directory in its place) is removed; a valid
    record is rewritten as free, keeping its generation. A live lease is
    refused with LeaseHeld unless *force*: breaking the lease of a daemon
    that still runs lets two daemons write one state directory until its
    next renewal. Returns the record that was broken, None if it was corrupt
    or absent.
    """
    state = Path(state)
    path = lease_path(state)
    try:
        info = read_lease(state)
    except LeaseCorrupt:
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError as exc:
            raise LeaseError(exc.errno or errno.EIO,
                             f"cannot remove {path}: {exc.strerror}") from None
        _sync_dir(state)
        log.warning("corrupt lease file %s removed", path)
        return None
    if info is None or info.free:
        return info
    expires_in = info.expires_in(time.time(), skew_margin)
    if expires_in > 0 and not force:
        raise LeaseHeld(info, expires_in)
    _write_lease(state, LeaseInfo(holder=FREE, host="", pid=0, generation=info.generation,
                                  renewed=time.time(), duration=0.0))
    log.warning("lease of %s on host %r (generation %d) broken", info.holder_hex, info.host,
                info.generation)
    return info


def _first_wait(lease: Lease) -> float:
    """Seconds until the first renewal. The lease counts from before
    acquire's settle delay, so it may hold for less than its duration
    already: renew once a third of it is used."""
    return max(lease.valid_for() - (lease.duration - lease.renew_interval), 0.0)


async def keep_renewed(lease: Lease, on_lost: Callable[[], None], *,
                       guard: float | None = None, retry: float | None = None) -> None:
    """Renew *lease* every ``duration / 3`` until cancelled; call *on_lost* when it fails.

    *on_lost* is called once, and this task returns, when a renewal raises
    LeaseLost or when the lease's own validity drops to *guard* seconds
    (default ``duration / 3``) because renewals keep failing or hang: the
    lease is given up then (:meth:`Lease.give_up`), and the caller must
    stop writing to the state directory. A failing renewal (an I/O error) is
    retried every *retry* seconds (default ``duration / 10``). Renewal runs
    in a worker thread, so slow storage never blocks the trio thread; that
    thread is never abandoned, and a renewal still in it once the lease was
    given up does not replace the lease file (it rechecks right before its
    rename), so it cannot land after a partition heals and fence the next
    holder.
    """
    guard = lease.duration / 3 if guard is None else guard
    retry = lease.duration / 10 if retry is None else retry
    next_at = time.monotonic() + _first_wait(lease)
    while True:
        await trio.sleep(max(next_at - time.monotonic(), 0.0))
        outcome = await _renew_watched(lease, guard, on_lost)
        if outcome == "lost":
            return
        if lease.valid_for() <= guard:
            lease.give_up("renewals failed until the lease was about to lapse")
            log.error("lease on %s given up before it lapses: %s", lease.state, lease._lost)
            on_lost()
            return
        next_at = time.monotonic() + (lease.renew_interval if outcome == "renewed" else retry)


async def _renew_watched(lease: Lease, guard: float, on_lost: Callable[[], None]) -> str:
    """One renewal in a worker thread: "renewed", "failed" (retry) or
    "lost" (*on_lost* called). If it is still running when the lease's
    validity drops to *guard*, the lease is given up and *on_lost* called
    then, so that the renewal does not rename; the thread is waited for
    all the same."""
    outcome, given_up = "failed", False

    async def give_up_at_guard() -> None:
        nonlocal given_up
        await trio.sleep(max(lease.valid_for() - guard, 0.0))
        given_up = True
        lease.give_up("a renewal hung until the lease was about to lapse")
        log.error("lease on %s given up before it lapses: %s", lease.state, lease._lost)
        on_lost()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(give_up_at_guard)
        try:
            await trio.to_thread.run_sync(lease.renew)
            outcome = "renewed"
        except LeaseLost as exc:
            outcome = "lost"
            if not given_up:
                log.error("%s", exc)
                on_lost()
        except (LeaseError, OSError) as exc:
            log.warning("cannot renew the lease on %s: %s", lease.state, exc)
        nursery.cancel_scope.cancel()
    return "lost" if given_up else outcome


class Renewer:
    """Renews a lease from a thread of its own, where no trio loop runs:
    while a daemon opens its state (which can take minutes for a large one)
    and for the whole run of an offline command (fsck, rekey).

    Used as a context manager; leaving it stops the thread and waits for it
    (never abandoned). The same rules as :func:`keep_renewed`: a loss or a
    validity down to a third of the duration gives the lease up, so that
    every write guarded by :meth:`Lease.guard` is refused from then on.
    *on_renewed* is called after each successful renewal. (The daemon
    does not report renewals as progress of its start: they keep the lease,
    not the start, going.)
    """

    def __init__(self, lease: Lease, on_renewed: Callable[[], None] | None = None) -> None:
        self.lease = lease
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)

    def __enter__(self) -> "Renewer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        lease = self.lease
        guard, wait = lease.duration / 3, _first_wait(lease)
        while not self._stop.wait(wait):
            try:
                lease.renew()
                wait = lease.renew_interval
                if self._on_renewed is not None:
                    self._on_renewed()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except (LeaseError, OSError) as exc:
                log.warning("cannot renew the lease on %s: %s", lease.state, exc)
                wait = lease.duration / 10
            if lease.valid_for() <= guard:
                lease.give_up("renewals failed until the lease was about to lapse")
                log.error("lease on %s given up before it lapses: %s", lease.state, lease._lost)
                return


class Offline:
    """The lease of an offline command (``swapfs fsck``, ``swapfs rekey``).

    A state that has a lease file may be shared with another host, so the
    command takes the lease like a daemon (refused with LeaseHeld while a
    live holder has it), keeps it renewed while it runs, writes only under
    :meth:`guard`, and releases it at the end. So does a state without a
    lease file whose index records a lease generation (*index_generation*,
    read only then: its lease file was removed); a state with neither is a
    single host's, fenced by its flock alone. Pass :meth:`claim`,
    :meth:`guard` and :meth:`restamp` to ``State``: the claim runs once the
    flock is held.
    """

    def __init__(self, state: Path, index_generation: Callable[[], int] | None = None) -> None:
        self.state = Path(state)
        self.lease: Lease | None = None
        self._renewer: Renewer | None = None
        self._index_generation = index_generation

    def claim(self) -> int | None:
        """Take the lease if the state has one, or its index records a
        generation; the lease's generation, else None."""
        info = read_lease(self.state)
        if info is None and (self._index_generation is None or not self._index_generation()):
            return None
        duration = info.duration if info is not None and info.duration > 0 else OFFLINE_SECONDS
        self.lease = acquire(self.state, duration, reclaim_local=True)
        self._renewer = Renewer(self.lease).__enter__()
        return self.lease.generation

    def guard(self) -> None:
        if self.lease is not None:
            self.lease.guard()

    def restamp(self, recorded: int) -> int:
        """:meth:`Lease.restamp_above`, for ``State(..., restamp=...)``."""
        assert self.lease is not None
        return self.lease.restamp_above(recorded)

    def __enter__(self) -> "Offline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._renewer is not None:
            self._renewer.__exit__()
        if self.lease is not None:
            self.lease.release()
