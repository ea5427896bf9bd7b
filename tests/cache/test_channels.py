"""Channels: the daemon dials a VM's socket, and a name bound to it is that VM's.

The real daemon on a real mount dials Unix sockets that this test listens
on, standing in for the VMM's end of the channel: QEMU's virtio-serial
chardev (``server=on``) and the vsock socket of Firecracker and
cloud-hypervisor, which answer ``CONNECT N`` with ``OK PORT``. A stand-in,
because neither a Firecracker nor a cloud-hypervisor runs without KVM,
which this test's hosts lack; QEMU's own socket and a real guest's driver
are in tests/guest/test_channel.py. Behind the stand-in, the test speaks
as the guest's driver would.
"""

import contextlib
import errno
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapfs.control import protocol
from swapfs.guest import PORT_NAME, port_device
from tests.cache.test_drivers import Client, extent, pool
from tests.mounting import (
    Mount,
    daemon_log_tail,
    mounted,
    remove_tree,
    requires_mount,
    short_tempdir,
    wait_until,
)

pytestmark = [pytest.mark.mount, requires_mount]


class VmmEnd:
    """The VMM's end of one channel: a listening Unix socket that takes the
    daemon's connections, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.settimeout(15)

    def accept(self) -> "Guest":
        """The daemon's next connection (it dials every second)."""
        sock, _ = self.listener.accept()
        sock.settimeout(10)
        return Guest(sock)

    def close(self) -> None:
        self.listener.close()


class Guest(Client):
    """The guest's side of one connection: what its driver sends and reads
    (a driver's connection, as test_drivers.py's Client, but accepted)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def line(self) -> bytes:
        return self.reader.readline()

    def write(self, payload: bytes) -> None:
        """Send *payload*, waiting for no answer."""
        self.sock.sendall(payload)

    def hung_up(self) -> bool:
        return self.closed_by_daemon(timeout=10)


@contextlib.contextmanager
def one_vm(socket_name: str, binding: str = "", mode: int = 0o755
           ) -> Iterator[tuple[Mount, VmmEnd]]:
    """A mount whose configuration binds driver vmN (the socket's stem) to
    the channel root/vms/*socket_name* (more of the table in *binding*),
    and the VMM's end of it, listening there; the directory has *mode*."""
    root = short_tempdir()
    try:
        with contextlib.ExitStack() as stack:
            vms = root / "vms"
            vms.mkdir()
            vms.chmod(mode)
            vm = VmmEnd(vms / socket_name)
            stack.callback(vm.close)
            config = root / "swapfs.toml"
            config.write_text(f'[drivers.{vm.path.stem}]\nchannel = "{vm.path}"\n{binding}')
            yield stack.enter_context(mounted(root, config=config)), vm
    finally:
        remove_tree(root)


def register(guest: Guest, name: str, inode: int) -> dict[str, Any]:
    return guest.request({"op": "driver.register", "driver": name,
                          "extents": [extent(inode)]})


def test_a_virtio_serial_channel_is_its_vms_alone() -> None:
    """The daemon dials the channel; the name bound to it registers there
    and nowhere else, another name not there; a stop, the VM's exit and a
    driver's silence each revoke it, and the daemon dials again."""
    root = short_tempdir()
    try:
        with contextlib.ExitStack() as stack:
            vms = root / "vms-early"
            vms.mkdir()
            # vm1's socket exists before the daemon starts; vm2's after.
            vm1 = VmmEnd(vms / "vm1.sock")
            stack.callback(vm1.close)
            config = root / "swapfs.toml"
            config.write_text(f'driver_timeout = 5.0\n[drivers.vm1]\nchannel = "{vm1.path}"\n'
                              f'[drivers.vm2]\nchannel = "{vms}/vm2.sock"\n')
            mount = stack.enter_context(mounted(root, config=config))
            guest = vm1.accept()
            # A half line a killed predecessor left, then a blank line ends it:
            # the daemon takes the blank line as no request.
            guest.write(b"\n")
            reply = register(guest, "vm1", 1)
            assert reply["ok"] and reply["capacity_bytes"] == 4096, reply
            assert set(pool(mount)["drivers"]) == {"vm1"}
            # The host's own socket cannot register vm1 (bound to the channel) ...
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
                host.settimeout(10)
                host.connect(protocol.socket_of(str(mount.mnt)))
                host.sendall(json.dumps({"op": "driver.register", "driver": "vm1",
                                         "extents": []}).encode() + b"\n")
                answer = json.loads(host.makefile("rb").readline())
            assert answer["errno"] == errno.EACCES and "channel" in answer["error"]
            # ... nor can vm2's channel, once that VM is up.
            vm2 = VmmEnd(vms / "vm2.sock")
            stack.callback(vm2.close)
            other = vm2.accept()
            refused = register(other, "vm1", 2)
            assert refused["errno"] == errno.EACCES, refused
            assert other.hung_up()  # refused, so closed; and dialed again:
            other = vm2.accept()
            other_token = register(other, "vm2", 2)["token"]
            token = reply["token"]
            assert guest.request({"op": "driver.heartbeat", "driver": "vm1",
                                  "token": token})["ok"]
            assert set(pool(mount)["drivers"]) == {"vm1", "vm2"}
            # vm1's driver stops: its share leaves at once; the channel stays.
            assert guest.request({"op": "driver.stop", "driver": "vm1",
                                  "token": token})["ok"]
            assert set(pool(mount)["drivers"]) == {"vm2"}
            # A driver started again registers on the same connection ...
            again = register(guest, "vm1", 1)
            assert again["ok"] and again["token"] != token
            assert set(pool(mount)["drivers"]) == {"vm1", "vm2"}
            # ... and one that dies is revoked when silent past the timeout
            # (vm2's keeps talking).
            for _ in range(8):
                assert other.request({"op": "driver.heartbeat", "driver": "vm2",
                                      "token": other_token})["ok"]
                if set(pool(mount)["drivers"]) == {"vm2"}:
                    break
                time.sleep(1)
            assert set(pool(mount)["drivers"]) == {"vm2"}
            assert "silent past the timeout" in daemon_log_tail(mount, 200)
            # vm2 exits: its connection closes, and its driver is revoked at once.
            other.close()
            assert wait_until(lambda: pool(mount)["drivers"] == {}, 5)
            # The daemon dials vm2's socket again (a VM restarted on it).
            other = vm2.accept()
            assert register(other, "vm2", 3)["ok"]
            other.close()
    finally:
        remove_tree(root)


def test_a_vsock_socket_is_asked_for_the_drivers_port_first() -> None:
    """Firecracker's and cloud-hypervisor's form: ``CONNECT N``, then ``OK
    PORT`` from the VMM, then the driver's requests. An answer that is not
    ``OK PORT`` (the guest listens on no such port), or none within 5 s, is
    a failed dial: logged once, and tried again, never served."""
    with one_vm("vm3.vsock", "vsock_port = 5253\n") as (mount, vm):
        silent = vm.accept()  # a VMM that never answers: given up after 5 s
        assert silent.line() == b"CONNECT 5253\n"
        assert silent.hung_up()
        silent.close()
        for answer in (b"NOPE\n", b"OK\n", b"OK 12 34\n"):
            guest = vm.accept()
            assert guest.line() == b"CONNECT 5253\n"
            guest.write(answer)
            assert guest.hung_up(), answer
            guest.close()
        guest = vm.accept()
        assert guest.line() == b"CONNECT 5253\n"
        guest.write(b"OK 1073741824\n")
        assert register(guest, "vm3", 7)["ok"]
        assert set(pool(mount)["drivers"]) == {"vm3"}
        log = daemon_log_tail(mount, 200)
        assert "CONNECT 5253 answered b'NOPE\\n'" in log, log
        guest.close()
        assert wait_until(lambda: pool(mount)["drivers"] == {}, 5)


def test_a_port_is_found_by_its_name(tmp_path: Path) -> None:
    """A small guest has no udev to make /dev/virtio-ports/NAME: the driver
    looks the name up in sysfs itself; a path is taken as it is."""
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p2", PORT_NAME)):
        (tmp_path / port).mkdir()
        (tmp_path / port / "name").write_text(name + "\n")
    (tmp_path / "vport2p1").mkdir()  # a port whose name cannot be read
    assert port_device(PORT_NAME, tmp_path) == "/dev/vport1p2"
    assert port_device("/dev/hvc1", tmp_path) == "/dev/hvc1"
    with pytest.raises(FileNotFoundError):
        port_device("org.other", tmp_path)


def test_a_channel_where_anyone_may_listen_is_not_dialed() -> None:
    """A socket in a directory others may write could be anyone's: the
    daemon does not dial it, says why in its log, and dials once the
    directory is its owner's alone."""
    with one_vm("vm4.sock", mode=0o1777) as (mount, vm):
        vm.listener.settimeout(2.5)
        with pytest.raises(TimeoutError):
            vm.accept()
        assert "is writable by others (mode 1777)" in daemon_log_tail(mount, 100)
        vm.path.parent.chmod(0o755)
        vm.listener.settimeout(15)
        guest = vm.accept()
        assert register(guest, "vm4", 9)["ok"]
        guest.close()


def test_a_guest_that_vanishes_mid_request_is_revoked() -> None:
    """The VM exits with a request half sent: the daemon drops the half
    line and the driver with it, and dials again; nothing else changes."""
    with one_vm("vm5.sock") as (mount, vm):
        guest = vm.accept()
        token = register(guest, "vm5", 11)["token"]
        guest.write(json.dumps({"op": "driver.update", "driver": "vm5", "token": token,
                               "extents": [extent(12)]}).encode()[:40])
        guest.close()
        assert wait_until(lambda: pool(mount)["drivers"] == {}, 5)
        guest = vm.accept()
        reply = register(guest, "vm5", 13)
        assert reply["ok"] and reply["capacity_bytes"] == 4096
        assert mount.status()["pid"] == mount.pid
        guest.close()
