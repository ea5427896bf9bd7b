"""Entry point of the mount daemon, ``swapfs-mountd``.

Started by ``swapfs mount`` (which waits for the byte it writes to
``--ready-fd`` once the mount serves) or by systemd (``swapfs@.service``,
Type=notify). Settings come from ``--config`` and are overridden by flags;
see ``docs/configuration.md``.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from mountd.config import ConfigError, load
from mountd.daemon import run
from mountd.logs import setup_logging

log = logging.getLogger("mountd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swapfs-mountd",
        description="Serve a swapfs state directory on a mount point (stays in the "
                    "foreground).",
        epilog="example: swapfs-mountd --config /etc/swapfs/main.toml",
    )
    parser.add_argument("mountpoint", nargs="?", help="overrides the configuration's")
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--state", help="state directory (overrides the configuration's)")
    parser.add_argument("--allow-other", action="store_true", default=None,
                        help="let users other than the mounting one use the mount")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--content-cache-bytes", type=int,
                        help="the content cache's budget of host memory; 0 disables it")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="write one byte to this fd once the mount serves")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config, {
            "state": args.state, "mountpoint": args.mountpoint,
            "allow_other": args.allow_other, "log_level": args.log_level,
            "content_cache_bytes": args.content_cache_bytes,
        })
    except ConfigError as exc:
        print(f"swapfs-mountd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    assert config.state is not None and config.mountpoint is not None
    config.state = config.state.resolve()
    config.mountpoint = os.path.realpath(config.mountpoint)

    def ready() -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)

    try:
        run(config, ready)
    except Exception as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
