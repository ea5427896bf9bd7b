"""``swapfs-driver``: finds the unused space inside code pages on this host.

``swapfs-driver scan`` prints one scan (:mod:`swapfs.codescan`) and needs no
daemon: the figures it prints are the capacity a transient cache could get
from this host.
"""

import argparse
import json
import logging
import os
import sys

from swapfs.codescan import SKIP_REASONS, Scan, scan

_EXAMPLES = """\
examples:
  swapfs-driver scan                      # every process on this host
  swapfs-driver scan --json --pid 1 812   # only these processes, as JSON
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="swapfs-driver: %(message)s")
    try:
        return int(args.run(args))
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
