"""The daemon's control socket: clones, priorities, statistics and status.

Requests are handled on the same trio thread as FUSE requests, and the
Volume calls they make have no checkpoint, so a clone is atomic with
respect to the I/O around it. Protocol: :mod:`swapfs.control.protocol`; drivers'
messages (``driver.*``): :mod:`mountd.drivers`; who may ask what:
:mod:`mountd.access`, checked for every request before it is dispatched;
how many connections each peer may hold: :mod:`mountd.limits`.

A connection refused (a peer not admitted, or past its bound) is answered
only after its first request line was read, or a short time passed: a
client that sends its request right after connecting then always reads
the refusal, instead of a broken pipe on its send.
"""

import contextlib
import errno
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from mountd import access, lifecycle, peercred
from mountd.drivers import DriverManager, Session
from mountd.limits import ConnectionLimits
from mountd.link import Link
from mountd.operations import Operations
from mountd.takeover import handover
from swapfs.control import (
    DRIVER_OPS,
    MAX_LINE,
    MAX_VALUE,
    DriverError,
    RecordError,
    check_name,
    decode_bytes,
    encode_bytes,
)
from swapfs.engine import BLOCK_SIZE, SwapfsError, Volume, compiled

log = logging.getLogger(__name__)

#: A standby asks for the connection's descriptors with this op; the reply
#: (the status, as JSON) carries them as SCM_RIGHTS. See mountd.takeover.handover.
KEEPER_ATTACH = "keeper.attach"
Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: A refused connection's first request line is read for at most this long,
#: and this many bytes, before the refusal is sent.
REFUSAL_READ_SECONDS = 1.0
REFUSAL_READ_BYTES = 65536
#: Refused connections whose first line is read at once; past that a refusal
#: is sent at once (a client that reads after a broken pipe still gets it).
MAX_REFUSING = 16


class BadRequest(Exception):
    """A request that is not valid JSON or lacks what its operation needs."""


class Refused(Exception):
    """A request its peer may not make (:mod:`mountd.access`): EACCES, and
    the connection is closed after the reply."""

    errno = errno.EACCES


def _string(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key!r} must be a non-empty string")
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # JSON allows lone surrogates (\ud800)
        raise BadRequest(f"{key!r} is not valid Unicode: {exc.reason}") from None
    return value


class ControlServer:
    """Answers control requests against one mounted Volume."""

    def __init__(self, volume: Volume, mountpoint: str, ops: Operations,
                 protections: dict[str, bool], drivers: DriverManager | None = None,
                 link: Link | None = None, idle_timeout: float = 60.0,
                 limits: ConnectionLimits | None = None,
                 vsock_cids: frozenset[int] = frozenset(),
                 group: int | None = None) -> None:
        self.volume = volume
        #: Seconds a connection that is neither a registered driver's nor a
        #: keeper's may stay silent; how many connections are served at once.
        self.idle_timeout = idle_timeout
        self.limits = limits if limits is not None else ConnectionLimits()
        self.refusing = 0  # refused connections whose first line is being read
        #: The guests (vsock CIDs) whose drivers are admitted (mountd/peercred.py).
        self.vsock_cids = vsock_cids
        #: The group (``control_group``) served besides root, if any.
        self.group = group
        self.drivers = drivers
        self.mountpoint = mountpoint
        self.ops = ops
        self.protections = protections
        self.link = link
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            "stats": self.stats,
            "clone": self.clone,
            "priority": self.priority,
            "secret": self.secret,
        }

    def status(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "state": str(self.volume.state),
                "mountpoint": self.mountpoint, "open_files": self.ops.open_files(),
                "compiled": compiled.loaded(),
                **self.protections,
                **(self.link.status() if self.link is not None else {})}

    def attach_keeper(self, peer_pid: int) -> list[int]:
        """Make the standby *peer_pid* this connection's keeper; return the
        descriptors it must hold (``/dev/fuse`` and the connection memo):
        :meth:`Link.attach_standby`."""
        if self.link is None:
            raise SwapfsError(errno.ENOTSUP, "this mount was made by libfuse "
                                             "and cannot be taken over")
        fds = self.link.attach_standby(peer_pid)
        log.info("standby %d keeps the connection", peer_pid)
        return fds

    def detach_keeper(self, peer_pid: int) -> None:
        """The standby *peer_pid* is gone (its connection ended, or it died)."""
        if self.link is not None and self.link.detach_standby(peer_pid):
            log.warning("standby %d went away: a daemon failure now ends the mount", peer_pid)

    def stats(self, message: dict[str, Any]) -> dict[str, Any]:
        report = self.volume.stats()
        report["memory"] = lifecycle.memory(report["index"]["stored_blocks"] * BLOCK_SIZE)
        report["requests"] = dict(self.ops.requests)
        report["write_blocks"] = {str(blocks): count for blocks, count
                                  in sorted(self.ops.write_blocks.items())}
        if self.drivers is not None:
            named = report.get("transient_cache", {}).get("chains", {})
            report["transient_cache"] = {**self.drivers.stats(), "chains": named}
        return report

    def clone(self, message: dict[str, Any]) -> dict[str, Any]:
        source = self.volume.resolve(_string(message, "source"))
        parent_path, _, name = _string(message, "target").strip("/").rpartition("/")
        parent = self.volume.resolve(parent_path)
        empty = message.get("empty", False)
        if not isinstance(empty, bool):
            raise BadRequest("'empty' must be true or false")
        inode = self.volume.clone(source.ino, parent.ino, os.fsencode(name), empty=empty)
        log.info("cloned %s to %s%s", message["source"], message["target"],
                 " (empty)" if empty else "")
        return {"ino": inode.ino, "size": inode.size}

    def secret(self, message: dict[str, Any]) -> dict[str, Any]:
        """The host's side of a driver's sealed records (``swapfs secret``):
        ``action`` put (``value``, base64), get or rm of record ``name`` of
        the registered driver ``driver``."""
        if self.drivers is None:
            raise SwapfsError(errno.ENOTSUP, "this daemon takes no drivers")
        action = message.get("action")
        try:
            driver = check_name(message.get("driver"), "driver")
            name = check_name(message.get("name"), "name")
            value = (decode_bytes(message.get("value"), "value", MAX_VALUE)
                     if action == "put" else b"")
        except DriverError as exc:
            raise BadRequest(str(exc)) from None
        try:
            if action == "put":
                figures = self.drivers.host_put(driver, name, value)
                log.info("record %s shared with driver %s", name, driver)
                return figures
            if action == "get":
                return {"value": encode_bytes(self.drivers.host_get(driver, name))}
            if action == "rm":
                return self.drivers.host_rm(driver, name)
        except RecordError as exc:
            raise SwapfsError(exc.errno, str(exc)) from None
        raise BadRequest("'action' must be put, get or rm")

    def priority(self, message: dict[str, Any]) -> dict[str, Any]:
        """A file's priority; with ``"priority": N``, set it first."""
        inode = self.volume.resolve(_string(message, "path"))
        if "priority" in message:
            value = message["priority"]
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest("'priority' must be an integer")
            self.volume.set_priority(inode.ino, value)
            log.info("priority of %s set to %d", message["path"], value)
        return {"priority": self.volume.priority(inode.ino)}

    def answer(self, message: dict[str, Any], session: Session) -> dict[str, Any]:
        """The reply to one request that :func:`authorize` let through (raises
        BadRequest for malformed ones, DriverError for refused driver messages)."""
        op = message["op"]
        if op in DRIVER_OPS:
            if self.drivers is None:
                raise DriverError(errno.ENOTSUP, "this daemon takes no drivers")
            try:
                return {"ok": True, **self.drivers.handle(session, message)}
            except RecordError as exc:  # an answer: the driver stays connected
                return {"ok": False, "errno": exc.errno, "error": str(exc)}
            except (DriverError, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # a bug must not take the mount down with it
                log.exception("driver message %r failed", op)
                raise DriverError(errno.EIO, f"internal error: {exc}") from exc
        try:
            return {"ok": True, **self.handlers[op](message)}
        except SwapfsError as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}
        except (BadRequest, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug must not take the mount down with it
            log.exception("control request %r failed", op)
            return {"ok": False, "errno": errno.EIO, "error": f"internal error: {exc}"}

    async def serve_client(self, stream: trio.SocketStream) -> None:
        try:
            peer = peercred.of_socket(stream.socket)
        except OSError as exc:  # gone before it could be asked who it is
            log.warning("control connection closed: its peer is unknown (%s)", exc)
            await stream.aclose()
            return
        await self.serve_peer(stream, peer)

    async def serve_peer(self, stream: trio.SocketStream, peer: peercred.Peer) -> None:
        """Serve one connection of *peer*, whose identity the caller
        established (the kernel's credentials, or the channel it dialed)."""
        kinds = access.kinds_of(peer, self.vsock_cids, self.group)
        refused = access.connection_refusal(peer, kinds, self.group)
        if refused is not None:
            log.warning("control connection of %s refused: %s", peer, refused)
            await self._refuse(stream, errno.EACCES, f"permission denied: {refused}")
            return
        busy = self.limits.refusal(peer)
        if busy is not None:
            # Refused, so that a flood of connections cannot take the
            # descriptors that requests and data files need; clients retry.
            log.debug("control connection of %s refused: %s", peer, busy)
            await self._refuse(stream, errno.EAGAIN, f"{busy}: try again")
            return
        self.limits.add(peer)
        session = Session(peer, kinds)
        try:
            await self._serve_client(stream, session)
        finally:
            self.limits.remove(peer)
            if self.drivers is not None and session.name is not None:
                self.drivers.close(session, "disconnected")
                # What its messages took goes back to the system.
                lifecycle.trim_heap(self.protections.get("memory_locked", False))
            if session.keeper_pid is not None:
                self.detach_keeper(session.keeper_pid)

    def _deadline(self, session: Session) -> float:
        """When the connection's silence ends it (time.monotonic())."""
        if session.keeper_pid is not None:
            return math.inf  # a standby holds the connection to see the daemon die
        if self.drivers is not None and session.name is not None:
            return session.last_message + self.drivers.timeout
        return session.last_message + self.idle_timeout

    async def _serve_client(self, stream: trio.SocketStream, session: Session) -> None:
        async with stream:
            buffer = b""
            while True:
                # A registered driver that stays silent past its timeout is
                # revoked; any other client's connection is closed.
                try:
                    with trio.move_on_at(_trio_deadline(self._deadline(session))) as scope:
                        data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if scope.cancelled_caught:
                    if self.drivers is not None and session.name is not None:
                        self.drivers.close(session, "silent past the timeout")
                        # Told: its next request reads this.
                        await _send(stream, {"ok": False, "errno": errno.ETIMEDOUT,
                                             "error": "driver revoked: silent past the "
                                                      "timeout; its share and records "
                                                      "are gone"})
                    return
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue  # a driver ending what a predecessor half-wrote
                    if not await self._request(stream, session, line):
                        return
                if len(buffer) > MAX_LINE:
                    await _send(stream, {"ok": False, "errno": errno.E2BIG,
                                         "error": "request too long"})
                    return

    async def _request(self, stream: trio.SocketStream, session: Session, line: bytes) -> bool:
        """Answer one request line; False if the connection must end.

        A method of its own so that the request, parsed, is let go once
        answered: a driver's report can take megabytes, and its connection
        stays open for as long as the driver runs."""
        try:
            message = parse(line)
            action = authorize(message, session)
            # Only a request its peer may make keeps the connection alive.
            session.last_message = time.monotonic()
            if action == KEEPER_ATTACH:
                await self._attach(stream, session)
                return True
            reply = self.answer(message, session)
        except BadRequest as exc:
            log.warning("bad control request of %s: %s", session.peer, exc)
            await _send(stream, {"ok": False, "errno": errno.EINVAL, "error": str(exc)})
            return False
        except Refused as exc:
            await _send(stream, {"ok": False, "errno": exc.errno, "error": str(exc)})
            return False
        except DriverError as exc:
            log.warning("driver message of %s refused: %s", session.peer, exc)
            await _send(stream, {"ok": False, "errno": exc.errno, "error": str(exc)})
            return False
        await _send(stream, reply)
        return True

    async def _attach(self, stream: trio.SocketStream, session: Session) -> None:
        """Answer ``keeper.attach`` (root's alone: :func:`authorize` made
        sure of it): the reply carries the descriptors."""
        peer_pid = session.peer.pid
        assert peer_pid is not None  # root is a Unix peer
        try:
            fds = self.attach_keeper(peer_pid)
        except SwapfsError as exc:
            await _send(stream, {"ok": False, "errno": exc.errno, "error": str(exc)})
            return
        session.keeper_pid = peer_pid
        reply = json.dumps({"ok": True, **self.status({})}).encode() + b"\n"
        with contextlib.suppress(OSError):  # a standby gone already: it detaches below
            await stream.socket.sendmsg([reply], handover.rights(fds))

    async def _refuse(self, stream: trio.SocketStream, code: int, error: str) -> None:
        """Answer a connection's first request *code*, and close it.

        The request is read first (up to REFUSAL_READ_BYTES, for up to
        REFUSAL_READ_SECONDS): closed with it unread, the connection would
        make the client's send fail with a broken pipe, or its read with a
        reset, as often as not before it read the answer. At most
        MAX_REFUSING connections wait so; others are answered at once."""
        async with stream:
            if self.refusing < MAX_REFUSING:
                self.refusing += 1
                try:
                    with trio.move_on_after(REFUSAL_READ_SECONDS):
                        await _first_line(stream)
                finally:
                    self.refusing -= 1
            await _send(stream, {"ok": False, "errno": code, "error": error})

    async def serve(self, path: str, *, task_status: trio.TaskStatus[None]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the Unix socket *path* until cancelled; remove it
        afterwards, unless another daemon has bound that path since (one that
        took the state over, on another host sharing the state directory)."""
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        bound = os.stat(path).st_ino
        if self.group is None:
            os.chmod(path, 0o600)
        else:
            os.chown(path, -1, self.group)
            os.chmod(path, 0o660)
        sock.listen(socket.SOMAXCONN)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self.serve_client, [listener])
        finally:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == bound:
                    os.unlink(path)

    async def serve_vsock(self, port: int, *, task_status: trio.TaskStatus[None]
                          = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on AF_VSOCK *port* (any CID) until cancelled: how a driver
        inside a virtual machine reaches the daemon on its host."""
        sock = trio.socket.socket(socket.AF_VSOCK, trio.socket.SOCK_STREAM)
        await sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(socket.SOMAXCONN)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.serve_client, [listener])


def authorize(message: dict[str, Any], session: Session) -> str:
    """The action *message* asks for, once it is sure *session*'s peer may
    ask it (:data:`mountd.access.PERMISSIONS`): BadRequest for an unknown
    op, Refused, logged with the peer, for one it may not ask."""
    action = access.action_of(message)
    if action is None:
        raise BadRequest(f"unknown op {message.get('op')!r}"[:200])
    kinds = session.kinds | ({access.Kind.DRIVER} if session.name is not None
                             else frozenset())
    if not access.allowed(action, kinds):
        who = ", ".join(sorted(kind.value for kind in access.PERMISSIONS[action]))
        log.warning("%s of %s refused: it is for %s only", action, session.peer, who)
        raise Refused(f"permission denied: {action} is for {who} only")
    return action


def parse(line: bytes) -> dict[str, Any]:
    """A request line as a JSON object, or BadRequest."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers;
        # RecursionError deeply nested arrays or objects.
        raise BadRequest(f"not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise BadRequest("a request is a JSON object")
    return message


def vsock_available() -> bool:
    """Does this kernel offer AF_VSOCK?"""
    return hasattr(socket, "AF_VSOCK") and os.path.exists("/dev/vsock")


def _trio_deadline(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on trio's clock."""
    if monotonic_deadline == math.inf:
        return math.inf
    return trio.current_time() + (monotonic_deadline - time.monotonic())


async def _first_line(stream: trio.SocketStream) -> None:
    """Read until a newline, REFUSAL_READ_BYTES or the end of the stream."""
    received = 0
    with contextlib.suppress(trio.BrokenResourceError):
        while received < REFUSAL_READ_BYTES:
            data = await stream.receive_some(REFUSAL_READ_BYTES - received)
            if not data or b"\n" in data:
                return
            received += len(data)


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(json.dumps(reply).encode() + b"\n")
