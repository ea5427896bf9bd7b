"""The mount's lifetime: harden, mount, serve FUSE and the control socket, unmount.

The daemon either mounts (opening ``/dev/fuse`` itself, so that a keeper
can hold the connection: :mod:`mountd.takeover.fusedev`,
:mod:`mountd.takeover.handover`) or takes over a connection whose daemon
died (``--adopt-fds`` from a standby, ``$LISTEN_FDS`` from systemd):
docs/takeover.md.

One trio run holds everything: pyfuse3's request loop, the control server,
a signal watcher, the cache manifest, the hole punching of slots that stayed
free and, where configured, the lease renewal, in one nursery. When the
kernel unmounts the file system (``swapfs umount``, ``fusermount3 -u``) the
loop ends, the nursery is cancelled, and the Volume is closed (what is still
pending punched, everything synced) before the process exits. SIGTERM and
SIGINT unmount too, but only while no file is open: a daemon that went away
under an active swap area would take the swapped-out pages of every process
using it with it, unless a keeper holds the mount. A daemon that fails while
kept leaves the mount (and its lease) to the next.
"""

import errno
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import pyfuse3
import trio

from mountd import channels, lifecycle, peercred
from mountd.cachekeeper import CacheKeeper
from mountd.config import Config
from mountd.controlserver import ControlServer, vsock_available
from mountd.drivers import DriverManager
from mountd.limits import ConnectionLimits
from mountd.link import Link, Takeover
from mountd.operations import Operations
from mountd.takeover import fusedev, handover
from mountd.takeover.memo import ConnectionMemo
from swapfs.cache import BlockCache, TransientCache
from swapfs.cli import mountcheck
from swapfs.control import SOURCE_PREFIX, nodump
from swapfs.engine import BLOCK_SIZE, SwapfsError, Volume, compiled, keys, lease

log = logging.getLogger(__name__)

#: Unix socket paths longer than this do not fit in sockaddr_un.
_SUN_PATH_MAX = 107

#: Seconds between two checkpoints (when anything was committed) and rounds
#: of hole punching: a power cut loses at most this much of what was not
#: fsynced, and a freed slot that no new block took within one to two of
#: them gives its disk space back.
PUNCH_INTERVAL = 1.0
#: Slots punched between two checkpoints of the trio loop. Each run of
#: consecutive slots is one fallocate (0.05 to 0.2 ms on the machine of
#: docs/benchmarks.md), so a batch of scattered slots holds requests up for a
#: few milliseconds at most.
PUNCH_BATCH = 32
#: Runs of a slot table scanned between two checkpoints of the loop (about
#: 2,700 slots, 2 to 4 ms that a request may wait), the seconds after the
#: start before the scan begins (a takeover's resent requests and first
#: reads come first), and the seconds between two looks for a table that
#: needs a scan once all are done.
SCAN_RUNS = 16
SCAN_DELAY = 1.0
SCAN_INTERVAL = 0.01
#: Seconds between two unlockings of the state's mapped files (a seal file
#: mapped anew as it grows is locked until then).
UNLOCK_INTERVAL = 5.0
#: The resident bytes of mapped files (the state's, and the daemon's
#: libraries, about 27 MiB) past which the state's are unmapped from its
#: page tables: a takeover waits for a killed daemon's mappings to go.
FILE_PAGES_KEPT = 64 << 20


def control_socket_path(state: Path, shared: bool = False) -> str:
    """Where the control socket of *state* lives: inside it if the path fits.

    The path also goes into the mount's source (a FUSE mount option), where
    commas and white space would need escaping; such paths move to /run too.
    So does the socket of a daemon that serves a group besides root
    (*shared*): the state directory is root's alone, /run/swapfs may be
    entered by all, and the socket itself is 0660.
    """
    path = str(state / "control.sock")
    if (not shared and len(path) <= _SUN_PATH_MAX
            and not any(c in path for c in ", \t\n\\")):
        return path
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    os.makedirs("/run/swapfs", exist_ok=True)
    if shared:
        os.chmod("/run/swapfs", 0o755)
    return f"/run/swapfs/{digest}.sock"


def libfuse_options(config: Config, socket_path: str) -> set[str]:
    """Options for libfuse's own mount, used only where the daemon cannot mount."""
    options = set(pyfuse3.default_options)
    options.add(f"fsname={SOURCE_PREFIX}{socket_path}")
    options.add("subtype=swapfs")
    if config.allow_other:
        options.add("allow_other")
    return options


def harden(config: Config) -> dict[str, bool]:
    """Apply the memory-pressure protections the configuration asks for."""
    lifecycle.raise_open_files_limit()
    lifecycle.fix_mmap_threshold()
    return {
        "memory_locked": config.lock_memory and lifecycle.lock_memory(),
        "io_flusher": config.io_flusher and lifecycle.set_io_flusher(),
        "oom_protected": lifecycle.protect_from_oom(config.oom_score_adj),
        "core_dumps_off": nodump.forbid_core_dumps(),  # keys and plaintext pages
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


#: ((fuse descriptor, memo descriptor), "standby" or "systemd")
Adoption = tuple[tuple[int, int], str]
#: (pid, pidfd) of the standby that started this daemon (handover.watch_standby)
Standby = tuple[int, int]


def _connect(config: Config, socket_path: str, adopt: Adoption | None,
             death_noticed: float | None, standby: Standby | None = None) -> Link:
    """Mount, or take over the connection a dead daemon left to a keeper."""
    assert config.mountpoint is not None and config.state is not None
    if adopt is not None:
        (fuse_fd, memo_fd), kept_by = adopt
        memo = ConnectionMemo.load(memo_fd)
        link = Link(config.mountpoint, fuse_fd, memo,
                    Takeover("connection", time.time(), death_noticed, memo.takeovers + 1))
        if kept_by == "systemd":
            link.keep_in_systemd()
        elif standby is None:
            log.warning("the standby that started this daemon is gone: nothing keeps "
                        "the connection, and a daemon failure now ends the mount")
        else:
            link.attach_standby(*standby)
        log.info("taking over the connection of %s (takeover %d)",
                 config.mountpoint, memo.takeovers + 1)
        return link
    mountcheck.check_new_mount(config.mountpoint, config.state)
    if "init_request" not in (pyfuse3.init.__doc__ or ""):
        log.warning("this pyfuse3 cannot take an INIT request: libfuse mounts, and this "
                    "mount cannot be taken over if the daemon dies (install swapfs with "
                    "tools/setup.sh; see docs/pyfuse3-patch.md)")
        return Link(config.mountpoint, None, None, None)
    try:
        fuse_fd = fusedev.mount(config.mountpoint, f"{SOURCE_PREFIX}{socket_path}", "swapfs",
                                config.allow_other)
    except fusedev.FuseDeviceError as exc:
        if exc.errno != errno.EPERM:
            raise
        log.warning("%s; libfuse mounts instead, and this mount cannot be taken over "
                    "if the daemon dies", exc)
        return Link(config.mountpoint, None, None, None)
    try:
        memo = ConnectionMemo.create(fusedev.read_init(fuse_fd))
    except BaseException:
        fusedev.unmount(config.mountpoint)
        os.close(fuse_fd)
        raise
    # A standby of another host mounts a state whose daemon died there.
    takeover = (None if death_noticed is None
                else Takeover("state", time.time(), death_noticed, 1))
    return Link(config.mountpoint, fuse_fd, memo, takeover)


def _mount_table_id(mountpoint: str) -> str | None:
    """The mount's device number minor, which names it in /sys/fs/fuse/connections."""
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if fields[4] == mountpoint:
                return fields[2].split(":")[1]
    return None


def _finish_takeover(link: Link) -> None:
    """The new daemon serves: resend what the dead one left, and time it."""
    takeover = link.takeover
    assert takeover is not None
    if takeover.kind == "connection":
        _resend(link, takeover)
    if takeover.noticed is not None:
        takeover.seconds = round(time.monotonic() - takeover.noticed, 4)
    log.info("took over %s (%s): %.3f s after the death was noticed", link.mountpoint,
             takeover.kind, takeover.seconds or 0.0)


def _resend(link: Link, takeover: Takeover) -> None:
    """Have the kernel queue again what the dead daemon read and never answered."""
    assert link.fuse_fd is not None
    minor = _mount_table_id(link.mountpoint)
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/waiting") as waiting:
            takeover.waiting = int(waiting.read())
    except (OSError, ValueError):
        takeover.waiting = None
    try:
        fusedev.request_resend(link.fuse_fd)
        takeover.resent = True
    except fusedev.FuseDeviceError as exc:
        takeover.resent = False
        log.error("%s: requests the dead daemon had read stay unanswered "
                  "(their callers hang; this kernel predates Linux 6.9)", exc)


def _fence(volume: Volume, link: Link) -> None:
    """The lease is lost: another host may own the state now. Write nothing
    more (not even at exit), and answer no read, which could be stale."""
    log.critical("the lease on %s is lost: refusing every write (EROFS) and read (EIO) "
                 "from now on", volume.state)
    volume.index.fence(f"the lease on {volume.state} is lost")


async def _checkpoint_and_punch(volume: Volume) -> None:
    """Every PUNCH_INTERVAL: a checkpoint if anything was committed since the
    last (swapfs/engine/checkpoint.py), so that a power cut loses at most that
    much and the slots freed before it may be reused; then give back the
    disk space of slots that stayed free, in bounded batches.

    Each round punches what was freed before the previous round began and
    has not been reused since (Volume.punch_pending), a batch at a time with
    a checkpoint of the trio loop in between, so that FUSE requests are
    served meanwhile. A state this daemon may no longer write (its lease
    lapsed) is neither checkpointed nor punched.
    """
    previous = time.monotonic()
    while True:
        await trio.sleep(PUNCH_INTERVAL)
        cutoff, previous = previous, time.monotonic()
        if not volume.index.writable():
            continue  # fenced or lapsed: another host may own the state
        if not volume.synced():
            try:
                volume.sync()
            except (SwapfsError, OSError, lmdb.Error) as exc:
                log.warning("no checkpoint: %s", exc)
                continue
        while volume.punch_pending(PUNCH_BATCH, freed_before=cutoff) == PUNCH_BATCH:
            await trio.sleep(0)


async def _scan_slot_tables(volume: Volume) -> None:
    """Scan the chains' slot tables in steps while the mount serves: the
    open read none of them, and their dedup tables and free slots come from
    this scan (swapfs/engine/slottable.py); a table that fills is rebuilt
    larger the same way."""
    await trio.sleep(SCAN_DELAY)
    start = time.monotonic()
    while volume.scan_step(SCAN_RUNS):
        await trio.sleep(0)
    log.info("slot tables scanned in %.2f s", time.monotonic() - start)
    while True:
        await trio.sleep(SCAN_INTERVAL)
        while volume.scan_step(SCAN_RUNS):
            await trio.sleep(0)


async def _keep_state_files_out(state: Path, locked: bool) -> None:
    """Keep the pages of the state's own files that the daemon maps (the
    index, the seal files) out of its locked memory, and, past
    FILE_PAGES_KEPT of mapped files, out of its page tables (lifecycle.py)."""
    while True:
        if locked:
            lifecycle.unlock_files_under(state)
        if lifecycle.memory(0)["file_bytes"] > FILE_PAGES_KEPT:
            lifecycle.unmap_file_pages_under(state)
        await trio.sleep(UNLOCK_INTERVAL)


async def _watch_standby(control: ControlServer, pid: int, pidfd: int) -> None:
    """Let go of the standby that started this daemon when it dies, attached
    or not: a dead keeper must not block the next one nor keep a failed
    daemon from unmounting."""
    await trio.lowlevel.wait_readable(pidfd)
    control.detach_keeper(pid)


async def _fuse_loop(done: trio.CancelScope) -> None:
    await pyfuse3.main()
    done.cancel()


async def _serve(control: ControlServer, ops: Operations, link: Link, socket_path: str,
                 vsock_port: int, on_ready: Callable[[], None], manifest: CacheKeeper) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, socket_path)
        if vsock_port and not vsock_available():
            log.warning("vsock_port %d: this kernel offers no AF_VSOCK", vsock_port)
        elif vsock_port:
            try:
                await nursery.start(control.serve_vsock, vsock_port)
                log.info("drivers may connect on vsock port %d", vsock_port)
            except OSError as exc:
                log.warning("vsock port %d: %s", vsock_port, exc)
        if control.drivers is not None:
            await nursery.start(channels.dial_all, control.drivers.bindings,
                                control.serve_peer)
        nursery.start_soon(_watch_signals, ops)
        nursery.start_soon(_checkpoint_and_punch, control.volume)
        nursery.start_soon(_scan_slot_tables, control.volume)
        nursery.start_soon(_keep_state_files_out, control.volume.state,
                           bool(control.protections.get("memory_locked")))
        if link.keeper_pidfd is not None and link.keeper_pid is not None:
            nursery.start_soon(_watch_standby, control, link.keeper_pid, link.keeper_pidfd)
        if link.lease is not None:
            nursery.start_soon(lease.keep_renewed, link.lease,
                               lambda: _fence(control.volume, link))
        nursery.start_soon(_fuse_loop, nursery.cancel_scope)
        if link.takeover is not None:
            await trio.sleep(0)  # the loop is reading: let the resent requests come
            _finish_takeover(link)
        log.info("serving %s on %s (engine: %s)", control.volume.state, control.mountpoint,
                 compiled.describe())
        on_ready()
        lifecycle.sd_notify("READY=1")
        nursery.start_soon(manifest.run)  # warms the cache while the mount serves


def _open_volume(config: Config, link: Link, master: keys.MasterKey | None,
                 on_progress: Callable[[], None] | None) -> Volume:
    """Open the state, taking its lease first where configured. Only the
    opening's own steps are reported to *on_progress*: the lease's renewals
    meanwhile keep the lease, and would make a start hung elsewhere look
    alive to the standby that waits for it (START_STALL)."""
    assert config.state is not None
    state, lease_seconds = config.state, config.lease_seconds
    try:
        return Volume(state,
                      still_open=link.memo.open_inos() if link.memo else (),
                      claim=(lambda: link.claim_lease(state, lease_seconds))
                      if lease_seconds else None,
                      restamp=link.restamp_lease if lease_seconds else None,
                      create=link.takeover is None,
                      dedup_table_bytes=config.dedup_table_bytes,
                      background_scan=True,
                      slot_cache_bytes=config.slot_table_cache_bytes,
                      map_cache_bytes=config.map_cache_bytes,
                      master=master, encrypt=config.encrypt,
                      guard=link.guard if lease_seconds else None,
                      progress=on_progress)
    finally:
        link.opened()


def run(config: Config, on_ready: Callable[[], None], restart_argv: list[str],
        adopt: Adoption | None = None, death_noticed: float | None = None,
        standby: Standby | None = None, on_progress: Callable[[], None] | None = None) -> None:
    """Mount (or take over a kept connection), serve until unmounted or
    signalled, then close everything.

    *restart_argv* starts a daemon like this one (a standby adds what it
    adopts); *adopt* is the (fuse, memo) descriptors a standby or systemd
    passed, and which of the two;
    *death_noticed* the CLOCK_MONOTONIC time at which it saw the last daemon die;
    *standby* the standby that passed *adopt*, None if it is gone already;
    *on_progress* is called at each step of a start that takes long (the
    state's opening: each chain's slot table verified; not the lease's
    renewals meanwhile, which would make a hung start look alive).
    """
    assert config.state is not None and config.mountpoint is not None
    if not hasattr(pyfuse3.Operations, "fallocate"):
        log.warning("this pyfuse3 has no fallocate operation: discards free nothing "
                    "(install swapfs with tools/setup.sh; see docs/pyfuse3-patch.md)")
    protections = harden(config)
    group = peercred.group_id(config.control_group) if config.control_group else None
    socket_path = config.control_socket or control_socket_path(config.state,
                                                               group is not None)
    link = _connect(config, socket_path, adopt, death_noticed, standby)
    link.restart_argv = restart_argv
    state = config.state
    clean_exit = False
    try:
        master = (keys.load(Path(config.key_file) if config.key_file else None)
                  if config.encrypt else None)
        volume = _open_volume(config, link, master, on_progress)
        if link.lease is not None and link.lease.valid_for() <= 0:
            volume.close()  # writes nothing: the lease refuses
            raise lease.LeaseLost(f"the lease on {state} was lost while the state opened: "
                                  "not serving it")
        log.info("%s: %s", state, f"encrypted, master key {master.source}"
                 if volume.encrypted and master is not None else "unencrypted")
        if link.takeover is not None and link.memo is not None:
            link.memo.takeovers += 1  # counted once the state is open: failed starts do not
            link.memo.save()
            link.takeover.number = link.memo.takeovers
        try:
            # The caches live in this process's memory, locked with the rest by harden().
            cache = TransientCache(config.transient_cache_max_bytes)
            # 0 (or under one block) disables either cache.
            content = BlockCache(range(config.content_cache_bytes // BLOCK_SIZE),
                                 admit_first_miss=True)
            content_cache = content if content.capacity_bytes else None
            volume.use_caches(transient=cache if cache.max_slots else None, content=content_cache)
            manifest = CacheKeeper(volume, content_cache, config.manifest_interval,
                                   config.failover_strategies, config.host_cache_bytes)
            link.cache_keeper = manifest
            drivers = DriverManager(cache, config.driver_timeout, config.drivers)
            memo = link.memo
            ops = Operations(volume, memo.open_files if memo else None,
                             memo.set_open if memo else None)
            control = ControlServer(volume, config.mountpoint, ops, protections, drivers,
                                    link, idle_timeout=config.control_idle_timeout,
                                    limits=ConnectionLimits(
                                        config.control_max_connections,
                                        config.control_root_reserve,
                                        config.control_max_per_uid,
                                        config.control_max_per_cid),
                                    vsock_cids=frozenset(config.vsock_cids), group=group)
            if link.fuse_fd is None:
                pyfuse3.init(ops, config.mountpoint, libfuse_options(config, socket_path))
            else:
                assert memo is not None
                pyfuse3.init(ops, f"/dev/fd/{link.fuse_fd}", set(pyfuse3.default_options),
                             init_request=memo.init)
                if link.keeper is None and handover.store_in_systemd(link.fuse_fd, memo.fd):
                    link.keep_in_systemd()
            try:
                trio.run(_serve, control, ops, link, socket_path, config.vsock_port,
                         on_ready, manifest)
                clean_exit = True
            except BaseException:
                log.exception("daemon failed")
                raise
            finally:
                lifecycle.sd_notify("STOPPING=1")
                # Closes the fuse descriptor; libfuse unmounts only what it mounted.
                pyfuse3.close(unmount=clean_exit or not link.kept)
                manifest.write()  # nothing once fenced (CacheKeeper._store)
        finally:
            volume.close()
            if link.lease is not None and (clean_exit or not link.kept):
                link.lease.release()
            log.info("closed %s", config.state)
    finally:
        if link.fuse_fd is not None and (clean_exit or not link.kept):
            fusedev.unmount(config.mountpoint)
        if link.memo is not None:
            os.close(link.memo.fd)
        if link.keeper_pidfd is not None:
            os.close(link.keeper_pidfd)
