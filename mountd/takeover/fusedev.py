"""The kernel's side of a mount: ``/dev/fuse``, mount(2), INIT and the resend.

The daemon opens ``/dev/fuse`` and mounts it itself instead of letting
libfuse do it, for one reason: the descriptor is then the daemon's to hand
to a keeper (systemd's file descriptor store or ``swapfs standby``), and the
``FUSE_INIT`` request the kernel sends once per connection is the daemon's
to keep. A connection outlives its server as long as any process holds a
descriptor of it; a new daemon that gets the descriptor and the INIT
request replays the request to libfuse (``pyfuse3.init(...,
init_request=...)``, docs/pyfuse3-patch.md), which then negotiates exactly
as before, and asks the kernel to resend the requests the dead daemon had
read but not answered (``FUSE_NOTIFY_RESEND``, Linux 6.9 and later).

Facts this relies on (measured; see docs/takeover.md): the kernel never
sends INIT again; resent requests carry bit 63 in ``unique`` and the reply
must echo it (libfuse does); node ids and file handles of the old server
arrive unchanged.
"""

import ctypes
import ctypes.util
import errno
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2

FUSE_INIT = 26
_NOTIFY_RESEND = 7
_INIT_EXT = 1 << 30
_HAS_RESEND = 1 << 39

_IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, pad
_INIT_IN = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2
#: Big enough for any request (the kernel refuses smaller reads).
_READ_SIZE = (1 << 20) + 4096


class FuseDeviceError(OSError):
    """The kernel refused a step of mounting or taking over a connection."""


def mount(mountpoint: str, source: str, subtype: str, allow_other: bool) -> int:
    """Open ``/dev/fuse``, mount it on *mountpoint*, return the descriptor.

    The options are those libfuse's own mount would pass for a root mount
    with ``default_permissions``. Needs CAP_SYS_ADMIN.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
               f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    result = _libc.mount(source.encode(), mountpoint.encode(), f"fuse.{subtype}".encode(),
                         _MS_NOSUID | _MS_NODEV, ",".join(options).encode())
    if result != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise FuseDeviceError(code, f"cannot mount {mountpoint}: {os.strerror(code)}")
    return fd


def unmount(mountpoint: str) -> None:
    """Detach the mount (what libfuse does for a root mount)."""
    if _libc.umount2(mountpoint.encode(), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise FuseDeviceError(code, f"cannot unmount {mountpoint}: {os.strerror(code)}")


def read_init(fd: int) -> bytes:
    """Read the connection's first request, which the kernel makes its INIT.

    The kernel queues INIT before mount(2) returns, so this read finds it
    whether or not the descriptor is non-blocking (pyfuse3's loop sets
    O_NONBLOCK, on the open file description that every duplicate shares).
    """
    return check_init(os.read(fd, _READ_SIZE))


def check_init(request: bytes) -> bytes:
    """*request* if it is one whole ``FUSE_INIT`` request; FuseDeviceError if not.

    libfuse takes whatever it is handed for the INIT: anything else leaves
    its session uninitialised, and it answers every later request EIO.
    """
    if len(request) < _IN_HEADER.size + _INIT_IN.size:
        raise FuseDeviceError(errno.EPROTO, f"short INIT request ({len(request)} bytes)")
    length, opcode = _IN_HEADER.unpack_from(request)[:2]
    if opcode != FUSE_INIT:
        raise FuseDeviceError(errno.EPROTO, f"request {opcode} is not FUSE_INIT")
    if length != len(request):
        raise FuseDeviceError(errno.EPROTO, f"the INIT request says {length} bytes "
                                            f"and holds {len(request)}")
    return request


def init_version(init: bytes) -> tuple[int, int]:
    """The protocol version (major, minor) an INIT request offers."""
    major, minor, _readahead, _flags, _flags2 = _INIT_IN.unpack_from(init, _IN_HEADER.size)
    return major, minor


def supports_resend(init: bytes) -> bool:
    """Does the kernel that sent *init* take ``FUSE_NOTIFY_RESEND`` (6.9+)?"""
    _major, _minor, _readahead, flags, flags2 = _INIT_IN.unpack_from(init, _IN_HEADER.size)
    flags64 = flags | (flags2 << 32 if flags & _INIT_EXT else 0)
    return bool(flags64 & _HAS_RESEND)


def request_resend(fd: int) -> None:
    """Ask the kernel to queue again every request read but not answered.

    Raises FuseDeviceError on kernels without the notification (EINVAL).
    """
    try:
        os.write(fd, struct.pack("<IiQ", 16, _NOTIFY_RESEND, 0))
    except OSError as exc:
        raise FuseDeviceError(exc.errno, f"FUSE_NOTIFY_RESEND refused: {exc.strerror}") from exc
