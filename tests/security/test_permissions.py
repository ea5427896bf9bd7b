"""Nobody but root reads what swap holds.

The state directory is 0700 and every file in it 0600, however it was made
(swapfs/engine/statedir.py); swap files are created 0600 and clones keep that;
``swapfs swapon`` refuses a file that others could read. Tried as an
ordinary user (``nobody``, through setpriv, so that the test adds no user
to the system): the state, the control socket and the mount are each
refused. On the control socket, who may do what is one table
(mountd/access.py): each action is tried as each kind of peer, in process
and on a real socket as root, a ``control_group`` member (``setpriv
--groups``), that member's registered driver and another user; group
membership is checked exact, and driver names bound to their peer.
"""

import errno
import json
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from mountd import access, controlserver, peercred
from mountd.access import Binding, Kind
from mountd.controlserver import BadRequest, Refused
from mountd.drivers import DriverManager, Session
from mountd.peercred import Peer
from mountd.takeover import standby
from swapfs.cache import TransientCache
from swapfs.cli import swaparea
from swapfs.control import DriverError, protocol
from swapfs.engine import ROOT_INO, SwapfsError, Volume
from tests.mounting import (
    SWAPFS,
    Mount,
    mounted,
    remove_tree,
    requires_mount,
    short_tempdir,
    wait_until,
)

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



#: As nobody: connect to the socket (argv[1]) argv[2] times, each time send
#: a stats request, every other time after a pause, and print the reply. A
#: refusal sent before the request was read would make the send fail with a
#: broken pipe whenever the daemon answered first (after the pause, always).
_REFUSED_CLIENT = """
import socket, sys, time
for number in range(int(sys.argv[2])):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(sys.argv[1])
        if number % 2:
            time.sleep(0.1)
        sock.sendall(b'{"op": "stats"}\\n')
        print(sock.makefile().readline().strip())
"""


@requires_mount
@pytest.mark.mount
def test_the_daemon_serves_root_only_even_on_a_socket_opened_to_all(mount: Mount) -> None:
    """SO_PEERCRED, not the socket's mode alone: loosened by hand, the socket
    still answers an ordinary user EACCES, every time, however soon or late
    the request comes (the daemon reads it before it refuses, for up to
    1 s), and the log names the peer."""
    socket_path = protocol.socket_of(str(mount.mnt))
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (mount.root, mount.state)}
    for path in modes:
        path.chmod(0o711)
    os.chmod(socket_path, 0o666)
    try:
        result = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", _REFUSED_CLIENT,
                                 socket_path, "20"], capture_output=True, text=True)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        os.chmod(socket_path, 0o600)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(reply["ok"], reply["errno"]) for reply in replies] == [(False, errno.EACCES)] * 20
    assert "uid 65534" in (mount.state / "daemon.log").read_text()
    assert mount.stats()["chains"] == {}  # root is served as before


# -- who may do what ----------------------------------------------------------------------

ROOT = Peer(pid=1, uid=0, gid=0, groups=frozenset())
MEMBER = Peer(pid=2, uid=1000, gid=1000, groups=frozenset({4242}))
STRANGER = Peer(pid=3, uid=1001, gid=1001, groups=frozenset({42420}))
GUEST = Peer(cid=5)


def test_who_may_connect() -> None:
    cids = frozenset({5})
    for peer, group, kinds, why in (
            (ROOT, None, {Kind.ROOT}, None),
            (MEMBER, None, set(), "only root is served"),
            (MEMBER, 4242, {Kind.GROUP}, None),
            (STRANGER, 4242, set(), "only root is served and group 4242"),
            (GUEST, None, {Kind.GUEST}, None),
            (Peer(cid=6), 4242, set(), "its CID is not in vsock_cids"),
            # uid 0 inside a guest is not the host's root
            (Peer(cid=6, uid=0), None, set(), "its CID is not in vsock_cids"),
            # the daemon dialed its channel: a guest, never root
            (Peer(channel="/run/vm1.sock"), None, {Kind.GUEST}, None),
            (Peer(channel="/run/vm1.sock", uid=0), 4242, {Kind.GUEST}, None)):
        assert access.kinds_of(peer, cids, group) == kinds, peer
        assert access.connection_refusal(peer, frozenset(kinds), group) == why, peer
    assert str(Peer(cid=6)) == "vsock CID 6" and str(Peer(pid=7, uid=8)) == "pid 7 uid 8"
    assert str(Peer(channel="/run/vm1.sock")) == "the guest on channel /run/vm1.sock"
    assert not Peer(channel="/run/vm1.sock", uid=0).is_root


def test_a_channel_name_is_registered_from_its_channel_alone() -> None:
    bindings = {"vm1": Binding(channel="/run/vm1.sock"), "vm2": Binding(channel="/run/vm2.sock")}
    assert access.name_refusal("vm1", Peer(channel="/run/vm1.sock"), bindings) is None
    for peer in (Peer(channel="/run/vm2.sock"), ROOT, GUEST, MEMBER):
        assert access.name_refusal("vm1", peer, bindings) == \
            "driver 'vm1' is bound to channel /run/vm1.sock", peer
    # A channel's guest registers no unbound name, as any guest.
    assert access.name_refusal("free", Peer(channel="/run/vm1.sock"), bindings) is not None


#: Who may ask what, written out here so that a change to mountd/access.py's
#: table must be made twice: root's alone are what hands over the mount
#: (keeper.attach), reaches a tenant's data (clone, the host's secret) or
#: changes it (a priority set).
EXPECTED = {
    "status": {"root", "group"},
    "stats": {"root", "group"},
    "priority": {"root", "group"},
    "priority.set": {"root"},
    "clone": {"root"},
    "secret": {"root"},
    "keeper.attach": {"root"},
    "driver.register": {"root", "group", "guest"},
    "driver.update": {"driver"},
    "driver.heartbeat": {"driver"},
    "driver.stop": {"driver"},
    "driver.secret.put": {"driver"},
    "driver.secret.get": {"driver"},
    "driver.secret.rm": {"driver"},
}

#: One request of each action (for a file c/f and a driver "its-own").
REQUESTS: dict[str, dict[str, Any]] = {
    "status": {"op": "status"},
    "stats": {"op": "stats"},
    "priority": {"op": "priority", "path": "c/f"},
    "priority.set": {"op": "priority", "path": "c/f", "priority": 5},
    "clone": {"op": "clone", "source": "c/f", "target": "c/stolen"},
    "secret": {"op": "secret", "action": "get", "driver": "its-own", "name": "note"},
    "keeper.attach": {"op": "keeper.attach"},
    "driver.register": {"op": "driver.register", "driver": "its-own", "extents": []},
    "driver.update": {"op": "driver.update", "driver": "its-own", "token": "TOKEN",
                      "extents": []},
    "driver.heartbeat": {"op": "driver.heartbeat", "driver": "its-own", "token": "TOKEN"},
    "driver.stop": {"op": "driver.stop", "driver": "its-own", "token": "TOKEN"},
    "driver.secret.put": {"op": "driver.secret.put", "driver": "its-own", "token": "TOKEN",
                          "name": "note", "sealed": protocol.encode_bytes(bytes(60))},
    "driver.secret.get": {"op": "driver.secret.get", "driver": "its-own", "token": "TOKEN",
                          "name": "note"},
    "driver.secret.rm": {"op": "driver.secret.rm", "driver": "its-own", "token": "TOKEN",
                         "name": "note"},
}


def test_the_table_says_who_may_do_what() -> None:
    assert {action: {kind.value for kind in kinds}
            for action, kinds in access.PERMISSIONS.items()} == EXPECTED
    assert set(REQUESTS) == set(EXPECTED)
    for action, request in REQUESTS.items():
        assert access.action_of(request) == action


def test_every_action_as_every_kind_of_peer() -> None:
    """authorize() before dispatch: each action against each kind of peer,
    a registered driver's session too; a refusal is EACCES and logged."""
    registered = Session(MEMBER, frozenset({Kind.GROUP}))
    registered.name = "its-own"
    sessions = {"root": Session(ROOT, frozenset({Kind.ROOT})),
                "group": Session(MEMBER, frozenset({Kind.GROUP})),
                "guest": Session(GUEST, frozenset({Kind.GUEST})),
                "driver": registered}
    for action, request in REQUESTS.items():
        for kind, session in sessions.items():
            may = kind in EXPECTED[action] or (kind == "driver" and "group" in EXPECTED[action])
            if may:
                assert controlserver.authorize(request, session) == action, (action, kind)
            else:
                with pytest.raises(Refused) as caught:
                    controlserver.authorize(request, session)
                assert caught.value.errno == errno.EACCES, (action, kind)
    with pytest.raises(BadRequest):
        controlserver.authorize({"op": "nothing"}, sessions["root"])


def test_group_membership_is_exact() -> None:
    """Primary and supplementary groups count; 42420 is not 4242."""
    assert peercred.in_group(Peer(pid=2, uid=1, gid=4242, groups=frozenset()), 4242)
    assert peercred.in_group(Peer(pid=2, uid=1, gid=7, groups=frozenset({9, 4242})), 4242)
    assert not peercred.in_group(Peer(pid=2, uid=1, gid=42420,
                                      groups=frozenset({42420, 424})), 4242)
    assert not peercred.in_group(Peer(pid=2, uid=1, gid=7, groups=frozenset({42420})), 4242)
    assert not peercred.in_group(GUEST, 4242)
    assert peercred.status_groups("Uid:\t0\nGroups:\t42420 424 \nNgid:\t0\n") \
        == frozenset({42420, 424})
    assert peercred.status_groups("Groups:\t\n") == frozenset()


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv needs root")
def test_the_groups_come_from_the_socket_and_from_proc() -> None:
    """SO_PEERGROUPS, read at connect: a process whose groups are 42420, 100
    and 300 others (more than one call's first buffer, and than Python's
    getsockopt could read), primary 65534, is a member of those and not of
    4242; /proc, read where the kernel has no SO_PEERGROUPS, says the same."""
    groups = {42420, 100, *range(50000, 50300)}
    directory = short_tempdir()  # in /tmp: uid 65534 may enter it once it is 0755
    directory.chmod(0o755)
    path = str(directory / "s.sock")
    listener = socket.socket(socket.AF_UNIX)
    client = None
    try:
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(1)
        connect = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
                   f"s.connect({path!r}); sys.stdin.read()")
        client = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534",
                                   f"--groups={','.join(map(str, sorted(groups)))}", "--",
                                   "/usr/bin/python3", "-c", connect], stdin=subprocess.PIPE)
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            peer = peercred.of_socket(conn)
            assert (peer.pid, peer.uid, peer.gid) == (client.pid, 65534, 65534)
            assert peer.groups == groups
            from_proc = Peer(pid=peer.pid, uid=peer.uid, gid=peer.gid, groups=None)
            for who in (peer, from_proc):
                assert peercred.in_group(who, 42420) and peercred.in_group(who, 100)
                assert peercred.in_group(who, 65534)  # the primary group
                assert not peercred.in_group(who, 4242)
    finally:
        listener.close()
        if client is not None:
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=30)
        remove_tree(directory)


def test_a_driver_name_bound_to_a_peer_is_refused_from_any_other() -> None:
    bindings = {"vm1": Binding(cid=5), "backup": Binding(uid=1000)}
    manager = DriverManager(TransientCache(1 << 20), 30, bindings)

    def register(peer: Peer, name: str) -> int:
        try:
            manager.handle(Session(peer), {"op": "driver.register", "driver": name,
                                           "extents": []})
        except DriverError as exc:
            return exc.errno
        manager.close(manager.sessions[name], "test")
        return 0

    assert register(GUEST, "vm1") == 0
    assert register(Peer(cid=6), "vm1") == errno.EACCES  # another guest
    assert register(ROOT, "vm1") == errno.EACCES  # root too: vm1 is that guest's
    assert register(MEMBER, "backup") == 0
    assert register(STRANGER, "backup") == errno.EACCES
    assert register(Peer(cid=1000), "backup") == errno.EACCES  # a CID is not a uid
    assert register(ROOT, "unbound") == 0  # root may name any unbound driver
    assert register(MEMBER, "unbound") == errno.EACCES
    assert register(GUEST, "unbound") == errno.EACCES
    assert manager.sessions == {}


def test_the_docs_show_the_table() -> None:
    """docs/configuration.md's table of who may do what is the code's."""
    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    section = text.split("## Who may do what", 1)[1].split("\n## ", 1)[0]
    kinds = ["root", "group", "guest", "driver"]
    documented = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z.]+)`.*", cells[0]) if len(cells) == 5 else None
        if match:
            documented[match.group(1)] = {kind for kind, cell in zip(kinds, cells[1:], strict=True)
                                          if cell == "yes"}
    assert documented == EXPECTED


#: As another user: connect to a Unix socket (argv[1]) and send each
#: request of argv[2:], "PID" replaced by this process's pid and "TOKEN" by
#: the last token a reply gave; print each reply, then "descriptors: N" if
#: it carried descriptors, "closed" if the connection ended instead of a
#: reply, or "refused" if the connection was.
_CLIENT = """
import array, json, os, socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("refused")
    sys.exit()
token = ""
for request in sys.argv[2:]:
    request = request.replace('"PID"', str(os.getpid()))
    request = request.replace('"TOKEN"', json.dumps(token))
    try:
        sock.sendall(request.encode() + b"\\n")
    except BrokenPipeError:
        pass
    line, fds = b"", []
    try:
        while not line.endswith(b"\\n"):
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(64))
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds += array.array("i", payload[:len(payload) - len(payload) % 4])
            if not data:
                break
            line += data
    except ConnectionResetError:
        pass
    if not line:
        print("closed")
        break
    print(line.decode().strip())
    token = json.loads(line).get("token", token)
    if fds:
        print("descriptors: %d" % len(fds))
        for fd in fds:
            os.close(fd)
"""


def ask_as(user: list[str], socket_path: str, *requests: Mapping[str, object]
           ) -> list[str]:
    """The replies to *requests* sent as *user* (a setpriv prefix) on one
    connection, with the system's Python alone; ["refused"] if the connection
    was (see _CLIENT for the other lines)."""
    return subprocess.run(
        [*user, "/usr/bin/python3", "-c", _CLIENT, socket_path,
         *(json.dumps(request) for request in requests)],
        capture_output=True, text=True, check=True).stdout.splitlines()


def _extent(pid: object) -> dict[str, object]:
    return {"pid": pid, "path": "/bin/prog", "device": "fe:00", "inode": 7,
            "address": 4096, "length": 4096, "segment": 0, "part": "tail"}


MEMBER_USER = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=4242", "--"]
#: The group mount: 16 control connections, 4 of them root's alone.
GROUP_CONFIG = """\
control_group = "4242"
control_max_connections = 16
control_root_reserve = 4
control_max_per_uid = 16

[drivers.its-own]
uid = 65534

[drivers.claims-root]
uid = 65534

[drivers.roots]
uid = 0
"""


@pytest.fixture(scope="module")
def group_mount() -> Iterator[Mount]:
    """A mount that serves group 4242 besides root, with a file c/f."""
    root = short_tempdir()
    try:
        config = root / "group.toml"
        config.write_text(GROUP_CONFIG)
        with mounted(root=root, config=config) as mount:
            os.mkdir(mount.path("c"))
            mount.path("c", "f").write_bytes(b"root's swap".ljust(4096, b"\0"))
            yield mount
    finally:
        remove_tree(root)


def refused(lines: list[str]) -> bool:
    """Was the first request refused EACCES, with no descriptor, and the
    connection closed after it?"""
    if len(lines) != 2 or lines[1] != "closed":
        return False
    reply = json.loads(lines[0])
    return reply["ok"] is False and reply["errno"] == errno.EACCES


@requires_mount
@pytest.mark.mount
def test_a_control_group_is_served_and_its_drivers_report_only_their_own(
        group_mount: Mount) -> None:
    """With ``control_group``, its members are served (the socket moves to
    /run/swapfs, 0660), others are not; a member's driver may not claim
    root's processes, only its own."""
    mount = group_mount
    socket_path = protocol.socket_of(str(mount.mnt))
    info = os.stat(socket_path)
    assert socket_path.startswith("/run/swapfs/")
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, 4242)

    assert ask_as(NOBODY, socket_path, {"op": "stats"}) == ["refused"]
    (stats,) = ask_as(MEMBER_USER, socket_path, {"op": "stats"})
    assert json.loads(stats)["ok"] is True
    (claim,) = ask_as(MEMBER_USER, socket_path, {"op": "driver.register",
                                                 "driver": "claims-root",
                                                 "extents": [_extent(1)]})
    assert json.loads(claim)["errno"] == errno.EACCES and "pid 1" in claim
    (own,) = ask_as(MEMBER_USER, socket_path, {"op": "driver.register", "driver": "its-own",
                                               "extents": [_extent("PID")]})
    assert json.loads(own)["ok"] is True, own
    log = (mount.state / "daemon.log").read_text()
    assert "uid 65534 may report only its own processes, not pid 1" in log


@requires_mount
@pytest.mark.mount
def test_a_group_member_gets_neither_the_connection_nor_roots_data(
        group_mount: Mount) -> None:
    """The defect: a member was handed /dev/fuse by keeper.attach, cloned
    root's swap file and passed secret's check. Each of root's actions is
    now EACCES, carries no descriptor, closes the connection and is logged."""
    mount = group_mount
    socket_path = protocol.socket_of(str(mount.mnt))
    for action in ("keeper.attach", "secret", "clone", "priority.set"):
        lines = ask_as(MEMBER_USER, socket_path, REQUESTS[action], {"op": "status"})
        assert refused(lines), (action, lines)
        assert not any(line.startswith("descriptors") for line in lines)
        assert f"{action} of pid " in (mount.state / "daemon.log").read_text()
    put = {"op": "secret", "action": "put", "driver": "its-own", "name": "x",
           "value": protocol.encode_bytes(b"from nobody")}
    assert refused(ask_as(MEMBER_USER, socket_path, put, {"op": "status"}))
    assert not mount.path("c", "stolen").exists()
    assert mount.status()["keeper"] is None  # nobody keeps the mount
    reply = protocol.request(socket_path, {"op": "priority", "path": "c/f"})
    assert reply["priority"] == 0


@requires_mount
@pytest.mark.mount
def test_every_action_as_every_kind_of_peer_on_the_socket(group_mount: Mount) -> None:
    """Root, a member, a member's registered driver and another user (the
    socket loosened by hand), each action on a connection of its own: a
    refusal is EACCES and ends the connection; what the table allows is
    answered (ok, or an error that is not EACCES) and the connection stays."""
    mount = group_mount
    socket_path = protocol.socket_of(str(mount.mnt))

    def allowed(lines: list[str]) -> bool:
        reply = json.loads(lines[0])
        return (len(lines) >= 2 and lines[1] != "closed"
                and (reply["ok"] or reply["errno"] != errno.EACCES))

    def unregistered(name: str) -> None:
        """Wait until the daemon saw the last connection that registered
        *name* end: registered again before, it would be EBUSY."""
        assert wait_until(lambda: name not in protocol.request(
            socket_path, {"op": "stats"})["transient_cache"]["drivers"], 10)

    status = {"op": "status"}
    for action, request in REQUESTS.items():
        if action == "keeper.attach":
            continue  # as root below: it makes the caller the mount's keeper
        unregistered("its-own")
        lines = ask_as(MEMBER_USER, socket_path, request, status)
        assert (allowed if "group" in EXPECTED[action] else refused)(lines), (action, lines)
        register = REQUESTS["driver.register"]
        unregistered("its-own")
        lines = ask_as(MEMBER_USER, socket_path, register, request, status)[1:]
        member_or_driver = {"group", "driver"} & EXPECTED[action]
        assert (allowed if member_or_driver else refused)(lines), (action, lines)

    os.chmod(socket_path, 0o666)
    try:
        for request in REQUESTS.values():
            (line,) = ask_as(NOBODY, socket_path, request)
            assert json.loads(line)["errno"] == errno.EACCES, request
    finally:
        os.chmod(socket_path, 0o660)

    for action, request in REQUESTS.items():
        if action == "keeper.attach" or "driver" in action:
            continue  # below, on one connection
        with protocol.Connection(socket_path) as connection:
            try:
                connection.request(request)
            except protocol.ControlError as exc:
                assert exc.errno != errno.EACCES, (action, exc)
            assert connection.request(status)["ok"]
    with protocol.Connection(socket_path) as connection:
        token = connection.request({**REQUESTS["driver.register"], "driver": "roots"})["token"]
        for action in ("driver.update", "driver.heartbeat", "driver.secret.put",
                       "driver.secret.get", "driver.secret.rm", "driver.stop"):
            request = {**REQUESTS[action], "driver": "roots", "token": token}
            try:
                connection.request(request)
            except protocol.ControlError as exc:
                assert exc.errno != errno.EACCES, (action, exc)
        # A name bound to another peer: refused even to root.
        with pytest.raises(protocol.ControlError) as caught:
            protocol.request(socket_path, REQUESTS["driver.register"])
        assert caught.value.errno == errno.EACCES
    _, fuse_fd, memo_fd, link = standby.attach(socket_path)
    os.close(fuse_fd)
    os.close(memo_fd)
    link.close()
    assert wait_until(lambda: mount.status()["keeper"] is None, 10)  # it let go
    unbound = {**REQUESTS["driver.register"], "driver": "unbound"}
    assert refused(ask_as(MEMBER_USER, socket_path, unbound, status))


#: As a group member: open control connections until one is refused, each
#: asked for status first; print how many were served and the refusal's
#: errno, then hold them until stdin closes.
_HOLDER = """
import json, socket, sys
held = []
while True:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    sock.sendall(b'{"op": "status"}\\n')
    reply = json.loads(sock.makefile().readline())
    if not reply["ok"]:
        break
    held.append(sock)
print(len(held), reply["errno"], flush=True)
sys.stdin.read()
"""


@requires_mount
@pytest.mark.mount
def test_one_peer_holding_every_connection_it_may_cannot_keep_root_out(
        group_mount: Mount) -> None:
    """A member holds all the connections peers other than root may hold
    (16 - 4); root's status and a standby's attach still get in."""
    mount = group_mount
    socket_path = protocol.socket_of(str(mount.mnt))
    holder = subprocess.Popen([*MEMBER_USER, "/usr/bin/python3", "-c", _HOLDER, socket_path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["12", str(errno.EAGAIN)]
        with protocol.Connection(socket_path) as connection:  # one try, no retry
            assert connection.request({"op": "status"})["pid"] == mount.pid
        status, fuse_fd, memo_fd, link = standby.attach(socket_path)
        try:
            assert status["pid"] == mount.pid
            assert os.path.samefile(f"/proc/self/fd/{fuse_fd}", "/dev/fuse")
        finally:
            os.close(fuse_fd)
            os.close(memo_fd)
            link.close()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert wait_until(lambda: mount.status()["keeper"] is None, 10)
