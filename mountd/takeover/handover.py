"""Handing the connection to a keeper that outlives the daemon, and back.

Two descriptors make a connection recoverable: ``/dev/fuse`` itself and the
connection memo (:mod:`mountd.takeover.memo`). A keeper holds both and never
reads from either. There are two kinds:

* systemd's file descriptor store: the daemon sends both with
  ``FDSTORE=1`` (names ``fuse`` and ``fuse-session``, :data:`MEMO_NAME`);
  when the unit restarts after a crash, systemd passes them to the new
  daemon in ``$LISTEN_FDS``/``$LISTEN_FDNAMES`` (``FileDescriptorStoreMax=``
  in ``swapfs@.service``);
* ``swapfs standby MNT`` (:mod:`mountd.takeover.standby`): it asks the
  daemon for both over the control socket (``keeper.attach``, the
  descriptors ride along the reply as SCM_RIGHTS), and starts the new
  daemon with them.
"""

import array
import logging
import os
import socket

log = logging.getLogger(__name__)

#: The names of the two descriptors in systemd's store. They outlive the
#: daemon that stored them, so they are an interface between versions: a
#: daemon upgraded under a running unit gets back what the old one stored,
#: and a downgraded one what the new one stored. The memo keeps the name it
#: had when it was called the session: under a new name, a daemon would have
#: to store the memo beside the old entry (a third descriptor, past
#: FileDescriptorStoreMax=2) or remove the old entry by its name, and an older
#: daemon would not find it at all.
FUSE_NAME = "fuse"
MEMO_NAME = "fuse-session"
_SD_LISTEN_FDS_START = 3


def from_systemd() -> tuple[int, int] | None:
    """The (fuse, memo) descriptors systemd passed from its store, if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    fds = {name: _SD_LISTEN_FDS_START + i for i, name in enumerate(names[:count])}
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if FUSE_NAME in fds and MEMO_NAME in fds:
        for fd in fds.values():
            os.set_inheritable(fd, False)
        return fds[FUSE_NAME], fds[MEMO_NAME]
    return None


def store_in_systemd(fuse_fd: int, memo_fd: int) -> bool:
    """Put both descriptors in systemd's store; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            for name, fd in ((FUSE_NAME, fuse_fd), (MEMO_NAME, memo_fd)):
                # Replace, not add: a restarted daemon stores the same descriptors again.
                sock.sendto(f"FDSTOREREMOVE=1\nFDNAME={name}".encode(), address)
                sock.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()], rights([fd]), 0, address)
    except OSError as exc:
        log.warning("cannot store the connection in systemd: %s", exc)
        return False
    return True


#: Ancillary data as socket.sendmsg takes and socket.recvmsg gives it.
Ancillary = list[tuple[int, int, bytes]]


def rights(fds: list[int]) -> Ancillary:
    """The ancillary data that passes *fds* along a message (SCM_RIGHTS)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def fds_in(ancillary: Ancillary) -> list[int]:
    """The descriptors a received message carried (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[:len(payload) - len(payload) % 4])
    return fds


def watch_standby(pid: int) -> int | None:
    """A pidfd of the standby *pid* that started this daemon; None if it is gone.

    A standby may die after it started a daemon and before it attached to
    it (``keeper.attach``), and then no control connection ends to tell the
    daemon. The standby is this process's parent: the pidfd is opened, then
    the parent checked. Still *pid*, the pidfd names that standby (a parent's
    pid is not reused while its child lives); otherwise the standby died and
    this process was reparented.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if os.getppid() != pid:
        os.close(pidfd)
        return None
    return pidfd
