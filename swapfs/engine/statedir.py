"""The state directory is root's alone: directories 0700, files 0600.

It holds every swapped-out page (in the data files), the chains' digest
keys (in the index, with which a reader could confirm a guess of a page)
and logs that name files and peers. So nobody but its owner may read any
of it, whatever the umask of whoever made it: :func:`secure` tightens a
state directory made by an earlier swapfs, or by hand, each time a volume
opens it, and the daemon creates everything with umask 077.
"""

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def secure(state: Path) -> None:
    """Make *state* and everything in it (two levels: ``data/``,
    ``index.lmdb/``) readable by its owner alone."""
    _tighten(state, DIR_MODE)
    for entry in os.scandir(state):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            _tighten(Path(entry.path), DIR_MODE)
            for inner in os.scandir(entry.path):
                if not inner.is_symlink():
                    _tighten(Path(inner.path), DIR_MODE if inner.is_dir() else FILE_MODE)
        else:
            _tighten(Path(entry.path), FILE_MODE)


def sync_directory(directory: Path) -> None:
    """fsync(2) *directory*, so that the names created, renamed or removed in
    it so far survive a power cut (OSError if the file system reports an
    error)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tighten(path: Path, mode: int) -> None:
    """Clear the group and other bits that *mode* does not allow."""
    current = stat.S_IMODE(path.lstat().st_mode)
    if current & ~mode & 0o077:
        path.chmod(current & ~(0o077 & ~mode))
