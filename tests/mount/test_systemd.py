"""The systemd units pass ``systemd-analyze verify``, and none dumps core.

The units name the installed commands in /usr/local/bin (tools/install.sh
puts them there). This machine need not have them installed, so the test
verifies a copy whose command paths point at this environment's scripts;
nothing else in the units changes.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
INSTANCES = [
    "swapfs@main.service",
    "swapfs-swap@mnt-swapfs-web-vm1.swap.service",
    "swapfs.target",
]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify_clean(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    assert (bindir / "swapfs").exists() and (bindir / "swapfs-mountd").exists()
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".target"):
            text = unit.read_text().replace("/usr/local/bin/", f"{bindir}/")
            (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *INSTANCES], cwd=tmp_path,
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_units_run_the_installed_commands() -> None:
    """Every ExecStart/ExecStop names a console script the package installs."""
    pyproject = (UNITS.parent / "pyproject.toml").read_text()
    for unit in UNITS.iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStop=")):
                command = line.split("=", 1)[1].split()[0]
                assert command.startswith("/usr/local/bin/")
                assert f'{command.rsplit("/", 1)[1]} = "' in pyproject


def test_no_unit_dumps_core() -> None:
    """The daemon holds the master key and plaintext pages (swapfs/control/nodump.py)."""
    services = [unit for unit in UNITS.iterdir() if unit.suffix == ".service"]
    assert services
    for unit in services:
        assert "LimitCORE=0" in unit.read_text().splitlines(), unit.name
