"""Real power cuts: a QEMU guest writes and fsyncs swapfs files and loses its power.

tools/powercut.py runs 12 cycles of a guest that checks what the previous
cut left, then writes batches of self-describing blocks to two files of a
chain, fsyncing after each batch, until the host kills QEMU (SIGKILL) at a
random moment after the first acknowledged fsync; a last boot checks the
last cut. swapfs promises that an fsync survives power loss and that a
state left by a cut mounts without a human and never returns wrong bytes,
so across every cut:

- no block reads as bytes that were never written there;
- every state mounts with ``swapfs mount``;
- no acknowledged fsync is missing (no block older than its last
  acknowledged version, nor EIO where a version was acknowledged).

``swapfs fsck``'s exit codes are reported with the figures, not asserted.
Marked ``mount`` as well as ``slow``: swapfs is mounted (in the guest), and
the guest needs root on the host (it reads the kernel in /boot, and the
host's files over 9p as QEMU's user). Skipped only where a prerequisite of
the guest is missing (tools/setup.sh installs them).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest import guest_marks

ROOT = Path(__file__).resolve().parents[2]
#: Twelve keep the suite within its time; tools/powercut.py runs 20 by default.
CUTS = 12
#: Plans and cut delays come from it, so that a failure can be run again.
SEED = 20261206


pytestmark = [*guest_marks(*([] if shutil.which("mkfs.ext4") else
                             ["mkfs.ext4 (Debian package e2fsprogs)"])), pytest.mark.mount]


def test_every_fsync_survives_twelve_power_cuts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "powercut.py"), "--cuts", str(CUTS),
         "--seed", str(SEED), "--json", "--out", str(tmp_path),
         # Files of 16 MiB: each boot reads every block back under TCG, which
         # with the 64 MiB default took a fifth of the test's minutes.
         "--file-mib", "16", "--write-seconds", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode in (0, 1), result.stderr
    results = json.loads(result.stdout)
    summary = results["summary"]
    problems = [f"cycle {cycle['cycle']}: {cycle['error'] or ''} "
                f"{(cycle['check'] or {}).get('examples', [])} mount {cycle['mount']} "
                f"fsck {cycle['fsck']}"
                for cycle in results["cycles"]
                if cycle["error"] or (cycle["check"] and cycle["check"]["examples"])
                or (cycle["mount"] and cycle["mount"]["rc"])]
    shown = json.dumps(summary) + "\n" + "\n".join(problems)
    assert summary["wrong_blocks"] == 0, shown
    assert summary["needs_human"] == 0, shown
    assert summary["missing_acks"] == 0, shown
    # Every cut made and checked: no cycle failed for another reason.
    assert summary["failed_cycles"] == 0 and summary["cuts"] == CUTS, shown
    assert summary["checks"] == CUTS, shown
    assert result.returncode == 0, shown
