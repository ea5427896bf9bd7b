"""Real kernel swap through swapfs while its daemon is killed with SIGKILL.

With a standby keeping the connection, the workload of the demo (workers
that build a table bigger than their memory cgroup allows, then verify
every byte after swap-in) runs through several kills, in both phases, and
loses nothing. Without a keeper, one kill costs the workers their pages.

Swap is always taken down before the mount is closed: after the workers
are gone, swapoff, then the loop device, then the mount.
"""

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swapfs import swaparea
from tests.mounting import BLOCK, Mount, requires_mount
from tests.test_swap import swap_file, swap_on
from tools.swapload import MIB, MemoryCgroup, run_workload
from tools.takeover import Killer, Probe, summary

pytestmark = [requires_mount, pytest.mark.mount, pytest.mark.slow]

#: Kills made by the end of each phase of the workload: up to three while the
#: workers swap out, the rest of six while they swap in.
KILLS = {"build": 3, "verify": 6}


def swap_used(mount: Mount) -> int:
    return sum(area.used_bytes for area in swaparea.active_areas([str(mount.mnt)]))


@contextlib.contextmanager
def probe_file(mount: Mount) -> Iterator[Probe]:
    """A probe reading a block of a small file in the chain with O_DIRECT."""
    path = mount.path("web", "probe")
    path.write_bytes(os.urandom(BLOCK))
    with Probe(path) as probe:
        yield probe


def test_swap_workload_survives_sigkills_with_a_standby(
        mount: Mount, record_property: Callable[[str, object], None]) -> None:
    """Four workers x 128 MiB under a 192 MiB limit; the daemon is killed
    every second or so once 64 MiB are swapped out, up to three times while
    they swap out and the rest of six times while they swap in. Every byte verifies, each
    kill is one takeover, and the timings are reported (never asserted)."""
    path = swap_file(mount, "vm.swap", 1024)
    mount.start_standby()
    socket_path = str(mount.state / "control.sock")
    with swap_on(path) as device, probe_file(mount) as probe, \
            MemoryCgroup("takeover", 192 * MIB) as cgroup:
        assert mount.pid is not None
        killer = Killer(socket_path, mount.pid, probe, KILLS,
                        gap=1.0, ready=lambda: swap_used(mount) > 64 * MIB)
        killer.start()
        try:
            # Raises if a worker died or found a byte that differs.
            result = run_workload(cgroup, workers=4, table_mib=128, device=device,
                                  on_phase=killer.enter_phase)
        finally:
            takeovers = killer.finish()
            # The daemon serving now, whatever happened: the mount closes that one.
            mount.pid = int(mount.status()["pid"])
    table = 128 * MIB
    assert result.swapped_out_bytes > 2 * table
    assert result.swapped_in_bytes > table
    print(f"\n{summary(takeovers)}")
    for kill in takeovers:
        print(f"  takeover {kill.number} ({kill.phase}): probe {kill.probe_seconds:.3f} s, "
              f"daemon {kill.daemon_seconds} s, {kill.waiting} requests waiting")
    record_property("kills", len(takeovers))
    record_property("probe_seconds", [round(kill.probe_seconds, 4) for kill in takeovers])
    record_property("daemon_seconds", [kill.daemon_seconds for kill in takeovers])
    probe_seconds = [kill.probe_seconds for kill in takeovers]
    record_property("probe_median_seconds", round(statistics.median(probe_seconds), 4))
    record_property("probe_worst_seconds", round(max(probe_seconds), 4))

    phases = [kill.phase for kill in takeovers]
    assert phases.count("build") >= 1 and phases.count("verify") >= 1, phases
    assert len(takeovers) >= 5, phases
    # One takeover per kill, in order, each with the lost requests resent.
    assert [kill.number for kill in takeovers] == list(range(1, len(takeovers) + 1))
    assert all(kill.resent for kill in takeovers)
    status = mount.status()
    assert status["takeovers"] == len(takeovers)  # no death but the kills
    assert status["pid"] == takeovers[-1].pid
    assert status["keeper"] == "standby"
    assert swaparea.devices_of(str(path)) == []
    assert not Path(cgroup.path).exists()
