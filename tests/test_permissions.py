"""Nobody but root reads what swap holds.

The state directory is 0700 and every file in it 0600, however it was made
(swapfs/statedir.py); swap files are created 0600 and clones keep that;
``swapfs swapon`` refuses a file that others could read. Tried as an
ordinary user (``nobody``, through setpriv, so that the test adds no user
to the system): the state, the control socket and the mount are each
refused.
"""

import errno
import json
import os
import stat
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from mountd import peercred
from mountd.controlserver import ControlServer
from mountd.drivers import DriverManager, Session
from mountd.peercred import Peer
from swapfs import protocol, swaparea
from swapfs.errors import SwapfsError
from swapfs.fs import Operations
from swapfs.index import ROOT_INO
from swapfs.transient import TransientCache
from swapfs.volume import Volume
from tests.mounting import SWAPFS, Mount, mounted, requires_mount

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def loose_bits(root: Path) -> dict[str, str]:
    """Every path under *root* (itself too) with group or other bits, and its mode."""
    found = {}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found[str(path.relative_to(root))] = f"{mode:04o}"
    return found


def test_a_state_made_loose_is_tightened_when_opened(state_dir: Path) -> None:
    with closing(Volume(state_dir)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        vol.write(vol.create(chain.ino, b"f", 0o644, 0, 0).ino, 0, b"secret" * 700)
        assert stat.S_IMODE(vol.resolve("c/f").mode) == 0o600  # 0644 asked, 0600 made
    assert loose_bits(state_dir) == {}
    subprocess.run(["chmod", "-R", "go+rX", str(state_dir)], check=True)
    assert loose_bits(state_dir)
    with closing(Volume(state_dir)):
        assert loose_bits(state_dir) == {}


@requires_mount
@pytest.mark.mount
def test_an_ordinary_user_is_refused_everywhere(mount: Mount) -> None:
    umask = os.umask(0o022)  # a usual umask: swapfs must not rely on it
    try:
        os.mkdir(mount.path("c"))
        mount.path("c", "f").write_bytes(b"password=hunter2".ljust(4096, b"\0"))
        mount.path("c", "f").chmod(0o644)  # even so: the mount serves root only
        subprocess.run([*SWAPFS, "clone", str(mount.path("c", "f")),
                        str(mount.path("c", "g"))], check=True)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(mount.path("c", "g").stat().st_mode) == 0o644  # a clone keeps it
    assert loose_bits(mount.state) == {}

    def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*NOBODY, *command], capture_output=True, text=True)

    for path in (mount.state, mount.state / "index.lmdb" / "data.mdb",
                 mount.state / "daemon.log", mount.path("c", "f")):
        result = as_nobody("cat", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, path
    socket_path = protocol.socket_of(str(mount.mnt))
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({socket_path!r})"
    result = as_nobody("/usr/bin/python3", "-c", connect)
    assert result.returncode != 0 and "PermissionError" in result.stderr


@requires_mount
@pytest.mark.mount
def test_swapon_refuses_a_file_others_can_read(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "swap")
    path.touch()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.truncate(path, 64 << 20)
    path.chmod(0o640)
    with pytest.raises(SwapfsError) as caught:
        swaparea.swap_on(str(path))
    assert caught.value.errno == errno.EACCES and "0640" in str(caught.value)
    assert swaparea.devices_of(os.path.realpath(path)) == []  # nothing was attached



@requires_mount
@pytest.mark.mount
def test_the_daemon_serves_root_only_even_on_a_socket_opened_to_all(mount: Mount) -> None:
    """SO_PEERCRED, not the socket's mode alone: loosened by hand, the socket
    still answers an ordinary user EACCES, and the log names the peer."""
    socket_path = protocol.socket_of(str(mount.mnt))
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (mount.root, mount.state)}
    for path in modes:
        path.chmod(0o711)
    os.chmod(socket_path, 0o666)
    try:
        request = ("import socket; s = socket.socket(socket.AF_UNIX); "
                   f"s.connect({socket_path!r}); s.sendall(b'{{\"op\": \"stats\"}}\\n'); "
                   "print(s.makefile().readline())")
        result = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", request],
                                capture_output=True, text=True)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        os.chmod(socket_path, 0o600)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert (reply["ok"], reply["errno"]) == (False, errno.EACCES)
    assert "uid 65534" in (mount.state / "daemon.log").read_text()
    assert mount.stats()["chains"] == {}  # root is served as before


def test_who_may_connect() -> None:
    cids = frozenset({5})
    assert peercred.refusal(Peer(pid=1, uid=0), cids) is None
    assert peercred.refusal(Peer(pid=1, uid=1000), cids) == "only root is served"
    assert peercred.refusal(Peer(cid=5), cids) is None
    assert peercred.refusal(Peer(cid=6), cids) == "its CID is not in vsock_cids"
    assert str(Peer(cid=6)) == "vsock CID 6" and str(Peer(pid=7, uid=8)) == "pid 7 uid 8"


def test_a_guest_sends_driver_messages_only(state_dir: Path) -> None:
    """Over vsock (a session whose peer is a CID; this machine has no vsock),
    commands that change or reveal the host's state are EACCES."""
    with closing(Volume(state_dir)) as volume:
        drivers = DriverManager(TransientCache(1 << 20), 30)
        server = ControlServer(volume, "/mnt", Operations(volume), {}, drivers,
                               vsock_cids=frozenset({5}))
        guest, host = Session(Peer(cid=5)), Session(Peer(pid=1, uid=0))
        for op in ("status", "stats", "clone", "priority", "keeper.attach"):
            reply = server.answer(json.dumps({"op": op}).encode(), guest)
            assert (reply["ok"], reply["errno"]) == (False, errno.EACCES), op
        assert server.answer(b'{"op": "stats"}', host)["ok"]
        register = {"op": "driver.register", "driver": "guest-1", "extents": []}
        assert server.answer(json.dumps(register).encode(), guest)["ok"]


#: As another user: connect to a Unix socket (argv[1]) and send each
#: request of argv[2:], "PID" replaced by this process's pid; print each
#: reply, or "refused" if the connection was.
_CLIENT = """
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("refused")
    sys.exit()
reader = sock.makefile()
for request in sys.argv[2:]:
    sock.sendall(request.replace('"PID"', str(os.getpid())).encode() + b"\\n")
    print(reader.readline().strip())
"""


def ask_as(user: list[str], socket_path: str, *requests: dict[str, object]) -> list[str]:
    """The replies to *requests* sent as *user* (a setpriv prefix), with the
    system's Python alone; ["refused"] if the connection was."""
    return subprocess.run(
        [*user, "/usr/bin/python3", "-c", _CLIENT, socket_path,
         *(json.dumps(request) for request in requests)],
        capture_output=True, text=True, check=True).stdout.splitlines()


def _extent(pid: object) -> dict[str, object]:
    return {"pid": pid, "path": "/bin/prog", "device": "fe:00", "inode": 7,
            "address": 4096, "length": 4096, "segment": 0, "part": "tail"}


@requires_mount
@pytest.mark.mount
def test_a_control_group_is_served_and_its_drivers_report_only_their_own(
        tmp_path: Path) -> None:
    """With ``control_group``, its members are served (the socket moves to
    /run/swapfs, 0660), others are not; a member's driver may not claim
    root's processes, only its own."""
    config = tmp_path / "group.toml"
    config.write_text('control_group = "4242"\n')
    member = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=4242", "--"]
    with mounted(config=config) as mount:
        socket_path = protocol.socket_of(str(mount.mnt))
        info = os.stat(socket_path)
        assert socket_path.startswith("/run/swapfs/")
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, 4242)

        assert ask_as(NOBODY, socket_path, {"op": "stats"}) == ["refused"]
        (stats,) = ask_as(member, socket_path, {"op": "stats"})
        assert json.loads(stats)["ok"] is True
        (claim,) = ask_as(member, socket_path, {"op": "driver.register",
                                                "driver": "claims-root",
                                                "extents": [_extent(1)]})
        assert json.loads(claim)["errno"] == errno.EACCES and "pid 1" in claim
        (own,) = ask_as(member, socket_path, {"op": "driver.register", "driver": "its-own",
                                              "extents": [_extent("PID")]})
        assert json.loads(own)["ok"] is True, own
        log = (mount.state / "daemon.log").read_text()
        assert "uid 65534 may report only its own processes, not pid 1" in log
