"""Entry point of the mount daemon, ``swapfs-mountd``.

Usually started by ``swapfs mount``, which waits for its readiness signal:
the daemon writes one byte to the file descriptor given with
``--ready-fd`` once the mount serves requests.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from mountd.daemon import MountOptions, run

log = logging.getLogger("mountd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swapfs-mountd",
        description="Serve a swapfs state directory on a mount point (foreground).",
    )
    parser.add_argument("--state", required=True, type=Path, help="state directory")
    parser.add_argument("mountpoint")
    parser.add_argument("--allow-other", action="store_true",
                        help="let users other than the mounting one use the mount")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="write one byte to this fd once the mount serves")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )

    def ready() -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)

    options = MountOptions(state=args.state.resolve(), mountpoint=os.path.realpath(args.mountpoint),
                           allow_other=args.allow_other, debug_fuse=args.debug_fuse)
    try:
        run(options, ready)
    except Exception as exc:
        log.error("swapfs-mountd: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
