"""Live takeover: a daemon killed with SIGKILL is replaced on the same connection.

Real mounts, real standbys (``swapfs standby``), real SIGKILL. What must
hold: bytes written before a kill read back after it, through descriptors
opened before it; files unlinked while open survive until closed; inode
numbers stay valid; and each wrong use gets a clear error and loses nothing.
The swap workload with five kills is in test_swap_takeover.py.
"""

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.cachekeeper import OWN
from mountd.takeover import fusedev
from swapfs.cache import parse
from swapfs.control import protocol, swapfs_sockets
from tests.mounting import (
    BLOCK,
    Mount,
    alive,
    daemon_log_tail,
    is_mounted,
    lazy_unmount,
    mounted,
    read_direct,
    receive_with_fds,
    remove_tree,
    requires_mount,
    short_tempdir,
    swapfs,
    wait_until,
)

pytestmark = [requires_mount, pytest.mark.mount]


def test_sigkill_with_standby_loses_nothing(mount: Mount) -> None:
    mount.path("c").mkdir()
    data = os.urandom(64 * BLOCK)
    path = mount.path("c", "vm.swap")
    path.write_bytes(data)
    ino = path.stat().st_ino
    mount.start_standby()
    assert mount.status()["keeper"] == "standby"
    fd = os.open(path, os.O_RDWR)
    try:
        for number in range(1, 4):
            status = mount.kill_for_takeover()
            assert status["keeper"] == "standby"
            assert status["last_takeover"]["number"] == number
            assert status["last_takeover"]["resent"] is True
            assert status["open_files"] == 1  # the dead daemon's open file, inherited
            # The descriptor opened before the kills still reads and writes.
            assert os.pread(fd, len(data), 0) == data
            block = os.urandom(BLOCK)
            os.pwrite(fd, block, number * BLOCK)
            data = data[:number * BLOCK] + block + data[(number + 1) * BLOCK:]
        assert path.stat().st_ino == ino
        assert path.read_bytes() == data
    finally:
        os.close(fd)
    standby = mount.standby_pid
    assert standby is not None
    mount.umount()
    assert wait_until(lambda: not alive(standby)), "the standby outlived the mount"


def test_file_unlinked_while_open_survives_takeover(mount: Mount) -> None:
    mount.path("c").mkdir()
    data = os.urandom(8 * BLOCK)
    path = mount.path("c", "gone.swap")
    path.write_bytes(data)
    mount.start_standby()
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        mount.kill_for_takeover()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    # Its last release purges it: nothing of it stays stored.
    assert wait_until(lambda: mount.chain("c")["stored_bytes"] == 0)


def test_a_release_just_before_a_takeover_is_not_lost(mount: Mount) -> None:
    """Close a file unlinked while open, then SIGKILL the daemon at once.

    FUSE sends the releases in the background, so the kill lands while the
    daemon handles them. Once the new daemon serves, nothing is open: it
    must count no file open (else SIGTERM refuses to stop it) and store
    nothing of that file. Found by tests/fsx.py (seeds 307 and 314 with
    ``--ops 10000 --restarts remount,kill,kill,remount,takeover,takeover``).
    """
    mount.path("c").mkdir()
    mount.start_standby()
    for attempt in range(10):  # the kill must land in the window; it nearly always does
        path = mount.path("c", "gone.swap")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, os.urandom(BLOCK), 0)
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
        path.unlink()
        os.close(fd)
        os.close(direct)
        mount.kill_for_takeover()
        assert mount.status()["open_files"] == 0, f"attempt {attempt}"
        assert mount.chain("c")["stored_bytes"] == 0, f"attempt {attempt}"


def test_without_keeper_the_mount_dies(mount: Mount) -> None:
    """What a daemon failure does without a keeper: the connection aborts."""
    mount.path("c").mkdir()
    mount.path("c", "f").write_bytes(b"x" * BLOCK)
    assert mount.status()["keeper"] is None
    fd = os.open(mount.path("c", "f"), os.O_RDONLY)
    try:
        pid = mount.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(pid))
        mount.pid = None
        with pytest.raises(OSError) as caught:
            os.pread(fd, BLOCK, 0)
        assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    finally:
        with contextlib.suppress(OSError):  # its flush fails too: ENOTCONN
            os.close(fd)
    lazy_unmount(mount.mnt)


def test_standby_refuses_what_is_not_a_swapfs_mount(tmp_path: Path) -> None:
    result = swapfs("standby", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "is not a swapfs mount" in result.stderr


def test_second_standby_is_refused(mount: Mount) -> None:
    first = mount.start_standby()
    result = swapfs("standby", str(mount.mnt), check=False)
    assert result.returncode == 1
    assert "keeps" in result.stderr and "already" in result.stderr, result.stderr
    assert alive(first) and mount.status()["keeper_pid"] == first


def test_keeper_that_dies_first_costs_nothing(mount: Mount) -> None:
    mount.path("c").mkdir()
    mount.path("c", "f").write_bytes(b"y" * BLOCK)
    standby = mount.start_standby()
    os.kill(standby, signal.SIGKILL)
    assert wait_until(lambda: not alive(standby))
    mount.standby_pid = None
    assert wait_until(lambda: mount.status()["keeper"] is None)
    assert mount.path("c", "f").read_bytes() == b"y" * BLOCK
    # A new standby may attach and keep it again.
    mount.start_standby()
    mount.kill_for_takeover()
    assert mount.path("c", "f").read_bytes() == b"y" * BLOCK


def run_with_timeout(*command: str) -> None:
    subprocess.run(command, check=True, timeout=30, stdin=subprocess.DEVNULL)


def test_systemd_fd_store_restart() -> None:
    """The systemd path, with the test as the service manager: it keeps what
    the daemon stores (FDSTORE=1), SIGKILLs it, and starts a new daemon with
    $LISTEN_FDS/$LISTEN_FDNAMES, as systemd does on Restart=on-failure.
    (No systemd runs here as the service manager.)"""
    root = short_tempdir()
    mnt, state = root / "m", root / "s"
    mnt.mkdir()
    daemons: list[subprocess.Popen[bytes]] = []
    stored: dict[bytes, int] = {}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(root / "notify"))
            notify.settimeout(30)
            env = dict(os.environ, NOTIFY_SOCKET=str(root / "notify"))
            log = open(root / "log", "ab")  # noqa: SIM115 - closed in finally
            command = [sys.executable, "-m", "mountd", "--state", str(state), str(mnt)]
            daemons.append(subprocess.Popen(command, env=env, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL))
            while (message := receive_with_fds(notify))[0] != b"READY=1":
                text, fds = message
                if text.startswith(b"FDSTORE=1"):
                    stored[text.split(b"FDNAME=")[1]] = fds[0]
            # File I/O in child processes with a timeout: this process holds the
            # connection (as systemd would), so a hung request must not be its own.
            data = os.urandom(16 * BLOCK)
            (root / "data").write_bytes(data)
            run_with_timeout("mkdir", str(mnt / "c"))
            run_with_timeout("cp", str(root / "data"), str(mnt / "c" / "f"))
            daemons[0].kill()
            daemons[0].wait()
            # systemd passes stored descriptors from 3 on, and LISTEN_PID is the
            # new process's own pid: a shell sets it and execs the daemon.
            fuse_fd, memo_fd = stored[b"fuse"], stored[b"fuse-session"]

            def as_listen_fds() -> None:
                os.dup2(fuse_fd, 3)
                os.dup2(memo_fd, 4)

            env2 = dict(env, LISTEN_FDS="2", LISTEN_FDNAMES="fuse:fuse-session")
            daemons.append(subprocess.Popen(
                ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *command], env=env2,
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, pass_fds=(3, 4),
                preexec_fn=as_listen_fds))
            while receive_with_fds(notify)[0] != b"READY=1":
                pass
            run_with_timeout("cmp", str(root / "data"), str(mnt / "c" / "f"))
            status = protocol.request(str(state / "control.sock"), {"op": "status"})
            assert status["keeper"] == "systemd"
            assert status["last_takeover"]["number"] == 1
            daemons[1].send_signal(signal.SIGTERM)
            assert daemons[1].wait(timeout=30) == 0
            assert not is_mounted(mnt)
            log.close()
    finally:
        for fd in stored.values():  # first: without a holder, the connection aborts
            os.close(fd)
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        lazy_unmount(mnt)
        remove_tree(root)


def test_resend_notification_on_this_kernel() -> None:
    """Kernels before 6.9 refuse FUSE_NOTIFY_RESEND; this one must take it
    (the takeover tests above depend on it), and the INIT says so."""
    root = short_tempdir()
    mnt = root / "m"
    mnt.mkdir()
    fd = fusedev.mount(str(mnt), "swapfs:test", "swapfs", allow_other=False)
    try:
        init = fusedev.read_init(fd)
        assert fusedev.init_version(init)[0] == 7
        if not fusedev.supports_resend(init):
            pytest.skip("this kernel predates FUSE_NOTIFY_RESEND (Linux 6.9)")
        fusedev.request_resend(fd)
    finally:
        fusedev.unmount(str(mnt))
        os.close(fd)
        remove_tree(root)


@pytest.mark.parametrize("blocking", [True, False])
def test_the_init_is_read_whether_or_not_the_descriptor_blocks(blocking: bool) -> None:
    """pyfuse3's loop makes the connection's descriptor non-blocking, for
    every process that holds a duplicate of it."""
    root = short_tempdir()
    mnt = root / "m"
    mnt.mkdir()
    fd = fusedev.mount(str(mnt), "swapfs:test", "swapfs", allow_other=False)
    try:
        os.set_blocking(fd, blocking)
        assert fusedev.init_version(fusedev.read_init(fd))[0] == 7
    finally:
        fusedev.unmount(str(mnt))
        os.close(fd)
        remove_tree(root)


@contextlib.contextmanager
def cached_mount(settings: str) -> Iterator[Mount]:
    """A mount with a 64-block content cache, a manifest every 0.2 s, and *settings*."""
    root = short_tempdir()
    config = root / "swapfs.toml"
    config.write_text(f"content_cache_bytes = {64 * BLOCK}\nmanifest_interval = 0.2\n"
                      + settings)
    try:
        with mounted(root=root, config=config) as mount:
            yield mount
    finally:
        remove_tree(root)


def cache_file(mount: Mount, name: str, blocks: int, seed: int) -> bytes:
    """A file of *blocks* distinct blocks, read until the content cache holds them."""
    mount.path("c").mkdir(exist_ok=True)
    data = random.Random(seed).randbytes(blocks * BLOCK)
    mount.path("c", name).write_bytes(data)
    for _ in range(2):  # admitted on the first miss, read again (heat 2)
        assert read_direct(mount.path("c", name), 0, len(data)) == data
    return data


def manifest_blocks(mount: Mount) -> int:
    path = mount.state / "cache.manifest"
    return len(parse(path.read_bytes())) if path.exists() else -1


def test_takeover_warms_the_cache_with_the_plan() -> None:
    with cached_mount("") as mount:
        data = cache_file(mount, "f", 8, seed=1)
        assert wait_until(lambda: manifest_blocks(mount) == 8)
        mount.start_standby()
        mount.kill_for_takeover()
        assert wait_until(lambda: (mount.status()["last_takeover"] or {}).get("warmed_bytes")
                          == 8 * BLOCK)
        last = mount.status()["last_takeover"]
        assert last["strategy"] == "union" and last["blocks"][OWN] == 8
        before = mount.stats()["content_cache"]
        assert read_direct(mount.path("c", "f"), 0, len(data)) == data
        after = mount.stats()["content_cache"]
        assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (8, 0)


def only_these_mounts(*mounts: Mount) -> None:
    """The planner counts every swapfs daemon of the host: skip when others run."""
    others = set(swapfs_sockets()) - {str(mount.mnt) for mount in mounts}
    if others:
        pytest.skip(f"other swapfs mounts take part in the plan: {sorted(others)}")


def test_a_host_budget_makes_the_planner_choose_by_priority() -> None:
    settings = f'host_cache_bytes = {4 * BLOCK}\nfailover_strategies = ["union", "priority"]\n'
    with cached_mount(settings) as mount:
        only_these_mounts(mount)
        important = cache_file(mount, "a", 4, seed=2)
        cache_file(mount, "b", 4, seed=3)
        swapfs("priority", str(mount.path("c", "a")), "5")
        assert wait_until(lambda: manifest_blocks(mount) == 8)
        time.sleep(0.5)  # one more manifest, which carries the priority
        mount.start_standby()
        mount.kill_for_takeover()
        assert wait_until(lambda: (mount.status()["last_takeover"] or {}).get("warmed_bytes")
                          == 4 * BLOCK)
        assert mount.status()["last_takeover"]["strategy"] == "priority"
        before = mount.stats()["content_cache"]
        assert read_direct(mount.path("c", "a"), 0, len(important)) == important
        assert mount.stats()["content_cache"]["hits"] - before["hits"] == 4


def test_the_other_daemons_of_the_host_share_the_budget() -> None:
    """Union (16 blocks) does not fit 12: each source evicts its coldest in turn."""
    settings = f'host_cache_bytes = {12 * BLOCK}\nfailover_strategies = ["union"]\n'
    with cached_mount(settings) as mount, cached_mount("") as peer:
        only_these_mounts(mount, peer)
        cache_file(peer, "p", 8, seed=4)
        cache_file(mount, "f", 8, seed=5)
        assert wait_until(lambda: manifest_blocks(mount) == 8 and manifest_blocks(peer) == 8)
        mount.start_standby()
        mount.kill_for_takeover()
        assert wait_until(lambda: (mount.status()["last_takeover"] or {}).get("warmed_bytes")
                          == 6 * BLOCK)
        last = mount.status()["last_takeover"]
        assert last["strategy"] == "evict"
        assert last["blocks"] == {OWN: 6, str(peer.mnt): 6}
        assert last["evicted"] == {OWN: 2, str(peer.mnt): 2}


def test_the_standby_locks_its_memory_like_the_daemon(mount: Mount) -> None:
    """A standby swapped out to the mount it keeps could not run when it must."""
    standby = mount.start_standby()
    for line in Path(f"/proc/{standby}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            locked_kib = int(line.split()[1])
    assert (locked_kib > 0) == mount.status()["memory_locked"]


#: Starts a daemon the way a standby does, waits until it serves, and exits
#: without attaching: a standby killed between the two. (Without
#: --keeper-pid the daemon takes its parent for its standby.)
_STANDBY_DIES_AFTER_START = """
import sys
from pathlib import Path
from swapfs.cli import spawn
spawn.start_ready(sys.argv[2:], Path(sys.argv[1]), 30, (3, 4))
"""


@pytest.mark.parametrize("dies", ["before the daemon starts", "before it attaches"])
def test_a_standby_that_dies_mid_takeover_leaves_no_keeper(mount: Mount, dies: str) -> None:
    """A dead standby must not stay the keeper: it would refuse every next
    standby (EBUSY) and keep a failing daemon from unmounting."""
    from mountd.takeover.standby import attach

    mount.path("c").mkdir()
    mount.path("c", "f").write_bytes(b"z" * BLOCK)
    socket_path = str(mount.state / "control.sock")
    # This test holds the connection as a standby would, and never does I/O on it.
    status, fuse_fd, memo_fd, link = attach(socket_path)
    try:
        assert mount.pid is not None
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(status["pid"]))
        link.close()
        command = [sys.executable, "-m", "mountd", *status["restart_argv"],
                   "--adopt-fds", "3,4"]

        def as_fds_3_and_4() -> None:
            os.dup2(fuse_fd, 3)
            os.dup2(memo_fd, 4)

        if dies == "before the daemon starts":  # sh starts it in the background and exits
            starter = ["sh", "-c", '"$@" --keeper-pid $$ </dev/null >>"$0" 2>&1 &',
                       str(mount.state / "daemon.log"), *command]
        else:
            starter = [sys.executable, "-c", _STANDBY_DIES_AFTER_START,
                       str(mount.state / "daemon.log"), *command]
        subprocess.run(starter, check=True, timeout=30, pass_fds=(3, 4),
                       preexec_fn=as_fds_3_and_4, stdin=subprocess.DEVNULL)

        def serving() -> bool:
            try:
                pid = protocol.request(socket_path, {"op": "status"}, timeout=5)["pid"]
            except protocol.ControlError:
                return False
            return bool(pid != status["pid"])

        assert wait_until(serving, 30), daemon_log_tail(mount)
    finally:
        os.close(fuse_fd)
        os.close(memo_fd)
    mount.pid = mount.status()["pid"]
    assert wait_until(lambda: mount.status()["keeper"] is None), mount.status()
    # The next standby is welcome, and keeps the mount through a death.
    mount.start_standby()
    mount.kill_for_takeover()
    assert mount.path("c", "f").read_bytes() == b"z" * BLOCK
