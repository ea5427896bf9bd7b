"""The clean mark: what LMDB's meta pages held when the index was last closed.

LMDB keeps two meta pages and opens the tree of the one with the higher
transaction id; neither carries a checksum. One flipped bit there (a
transaction id, a root page number) can make LMDB open an older tree,
self-consistent and every record verifying, whose maps name blocks the
files no longer hold: the one damage that the records' checksums cannot
see. So when an index is closed, the CRC-32 of both meta pages' contents
is written next to it (``index.lmdb/clean``); when it is opened, they must
match, or the index is refused (CorruptIndex: EIO, and fsck reports it).
The mark is removed at open, before anything commits, so that an index a
crash left behind (whose meta pages changed since the last close) is
opened without it: the check covers an index at rest, not one that was
being written when its process died.

Delete the mark by hand to open an index whose meta pages were changed on
purpose (``mdb_copy``, or a restore of ``data.mdb`` alone).
"""

import errno
import logging
import os
import struct
import zlib
from pathlib import Path

from swapfs.engine.errors import CorruptIndex
from swapfs.engine.statedir import sync_directory

log = logging.getLogger(__name__)

MARK_NAME = "clean"
#: The page header (16 bytes) and LMDB's MDB_meta (136): everything of a
#: meta page that LMDB reads; the rest of the page is zeros it ignores.
_META_BYTES = 152
_MARK = struct.Struct("<4sII")  # magic, page size, CRC-32 of both meta pages
_MAGIC = b"SWCM"


def _metas_crc(data: Path, page_size: int) -> int:
    with open(data, "rb") as index:
        first = index.read(_META_BYTES)
        index.seek(page_size)
        second = index.read(_META_BYTES)
    return zlib.crc32(second, zlib.crc32(first))


def check_and_clear(directory: Path) -> None:
    """Before LMDB opens the index in *directory*: the meta pages are as the
    clean mark says (CorruptIndex if not); then remove the mark."""
    mark = directory / MARK_NAME
    try:
        raw = mark.read_bytes()
    except FileNotFoundError:
        return
    if len(raw) != _MARK.size:
        raise CorruptIndex(f"{mark} is not a clean mark; delete it to open the index")
    magic, page_size, crc = _MARK.unpack(raw)
    if magic != _MAGIC or _metas_crc(directory / "data.mdb", page_size) != crc:
        raise CorruptIndex(f"the meta pages of {directory / 'data.mdb'} changed since the "
                           f"index was closed (a flipped bit?); {mark} says how they were")
    mark.unlink()
    sync_directory(directory)


def mark_clean(directory: Path, page_size: int) -> None:
    """After the index was closed, its data flushed: write the clean mark.

    A mark that cannot be written (a full disk) is only a check the next
    open cannot make, as after a crash: logged, not raised.
    """
    temporary = directory / (MARK_NAME + ".tmp")
    try:
        raw = _MARK.pack(_MAGIC, page_size, _metas_crc(directory / "data.mdb", page_size))
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, raw) != len(raw):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, directory / MARK_NAME)
        sync_directory(directory)
    except OSError as exc:
        log.warning("cannot mark the index in %s clean (%s): its next open will not "
                    "check its meta pages", directory, exc)
        temporary.unlink(missing_ok=True)


