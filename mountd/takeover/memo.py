"""What a new daemon needs of the connection it takes over, kept in a memfd.

The kernel holds nothing a new server could ask for: not the INIT request it
sent once, not which files the dead server had open. So the daemon keeps
both in a small memory file (``memfd``) that it hands to its keeper together
with the ``/dev/fuse`` descriptor. Memory, not the state directory, because
it describes this one connection: it must die with the connection, and a
fresh mount must never read a crashed mount's open files.

A record is JSON: the INIT request (hex), the takeovers so far, and the open
file handles. Past a page of JSON (a couple of hundred open handles) one
``pwrite`` is several page copies, and a daemon killed between two of them
leaves a record half new, half old. So the memfd holds two **slots**, and
each update goes to the slot that does not hold the latest record:

==========  ======  ====================================================
offset      size    field (integers little-endian)
==========  ======  ====================================================
0           8       magic ``SWFSMEMO``
8           8       sequence number, u64: one more than the record before
16          4       length of the JSON, u32
20          4       CRC-32 of bytes 8..20 and the JSON
24          length  the JSON
==========  ======  ====================================================

Slot 0 starts at offset 0, slot 1 at ``SLOT_SIZE`` (16 MiB; a memfd's holes
take no memory), and record *n* goes to slot *n* mod 2. :meth:`ConnectionMemo.load`
takes the whole slot with the highest sequence number: a slot torn by a
death mid-update fails its CRC, and the other slot holds the record before
it. A memfd with no slot at all holds the single record of a daemon from
before the slots (a u32 length, then the JSON, at offset 0), which is read
too, so that a new version can take over an older one's connection.
"""

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import trio

from mountd.operations import handle_ino
from mountd.takeover import fusedev

MAGIC = b"SWFSMEMO"
#: Where slot 1 starts; also the most a slot holds, header included.
SLOT_SIZE = 1 << 24
_HEADER = struct.Struct("<8sQII")
_LEGACY_LENGTH = struct.Struct("<I")
_MAX_RECORD = SLOT_SIZE - _HEADER.size


class MemoError(Exception):
    """A connection memo that cannot be read back."""


@dataclass
class ConnectionMemo:
    """One connection's memo: its INIT request and the files the kernel holds open."""

    fd: int
    init: bytes
    #: File handle -> open count (mountd/operations.py: a handle names its inode).
    open_files: dict[int, int] = field(default_factory=dict)
    takeovers: int = 0  # how many daemons took this connection over
    sequence: int = 0  # of the latest record written; the next goes to the other slot

    @classmethod
    def create(cls, init: bytes) -> "ConnectionMemo":
        # Its name in /proc/PID/fd predates the word memo; a connection
        # keeps its memo across daemons, so the name stays.
        memo = cls(os.memfd_create("swapfs-session", os.MFD_CLOEXEC), init)
        memo.save()
        return memo

    @classmethod
    def load(cls, fd: int) -> "ConnectionMemo":
        """Read the memo a previous daemon left in memfd *fd*: its latest
        whole record (MemoError if there is none)."""
        records: list[tuple[int, bytes | None]] = sorted(
            filter(None, (_read_slot(fd, slot) for slot in (0, 1))), reverse=True)
        if not _has_magic(fd, 0):
            records.append((0, None))  # a record from before the slots, or nothing
        errors = []
        for sequence, raw in records:
            try:
                return cls._parse(fd, _read_legacy(fd) if raw is None else raw, sequence)
            except MemoError as exc:
                errors.append(str(exc))
        raise MemoError("connection memo has no whole record"
                        + (f": {'; '.join(errors)}" if errors else " (both slots torn)"))

    @classmethod
    def _parse(cls, fd: int, raw: bytes, sequence: int) -> "ConnectionMemo":
        try:
            record: dict[str, Any] = json.loads(raw)
            init = bytes.fromhex(record["init"])
            memo = cls(fd, init,
                       {int(ino): int(count) for ino, count in record["open"].items()},
                       int(record["takeovers"]), sequence)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MemoError(f"connection memo is not readable: {exc}") from exc
        try:
            fusedev.check_init(init)
        except fusedev.FuseDeviceError as exc:
            raise MemoError(f"connection memo holds no usable INIT: {exc.strerror}") from exc
        return memo

    def save(self) -> None:
        """Write the memo as the next record, into the slot not holding the latest."""
        data = json.dumps({"init": self.init.hex(), "takeovers": self.takeovers,
                           "open": {str(fh): n for fh, n in self.open_files.items()}}).encode()
        if len(data) > _MAX_RECORD:
            raise MemoError(f"connection memo of {len(data)} bytes does not fit a slot")
        sequence = self.sequence + 1
        os.pwrite(self.fd, _slot_bytes(sequence, data), (sequence % 2) * SLOT_SIZE)
        self.sequence = sequence

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


def _slot_bytes(sequence: int, data: bytes) -> bytes:
    """A slot's header and record, in one piece (one pwrite)."""
    fields = struct.pack("<QI", sequence, len(data))
    return _HEADER.pack(MAGIC, sequence, len(data), zlib.crc32(data, zlib.crc32(fields))) + data


def _has_magic(fd: int, slot: int) -> bool:
    return os.pread(fd, len(MAGIC), slot * SLOT_SIZE) == MAGIC


def _read_slot(fd: int, slot: int) -> tuple[int, bytes] | None:
    """(sequence, JSON) of *slot* if it holds a whole record; None otherwise."""
    head = os.pread(fd, _HEADER.size, slot * SLOT_SIZE)
    if len(head) != _HEADER.size:
        return None
    magic, sequence, length, crc = _HEADER.unpack(head)
    if magic != MAGIC or length > _MAX_RECORD:
        return None
    data = os.pread(fd, length, slot * SLOT_SIZE + _HEADER.size)
    fields = struct.pack("<QI", sequence, length)
    if len(data) != length or zlib.crc32(data, zlib.crc32(fields)) != crc:
        return None
    return sequence, data


def _read_legacy(fd: int) -> bytes:
    """The JSON of a memo written before the slots: a u32 length, then the JSON."""
    head = os.pread(fd, _LEGACY_LENGTH.size, 0)
    if len(head) != _LEGACY_LENGTH.size:
        raise MemoError("connection memo is empty")
    (length,) = _LEGACY_LENGTH.unpack(head)
    if length > _MAX_RECORD:
        raise MemoError(f"connection memo claims {length} bytes")
    return os.pread(fd, length, _LEGACY_LENGTH.size)
