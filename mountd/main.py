"""Entry point of the mount daemon, ``swapfs-mountd``.

Started by ``swapfs mount`` (which waits for the byte it writes to
``--ready-fd`` once the mount serves) or by systemd (``swapfs@.service``,
Type=notify). Settings come from ``--config`` and are overridden by flags;
see ``docs/configuration.md``.
"""

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from mountd.config import ConfigError, load
from mountd.daemon import harden, run
from mountd.logs import setup_logging
from mountd.takeover import handover
from swapfs.cli import spawn

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
    parser.add_argument("--key-file", help="the master key file (overrides the configuration's)")
    parser.add_argument("--no-encrypt", dest="encrypt", action="store_false", default=None,
                        help="serve (or create) an unencrypted state")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="write one byte to this fd once the mount serves")
    parser.add_argument("--adopt-fds", help=argparse.SUPPRESS)  # FUSE,MEMO: from a standby
    parser.add_argument("--death-noticed", type=float, help=argparse.SUPPRESS)
    # The standby that passes --adopt-fds: this process's parent, its keeper.
    parser.add_argument("--keeper-pid", type=int, help=argparse.SUPPRESS)
    # A spare: everything loaded, it waits on this pipe for the death time.
    parser.add_argument("--spare-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _adopted(value: str | None) -> tuple[int, int] | None:
    """The descriptors ``--adopt-fds FUSE,MEMO`` names."""
    if value is None:
        return None
    fuse_fd, memo_fd = (int(fd) for fd in value.split(","))
    return fuse_fd, memo_fd


def restart_args(args: argparse.Namespace, state: Path, mountpoint: str) -> list[str]:
    """The arguments that start a daemon like this one, paths resolved."""
    argv = ["--state", str(state), mountpoint]
    if args.config:
        argv += ["--config", str(args.config.resolve())]
    if args.allow_other:
        argv.append("--allow-other")
    if args.log_level:
        argv += ["--log-level", args.log_level]
    if args.content_cache_bytes is not None:
        argv += ["--content-cache-bytes", str(args.content_cache_bytes)]
    if args.key_file:
        argv += ["--key-file", os.path.abspath(args.key_file)]
    if args.encrypt is False:
        argv.append("--no-encrypt")
    return argv


def main(argv: list[str] | None = None) -> int:
    # Everything the daemon creates (logs, sockets, the state's files) is
    # its owner's alone: swapfs/engine/statedir.py.
    os.umask(0o077)
    args = parse_args(argv)
    try:
        config = load(args.config, {
            "state": args.state, "mountpoint": args.mountpoint,
            "allow_other": args.allow_other, "log_level": args.log_level,
            "content_cache_bytes": args.content_cache_bytes,
            "key_file": args.key_file, "encrypt": args.encrypt,
        })
    except ConfigError as exc:
        print(f"swapfs-mountd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    assert config.state is not None and config.mountpoint is not None
    config.state = config.state.resolve()
    adopt, kept_by = _adopted(args.adopt_fds), "standby"
    standby = None
    if adopt is not None:
        # Now, before a spare waits: its standby may die at any time after.
        standby_pid = args.keeper_pid if args.keeper_pid is not None else os.getppid()
        pidfd = handover.watch_standby(standby_pid)
        standby = None if pidfd is None else (standby_pid, pidfd)
    if adopt is None:
        adopt, kept_by = handover.from_systemd(), "systemd"
    if adopt is None:
        config.mountpoint = os.path.realpath(config.mountpoint)
    else:
        # Resolving the mount point itself would stat the mount, which waits
        # for a daemon: this one. Its parent is on another file system.
        config.mountpoint = os.path.join(os.path.realpath(os.path.dirname(config.mountpoint)),
                                         os.path.basename(config.mountpoint))

    def ready() -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, spawn.READY)
            os.close(args.ready_fd)
            args.ready_fd = -1

    def progress() -> None:
        """A step of a long start: whoever waits for it waits on (swapfs/cli/spawn.py)."""
        if args.ready_fd >= 0:
            with contextlib.suppress(OSError):  # no one waits any more: nothing to say
                os.write(args.ready_fd, spawn.PROGRESS)

    death_noticed = args.death_noticed
    if args.spare_fd is not None:
        # Locked before it waits: swapped out to the mount it is to serve, a
        # spare could not start when that mount's daemon dies.
        harden(config)
        with os.fdopen(args.spare_fd, "rb") as go:
            line = go.readline()
        if not line:
            return 0  # the standby is gone, or the mount ended: not needed
        death_noticed = float(line)
    try:
        run(config, ready, restart_args(args, config.state, config.mountpoint),
            (adopt, kept_by) if adopt else None, death_noticed, standby, progress)
    except Exception as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
