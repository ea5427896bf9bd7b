"""How a driver reaches its daemon: the transports a guest has.

- ``--socket PATH`` / ``--mount PATH``: the daemon's Unix socket, for a
  driver on the daemon's own host.
- ``--vsock PORT``: vsock to the host (CID 2), where the daemon listens
  on that port (``vsock_port``) and knows the guest by its CID.
- ``--port NAME``: a virtio-serial port (QEMU), by name or device, whose
  host end the daemon dials (``[drivers.NAME] channel``,
  :mod:`mountd.channels`).
- ``--vsock-listen PORT``: the driver listens on vsock port PORT and takes
  the one connection the host makes to it: what the daemon's ``CONNECT
  PORT`` on a Firecracker or cloud-hypervisor vsock socket arrives as.

The last two outlive a daemon: when it goes away (a restart, a takeover)
the driver opens the transport again and registers anew
(:attr:`Transport.redials`). A virtio-serial port also outlives the
driver: what a predecessor killed mid-request left behind is drained
before the first request, and a blank line ends a request it half wrote
(the daemon skips blank lines).
"""

import errno
import io
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from swapfs.control import protocol

#: The host's context id on vsock.
HOST_CID = 2
#: The name the guest's virtio-serial port is given (``virtserialport,name=``).
PORT_NAME = "org.swapfs.driver"
_PORTS = Path("/sys/class/virtio-ports")
#: How often a port whose host end is not connected is looked at again.
_HUNG_UP_PAUSE = 0.05


def port_device(name: str, ports: Path = _PORTS) -> str:
    """The character device of virtio-serial port *name*: a path is itself,
    a name is looked up in sysfs (``/dev/virtio-ports/NAME`` is udev's link,
    which a small guest may lack). FileNotFoundError if no port has it."""
    if name.startswith("/"):
        return name
    for port in sorted(ports.glob("*")):
        try:
            if (port / "name").read_text().strip() == name:
                return f"/dev/{port.name}"
        except OSError:
            continue
    raise FileNotFoundError(errno.ENOENT, f"no virtio-serial port is named {name!r}")


class PortStream:
    """A virtio-serial port's character device as a stream: blocking
    writes, reads that time out. The guest's kernel lets one process open
    a port at a time (EBUSY for a second driver)."""

    def __init__(self, device: str, timeout: float) -> None:
        self.device = device
        self.timeout = timeout
        self.fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def drain(self) -> int:
        """Throw away what waits to be read (replies to a predecessor); how much."""
        thrown = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return thrown
            if not data:  # the host end is not connected
                return thrown
            thrown += len(data)

    def _wait(self, events: int) -> None:
        """Until the port is ready for *events*. While its host end is not
        connected (a daemon between two dials) the port polls as hung up
        and a write would block: that is waited out too, up to the timeout."""
        poller = select.poll()
        poller.register(self.fd, events)
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = poller.poll(left * 1000)
            if ready and ready[0][1] & events:
                return
            if ready:  # POLLHUP: no host end yet
                time.sleep(min(_HUNG_UP_PAUSE, max(left, 0)))
        raise TimeoutError(f"{self.device}: no answer within {self.timeout:g} s")

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def readinto(self, buffer: memoryview) -> int:
        """Read what has come into *buffer*, waiting for some; 0 at EOF (no
        host end connected)."""
        while True:
            try:
                return os.readv(self.fd, [buffer])
            except BlockingIOError:
                self._wait(select.POLLIN)

    def reader(self) -> BinaryIO:
        return io.BufferedReader(_Raw(self))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Raw(io.RawIOBase):
    """The port's reads as a raw file, for BufferedReader.readline."""

    def __init__(self, port: PortStream) -> None:
        super().__init__()
        self.port = port

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self.port.readinto(buffer)


@dataclass(frozen=True)
class Transport:
    """Where the driver's control connection goes (one of the fields set)."""

    socket_path: str | None = None
    vsock_port: int | None = None
    port_device: str | None = None
    listen_port: int | None = None

    @property
    def redials(self) -> bool:
        """Does it outlive the daemon (open it again when the daemon goes)?"""
        return self.port_device is not None or self.listen_port is not None

    def __str__(self) -> str:
        if self.socket_path is not None:
            return self.socket_path
        if self.vsock_port is not None:
            return f"vsock {HOST_CID}:{self.vsock_port}"
        if self.port_device is not None:
            return self.port_device
        return f"vsock port {self.listen_port} (listening)"

    def open(self, timeout: float, stop: threading.Event) -> protocol.Connection:
        """A connection to the daemon; ConnectionLost if there is none, or
        if *stop* was set while waiting for the host to connect."""
        where = str(self)
        try:
            if self.socket_path is not None:
                return protocol.Connection(self.socket_path, timeout)
            if self.port_device is not None:
                port = PortStream(port_device(self.port_device), timeout)
                port.drain()
                port.sendall(b"\n")
                return protocol.Connection.over(port, port.reader(), where)
            if self.vsock_port is not None:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect((HOST_CID, self.vsock_port))
                except OSError:
                    sock.close()
                    raise
                return protocol.Connection.over(sock, sock.makefile("rb"), where)
            assert self.listen_port is not None
            sock = _accept_host(self.listen_port, stop)
            sock.settimeout(timeout)
            return protocol.Connection.over(sock, sock.makefile("rb"), where)
        except OSError as exc:
            raise protocol.ConnectionLost(exc.errno or errno.EIO,
                                          f"cannot reach swapfs over {where}: {exc}") from exc


def _accept_host(port: int, stop: threading.Event) -> socket.socket:
    """The host's connection to vsock *port*, once it comes; another CID's
    is closed unanswered. OSError (EINTR) once *stop* is set."""
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(1)
        listener.settimeout(1.0)
        while not stop.is_set():
            try:
                sock, (cid, _port) = listener.accept()
            except TimeoutError:
                continue
            if cid == HOST_CID:
                return sock
            sock.close()
    raise OSError(errno.EINTR, "stopped while waiting for the host")
