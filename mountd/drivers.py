"""Drivers on the control socket: registration, reports, revocation.

A driver (``swapfs-driver run``) keeps one control connection open for as
long as it runs. The session belongs to that connection:

- ``{"op": "driver.register", "driver": NAME, "extents": [...]}`` reports
  the driver's extents and answers with its grant (cache id, the driver's
  share, the pool's capacity, an access token);
- ``{"op": "driver.update", "driver": NAME, "token": T, "extents": [...]}``
  replaces the report (processes started or exited) and answers the same;
- ``{"op": "driver.heartbeat", "driver": NAME, "token": T}`` says it is alive.

Every message is validated in full (``swapfs.protocol.check_message``,
which the driver's side shares) before the pool is touched: anything
malformed is refused with EINVAL, a wrong token with EACCES, a name another
live connection holds with EBUSY, and the connection is closed; the pool is
unchanged. When the connection closes (the driver exited or crashed) or
stays silent longer than the timeout, the driver is revoked at once: its
segments leave the pool and exactly the blocks they held are dropped.
"""

import errno
import hmac
import logging
import time
from typing import Any

from mountd.peercred import Peer
from swapfs.protocol import DriverError, check_message
from swapfs.transient import Grant, TransientCache

log = logging.getLogger(__name__)

class Session:
    """One control connection's driver, once it registered."""

    def __init__(self, peer: Peer) -> None:
        self.name: str | None = None
        self.since = time.monotonic()
        self.last_message = self.since
        self.extents = 0
        self.processes = 0
        self.per_process_bytes = 0
        self.keeper_pid: int | None = None  # a standby holding the connection
        self.peer = peer  # who connected (mountd/peercred.py)


class DriverManager:
    """The drivers of one daemon, and the pool they feed."""

    def __init__(self, cache: TransientCache, timeout: float) -> None:
        self.cache = cache
        self.timeout = timeout
        self.sessions: dict[str, Session] = {}

    def handle(self, session: Session, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one driver message on *session*'s connection."""
        op, name, extents = check_message(message)
        if op == "driver.register":
            if session.name is not None and session.name != name:
                raise DriverError(errno.EINVAL,
                                  f"this connection is driver {session.name!r} already")
            holder = self.sessions.get(name)
            if holder is not None and holder is not session:
                raise DriverError(errno.EBUSY, f"driver {name!r} is connected already")
        else:
            token = self.cache.token_of(name)
            if (session.name != name or token is None
                    or not hmac.compare_digest(token, message["token"])):
                raise DriverError(errno.EACCES, f"bad token for driver {name!r}")
        if extents is None:
            return {}
        first = session.name is None
        grant = self.cache.update(name, extents)
        session.name = name
        self.sessions[name] = session
        session.extents = len(extents)
        session.processes = len({extent.pid for extent in extents})
        session.per_process_bytes = sum(extent.length for extent in extents)
        if first:
            log.info("driver %s registered: %d extents, %d bytes; pool %d bytes", name,
                     len(extents), grant.capacity_bytes, self.cache.capacity_bytes)
        else:
            log.debug("driver %s updated: %d extents, %d bytes; pool %d bytes", name,
                      len(extents), grant.capacity_bytes, self.cache.capacity_bytes)
        return self._grant(grant)

    def _grant(self, grant: Grant) -> dict[str, Any]:
        return {"cache_id": grant.cache_id, "capacity_bytes": grant.capacity_bytes,
                "pool_capacity_bytes": self.cache.capacity_bytes, "token": grant.token}

    def close(self, session: Session, why: str) -> None:
        """*session*'s connection ended: revoke its driver, if it registered."""
        name = session.name
        if name is None or self.sessions.get(name) is not session:
            return
        del self.sessions[name]
        session.name = None
        self.cache.revoke(name)
        log.info("driver %s revoked (%s); pool %d bytes", name, why,
                 self.cache.capacity_bytes)

    def stats(self) -> dict[str, Any]:
        """The pool's figures, each driver's with its session's."""
        report = self.cache.stats()
        now = time.monotonic()
        for name, entry in report["drivers"].items():
            session = self.sessions.get(name)
            if session is not None:
                entry.update(extents=session.extents, processes=session.processes,
                             per_process_bytes=session.per_process_bytes,
                             connected_seconds=round(now - session.since, 3),
                             idle_seconds=round(now - session.last_message, 3))
        report["driver_timeout"] = self.timeout
        return report
