"""Who is at the other end of a control connection, and what it may ask.

On the host's Unix socket the kernel says who connected (``SO_PEERCRED``):
only root is served (the socket is 0600 besides; the check holds even if
its mode is loosened by hand). A guest's driver reaches the daemon over
vsock, where the peer is a context id (CID): only the CIDs the
configuration lists (``vsock_cids``) are admitted, and only for driver
messages, never for the commands that change or reveal the host's state.
Each refusal is EACCES, and the log names the peer.
"""

import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

_UCRED = struct.Struct("iII")  # pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """A Unix peer (pid and uid) or a vsock peer (cid)."""

    pid: int | None = None
    uid: int | None = None
    cid: int | None = None

    def __str__(self) -> str:
        if self.cid is not None:
            return f"vsock CID {self.cid}"
        return f"pid {self.pid} uid {self.uid}"

    @property
    def is_vsock(self) -> bool:
        return self.cid is not None


class ConnectedSocket(Protocol):
    """What :func:`of_socket` needs of a socket (Python's or trio's)."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def getpeername(self) -> Any: ...


def of_socket(sock: ConnectedSocket) -> Peer:
    """The peer of a connected Unix or vsock stream socket."""
    if sock.family == socket.AF_UNIX:
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return Peer(pid=pid, uid=uid)
    cid, _port = sock.getpeername()
    return Peer(cid=int(cid))


def refusal(peer: Peer, vsock_cids: frozenset[int]) -> str | None:
    """Why *peer* may not use the control socket at all; None if it may."""
    if peer.is_vsock:
        return None if peer.cid in vsock_cids else "its CID is not in vsock_cids"
    return None if peer.uid == 0 else "only root is served"
