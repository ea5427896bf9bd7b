"""``swapfs-driver``: finds the unused space inside code pages on this host.

``swapfs-driver scan`` prints one scan (:mod:`swapfs.guest.codescan`) and needs no
daemon: the figures it prints are the capacity a transient cache could get
from this host.

``swapfs-driver run`` registers with a daemon and keeps its report current:
it rescans every interval and sends the new extents when they changed (a
process started or exited), a heartbeat otherwise. It reaches the daemon on
its host's control socket, or from inside a virtual machine over vsock or
the VM's channel (:mod:`swapfs.guest.transport`). Its connection is its
registration: when it stops it says so, and when it dies the daemon revokes
its share as soon as the connection closes (on a virtio-serial port, which
outlives it, once it was silent past the daemon's timeout). Protocol:
:mod:`swapfs.control.protocol` (the messages) and :mod:`mountd.drivers`
(what the daemon does with them).

While it runs, its *agent socket* (``/run/swapfs-driver/NAME.sock``, its
owner's alone) takes ``swapfs-driver secret put|get|rm NAME``: small records
the driver seals with the key it agreed with the daemon at registration and
keeps in its share of the pool (:mod:`swapfs.control.records`). Only the driver's
own user reaches the socket, and only the driver holds the key on this side,
so the records are its own. They live as long as its registration.
"""

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from swapfs.control import (
    MAX_SEALED,
    MAX_VALUE,
    DriverError,
    Extent,
    KeyExchange,
    RecordError,
    RecordKey,
    decode_bytes,
    encode_bytes,
    nodump,
    protocol,
)
from swapfs.guest.codescan import SKIP_REASONS, Scan, scan
from swapfs.guest.transport import PORT_NAME, Transport

log = logging.getLogger("swapfs-driver")

_EXAMPLES = """\
examples:
  swapfs-driver scan                      # every process on this host
  swapfs-driver scan --json --pid 1 812   # only these processes, as JSON
  swapfs-driver run --mount /mnt/swapfs   # register with that mount's daemon
  swapfs-driver run --name vm1 --port org.swapfs.driver   # in a QEMU guest
  swapfs-driver secret put db-password < file   # a record, while run runs
  swapfs-driver secret get db-password
"""
#: Where a running driver's agent socket is, by default (its name appended).
AGENT_DIR = Path("/run/swapfs-driver")
#: A driver's name unless given: the host's.
_DEFAULT_NAME = socket.gethostname()[:64] or "driver"
_AGENT_HELP = f"its agent socket (default: {AGENT_DIR}/NAME.sock)"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.2f} MiB"


def _print_scan(result: Scan) -> None:
    print(f"per process: {result.per_process_bytes} bytes ({_mib(result.per_process_bytes)})")
    print(f"physical:    {result.physical_bytes} bytes ({_mib(result.physical_bytes)})")
    print(f"processes: {result.processes}  executable mappings: {result.mappings}  "
          f"extents: {len(result.extents)}  page size: {result.page_size}")
    skipped = "  ".join(f"{reason}: {result.skipped[reason]}" for reason in SKIP_REASONS)
    print(f"skipped: {skipped}")


def _scan(args: argparse.Namespace) -> int:
    result = scan(args.pid)
    if args.json:
        json.dump(result.as_dict(), sys.stdout)
        print()
    else:
        _print_scan(result)
    return 0


class DriverFailed(Exception):
    """The daemon refused the driver or went away (*errno* says how; *lost*
    if it went away, or was never reached)."""

    def __init__(self, message: str, errno_: int = errno.EIO, lost: bool = False) -> None:
        super().__init__(message)
        self.errno = errno_
        self.lost = lost


#: A registration's requests refused with these: it is gone (not the driver refused).
_LOST = (errno.EACCES, errno.ETIMEDOUT)


class _Connection:
    """The driver's control connection: its registration while it is open.
    The report loop and the agent socket share it, one request at a time."""

    def __init__(self, transport: Transport, timeout: float, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        try:
            self.connection = transport.open(timeout, stop)
        except protocol.ControlError as exc:
            raise DriverFailed(str(exc), exc.errno, lost=True) from exc

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._lock:
                return self.connection.request(message)
        except protocol.ConnectionLost as exc:
            raise DriverFailed(f"lost the daemon: {exc}", exc.errno, lost=True) from exc
        except protocol.ControlError as exc:
            # Refused anything but a registration because the daemon no longer
            # knows it (a new daemon after a takeover, or revoked for its
            # silence): its registration is lost, not refused.
            lost = message["op"] != "driver.register" and exc.errno in _LOST
            raise DriverFailed(f"the daemon refused {message['op']}: {exc} "
                               f"(errno {exc.errno})", exc.errno, lost=lost) from exc

    def close(self) -> None:
        self.connection.close()


def report_extents(result: Scan) -> list[Extent]:
    """What to report: every extent, or one per physical extent if they are too many."""
    if len(result.extents) <= protocol.MAX_EXTENTS:
        return result.extents
    unique = list({extent.physical_key: extent for extent in result.extents}.values())
    if len(unique) > protocol.MAX_EXTENTS:
        log.warning("%d physical extents: reporting the first %d", len(unique),
                    protocol.MAX_EXTENTS)
    return unique[:protocol.MAX_EXTENTS]


def _log_grant(what: str, name: str, reply: dict[str, Any], extents: list[Extent]) -> None:
    log.info("%s %s: %d extents, share %d bytes, pool %d bytes (cache %s)", what, name,
             len(extents), reply["capacity_bytes"], reply["pool_capacity_bytes"],
             reply["cache_id"])
    if reply.get("wiped"):
        log.warning("the share shrank below the records: the daemon wiped %s",
                    ", ".join(reply["wiped"]))


def agent_path(name: str) -> Path:
    return AGENT_DIR / f"{name}.sock"


class Agent:
    """The running driver's own socket for ``swapfs-driver secret``.

    One JSON line a connection, as the control socket's: ``{"op": "put" |
    "get" | "rm", "name": N}`` (``"value"`` in base64 for put). Values are
    sealed and opened here, so only ciphertext goes to the daemon. Served
    one at a time, on a thread of its own; a peer of another user is
    refused (EACCES) even if the socket's mode were loosened.
    """

    def __init__(self, path: Path, driver: str, token: str, key: RecordKey,
                 connection: _Connection) -> None:
        self.path, self.driver, self.token = path, driver, token
        self.key, self.connection = key, connection
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket a driver of this name left when it died
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="agent", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(5.0)
                with contextlib.suppress(OSError):
                    reply = self._answer_client(client)
                    client.sendall(json.dumps(reply).encode() + b"\n")

    def _answer_client(self, client: socket.socket) -> dict[str, Any]:
        # Read before answering, even a refusal: closing with the request
        # unread would reset the connection, and lose the answer.
        line = client.makefile("rb").readline(protocol.MAX_LINE)
        _pid, uid, _gid = protocol.unix_peer(client)
        if uid != os.getuid():
            log.warning("agent: uid %d refused: the records are uid %d's", uid, os.getuid())
            return _failure(errno.EACCES, "permission denied: not this driver's user")
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a request is a JSON object")
            return {"ok": True, **self.answer(message)}
        except (ValueError, RecursionError) as exc:
            return _failure(errno.EINVAL, f"not a request: {exc}"[:200])
        except (DriverError, RecordError, DriverFailed) as exc:
            return _failure(exc.errno, str(exc))

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op not in ("put", "get", "rm"):
            raise DriverError(errno.EINVAL, "'op' must be put, get or rm")
        name = protocol.check_name(message.get("name"), "name")
        request = {"op": f"driver.secret.{op}", "driver": self.driver, "token": self.token,
                   "name": name}
        if op == "put":
            value = decode_bytes(message.get("value"), "value", MAX_VALUE)
            request["sealed"] = encode_bytes(self.key.seal(name, value))
        reply = self.connection.request(request)
        if op == "get":
            sealed = decode_bytes(reply.get("sealed"), "sealed", MAX_SEALED)
            return {"value": encode_bytes(self.key.open(name, sealed))}
        return {key: reply[key] for key in ("records", "record_bytes", "record_slots")}


def _failure(code: int, error: str) -> dict[str, Any]:
    return {"ok": False, "errno": code, "error": error}


#: Pause before a driver whose transport outlives the daemon registers again.
REDIAL_SECONDS = 1.0


def _transport(args: argparse.Namespace) -> Transport:
    if args.port:
        return Transport(port_device=args.port)
    if args.vsock is not None:
        return Transport(vsock_port=args.vsock)
    if args.vsock_listen is not None:
        return Transport(listen_port=args.vsock_listen)
    return Transport(socket_path=args.socket or protocol.socket_of(args.mount))


def _run(args: argparse.Namespace) -> int:
    nodump.forbid_core_dumps()  # it holds the key it agrees with the daemon
    transport = _transport(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            _registration(args, transport, stop)
            return 0
        except DriverFailed as exc:
            if not (transport.redials and exc.lost):
                raise
            log.warning("%s; registering again in %g s", exc, REDIAL_SECONDS)
        if stop.wait(REDIAL_SECONDS):
            return 0


def _registration(args: argparse.Namespace, transport: Transport, stop: threading.Event
                  ) -> None:
    """One registration: register, keep the report current until *stop* is
    set, then say the driver stops: on a virtio-serial port, which outlives
    the driver, that is how the daemon learns it at once."""
    connection = _Connection(transport, max(30.0, 2 * args.interval), stop)
    agent = None
    try:
        extents = report_extents(scan(args.pid))
        half = KeyExchange()
        reply = connection.request({"op": "driver.register", "driver": args.name,
                                    "extents": [asdict(extent) for extent in extents],
                                    "public_key": encode_bytes(half.public)})
        token = reply["token"]
        daemon_public = decode_bytes(reply["daemon_public_key"], "daemon_public_key", 32)
        key = half.agree(args.name, half.public, daemon_public)
        _log_grant("registered", args.name, reply, extents)
        agent = Agent(Path(args.agent) if args.agent else agent_path(args.name), args.name,
                      token, key, connection)
        while not stop.wait(args.interval):
            fresh = report_extents(scan(args.pid))
            if fresh != extents:
                extents = fresh
                reply = connection.request({
                    "op": "driver.update", "driver": args.name, "token": token,
                    "extents": [asdict(extent) for extent in extents]})
                _log_grant("updated", args.name, reply, extents)
            else:
                connection.request({"op": "driver.heartbeat", "driver": args.name,
                                    "token": token})
        with contextlib.suppress(DriverFailed):  # a daemon gone has nothing to revoke
            connection.request({"op": "driver.stop", "driver": args.name, "token": token})
    finally:
        if agent is not None:
            agent.close()
        connection.close()


def _secret(args: argparse.Namespace) -> int:
    """``secret put|get|rm NAME`` through the running driver's agent socket."""
    nodump.forbid_core_dumps()  # it holds a record's plaintext
    path = args.agent or str(agent_path(args.name))
    message: dict[str, Any] = {"op": args.action, "name": args.record}
    if args.action == "put":
        value = sys.stdin.buffer.read(MAX_VALUE + 1)
        if len(value) > MAX_VALUE:
            raise DriverFailed(f"a record holds at most {MAX_VALUE} bytes", errno.E2BIG)
        message["value"] = encode_bytes(value)
    try:
        reply = protocol.request(path, message)
    except protocol.ControlError as exc:
        raise DriverFailed(f"secret {args.action} {args.record}: {exc}", exc.errno) from exc
    if args.action == "get":
        sys.stdout.buffer.write(decode_bytes(reply["value"], "value", MAX_VALUE))
        sys.stdout.flush()
    return 0


def _interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be within (0, 3600] seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapfs-driver",
        description="Find the unused space inside the code pages of running processes.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="log every skipped entry")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], summary: str,
                description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description,
                                  epilog=_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    scan_parser = command(
        "scan", _scan, "print one scan, without any daemon",
        "Print the unused bytes of code pages: per process (every process counts its own "
        "mappings) and physical (a file mapped by many processes counted once), and what "
        "was skipped.")
    scan_parser.add_argument("--json", action="store_true",
                             help="print the totals and every extent as JSON")
    scan_parser.add_argument("--pid", type=int, nargs="+", metavar="PID",
                             help="scan only these processes (default: all)")
    run_parser = command(
        "run", _run, "register with a daemon and keep the report current",
        "Register this host's unused code-page space with a swapfs daemon and keep the "
        "report current as processes start and exit; the daemon revokes it as soon as this "
        "command exits.")
    where = run_parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the daemon's control socket")
    where.add_argument("--mount", help="a path on the daemon's mount")
    where.add_argument("--vsock", type=int, metavar="PORT",
                       help="in a guest: vsock to the host, where the daemon listens on PORT")
    where.add_argument("--port", metavar="NAME",
                       help="in a QEMU guest: the virtio-serial port of this name (or "
                            "device), whose host end the daemon dials "
                            f"(usually {PORT_NAME})")
    where.add_argument("--vsock-listen", type=int, metavar="PORT",
                       help="in a Firecracker or cloud-hypervisor guest: listen on vsock "
                            "PORT for the daemon, which connects through the VMM")
    run_parser.add_argument("--name", default=_DEFAULT_NAME,
                            help="this driver's name (default: the host name)")
    run_parser.add_argument("--interval", type=_interval, default=5.0,
                            help="seconds between rescans (default: 5)")
    run_parser.add_argument("--pid", type=int, nargs="+", metavar="PID",
                            help="scan only these processes (default: all)")
    run_parser.add_argument("--agent", help=_AGENT_HELP + ", for 'secret'")
    secret_parser = command(
        "secret", _secret, "keep, read or delete a sealed record in the running driver's share",
        "Keep a small confidential record (at most 4 KiB, from standard input), read it back "
        "(to standard output) or delete it, through the running driver of this name. Records "
        "are sealed with the key the driver agreed with the daemon, and last only as long as "
        "its registration.")
    secret_parser.add_argument("action", choices=("put", "get", "rm"))
    secret_parser.add_argument("record", metavar="NAME", help="the record's name")
    secret_parser.add_argument("--name", default=_DEFAULT_NAME,
                               help="the running driver's name (default: the host name)")
    secret_parser.add_argument("--agent", help=_AGENT_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = logging.WARNING if args.command == "scan" else logging.INFO
    logging.basicConfig(level=logging.DEBUG if args.debug else quiet,
                        format="swapfs-driver: %(message)s")
    try:
        return int(args.run(args))
    except (DriverFailed, protocol.ControlError) as exc:
        log.error("%s", exc)
        return 1
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
