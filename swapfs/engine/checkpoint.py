"""Checkpoints: the last state of the index known to be on disk, whole.

The index runs without LMDB's syncs (``writemap``, ``sync=False``): a
commit reaches the page cache, which a killed daemon does not lose, and
the kernel writes the pages back in any order. After a power cut the disk
may hold meta pages of a transaction whose other pages never got there,
or pages of an older tree overwritten by a later transaction: LMDB's own
documentation says such a database may be corrupted by a system crash.

So the index keeps a checkpoint: at every sync (``fsync`` of a swap
file, the daemon's once a second, a close) the data files are flushed,
then every page of the index, and then the two meta pages as they are
now are written here (``index.lmdb/checkpoint``). Until the next
checkpoint the process holds a read transaction on that tree
(:meth:`swapfs.engine.index.Index.checkpoint`), so LMDB reuses none of its
pages: the tree the checkpoint names stays whole on disk, whatever the
kernel writes back meanwhile. The data files keep their side of it
(``swapfs/engine/reclaim.py``): a slot freed after the checkpoint is
neither reused nor punched before the next one, so every block the
checkpoint's tree names still holds its data.

Each record also names the boot (``/proc/sys/kernel/random/boot_id``) of
the process that last had the index open. An index opened in another
boot than that one, and not closed cleanly (no clean mark,
``swapfs/engine/cleanmark.py``), lost the page cache of its last use: its
meta pages are written back as the checkpoint has them before LMDB reads
them, and the index is as at the checkpoint, rolled back to it, whole.
An index opened in the same boot (a daemon killed, a takeover) is not:
the page cache holds every commit, and acknowledged writes survive.

The file holds two records, written in turn, each with a sequence number
and a CRC-32: a record torn by the power cut itself leaves the other.
"""

import errno
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from swapfs.engine.cleanmark import META_BYTES, meta_pages, write_meta_pages

log = logging.getLogger(__name__)

NAME = "checkpoint"
#: magic, sequence number, boot id, page size, both meta pages; a CRC-32.
_RECORD = struct.Struct(f"<4sQ16sI{2 * META_BYTES}sI")
_MAGIC = b"SWCK"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _txnid(metas: bytes) -> int:
    """The newer transaction id of two meta pages (MDB_meta's mm_txnid, the
    last 8 bytes of what LMDB reads of a meta page)."""
    return max(int.from_bytes(metas[at - 8:at], "little")
               for at in (META_BYTES, 2 * META_BYTES))


def boot_id() -> bytes:
    """This boot's id: 16 bytes, different at every boot."""
    return bytes.fromhex(_BOOT_ID.read_text().strip().replace("-", ""))


@dataclass(frozen=True)
class Record:
    sequence: int
    boot: bytes
    page_size: int
    metas: bytes


def read(directory: Path) -> Record | None:
    """The latest record of *directory*'s checkpoint file that verifies."""
    try:
        raw = (directory / NAME).read_bytes()
    except FileNotFoundError:
        return None
    best = None
    for offset in (0, _RECORD.size):
        chunk = raw[offset:offset + _RECORD.size]
        if len(chunk) != _RECORD.size:
            continue
        magic, sequence, boot, page_size, metas, crc = _RECORD.unpack(chunk)
        if magic != _MAGIC or zlib.crc32(chunk[:-4]) != crc:
            continue
        if best is None or sequence > best.sequence:
            best = Record(sequence, boot, page_size, metas)
    return best


def write(directory: Path, record: Record) -> None:
    """Write *record* over the older of the file's two records, and flush it."""
    body = _RECORD.pack(_MAGIC, record.sequence, record.boot, record.page_size,
                        record.metas, 0)[:-4]
    raw = body + zlib.crc32(body).to_bytes(4, "little")
    path = directory / NAME
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.pwrite(fd, raw, (record.sequence % 2) * _RECORD.size) != len(raw):
            raise OSError(errno.ENOSPC, f"short write to {path}")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if created:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def taken(directory: Path, page_size: int, previous: Record | None) -> Record:
    """Record the index's meta pages as they are now (the caller flushed every
    page of the index first) as the checkpoint, for this boot."""
    record = Record(0 if previous is None else previous.sequence + 1, boot_id(), page_size,
                    meta_pages(directory / "data.mdb", page_size))
    write(directory, record)
    return record


def at_open(directory: Path, clean: bool, roll_back: bool) -> tuple[Record | None, str | None]:
    """Before LMDB opens the index in *directory*: the checkpoint in force,
    and what was done, if anything.

    An index not closed *clean* whose last opener ran in another boot is
    rolled back to its checkpoint when *roll_back* allows (a read-only check
    leaves it as it is). Either way the record then names this boot, so
    that a process killed later in it is not taken for a power cut."""
    record = read(directory)
    if record is None or record.boot == boot_id():
        return record, None
    done = None
    data = directory / "data.mdb"
    now = meta_pages(data, record.page_size)
    if not clean and roll_back and now != record.metas:
        if _txnid(now) < _txnid(record.metas):
            # Not the index the checkpoint was taken of: an older copy put
            # back (mdb_copy, a restore). Its own tree is all it has.
            log.warning("the index in %s is older than its checkpoint %d (restored from "
                        "a copy?): opened as it is", directory, record.sequence)
            record = Record(record.sequence, record.boot, record.page_size, now)
        else:
            write_meta_pages(data, record.page_size, record.metas)
            done = (f"the index in {directory} was in use when its machine stopped: "
                    f"rolled back to its checkpoint {record.sequence}")
            log.warning("%s", done)
    if not roll_back:
        return record, None
    metas = record.metas if done or not clean else meta_pages(data, record.page_size)
    record = Record(record.sequence + 1, boot_id(), record.page_size, metas)
    write(directory, record)
    return record, done
