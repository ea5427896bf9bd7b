"""Who is at the other end of a control connection.

On the host's Unix socket the kernel says who connected: ``SO_PEERCRED``
gives the pid, uid and gid, ``SO_PEERGROUPS`` (Linux 4.13 and later) the
supplementary groups, both as they were when the peer called ``connect``.
Reading the groups from the socket rather than from ``/proc/PID/status``
matters: a peer that exits at once frees its pid, and a process of another
user that reuses it would be judged in its place. ``/proc`` is read only on
a kernel without ``SO_PEERGROUPS``. A guest's driver reaches the daemon over
vsock, where the peer is a context id (CID), or over its virtual machine's
*channel* (:mod:`mountd.channels`), a Unix socket of the VMM's that the
daemon dials: there the peer is whatever is inside that machine, named by
the channel's path.

What each kind of peer may ask is :mod:`mountd.access`'s business.
"""

import ctypes
import errno
import grp
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from swapfs.control import unix_peer

#: getsockopt option of the peer's supplementary groups (linux/socket.h).
SO_PEERGROUPS = 59
_GID = struct.Struct("I")


@dataclass(frozen=True)
class Peer:
    """A Unix peer (pid, uid, gid and supplementary groups), a vsock peer
    (cid) or the inside of a virtual machine reached over its channel (the
    channel's path).

    *groups* is None when the kernel could not say (no ``SO_PEERGROUPS``);
    :func:`in_group` then reads them from ``/proc``."""

    pid: int | None = None
    uid: int | None = None
    cid: int | None = None
    gid: int | None = None
    groups: frozenset[int] | None = None
    channel: str | None = None

    def __str__(self) -> str:
        if self.cid is not None:
            return f"vsock CID {self.cid}"
        if self.channel is not None:
            return f"the guest on channel {self.channel}"
        return f"pid {self.pid} uid {self.uid}"

    @property
    def is_guest(self) -> bool:
        """Inside a virtual machine: over vsock or its channel."""
        return self.cid is not None or self.channel is not None

    @property
    def is_root(self) -> bool:
        """Root on the host's Unix socket (uid 0 in a guest is not)."""
        return not self.is_guest and self.uid == 0


class ConnectedSocket(Protocol):
    """What :func:`of_socket` needs of a socket (Python's or trio's)."""

    @property
    def family(self) -> int: ...

    def fileno(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def getpeername(self) -> Any: ...


def of_socket(sock: ConnectedSocket) -> Peer:
    """The peer of a connected Unix or vsock stream socket."""
    if sock.family == socket.AF_UNIX:
        pid, uid, gid = unix_peer(sock)
        return Peer(pid=pid, uid=uid, gid=gid, groups=peer_groups(sock.fileno()))
    cid, _port = sock.getpeername()
    return Peer(cid=int(cid))


_libc = ctypes.CDLL(None, use_errno=True)


def peer_groups(fd: int) -> frozenset[int] | None:
    """The supplementary groups of the peer of Unix socket *fd*, as they were
    at ``connect`` (``SO_PEERGROUPS``); None on a kernel without it.

    Through libc, because Python's getsockopt reads at most 1024 bytes (256
    groups) and a process may have 65536: on ERANGE the kernel says how many
    bytes it needs, and the call is made again with that much room."""
    size = ctypes.c_uint32(64 * _GID.size)
    while True:
        buffer = ctypes.create_string_buffer(size.value)
        if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer,
                            ctypes.byref(size)) == 0:
            break
        code = ctypes.get_errno()
        if code == errno.ERANGE:
            continue  # size now holds what the kernel needs
        if code == errno.ENOPROTOOPT:
            return None
        raise OSError(code, f"SO_PEERGROUPS: {os.strerror(code)}")
    data = buffer.raw[:size.value - size.value % _GID.size]
    return frozenset(gid for (gid,) in _GID.iter_unpack(data))


def status_groups(status: str) -> frozenset[int]:
    """The supplementary groups a ``/proc/PID/status`` text lists ("Groups:")."""
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(field) for field in line.split()[1:])
    return frozenset()


def group_id(name: str) -> int:
    """The gid of ``control_group``: a group name, or a number (KeyError if
    no such group)."""
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def in_group(peer: Peer, gid: int) -> bool:
    """Is Unix *peer* a member of group *gid*, by its primary group or one of
    its supplementary groups? Exact: group 42420 is not a member of 4242."""
    if peer.is_guest:
        return False
    if peer.gid == gid:
        return True
    groups = peer.groups
    if groups is None:  # a kernel before 4.13: the process's groups now
        try:
            with open(f"/proc/{peer.pid}/status") as status:
                groups = status_groups(status.read())
        except OSError:
            return False
    return gid in groups


def foreign_process(peer: Peer, pids: set[int]) -> int | None:
    """A pid among *pids* whose process *peer*, a Unix peer that is not root,
    could not inspect (another user's); None if there is none. A process
    gone already claims nothing."""
    if peer.is_guest or peer.uid == 0:
        return None  # a guest's pids are its own kernel's; root inspects all
    for pid in sorted(pids):
        try:
            if os.stat(f"/proc/{pid}").st_uid != peer.uid:
                return pid
        except FileNotFoundError:
            continue
    return None
