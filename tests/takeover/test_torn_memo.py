"""A connection memo torn by a death still lets the standby take over.

Past a couple of hundred open handles the memo's record spans pages, and a
daemon killed in the middle of an update leaves only its first page
written. Here the test does the tearing, through the standby's own
descriptor of the memo (``/proc/PID/fd/N``): it lets an update happen,
puts back what the memo held before it except the first page the update
changed, then kills the daemon. The new daemon must serve, from the record
before the torn one.
"""

import mmap
import os

import pytest

from tests.mounting import BLOCK, Mount, requires_mount, wait_until

pytestmark = [requires_mount, pytest.mark.mount]

PAGE = mmap.PAGESIZE
#: Files held open: their handles make a record of two pages and more.
FILES = 300


def memo_of(pid: int) -> int:
    """A descriptor of the connection memo that process *pid* holds."""
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:swapfs-session"):
            return os.open(f"{directory}/{name}", os.O_RDWR)
    raise AssertionError(f"process {pid} holds no connection memo")


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def tear(fd: int, before: bytes, after: bytes) -> None:
    """Leave in the memo what an update from *before* to *after* leaves when
    its writer dies after the first page it changed: that page of *after*,
    everything else of *before*."""
    pages = range(max(len(before), len(after)) // PAGE + 1)
    changed = [page for page in pages
               if before[page * PAGE:(page + 1) * PAGE] != after[page * PAGE:(page + 1) * PAGE]]
    assert changed, "the update changed nothing"
    os.ftruncate(fd, len(before))
    for page in changed[1:]:
        os.pwrite(fd, before[page * PAGE:(page + 1) * PAGE], page * PAGE)
    os.pwrite(fd, after[changed[0] * PAGE:(changed[0] + 1) * PAGE], changed[0] * PAGE)


def test_a_torn_memo_still_lets_the_standby_take_over(mount: Mount) -> None:
    mount.path("c").mkdir()
    standby = mount.start_standby()
    # Two files more than kept, then closed: the memo held a longer record
    # before, as it does after any release.
    blocks = [os.urandom(BLOCK) for _ in range(FILES + 2)]
    fds = [os.open(mount.path("c", f"f{n}"), os.O_RDWR | os.O_CREAT, 0o600)
           for n in range(FILES + 2)]
    memo = memo_of(standby)
    try:
        for fd, block in zip(fds, blocks, strict=True):
            os.pwrite(fd, block, 0)
        for fd in fds[FILES + 1:]:
            os.close(fd)
        del fds[FILES + 1:]
        os.close(fds.pop())  # the last one open, closed and opened again below
        assert wait_until(lambda: mount.status()["open_files"] == FILES)
        before = contents(memo)
        fds.append(os.open(mount.path("c", f"f{FILES}"), os.O_RDWR))  # saved before it returns
        after = contents(memo)
        tear(memo, before, after)

        status = mount.kill_for_takeover()
        assert status["last_takeover"]["number"] == 1
        # The record before the torn one: the last open is not in it (its
        # release will find no handle and change nothing).
        assert status["open_files"] == FILES
        for fd, block in zip(fds, blocks, strict=False):
            assert os.pread(fd, BLOCK, 0) == block
    finally:
        os.close(memo)
        for fd in fds:
            os.close(fd)
    assert wait_until(lambda: mount.status()["open_files"] == 0)
