"""No core dumps: the daemon, the standby and the driver keep their memory
(the master key, chain keys, plaintext pages and records) out of any.

What the kernel says is read from outside the process where it shows
there: ``/proc/PID/coredump_filter`` and the core file size in
``/proc/PID/limits``. The dumpable flag shows from outside only for a
process that is not root (its ``/proc/PID`` files turn root's), so it is
read that way in a child made nobody, and through ``prctl`` itself in the
daemon, which reports it in ``swapfs status``.
"""

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount, alive, requires_mount, short_tempdir, wait_until

NOBODY = 65534
_SCRIPT = Path(sys.executable).parent / "swapfs-driver"
DRIVER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "swapfs.guest.driver"]


def core_dumps_off(pid: int) -> bool:
    """No mapping in a dump, and no dump allowed: what /proc shows of *pid*."""
    with open(f"/proc/{pid}/coredump_filter") as dump_filter:
        if int(dump_filter.read(), 16) != 0:
            return False
    with open(f"/proc/{pid}/limits") as limits:
        core = next(line for line in limits if line.startswith("Max core file size"))
    return core.split()[4:6] == ["0", "0"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_forbidding_core_dumps_clears_the_dumpable_flag_as_seen_from_outside() -> None:
    """In a child made nobody, then dumpable again (a change of user clears
    the flag by itself): its /proc files are its own until it forbids core
    dumps, then root's; and prctl says the same."""
    script = textwrap.dedent(f"""
        import ctypes, os
        from swapfs.control import nodump
        os.setgroups([])
        os.setgid({NOBODY})
        os.setuid({NOBODY})
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1
        print(os.stat("/proc/self/environ").st_uid, nodump.dumpable())
        print(nodump.forbid_core_dumps())
        print(os.stat("/proc/self/environ").st_uid, nodump.dumpable())
        print(open("/proc/self/coredump_filter").read().strip())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd="/", timeout=60)
    assert result.stdout.split("\n") == [f"{NOBODY} True", "True", "0 False", "00000000", ""], (
        result.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower a hard limit check")
def test_a_child_cannot_raise_the_core_limit_again() -> None:
    script = textwrap.dedent("""
        import resource
        from swapfs.control import nodump
        nodump.forbid_core_dumps()
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))
        except ValueError:
            print("refused")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "refused\n", result.stderr


@requires_mount
@pytest.mark.mount
def test_the_daemon_and_its_standby_forbid_core_dumps(mount: Mount) -> None:
    assert mount.pid is not None
    assert mount.status()["core_dumps_off"] is True  # the kernel's answer (PR_GET_DUMPABLE)
    assert core_dumps_off(mount.pid)
    standby = mount.start_standby()
    assert core_dumps_off(standby)


@pytest.fixture
def silent_socket() -> Iterator[Path]:
    """A socket that takes connections and never answers."""
    root = short_tempdir()
    path = root / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)
        yield path
    os.unlink(path)
    os.rmdir(root)


@pytest.mark.parametrize("command", ["run", "secret"])
def test_the_driver_forbids_core_dumps(silent_socket: Path, command: str) -> None:
    """``run`` holds the key it agrees with the daemon; ``secret`` a record's
    plaintext. Each waits on a socket that never answers, dumps forbidden."""
    args = (["run", "--socket", str(silent_socket), "--name", "t", "--pid", str(os.getpid())]
            if command == "run" else ["secret", "get", "r", "--agent", str(silent_socket)])
    driver = subprocess.Popen([*DRIVER, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: driver.poll() is not None or core_dumps_off(driver.pid), 30)
        assert alive(driver.pid) and driver.poll() is None
    finally:
        driver.kill()
        driver.wait()
