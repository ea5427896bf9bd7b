"""Peers are root's only: what a daemon asks and reads when it plans its cache.

At every start and takeover the daemon, root with its memory locked, finds
the other swapfs mounts, asks each daemon its state directory and reads the
manifest there (mountd/peers.py). Any user can make a ``fuse.swapfs`` mount
with fusermount3 and name any socket, so a mount another user made, a
socket root does not own or serve, a state directory others may write and
a manifest that is not a bounded regular file of root's are left out,
before they are asked or read. The last test makes the mount fusermount3
makes for ``nobody``, served by a pyfuse3 process of nobody's, its
manifest pointing at /dev/zero or at a 300 MiB file, and starts a real
daemon beside it.
"""

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mountd import peers
from swapfs.cache import CacheEntry, serialize
from swapfs.control import protocol
from tests.mounting import (
    lazy_unmount,
    mounted,
    remove_tree,
    requires_mount,
    short_tempdir,
    wait_until,
)

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as another user")

MOUNTINFO = textwrap.dedent(r"""
    22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
    36 22 0:32 / /mnt/a rw shared:9 - fuse.swapfs swapfs:/a.sock rw,user_id=0,allow_other
    37 22 0:33 / /tmp/evil\040dir rw - fuse.swapfs swapfs:/e.sock rw,user_id=65534,group_id=1
    38 22 0:34 / /mnt/b rw - fuse.sshfs swapfs:/x rw,user_id=0,group_id=0
    39 22 0:35 / /mnt/c rw - fuse.swapfs other:/x rw,user_id=0,group_id=0
    40 22 0:36 / /mnt/d rw - fuse.swapfs swapfs:/d.sock rw,group_id=0
""").lstrip()


def test_the_mount_table_says_who_made_each_swapfs_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTINFO)
    found = protocol.swapfs_mounts(str(table))
    assert found == [
        protocol.SwapfsMount("/mnt/a", "/a.sock", 0),
        protocol.SwapfsMount("/tmp/evil dir", "/e.sock", NOBODY),
        protocol.SwapfsMount("/mnt/d", "/d.sock", None),
    ]
    real = protocol.swapfs_mounts
    monkeypatch.setattr(protocol, "swapfs_mounts", lambda: real(str(table)))
    assert protocol.swapfs_sockets() == {"/mnt/a": "/a.sock"}


# -- peers(), against sockets served here --------------------------------------------


class StatusServer:
    """A control socket, served by a thread of this process (root), that
    answers every request with *reply*; it counts the requests it got."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.path, self.reply, self.requests = path, reply, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                if client.makefile("rb").readline():
                    self.requests += 1
                    client.sendall(json.dumps(self.reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Callable[[str, dict[str, Any]], StatusServer]]:
    """Serve a status reply on a socket that the mount table names as a
    root-made swapfs mount at /mnt/NAME."""
    servers: dict[str, StatusServer] = {}
    monkeypatch.setattr(protocol, "swapfs_mounts", lambda: [
        protocol.SwapfsMount(f"/mnt/{name}", str(server.path), 0)
        for name, server in servers.items()])

    def serve(name: str, reply: dict[str, Any]) -> StatusServer:
        servers[name] = StatusServer(tmp_path / f"{name}.sock", reply)
        return servers[name]

    yield serve
    for server in servers.values():
        server.close()


def make_state(path: Path, blocks: int = 3) -> Path:
    path.mkdir(mode=0o700)
    (path / "cache.manifest").write_bytes(serialize(
        [CacheEntry(1, n.to_bytes(16, "big"), 1, (7,)) for n in range(blocks)], {}))
    return path


def left_out(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records
                     if "left out of the cache plan" in record.getMessage())


def test_a_root_peer_is_read_and_this_state_skipped(
        tmp_path: Path, world: Callable[[str, dict[str, Any]], StatusServer],
        caplog: pytest.LogCaptureFixture) -> None:
    own = make_state(tmp_path / "own")
    other = make_state(tmp_path / "other", blocks=5)
    world("own", {"ok": True, "state": str(own)})
    world("other", {"ok": True, "state": str(other)})
    found = peers.peers(own, max_blocks=5)
    assert [(peer.mountpoint, peer.state, len(peer.entries)) for peer in found] == [
        ("/mnt/other", other, 5)]
    assert left_out(caplog) == ""


@needs_root
@pytest.mark.parametrize("damage, why", [
    (lambda state: os.chown(state, NOBODY, NOBODY), "is not root's alone"),
    (lambda state: state.chmod(0o777), "is not root's alone"),
    (lambda state: os.chown(state / "cache.manifest", NOBODY, NOBODY),
     "belongs to uid 65534, not 0"),
    (lambda state: (state / "cache.manifest").unlink()
     or (state / "cache.manifest").symlink_to("/dev/zero"), "Too many levels of symbolic"),
    (lambda state: os.truncate(state / "cache.manifest", 300 << 20), "more than a manifest"),
], ids=["dir-of-nobody", "dir-world-writable", "manifest-of-nobody", "symlink", "oversize"])
def test_a_state_that_is_not_roots_alone_is_left_out(
        tmp_path: Path, world: Callable[[str, dict[str, Any]], StatusServer],
        caplog: pytest.LogCaptureFixture, damage: Callable[[Path], object], why: str) -> None:
    state = make_state(tmp_path / "peer")
    world("peer", {"ok": True, "state": str(state)})
    damage(state)
    assert peers.peers(tmp_path / "own", max_blocks=16384) == []
    assert why in left_out(caplog)


def test_a_peer_whose_socket_went_away_is_left_out_and_does_not_lend_another_its_state(
        tmp_path: Path, world: Callable[[str, dict[str, Any]], StatusServer],
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon that stops while the peers are read: its socket is listed in
    the mount table but gone. Once this raised (the daemon's start failed)
    or filed the peer under the state of the peer read before it."""
    state = make_state(tmp_path / "a-peer")
    world("a-peer", {"ok": True, "state": str(state)})
    world("b-gone", {"ok": True, "state": "/unused"}).path.unlink()
    found = peers.peers(tmp_path / "own", max_blocks=16)
    assert [(peer.mountpoint, peer.state) for peer in found] == [("/mnt/a-peer", state)]
    assert "No such file or directory" in left_out(caplog)


@pytest.mark.parametrize("reply", [{"ok": True}, {"ok": True, "state": 7},
                                   {"ok": True, "state": "relative/state"}])
def test_a_reply_without_a_state_directory_is_left_out(
        tmp_path: Path, world: Callable[[str, dict[str, Any]], StatusServer],
        caplog: pytest.LogCaptureFixture, reply: dict[str, Any]) -> None:
    world("peer", reply)
    assert peers.peers(tmp_path / "own", max_blocks=16) == []
    assert "named no state directory" in left_out(caplog)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory nobody may write in, under one everyone may traverse."""
    root = short_tempdir()
    root.chmod(0o755)
    (root / "n").mkdir()
    os.chown(root / "n", NOBODY, NOBODY)
    yield root / "n"
    shutil.rmtree(root)


#: A control socket served by nobody: answers status with the state it is
#: given, printing each connection and request (system Python: nobody may
#: not be able to read this environment's).
_NOBODY_SERVER = textwrap.dedent("""
    import json, socket, sys
    server = socket.socket(socket.AF_UNIX)
    server.bind(sys.argv[1])
    server.listen(8)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        print("connected", flush=True)
        if client.makefile("rb").readline():
            print("request", flush=True)
            client.sendall(json.dumps({"ok": True, "state": sys.argv[2]}).encode() + b"\\n")
        client.close()
""")


@needs_root
@pytest.mark.parametrize("socket_owner", ["nobody", "root"])
def test_a_socket_nobody_serves_is_never_asked(
        tmp_path: Path, nobody_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, socket_owner: str) -> None:
    """Even in a mount root made: a socket file of nobody's is not opened; one
    given to root (chown) is connected to, but nobody serves it (SO_PEERCRED)
    and it gets no request."""
    state = make_state(tmp_path / "peer")  # root's alone: only the socket is wrong
    path = nobody_dir / "c.sock"
    server = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", _NOBODY_SERVER,
                               str(path), str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        if socket_owner == "root":
            os.chown(path, 0, 0)
        monkeypatch.setattr(protocol, "swapfs_mounts",
                            lambda: [protocol.SwapfsMount("/mnt/peer", str(path), 0)])
        assert peers.peers(tmp_path / "own", max_blocks=16) == []
        if socket_owner == "root":  # let it accept the connection it was given, then go
            select.select([server.stdout], [], [], 10)
    finally:
        server.kill()
        output, _ = server.communicate()
    if socket_owner == "root":
        assert "served by uid 65534, not root" in left_out(caplog)
        assert output == "connected\n"
    else:
        assert "is not a socket root owns" in left_out(caplog)
        assert output == ""


# -- a fake swapfs mount made by nobody, beside a real daemon ------------------------

#: The mount fusermount3 makes for nobody: ``fuse.swapfs``, the source
#: naming nobody's socket, ``user_id=65534``, its /dev/fuse descriptor served
#: by a process of nobody's. Made with mount(2) as root, then the process
#: becomes nobody (imports first: nobody may not read this environment),
#: because /dev/fuse may be root's alone where the tests run (fusermount3
#: opens it as the user: there it could not). It serves status on its socket,
#: printing each connection.
_FAKE_MOUNT = textwrap.dedent(f"""
    import ctypes, json, os, socket, sys, threading
    import pyfuse3, trio
    mountpoint, socket_path, state = sys.argv[1:4]
    fuse_fd = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={{fuse_fd}},rootmode=40000,user_id={NOBODY},group_id={NOBODY}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(("swapfs:" + socket_path).encode(), mountpoint.encode(), b"fuse.swapfs",
                  6, options.encode()):  # MS_NOSUID | MS_NODEV, as fusermount3's
        sys.exit(f"mount: {{os.strerror(ctypes.get_errno())}}")
    os.setgroups([])
    os.setgid({NOBODY})
    os.setuid({NOBODY})
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path)
    server.listen(8)

    def serve():
        while True:
            client, _ = server.accept()
            print("connected", flush=True)
            if client.makefile("rb").readline():
                client.sendall(json.dumps({{"ok": True, "pid": os.getpid(),
                                            "state": state}}).encode() + b"\\n")
            client.close()

    threading.Thread(target=serve, daemon=True).start()
    pyfuse3.init(pyfuse3.Operations(), f"/dev/fd/{{fuse_fd}}", set())
    trio.run(pyfuse3.main)
""")


@contextlib.contextmanager
def fake_swapfs_mount(root: Path, manifest: str) -> Iterator[Path]:
    """A ``fuse.swapfs`` mount by nobody whose daemon names a state whose
    cache.manifest is *manifest* ("dev-zero": a symlink to /dev/zero;
    "300MiB": a regular file of 300 MiB); yields the file of what its
    socket saw. Always unmounted and its process killed afterwards."""
    home = root / "fake"
    for directory in (home, home / "m", home / "s"):
        directory.mkdir()
        os.chown(directory, NOBODY, NOBODY)
    path = home / "s" / "cache.manifest"
    if manifest == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as big:
            big.truncate(300 << 20)
    os.lchown(path, NOBODY, NOBODY)
    seen = root / "fake.out"
    with open(seen, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _FAKE_MOUNT, str(home / "m"), str(home / "c.sock"),
             str(home / "s")], stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        assert wait_until(lambda: any(
            mount.mountpoint == str(home / "m") and mount.user_id == NOBODY
            for mount in protocol.swapfs_mounts()) or process.poll() is not None, 30)
        assert process.poll() is None, seen.read_text()
        yield seen
    finally:
        process.kill()
        process.wait()
        lazy_unmount(home / "m")


def peak_kib(pid: int) -> int:
    """The daemon's peak resident memory (VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def start_and_plan(mount: Any) -> int:
    """Mount, wait for the cache plan (made after the peers were read);
    the daemon's peak memory then."""
    mount.mount()
    assert wait_until(lambda: mount.status().get("cache_plan") is not None, 30)
    return peak_kib(mount.pid)


@requires_mount
@needs_root
@pytest.mark.mount
@pytest.mark.parametrize("manifest", ["dev-zero", "300MiB"])
def test_a_swapfs_mount_by_nobody_is_not_a_peer(manifest: str) -> None:
    """The daemon starts as it would without the fake, never connects to its
    socket, never reads its manifest (a 300 MiB read took the daemon's peak
    to 642 MiB; /dev/zero has no end) and says why it left it out."""
    root = short_tempdir()
    root.chmod(0o755)
    try:
        with mounted(root=root) as mount:
            mount.umount()
            baseline = start_and_plan(mount)
            mount.umount()
            with fake_swapfs_mount(root, manifest) as seen:
                peak = start_and_plan(mount)
                assert seen.read_text() == ""  # no connection to its socket
            log = (mount.state / "daemon.log").read_text()
            assert (f"peer {root}/fake/m left out of the cache plan: mounted by uid 65534, "
                    "not root") in log
            assert peak - baseline < 32 << 10, (baseline, peak)
            assert mount.status()["pid"] == mount.pid  # serves on
    finally:
        remove_tree(root)
