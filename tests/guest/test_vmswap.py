"""Real guests swap to the files of one clone chain, and a standby keeps them.

tools/vmswap.py boots QEMU guests (TCG) at once, each with a virtio disk
that is a file of one chain on a swapfs mount: the parent's swap file and
clones of it. Each guest builds pages it shares with the others and pages
of its own, more than its RAM, pages all of it out, and reads every page
back, while the daemon is killed with SIGKILL under a standby. Asserted:
the standby's new daemon takes over at each kill; every page of every
guest reads back as written; each guest's kernel swapped its whole
workload out; the chain stores less than the guests swapped out (pages a
new daemon's background scan had not reached yet are stored again: dedup
is late, never wrong); the state checks clean afterwards. That the chain
stores the shared pages once, the ideal, is asserted without kills by
``tests/mount/test_bench.py`` (the bench's guests rows).

Marked ``slow`` and ``mount``, skipped only where a prerequisite of the
guests is missing (tools/setup.sh installs them).
"""

import threading
import time

import pytest

from tests.guest import guest_marks
from tests.mounting import Mount, mounted
from tools import vmswap

MIB = 1 << 20
GUESTS = 2
SHARED_MIB = 96
OWN_MIB = 48
#: Less than a guest's kernel, interpreter and workload take together.
MEMORY_MIB = 192
KILLS = 2


pytestmark = [*guest_marks(), pytest.mark.mount]


class Killer(threading.Thread):
    """Kills the daemon *kills* times while the guests swap: once the chain
    stores a third of the ideal, then two seconds after each takeover; each
    kill waits for the standby's new daemon to answer."""

    def __init__(self, mount: Mount, kills: int, ready_bytes: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.mount, self.kills, self.ready_bytes = mount, kills, ready_bytes
        self.done: list[int] = []  # the new daemons' pids
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set() and (
                    self.mount.chain("vms")["stored_bytes"] < self.ready_bytes):
                time.sleep(0.5)
            while not self.stop.is_set() and len(self.done) < self.kills:
                self.done.append(int(self.mount.kill_for_takeover()["pid"]))
                self.stop.wait(2)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _check(reports: list[vmswap.GuestReport]) -> int:
    """Every guest read every page back as written, having swapped all of
    it out; the bytes swapped out beyond the workloads (other pages of
    the guests' memory)."""
    workload = (SHARED_MIB + OWN_MIB) * MIB
    beyond = 0
    for report in reports:
        assert report.ok, (report.status, report.error, report.report)
        assert report.report["pages"] * vmswap.PAGE == workload
        # All of it paged out; the check read it back (from the swap
        # cache where a page had not left it yet).
        assert report.report["swapped_out_bytes"] >= workload
        assert report.report["swapped_in_bytes"] > 0
        beyond += (report.report["swapped_out_bytes"] - workload
                   + report.report["swapped_out_checking_bytes"])
    return beyond


def test_guests_swapping_to_a_chain_survive_sigkills_under_a_standby() -> None:
    """After each takeover a page whose copy the new daemon's background
    scan has not passed yet is stored again (dedup is late, never wrong):
    what is stored is bounded by what was swapped out, not by the ideal."""
    with mounted() as mount:
        disks = vmswap.chain_disks(mount.mnt, "vms", GUESTS,
                                   vmswap.disk_bytes(SHARED_MIB, OWN_MIB))
        mount.start_standby()
        ideal = (SHARED_MIB + OWN_MIB * GUESTS) * MIB
        killer = Killer(mount, KILLS, ideal // 3)
        killer.start()
        try:
            reports = vmswap.run_guests(disks, SHARED_MIB, OWN_MIB, memory_mib=MEMORY_MIB)
        finally:
            killer.stop.set()
            killer.join(120)
        assert killer.error is None, repr(killer.error)
        beyond = _check(reports)
        assert len(killer.done) == KILLS, "the guests ended before every kill"
        assert mount.status()["takeovers"] == KILLS
        swapped = (SHARED_MIB + OWN_MIB) * MIB * GUESTS + beyond
        assert mount.chain("vms")["stored_bytes"] < swapped
