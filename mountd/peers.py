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
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from swapfs import manifest, protocol

log = logging.getLogger(__name__)

MANIFEST_NAME = "cache.manifest"
#: Seconds a peer may take to answer before it is left out.
PEER_TIMEOUT = 5.0


@dataclass(frozen=True)
class Peer:
    """Another daemon of this host and its content cache's last manifest."""

    mountpoint: str
    state: Path
    entries: list[manifest.CacheEntry]


def peers(own_state: Path) -> list[Peer]:
    """Every other daemon's last manifest (blocking: run it in a thread)."""
    found = []
    for mountpoint, socket_path in sorted(protocol.swapfs_sockets().items()):
        try:
            state = Path(protocol.request(socket_path, {"op": "status"},
                                         timeout=PEER_TIMEOUT)["state"])
        except (protocol.ControlError, KeyError, ValueError) as exc:
            log.warning("peer %s left out of the cache plan: %s", mountpoint, exc)
            continue
        if state == own_state:
            continue
        try:
            entries = manifest.read_manifest(state / MANIFEST_NAME)
        except FileNotFoundError:
            entries = []
        except (OSError, manifest.ManifestError) as exc:
            log.warning("peer %s left out of the cache plan: %s", mountpoint, exc)
            continue
        found.append(Peer(mountpoint, state, entries))
    return found
