"""How many control connections each peer may hold, and a standby that is
told to try again.

The bounds are plain counting (mountd/limits.py), tested without a daemon;
tests/security/test_permissions.py holds every connection a group member may open
against a real daemon.
"""

import errno
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.limits import ConnectionLimits
from mountd.peercred import Peer
from mountd.takeover import handover, standby
from tests.mounting import remove_tree, short_tempdir

ROOT = Peer(pid=1, uid=0)


def fill(limits: ConnectionLimits, peer: Peer) -> int:
    """Add connections of *peer* until one is refused; how many were added."""
    count = 0
    while limits.refusal(peer) is None:
        limits.add(peer)
        count += 1
    return count


def test_each_user_and_each_guest_has_its_bound() -> None:
    limits = ConnectionLimits(total=64, root_reserve=8, per_uid=5, per_cid=2)
    assert fill(limits, Peer(pid=2, uid=1000)) == 5
    assert fill(limits, Peer(pid=3, uid=1001)) == 5  # another user: its own bound
    assert fill(limits, Peer(cid=5)) == 2
    assert fill(limits, Peer(cid=6)) == 2
    assert "holds 5" in (limits.refusal(Peer(pid=4, uid=1000)) or "")
    limits.remove(Peer(pid=2, uid=1000))
    assert limits.refusal(Peer(pid=9, uid=1000)) is None  # one closed: one more
    assert limits.open == 13


def test_peers_other_than_root_leave_roots_reserve() -> None:
    limits = ConnectionLimits(total=16, root_reserve=4, per_uid=16, per_cid=16)
    assert fill(limits, Peer(pid=2, uid=1000)) == 12
    assert limits.refusal(Peer(cid=5)) is not None  # the others' share is taken
    assert fill(limits, ROOT) == 4  # root gets the reserve
    assert limits.refusal(ROOT) == "16 control connections open already"
    for _ in range(12):
        limits.remove(Peer(pid=2, uid=1000))
    assert fill(limits, ROOT) == 12  # and may use every connection
    assert limits.refusal(Peer(pid=2, uid=1000)) is not None


def test_a_reserve_must_leave_room() -> None:
    with pytest.raises(ValueError):
        ConnectionLimits(total=4, root_reserve=4)


@pytest.fixture
def busy_daemon() -> Iterator[tuple[str, list[int]]]:
    """A stand-in daemon on a Unix socket: it refuses the first two
    keeper.attach with EAGAIN (before reading them, as a busy daemon may),
    then answers the third with two descriptors. Yields the socket's path
    and the errnos it answered."""
    directory = short_tempdir()
    path = str(directory / "control.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(30)
    answered: list[int] = []
    read_fd, write_fd = os.pipe()

    def serve() -> None:
        for attempt in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                if attempt < 2:
                    conn.sendall(json.dumps({"ok": False, "errno": errno.EAGAIN,
                                             "error": "busy"}).encode() + b"\n")
                    answered.append(errno.EAGAIN)
                    continue
                conn.makefile("rb").readline()
                reply = json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\n"
                answered.append(0)  # before the reply, which the test may check at once
                conn.sendmsg([reply], handover.rights([read_fd, write_fd]))
                conn.recv(1)  # until the standby hangs up

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield path, answered
    finally:
        listener.close()
        thread.join(timeout=30)
        os.close(read_fd)
        os.close(write_fd)
        remove_tree(Path(directory))


def test_a_standby_attaches_after_eagain(busy_daemon: tuple[str, list[int]]) -> None:
    path, answered = busy_daemon
    status, fuse_fd, memo_fd, link = standby.attach(path)
    try:
        assert status["pid"] == os.getpid()
        assert answered == [errno.EAGAIN, errno.EAGAIN, 0]
    finally:
        os.close(fuse_fd)
        os.close(memo_fd)
        link.close()
