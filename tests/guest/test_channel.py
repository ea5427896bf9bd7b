"""A driver inside a real guest reaches the daemon over its VM's virtio-serial port.

A QEMU guest (TCG) gets two virtio-serial ports: ``org.swapfs.driver``,
whose host end (QEMU's socket) the daemon dials because the configuration
binds driver name vm1 to it, and a port of the test's own, on which the
test tells the guest's script what to do next. The guest runs the real
``swapfs-driver run --port org.swapfs.driver``. Asserted:

- the driver registers from inside the guest, and its share of the pool
  is the guest's unused code-page bytes as ``readelf`` counts them there
  (``tools/vmswap.py --elf-slack``);
- a driver that stops (SIGTERM) is revoked at once, before it exits;
- a driver started again registers on the same channel;
- the daemon is killed under a standby: the new daemon dials the channel
  and the driver, finding its daemon gone, registers again;
- a driver killed with SIGKILL is revoked once silent past the timeout;
- the guest powers off: its channel closes and its driver is revoked at once.

Marked ``slow`` and ``mount``, skipped only where a prerequisite of the
guest is missing (tools/setup.sh installs them).
"""

import contextlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from swapfs.guest import PORT_NAME
from tests.guest import guest_marks
from tests.mounting import Mount, daemon_log_tail, mounted, remove_tree, short_tempdir
from tools.guest import ROOT, Guest

DRIVER = Path(sys.executable).parent / "swapfs-driver"
#: The test's own port: one command a line, which the guest's script reads.
CONTROL_PORT = "org.swapfs.test"
#: How long a driver that died may stay registered (the daemon's driver_timeout).
TIMEOUT = 3.0


pytestmark = [*guest_marks(), pytest.mark.mount]

#: The guest's script: each command from the test's port, done and told on
#: the console ("guest: done COMMAND").
SCRIPT = f"""
cd {ROOT}
control=""
for port in /sys/class/virtio-ports/*; do
    [ "$(cat $port/name)" = {CONTROL_PORT} ] && control=/dev/${{port##*/}}
done
[ -n "$control" ] || {{ echo "guest: no control port"; exit 1; }}
exec 3<"$control"
start() {{
    {DRIVER} run --name vm1 --port {PORT_NAME} --interval 1 --agent /tmp/agent.sock \\
        2>/tmp/driver.log &
    driver=$!
    echo "guest: driver pid $driver"
}}
while read -r command <&3; do
    case "$command" in
        start) start ;;
        stop) kill -TERM $driver; wait $driver; echo "guest: driver exit $?" ;;
        kill) kill -KILL $driver; wait $driver ;;
        log) cat /tmp/driver.log ;;
        count) echo "guest: slack $({sys.executable} -S tools/vmswap.py --elf-slack)" ;;
        off) break ;;
    esac
    echo "guest: done $command"
done
kill -TERM $driver 2>/dev/null
"""


def pool(mount: Mount) -> dict[str, Any]:
    from swapfs.control import protocol

    cache: dict[str, Any] = protocol.request(protocol.socket_of(str(mount.mnt)),
                                            {"op": "stats"})["transient_cache"]
    return cache


class Console:
    """The guest's console, read up to the line each command ends with."""

    def __init__(self, guest: Guest, control: socket.socket) -> None:
        self.guest, self.control = guest, control

    def expect(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.guest.readline(deadline - time.monotonic())
            if line is None:
                raise AssertionError(f"the guest ended before {prefix!r}")
            if line.startswith(prefix):
                return line

    def do(self, command: str, timeout: float = 120.0) -> None:
        self.control.sendall(command.encode() + b"\n")
        self.expect(f"guest: done {command}", timeout)


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until *predicate* held (AssertionError naming *what* if never)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_guests_driver_registers_over_its_virtio_serial_port() -> None:
    root = short_tempdir()
    try:
        with contextlib.ExitStack() as stack:
            vms = root / "vms"
            vms.mkdir()
            channel, control_path = vms / "vm1.sock", vms / "vm1.test.sock"
            config = root / "swapfs.toml"
            config.write_text(f'driver_timeout = {TIMEOUT}\n'
                              f'[drivers.vm1]\nchannel = "{channel}"\n')
            mount = stack.enter_context(mounted(root, config=config))
            mount.start_standby()
            guest = stack.enter_context(Guest(
                SCRIPT, memory_mib=384, cpus=1,
                channels={PORT_NAME: channel, CONTROL_PORT: control_path}))
            wait_for(control_path.exists, 60, "QEMU's test port")
            control = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            wait_for(lambda: control.connect_ex(str(control_path)) == 0, 10, "connected")
            console = Console(guest, control)

            def registered() -> bool:
                return "vm1" in pool(mount)["drivers"]

            console.do("start")
            wait_for(registered, 120, "the guest's driver registers")
            entry = pool(mount)["drivers"]["vm1"]
            assert entry["bytes"] > 0 and entry["processes"] >= 2, entry
            # Its share is the guest's unused code-page bytes as readelf counts
            # them there (once the driver's rescan no longer sees the count).
            control.sendall(b"count\n")
            counted = json.loads(console.expect("guest: slack ").split(" ", 2)[2])
            console.expect("guest: done count")
            wait_for(lambda: pool(mount)["drivers"]["vm1"]["bytes"] == counted["physical_bytes"],
                     30, f"the share is {counted['physical_bytes']} bytes")
            console.do("stop")
            assert not registered()  # revoked before the driver exited
            console.do("start")
            wait_for(registered, 120, "the driver registers again")
            mount.kill_for_takeover()
            wait_for(registered, 60, "the driver registers with the new daemon")
            console.do("kill")
            waited = wait_for(lambda: not registered(), 4 * TIMEOUT, "revoked after silence")
            assert waited >= TIMEOUT / 2, waited  # revoked by the timeout, not at once
            console.do("start")
            wait_for(registered, 120, "registered after the kill")
            control.sendall(b"off\n")
            guest.wait(120)
            wait_for(lambda: not registered(), 5, "revoked when the guest powered off")
            log = daemon_log_tail(mount, 400)
            assert "driver vm1 revoked (silent past the timeout)" in log, log
    finally:
        remove_tree(root)
