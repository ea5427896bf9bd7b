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

The mark keeps both meta pages whole (what LMDB reads of them, 152 bytes
each) and a CRC-32 of itself, so that a flip in the meta pages of an index
at rest is not only found but undone: ``swapfs fsck --repair`` writes them
back as the mark has them (:func:`restore`), and the state is as it was
closed. A mark that does not verify itself is removed by the same repair
(the meta pages then go unchecked, as after a crash). A mark of the first
format (``SWCM``: a CRC of both pages, nothing to restore from) is still
checked.

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
META_BYTES = 152
#: magic, page size, both meta pages, then a CRC-32 of all that.
_MARK = struct.Struct(f"<4sI{2 * META_BYTES}sI")
_MAGIC = b"SWM2"
#: The first format: magic, page size, CRC-32 of both meta pages.
_FIRST = struct.Struct("<4sII")
_FIRST_MAGIC = b"SWCM"


def meta_pages(data: Path, page_size: int) -> bytes:
    """What LMDB reads of the two meta pages of *data*, one after the other."""
    with open(data, "rb") as index:
        first = index.read(META_BYTES)
        index.seek(page_size)
        return first + index.read(META_BYTES)


def _read(mark: Path) -> tuple[int, bytes | None, int | None] | None:
    """The mark's page size and saved meta pages (or, in the first format,
    their CRC); None if it is no mark that verifies."""
    raw = mark.read_bytes()
    if len(raw) == _MARK.size:
        magic, page_size, metas, crc = _MARK.unpack(raw)
        if magic == _MAGIC and zlib.crc32(raw[:-4]) == crc:
            return page_size, metas, None
    elif len(raw) == _FIRST.size:
        magic, page_size, crc = _FIRST.unpack(raw)
        if magic == _FIRST_MAGIC:
            return page_size, None, crc
    return None


def check_and_clear(directory: Path) -> bool:
    """Before LMDB opens the index in *directory*: the meta pages are as the
    clean mark says (CorruptIndex if not); then remove the mark. False if
    there was none: the index was not closed cleanly."""
    mark = directory / MARK_NAME
    try:
        found = _read(mark)
    except FileNotFoundError:
        return False
    if found is None:
        raise CorruptIndex(f"{mark} is damaged, no clean mark: swapfs fsck --repair "
                           "removes it")
    page_size, metas, crc = found
    now = meta_pages(directory / "data.mdb", page_size)
    if now != metas and zlib.crc32(now) != crc:
        raise CorruptIndex(f"the meta pages of {directory / 'data.mdb'} changed since the "
                           f"index was closed (a flipped bit?); {mark} says how they were"
                           + (": swapfs fsck --repair writes them back" if metas else ""))
    mark.unlink()
    sync_directory(directory)
    return True


def restore(directory: Path) -> str | None:
    """For ``fsck --repair``, before the index is opened: write back the meta
    pages of *directory*'s index as its clean mark has them, or remove a mark
    that does not verify itself. What was done, None if nothing needed it
    (or could be done: a mark of the first format keeps no pages)."""
    mark = directory / MARK_NAME
    try:
        found = _read(mark)
    except FileNotFoundError:
        return None
    if found is None:
        mark.unlink()
        sync_directory(directory)
        return f"{mark} was damaged: removed (the meta pages go unchecked this once)"
    page_size, metas, _crc = found
    data = directory / "data.mdb"
    if metas is None or meta_pages(data, page_size) == metas:
        return None
    write_meta_pages(data, page_size, metas)
    return f"the meta pages of {data} differed from the clean mark: written back as closed"


def write_meta_pages(data: Path, page_size: int, metas: bytes) -> None:
    """Write both meta pages of the index file *data* as *metas* has them
    (what :func:`meta_pages` read), and flush them, before LMDB opens it."""
    fd = os.open(data, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for page, saved in enumerate((metas[:META_BYTES], metas[META_BYTES:])):
            if os.pwrite(fd, saved, page * page_size) != META_BYTES:
                raise OSError(errno.EIO, f"short write to {data}")
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_clean(directory: Path, page_size: int) -> None:
    """After the index was closed, its data flushed: write the clean mark.

    A mark that cannot be written (a full disk) is only a check the next
    open cannot make, as after a crash: logged, not raised.
    """
    temporary = directory / (MARK_NAME + ".tmp")
    try:
        body = _MARK.pack(_MAGIC, page_size, meta_pages(directory / "data.mdb", page_size), 0)
        raw = body[:-4] + zlib.crc32(body[:-4]).to_bytes(4, "little")
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


