"""What a new daemon needs of the connection it takes over, kept in a memfd.

The kernel holds nothing a new server could ask for: not the INIT request it
sent once, not which files the dead server had open. So the daemon keeps
both in a small memory file (``memfd``) that it hands to its keeper together
with the ``/dev/fuse`` descriptor. Memory, not the state directory, because
it describes this one connection: it must die with the connection, and a
fresh mount must never read a crashed mount's open files.

Layout: a u32 length (little-endian), then that many bytes of JSON. Each
update is one ``pwrite`` of the whole record from offset 0, so a daemon
killed between two updates leaves the previous record or the new one,
never a mix of both.
"""

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from mountd import fusedev
from swapfs.fs import handle_ino

_LENGTH = struct.Struct("<I")
_MAX_RECORD = 1 << 24


class MemoError(Exception):
    """A connection memo that cannot be read back."""


@dataclass
class ConnectionMemo:
    """One connection's memo: its INIT request and the files the kernel holds open."""

    fd: int
    init: bytes
    #: File handle -> open count (swapfs/fs.py: a handle names its inode).
    open_files: dict[int, int] = field(default_factory=dict)
    takeovers: int = 0  # how many daemons took this connection over

    @classmethod
    def create(cls, init: bytes) -> "ConnectionMemo":
        session = cls(os.memfd_create("swapfs-session", os.MFD_CLOEXEC), init)
        session.save()
        return session

    @classmethod
    def load(cls, fd: int) -> "ConnectionMemo":
        """Read the memo a previous daemon left in memfd *fd*."""
        head = os.pread(fd, _LENGTH.size, 0)
        if len(head) != _LENGTH.size:
            raise MemoError("connection memo is empty")
        (length,) = _LENGTH.unpack(head)
        if length > _MAX_RECORD:
            raise MemoError(f"connection memo claims {length} bytes")
        raw = os.pread(fd, length, _LENGTH.size)
        try:
            record: dict[str, Any] = json.loads(raw)
            init = bytes.fromhex(record["init"])
            memo = cls(fd, init,
                       {int(ino): int(count) for ino, count in record["open"].items()},
                       int(record["takeovers"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MemoError(f"connection memo is not readable: {exc}") from exc
        try:
            fusedev.check_init(init)
        except fusedev.FuseDeviceError as exc:
            raise MemoError(f"connection memo holds no usable INIT: {exc.strerror}") from exc
        return memo

    def save(self) -> None:
        record = json.dumps({"init": self.init.hex(), "takeovers": self.takeovers,
                             "open": {str(fh): n for fh, n in self.open_files.items()}})
        data = record.encode()
        os.pwrite(self.fd, _LENGTH.pack(len(data)) + data, 0)

    def open_inos(self) -> set[int]:
        """The inodes the kernel holds open."""
        return {handle_ino(fh) for fh in self.open_files}

    def set_open(self, open_files: dict[int, int], after_reply: bool) -> None:
        """Record the open handles; called on each open and release.

        A takeover re-executes the requests the dead daemon had not answered,
        so an open or release caught by a death must be recorded on the side
        that is safe to repeat. Each open has a handle of its own, saved
        before the reply (a resent open counts twice: a count too high only
        keeps an unlinked file until the next fresh mount), and so is each
        release: a resent release finds its handle gone and changes nothing.
        An older daemon's handle names only its inode, shared by all its
        opens, so a resent release of it could not be told from another
        one's; its release (*after_reply*) is saved only once the reply has
        gone, from the trio loop's next turn, and a death before that leaves
        the higher count, never one too low that would purge a file while a
        descriptor still reads it.
        """
        self.open_files = dict(open_files)
        if after_reply:
            trio.lowlevel.current_trio_token().run_sync_soon(self.save)
        else:
            self.save()
