"""The FUSE front: pyfuse3 Operations that translate requests to the Volume.

Every handler calls the Volume synchronously, without an await in between,
so on trio's single thread each request is a critical section and the
engine needs no locks. The only error this layer raises is
``pyfuse3.FUSEError``: a :class:`SwapfsError` becomes its errno.

Lifetime of an unlinked file: only an open file (a file descriptor, a
mapping, a loop device) can still reach the data of a file that has lost
its name. A file unlinked while open (an open swap file, typically) becomes
an orphan and is purged on its last release, or at the next mount after a
crash; one that is not open is purged at once, even though the kernel may
still hold a lookup count on it (its ``forget`` can come much later). Lookup
counts are therefore not kept: inode numbers are never reused, so a late
reference to a purged file meets ENOENT, never another file.
"""

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyfuse3

from swapfs.engine import BLOCK_SIZE, Inode, SwapfsError, Volume

log = logging.getLogger(__name__)

#: Seconds the kernel may cache names and attributes. Short, because a clone
#: made through the control socket changes a directory behind its back.
CACHE_TIMEOUT = 1.0


#: A file handle is the inode number in its low HANDLE_INO_BITS and a
#: serial number above them, so that each open has a handle of its own and
#: a release the kernel resends after a takeover is recognised as done
#: (memo.py). A handle with serial 0 (the inode number alone) is an older
#: daemon's, inherited from its memo.
HANDLE_INO_BITS = 40
_INO_MASK = (1 << HANDLE_INO_BITS) - 1


def handle_ino(fh: int) -> int:
    """The inode a file handle opened."""
    return fh & _INO_MASK


def _file_info(fh: int, flags: int) -> pyfuse3.FileInfo:
    """The reply to an open: FOPEN_DIRECT_IO for an O_DIRECT open, else cached.

    A loop device with direct I/O (``swapfs swapon``) opens its file with
    O_DIRECT. Without FOPEN_DIRECT_IO the kernel's reads take the cached
    read path, which (libfuse asks for auto_inval_data) sends a GETATTR
    first once the attributes are older than CACHE_TIMEOUT, and drops the
    answer if any asynchronous request completed while it was on its way:
    under load nearly every read came with a GETATTR (docs/performance.md).
    Opens without O_DIRECT keep the page cache and shared mappings, which
    the kernel refuses on a FOPEN_DIRECT_IO file unless libfuse negotiates
    FUSE_DIRECT_IO_ALLOW_MMAP (3.16 and later).
    """
    return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))


def _fuse_error(exc: Exception) -> pyfuse3.FUSEError:
    """The FUSEError to answer for an exception a handler caught."""
    if isinstance(exc, SwapfsError):
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, OSError):
        log.exception("backing store failed")
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    # pyfuse3 ends its main loop on any other exception, which would unmount
    # the file system under the swap areas on it: a bug must cost one
    # request, not every process whose pages live here.
    log.exception("internal error")
    return pyfuse3.FUSEError(errno.EIO)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except Exception as exc:
        raise _fuse_error(exc) from exc


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers for one mounted Volume."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, volume: Volume, open_files: dict[int, int] | None = None,
                 on_open_change: Callable[[dict[int, int], bool], None] | None = None
                 ) -> None:
        """*open_files* (file handle -> open count) is what a daemon that
        took over the connection inherits from the dead one;
        *on_open_change* is told each change (the handles, and whether the
        change may be saved only after its reply: memo.py), so that the next
        one can inherit it in turn."""
        super().__init__()
        self.volume = volume
        self._handles: dict[int, int] = dict(open_files or {})
        self._serial = 0
        self._on_open_change = on_open_change
        #: Requests answered since this daemon started, by operation (``stats``):
        #: what the kernel asks for, which is not always what the caller did.
        self.requests: Counter[str] = Counter()
        #: Write requests by size in 4 KiB blocks (``stats``): how much of a
        #: request's fixed cost each block carries (docs/performance.md).
        self.write_blocks: Counter[int] = Counter()

    # -- helpers ----------------------------------------------------------------

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode.ino
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT
        attrs.attr_timeout = CACHE_TIMEOUT
        attrs.st_mode = inode.mode
        attrs.st_nlink = self.volume.nlink(inode)
        attrs.st_uid = inode.uid
        attrs.st_gid = inode.gid
        attrs.st_rdev = 0
        attrs.st_size = inode.size
        attrs.st_blksize = 4096
        attrs.st_blocks = inode.blocks * 8
        attrs.st_atime_ns = inode.atime_ns
        attrs.st_mtime_ns = inode.mtime_ns
        attrs.st_ctime_ns = inode.ctime_ns
        return attrs

    def open_files(self) -> int:
        """How many files the kernel holds open (a loop device holds its file)."""
        return len({handle_ino(fh) for fh in self._handles})

    def _opens(self, ino: int) -> int:
        """How many opens of *ino* the kernel holds (a few handles at most:
        the loop devices' and a few tools'; no request of the data path asks)."""
        return sum(count for fh, count in self._handles.items() if handle_ino(fh) == ino)

    def _is_open(self, ino: int) -> bool:
        """Is *ino* open, so that its data must outlive its name?"""
        return self._opens(ino) > 0

    def _opened(self, ino: int) -> int:
        """A new handle for an open of *ino*, recorded before the reply."""
        if ino > _INO_MASK:  # a trillion files made: no room left in a handle
            raise pyfuse3.FUSEError(errno.EOVERFLOW)
        while True:
            self._serial = self._serial % ((1 << (64 - HANDLE_INO_BITS)) - 1) + 1
            fh = self._serial << HANDLE_INO_BITS | ino
            if fh not in self._handles:
                break
        self._handles[fh] = 1
        if self._on_open_change is not None:
            self._on_open_change(self._handles, False)
        return fh

    def _released(self, fh: int) -> int:
        """Drop handle *fh*; return how many opens of its inode are left. A
        handle not held is a release already done (resent after a takeover)."""
        ino = handle_ino(fh)
        count = self._handles.pop(fh, 0)
        if count > 1:
            self._handles[fh] = count - 1
        if count and self._on_open_change is not None:
            # An older daemon's handle names its inode only: a resent
            # release of it cannot be told from another open's, so it
            # is saved only once its reply is gone.
            self._on_open_change(self._handles, fh == ino)
        return self._opens(ino)

    # -- names ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        with _errors():
            return self._attrs(self.volume.lookup(parent_inode, name))

    def _purge(self, ino: int) -> None:
        try:
            self.volume.purge(ino)
        except SwapfsError:
            log.exception("cannot purge unlinked file %d", ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        with _errors():
            return self._attrs(self.volume.getattr(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["setattr"] += 1
        changes: dict[str, Any] = {}
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        with _errors():
            return self._attrs(self.volume.setattr(inode, **changes))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mkdir"] += 1
        with _errors():
            return self._attrs(self.volume.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rmdir"] += 1
        with _errors():
            self.volume.rmdir(parent_inode, name)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.requests["create"] += 1
        with _errors():
            inode = self.volume.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        return _file_info(self._opened(inode.ino), flags), self._attrs(inode)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["mknod"] += 1
        with _errors():
            return self._attrs(self.volume.create(parent_inode, name, mode, ctx.uid, ctx.gid))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["symlink"] += 1
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.requests["link"] += 1
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.requests["unlink"] += 1
        with _errors():
            child = self.volume.lookup(parent_inode, name)
            self.volume.unlink(parent_inode, name, still_open=self._is_open(child.ino))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.requests["rename"] += 1
        with _errors():
            try:
                target = self.volume.lookup(parent_inode_new, name_new).ino
            except SwapfsError:
                target = 0
            self.volume.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                               flags, target_open=self._is_open(target))

    # -- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.requests["opendir"] += 1
        with _errors():
            if not self.volume.getattr(inode).is_dir:
                raise SwapfsError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.requests["readdir"] += 1
        with _errors():
            entries = self.volume.readdir(fh, after_ino=start_id)
        for name, inode in entries:
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), inode.ino):
                return

    async def releasedir(self, fh: int) -> None:
        self.requests["releasedir"] += 1

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.requests["statfs"] += 1
        backing = self.volume.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = backing.f_bsize
        data.f_frsize = backing.f_frsize
        data.f_blocks = backing.f_blocks
        data.f_bfree = backing.f_bfree
        data.f_bavail = backing.f_bavail
        data.f_files = backing.f_files
        data.f_ffree = backing.f_ffree
        data.f_favail = backing.f_favail
        data.f_namemax = 255
        return data

    # -- files ------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        with _errors():
            if self.volume.getattr(inode).is_dir:
                raise SwapfsError(errno.EISDIR)
        return _file_info(self._opened(inode), flags)

    # read and write run for every page the kernel swaps: a plain try costs
    # nothing until it catches, unlike entering a context manager.

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        try:
            return self.volume.read(fh & _INO_MASK, off, size)
        except Exception as exc:
            raise _fuse_error(exc) from exc

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.requests["write"] += 1
        self.write_blocks[-(-len(buf) // BLOCK_SIZE)] += 1
        try:
            return self.volume.write(fh & _INO_MASK, off, buf)
        except Exception as exc:
            raise _fuse_error(exc) from exc

    async def fallocate(self, inode: int, mode: int, offset: int, length: int,
                        fh: int) -> None:
        """Discards from a loop device arrive here as PUNCH_HOLE | KEEP_SIZE.

        Needs pyfuse3 with the fallocate operation (docs/pyfuse3-patch.md);
        without it the kernel answers EOPNOTSUPP and never asks.
        """
        self.requests["fallocate"] += 1
        with _errors():
            self.volume.fallocate(inode, mode, offset, length)

    async def flush(self, fh: int) -> None:
        self.requests["flush"] += 1

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests["fsync"] += 1
        with _errors():
            self.volume.sync()

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        ino = handle_ino(fh)
        if self._released(fh) > 0:
            return
        if self.volume.is_orphan(ino):
            self._purge(ino)
