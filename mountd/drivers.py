"""Drivers on the control socket: registration, reports, revocation.

A driver (``swapfs-driver run``) keeps one control connection open for as
long as it runs. The session belongs to that connection:

- ``{"op": "driver.register", "driver": NAME, "extents": [...]}`` reports
  the driver's extents and answers with its grant (cache id, the driver's
  share, the pool's capacity, an access token);
- ``{"op": "driver.update", "driver": NAME, "token": T, "extents": [...]}``
  replaces the report (processes started or exited) and answers the same;
- ``{"op": "driver.heartbeat", "driver": NAME, "token": T}`` says it is alive.

Every message is validated in full before the pool is touched: anything
malformed is refused with EINVAL, a wrong token with EACCES, a name another
live connection holds with EBUSY, and the connection is closed; the pool is
unchanged. When the connection closes (the driver exited or crashed) or
stays silent longer than the timeout, the driver is revoked at once: its
segments leave the pool and exactly the blocks they held are dropped.
"""

import errno
import hmac
import logging
import re
import time
from typing import Any

from mountd.peercred import Peer
from swapfs.guest.codescan import PAGE_SIZE, Extent
from swapfs.protocol import MAX_EXTENTS
from swapfs.transient import Grant, TransientCache

log = logging.getLogger(__name__)

#: A driver's name: short, printable, safe in logs.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_MAX_PATH = 4096
_MAX_DEVICE = 32
_MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
_MAX_U64 = (1 << 64) - 1
_EXTENT_KEYS = frozenset(("pid", "path", "device", "inode", "address", "length",
                          "segment", "part"))
_MESSAGE_KEYS = {
    "driver.register": frozenset(("op", "driver", "extents")),
    "driver.update": frozenset(("op", "driver", "token", "extents")),
    "driver.heartbeat": frozenset(("op", "driver", "token")),
}
OPS = frozenset(_MESSAGE_KEYS)


class DriverError(Exception):
    """A driver message refused; the connection is closed after the reply."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def _invalid(message: str) -> DriverError:
    return DriverError(errno.EINVAL, message)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(f"{what} must be an integer within {low}..{high}")
    return value


def _str(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= longest:
        raise _invalid(f"{what} must be a string of 1..{longest} characters")
    return value


def parse_extent(value: Any, index: int) -> Extent:
    """One reported extent, checked key by key."""
    what = f"extents[{index}]"
    if not isinstance(value, dict) or set(value) != _EXTENT_KEYS:
        raise _invalid(f"{what} must be an object with exactly the keys "
                       f"{', '.join(sorted(_EXTENT_KEYS))}")
    part = value["part"]
    if part not in ("head", "tail"):
        raise _invalid(f"{what}.part must be \"head\" or \"tail\"")
    return Extent(
        pid=_int(value["pid"], f"{what}.pid", 0, _MAX_PID),
        path=_str(value["path"], f"{what}.path", _MAX_PATH),
        device=_str(value["device"], f"{what}.device", _MAX_DEVICE),
        inode=_int(value["inode"], f"{what}.inode", 0, _MAX_U64),
        address=_int(value["address"], f"{what}.address", 0, _MAX_U64),
        length=_int(value["length"], f"{what}.length", 1, PAGE_SIZE),
        segment=_int(value["segment"], f"{what}.segment", 0, 0xFFFF),
        part=part,
    )


def parse_extents(value: Any) -> list[Extent]:
    if not isinstance(value, list) or len(value) > MAX_EXTENTS:
        raise _invalid(f"'extents' must be a list of at most {MAX_EXTENTS} extents")
    extents = [parse_extent(item, index) for index, item in enumerate(value)]
    lengths: dict[tuple[str, int, int, str], int] = {}
    for extent in extents:
        if lengths.setdefault(extent.physical_key, extent.length) != extent.length:
            raise _invalid(f"extents of {extent.device} inode {extent.inode} segment "
                           f"{extent.segment} {extent.part} disagree on their length")
    return extents


def check_message(message: dict[str, Any]) -> tuple[str, str, list[Extent] | None]:
    """(op, driver name, extents or None) of a driver message, or DriverError."""
    op = message.get("op")
    if op not in _MESSAGE_KEYS:
        raise _invalid(f"unknown driver op {op!r}"[:200])
    if set(message) != _MESSAGE_KEYS[op]:
        raise _invalid(f"{op} takes exactly the keys {', '.join(sorted(_MESSAGE_KEYS[op]))}")
    name = message["driver"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _invalid("'driver' must be 1..64 letters, digits or ._:@- "
                       "(starting with a letter or digit)")
    if "token" in message and not isinstance(message["token"], str):
        raise DriverError(errno.EACCES, "'token' must be the string register gave")
    extents = parse_extents(message["extents"]) if "extents" in message else None
    return op, name, extents


class Session:
    """One control connection's driver, once it registered."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.since = time.monotonic()
        self.last_message = self.since
        self.extents = 0
        self.processes = 0
        self.per_process_bytes = 0
        self.keeper_pid: int | None = None  # a standby holding the connection
        self.peer = Peer()  # who connected (mountd/peercred.py)


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
                raise _invalid(f"this connection is driver {session.name!r} already")
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
