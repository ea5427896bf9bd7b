"""The block store: one data file per chain, cut into 4 KiB slots.

Slot *n* of chain *c* is bytes ``[n * 4096, (n + 1) * 4096)`` of
``data/<c>.blocks``. The store knows nothing about digests or refcounts; the
index decides which slots hold what. A slot that stays free is hole-punched
(a second or two after it was freed, unless a new block took it first:
``swapfs/reclaim.py``), so that the disk usage of the state directory
follows the blocks really stored.

A chain of an encrypted state also has a seal file, ``data/<c>.seals``:
slot *n*'s seal record (``swapfs/sealing.py``) at bytes
``[n * 32, (n + 1) * 32)``. It is written with the slot's data, before the
transaction naming the slot commits, and it is never punched: a free slot's
stale record names a digest no map entry asks for.
"""

import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from swapfs.blocks import BLOCK_SIZE
from swapfs.errors import SwapfsError
from swapfs.sealing import RECORD_SIZE

log = logging.getLogger(__name__)

#: The most slots one system call writes. The page cache keeps what one
#: write brought in as a folio of that size, and (on ext4 with large folios,
#: Linux 6.x) a later 4 KiB overwrite costs time in proportion to the folio
#: it lands in: 1.5 us in a 4 KiB folio, 1.8 us in 64 KiB, 6.0 us in 1 MiB.
#: A slot is overwritten 4 KiB at a time, so new runs go out 64 KiB at most.
_WRITE_RUN = 16
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a file, keeping its size."""
    _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate disk space for a byte range of a file, even past its end,
    keeping its size (OSError ENOSPC when the file system is full)."""
    _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _consecutive(slots: list[int]) -> Iterator[tuple[int, int]]:
    """(start, end) index ranges of *slots*, in their order, over which each
    slot follows the one before it."""
    start = 0
    while start < len(slots):
        end = start + 1
        while end < len(slots) and slots[end] == slots[end - 1] + 1:
            end += 1
        yield start, end
        start = end


def slot_runs(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Coalesce slot numbers into ``(first, count)`` runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


class BlockStore:
    """The data files of all chains in one state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._seal_fds: dict[int, int] = {}

    def path(self, chain_id: int) -> Path:
        return self.directory / f"{chain_id}.blocks"

    def seal_path(self, chain_id: int) -> Path:
        return self.directory / f"{chain_id}.seals"

    def _fd(self, chain_id: int) -> int:
        fd = self._fds.get(chain_id)
        if fd is None:
            fd = self._fds[chain_id] = _open(self.path(chain_id))
        return fd

    def _seal_fd(self, chain_id: int) -> int:
        fd = self._seal_fds.get(chain_id)
        if fd is None:
            fd = self._seal_fds[chain_id] = _open(self.seal_path(chain_id))
        return fd

    def read(self, chain_id: int, slot: int) -> bytes:
        """The slot's bytes; short when the data file ends inside the slot."""
        return self.read_many(chain_id, [slot])[0]

    def read_many(self, chain_id: int, slots: list[int]) -> list[bytes]:
        """The bytes of each slot, reading runs of consecutive slots at once."""
        fd = self._fd(chain_id)
        try:
            if len(slots) == 1:  # the common case of a 4 KiB read
                return [os.pread(fd, BLOCK_SIZE, slots[0] * BLOCK_SIZE)]
            return _read_runs(fd, slots, BLOCK_SIZE)
        except OSError as exc:
            raise SwapfsError.of(exc) from exc

    def read_seals(self, chain_id: int, slots: list[int]) -> list[bytes]:
        """The seal record of each slot (short where the seal file ends)."""
        try:
            return _read_runs(self._seal_fd(chain_id), slots, RECORD_SIZE)
        except OSError as exc:
            raise SwapfsError.of(exc) from exc

    def write_seals(self, chain_id: int, records: list[tuple[int, bytes]]) -> None:
        """Write the seal records of slots, one system call per run of slots."""
        fd = self._seal_fd(chain_id)
        records = sorted(records)
        slots = [slot for slot, _record in records]
        for start, end in _consecutive(slots):
            _write_fully(fd, b"".join(record for _slot, record in records[start:end]),
                         slots[start] * RECORD_SIZE)

    def write_many(self, chain_id: int, blocks: list[tuple[int, bytes]]) -> None:
        """Write full blocks into their slots, one system call per run of slots."""
        if len(blocks) == 1:  # a 4 KiB write's: the common case
            ((slot, data),) = blocks
            self._write_run(chain_id, slot, [data])
            return
        blocks = sorted(blocks)
        start = 0
        while start < len(blocks):
            end = start + 1
            while (end < len(blocks) and end - start < _WRITE_RUN
                   and blocks[end][0] == blocks[end - 1][0] + 1):
                end += 1
            self._write_run(chain_id, blocks[start][0],
                            [data for _slot, data in blocks[start:end]])
            start = end

    def _write_run(self, chain_id: int, slot: int, buffers: list[bytes]) -> None:
        fd = self._fd(chain_id)
        offset = slot * BLOCK_SIZE
        want = len(buffers) * BLOCK_SIZE
        try:
            done = os.pwritev(fd, buffers, offset)
        except OSError as exc:
            raise SwapfsError.of(exc) from exc
        if done < want:  # a short write: finish it the plain way
            _write_fully(fd, memoryview(b"".join(buffers))[done:], offset + done)

    def punch(self, chain_id: int, slots: Iterable[int]) -> None:
        """Give the disk space of freed slots back to the file system.

        Failure only leaks space (fsck finds and punches it later), so it is
        logged rather than raised: the transaction that freed them is
        already committed.
        """
        try:
            fd = self._fd(chain_id)
        except OSError as exc:
            log.warning("cannot punch slots of chain %d: %s", chain_id, exc)
            return
        for first, count in slot_runs(slots):
            try:
                punch_hole(fd, first * BLOCK_SIZE, count * BLOCK_SIZE)
            except OSError as exc:
                log.warning("cannot punch slots %d+%d of chain %d: %s",
                            first, count, chain_id, exc)

    def holds_data(self, chain_id: int, slot: int) -> bool:
        """Does the slot occupy disk space (is it not a hole)?"""
        offset = slot * BLOCK_SIZE
        try:
            return os.lseek(self._fd(chain_id), offset, os.SEEK_DATA) < offset + BLOCK_SIZE
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return False
            raise SwapfsError.of(exc) from exc

    def chain_files(self) -> list[tuple[int, Path]]:
        """(chain id, path) of the data and seal files present in the directory."""
        return sorted((int(path.stem), path) for path in self.directory.iterdir()
                      if path.suffix in (".blocks", ".seals") and path.stem.isdigit())

    def sync(self) -> None:
        """Flush every data and seal file to stable storage."""
        for fd in (*self._fds.values(), *self._seal_fds.values()):
            os.fdatasync(fd)

    def remove(self, chain_id: int) -> None:
        """Delete a chain's data and seal files (the chain holds no more blocks)."""
        for fds, path in ((self._fds, self.path(chain_id)),
                          (self._seal_fds, self.seal_path(chain_id))):
            fd = fds.pop(chain_id, None)
            if fd is not None:
                os.close(fd)
            path.unlink(missing_ok=True)

    def disk_bytes(self, chain_id: int, seals: bool = False) -> int:
        """Bytes the chain's data file (or with *seals*, its seal file) really
        occupies on disk."""
        try:
            path = self.seal_path(chain_id) if seals else self.path(chain_id)
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        for fds in (self._fds, self._seal_fds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # Neighbouring slots hold unrelated blocks: reading ahead only fills the
    # page cache (in large folios, see _WRITE_RUN) with them.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _read_runs(fd: int, slots: list[int], size: int) -> list[bytes]:
    """The *size* bytes of each slot, one pread per run of consecutive slots."""
    out: list[bytes] = []
    for start, end in _consecutive(slots):
        run = os.pread(fd, (end - start) * size, slots[start] * size)
        out.extend(run[offset:offset + size] for offset in range(0, (end - start) * size, size))
    return out


def _write_fully(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite all of *data*; SwapfsError (ENOSPC when nothing more fits)."""
    rest = memoryview(data)
    try:
        while rest:
            written = os.pwrite(fd, rest, offset)
            if written == 0:
                raise SwapfsError(errno.ENOSPC)
            rest = rest[written:]
            offset += written
    except OSError as exc:
        raise SwapfsError.of(exc) from exc
