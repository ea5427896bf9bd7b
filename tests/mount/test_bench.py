"""``swapfs bench --quick`` runs end to end and writes its table, JSON and chart.

No speed is asserted here: figures are the benchmark's to report, as ratios
measured in the same run. What is checked is that every row is there, that
the ratios are computed against the ceilings of the same run (the stock and
the patched pyfuse3, the kernel), that the state directory of
swapfs-nodiscard is on a file system without ``discard``, that the targets
table and the encryption table report what the rows say, and that the
benchmark leaves nothing behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mounting import mounted_paths, requires_mount

pytestmark = [requires_mount, pytest.mark.mount, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _leftovers() -> tuple[str, str, list[str], list[Path]]:
    swaps = Path("/proc/swaps").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return (swaps, loops, [path for path in mounted_paths() if "swapfs-bench" in path],
            sorted(Path("/var/tmp").glob("swapfs-bench-*")))


def test_quick_bench_writes_its_table(tmp_path: Path) -> None:
    before = _leftovers()
    result = subprocess.run(
        [sys.executable, "-m", "swapfs.cli", "bench", "--quick", "--runtime", "1",
         "--takeover-window", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.strip() == table.strip()

    rows = {(row["target"], row["job"]): row for row in results["fio"]}
    jobs = ["randwrite-4k", "randread-4k", "seqwrite-1m", "seqread-1m"]
    ceilings = {"python-fuse-stock": "vs_python_fuse_stock",
                "python-fuse-patched": "vs_python_fuse_patched", "kernel": "vs_kernel"}
    swapfs_targets = ["swapfs", "swapfs-unencrypted", "swapfs-nodiscard"]
    for target in [*swapfs_targets, *ceilings, "zram", "root-disk"]:
        for job in jobs:
            row = rows[target, job]
            assert f"| {target} | {job} |" in table
            if "unavailable" in row:
                continue
            assert row["iops"] > 0 and row["mbps"] > 0 and row["p99_us"] >= row["p50_us"]
            for ceiling, key in ceilings.items():
                assert row[key] == pytest.approx(row["iops"] / rows[ceiling, job]["iops"])
    for job in jobs:  # the ceilings and the swapfs targets must have run
        for target in [*swapfs_targets, *ceilings]:
            assert "unavailable" not in rows[target, job]
        for ceiling, key in ceilings.items():
            assert rows[ceiling, job][key] == pytest.approx(1.0)

    state_fs = results["state_fs"]  # "SOURCE FSTYPE OPTIONS" of each state directory
    assert set(state_fs) == set(swapfs_targets)
    source, fstype, options = state_fs["swapfs-nodiscard"].split()
    assert source.startswith("/dev/loop") and fstype == "ext4"
    assert "discard" not in options.split(",")
    for target, mount in state_fs.items():
        assert f"State directory of {target}: {mount}" in table

    (space,) = results["space"]
    assert space["stored_bytes"] == space["ideal_bytes"]  # dedup is exact in a chain
    assert 0 < space["stored_bytes"] < space["logical_bytes"]
    assert space["logical_blocks"] * 4096 == space["logical_bytes"]  # one file, one chain
    assert space["stored_blocks"] * 4096 == space["stored_bytes"]
    assert space["maps_bytes"] + space["other_bytes"] + space["unused_bytes"] \
        == space["metadata_bytes"]
    assert space["maps_per_logical_block"] == space["maps_bytes"] / space["logical_blocks"]
    assert f"| {space['data']} | {space['logical_blocks']} | {space['stored_blocks']} |" in table
    e2e = {row["target"]: row for row in results["e2e"]}
    assert set(e2e) == {*swapfs_targets, "zram", "root-disk"}
    for target in swapfs_targets:
        assert e2e[target]["swapped_out_bytes"] > 0
        assert e2e[target]["stored_bytes"] < e2e["root-disk"]["stored_bytes"]
        # Its daemon served every page swapped: it spent CPU time on them.
        assert e2e[target]["daemon_cpu_s_per_gib"] > 0
        assert f"| {e2e[target]['daemon_cpu_s_per_gib']:.1f} |" in table
    assert "daemon_cpu_s_per_gib" not in e2e["root-disk"]

    guests = {row["target"]: row for row in results["guests"]}
    assert set(guests) == {"swapfs", "root-disk"}
    plan = results["plan"]
    shared, own = plan["guest_shared_mib"] * 2**20, plan["guest_own_mib"] * 2**20
    for row in guests.values():
        # Every guest read every page back as written, having paged it all out.
        assert (row["guests"], row["failed"], row["wrong_pages"]) == (plan["guests"], 0, 0)
        assert row["swapped_out_bytes"] >= (shared + own) * plan["guests"]
    # The chain stored what the guests share once: the ideal, plus at most
    # each other page they swapped out and the parent's swap header.
    chain = guests["swapfs"]
    assert chain["ideal_bytes"] == shared + own * plan["guests"]
    assert chain["ideal_bytes"] <= chain["stored_bytes"] \
        <= chain["ideal_bytes"] + chain["other_swapped_out_bytes"] + 2**20, chain
    assert guests["root-disk"]["stored_bytes"] is None
    assert guests["root-disk"]["out_vs_root_disk"] == 1.0
    assert f"| swapfs | 0 | {guests['swapfs']['swap_out_mbps']:.1f} |" in table

    goals = {row["key"]: row for row in results["goals"]}
    assert list(goals) == [*jobs, "out_vs_root_disk", "in_vs_root_disk"]
    for key, goal in goals.items():
        for target in swapfs_targets:
            figure = goal["measured"][target]
            if key in jobs:
                assert figure["ratio"] == rows[target, key]["vs_python_fuse_stock"]
            else:
                assert figure["ratio"] == e2e[target][key]
            assert figure["met"] == (figure["ratio"] >= goal["goal"])
        assert f"| {goal['what']} | >= {goal['goal']:.1f}x |" in table
    encryption = {row["what"]: row for row in results["encryption"]}
    assert list(encryption) == [f"fio {job} dedupe-50" for job in jobs] + [
        "end-to-end swap-out", "end-to-end swap-in"]
    for job in jobs:
        row = encryption[f"fio {job} dedupe-50"]
        assert (row["encrypted"], row["unencrypted"]) == (
            rows["swapfs", job]["mbps"], rows["swapfs-unencrypted", job]["mbps"])
    for what, key in (("swap-out", "swap_out_mbps"), ("swap-in", "swap_in_mbps")):
        row = encryption[f"end-to-end {what}"]
        assert row["ratio"] == pytest.approx(e2e["swapfs"][key] / e2e["swapfs-unencrypted"][key])
    for row in encryption.values():
        assert row["met"] == (row["ratio"] >= 0.9)
        assert f"| {row['what']} | {row['encrypted']:.1f} |" in table
    off, on = results["pool"]  # the transient cache: off, then on
    assert (off["pool_bytes"], off["hit_rate"], off["speedup"]) == (0, 0.0, 1.0)
    assert on["pool_bytes"] > 0 and on["hit_rate"] > 0
    assert on["speedup"] == pytest.approx(on["iops"] / off["iops"])
    assert "Transient cache: zipf 1.2" in table
    content = {(row["job"], row["cache_bytes"]): row for row in results["content"]}
    assert set(content) == {(job, size) for job in ("randread-4k", "randread-4k-zipf")
                            for size in (0, 64 << 20)}
    assert content["randread-4k-zipf", 0]["hit_rate"] == 0.0
    assert content["randread-4k-zipf", 64 << 20]["hit_rate"] > 0
    assert "Content cache: 4 KiB random reads" in table
    takeover = {row["case"]: row for row in results["takeover"]}
    assert list(takeover) == ["cold", "steady", "warm"]
    for case, row in takeover.items():
        assert row["iops"] > 0 and row["mbps"] > 0
        assert 0.0 <= row["hit_rate_first_second"] <= 1.0 and 0.0 <= row["hit_rate"] <= 1.0
        assert row["vs_cold"] == pytest.approx(row["mbps"] / takeover["cold"]["mbps"])
        assert f"| {case} |" in table
    for case in ("cold", "warm"):  # a real takeover: timed, from the kill
        row = takeover[case]
        assert 0 < row["takeover_seconds"] <= row["first_read_seconds"] < 60
    assert takeover["cold"]["manifest_blocks"] == 0 == takeover["cold"]["warmed_bytes"]
    assert takeover["warm"]["manifest_blocks"] > 0 and takeover["warm"]["warmed_bytes"] > 0
    assert "takeover_seconds" not in takeover["steady"]
    assert "Takeover: zipf 1.2 4 KiB random read (one fixed sequence)" in table
    assert _leftovers() == before
