"""The daemon speaks systemd's protocols: sd_notify readiness and journal priorities.

The daemon runs in the foreground as systemd would start it, with
NOTIFY_SOCKET pointing at a datagram socket the test listens on, and its
stderr made the journal stream (JOURNAL_STREAM names its device and inode).
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import (
    alive,
    is_mounted,
    lazy_unmount,
    remove_tree,
    requires_mount,
    short_tempdir,
    wait_until,
)

pytestmark = [requires_mount, pytest.mark.mount]


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock
    finally:
        sock.close()


def test_ready_then_stopping_and_journal_priorities() -> None:
    root = short_tempdir()
    mnt, state, log_path = root / "m", root / "s", root / "stderr"
    mnt.mkdir()
    daemon = None
    try:
        with notify_socket(root / "notify") as sock, open(log_path, "wb") as log:
            info = os.fstat(log.fileno())
            env = dict(os.environ, NOTIFY_SOCKET=str(root / "notify"),
                       JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
            daemon = subprocess.Popen(
                [sys.executable, "-m", "mountd", "--state", str(state), str(mnt)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            assert sock.recv(256) == b"READY=1"
            assert is_mounted(mnt)
            (mnt / "chain").mkdir()  # the mount serves once READY=1 is sent
            daemon.send_signal(signal.SIGTERM)
            assert sock.recv(256) == b"STOPPING=1"
            assert daemon.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        lines = log_path.read_text().splitlines()
        assert lines and all(line.startswith("<") and line[2] == ">" for line in lines), lines
        assert any(line.startswith("<6>mountd.daemon: serving") for line in lines), lines
    finally:
        if daemon is not None and alive(daemon.pid):
            daemon.kill()
            wait_until(lambda: not alive(daemon.pid))
        lazy_unmount(mnt)
        remove_tree(root)
