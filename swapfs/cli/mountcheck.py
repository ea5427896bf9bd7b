"""What ``swapfs mount`` and ``umount`` may act on: only what is swapfs's own.

A new mount goes on an empty directory that nothing is mounted on, with its
state directory outside it: mounting over another mount hides it, mounting
over files hides them from whoever uses them, and a state directory inside
the mount point would be reached through the very mount it serves (the
daemon would wait on itself). ``umount`` takes down swapfs mounts only.
Each refusal is a :class:`SwapfsError` whose message names the cause.
"""

import errno
import os
from pathlib import Path

from swapfs.control import unescape
from swapfs.engine import SwapfsError


def mounted_type(path: str) -> str | None:
    """The type of the (upper) file system mounted on *path*, or None."""
    found = None
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if unescape(fields[4]) == path:
                found = fields[fields.index("-") + 1]
    return found


def check_new_mount(mountpoint: str, state: Path) -> None:
    """Refuse a mount point swapfs must not mount on (SwapfsError)."""
    path = os.path.realpath(mountpoint)
    if not os.path.lexists(mountpoint):
        raise SwapfsError(errno.ENOENT, f"mount point {mountpoint} does not exist")
    if not os.path.isdir(path):
        raise SwapfsError(errno.ENOTDIR, f"mount point {mountpoint} is not a directory")
    kind = mounted_type(path)
    if kind is not None:
        raise SwapfsError(errno.EBUSY, f"{path} is already a mount point ({kind})")
    if any(os.scandir(path)):
        raise SwapfsError(errno.ENOTEMPTY, f"mount point {path} is not empty")
    state = Path(os.path.realpath(state))
    if state == Path(path) or Path(path) in state.parents:
        raise SwapfsError(errno.EINVAL,
                          f"the state directory {state} is inside the mount point {path}")


def check_own_mount(mountpoint: str) -> str:
    """The real path of *mountpoint* if a swapfs mount is on it (SwapfsError if not)."""
    path = os.path.realpath(mountpoint)
    kind = mounted_type(path)
    if kind is None:
        raise SwapfsError(errno.EINVAL, f"{path} is not a mount point")
    if kind != "fuse.swapfs":
        raise SwapfsError(errno.EINVAL, f"{path} is not a swapfs mount ({kind})")
    return path
