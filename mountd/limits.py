"""How many control connections each peer may hold at once.

Every connection costs the daemon a descriptor and a task, so their number
is bounded (``control_max_connections``). One bound for all would let one
admitted peer, a group member or a guest's driver, hold every connection
and keep root out: ``swapfs status`` would fail and a standby could not
attach to a new daemon, which fails the takeover. So each Unix user other
than root may hold ``control_max_per_uid`` connections, each guest
``control_max_per_cid``, and all peers but root together all but
``control_root_reserve``: those are root's alone. Root is bounded by the
total only. A connection past a bound is answered EAGAIN and closed;
clients try again (``swapfs.control.protocol.request``, ``mountd.takeover.standby.attach``).
"""

from collections import Counter

from mountd.peercred import Peer


class ConnectionLimits:
    """The connections open now, per peer, against the configured bounds."""

    def __init__(self, total: int = 128, root_reserve: int = 8, per_uid: int = 16,
                 per_cid: int = 4) -> None:
        if not 0 <= root_reserve < total:
            raise ValueError("root_reserve must be within 0..total-1")
        self.total = total
        self.root_reserve = root_reserve
        self.per_uid = per_uid
        self.per_cid = per_cid
        self.open = 0
        self._others = 0  # connections of every peer but root
        self._by_peer: Counter[tuple[str, int | str | None]] = Counter()

    @staticmethod
    def _key(peer: Peer) -> tuple[str, int | str | None]:
        if peer.channel is not None:
            return ("channel", peer.channel)
        return ("cid", peer.cid) if peer.cid is not None else ("uid", peer.uid)

    def refusal(self, peer: Peer) -> str | None:
        """Why *peer* may not open one more connection now; None if it may."""
        if self.open >= self.total:
            return f"{self.open} control connections open already"
        if peer.is_root:
            return None
        if self._others >= self.total - self.root_reserve:
            return (f"{self._others} connections of peers other than root open already "
                    f"({self.root_reserve} are kept for root)")
        key = self._key(peer)
        bound = self.per_cid if peer.is_guest else self.per_uid
        if self._by_peer[key] >= bound:
            return f"{peer} holds {bound} control connections already"
        return None

    def add(self, peer: Peer) -> None:
        self.open += 1
        if not peer.is_root:
            self._others += 1
            self._by_peer[self._key(peer)] += 1

    def remove(self, peer: Peer) -> None:
        self.open -= 1
        if not peer.is_root:
            self._others -= 1
            key = self._key(peer)
            self._by_peer[key] -= 1
            if not self._by_peer[key]:
                del self._by_peer[key]
