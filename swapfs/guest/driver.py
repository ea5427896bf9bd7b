"""``swapfs-driver``: finds the unused space inside code pages on this host.

``swapfs-driver scan`` prints one scan (:mod:`swapfs.guest.codescan`) and needs no
daemon: the figures it prints are the capacity a transient cache could get
from this host.

``swapfs-driver run`` registers with a daemon on its control socket and keeps
its report current: it rescans every interval and sends the new extents when
they changed (a process started or exited), a heartbeat otherwise. Its
connection is its registration: when it exits, however it exits, the daemon
revokes its share at once. Protocol: :mod:`swapfs.protocol` (the messages)
and :mod:`mountd.drivers` (what the daemon does with them).
"""

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict
from types import FrameType
from typing import Any

from swapfs import protocol
from swapfs.guest.codescan import SKIP_REASONS, Scan, scan
from swapfs.protocol import Extent

log = logging.getLogger("swapfs-driver")

_EXAMPLES = """\
examples:
  swapfs-driver scan                      # every process on this host
  swapfs-driver scan --json --pid 1 812   # only these processes, as JSON
  swapfs-driver run --mount /mnt/swapfs   # register with that mount's daemon
"""


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
    """The daemon refused the driver or went away."""


class _Connection:
    """The driver's control connection: its registration while it is open."""

    def __init__(self, path: str, timeout: float) -> None:
        try:
            self.connection = protocol.Connection(path, timeout)
        except protocol.ControlError as exc:
            raise DriverFailed(str(exc)) from exc

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.connection.request(message)
        except protocol.ConnectionLost as exc:
            raise DriverFailed(f"lost the daemon: {exc}") from exc
        except protocol.ControlError as exc:
            raise DriverFailed(f"the daemon refused {message['op']}: {exc} "
                               f"(errno {exc.errno})") from exc

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


def _run(args: argparse.Namespace) -> int:
    path = args.socket or protocol.socket_of(args.mount)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    connection = _Connection(path, timeout=max(30.0, 2 * args.interval))
    try:
        extents = report_extents(scan(args.pid))
        reply = connection.request({"op": "driver.register", "driver": args.name,
                                    "extents": [asdict(extent) for extent in extents]})
        token = reply["token"]
        _log_grant("registered", args.name, reply, extents)
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
    finally:
        connection.close()
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
    scan_parser = commands.add_parser(
        "scan", help="print one scan, without any daemon",
        description="Print the unused bytes of code pages: per process (every process counts "
                    "its own mappings) and physical (a file mapped by many processes counted "
                    "once), and what was skipped.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    scan_parser.add_argument("--json", action="store_true",
                             help="print the totals and every extent as JSON")
    scan_parser.add_argument("--pid", type=int, nargs="+", metavar="PID",
                             help="scan only these processes (default: all)")
    scan_parser.set_defaults(run=_scan)
    run_parser = commands.add_parser(
        "run", help="register with a daemon and keep the report current",
        description="Register this host's unused code-page space with a swapfs daemon and "
                    "keep the report current as processes start and exit; the daemon "
                    "revokes it as soon as this command exits.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = run_parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the daemon's control socket")
    where.add_argument("--mount", help="a path on the daemon's mount")
    run_parser.add_argument("--name", default=socket.gethostname()[:64] or "driver",
                            help="this driver's name (default: the host name)")
    run_parser.add_argument("--interval", type=_interval, default=5.0,
                            help="seconds between rescans (default: 5)")
    run_parser.add_argument("--pid", type=int, nargs="+", metavar="PID",
                            help="scan only these processes (default: all)")
    run_parser.set_defaults(run=_run)
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
