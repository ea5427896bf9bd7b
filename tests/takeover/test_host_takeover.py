"""Takeover of a state directory by another host, fenced by the lease.

The other host is a standby in its own mount and UTS namespaces (``unshare
--mount --uts``, host name ``host-b``): its mounts are its own, and it
reaches the state directory through the file system both share, as two
machines would through shared storage (docs/lease.md). Host A is an
ordinary mount whose daemon holds the lease; its failure is a SIGKILL with
no keeper, after which nothing renews the lease.
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from mountd.takeover import standby as standby_mod
from swapfs.cache import parse
from swapfs.cli import spawn
from swapfs.control import protocol
from swapfs.engine import lease
from tests.mounting import (
    BLOCK,
    alive,
    mounted,
    read_direct,
    remove_tree,
    requires_mount,
    short_tempdir,
    swapfs,
    wait_until,
)

pytestmark = [requires_mount, pytest.mark.mount]

#: Longer than acquire's 2 s settle delay, which the lease's validity counts:
#: at 2 s a daemon holds a lease that has lapsed by its own clock, and fences
#: itself (EROFS) at its first renewal.
LEASE_SECONDS = 4


def test_standby_of_another_host_takes_over_once_the_lease_lapses() -> None:
    root = short_tempdir()
    config = root / "swapfs.toml"
    config.write_text(f"lease_seconds = {LEASE_SECONDS}\nmanifest_interval = 0.2\n")
    mnt_b = root / "b"
    mnt_b.mkdir()
    standby = None
    try:
        with mounted(root=root, config=config) as host_a:
            host_a.path("c").mkdir()
            data = random.Random(1).randbytes(16 * BLOCK)
            host_a.path("c", "f").write_bytes(data)
            for _ in range(2):  # into the content cache, then read from it
                read_direct(host_a.path("c", "f"), 0, len(data))
            manifest = host_a.state / "cache.manifest"
            assert wait_until(lambda: manifest.exists() and len(parse(manifest.read_bytes())) == 16)
            held = lease.read_lease(host_a.state)
            assert held is not None and held.generation == 1

            log = open(root / "standby.log", "ab")  # noqa: SIM115 - closed below
            standby = subprocess.Popen(
                ["unshare", "--mount", "--uts", "sh", "-c", 'hostname host-b && exec "$@"',
                 "sh", sys.executable, "-m", "mountd.takeover.standby",
                 "--state", str(host_a.state), "--config", str(config), str(mnt_b)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            # While host A renews its lease, host B only watches.
            time.sleep(2 * LEASE_SECONDS + lease.SKEW_MARGIN)
            assert alive(standby.pid)
            assert status(host_a.state)["pid"] == host_a.pid

            host_a.kill()  # host A fails: nothing renews its lease any more
            taken = {}

            def taken_over() -> bool:
                nonlocal taken
                with contextlib.suppress(protocol.ControlError):
                    taken = status(host_a.state, timeout=2)
                return bool(taken.get("lease")) and taken["lease"]["generation"] == 2

            assert wait_until(taken_over, 60), (root / "standby.log").read_text()
            after = lease.read_lease(host_a.state)
            assert after is not None and after.host == "host-b"
            # Host B warms its cache from host A's manifest (before anything
            # reads, which could admit a block first), then serves the data in
            # its namespace. The warm runs behind the takeover, in threads:
            # under a loaded machine it may take a while.
            assert wait_until(lambda: status(host_a.state)["last_takeover"].get("warmed_bytes")
                              == 16 * BLOCK, 30)
            seen = subprocess.run(
                ["nsenter", "-t", str(standby.pid), "-m", "cat", str(mnt_b / "c" / "f")],
                capture_output=True, timeout=30, check=True).stdout
            assert seen == data
            last = status(host_a.state)["last_takeover"]
            assert last["kind"] == "state" and last["strategy"] == "union"
            assert status(host_a.state)["keeper"] == "standby"
            # Host B stops cleanly: its daemon unmounts on SIGTERM, then the standby exits.
            os.kill(taken["pid"], signal.SIGTERM)
            assert standby.wait(timeout=30) == 0
            assert wait_until(lambda: not alive(taken["pid"]))
    finally:
        if standby is not None and standby.poll() is None:
            standby.kill()
            standby.wait()
        remove_tree(root)


def test_standby_of_another_host_refuses_a_state_without_lease(tmp_path: Any) -> None:
    (tmp_path / "s").mkdir()
    result = swapfs("standby", "--state", str(tmp_path / "s"), str(tmp_path), check=False)
    assert result.returncode == 1
    assert "has no lease" in result.stderr + (tmp_path / "s" / "standby.log").read_text()


def test_standby_of_another_host_refuses_a_corrupt_lease(tmp_path: Any) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "lease").write_bytes(b"garbage")
    result = swapfs("standby", "--state", str(tmp_path / "s"), str(tmp_path), check=False)
    assert result.returncode == 1
    log = result.stderr + (tmp_path / "s" / "standby.log").read_text()
    assert "lease" in log and "break" in log, log


def status(state: Any, timeout: float = 10) -> dict[str, Any]:
    return protocol.request(str(state / "control.sock"), {"op": "status"}, timeout=timeout)


def test_a_daemon_refuses_a_corrupt_lease_and_loses_nothing() -> None:
    root = short_tempdir()
    config = root / "swapfs.toml"
    config.write_text(f"lease_seconds = {LEASE_SECONDS}\n")
    try:
        with mounted(root=root, config=config) as mount:
            mount.path("c").mkdir()
            data = random.Random(2).randbytes(4 * BLOCK)
            mount.path("c", "f").write_bytes(data)
            mount.umount()
            (mount.state / "lease").write_bytes(b"\0" * 7)
            result = swapfs("mount", "--config", str(config), "--state", str(mount.state),
                            str(mount.mnt), check=False)
            assert result.returncode == 1
            assert "lease" in result.stderr and "break" in result.stderr, result.stderr
            swapfs("lease", "--state", str(mount.state), "--break")
            mount.mount()
            assert mount.path("c", "f").read_bytes() == data
            # Claimed as 1 again, re-stamped above the 1 the index records.
            assert status(mount.state)["lease"]["generation"] == 2
    finally:
        remove_tree(root)


# -- a new daemon that takes long to start ----------------------------------------

#: A stand-in for a daemon whose state opens slowly: it writes a progress
#: byte every 0.25 s, *steps* times, then says it is ready (or, with
#: "stall", falls silent).
_SLOW_START = """
import os, sys, time
steps, end, fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[-1])
for _ in range(steps):
    time.sleep(0.25)
    os.write(fd, b".")
if end == "ready":
    os.write(fd, b"1")
time.sleep(120)
"""


def _slow_start(tmp_path: Any, steps: int, end: str) -> spawn.Starting:
    return spawn.start([sys.executable, "-c", _SLOW_START, str(steps), end],
                       tmp_path / "daemon.log")


def test_the_standby_waits_for_a_start_that_progresses(tmp_path: Any, monkeypatch: Any
                                                       ) -> None:
    """Opening a large state takes minutes; the daemon reports each step
    (swapfs/cli/spawn.py). A start four times as long as the stall timeout but
    progressing all along is waited for; one that falls silent is given up
    (killed) after the stall timeout."""
    monkeypatch.setattr(standby_mod, "START_STALL", 2.0)
    starting = _slow_start(tmp_path, 32, "ready")  # 8 s in all
    try:
        standby_mod._serving(starting)
        assert starting.process.poll() is None  # serving, not killed
    finally:
        starting.stop()
    stalled = _slow_start(tmp_path, 2, "stall")
    with pytest.raises(standby_mod.StandbyError, match="did not serve"):
        standby_mod._serving(stalled)
    assert stalled.process.poll() is not None  # killed, not left running
