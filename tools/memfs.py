#!/usr/bin/env python3
"""The Python FUSE ceiling: the thinnest pyfuse3 file system there is.

One file, ``disk``, held in a bytearray: no hashing, no index, no copies
beyond the ones pyfuse3 itself makes. Whatever speed a loop device over
this file reaches is what any Python FUSE file system can reach on this
machine; the benchmark reports swapfs as a ratio of it.

    python tools/memfs.py MOUNTPOINT --size-mib 512
"""

import argparse
import errno
import os
import signal
import stat

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class MemFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = bytearray(size)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        if ino == FILE_INO:
            attrs.st_mode = stat.S_IFREG | 0o600
            attrs.st_size = len(self.data)
        else:
            attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 1
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INO)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(FILE_INO), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        end = min(off + len(buf), len(self.data))
        self.data[off:end] = buf[:end - off]
        return end - off

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--ready-fd", type=int, default=-1)
    args = parser.parse_args()
    pyfuse3.init(MemFS(args.size_mib << 20), args.mountpoint,
                 {"fsname=memfs", "subtype=memfs"})
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
