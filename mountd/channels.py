"""Drivers inside virtual machines, reached over their VMs' channels.

A guest's driver may reach the daemon over vsock (``vsock_port``), where
the kernel names the guest by its CID. Where the host has no vsock (no
``/dev/vhost-vsock``), or the VMM keeps it to itself, the VM offers a
*channel*: a Unix socket of the VMM's whose other end is inside one guest.
The daemon dials it, so a connection on it comes from that guest and no
other, and a driver name bound to the channel (``[drivers.NAME] channel``)
is registered only from there: the driver is bound to its VM by the
transport it came in on. So the channel's directory must be writable by
its owner alone (root's, or the VMM's user's): the daemon does not dial a
channel in a directory others may write, such as ``/tmp``, and logs why.

Two kinds, by the binding:

- **virtio-serial** (QEMU): ``-chardev socket,id=ID,path=PATH,server=on,
  wait=off -device virtio-serial -device virtserialport,chardev=ID,
  name=org.swapfs.driver``. The guest's driver opens
  ``/dev/virtio-ports/org.swapfs.driver``. The port outlives the driver: a
  driver that stops says so (``driver.stop``), one that dies is revoked
  when it has been silent past ``driver_timeout``, and one that starts
  again registers on the same connection.
- **vsock over a Unix socket** (Firecracker, cloud-hypervisor), with
  ``vsock_port = N``: the daemon writes ``CONNECT N`` and the VMM answers
  ``OK HOSTPORT`` once the driver, listening on vsock port N in the guest
  (``swapfs-driver run --vsock-listen N``), took the connection.

Either way the daemon serves the connection as any other (its peer is of
kind GUEST, :mod:`mountd.access`), and when it ends (the VM exited, the
VMM closed it, the guest's driver hung up) revokes the driver at once and
dials again, every ``REDIAL_SECONDS``, for as long as the daemon runs. A
VM that is not running yet costs a failed ``connect`` a second.
"""

import errno
import logging
import math
import os
import stat
from collections.abc import Awaitable, Callable

import trio

from mountd.access import Binding
from mountd.peercred import Peer

log = logging.getLogger(__name__)

#: Pause between attempts to dial a channel.
REDIAL_SECONDS = 1.0
#: How long the VMM may take to take a connection and answer ``CONNECT``;
#: the longest answer.
CONNECT_SECONDS = 5.0
_MAX_ANSWER = 64

Serve = Callable[[trio.SocketStream, Peer], Awaitable[None]]


class ChannelError(Exception):
    """The VMM refused the connection, or answered what is not ``OK N``."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def check_directory(path: str) -> None:
    """ChannelError (EPERM) unless only its owner may make or replace a
    socket where channel *path* is: a binding trusts whatever listens
    there as its VM, so a directory that others may write (``/tmp``) would
    let any local user stand in for the guest."""
    parent = os.path.dirname(path) or "."
    mode = os.stat(parent).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ChannelError(errno.EPERM, f"{parent} is writable by others (mode "
                                        f"{stat.S_IMODE(mode):o}): anyone could listen "
                                        f"there as the VM")


async def connect(path: str, vsock_port: int | None) -> trio.SocketStream:
    """A connection to the guest behind channel *path* (through the VMM's
    ``CONNECT`` handshake if *vsock_port* is set), within CONNECT_SECONDS:
    a VMM that neither takes the connection nor answers costs one attempt."""
    check_directory(path)
    try:
        with trio.fail_after(CONNECT_SECONDS):
            return await _connect(path, vsock_port)
    except trio.TooSlowError:
        raise ChannelError(errno.ETIMEDOUT, f"no connection within {CONNECT_SECONDS:g} s"
                           + (f" (CONNECT {vsock_port})" if vsock_port is not None
                              else "")) from None


async def _connect(path: str, vsock_port: int | None) -> trio.SocketStream:
    stream = await trio.open_unix_socket(path)
    if vsock_port is None:
        return stream
    try:
        await stream.send_all(f"CONNECT {vsock_port}\n".encode())
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < _MAX_ANSWER:
            data = await stream.receive_some(1)  # nothing past the line is ours
            if not data:
                break
            answer += data
        words = answer.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != "OK" or not words[1].isdigit():
            raise ChannelError(errno.ECONNREFUSED,
                               f"CONNECT {vsock_port} answered {answer[:_MAX_ANSWER]!r}")
    except BaseException:
        await stream.aclose()
        raise
    return stream


async def dial(name: str, binding: Binding, serve: Serve,
               redial: float = REDIAL_SECONDS) -> None:
    """Keep driver *name*'s channel connected, serving each connection with
    *serve*, until cancelled. Each failure to connect is logged once, not
    at every attempt, and a success after it once."""
    assert binding.channel is not None
    peer = Peer(channel=binding.channel)
    failing: str | None = None
    while True:
        try:
            stream = await connect(binding.channel, binding.vsock_port)
        except (OSError, ChannelError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != failing:
                log.info("driver %s: channel %s not reached (%s); trying every %g s",
                         name, binding.channel, exc, redial)
                failing = why
        else:
            failing = None
            log.info("driver %s: channel %s connected", name, binding.channel)
            await serve(stream, peer)
            log.info("driver %s: channel %s closed", name, binding.channel)
        await trio.sleep(redial)


async def dial_all(bindings: dict[str, Binding], serve: Serve, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Dial every channel binding of *bindings*, until cancelled."""
    async with trio.open_nursery() as nursery:
        for name, binding in sorted(bindings.items()):
            if binding.channel is not None:
                nursery.start_soon(dial, name, binding, serve)
        task_status.started()
        await trio.sleep(math.inf)
