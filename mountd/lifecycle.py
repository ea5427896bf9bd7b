"""Keeping a swap daemon alive under memory pressure, and telling systemd.

A daemon that serves swap must never need swap, nor wait on I/O to
reclaim memory, to make progress: otherwise the kernel, short of memory,
swaps to swapfs, swapfs needs memory to answer, and the two wait for each
other. So the daemon

* locks its memory (``mlockall``; ``MCL_ONFAULT`` so that what it maps is
  locked page by page as it is used, not up front), but not the pages of
  the state's own files that it maps (the LMDB index, the seal files):
  those are the files' page cache, which the kernel may drop and read
  again from the state's disk, never from swap; locked, they grew with
  every page of the index the daemon ever touched, about 15 MiB per GiB
  stored once its scan of the slot tables had read them all; and past a
  bound it takes those pages out of its page tables
  (:func:`unmap_file_pages_under`), since a killed daemon's mappings are
  torn down before the standby can notice the death;
* marks its threads as I/O flushers (``PR_SET_IO_FLUSHER``): their
  allocations never recurse into I/O and reclaim does not throttle them;
* asks the OOM killer to spare it (``oom_score_adj`` -1000);
* raises its limit of open files to the hard limit, so that control
  connections (bounded: ``control_max_connections``) and the chains' data
  files do not run out of descriptors at the soft limit's 1024;
* gives the heap back to the system after a driver leaves
  (``malloc_trim``): memory is locked, and what a driver's messages took
  would otherwise stay locked after it is gone.

It also keeps its memory (keys, plaintext pages) out of core dumps with
:func:`swapfs.control.nodump.forbid_core_dumps`, which lives below the daemon so
that the guest driver, which must not import the daemon, uses it too.

Each step needs privileges (CAP_IPC_LOCK, CAP_SYS_RESOURCE); a step that
fails is logged and the daemon goes on, so that an unprivileged mount for
testing still works.
"""

import ctypes
import ctypes.util
import logging
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

_MCL_CURRENT = 1
_MCL_FUTURE = 2
_MCL_ONFAULT = 4
_PR_SET_IO_FLUSHER = 57
_PR_GET_IO_FLUSHER = 58


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def lock_memory() -> bool:
    """Lock every page of the daemon, present and future, once touched."""
    if _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        log.warning("cannot lock memory (mlockall): %s", _errno_text())
        return False
    return True


def set_io_flusher() -> bool:
    """Mark the calling thread as an I/O flusher (PR_SET_IO_FLUSHER).

    The flag belongs to a thread. Threads created afterwards inherit it;
    a thread created elsewhere that serves requests must call this itself.
    """
    if _libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("cannot set PR_SET_IO_FLUSHER: %s", _errno_text())
        return False
    return True


def is_io_flusher() -> bool:
    return bool(_libc.prctl(_PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1)


def protect_from_oom(score: int) -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(score))
    except OSError as exc:
        log.warning("cannot set oom_score_adj %d: %s", score, exc)
        return False
    return True


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit to %d: %s", hard, exc)
    return soft


_MADV_DONTNEED = 4
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(size: int = 128 << 10, keep: int = 32 << 20) -> None:
    """Serve every allocation of *size* or more with a mapping of its own,
    and let the top of the heap keep up to *keep* free bytes.

    glibc raises the mmap threshold as big blocks are freed, so that later
    big blocks (a driver's 1 MiB report, its parse) come from the heap.
    Under mlockall the heap cannot give freed pages in its middle back (they
    are locked: madvise refuses), so what a burst of drivers took stayed.
    With the threshold fixed, each big block is unmapped when freed.

    Fixing it also fixes the trim threshold at its default, 128 KiB: the heap
    shrank after every write of 1 MiB (its 256 blocks, and as many sealed
    copies), and the next write faulted all those pages in again, locked.
    *keep* spares those faults; what a burst leaves is still given back when
    a driver leaves (:func:`trim_heap`)."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, size)
                               and mallopt(_M_TRIM_THRESHOLD, keep)):
        log.warning("cannot set malloc's mmap and trim thresholds")


def trim_heap(locked: bool) -> None:
    """Return the free memory at the top of the heap and in its holes to the
    system (glibc's malloc_trim; nothing elsewhere).

    The holes are given back with madvise(MADV_DONTNEED), which locked pages
    refuse: when the daemon's memory is *locked*, it is unlocked for the
    trim (a few milliseconds) and locked again, present pages at once."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return
    if not locked:
        trim(0)
        return
    _libc.munlockall()
    try:
        trim(0)
    finally:
        if _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
            log.error("cannot lock memory again after a trim: %s", _errno_text())


def _mappings_under(directory: Path, maps: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end, shared) of each of this process's mappings of a file
    under *directory*, from /proc/self/maps."""
    prefix = str(directory).rstrip("/") + "/"
    with open(maps) as lines:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].rstrip("\n").startswith(prefix):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            yield start, end, fields[1].endswith("s")


def unlock_files_under(directory: Path, maps: str = "/proc/self/maps") -> int:
    """Unlock this process's mappings of files under *directory*; the bytes
    unlocked. ``mlockall(MCL_FUTURE)`` locks every new mapping, and a trim
    (:func:`trim_heap`) locks every present one again, so the daemon calls
    this after its open and then now and then."""
    unlocked = 0
    for start, end, _ in _mappings_under(directory, maps):
        if _libc.munlock(ctypes.c_void_p(start), ctypes.c_size_t(end - start)) == 0:
            unlocked += end - start
    return unlocked


def unmap_file_pages_under(directory: Path, maps: str = "/proc/self/maps") -> int:
    """Take the pages of the shared mappings of files under *directory* out
    of this process's page tables (``madvise(MADV_DONTNEED)``); the bytes
    advised. The pages stay in the page cache, a dirty one still dirty and
    written back as any: the next touch maps it again (a minor fault), and
    no byte of the file changes. A private mapping is left alone: there the
    advice would throw its own copies away.

    Why: every page of the index the daemon touched (its scan of the slot
    tables reads them all, about 7 MiB per GiB stored) stayed in its
    mappings, counted in its resident memory, and had to be unmapped when
    it died, before the kernel closed its descriptors and the standby could
    notice: about 60 µs per MiB mapped, 15 ms of a takeover at 64 GiB."""
    advised = 0
    for start, end, shared in _mappings_under(directory, maps):
        if shared and _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                    _MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def memory(stored_bytes: int, status: str = "/proc/self/status") -> dict[str, Any]:
    """This process's resident and locked memory (``VmRSS``, ``VmLck``), and
    each per GiB of *stored_bytes* (null with nothing stored): what the
    daemon costs its host as the store grows (``swapfs stats``). Of the
    resident memory, ``RssFile`` is pages of files it maps (the index, the
    seal files, its libraries), which the kernel may drop; ``RssAnon`` is
    its own."""
    figures = {"rss_bytes": 0, "own_bytes": 0, "file_bytes": 0, "locked_bytes": 0}
    keys = {"VmRSS": "rss_bytes", "RssAnon": "own_bytes", "RssFile": "file_bytes",
            "VmLck": "locked_bytes"}
    with open(status) as lines:
        for line in lines:
            name, _, value = line.partition(":")
            key = keys.get(name)
            if key is not None:
                figures[key] = int(value.split()[0]) * 1024  # kB
    gib = stored_bytes / (1 << 30)
    return {**figures, "stored_bytes": stored_bytes,
            "rss_bytes_per_gib_stored": figures["rss_bytes"] / gib if gib else None,
            "own_bytes_per_gib_stored": figures["own_bytes"] / gib if gib else None,
            "locked_bytes_per_gib_stored": figures["locked_bytes"] / gib if gib else None}


def sd_notify(state: str) -> None:
    """Send a state line (``READY=1``, ``STOPPING=1``) to systemd, if it listens.

    The protocol is one datagram on the socket named by $NOTIFY_SOCKET; it
    is small enough that a dependency on libsystemd is not worth it.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)
