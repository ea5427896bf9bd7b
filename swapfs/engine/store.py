"""The block store: one data file per chain, cut into 4 KiB slots.

Slot *n* of chain *c* is bytes ``[n * 4096, (n + 1) * 4096)`` of
``data/<c>.blocks``. The store knows nothing about digests or refcounts; the
index decides which slots hold what. A slot that stays free is hole-punched
(a second or two after it was freed, unless a new block took it first:
``swapfs/engine/reclaim.py``), so that the disk usage of the state directory
follows the blocks really stored.

A chain of an encrypted state also has a seal file, ``data/<c>.seals``:
slot *n*'s seal record (``swapfs/engine/sealing.py``) at bytes
``[n * 32, (n + 1) * 32)``. It is written with the slot's data, before the
transaction naming the slot commits, and it is never punched: a free slot's
stale record names a digest no map entry asks for. It is used through a
shared memory map, so that a record costs a copy of 32 bytes rather than a
system call. With a pread per record, an encrypted 4 KiB read cost 7.7 us;
mapped, 6.2 (unencrypted: 5.4; tools/readcost.py, pure Python, the two
trees alternating in one sitting). Writes of 56 scattered blocks cost the
same either way (13.1 and 13.0 us a block, tools/writecost.py). The file
grows in steps that are allocated before they are mapped: a full disk then
fails the growth with ENOSPC, never a store into the map with SIGBUS.
"""

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.sealing import SEAL_SIZE

log = logging.getLogger(__name__)

#: The most slots one system call writes. The page cache keeps what one
#: write brought in as a folio of that size, and (on ext4 with large folios,
#: Linux 6.x) a later 4 KiB overwrite costs time in proportion to the folio
#: it lands in: 1.5 us in a 4 KiB folio, 1.8 us in 64 KiB, 6.0 us in 1 MiB.
#: A slot is overwritten 4 KiB at a time, so new runs go out 64 KiB at most.
_WRITE_RUN = 16
#: The seal file grows by the records of this many slots at a time (128 KiB).
_SEAL_STEP = 4096
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

    def __init__(self, directory: Path, guard: Callable[[], None] | None = None) -> None:
        self.directory = directory
        #: Raises (EROFS) when this process may not write the state now: the
        #: lease's check, made right before every data and seal write.
        self.guard = guard
        directory.mkdir(mode=0o700, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._seals: dict[int, _SealMap] = {}

    def path(self, chain_id: int) -> Path:
        return self.directory / f"{chain_id}.blocks"

    def seal_path(self, chain_id: int) -> Path:
        return self.directory / f"{chain_id}.seals"

    def _fd(self, chain_id: int) -> int:
        fd = self._fds.get(chain_id)
        if fd is None:
            fd = os.open(self.path(chain_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # Neighbouring slots hold unrelated blocks: reading ahead only
            # fills the page cache (in large folios, see _WRITE_RUN) with them.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[chain_id] = fd
        return fd

    def _seal_map(self, chain_id: int) -> "_SealMap":
        seals = self._seals.get(chain_id)
        if seals is None:
            try:
                seals = self._seals[chain_id] = _SealMap(self.seal_path(chain_id))
            except OSError as exc:
                raise SwapfsError.of(exc) from exc
        return seals

    def read_slot(self, chain_id: int, slot: int, sealed: bool) -> tuple[bytes, bytes | None]:
        """What one slot holds: its bytes (short where the data file ends)
        and, if its chain is *sealed*, its seal record (empty where the seal
        file ends)."""
        data = self.read_many(chain_id, [slot])[0]
        return data, self._seal_map(chain_id).read(slot) if sealed else None

    def read_many(self, chain_id: int, slots: list[int]) -> list[bytes]:
        """The bytes of each slot, reading runs of consecutive slots at once."""
        fd = self._fd(chain_id)
        out: list[bytes] = []
        start = 0
        try:
            if len(slots) == 1:  # the common case of a 4 KiB read
                return [os.pread(fd, BLOCK_SIZE, slots[0] * BLOCK_SIZE)]
            while start < len(slots):
                end = start + 1
                while end < len(slots) and slots[end] == slots[end - 1] + 1:
                    end += 1
                run = os.pread(fd, (end - start) * BLOCK_SIZE, slots[start] * BLOCK_SIZE)
                out.extend(run[offset:offset + BLOCK_SIZE]
                           for offset in range(0, (end - start) * BLOCK_SIZE, BLOCK_SIZE))
                start = end
        except OSError as exc:
            raise SwapfsError.of(exc) from exc
        return out

    def read_seals(self, chain_id: int, slots: list[int]) -> list[bytes]:
        """The seal record of each slot (empty where the seal file ends)."""
        seals = self._seal_map(chain_id)
        return [seals.read(slot) for slot in slots]

    def write_seals(self, chain_id: int, records: list[tuple[int, bytes]]) -> None:
        """Write the seal records of slots (ENOSPC if the file cannot grow)."""
        if self.guard is not None:
            self.guard()
        seals = self._seal_map(chain_id)
        seals.reserve(max(slot for slot, _record in records) + 1)
        for slot, record in records:
            seals.write(slot, record)

    def write_many(self, chain_id: int, blocks: list[tuple[int, bytes]]) -> None:
        """Write full blocks into their slots, one system call per run of slots."""
        if self.guard is not None:
            self.guard()
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
            if done < want:  # a short write: finish it the plain way
                rest = memoryview(b"".join(buffers))[done:]
                while rest:
                    written = os.pwrite(fd, rest, offset + done)
                    if written == 0:
                        raise SwapfsError(errno.ENOSPC)
                    rest = rest[written:]
                    done += written
        except OSError as exc:
            raise SwapfsError.of(exc) from exc

    def punch(self, chain_id: int, slots: Iterable[int]) -> None:
        """Give the disk space of freed slots back to the file system.

        Failure only leaks space (fsck finds and punches it later), so it is
        logged rather than raised: the transaction that freed them is
        already committed. Nothing is punched once the guard refuses.
        """
        try:
            if self.guard is not None:
                self.guard()
            fd = self._fd(chain_id)
        except (OSError, SwapfsError) as exc:
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
        for fd in (*self._fds.values(), *(seals.fd for seals in self._seals.values())):
            os.fdatasync(fd)  # the maps' dirty pages too

    def remove(self, chain_id: int) -> None:
        """Delete a chain's data and seal files (the chain holds no more blocks)."""
        if self.guard is not None:
            self.guard()
        fd = self._fds.pop(chain_id, None)
        if fd is not None:
            os.close(fd)
        seals = self._seals.pop(chain_id, None)
        if seals is not None:
            seals.close()
        self.path(chain_id).unlink(missing_ok=True)
        self.seal_path(chain_id).unlink(missing_ok=True)

    def disk_bytes(self, chain_id: int, seals: bool = False) -> int:
        """Bytes the chain's data file (or with *seals*, its seal file) really
        occupies on disk."""
        try:
            path = self.seal_path(chain_id) if seals else self.path(chain_id)
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for seals in self._seals.values():
            seals.close()
        self._seals.clear()


class _SealMap:
    """A chain's seal file, mapped: its records read and written in memory."""

    __slots__ = ("fd", "map", "size")

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.map = mmap.mmap(self.fd, self.size) if self.size else None

    def read(self, slot: int) -> bytes:
        end = (slot + 1) * SEAL_SIZE
        if end > self.size or self.map is None:
            return b""
        return self.map[end - SEAL_SIZE:end]

    def reserve(self, slots: int) -> None:
        """Make room for the records of *slots* slots: allocate the file's
        next steps on disk (SwapfsError ENOSPC if it is full), then map them."""
        want = slots * SEAL_SIZE
        if want <= self.size:
            return
        size = -(-slots // _SEAL_STEP) * _SEAL_STEP * SEAL_SIZE
        try:
            _fallocate(self.fd, 0, self.size, size - self.size)  # allocates, and extends
        except OSError as exc:
            raise SwapfsError.of(exc) from exc
        if self.map is None:
            self.map = mmap.mmap(self.fd, size)
        else:
            self.map.resize(size)
        self.size = size

    def write(self, slot: int, record: bytes) -> None:
        """Store one record; its slot is within what :meth:`reserve` made room for."""
        assert self.map is not None
        offset = slot * SEAL_SIZE
        self.map[offset:offset + SEAL_SIZE] = record

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)
