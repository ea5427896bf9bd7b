"""The daemon speaks systemd's protocols: sd_notify readiness, the file
descriptor store and journal priorities.

The daemon runs in the foreground as systemd would start it, with
NOTIFY_SOCKET pointing at a datagram socket the test listens on, and its
stderr made the journal stream (JOURNAL_STREAM names its device and inode).
The test plays systemd's part (no systemd runs here as the service manager).
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
    receive_with_fds,
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
            stored = {}
            while (message := receive_with_fds(sock))[0] != b"READY=1":
                text, fds = message
                if text.startswith(b"FDSTORE=1"):
                    assert len(fds) == 1, text
                    stored[text.split(b"FDNAME=")[1]] = fds[0]
                else:
                    assert text.startswith(b"FDSTOREREMOVE=1"), text
            # The connection, for a restarted daemon: /dev/fuse and the memo, stored
            # under the name it had before it was the memo (handover.MEMO_NAME).
            assert sorted(stored) == [b"fuse", b"fuse-session"]
            assert os.readlink(f"/proc/self/fd/{stored[b'fuse']}") == "/dev/fuse"
            assert os.readlink(f"/proc/self/fd/{stored[b'fuse-session']}").startswith(
                "/memfd:swapfs-session")
            for fd in stored.values():
                os.close(fd)
            assert is_mounted(mnt)
            (mnt / "chain").mkdir()  # the mount serves once READY=1 is sent
            daemon.send_signal(signal.SIGTERM)
            assert receive_with_fds(sock)[0] == b"STOPPING=1"
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
