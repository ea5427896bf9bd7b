"""A daemon whose lease lapsed writes nothing more to the state, and serves nothing stale.

First the engine alone: a Volume whose guard refuses (its lease lapsed)
writes, flushes, punches and marks nothing, and answers reads with EIO.

Then two "hosts" on one machine share one state directory. Host A is an
ordinary mount. Host B is a daemon in its own mount and UTS namespaces
(``unshare --mount --uts``, host name ``host-b``) that reaches the state
through a bind mount, as a second machine would through shared storage
(docs/lease.md). Both reach the same inodes through one kernel, so every
write A makes is visible to B at once: a stricter judge of "A writes
nothing" than real shared storage, where A's writes would show up later.

The state directory's flock (``<state>/lock``) would meet on that one inode
here, while two real hosts on a file system whose flocks are host-local do
not share it: host B's namespace mounts a file of its own over ``lock``, so
that each host has its own, as two machines would. LMDB's own lock file is
shared, as on one machine: host A is stopped while idle, outside any
transaction.
"""

import contextlib
import errno
import hashlib
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swapfs.engine import LEASE_GENERATION, ROOT_INO, SwapfsError, Volume, check, keys, lease
from tests.mounting import (
    BLOCK,
    SWAPFS,
    Mount,
    aligned_buffer,
    alive,
    daemon_log_tail,
    os_error,
    read_direct,
    remove_tree,
    requires_mount,
    short_tempdir,
    wait_until,
)

#: The files of a state directory that are no part of what it stores: the
#: lease (host B renews it), the locks, the log both hosts append to, sockets.
_NOT_STORED = {"lease", "lock", "lock.mdb", "daemon.log", "standby.lock"}


def snapshot(state: Path) -> dict[str, str]:
    """The SHA-256 of every file the state stores: data files, seal files,
    the index, its clean mark, the cache manifest."""
    found = {}
    for path in sorted(state.rglob("*")):
        if (path.is_file() and not path.is_symlink() and path.name not in _NOT_STORED
                and not path.name.startswith(f".{lease.LEASE_NAME}.")):
            found[str(path.relative_to(state))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# -- the engine ----------------------------------------------------------------------


class Lapsed:
    """A guard that refuses once its lease has lapsed (:meth:`lapse`)."""

    def __init__(self) -> None:
        self.lapsed = False

    def lapse(self) -> None:
        self.lapsed = True

    def __call__(self) -> None:
        if self.lapsed:
            raise SwapfsError(errno.EROFS, "the lease has lapsed")


def _errno(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except SwapfsError as exc:
        return exc.errno
    raise AssertionError(f"{call} did not fail")


def test_a_volume_whose_lease_lapsed_writes_nothing(tmp_path: Path) -> None:
    state, guard = tmp_path / "s", Lapsed()
    volume = Volume(state, guard=guard, master=keys.load())
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    file = volume.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
    volume.write(file.ino, 0, random.Random(1).randbytes(2 * BLOCK))
    volume.write(file.ino, 0, random.Random(2).randbytes(BLOCK))  # a freed slot to punch
    before = snapshot(state)
    guard.lapse()
    assert _errno(volume.write, file.ino, 0, random.Random(3).randbytes(BLOCK)) == errno.EROFS
    assert _errno(volume.create, chain.ino, b"g", stat.S_IFREG | 0o600, 0, 0) == errno.EROFS
    assert _errno(volume.read, file.ino, 0, BLOCK) == errno.EIO  # it may be stale
    assert _errno(volume.sync) == errno.EROFS
    assert volume.punch_pending() == 0
    volume.close()
    assert snapshot(state) == before  # nothing punched, no clean mark
    assert not (state / "index.lmdb" / "clean").exists()


def test_writes_are_guarded_inside_a_transaction(tmp_path: Path) -> None:
    """The store checks the guard again right before each data write: a
    lease that lapses after the transaction began still stops it."""
    guard = Lapsed()
    volume = Volume(tmp_path / "s", guard=guard, master=keys.load())
    try:
        chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = volume.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        write_many = volume.store.write_many

        def lapse_first(*args: object) -> None:
            guard.lapse()  # between the transaction's start and its data write
            write_many(*args)  # type: ignore[arg-type]

        volume.store.write_many = lapse_first  # type: ignore[method-assign,assignment]
        assert _errno(volume.write, file.ino, 0, random.Random(4).randbytes(BLOCK)) == (
            errno.EROFS)
        assert not any(volume.store.holds_data(chain.chain, slot) for slot in range(4))
    finally:
        volume.close()


#: A later holder (lease generation 2) writes the index, in a process of its own.
_LATER_HOLDER = """
import sys
from pathlib import Path
from swapfs.engine import Index
index = Index(Path(sys.argv[1]), generation=2)
with index.begin(write=True) as txn:
    txn.put_meta(b"next_ino", txn.get_meta(b"next_ino"))
index.close()
"""


def test_a_write_under_an_older_lease_generation_is_refused(tmp_path: Path) -> None:
    """The index records the lease generation of its last writer. A holder
    whose guard still lets it write (its lease broken by force while it ran,
    a clock that misled it) is refused once a later holder has written: its
    write would be a late one."""
    state = tmp_path / "s"
    volume = Volume(state, claim=lambda: 1, master=keys.load())
    try:
        volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        with volume.index.begin() as txn:
            assert txn.get_meta(LEASE_GENERATION) == 1
        # Its batch committed, as a daemon's is every second: the later holder,
        # a process of this host here, would wait for LMDB's write lock.
        volume.index.flush()
        subprocess.run([sys.executable, "-c", _LATER_HOLDER, str(state / "index.lmdb")],
                       check=True, timeout=60)
        assert _errno(volume.mkdir, ROOT_INO, b"d", 0o755, 0, 0) == errno.EROFS
    finally:
        volume.close()
    reopened = Volume(state, master=keys.load())  # no lease: no generation checked
    try:
        with reopened.index.begin() as txn:
            assert txn.get_meta(LEASE_GENERATION) == 2
    finally:
        reopened.close()


# -- two hosts -----------------------------------------------------------------------

#: Longer than acquire's 2 s settle delay, which the lease's validity counts.
LEASE_SECONDS = 4


def _settled(state: Path) -> dict[str, str]:
    """The snapshot once it stopped changing: host B's punches of the slots
    its writes freed come one to two seconds after them."""
    previous: dict[str, str] = {}

    def unchanged() -> bool:
        nonlocal previous
        now = snapshot(state)
        same, previous = now == previous, now
        return same

    assert wait_until(unchanged, 60, interval=2.5)
    return previous


def _in_host_b(pid: int, *command: str) -> bytes:
    """Run *command* in host B's mount namespace (that of its daemon, *pid*)."""
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *command], capture_output=True,
                          timeout=60, check=True).stdout


def _last_change(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _stop_between_writes(host_a: Mount) -> None:
    """SIGSTOP host A's daemon just after a renewal and a manifest write
    landed, so that it is stopped in neither (a write already past its
    guard when the process stops would land when it continues: docs/lease.md)."""
    assert host_a.pid is not None
    for path in (host_a.state / lease.LEASE_NAME, host_a.state / "cache.manifest"):
        before = _last_change(path)
        assert wait_until(lambda path=path, before=before: _last_change(path) != before, 30)
    os.kill(host_a.pid, signal.SIGSTOP)


@requires_mount
@pytest.mark.mount
def test_a_host_stopped_past_its_lease_writes_nothing_once_it_runs_again() -> None:
    root = short_tempdir()
    state = root / "s"
    config_a, config_b = root / "a.toml", root / "b.toml"
    config_a.write_text(f"lease_seconds = {LEASE_SECONDS}\nmanifest_interval = 1\n")
    # Host B writes no manifest while the test compares the state.
    config_b.write_text(f"lease_seconds = {LEASE_SECONDS}\nmanifest_interval = 3600\n")
    view, mnt_b, own_lock = root / "b-view", root / "b-mnt", root / "b-lock"
    view.mkdir()
    mnt_b.mkdir()
    own_lock.touch()
    host_a = Mount(root, state, config_a)
    a_pid = b_pid = None
    try:
        host_a.mount()
        a_pid = host_a.pid
        assert a_pid is not None
        host_a.path("c").mkdir()
        data_a = random.Random(5).randbytes(16 * BLOCK)
        host_a.path("c", "f").write_bytes(data_a)
        assert read_direct(host_a.path("c", "f"), 0, len(data_a)) == data_a

        _stop_between_writes(host_a)
        held = lease.read_lease(state)
        assert held is not None and held.generation == 1
        assert wait_until(lambda: lease.read_lease(state).expires_in(  # type: ignore[union-attr]
            time.time()) <= 0, 30)

        # Host B takes the state over and writes. Its mount namespace starts
        # as a copy of this one: host A's mount is detached there, or that
        # copy would keep A's connection alive after A's unmount.
        shell = ('mount --make-rprivate / && umount -l "$4" && mount --bind "$1" "$2" && '
                 'mount --bind "$3" "$2/lock" && hostname host-b && shift 4 && exec "$@"')
        started = subprocess.run(
            ["unshare", "--mount", "--uts", "sh", "-c", shell, "sh", str(state), str(view),
             str(own_lock), str(host_a.mnt), *SWAPFS, "mount", "--config", str(config_b),
             "--state", str(view), str(mnt_b)],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started.stderr
        printed = re.search(r"\(pid (\d+)\)", started.stdout)
        assert printed is not None, started.stdout
        b_pid = int(printed.group(1))
        taken = lease.read_lease(state)
        assert taken is not None and (taken.host, taken.generation) == ("host-b", 2)
        data_b, data_g = random.Random(6).randbytes(8 * BLOCK), random.Random(7).randbytes(
            4 * BLOCK)
        (root / "data_b").write_bytes(data_b)
        (root / "data_g").write_bytes(data_g)
        for source, target, extra in (("data_b", "f", ["conv=notrunc,fsync"]),
                                      ("data_g", "g", ["conv=fsync"])):
            _in_host_b(b_pid, "dd", f"if={root / source}", f"of={mnt_b / 'c' / target}",
                       "bs=4096", "oflag=direct", "status=none", *extra)
        written = _settled(state)
        assert any(name.endswith(".seals") for name in written)  # encrypted: seals compared

        # Host A runs again. Its callers get errors, never the stale blocks.
        os.kill(a_pid, signal.SIGCONT)
        path_f = host_a.path("c", "f")
        assert os_error(read_direct, path_f, 0, BLOCK) == errno.EIO

        def write_direct() -> None:
            fd = os.open(path_f, os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(fd, aligned_buffer(BLOCK), 0)
            finally:
                os.close(fd)

        assert os_error(write_direct) in (errno.EIO, errno.EROFS)
        assert os_error(os.open, host_a.path("c", "h"), os.O_CREAT | os.O_WRONLY,
                        0o600) == errno.EROFS
        # Its renewal, punches and manifest have had their turn; then it stops.
        time.sleep(LEASE_SECONDS / 2)
        subprocess.run(["fusermount3", "-u", str(host_a.mnt)], check=True, timeout=30)
        assert wait_until(lambda: not alive(a_pid), 30), daemon_log_tail(host_a, 60)
        host_a.pid = None

        assert snapshot(state) == written
        after = lease.read_lease(state)
        assert after is not None and (after.holder, after.generation) == (taken.holder, 2)
        seen_f = _in_host_b(b_pid, "dd", f"if={mnt_b / 'c' / 'f'}", "bs=4096", "iflag=direct",
                            "status=none")
        assert seen_f == data_b + data_a[len(data_b):]
        assert _in_host_b(b_pid, "cat", str(mnt_b / "c" / "g")) == data_g

        os.kill(b_pid, signal.SIGTERM)  # host B stops cleanly and unmounts
        assert wait_until(lambda: not alive(b_pid), 30)
        b_pid = None
        report = check(state, master=keys.load())
        assert report.clean, [vars(problem) for problem in report.problems]
    finally:
        if a_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a_pid, signal.SIGCONT)
        if b_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(b_pid, signal.SIGKILL)  # its namespace and mount go with it
            wait_until(lambda: not alive(b_pid), 30)
        host_a.close()
        remove_tree(root)
