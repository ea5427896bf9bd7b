"""``swapfs standby MNT``: keep a mount's connection and replace its daemon.

The standby asks the daemon for its ``/dev/fuse`` descriptor and connection
memo (``keeper.attach``), then only waits: on the daemon's pidfd, and on the
control connection, whose end the daemon never causes while it lives. It
never reads the FUSE descriptor, so it takes no request away from the
daemon. When the daemon dies, by whatever cause, the kernel keeps the
connection alive because the standby holds it, and queues the requests of
every process using the mount; the standby starts a new daemon with both
descriptors (``--adopt-fds``), which replays the INIT, asks the kernel to
resend what the dead daemon had read, and serves on. Then it attaches to the
new daemon and waits again.

A daemon that exits because the file system was unmounted leaves an aborted
connection (the descriptor polls POLLERR): the standby exits too.

With ``--state DIR`` the standby stands in for a whole host: the state
directory sits on storage this host shares with the host that serves it,
fenced by that daemon's lease (:mod:`swapfs.engine.lease`). The standby watches
the lease; once it has lapsed (its holder stopped renewing: the host or its
daemon died) it mounts the state directory here, and the new daemon, which
takes the lease itself, warms its cache from the dead daemon's manifest
with the fail-over planner. A lease that was released (a clean unmount)
is not a failure: the standby goes on waiting. From then on the standby
keeps the new mount as above.

Exit codes: 0 the mount ended; 1 a failure (message on stderr and in the
log); 2 bad usage.
"""

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mountd import lifecycle
from mountd.logs import setup_logging
from mountd.takeover import handover
from swapfs.cli import spawn
from swapfs.control import nodump, protocol
from swapfs.engine import lease

log = logging.getLogger("mountd.takeover.standby")  # run as __main__

#: How long a starting daemon may go without a sign of progress before the
#: standby tries again. No fixed bound on the whole start: opening a state
#: takes time in proportion to what it stores, and the daemon reports each
#: step (swapfs/cli/spawn.py), so a large state is waited for while a hung one
#: is not.
START_STALL = 60.0
#: Longest sleep between two reads of a watched lease, in seconds.
LEASE_POLL = 1.0
#: Failed starts in a row after which the standby gives up.
MAX_FAILED_STARTS = 5


class StandbyError(Exception):
    """A failure to report as one line, exit code 1."""


def attach(socket_path: str) -> tuple[dict[str, Any], int, int, socket.socket]:
    """Become the keeper of the daemon behind *socket_path*.

    Returns the daemon's status, the (fuse, memo) descriptors, which the
    caller now owns, and the connection, to keep open while the daemon
    lives: its end tells the daemon its keeper is gone. A daemon that
    answers EAGAIN (every connection it serves taken; some are kept for
    root, so that is root's own clients) is asked again, backing off, for
    up to protocol.RETRY_SECONDS. Raises StandbyError when refused.
    """
    deadline = time.monotonic() + protocol.RETRY_SECONDS
    pause = 0.01
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(30)
            sock.connect(socket_path)
            # A refusal may come before the request is read: read it anyway.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps({"op": "keeper.attach"}).encode() + b"\n")
            data, fds = _receive(sock)
        except OSError as exc:
            sock.close()
            raise StandbyError(f"cannot reach the daemon at {socket_path}: {exc}") from exc
        try:
            reply = json.loads(data) if data else {"ok": False, "error": "the daemon hung up"}
        except ValueError:
            reply = {"ok": False, "error": "the daemon's reply was not JSON"}
        if reply.get("ok") and len(fds) == 2:
            sock.settimeout(None)
            return reply, fds[0], fds[1], sock
        sock.close()
        for fd in fds:
            os.close(fd)
        if reply.get("errno") != errno.EAGAIN or time.monotonic() + pause > deadline:
            raise StandbyError(reply.get("error", "the daemon sent no descriptors"))
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One reply line and the descriptors that came with it."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, ancillary, _flags, _addr = sock.recvmsg(protocol.MAX_LINE,
                                                       socket.CMSG_SPACE(2 * 4))
        fds += handover.fds_in(ancillary)
        if not chunk:
            break
        data += chunk
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, fds


def connection_alive(fuse_fd: int) -> bool:
    """Is the FUSE connection still up? After an unmount it polls POLLERR."""
    poller = select.poll()
    poller.register(fuse_fd, select.POLLIN)
    return not any(events & (select.POLLERR | select.POLLHUP)
                   for _fd, events in poller.poll(0))


def wait_for_exit(pid: int) -> float:
    """Block until process *pid* exits; return CLOCK_MONOTONIC at that moment."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.monotonic()
    try:
        select.select([pidfd], [], [])
        noticed = time.monotonic()
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):  # reap it if this standby started it
        os.waitpid(pid, os.WNOHANG)
    return noticed


class Spare:
    """The next daemon, started ahead: loaded, memory locked, waiting for a go.

    Starting Python and importing the daemon is most of a takeover's time,
    so the standby pays it while the daemon still lives. The spare blocks on
    a pipe; the standby writes the time it saw the daemon die, and the spare
    takes the connection over. If the standby dies, the pipe's end tells the
    spare to exit: it never holds the connection alone.
    """

    def __init__(self, status: dict[str, Any], fuse_fd: int, memo_fd: int) -> None:
        go_read, self._go = os.pipe()
        command = [*_adopting(status, fuse_fd, memo_fd), "--spare-fd", str(go_read)]
        try:
            self._starting = spawn.start(command, Path(status["state"]) / "daemon.log",
                                         (fuse_fd, memo_fd, go_read))
        finally:
            os.close(go_read)

    def take_over(self, noticed: float) -> None:
        """Tell the spare the daemon died; return once it serves."""
        try:
            os.write(self._go, f"{noticed!r}\n".encode())
        except BrokenPipeError as exc:
            raise StandbyError("the spare daemon was gone") from exc
        finally:
            os.close(self._go)
        _serving(self._starting)

    def dismiss(self) -> None:
        """Not needed (the mount ended): the spare exits at the pipe's end."""
        os.close(self._go)
        try:
            self._starting.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._starting.stop()


def _adopting(status: dict[str, Any], fuse_fd: int, memo_fd: int) -> list[str]:
    """The command of a daemon like the one of *status* that adopts the
    kept connection, with this standby as its keeper."""
    return [sys.executable, "-m", "mountd", *status["restart_argv"],
            "--adopt-fds", f"{fuse_fd},{memo_fd}", "--keeper-pid", str(os.getpid())]


def start_daemon(status: dict[str, Any], fuse_fd: int, memo_fd: int, noticed: float) -> None:
    """Start a daemon that adopts the connection from scratch; return once it serves."""
    command = [*_adopting(status, fuse_fd, memo_fd), "--death-noticed", repr(noticed)]
    _serving(spawn.start(command, Path(status["state"]) / "daemon.log", (fuse_fd, memo_fd)))


def _serving(starting: spawn.Starting) -> None:
    """Return once *starting* serves (``--ready-fd``); StandbyError if it
    exits first or stalls (START_STALL seconds with no progress)."""
    try:
        starting.wait_ready(START_STALL)
    except spawn.NotReady as exc:
        raise StandbyError(f"the new daemon did not serve ({exc})") from exc


def keep(mountpoint: str, on_attached: Any = None) -> int:
    """Keep *mountpoint*'s connection until the mount ends."""
    socket_path = protocol.socket_of(mountpoint)
    lock = _lock(Path(protocol.request(socket_path, {"op": "status"})["state"]))
    status, fuse_fd, memo_fd, link = attach(socket_path)
    log.info("keeping %s (daemon %d)", mountpoint, status["pid"])
    spare = Spare(status, fuse_fd, memo_fd)
    if on_attached is not None:
        on_attached()
    while True:
        noticed = wait_for_exit(status["pid"])
        link.close()
        if not connection_alive(fuse_fd):
            log.info("%s was unmounted; the standby exits", mountpoint)
            spare.dismiss()
            os.close(lock)
            return 0
        log.warning("daemon %d died; the spare takes over", status["pid"])
        status, link = replace(status, socket_path, fuse_fd, memo_fd, noticed, spare)
        spare = Spare(status, fuse_fd, memo_fd)
        log.info("daemon %d serves %s (takeover %s)", status["pid"], mountpoint,
                 status.get("last_takeover"))


def replace(status: dict[str, Any], socket_path: str, fuse_fd: int, memo_fd: int,
            noticed: float, spare: Spare) -> tuple[dict[str, Any], socket.socket]:
    """Have the spare take over the kept connection (or, if it fails, start
    daemons from scratch, a few times) and attach to the one that serves;
    return its status and the connection to it."""
    for attempt in range(1, MAX_FAILED_STARTS + 1):
        try:
            if attempt == 1:
                spare.take_over(noticed)
            else:
                start_daemon(status, fuse_fd, memo_fd, noticed)
            new_status, new_fuse, new_memo, link = attach(socket_path)
        except StandbyError as exc:
            log.error("%s (attempt %d of %d)", exc, attempt, MAX_FAILED_STARTS)
            time.sleep(min(2.0 ** attempt / 4, 5.0))
            continue
        os.close(new_fuse)  # the same connection as the descriptors held already
        os.close(new_memo)
        return new_status, link
    raise StandbyError(f"no daemon could take over {status['mountpoint']}; releasing the "
                       "connection: requests on it now fail (ENOTCONN) until it is "
                       "unmounted ('swapfs umount' or 'umount -l')")


def watch_lease(state: Path, mountpoint: str, config: Path | None,
                on_watching: Any = None) -> int:
    """Wait for the lease on *state* to lapse, then serve it on *mountpoint*."""
    info = lease.read_lease(state)  # LeaseCorrupt: an operator must look first
    if info is None:
        raise StandbyError(f"{state} has no lease: the daemon that serves it must run with "
                           "lease_seconds set for another host to take over")
    log.info("watching the lease on %s (holder %s on host %r)", state, info.holder_hex,
             info.host)
    if on_watching is not None:
        on_watching()
    while True:
        info = lease.read_lease(state)
        if info is None:
            raise StandbyError(f"the lease file of {state} was removed")
        wait = info.expires_in(time.time())
        if info.free or wait > 0:
            time.sleep(min(max(wait, 0.0) + 0.1, LEASE_POLL))
            continue
        log.warning("the lease of host %r on %s lapsed %.1f s ago: taking over",
                    info.host, state, -wait)
        command = [sys.executable, "-m", "mountd", "--state", str(state), mountpoint,
                   "--death-noticed", repr(time.monotonic())]
        if config is not None:
            command += ["--config", str(config)]
        try:
            _serving(spawn.start(command, state / "daemon.log"))
        except StandbyError as exc:
            log.error("%s; watching again", exc)
            continue
        return keep(mountpoint)


def _lock(state: Path) -> int:
    """One standby per state directory."""
    fd = os.open(state / "standby.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StandbyError(f"another standby keeps {state} already") from exc
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="swapfs standby",
        description="Hold a mount's FUSE connection and start a new daemon when its "
                    "daemon dies (stays in the foreground).",
        epilog="example: python -m mountd.takeover.standby /mnt/swapfs")
    parser.add_argument("mountpoint")
    parser.add_argument("--state", type=Path,
                        help="stand in for another host: when the lease on this shared "
                             "state directory lapses, mount it on MOUNTPOINT here")
    parser.add_argument("--config", type=Path,
                        help="with --state: the configuration of the daemon to start "
                             "(it must set lease_seconds)")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="write one byte to this fd once attached (or watching)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # Like the daemon: a standby swapped out to the mount it keeps could not
    # run when that mount's daemon dies, which is when it must.
    lifecycle.lock_memory()
    lifecycle.protect_from_oom(-1000)
    nodump.forbid_core_dumps()  # it holds the connection that carries the pages

    def ready() -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)

    try:
        if args.state is not None:
            config = args.config.resolve() if args.config else None
            return watch_lease(args.state.resolve(), os.path.realpath(args.mountpoint), config,
                               ready)
        return keep(os.path.realpath(args.mountpoint), ready)
    except lease.LeaseError as exc:
        log.error("%s", exc)
        return 1
    except protocol.ControlError as exc:
        log.error("%s", exc)
        return 1
    except StandbyError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("%s", exc if exc.errno != errno.ENOENT else f"{args.mountpoint}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
