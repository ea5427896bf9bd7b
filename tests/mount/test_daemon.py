"""The daemon's protections against memory pressure, and its status report.

Whether each protection can take effect depends on the capabilities the
test runs with (CAP_IPC_LOCK, CAP_SYS_RESOURCE); what must always hold is
that the daemon reports truthfully what is in force, checked against the
kernel's own view of the process.
"""

from pathlib import Path

import pytest

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
