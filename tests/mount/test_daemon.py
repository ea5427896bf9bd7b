"""The daemon's protections against memory pressure, and its status report.

Whether each protection can take effect depends on the capabilities the
test runs with (CAP_IPC_LOCK, CAP_SYS_RESOURCE); what must always hold is
that the daemon reports truthfully what is in force, checked against the
kernel's own view of the process.
"""

import os
import time
from pathlib import Path

import pytest

from mountd import lifecycle
from tests.mounting import Mount, requires_mount

pytestmark = [requires_mount, pytest.mark.mount]

#: Task flags (include/linux/sched.h) that PR_SET_IO_FLUSHER sets.
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def _task_flags(pid: int) -> dict[int, int]:
    flags = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        flags[int(task.name)] = int(fields[6])  # field 9 of stat: flags
    return flags


def test_memory_lock_is_reported_truthfully(mount: Mount) -> None:
    assert mount.pid is not None
    status = mount.status()
    locked_kib = int(_status_field(mount.pid, "VmLck").split()[0])
    assert status["memory_locked"] == (locked_kib > 0)


def test_memory_per_gib_stored_is_the_daemons_own(mount: Mount) -> None:
    """``swapfs stats`` reports the daemon's resident and locked memory, and
    each per GiB stored: against the kernel's view, as the store grows."""
    assert mount.pid is not None
    (mount.mnt / "c").mkdir()
    data = os.urandom(8 << 20)
    with open(mount.path("c", "f"), "wb") as out:
        out.write(data)
    memory = mount.stats()["memory"]
    rss = int(_status_field(mount.pid, "VmRSS").split()[0]) * 1024
    assert 0.5 * rss < memory["rss_bytes"] < 2 * rss  # the figure moves between reads
    assert (memory["locked_bytes"] > 0) == mount.status()["memory_locked"]
    assert memory["stored_bytes"] == len(data)
    assert memory["rss_bytes_per_gib_stored"] == pytest.approx(
        memory["rss_bytes"] * (1 << 30) / len(data))


def test_no_memory_per_gib_with_nothing_stored(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmLck:\t     128 kB\nVmRSS:\t   65536 kB\n"
                      "RssAnon:\t   49152 kB\nRssFile:\t   16384 kB\n")
    assert lifecycle.memory(0, str(status)) == {
        "rss_bytes": 64 << 20, "own_bytes": 48 << 20, "file_bytes": 16 << 20,
        "locked_bytes": 128 << 10, "stored_bytes": 0,
        "rss_bytes_per_gib_stored": None, "own_bytes_per_gib_stored": None,
        "locked_bytes_per_gib_stored": None}
    assert lifecycle.memory(1 << 29, str(status))["rss_bytes_per_gib_stored"] == 128 << 20


def _state_file_maps(pid: int, state: Path) -> dict[str, tuple[int, int]]:
    """(Rss, Locked) in kB of each of the process's mappings of files under
    *state*, by range (/proc/PID/smaps)."""
    maps: dict[str, tuple[int, int]] = {}
    current = None
    rss = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[0] if len(fields) >= 6 and fields[5].startswith(
                str(state) + "/") else None
        elif current is not None and fields[0] == "Rss:":
            rss = int(fields[1])
        elif current is not None and fields[0] == "Locked:":
            maps[current] = (rss, int(fields[1]))
    return maps


def test_the_state_files_mapped_are_not_locked(mount: Mount) -> None:
    """The index and the seal files are page cache the kernel may drop:
    locked, they grew with every index page the daemon touched."""
    assert mount.pid is not None
    if not mount.status()["memory_locked"]:
        pytest.skip("the daemon cannot lock its memory here")
    (mount.mnt / "c").mkdir()
    with open(mount.path("c", "f"), "wb") as out:
        out.write(os.urandom(8 << 20))
    deadline = time.monotonic() + 15
    while True:
        maps = _state_file_maps(mount.pid, mount.state)
        if maps and all(locked == 0 for _, locked in maps.values()):
            break
        assert time.monotonic() < deadline, maps
        time.sleep(0.5)
    assert sum(rss for rss, _ in maps.values()) > 0, "the daemon maps the index"
    memory = mount.stats()["memory"]
    assert memory["own_bytes"] + memory["file_bytes"] == pytest.approx(
        memory["rss_bytes"], rel=0.2)


def test_oom_protection_is_reported_truthfully(mount: Mount) -> None:
    assert mount.pid is not None
    adj = int(Path(f"/proc/{mount.pid}/oom_score_adj").read_text())
    assert mount.status()["oom_protected"] == (adj == -1000)


def test_every_thread_is_an_io_flusher_when_reported(mount: Mount) -> None:
    """PR_SET_IO_FLUSHER is per thread; threads started later inherit it."""
    assert mount.pid is not None
    want = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
    flags = _task_flags(mount.pid)
    if mount.status()["io_flusher"]:
        assert all(value & want == want for value in flags.values()), flags
    else:
        assert not any(value & want for value in flags.values()), flags


def test_status_names_the_mount(mount: Mount) -> None:
    status = mount.status()
    assert status["mountpoint"] == str(mount.mnt.resolve())
    assert status["state"] == str(mount.state.resolve())
    assert status["open_files"] == 0
