"""The daemon's connection to the kernel, who keeps it alive, and its lease.

A module of its own because two others change it: the daemon
(:mod:`mountd.daemon`) makes the link and hands it to systemd's file
descriptor store, and the control server (:mod:`mountd.controlserver`)
attaches a standby to it and detaches it when the standby goes. Both import
this module, and neither the other.
"""

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mountd.cachekeeper import CacheKeeper
from mountd.takeover.memo import ConnectionMemo
from swapfs.engine import Lease, SwapfsError, lease

#: Who holds the connection's descriptors beside the daemon.
Keeper = Literal["systemd", "standby"]


@dataclass
class Takeover:
    """The last takeover of the connection, if this daemon made it: what
    ``swapfs status`` shows as ``last_takeover`` (:meth:`report`)."""

    #: "connection": a kept connection whose daemon died; "state": another
    #: host's state directory, mounted here after its lease lapsed.
    kind: Literal["connection", "state"]
    at: float  # time.time() when this daemon began it
    noticed: float | None  # CLOCK_MONOTONIC when the death was seen; None: not told
    number: int  # of the connection's takeovers, this one included
    #: Requests outstanding in the kernel when the connection was taken
    #: (None: fusectl cannot tell); set with *resent*.
    waiting: int | None = None
    #: Did the kernel queue again what the dead daemon had read? None until
    #: asked (a connection's takeover only).
    resent: bool | None = None
    seconds: float | None = None  # from *noticed* until this daemon served

    def report(self) -> dict[str, Any]:
        """As JSON shows it: a key only once its value is known."""
        shown: dict[str, Any] = {"kind": self.kind, "at": self.at, "noticed": self.noticed,
                                 "number": self.number}
        if self.resent is not None:
            shown.update(waiting=self.waiting, resent=self.resent)
        if self.seconds is not None:
            shown["seconds"] = self.seconds
        return shown


class Link:
    """The daemon's connection to the kernel and who keeps it alive.

    ``fuse_fd`` is None where the daemon could not mount itself (no
    CAP_SYS_ADMIN) and libfuse mounted instead: such a mount cannot be taken
    over. ``keeper`` changes only through :meth:`keep_in_systemd`,
    :meth:`attach_standby` and :meth:`detach_standby`.
    """

    def __init__(self, mountpoint: str, fuse_fd: int | None, memo: ConnectionMemo | None,
                 takeover: Takeover | None) -> None:
        self.mountpoint = mountpoint
        self.fuse_fd = fuse_fd
        self.memo = memo
        self.takeover = takeover
        self.keeper: Keeper | None = None
        self.keeper_pid: int | None = None
        #: The pidfd of the standby that started this daemon, until it attaches or dies.
        self.keeper_pidfd: int | None = None
        self.restart_argv: list[str] = []
        self.lease: Lease | None = None
        #: Renews the lease while the state opens, before the trio loop runs.
        self.opening: lease.Renewer | None = None
        self.cache_keeper: CacheKeeper | None = None  # whose last_plan status shows

    def keep_in_systemd(self) -> None:
        """systemd's file descriptor store holds the connection: it stored
        it, or passed it to this daemon from there."""
        self.keeper = "systemd"

    def attach_standby(self, pid: int, pidfd: int | None = None) -> list[int]:
        """Make the standby *pid* the connection's keeper; return the
        descriptors it must hold (``/dev/fuse`` and the connection memo).

        *pidfd* is given for the standby that started this daemon
        (:func:`mountd.takeover.handover.watch_standby`). SwapfsError
        (ENOTSUP) for a mount libfuse made, (EBUSY) for one another keeper
        holds already.
        """
        if self.fuse_fd is None or self.memo is None:
            raise SwapfsError(errno.ENOTSUP, "this mount was made by libfuse "
                                             "and cannot be taken over")
        if self.keeper == "systemd":
            raise SwapfsError(errno.EBUSY, "systemd's file descriptor store keeps "
                                           "this mount already")
        if self.keeper == "standby" and self.keeper_pid not in (None, pid):
            raise SwapfsError(errno.EBUSY, f"standby {self.keeper_pid} keeps this "
                                           "mount already")
        self.keeper, self.keeper_pid = "standby", pid
        if pidfd is not None:
            self.keeper_pidfd = pidfd
        return [self.fuse_fd, self.memo.fd]

    def detach_standby(self, pid: int) -> bool:
        """The standby *pid* went away: from now on a daemon failure ends
        the mount. False if *pid* did not keep the connection."""
        if self.keeper != "standby" or self.keeper_pid != pid:
            return False
        self.keeper, self.keeper_pid = None, None
        return True

    @property
    def kept(self) -> bool:
        return self.keeper is not None

    def claim_lease(self, state: Path, seconds: float) -> int:
        """Take the state directory's lease (the Volume holds its flock) and
        keep it renewed while the state opens: a large state takes minutes.
        Returns its generation. The renewals are no progress of the start
        (a start hung elsewhere would renew for ever): only the opening's
        own steps are."""
        self.lease = lease.acquire(state, seconds, reclaim_local=True)
        self.opening = lease.Renewer(self.lease).__enter__()
        return self.lease.generation

    def restamp_lease(self, recorded: int) -> int:
        """Re-stamp the lease above the generation the index records
        (``Volume(..., restamp=...)``, ``Lease.restamp_above``)."""
        assert self.lease is not None
        return self.lease.restamp_above(recorded)

    def opened(self) -> None:
        """The state is open (or failed to): keep_renewed renews from now on."""
        if self.opening is not None:
            self.opening.__exit__()
            self.opening = None

    def guard(self) -> None:
        """Raise EROFS unless the lease (if any) lets this daemon write now."""
        if self.lease is not None:
            self.lease.guard()

    def status(self) -> dict[str, Any]:
        plan = self.cache_keeper.last_plan if self.cache_keeper is not None else None
        return {"keeper": self.keeper, "keeper_pid": self.keeper_pid,
                "restart_argv": self.restart_argv,
                "takeover_capable": self.fuse_fd is not None,
                "takeovers": self.memo.takeovers if self.memo else 0,
                "last_takeover": None if self.takeover is None
                else {**self.takeover.report(), **(plan or {})},
                "cache_plan": plan,
                "lease": None if self.lease is None else {
                    "generation": self.lease.generation, "holder": self.lease.holder_hex,
                    "valid_for": round(self.lease.valid_for(), 3)}}
