"""Who is at the other end of a control connection, and what it may ask.

On the host's Unix socket the kernel says who connected (``SO_PEERCRED``):
only root is served, and the members of ``control_group`` if one is
configured (the socket is 0600, or 0660 with that group, besides; the check
holds even if its mode is loosened by hand). A driver that is not root may
report only processes of its own user, as it could inspect no others. A
guest's driver reaches the daemon over vsock, where the peer is a context
id (CID): only the CIDs the configuration lists (``vsock_cids``) are
admitted, and only for driver messages, never for the commands that change
or reveal the host's state.
Each refusal is EACCES, and the log names the peer.
"""

import grp
import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from swapfs.protocol import unix_peer


@dataclass(frozen=True)
class Peer:
    """A Unix peer (pid, uid and gid) or a vsock peer (cid)."""

    pid: int | None = None
    uid: int | None = None
    cid: int | None = None
    gid: int | None = None

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
        pid, uid, gid = unix_peer(sock)
        return Peer(pid=pid, uid=uid, gid=gid)
    cid, _port = sock.getpeername()
    return Peer(cid=int(cid))


def group_id(name: str) -> int:
    """The gid of ``control_group``: a group name, or a number (KeyError if
    no such group)."""
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def in_group(peer: Peer, gid: int) -> bool:
    """Is *peer* a member of group *gid*: its primary group, or one of the
    supplementary groups its process has (/proc/PID/status)?"""
    if peer.gid == gid:
        return True
    try:
        with open(f"/proc/{peer.pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass
    return False


def refusal(peer: Peer, vsock_cids: frozenset[int], group: int | None = None) -> str | None:
    """Why *peer* may not use the control socket at all; None if it may."""
    if peer.is_vsock:
        return None if peer.cid in vsock_cids else "its CID is not in vsock_cids"
    if peer.uid == 0 or (group is not None and in_group(peer, group)):
        return None
    return "only root is served" + ("" if group is None else f" and group {group}")


def foreign_process(peer: Peer, pids: set[int]) -> int | None:
    """A pid among *pids* whose process *peer*, a Unix peer that is not root,
    could not inspect (another user's); None if there is none. A process
    gone already claims nothing."""
    if peer.is_vsock or peer.uid == 0:
        return None  # a guest's pids are its own kernel's; root inspects all
    for pid in sorted(pids):
        try:
            if os.stat(f"/proc/{pid}").st_uid != peer.uid:
                return pid
        except FileNotFoundError:
            continue
    return None
