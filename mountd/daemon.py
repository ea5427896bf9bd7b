"""The mount's lifetime: harden, mount, serve FUSE and the control socket, unmount.

One trio run holds everything: pyfuse3's request loop, the control server
and a signal watcher, in one nursery. When the kernel unmounts the file
system (``swapfs umount``, ``fusermount3 -u``) the loop ends, the nursery is
cancelled, and the Volume is synced and closed before the process exits.
SIGTERM and SIGINT unmount too, but only while no file is open: a daemon
that went away under an active swap area would take the swapped-out pages
of every process using it with it.
"""

import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from mountd import lifecycle
from mountd.cachekeeper import CacheKeeper
from mountd.config import Config
from mountd.control import ControlServer, vsock_available
from mountd.drivers import DriverManager
from swapfs.blocks import BLOCK_SIZE
from swapfs.cache import BlockCache
from swapfs.control import SOURCE_PREFIX
from swapfs.fs import Operations
from swapfs.transient import TransientCache
from swapfs.volume import Volume

log = logging.getLogger(__name__)

#: Unix socket paths longer than this do not fit in sockaddr_un.
_SUN_PATH_MAX = 107


def control_socket_path(state: Path) -> str:
    """Where the control socket of *state* lives: inside it if the path fits.

    The path also goes into the mount's source (a FUSE mount option), where
    commas and white space would need escaping; such paths move to /run too.
    """
    path = str(state / "control.sock")
    if len(path) <= _SUN_PATH_MAX and not any(c in path for c in ", \t\n\\"):
        return path
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    os.makedirs("/run/swapfs", exist_ok=True)
    return f"/run/swapfs/{digest}.sock"


def fuse_options(config: Config, socket_path: str) -> set[str]:
    options = set(pyfuse3.default_options)
    options.add(f"fsname={SOURCE_PREFIX}{socket_path}")
    options.add("subtype=swapfs")
    if config.allow_other:
        options.add("allow_other")
    return options


def harden(config: Config) -> dict[str, bool]:
    """Apply the memory-pressure protections the configuration asks for."""
    return {
        "memory_locked": config.lock_memory and lifecycle.lock_memory(),
        "io_flusher": config.io_flusher and lifecycle.set_io_flusher(),
        "oom_protected": lifecycle.protect_from_oom(config.oom_score_adj),
    }


async def _watch_signals(ops: Operations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            busy = ops.open_files()
            if busy:
                log.error("%s: refusing to unmount while %d file(s) are open "
                          "(swapoff and detach their loop devices first)", name, busy)
                continue
            log.info("%s: unmounting", name)
            lifecycle.sd_notify("STOPPING=1")
            pyfuse3.terminate()
            return


async def _serve(control: ControlServer, ops: Operations, socket_path: str,
                 vsock_port: int, on_ready: Callable[[], None], keeper: CacheKeeper) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await nursery.start(control.serve, socket_path)
        if vsock_port and not vsock_available():
            log.warning("vsock_port %d: this kernel offers no AF_VSOCK", vsock_port)
        elif vsock_port:
            try:
                await nursery.start(control.serve_vsock, vsock_port)
                log.info("drivers may connect on vsock port %d", vsock_port)
            except OSError as exc:
                log.warning("vsock port %d: %s", vsock_port, exc)
        nursery.start_soon(_watch_signals, ops)
        log.info("serving %s on %s", control.volume.state, control.mountpoint)
        on_ready()
        lifecycle.sd_notify("READY=1")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def run(config: Config, on_ready: Callable[[], None]) -> None:
    """Mount, serve until unmounted or signalled, then close everything."""
    assert config.state is not None and config.mountpoint is not None
    if not hasattr(pyfuse3.Operations, "fallocate"):
        log.warning("this pyfuse3 has no fallocate operation: discards free nothing "
                    "(install swapfs with tools/setup.sh; see docs/pyfuse3-patch.md)")
    protections = harden(config)
    volume = Volume(config.state)
    try:
        socket_path = config.control_socket or control_socket_path(config.state)
        # The pool lives in this process's memory, locked with the rest by harden().
        cache = TransientCache(config.transient_cache_max_bytes)
        # 0 (or under one block) disables either cache.
        content = BlockCache(range(config.content_cache_bytes // BLOCK_SIZE))
        volume.use_caches(pool=cache if cache.max_slots else None,
                          content=content if content.capacity_bytes else None)
        keeper = CacheKeeper(volume, volume.content_cache, config.manifest_interval)
        drivers = DriverManager(cache, config.driver_timeout)
        ops = Operations(volume)
        control = ControlServer(volume, config.mountpoint, ops, protections, drivers)
        pyfuse3.init(ops, config.mountpoint, fuse_options(config, socket_path))
        try:
            trio.run(_serve, control, ops, socket_path, config.vsock_port, on_ready, keeper)
        except BaseException:
            log.exception("daemon failed")
            raise
        finally:
            lifecycle.sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            keeper.write()
    finally:
        volume.close()
        log.info("closed %s", config.state)
