"""The control protocol between the daemon and its clients.

A client connects to the daemon's Unix socket and sends one JSON object per
line; the daemon answers each with one JSON object per line:
``{"ok": true, ...}`` or ``{"ok": false, "errno": N, "error": "..."}``.
A malformed request gets an error reply and the connection is closed.

The mount's root directory names the socket in the extended attribute
``user.swapfs.control``, so a client needs only a path on the mount.
"""

import errno
import json
import os
import socket
from typing import Any

#: Longest request or reply line, in bytes.
MAX_LINE = 1 << 20

CONTROL_XATTR = "user.swapfs.control"


class ControlError(Exception):
    """The daemon refused a request, or could not be reached."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def mount_root(path: str) -> str:
    """The mount point of the file system that holds *path*."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def socket_of(path: str) -> str:
    """The control socket of the swapfs mount holding *path*."""
    root = mount_root(path)
    try:
        return os.fsdecode(os.getxattr(root, CONTROL_XATTR))
    except OSError as exc:
        raise ControlError(errno.ENOTSUP, f"{root} is not a swapfs mount") from exc


def request(socket_path: str, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request and return the daemon's successful reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = sock.makefile("rb").readline(MAX_LINE)
        except OSError as exc:
            raise ControlError(exc.errno or errno.EIO,
                               f"cannot talk to swapfs at {socket_path}: {exc}") from exc
    if not reply:
        raise ControlError(errno.ECONNRESET, "the daemon closed the connection")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise ControlError(answer.get("errno", errno.EIO), answer.get("error", "failed"))
    return dict(answer)
