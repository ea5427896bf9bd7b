"""The mount's lifetime: mount, serve FUSE and the control socket, unmount.

One trio run holds everything: pyfuse3's request loop, the control server
and a signal watcher, in one nursery. When the kernel unmounts the file
system (``swapfs umount``, ``fusermount3 -u``) or a SIGTERM/SIGINT
arrives, the loop ends, the nursery is cancelled, and the Volume is synced
and closed before the process exits.
"""

import hashlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from mountd.control import ControlServer
from swapfs.fs import Operations
from swapfs.volume import Volume

log = logging.getLogger(__name__)

#: Unix socket paths longer than this do not fit in sockaddr_un.
_SUN_PATH_MAX = 107


@dataclass
class MountOptions:
    state: Path
    mountpoint: str
    allow_other: bool = False
    debug_fuse: bool = False


def control_socket_path(state: Path) -> str:
    """Where the control socket of *state* lives: inside it if the path fits."""
    path = str(state / "control.sock")
    if len(path) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    os.makedirs("/run/swapfs", exist_ok=True)
    return f"/run/swapfs/{digest}.sock"


def fuse_options(options: MountOptions) -> set[str]:
    fuse = set(pyfuse3.default_options)
    fuse.add("fsname=swapfs")
    fuse.add("subtype=swapfs")
    if options.allow_other:
        fuse.add("allow_other")
    if options.debug_fuse:
        fuse.add("debug")
    return fuse


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _serve(volume: Volume, options: MountOptions, socket_path: str,
                 on_ready: Callable[[], None]) -> None:
    control = ControlServer(volume, options.mountpoint)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, socket_path)
        nursery.start_soon(_watch_signals)
        log.info("serving %s on %s", options.state, options.mountpoint)
        on_ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def run(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount, serve until unmounted or signalled, then close everything."""
    volume = Volume(options.state)
    try:
        socket_path = control_socket_path(options.state)
        ops = Operations(volume, control_socket=socket_path)
        pyfuse3.init(ops, options.mountpoint, fuse_options(options))
        try:
            trio.run(_serve, volume, options, socket_path, on_ready)
        except BaseException:
            log.exception("daemon failed")
            raise
        finally:
            pyfuse3.close(unmount=True)
    finally:
        volume.close()
        log.info("closed %s", options.state)
