"""tools/scale.py runs end to end at a tiny size and reports every figure.

No timing is asserted: the figures are the tool's to report. What is
checked is that each row has every field with a sane value (the state
holds at least the data written, every takeover was timed, the daemon's
memory was read), and that the run leaves no mount, daemon or state behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounting import alive, mounted_paths, requires_mount

pytestmark = [requires_mount, pytest.mark.mount, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

FIELDS = {
    "size_gib", "state_bytes", "build_seconds", "build_mib_per_second", "umount_seconds",
    "mount_seconds", "remount_seconds", "takeover_ms", "takeover_median_ms",
    "takeover_worst_ms", "rss_mib", "hwm_mib", "locked_mib", "rss_mib_per_gib",
    "scan_seconds", "rss_scanned_mib", "anon_scanned_mib", "file_scanned_mib",
    "locked_scanned_mib", "anon_scanned_mib_per_gib", "rss_after_takeover_mib",
    "rss_settled_mib", "file_settled_mib", "rss_settled_mib_per_gib",
}


def test_a_tiny_scale_run_reports_every_figure(tmp_path: Path) -> None:
    states = tmp_path / "states"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "scale.py"), "--sizes-mib", "8,16",
         "--kills", "2", "--gap", "0.5", "--dir", str(states), "--json",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr

    printed = json.loads(result.stdout)
    assert json.loads((tmp_path / "out" / "scale.json").read_text()) == printed
    assert printed["kills"] == 2
    rows = printed["rows"]
    assert [row["size_gib"] * 1024 for row in rows] == [8, 16]
    for row in rows:
        assert set(row) == FIELDS
        size = row["size_gib"] * (1 << 30)
        assert row["state_bytes"] >= size  # unique blocks: nothing deduplicated
        assert row["build_seconds"] > 0 and row["build_mib_per_second"] > 0
        assert row["remount_seconds"] == pytest.approx(
            row["umount_seconds"] + row["mount_seconds"])
        assert len(row["takeover_ms"]) == 2 and all(ms > 0 for ms in row["takeover_ms"])
        assert row["takeover_worst_ms"] == max(row["takeover_ms"])
        assert min(row["takeover_ms"]) <= row["takeover_median_ms"] <= row["takeover_worst_ms"]
        assert 0 < row["rss_mib"] <= row["hwm_mib"]
        assert row["locked_mib"] >= 0 and row["rss_after_takeover_mib"] > 0
        assert row["rss_mib_per_gib"] == pytest.approx(row["rss_mib"] / row["size_gib"])
        assert row["scan_seconds"] >= 0
        assert 0 < row["anon_scanned_mib"] <= row["rss_scanned_mib"]
        assert row["anon_scanned_mib_per_gib"] == pytest.approx(
            row["anon_scanned_mib"] / row["size_gib"])
        assert 0 < row["file_settled_mib"] < row["rss_settled_mib"]
        assert row["rss_settled_mib_per_gib"] == pytest.approx(
            row["rss_settled_mib"] / row["size_gib"])

    # Nothing left: the states are gone, nothing is mounted under them, no
    # daemon of the run lives (the pids its status gave are in the log only,
    # so check every process that names the run's directory).
    assert list(states.iterdir()) == []
    assert not [path for path in mounted_paths() if path.startswith(str(states))]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(states).encode() not in command, command
