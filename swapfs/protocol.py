"""The control protocol between the daemon and its clients.

A client connects to the daemon's Unix socket and sends one JSON object per
line; the daemon answers each with one JSON object per line:
``{"ok": true, ...}`` or ``{"ok": false, "errno": N, "error": "..."}``.
A malformed request gets an error reply and the connection is closed.

The mount names its socket in its source (``swapfs:/path/to/control.sock``,
the first column of /proc/mounts), so a client needs only a path on the
mount.
"""

import contextlib
import errno
import json
import os
import re
import socket
import time
from typing import Any

#: Longest request or reply line, in bytes.
MAX_LINE = 1 << 20
#: Most extents one driver message may report (the daemon refuses more).
MAX_EXTENTS = 8192

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


def mount_root(path: str) -> str:
    """The mount point of the file system that holds *path*."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def swapfs_sockets() -> dict[str, str]:
    """Mount point -> control socket of every swapfs mount in this namespace
    (of two mounts on one point, the upper one)."""
    sockets = {}
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            if tail[0] == "fuse.swapfs" and tail[1].startswith(SOURCE_PREFIX):
                sockets[unescape(fields[4])] = unescape(tail[1])[len(SOURCE_PREFIX):]
    return sockets


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


class Connection:
    """One control connection, kept open: requests and their replies, in turn
    (a driver's connection is its registration). ControlError for a refusal
    (with the daemon's errno) or a lost connection."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as exc:
            self.sock.close()
            raise ConnectionLost(exc.errno or errno.EIO,
                                 f"cannot connect to swapfs at {socket_path}: {exc}") from exc
        self.reader = self.sock.makefile("rb")

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
