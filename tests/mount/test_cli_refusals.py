"""The command line acts only on what is its own, and says why in one line.

``swapfs mount`` refuses mount points it must not cover (missing, not a
directory, not empty, already a mount point) and a state directory inside
its own mount point; ``umount`` refuses what is not a swapfs mount; ``fsck``
exits 8 when it cannot run. Each refusal is exit code 1 (8 for fsck) and a
single line on stderr naming the cause, and changes nothing.
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount, is_mounted, requires_mount, short_tempdir, swapfs

pytestmark = [requires_mount, pytest.mark.mount]


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def refused(*args: str, code: int = 1) -> str:
    """Run a command that must fail with *code* and one line; that line."""
    result = swapfs(*args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_mount_refuses_a_missing_mount_point(root: Path) -> None:
    line = refused("mount", "--state", str(root / "s"), str(root / "nowhere"))
    assert "does not exist" in line
    assert not (root / "s").exists()


def test_mount_refuses_a_regular_file(root: Path) -> None:
    (root / "file").write_bytes(b"x")
    assert "is not a directory" in refused("mount", "--state", str(root / "s"),
                                            str(root / "file"))
    assert (root / "file").read_bytes() == b"x"


def test_mount_refuses_a_directory_that_is_not_empty(root: Path) -> None:
    (root / "m").mkdir()
    (root / "m" / "kept").write_bytes(b"x")
    assert "is not empty" in refused("mount", "--state", str(root / "s"), str(root / "m"))
    assert not is_mounted(root / "m")


def test_mount_refuses_a_state_directory_inside_its_mount_point(root: Path) -> None:
    (root / "m").mkdir()
    line = refused("mount", "--state", str(root / "m" / "state"), str(root / "m"))
    assert "inside the mount point" in line
    assert not is_mounted(root / "m") and not (root / "m" / "state").exists()


def test_mount_refuses_a_mount_point_in_use(mount: Mount, root: Path) -> None:
    line = refused("mount", "--state", str(root / "s"), str(mount.mnt))
    assert "already a mount point (fuse.swapfs)" in line
    assert mount.status()["pid"] == mount.pid  # the mount there still serves


def test_umount_refuses_what_is_not_swapfs(root: Path) -> None:
    (root / "t").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "t")], check=True)
    try:
        assert "is not a swapfs mount (tmpfs)" in refused("umount", str(root / "t"))
        assert is_mounted(root / "t")
    finally:
        subprocess.run(["umount", str(root / "t")], check=True)
    assert "is not a mount point" in refused("umount", str(root / "t"))


def test_a_daemon_that_cannot_start_is_one_line_naming_why(root: Path) -> None:
    (root / "m").mkdir()
    config = root / "bad.toml"
    config.write_text("lease_seconds = \"soon\"\n")
    line = refused("mount", "--state", str(root / "s"), "--config", str(config),
                   str(root / "m"))
    assert "lease_seconds" in line and "daemon.log" in line
    assert not is_mounted(root / "m")


def test_fsck_that_cannot_run_exits_8(mount: Mount, root: Path) -> None:
    assert "holds no swapfs state" in refused("fsck", "--state", str(root / "none"), code=8)
    assert "in use" in refused("fsck", "--state", str(mount.state), code=8)
    assert os.path.exists(mount.state / "index.lmdb")
