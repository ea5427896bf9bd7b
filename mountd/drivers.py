"""Drivers on the control socket: registration, reports, revocation.

A driver (``swapfs-driver run``) keeps one control connection open for as
long as it runs. The session belongs to that connection:

- ``{"op": "driver.register", "driver": NAME, "extents": [...],
  "public_key": K}`` reports the driver's extents and (optionally, for
  records) its half of the record key's agreement, and answers with its
  grant (cache id, the driver's share, the pool's capacity, an access
  token) and the daemon's half;
- ``{"op": "driver.update", "driver": NAME, "token": T, "extents": [...]}``
  replaces the report (processes started or exited) and answers the same;
- ``{"op": "driver.heartbeat", "driver": NAME, "token": T}`` says it is alive;
- ``{"op": "driver.stop", "driver": NAME, "token": T}`` says it stops: it
  is revoked, as if its connection closed, before it is answered. On a
  channel that outlives the driver (a virtio-serial port,
  :mod:`mountd.channels`) this is how a driver leaves; one that dies there
  is revoked when it has been silent past the timeout;
- ``driver.secret.put`` (``name``, ``sealed``), ``driver.secret.get`` and
  ``driver.secret.rm`` (``name``) keep, return and delete the driver's
  sealed records (:mod:`swapfs.control.records`), on its own connection only.

The manager keeps the records, in whole slots of the driver's share of the
pool: it tells the pool how many slots they hold back
(:meth:`TransientCache.hold`), refuses a record beyond the share with
ENOSPC, and wipes the newest when a report shrinks the share below them.

Every message is validated in full (``swapfs.control.protocol.check_message``,
which the driver's side shares) before the pool is touched: anything
malformed is refused with EINVAL, a wrong token with EACCES, a name bound
to another peer (``[drivers.NAME]`` in the configuration,
:func:`mountd.access.name_refusal`) with EACCES, a name another live
connection holds with EBUSY, and the connection is closed; the pool is
unchanged. When the connection closes (the driver exited or crashed) or
stays silent longer than the timeout, the driver is revoked at once: its
segments leave the pool and exactly the blocks they held are dropped, and
its records are wiped. A reply to a report that shrank the share below its
records names the records wiped (``wiped``).
"""

import errno
import hmac
import logging
import time
from typing import Any

from mountd import access, peercred
from mountd.access import Binding, Kind
from mountd.peercred import Peer
from swapfs.cache import Grant, TransientCache
from swapfs.control import (
    DriverError,
    KeyExchange,
    RecordError,
    RecordKey,
    Records,
    check_message,
    encode_bytes,
)
from swapfs.engine import BLOCK_SIZE

log = logging.getLogger(__name__)

class Session:
    """One control connection's driver, once it registered."""

    def __init__(self, peer: Peer, kinds: frozenset[Kind] = frozenset()) -> None:
        self.name: str | None = None
        self.since = time.monotonic()
        self.last_message = self.since
        self.extents = 0
        self.processes = 0
        self.per_process_bytes = 0
        self.keeper_pid: int | None = None  # a standby holding the connection
        self.peer = peer  # who connected (mountd/peercred.py)
        self.kinds = kinds  # what it is (mountd/access.py), a registration aside
        #: The key the driver and the daemon agreed for its records.
        self.record_key: RecordKey | None = None


class DriverManager:
    """The drivers of one daemon, the pool they feed and their records."""

    def __init__(self, cache: TransientCache, timeout: float,
                 bindings: dict[str, Binding] | None = None) -> None:
        self.cache = cache
        self.timeout = timeout
        #: Driver names bound to one peer each (the configuration's [drivers]).
        self.bindings = bindings or {}
        self.sessions: dict[str, Session] = {}
        #: The drivers' sealed records, each in whole slots of the pool.
        self.records = Records(BLOCK_SIZE)

    def handle(self, session: Session, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one driver message on *session*'s connection."""
        checked = check_message(message)
        op, name, extents = checked.op, checked.driver, checked.extents
        if op == "driver.register":
            refused = access.name_refusal(name, session.peer, self.bindings)
            if refused is not None:
                raise DriverError(errno.EACCES, f"{session.peer} may not register: {refused}")
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
        if op.startswith("driver.secret."):
            return self._record(op, name, checked.record, checked.sealed)
        if op == "driver.stop":
            self.close(session, "stopped")
            return {}
        if extents is None:
            return {}
        pids = {extent.pid for extent in extents}
        foreign = peercred.foreign_process(session.peer, pids)
        if foreign is not None:
            raise DriverError(errno.EACCES, f"{session.peer} may report only its own "
                                            f"processes, not pid {foreign}")
        first = session.name is None
        reply: dict[str, Any] = {}
        if checked.public_key is not None:
            half = KeyExchange()
            try:
                session.record_key = half.agree(name, checked.public_key, half.public)
            except RecordError as exc:
                raise DriverError(exc.errno, str(exc)) from None
            reply["daemon_public_key"] = encode_bytes(half.public)
        wiped = self.records.wipe(name, self.cache.share_slots(name, extents))
        grant = self.cache.update(name, extents, self.records.slots(name))
        session.name = name
        self.sessions[name] = session
        session.extents = len(extents)
        session.processes = len(pids)
        session.per_process_bytes = sum(extent.length for extent in extents)
        if first:
            log.info("driver %s registered: %d extents, %d bytes; pool %d bytes", name,
                     len(extents), grant.capacity_bytes, self.cache.capacity_bytes)
        else:
            log.debug("driver %s updated: %d extents, %d bytes; pool %d bytes", name,
                      len(extents), grant.capacity_bytes, self.cache.capacity_bytes)
        if wiped:
            log.warning("driver %s: its share shrank; records wiped: %s", name,
                        ", ".join(wiped))
        return {**reply, **self._grant(grant, wiped)}

    def _grant(self, grant: Grant, wiped: list[str]) -> dict[str, Any]:
        return {"cache_id": grant.cache_id, "capacity_bytes": grant.capacity_bytes,
                "pool_capacity_bytes": self.cache.capacity_bytes, "token": grant.token,
                "wiped": wiped}

    def _record(self, op: str, driver: str, name: str | None, sealed: bytes | None
                ) -> dict[str, Any]:
        """A driver's own record: kept, returned (still sealed) or deleted.
        RecordError (no such record, no room) is an answer, not a fault: the
        connection stays open."""
        assert name is not None
        if op == "driver.secret.put":
            assert sealed is not None
            self._put(driver, name, sealed)
        elif op == "driver.secret.get":
            return {"sealed": encode_bytes(self.records.get(driver, name))}
        else:
            self._remove(driver, name)
        return self.records.stats(driver)

    def _put(self, driver: str, name: str, sealed: bytes) -> None:
        """Keep a sealed record in *driver*'s share (ENOSPC beyond it); the
        pool holds its slots back from the blocks."""
        self.records.put(driver, name, sealed, self.cache.share_slots(driver))
        self.cache.hold(driver, self.records.slots(driver))

    def _remove(self, driver: str, name: str) -> None:
        self.records.remove(driver, name)
        self.cache.hold(driver, self.records.slots(driver))

    def _key(self, driver: str) -> RecordKey:
        session = self.sessions.get(driver)
        if session is None:
            raise RecordError(errno.ENOENT, f"no driver {driver!r} is registered")
        if session.record_key is None:
            raise RecordError(errno.ENOKEY, f"driver {driver!r} agreed no record key "
                                            "when it registered")
        return session.record_key

    def host_put(self, driver: str, name: str, value: bytes) -> dict[str, int]:
        """The host shares *value* with *driver* as its record *name*."""
        self._put(driver, name, self._key(driver).seal(name, value))
        return self.records.stats(driver)

    def host_get(self, driver: str, name: str) -> bytes:
        """The value of *driver*'s record *name*, opened by the daemon."""
        return self._key(driver).open(name, self.records.get(driver, name))

    def host_rm(self, driver: str, name: str) -> dict[str, int]:
        self._remove(driver, name)
        return self.records.stats(driver)

    def close(self, session: Session, why: str) -> None:
        """*session*'s connection ended: revoke its driver, if it registered."""
        name = session.name
        if name is None or self.sessions.get(name) is not session:
            return
        del self.sessions[name]
        session.name = None
        session.record_key = None
        self.cache.revoke(name)
        wiped = self.records.wipe(name)
        log.info("driver %s revoked (%s); pool %d bytes%s", name, why,
                 self.cache.capacity_bytes,
                 f"; {len(wiped)} records wiped" if wiped else "")

    def stats(self) -> dict[str, Any]:
        """The pool's figures, each driver's with its records' and its session's."""
        pool = self.cache.stats()
        drivers = pool.pop("drivers")  # after record_slots, as the reply always had it
        report = {**pool, "record_slots": self.records.slots(), "drivers": drivers}
        now = time.monotonic()
        for name, entry in report["drivers"].items():
            entry.update(self.records.stats(name))
            session = self.sessions.get(name)
            if session is not None:
                entry.update(extents=session.extents, processes=session.processes,
                             per_process_bytes=session.per_process_bytes,
                             connected_seconds=round(now - session.since, 3),
                             idle_seconds=round(now - session.last_message, 3))
        report["driver_timeout"] = self.timeout
        return report
