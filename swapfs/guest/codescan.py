"""The unused space inside the code pages of running processes.

The kernel maps code in whole pages, but a code segment rarely starts and
ends on a page boundary: the bytes of its first and last pages outside the
segment's file range are mapped and never used. This module finds them, per
the one definition the driver's figures rest on (so anyone can check them):

For each executable file-backed mapping in ``/proc/PID/maps``, read the
mapped file's ELF program headers. For each executable PT_LOAD segment the
mapping covers, the unused space is the bytes of the segment's mapped pages
that lie outside ``[p_offset, p_offset + p_filesz)``: the *head*,
``p_offset % PAGE`` bytes before it in its first page, and the *tail*,
``-(p_offset + p_filesz) % PAGE`` bytes after it in its last page. The head
counts only if the mapping covers the segment's first page, the tail only if
it covers its last page.

Two totals: *per process* sums every extent (every process counts its own
mappings); *physical* counts a file mapped by many processes once, keyed by
(device, inode, segment index, head or tail). Processes that vanish
mid-scan, unreadable ``/proc`` entries, non-ELF and truncated files are
skipped and counted by reason, never fatal.
"""

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swapfs.control import PAGE_SIZE, Extent
from swapfs.guest.elf import NotElf, ProgramHeader, TruncatedElf, read_program_headers

log = logging.getLogger(__name__)


#: Why something was left out of a scan; every reason is always reported.
SKIP_REASONS = ("vanished", "unreadable", "not_elf", "truncated")

_GONE = (errno.ENOENT, errno.ESRCH)


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    device: str  # "major:minor" in hex, as the kernel prints it
    inode: int
    path: str

    @property
    def executable_file(self) -> bool:
        """Executable and backed by a file (not [vdso], not anonymous)."""
        return "x" in self.perms and self.path.startswith("/")

    @property
    def map_files_name(self) -> str:
        """Its entry in ``/proc/PID/map_files``."""
        return f"{self.start:x}-{self.end:x}"


@dataclass
class Scan:
    """The result of one scan.

    ``skipped`` counts processes whose maps could not be read and executable
    mappings whose file could not be read or parsed, by reason.
    """

    extents: list[Extent] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    processes: int = 0
    mappings: int = 0
    page_size: int = PAGE_SIZE

    @property
    def per_process_bytes(self) -> int:
        return sum(extent.length for extent in self.extents)

    @property
    def physical_bytes(self) -> int:
        lengths = {extent.physical_key: extent.length for extent in self.extents}
        return sum(lengths.values())

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form: the two totals are top-level keys."""
        return {
            "per_process_bytes": self.per_process_bytes,
            "physical_bytes": self.physical_bytes,
            "processes": self.processes,
            "mappings": self.mappings,
            "page_size": self.page_size,
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS},
            "extents": [asdict(extent) for extent in self.extents],
        }


def parse_maps(text: str) -> list[Mapping]:
    """The mappings of a ``/proc/PID/maps`` text (a path may hold spaces)."""
    mappings = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, end = (int(part, 16) for part in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        mappings.append(Mapping(start, end, fields[1], int(fields[2], 16), fields[3],
                                int(fields[4]), path))
    return mappings


def unused_parts(mapping: Mapping, header: ProgramHeader,
                 page: int = PAGE_SIZE) -> list[tuple[str, int, int]]:
    """(part, address, length) of the unused bytes of ``header``'s pages in ``mapping``.

    Nothing if the segment is not executable code, has no file bytes, or the
    mapping covers none of its pages.
    """
    if not header.executable_load or header.filesz == 0:
        return []
    first_page = header.offset - header.offset % page
    end = header.offset + header.filesz
    last_page = end - 1 - (end - 1) % page
    mapped_end = mapping.offset + (mapping.end - mapping.start)

    def covers(file_offset: int) -> bool:
        return mapping.offset <= file_offset < mapped_end

    parts = []
    head = header.offset % page
    if head and covers(first_page):
        parts.append(("head", mapping.start + first_page - mapping.offset, head))
    tail = -end % page
    if tail and covers(last_page):
        parts.append(("tail", mapping.start + end - mapping.offset, tail))
    return parts


def all_pids(proc: Path = Path("/proc")) -> list[int]:
    """Every process id in ``proc``, in order."""
    return sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())


def _open_mapped_file(proc_pid: Path, mapping: Mapping) -> int:
    """A descriptor on the exact file behind ``mapping``.

    ``map_files`` is the mapped file itself even if it was replaced or
    deleted on disk; the path is the fall-back, accepted only if its inode is
    still the mapped one. A special file (a device someone mapped executable)
    is never read: reading one can block or have effects.
    """
    candidates = [str(proc_pid / "map_files" / mapping.map_files_name), mapping.path]
    last_error: OSError | None = None
    for index, candidate in enumerate(candidates):
        try:
            info = os.stat(candidate)
        except OSError as exc:
            last_error = exc
            continue
        if index > 0 and info.st_ino != mapping.inode:
            last_error = OSError(errno.ESTALE, "replaced on disk since it was mapped", candidate)
            continue
        if not stat.S_ISREG(info.st_mode):
            raise NotElf(f"{mapping.path}: not a regular file")
        try:
            return os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


class _HeaderCache:
    """Program headers by (device, inode): libc is parsed once, not once per process."""

    def __init__(self) -> None:
        self._headers: dict[tuple[str, int], list[ProgramHeader] | Exception] = {}

    def get(self, proc_pid: Path, mapping: Mapping) -> list[ProgramHeader]:
        key = (mapping.device, mapping.inode)
        cached = self._headers.get(key)
        if cached is None:
            try:
                fd = _open_mapped_file(proc_pid, mapping)
                with os.fdopen(fd, "rb") as file:
                    cached = read_program_headers(file)
            except (NotElf, TruncatedElf) as exc:
                cached = exc  # a property of the file: the same for every process
            self._headers[key] = cached
        if isinstance(cached, Exception):
            raise cached
        return cached


def _scan_process(pid: int, proc: Path, cache: _HeaderCache, result: Scan) -> None:
    proc_pid = proc / str(pid)
    try:
        text = (proc_pid / "maps").read_text()
    except OSError as exc:
        reason = "vanished" if exc.errno in _GONE else "unreadable"
        log.debug("pid %d: %s: %s", pid, reason, exc)
        result.skipped[reason] += 1
        return
    result.processes += 1
    for mapping in parse_maps(text):
        if not mapping.executable_file:
            continue
        result.mappings += 1
        try:
            headers = cache.get(proc_pid, mapping)
        except NotElf as exc:
            log.debug("pid %d: %s", pid, exc)
            result.skipped["not_elf"] += 1
            continue
        except TruncatedElf as exc:
            log.debug("pid %d: %s: %s", pid, mapping.path, exc)
            result.skipped["truncated"] += 1
            continue
        except OSError as exc:
            reason = "vanished" if exc.errno in _GONE else "unreadable"
            log.debug("pid %d: %s: %s: %s", pid, mapping.path, reason, exc)
            result.skipped[reason] += 1
            continue
        for header in headers:
            for part, address, length in unused_parts(mapping, header, result.page_size):
                result.extents.append(Extent(pid, mapping.path, mapping.device, mapping.inode,
                                             address, length, header.index, part))


def scan(pids: Iterable[int] | None = None, proc: Path = Path("/proc")) -> Scan:
    """Scan the given processes (all of them by default)."""
    result = Scan()
    cache = _HeaderCache()
    for pid in all_pids(proc) if pids is None else pids:
        _scan_process(pid, proc, cache, result)
    return result
