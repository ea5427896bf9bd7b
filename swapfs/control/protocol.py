"""The control protocol between the daemon and its clients.

A client connects to the daemon's Unix socket and sends one JSON object per
line; the daemon answers each with one JSON object per line:
``{"ok": true, ...}`` or ``{"ok": false, "errno": N, "error": "..."}``.
A malformed request gets an error reply and the connection is closed. A
blank line is no request and gets no reply: a driver on a stream that
outlives it (a virtio-serial port) writes one first, so that a line a
predecessor left half-written ends there instead of spoiling its own.

The mount names its socket in its source (``swapfs:/path/to/control.sock``,
the first column of /proc/mounts), so a client needs only a path on the
mount.
"""

import base64
import binascii
import contextlib
import errno
import json
import mmap
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from swapfs.control.records import MAX_SEALED, PUBLIC_KEY_SIZE

#: Longest request or reply line, in bytes.
MAX_LINE = 1 << 20
#: Most extents one driver message may report (the daemon refuses more).
MAX_EXTENTS = 8192
#: The longest extent: the unused part of one page.
PAGE_SIZE = mmap.PAGESIZE

#: How long a client tries again while the daemon answers EAGAIN (busy).
RETRY_SECONDS = 5.0

#: Prefix of a swapfs mount's source; the control socket's path follows it.
SOURCE_PREFIX = "swapfs:"


class ControlError(Exception):
    """The daemon refused a request, or could not be reached."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class ConnectionLost(ControlError):
    """The daemon could not be reached, or went away before it answered."""


_UCRED = struct.Struct("iII")


def unix_peer(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix
    socket, as the kernel recorded it (SO_PEERCRED): the daemon checks its
    clients with it, and a driver the clients of its agent socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid), int(uid), int(gid)


def mount_root(path: str) -> str:
    """The mount point of the file system that holds *path*."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


@dataclass(frozen=True)
class SwapfsMount:
    """A ``fuse.swapfs`` line of the mount table."""

    mountpoint: str
    socket: str  # the control socket its source names
    user_id: int | None  # who mounted it (FUSE's ``user_id=`` option); None if unsaid


def swapfs_mounts(table: str = "/proc/self/mountinfo") -> list[SwapfsMount]:
    """Every ``fuse.swapfs`` mount in this namespace, in the table's order,
    whoever made it: any user can make one with fusermount3 and name any
    socket in its source."""
    mounts = []
    with open(table) as lines:
        for line in lines:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            if tail[0] != "fuse.swapfs" or not tail[1].startswith(SOURCE_PREFIX):
                continue
            options = dict(option.partition("=")[::2] for option in tail[2].split(","))
            user_id = options.get("user_id", "")
            mounts.append(SwapfsMount(unescape(fields[4]),
                                      unescape(tail[1])[len(SOURCE_PREFIX):],
                                      int(user_id) if user_id.isdigit() else None))
    return mounts


def swapfs_sockets() -> dict[str, str]:
    """Mount point -> control socket of every swapfs mount root made in this
    namespace (of two mounts on one point, the upper one). A mount another
    user made is not swapfs's, whatever it calls itself: its socket is never
    trusted, nor even asked."""
    return {mount.mountpoint: mount.socket for mount in swapfs_mounts()
            if mount.user_id == 0}


def socket_of(path: str) -> str:
    """The control socket of the swapfs mount holding *path*."""
    root = mount_root(path)
    socket_path = swapfs_sockets().get(root)
    if socket_path is None:
        raise ControlError(errno.ENOTSUP, f"{root} is not a swapfs mount")
    return socket_path


def request(socket_path: str, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request and return the daemon's successful reply.

    A daemon too busy to take the connection (its listen backlog full, or
    as many connections open as it serves) answers EAGAIN: the request is
    tried again, backing off, for up to RETRY_SECONDS.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    pause = 0.01
    while True:
        try:
            return _request_once(socket_path, message, timeout)
        except ControlError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


class Stream(Protocol):
    """What a connection sends on: a connected stream socket, or a guest's
    virtio-serial port (:mod:`swapfs.guest.transport`)."""

    def sendall(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class Connection:
    """One control connection, kept open: requests and their replies, in turn
    (a driver's connection is its registration). ControlError for a refusal
    (with the daemon's errno) or a lost connection.

    Made with the daemon's Unix socket path, or :meth:`over` any other
    transport."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise ConnectionLost(exc.errno or errno.EIO,
                                 f"cannot connect to swapfs at {socket_path}: {exc}") from exc
        self._attach(sock, sock.makefile("rb"), socket_path)

    @classmethod
    def over(cls, stream: Stream, reader: BinaryIO, where: str) -> "Connection":
        """A connection that sends on *stream*, connected already, and reads
        its replies from *reader*; *where* names it in errors."""
        connection = cls.__new__(cls)
        connection._attach(stream, reader, where)
        return connection

    def _attach(self, stream: Stream, reader: BinaryIO, where: str) -> None:
        self.socket_path = where
        self.sock = stream
        self.reader = reader

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send *message*; the daemon's successful reply."""
        try:
            # A busy daemon answers EAGAIN and hangs up at once: read that.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.sock.sendall(json.dumps(message).encode() + b"\n")
            reply = self.reader.readline(MAX_LINE)
        except OSError as exc:
            raise ConnectionLost(exc.errno or errno.EIO,
                                 f"cannot talk to swapfs at {self.socket_path}: {exc}") from exc
        if not reply:
            raise ConnectionLost(errno.ECONNRESET, "the daemon closed the connection")
        answer = json.loads(reply)
        if not answer.get("ok"):
            raise ControlError(answer.get("errno", errno.EIO), answer.get("error", "failed"))
        return dict(answer)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _request_once(socket_path: str, message: dict[str, Any], timeout: float
                  ) -> dict[str, Any]:
    with Connection(socket_path, timeout) as connection:
        return connection.request(message)


# -- driver messages --------------------------------------------------------------------
#
# A driver (swapfs-driver run, swapfs/guest/driver.py) keeps one connection
# open and sends these; the daemon (mountd/drivers.py) checks each in full
# with check_message before the pool is touched.

@dataclass(frozen=True)
class Extent:
    """Unused bytes of a code page in one process."""

    pid: int
    path: str
    device: str
    inode: int
    address: int  # virtual address of the unused bytes in that process
    length: int
    segment: int  # index of the program header in the file
    part: str  # "head" or "tail"

    @property
    def physical_key(self) -> tuple[str, int, int, str]:
        """The same bytes of the same file, whichever process maps them."""
        return (self.device, self.inode, self.segment, self.part)


#: A driver's or a record's name: short, printable, safe in logs.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


def check_name(value: Any, what: str) -> str:
    """*value* if it is a valid name; DriverError (EINVAL) otherwise."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise _invalid(f"{what!r} must be 1..64 letters, digits or ._:@- "
                       "(starting with a letter or digit)")
    return value
_MAX_PATH = 4096
_MAX_DEVICE = 32
#: Process ids are 1..PID_MAX_LIMIT-1 (the kernel's PID_MAX_LIMIT is 1 << 22).
_MAX_PID = (1 << 22) - 1
_MAX_U64 = (1 << 64) - 1
_EXTENT_KEYS = frozenset(("pid", "path", "device", "inode", "address", "length",
                          "segment", "part"))
_MESSAGE_KEYS = {
    "driver.register": frozenset(("op", "driver", "extents")),
    "driver.update": frozenset(("op", "driver", "token", "extents")),
    "driver.heartbeat": frozenset(("op", "driver", "token")),
    # The driver stops: its share leaves the pool before it lets its pages go.
    "driver.stop": frozenset(("op", "driver", "token")),
    # Sealed records (swapfs/control/records.py): "sealed" is base64.
    "driver.secret.put": frozenset(("op", "driver", "token", "name", "sealed")),
    "driver.secret.get": frozenset(("op", "driver", "token", "name")),
    "driver.secret.rm": frozenset(("op", "driver", "token", "name")),
}
#: Keys an op may leave out: a driver that keeps no records agrees no key.
_OPTIONAL_KEYS = {"driver.register": frozenset(("public_key",))}
DRIVER_OPS = frozenset(_MESSAGE_KEYS)


@dataclass(frozen=True)
class DriverMessage:
    """A driver message, checked: what each op carries, None where it carries
    nothing of that."""

    op: str
    driver: str
    extents: list[Extent] | None = None
    public_key: bytes | None = None  # driver.register
    record: str | None = None  # driver.secret.*
    sealed: bytes | None = None  # driver.secret.put


class DriverError(Exception):
    """A driver message refused; the connection is closed after the reply."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def _invalid(message: str) -> DriverError:
    return DriverError(errno.EINVAL, message)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(f"{what} must be an integer within {low}..{high}")
    return value


def _str(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= longest:
        raise _invalid(f"{what} must be a string of 1..{longest} characters")
    return value


def parse_extent(value: Any, index: int) -> Extent:
    """One reported extent, checked key by key."""
    what = f"extents[{index}]"
    if not isinstance(value, dict) or set(value) != _EXTENT_KEYS:
        raise _invalid(f"{what} must be an object with exactly the keys "
                       f"{', '.join(sorted(_EXTENT_KEYS))}")
    part = value["part"]
    if part not in ("head", "tail"):
        raise _invalid(f"{what}.part must be \"head\" or \"tail\"")
    extent = Extent(
        pid=_int(value["pid"], f"{what}.pid", 1, _MAX_PID),
        path=_str(value["path"], f"{what}.path", _MAX_PATH),
        device=_str(value["device"], f"{what}.device", _MAX_DEVICE),
        inode=_int(value["inode"], f"{what}.inode", 0, _MAX_U64),
        address=_int(value["address"], f"{what}.address", 0, _MAX_U64),
        length=_int(value["length"], f"{what}.length", 1, PAGE_SIZE),
        segment=_int(value["segment"], f"{what}.segment", 0, 0xFFFF),
        part=part,
    )
    # The unused part of one page (a head starts a page, a tail ends one),
    # so it never runs past its page, nor past the end of the address space.
    if extent.address % PAGE_SIZE + extent.length > PAGE_SIZE:
        raise _invalid(f"{what} runs past the end of its page")
    return extent


def parse_extents(value: Any) -> list[Extent]:
    if not isinstance(value, list) or len(value) > MAX_EXTENTS:
        raise _invalid(f"'extents' must be a list of at most {MAX_EXTENTS} extents")
    extents = [parse_extent(item, index) for index, item in enumerate(value)]
    lengths: dict[tuple[str, int, int, str], int] = {}
    for extent in extents:
        if lengths.setdefault(extent.physical_key, extent.length) != extent.length:
            raise _invalid(f"extents of {extent.device} inode {extent.inode} segment "
                           f"{extent.segment} {extent.part} disagree on their length")
    return extents


def check_message(message: dict[str, Any]) -> DriverMessage:
    """A driver message checked in full, or DriverError."""
    op = message.get("op")
    if op not in _MESSAGE_KEYS:
        raise _invalid(f"unknown driver op {op!r}"[:200])
    required, optional = _MESSAGE_KEYS[op], _OPTIONAL_KEYS.get(op, frozenset())
    if not required <= set(message) <= required | optional:
        raise _invalid(f"{op} takes exactly the keys {', '.join(sorted(required))}"
                       + (f" (and optionally {', '.join(sorted(optional))})" if optional
                          else ""))
    name = check_name(message["driver"], "driver")
    if "token" in message and not isinstance(message["token"], str):
        raise DriverError(errno.EACCES, "'token' must be the string register gave")
    extents = parse_extents(message["extents"]) if "extents" in message else None
    public_key = record = sealed = None
    if "public_key" in message:
        public_key = decode_bytes(message["public_key"], "public_key", PUBLIC_KEY_SIZE)
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise _invalid(f"'public_key' must be {PUBLIC_KEY_SIZE} bytes, base64")
    if "name" in message:
        record = check_name(message["name"], "name")
    if "sealed" in message:
        sealed = decode_bytes(message["sealed"], "sealed", MAX_SEALED)
    return DriverMessage(op, name, extents, public_key, record, sealed)


def encode_bytes(data: bytes) -> str:
    """Bytes as a JSON string: base64."""
    return base64.b64encode(data).decode("ascii")


def decode_bytes(value: Any, what: str, longest: int) -> bytes:
    """The bytes a base64 JSON string holds, at most *longest*; DriverError
    (EINVAL) otherwise."""
    if not isinstance(value, str) or len(value) > 4 * (-(-longest // 3)):
        raise _invalid(f"{what!r} must be base64 of at most {longest} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{what!r} is not base64") from None
    if len(data) > longest:
        raise _invalid(f"{what!r} must be base64 of at most {longest} bytes")
    return data
