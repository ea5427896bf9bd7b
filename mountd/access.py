"""Who may do what on the control socket: one table, checked before dispatch.

A connection's peer (:mod:`mountd.peercred`) is of one or more *kinds*:

- ``ROOT``: uid 0 on the host's Unix socket (a standby is root too);
- ``GROUP``: a member of ``control_group`` on the Unix socket, not root;
- ``GUEST``: a vsock peer whose CID is in ``vsock_cids``, or the guest on
  a channel the daemon dialed (``[drivers.NAME] channel``,
  :mod:`mountd.channels`);
- ``DRIVER``: any of those once its connection registered a driver.

A peer of no kind is refused at the connection. Every request then names
an *action* (its op; ``priority`` with a value to set is ``priority.set``)
and :data:`PERMISSIONS` says which kinds may ask it. Whatever hands over
the mount or reaches another tenant's data (``keeper.attach``, which
carries ``/dev/fuse``; ``clone``; the host's ``secret``; setting a
priority) is root's alone. The table is checked for every request before
anything else looks at it, ``keeper.attach`` included, so no handler has to
remember to check. A refusal is EACCES, logged with the peer and the
action, and the connection is closed after it.

Which peer may register which driver name is :func:`name_refusal`'s: a name
may be bound in the configuration (``[drivers.NAME]``) to one guest (its
CID, or the channel of its virtual machine) or one Unix user (its uid).
"""

import enum
from dataclasses import dataclass
from typing import Any

from mountd.peercred import Peer, in_group


class Kind(enum.Enum):
    ROOT = "root"
    GROUP = "group"
    GUEST = "guest"
    DRIVER = "driver"


_ROOT = frozenset({Kind.ROOT})
_OBSERVERS = frozenset({Kind.ROOT, Kind.GROUP})
_DRIVER = frozenset({Kind.DRIVER})

#: Every action of the control protocol and the kinds of peer that may ask it.
#: ``driver.register`` is further limited by the name's binding (name_refusal);
#: the other driver messages by the token of the connection's own registration.
PERMISSIONS: dict[str, frozenset[Kind]] = {
    "status": _OBSERVERS,
    "stats": _OBSERVERS,
    "priority": _OBSERVERS,
    "priority.set": _ROOT,
    "clone": _ROOT,
    "secret": _ROOT,
    "keeper.attach": _ROOT,
    "driver.register": frozenset({Kind.ROOT, Kind.GROUP, Kind.GUEST}),
    "driver.update": _DRIVER,
    "driver.heartbeat": _DRIVER,
    "driver.stop": _DRIVER,
    "driver.secret.put": _DRIVER,
    "driver.secret.get": _DRIVER,
    "driver.secret.rm": _DRIVER,
}


def action_of(message: dict[str, Any]) -> str | None:
    """The action *message* asks for (a key of PERMISSIONS), None if unknown."""
    op = message.get("op")
    if op == "priority" and "priority" in message:
        return "priority.set"
    return op if isinstance(op, str) and op in PERMISSIONS else None


def kinds_of(peer: Peer, vsock_cids: frozenset[int], group: int | None) -> frozenset[Kind]:
    """What *peer* is when it connects (DRIVER comes with a registration)."""
    if peer.channel is not None:
        return frozenset({Kind.GUEST})  # the daemon dialed it: its binding admits it
    if peer.is_guest:
        return frozenset({Kind.GUEST}) if peer.cid in vsock_cids else frozenset()
    if peer.is_root:
        return _ROOT
    if group is not None and in_group(peer, group):
        return frozenset({Kind.GROUP})
    return frozenset()


def connection_refusal(peer: Peer, kinds: frozenset[Kind], group: int | None) -> str | None:
    """Why *peer*, of *kinds*, may not use the control socket at all; None if it may."""
    if kinds:
        return None
    if peer.is_guest:
        return "its CID is not in vsock_cids"
    return "only root is served" + ("" if group is None else f" and group {group}")


def allowed(action: str, kinds: frozenset[Kind]) -> bool:
    """May a peer of *kinds* ask *action*?"""
    return not PERMISSIONS[action].isdisjoint(kinds)


@dataclass(frozen=True)
class Binding:
    """The one peer a driver name belongs to: a guest's CID, the channel of a
    guest's virtual machine (the host end of a virtio-serial port, or a
    Firecracker or cloud-hypervisor vsock socket with the guest's
    *vsock_port*), or a Unix uid."""

    cid: int | None = None
    uid: int | None = None
    channel: str | None = None
    vsock_port: int | None = None

    def __str__(self) -> str:
        if self.cid is not None:
            return f"vsock CID {self.cid}"
        if self.channel is not None:
            return f"channel {self.channel}"
        return f"uid {self.uid}"

    def matches(self, peer: Peer) -> bool:
        if self.cid is not None:
            return peer.cid == self.cid
        if self.channel is not None:
            return peer.channel == self.channel
        return not peer.is_guest and peer.uid == self.uid


def name_refusal(name: str, peer: Peer, bindings: dict[str, Binding]) -> str | None:
    """Why *peer* may not register driver *name*; None if it may.

    A bound name only from its peer, root included: ``swapfs secret put
    --driver NAME`` must reach that guest and no other. An unbound name only
    from root on the host: otherwise the first admitted peer to register it
    (another guest, a guest on a recycled CID, a group member) would receive
    what the host shares under that name."""
    binding = bindings.get(name)
    if binding is not None:
        return None if binding.matches(peer) else f"driver {name!r} is bound to {binding}"
    if peer.is_root:
        return None
    return f"driver {name!r} is bound to no peer: only root may register an unbound name"
