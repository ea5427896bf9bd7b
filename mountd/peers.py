"""The other swapfs daemons on this host, as the fail-over planner sees them.

Each daemon writes its content cache's manifest into its state directory
every few seconds (:mod:`mountd.cachekeeper`). A daemon that starts (a
restart, a takeover on this host, a takeover of another host's state)
builds its cache with the planner from its own state's last manifest and
those of the daemons that serve the other swapfs mounts here: it finds them
in the mount table, asks each its state directory over its control socket,
and reads the manifest there. A peer that does not answer, or whose
manifest is unreadable, is left out with a warning: it costs a colder
cache, never a failed start.

The daemon does this as root, with its memory locked and the OOM killer
told to spare it, so a peer is root's alone: a mount root made (any user
can make a ``fuse.swapfs`` mount with fusermount3 and name any socket), a
socket file root owns and a root process serves (``SO_PEERCRED``), a state
directory only root may write, and a manifest root owns, read within the
cache budget (:func:`swapfs.cache.manifest.read_manifest`). Anything else is left
out before it is asked or read.
"""

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from swapfs.cache import CacheEntry, ManifestError, read_manifest
from swapfs.control import protocol

log = logging.getLogger(__name__)

MANIFEST_NAME = "cache.manifest"
#: Seconds a peer may take to answer before it is left out.
PEER_TIMEOUT = 5.0


@dataclass(frozen=True)
class PeerDaemon:
    """Another daemon of this host and its content cache's last manifest
    (a connected process's credentials are :class:`mountd.peercred.Peer`)."""

    mountpoint: str
    state: Path
    entries: list[CacheEntry]


class NotAPeer(Exception):
    """A mount whose socket, daemon or state directory is not root's."""


def peers(own_state: Path, max_blocks: int) -> list[PeerDaemon]:
    """Every other daemon's last manifest of at most *max_blocks* blocks
    (blocking: run it in a thread)."""
    for mount in protocol.swapfs_mounts():
        if mount.user_id != 0:
            log.warning("peer %s left out of the cache plan: mounted by uid %s, not root",
                        mount.mountpoint, mount.user_id)
    found = []
    for mountpoint, socket_path in sorted(protocol.swapfs_sockets().items()):
        try:
            state = state_of(socket_path)
            if state == own_state:
                continue
            check_state(state)
        except (OSError, NotAPeer, protocol.ControlError) as exc:
            # A peer gone meanwhile (its socket removed) is no peer: only a
            # missing manifest of a live peer counts as an empty one.
            log.warning("peer %s left out of the cache plan: %s", mountpoint, exc)
            continue
        try:
            entries = read_manifest(state / MANIFEST_NAME, max_blocks, owner=0)
        except FileNotFoundError:
            entries = []
        except (OSError, ManifestError) as exc:
            log.warning("peer %s left out of the cache plan: %s", mountpoint, exc)
            continue
        found.append(PeerDaemon(mountpoint, state, entries))
    return found


def state_of(socket_path: str) -> Path:
    """The state directory of the daemon at *socket_path*, if root serves it."""
    info = os.lstat(socket_path)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != 0:
        raise NotAPeer(f"{socket_path} is not a socket root owns")
    with protocol.Connection(socket_path, PEER_TIMEOUT) as connection:
        _pid, uid, _gid = protocol.unix_peer(connection.sock)
        if uid != 0:
            raise NotAPeer(f"{socket_path} is served by uid {uid}, not root")
        state = connection.request({"op": "status"}).get("state")
    if not isinstance(state, str) or not os.path.isabs(state):
        raise NotAPeer(f"{socket_path} named no state directory: {state!r}"[:200])
    return Path(state)


def check_state(state: Path) -> None:
    """NotAPeer unless *state* is a directory only root may write."""
    info = os.stat(state)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise NotAPeer(f"its state directory {state} is not root's alone")
