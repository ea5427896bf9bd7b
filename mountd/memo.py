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

_LENGTH = struct.Struct("<I")
_MAX_RECORD = 1 << 24


class MemoError(Exception):
    """A connection memo that cannot be read back."""


@dataclass
class ConnectionMemo:
    """One connection's memo: its INIT request and the files the kernel holds open."""

    fd: int
    init: bytes
    open_files: dict[int, int] = field(default_factory=dict)  # ino -> open count
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
                             "open": {str(ino): n for ino, n in self.open_files.items()}})
        data = record.encode()
        os.pwrite(self.fd, _LENGTH.pack(len(data)) + data, 0)

    def set_open(self, open_files: dict[int, int], released: bool) -> None:
        """Record the open count of every file; called on each open and release.

        A takeover re-executes the requests the dead daemon had not answered,
        so an open or release caught by a death must be recorded on the side
        that is safe to repeat: a count too high only keeps an unlinked file
        until the next fresh mount, a count too low would purge it while a
        descriptor still reads it. So an open is saved before its reply (a
        resent open counts twice), and a release only after its reply has
        gone: saved from the trio loop's next turn, it is never undone by a
        resend, and a death before it leaves the higher count.
        """
        self.open_files = dict(open_files)
        if released:
            trio.lowlevel.current_trio_token().run_sync_soon(self.save)
        else:
            self.save()
