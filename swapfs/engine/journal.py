"""The index's journal: the write transactions of a batch, until LMDB commits it.

A write to a swap file changes a few records of the index: a run of its
map, a run or two of its chain's slot table, its inode, its chain's counts.
An LMDB commit for each cost more than all the rest of the write: the
commit itself, and a copy of every page on the path to each changed
record, pages that the pinned checkpoint (``checkpoint.py``) keeps LMDB
from reusing until the next one. So the write transactions of a batch
share one LMDB transaction (``Index``), committed when the journal is
full, at every checkpoint, and before any change the journal cannot name.
Until then their values are not even put in it: they wait in the index's
overlay (``index.py``), which a value enters once however often the batch
changes it, and which goes into LMDB's transaction when the batch commits
(as it also does once the overlay holds
:data:`~swapfs.engine.index.OVERLAY_BYTES`).

Each write transaction, as it commits, appends what it put and deleted
here before its caller hears of it, copied into the file's shared mapping
(no system call; the page cache holds it once copied): a run of a map or
a slot table that it changed as the entries that changed (a ``PATCH``, a
few dozen bytes where the run is 4 KiB), a small value whole. A daemon killed
with a batch open loses LMDB's transaction but not the journal, which the
page cache holds: the next open in the same boot applies the records whose
base is LMDB's last transaction. Each record carries the boot, the base
(LMDB's last transaction id when the batch began), its sequence number in
the batch and a CRC-32; the records of a batch are read from the start
of the file and end at the first one that does not follow.

An index opened in another boot ignores the journal: after a power cut
the index rolls back to its checkpoint, and the records, whatever of them
reached the disk, may name data that never did. What an ``fsync``
promises is the checkpoint's, which commits the batch first.

The file is allocated in full (:data:`JOURNAL_BYTES`) when the index is
opened for writing, so that an append never finds the disk full; a record
that would not fit commits the batch instead. The records are bounded by
the file, and the values they name by the index's overlay: an open makes
the records again in memory and puts each value they changed once,
however much the state holds.
"""

import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from zlib_ng.zlib_ng import crc32

from swapfs.engine.store import preallocate

log = logging.getLogger(__name__)

NAME = "journal"
#: The file's size, and so the most a batch changes before LMDB commits it.
JOURNAL_BYTES = 4 << 20
#: The bytes an open reads first; more as the records go on.
READ_FIRST = 64 << 10
_MAGIC = b"SWJR"
#: magic, boot id, base transaction id, sequence number, body length, CRC-32
#: of the rest of the header and the body.
_HEADER = struct.Struct("<4s16sQIII")
#: kind, database number, key length, value length; then the key and the value.
_OP = struct.Struct("<BBHI")
PUT = 1
DELETE = 2
#: A change to part of a value: its value is the offset in the value's
#: payload (u32) and the bytes written there (made again by ``index._apply``).
PATCH = 3

#: The databases a record may name, by their number in it.
DATABASES = (b"meta", b"inodes", b"dirents", b"chains", b"slots", b"filemaps", b"orphans",
             b"damaged", b"priorities", b"mapdirs")
_NUMBERS = {name: number for number, name in enumerate(DATABASES)}

#: One change: (kind, database name, key, value); the value is b"" for a delete.
Op = tuple[int, bytes, bytes, bytes]


def encode(ops: list[Op]) -> bytes:
    """The body of a record naming *ops*."""
    parts = []
    for kind, name, key, value in ops:
        parts.append(_OP.pack(kind, _NUMBERS[name], len(key), len(value)))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def decode(body: bytes) -> list[Op]:
    """The ops of a record's body (ValueError if it is not one)."""
    ops = []
    at = 0
    while at < len(body):
        kind, number, key_length, value_length = _OP.unpack_from(body, at)
        at += _OP.size
        if kind not in (PUT, DELETE, PATCH) or number >= len(DATABASES):
            raise ValueError(f"op {kind} on database {number}")
        if kind == PATCH and value_length < 4:
            raise ValueError("a patch without its offset")
        key = body[at:at + key_length]
        value = body[at + key_length:at + key_length + value_length]
        at += key_length + value_length
        if len(key) != key_length or len(value) != value_length:
            raise ValueError("an op cut short")
        ops.append((kind, DATABASES[number], key, value))
    return ops


def journaled(name: bytes) -> bool:
    """Whether a record can name a change to database *name*."""
    return name in _NUMBERS


class Journal:
    """The journal file of one index, open for appending."""

    def __init__(self, directory: Path, boot: bytes, writable: bool = True) -> None:
        """Open (or make, allocated in full) *directory*'s journal; OSError if
        the disk has no room for it. Not *writable* (a read-only check), an
        existing one is opened to be read (FileNotFoundError if none is)."""
        self.path = directory / NAME
        self.boot = boot
        #: The file, shared, when it is written: a record copied there is
        #: in the page cache.
        self._map: mmap.mmap | None = None
        if not writable:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                preallocate(self._fd, 0, JOURNAL_BYTES)
                if os.fstat(self._fd).st_size < JOURNAL_BYTES:
                    os.ftruncate(self._fd, JOURNAL_BYTES)  # its space allocated above
                self._map = mmap.mmap(self._fd, JOURNAL_BYTES)
            except BaseException:
                os.close(self._fd)
                raise
        #: Where the next record goes, and its sequence number.
        self.end = 0
        self.sequence = 0

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        os.close(self._fd)

    def records(self, base: int) -> Iterator[list[Op]]:
        """The ops of each record of the batch based on LMDB transaction
        *base* in this boot, in order; the next append follows them."""
        raw = b""
        at = sequence = 0
        while True:
            raw = self._read_to(raw, at + _HEADER.size)
            if at + _HEADER.size > len(raw):
                break
            magic, boot, record_base, number, length, crc = _HEADER.unpack_from(raw, at)
            end = at + _HEADER.size + length
            if (magic != _MAGIC or boot != self.boot or record_base != base
                    or number != sequence):
                break
            raw = self._read_to(raw, end)
            if end > len(raw):
                break
            header = raw[at:at + _HEADER.size - 4]
            body = raw[at + _HEADER.size:end]
            if crc32(body, crc32(header)) != crc:
                break
            try:
                ops = decode(body)
            except (ValueError, struct.error) as exc:
                log.warning("%s: record %d does not decode (%s): the batch ends there",
                            self.path, sequence, exc)
                break
            yield ops
            at, sequence = end, sequence + 1
            self.end, self.sequence = at, sequence

    def _read_to(self, raw: bytes, end: int) -> bytes:
        """*raw*, the journal's first bytes, read on to at least *end* bytes
        where the file has them: twice as many at each read, from
        READ_FIRST, so that an open reads what the batch wrote and not the
        whole file (4 MiB, 2-3 ms of a takeover)."""
        if end <= len(raw) or len(raw) >= JOURNAL_BYTES:
            return raw
        size = min(max(end, 2 * len(raw), READ_FIRST), JOURNAL_BYTES)
        more = os.pread(self._fd, size - len(raw), len(raw))
        return raw + more

    def append(self, base: int, ops: list[Op]) -> bool:
        """Append a record of *ops* to the batch based on *base*: False,
        with nothing written, if it would not fit or the journal is opened
        to be read (commit the batch then). The record is copied into the
        file's shared mapping: the page cache has it once the copy is done,
        without a system call (the file is allocated in full, so a copy
        never meets a full disk)."""
        body = encode(ops)
        end = self.end + _HEADER.size + len(body)
        if end > JOURNAL_BYTES or self._map is None:
            return False
        header = _HEADER.pack(_MAGIC, self.boot, base, self.sequence, len(body), 0)[:-4]
        crc = crc32(body, crc32(header))
        self._map[self.end:end] = b"".join((header, crc.to_bytes(4, "little"), body))
        self.end, self.sequence = end, self.sequence + 1
        return True

    def restart(self) -> None:
        """LMDB committed the batch: the next record starts a new one. The
        first record's magic is overwritten, so that no open reads the
        committed batch's records again, even if LMDB went back to its base."""
        if self.end and self._map is not None:
            self._map[:len(_MAGIC)] = bytes(len(_MAGIC))
        self.end = self.sequence = 0
