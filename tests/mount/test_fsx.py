"""Random operations on a real mount, checked against a model (``tests/fsx.py``).

Each seed is a different sequence of a few thousand writes, reads,
truncates, fallocates, clones, renames and unlinks on the files of one
chain, with a clean remount, a SIGKILL and a standby's takeover among them,
and a clean offline fsck at the end. A failure names its seed and the last
operations; ``python -m tests.fsx --seed N --ops M`` replays it, and runs
other seeds or longer sequences by hand.
"""

import pytest

from tests import fsx
from tests.mounting import Mount, requires_mount

pytestmark = [pytest.mark.mount, requires_mount]

OPS = 3000


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_the_model(mount: Mount, seed: int) -> None:
    assert mount.stats()["encrypted"]  # as new states are by default
    run = fsx.run(mount, seed, OPS)
    # Not vacuous: every kind of operation ran, and every restart.
    assert set(run.counts) >= set(fsx.WEIGHTS), set(fsx.WEIGHTS) - set(run.counts)
    assert all(run.counts[how] == 1 for how in fsx.RESTARTS)
    assert run.counts["umount and fsck"] == 1
