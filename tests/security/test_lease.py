"""The lease that fences a state directory across hosts (swapfs.engine.lease).

Real files throughout; the race runs two real processes, and the two-host
test runs the standby in its own mount and UTS namespace (``unshare``),
seeing the state directory through a bind mount. Durations are short (a
fraction of a second) and the skew margin and settle delay are cut to match.
"""

import errno
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

from mountd import daemon
from mountd.config import Config
from mountd.link import Link
from swapfs.engine import (
    LEASE_SIZE,
    ROOT_INO,
    Index,
    LeaseCorrupt,
    LeaseError,
    LeaseHeld,
    LeaseInfo,
    LeaseLost,
    SlotTable,
    State,
    SwapfsError,
    Volume,
    acquire,
    break_lease,
    encode,
    keep_renewed,
    keys,
    new_holder,
    read_lease,
    recorded_generation,
    reseal,
)
from swapfs.engine import lease as lease_mod
from tests.mounting import SWAPFS, wait_until
from tests.security.test_fencing import snapshot

#: Test timings: a contender may take over DURATION + MARGIN after the last renewal.
DURATION = 0.5
MARGIN = 0.1
SETTLE = 0.1
FAST: dict[str, Any] = {"settle": SETTLE, "skew_margin": MARGIN}


@pytest.fixture(autouse=True)
def no_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal flushes the whole file system under the state first
    (syncfs), which other processes' dirty pages can make slow; these tests
    time the protocol, so their leases flush nothing (the order of flush
    and stamp has a test of its own)."""
    monkeypatch.setattr(lease_mod, "sync_file_system", lambda state: None)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def take(state: Path, **kwargs: Any) -> lease_mod.Lease:
    return acquire(state, kwargs.pop("duration", DURATION), **{**FAST, **kwargs})


# -- holding, refusing, taking over -------------------------------------------


def test_acquire_on_an_empty_directory(state: Path) -> None:
    held = take(state, host="host-a")
    info = read_lease(state)
    assert info is not None
    assert (info.holder, info.host, info.pid, info.generation) == (
        held.holder, "host-a", os.getpid(), 1)
    assert info.duration == DURATION
    assert abs(info.renewed - time.time()) < 5
    assert 0 < held.valid_for() <= DURATION
    assert [p.name for p in state.iterdir()] == ["lease"]  # no temporary file left


def test_a_second_holder_is_refused_then_takes_over_after_expiry(state: Path) -> None:
    first = take(state, host="host-a")
    with pytest.raises(LeaseHeld) as refused:
        take(state, host="host-b")
    assert refused.value.holder == first.holder_hex
    assert refused.value.host == "host-a"
    assert 0 < refused.value.expires_in <= DURATION + MARGIN
    assert first.holder_hex in str(refused.value)

    # The first holder stops renewing; the second waits for the lapse and takes it.
    second = take(state, host="host-b", timeout=10)
    assert second.generation == 2
    assert first.valid_for() == 0
    with pytest.raises(LeaseLost, match=second.holder_hex):
        first.renew()
    with pytest.raises(LeaseLost):
        first.renew()  # lost for good
    second.renew()
    assert read_lease(state).holder == second.holder  # type: ignore[union-attr]


def test_a_waiting_contender_gives_up_at_its_timeout(state: Path) -> None:
    take(state, duration=30)
    started = time.monotonic()
    with pytest.raises(LeaseHeld):
        take(state, timeout=0.3)
    assert time.monotonic() - started < 10


def test_release_then_acquire(state: Path) -> None:
    first = take(state)
    first.release()
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 1
    assert first.valid_for() == 0
    with pytest.raises(LeaseLost):
        first.renew()
    second = take(state)  # at once: a released lease needs no waiting
    assert second.generation == 2
    first.release()  # no longer ours: leaves the new holder alone
    assert read_lease(state).holder == second.holder  # type: ignore[union-attr]


def test_renew_keeps_it_alive_past_several_durations(state: Path) -> None:
    held = take(state)
    until = time.monotonic() + 4 * DURATION
    refusals = 0
    while time.monotonic() < until:
        time.sleep(held.renew_interval)
        held.renew()
        with pytest.raises(LeaseHeld):
            take(state, settle=0.0)
        refusals += 1
    assert refusals >= 4
    assert held.valid_for() > 0
    assert read_lease(state).generation == 1  # type: ignore[union-attr]


def test_keep_renewed_holds_it_and_reports_a_loss(state: Path) -> None:
    held = take(state)
    lost: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_renewed, held, lambda: lost.append(time.monotonic()))
            await trio.sleep(4 * DURATION)
            assert not lost and held.valid_for() > 0
            with pytest.raises(LeaseHeld):
                await trio.to_thread.run_sync(lambda: take(state, settle=0.0))
            # An operator breaks the live lease: the next renewal notices.
            await trio.to_thread.run_sync(lambda: break_lease(state, force=True))
            broke = time.monotonic()
            with trio.fail_after(10):
                while not lost:
                    await trio.sleep(0.02)
            assert lost[0] - broke < DURATION + 1
            assert held.valid_for() == 0

    trio.run(main)


def test_keep_renewed_fences_before_the_lapse_when_renewals_fail(state: Path) -> None:
    """Storage that rejects every write: on_lost comes while the lease is still valid."""
    held = take(state, duration=1.0)
    events: list[float] = []

    def fail(*args: object) -> None:
        raise LeaseError(5, "I/O error")

    async def main() -> None:
        with trio.fail_after(10):
            await keep_renewed(held, lambda: events.append(held._deadline - lease_mod.clock()))

    original = lease_mod._write_lease
    lease_mod._write_lease = fail  # type: ignore[assignment]
    try:
        trio.run(main)
    finally:
        lease_mod._write_lease = original
    assert len(events) == 1
    assert events[0] > 0  # called before the holder's own view lapsed


# -- two processes racing ----------------------------------------------------


def _contender(state: str, rounds: int, barrier: Any, results: Any, name: str) -> None:
    for _ in range(rounds):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            won = acquire(Path(state), 30.0, settle=0.6, skew_margin=MARGIN)
            results.put((name, "won", won.generation))
        except LeaseHeld as held:
            results.put((name, "held", held.info.generation))
        except Exception as exc:  # reported, so the test names it
            results.put((name, f"error {exc!r}", 0))


def _expired(state: Path, generation: int) -> None:
    lease_mod._write_lease(state, LeaseInfo(
        holder=new_holder(), host="gone", pid=1, generation=generation,
        renewed=time.time() - 100, duration=1.0))


def test_two_processes_racing_for_an_expired_lease_never_both_win(state: Path) -> None:
    rounds = 15
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    results = context.Queue()
    workers = [context.Process(target=_contender, args=(str(state), rounds, barrier, results,
                                                        name)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    try:
        for number in range(rounds):
            generation = 10 * (number + 1)
            _expired(state, generation)
            barrier.wait(timeout=60)
            reports = sorted(results.get(timeout=60) for _ in workers)
            winners = [report for report in reports if report[1] == "won"]
            assert len(winners) == 1, reports
            assert winners[0][2] == generation + 1
            loser = next(report for report in reports if report[1] != "won")
            assert loser[1] == "held", reports
            info = read_lease(state)
            assert info is not None and info.generation == generation + 1
    finally:
        barrier.abort()  # frees workers still waiting when a round failed
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()


# -- corrupt lease files -----------------------------------------------------


def _assert_refused_and_untouched(state: Path) -> None:
    path = state / "lease"
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(LeaseCorrupt):
        read_lease(state)
    with pytest.raises(LeaseCorrupt):
        take(state)
    with pytest.raises(LeaseCorrupt):
        take(state, timeout=0.2)  # waiting does not get past it either
    if before is not None:
        assert path.read_bytes() == before


def _valid_record() -> bytes:
    return encode(LeaseInfo(holder=new_holder(), host="host-a", pid=42, generation=7,
                            renewed=time.time() - 100, duration=1.0))


def test_a_truncated_lease_at_every_length_is_refused(state: Path) -> None:
    record = _valid_record()
    for length in range(LEASE_SIZE):
        (state / "lease").write_bytes(record[:length])
        _assert_refused_and_untouched(state)


def test_every_single_bit_flip_is_refused(state: Path) -> None:
    record = _valid_record()
    path = state / "lease"
    for bit in range(8 * LEASE_SIZE):
        flipped = bytearray(record)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(LeaseCorrupt):
            read_lease(state)
        with pytest.raises(LeaseCorrupt):
            acquire(state, DURATION, settle=0.0, skew_margin=MARGIN)
        assert path.read_bytes() == bytes(flipped)


def _future_version() -> bytes:
    record = bytearray(_valid_record())
    record[8:12] = (2).to_bytes(4, "little")
    body = bytes(record[:LEASE_SIZE - 32])
    return body + blake3.blake3(body).digest(32)


@pytest.mark.parametrize("kind", [
    "empty", "garbage", "one-byte-too-long", "future-version", "directory", "symlink",
    "fifo",
])
def test_a_corrupt_lease_is_refused_until_broken(state: Path, kind: str) -> None:
    path = state / "lease"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(LEASE_SIZE))
    elif kind == "one-byte-too-long":
        path.write_bytes(_valid_record() + b"\0")
    elif kind == "future-version":
        path.write_bytes(_future_version())
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        (state / "elsewhere").write_bytes(_valid_record())
        path.symlink_to(state / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(path)
    _assert_refused_and_untouched(state)
    assert break_lease(state) is None
    assert not os.path.lexists(path)
    held = take(state)
    assert held.generation == 1


def test_the_corrupt_message_says_how_to_break_it(state: Path) -> None:
    (state / "lease").write_bytes(b"garbage")
    with pytest.raises(LeaseCorrupt, match=r"swapfs lease --state .* --break"):
        take(state)


def test_a_holder_whose_lease_turned_corrupt_has_lost_it(state: Path) -> None:
    held = take(state)
    (state / "lease").write_bytes(b"garbage")
    with pytest.raises(LeaseLost, match="corrupt"):
        held.renew()


def test_breaking_refuses_a_live_lease_unless_forced(state: Path) -> None:
    held = take(state, duration=30)
    with pytest.raises(LeaseHeld):
        break_lease(state)
    broken = break_lease(state, force=True)
    assert broken is not None and broken.holder == held.holder
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 1
    assert take(state).generation == 2


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="swapfs-lease-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


NOBODY = 65534
#: Imports everything as root (this Python may live where nobody can read),
#: then becomes nobody and runs the rest of the script.
_AS_NOBODY = f"""
import os, sys
from swapfs.cli import commands as cli
from swapfs.engine import lease
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
"""


def test_an_unreadable_lease_is_a_clear_error(shared_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    state = shared_tmp / "state"
    state.mkdir()
    path = state / "lease"
    record = _valid_record()
    path.write_bytes(record)
    path.chmod(0)
    probe = subprocess.run([sys.executable, "-c", _AS_NOBODY + f"open({str(path)!r}, 'rb')"],
                           capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the unprivileged user can still read a mode-000 file here")
    script = _AS_NOBODY + textwrap.dedent(f"""
        try:
            lease.acquire({str(state)!r}, 1.0, settle=0.0)
        except lease.LeaseCorrupt as exc:
            print("corrupt", exc)
        except lease.LeaseError as exc:
            print("error", exc.errno, exc)
        sys.exit(cli.main(["lease", "--state", {str(state)!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.startswith("error 13 cannot read lease file"), result
    assert result.returncode == 1  # the command line: a failure, not a crash
    assert "cannot read lease file" in result.stderr and "Traceback" not in result.stderr
    assert path.read_bytes() == record  # left as it was


# -- the command line ----------------------------------------------------------


def swapfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWAPFS, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_the_cli_prints_and_breaks_the_lease(state: Path) -> None:
    shown = swapfs("lease", "--state", str(state))
    assert shown.returncode == 0 and "no lease" in shown.stdout
    assert json.loads(swapfs("lease", "--state", str(state), "--json").stdout) is None

    held = take(state, duration=30, host="host-a")
    shown = swapfs("lease", "--state", str(state))
    assert shown.returncode == 0
    for word in (held.holder_hex, "host-a", str(os.getpid()), "generation  1", "expires in"):
        assert word in shown.stdout
    report = json.loads(swapfs("lease", "--state", str(state), "--json").stdout)
    assert report["state"] == "held"
    assert (report["holder"], report["host"], report["pid"], report["generation"]) == (
        held.holder_hex, "host-a", os.getpid(), 1)
    assert 0 <= report["age_seconds"] < 30
    assert 0 < report["expires_in_seconds"] <= 30 + lease_mod.SKEW_MARGIN

    refused = swapfs("lease", "--state", str(state), "--break")
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert swapfs("lease", "--state", str(state), "--force").returncode == 2
    forced = swapfs("lease", "--state", str(state), "--break", "--force", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)["broken"] is True
    with pytest.raises(LeaseLost):
        held.renew()
    assert json.loads(swapfs("lease", "--state", str(state), "--json").stdout)["state"] == "free"

    (state / "lease").write_bytes(b"\0" * LEASE_SIZE)
    shown = swapfs("lease", "--state", str(state))
    assert shown.returncode == 1 and "corrupt" in shown.stderr
    assert "Traceback" not in shown.stderr
    assert swapfs("lease", "--state", str(state), "--break").returncode == 0
    assert take(state).generation == 1
    assert swapfs("lease", "--state", str(state / "absent")).returncode == 1


# -- two hosts -----------------------------------------------------------------

_STANDBY = """
import json, sys
from pathlib import Path
from swapfs.engine import LeaseHeld, acquire
view = Path(sys.argv[1])
try:
    acquire(view, 1.0, settle=0.1, skew_margin=0.1)
    first = "won"
except LeaseHeld as held:
    first = {"holder": held.holder, "host": held.host}
taken = acquire(view, 1.0, settle=0.1, skew_margin=0.1, timeout=20)
with open("/proc/self/mountinfo") as mounts:
    mounted = any(line.split()[4] == str(view) for line in mounts)
print(json.dumps({"first": first, "generation": taken.generation, "mounted": mounted}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1)")
def test_a_standby_in_another_mount_namespace_takes_over(tmp_path: Path) -> None:
    """Host B: its own mount and UTS namespace, the state directory bind-mounted."""
    state = tmp_path / "state"
    state.mkdir()
    view = tmp_path / "host-b-view"
    view.mkdir()
    primary = acquire(state, 1.0, settle=0.1, skew_margin=0.1, host="host-a")
    shell = ('mount --make-rprivate / && mount --bind "$1" "$2" && hostname host-b && '
             'exec "$3" -c "$4" "$2"')
    standby = subprocess.Popen(
        ["unshare", "--mount", "--uts", "sh", "-c", shell, "sh", str(state), str(view),
         sys.executable, _STANDBY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Host A keeps renewing for a while, then dies without releasing.
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        primary.renew()
        time.sleep(primary.renew_interval)
    out, err = standby.communicate(timeout=60)
    assert standby.returncode == 0, err
    report = json.loads(out)
    assert report["first"] == {"holder": primary.holder_hex, "host": "host-a"}
    assert report["generation"] == 2
    assert report["mounted"] is True
    with open("/proc/self/mountinfo") as mounts:  # the bind mount lived only on "host B"
        assert not any(line.split()[4] == str(view) for line in mounts)
    info = read_lease(state)
    assert info is not None and info.host == "host-b" and info.generation == 2
    with pytest.raises(LeaseLost, match="host-b"):
        primary.renew()


def test_a_lease_that_settled_long_is_renewed_at_once(state: Path) -> None:
    """The lease counts from before the settle delay: with a short duration,
    the first renewal must come sooner than a third of it after acquire, or
    the guard fences a holder that nothing failed (lease_seconds 5 and the
    2 s settle did, at its first renewal)."""
    held = acquire(state, 3.0, settle=1.2)
    lost: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_renewed, held, lambda: lost.append(time.monotonic()))
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not lost and held.valid_for() > 0


# -- what a holder believes against what a contender sees ------------------------


def test_a_suspend_longer_than_the_lease_lapses_it(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validity is measured on CLOCK_BOOTTIME, which counts a suspend (the
    monotonic clock stands still through one): a holder that wakes after
    it may not write, nor renew."""
    held = take(state, duration=30)
    assert held.valid_for() > 20
    real = time.clock_gettime
    monkeypatch.setattr(time, "clock_gettime", lambda clock: real(clock) + (
        60.0 if clock == time.CLOCK_BOOTTIME else 0.0))  # a minute suspended
    assert held.valid_for() == 0
    with pytest.raises(SwapfsError) as refused:
        held.guard()
    assert refused.value.errno == errno.EROFS
    with pytest.raises(LeaseLost):
        held.renew()


def test_the_guard_reads_the_clock_at_each_write(state: Path) -> None:
    """No flag a renewal sets later: the guard refuses as soon as the lease lapses."""
    held = take(state)
    held.guard()
    time.sleep(held.valid_for() + 0.01)
    with pytest.raises(SwapfsError) as refused:
        held.guard(errno.EIO)
    assert refused.value.errno == errno.EIO


def _believed_until(held: lease_mod.Lease) -> float:
    """The wall-clock time until which *held* believes it may write."""
    return time.time() + held.valid_for()


def _granted_until(state: Path) -> float:
    """The wall-clock time from which a contender with no skew margin may
    take the lease, by the record it reads now."""
    info = read_lease(state)
    assert info is not None and not info.free
    return info.renewed + info.duration


@pytest.mark.parametrize("write_delay", [0.0, 0.2])
@pytest.mark.parametrize("settle", [0.2, 0.6])
def test_a_holder_never_believes_longer_than_a_contender_grants(
        state: Path, monkeypatch: pytest.MonkeyPatch, settle: float, write_delay: float) -> None:
    """With a settle delay and slow renewal writes (each renewal's write of
    the lease file takes *write_delay* seconds before it lands), the time until which
    the holder believes it may write is never later than the time from
    which a contender, even one that grants no skew margin, may take it."""
    original = lease_mod._write_lease

    def slow(*args: Any) -> None:
        time.sleep(write_delay)
        original(*args)

    held = acquire(state, 1.0, settle=settle, skew_margin=MARGIN)
    assert _believed_until(held) <= _granted_until(state) + 1e-3  # the settle counts
    monkeypatch.setattr(lease_mod, "_write_lease", slow)
    samples = 0
    for _ in range(4):
        assert _believed_until(held) <= _granted_until(state) + 1e-3
        held.renew()
        assert _believed_until(held) <= _granted_until(state) + 1e-3
        samples += 2
    assert samples == 8 and held.valid_for() > 0


def test_a_renewal_slower_than_the_lease_never_replaces_the_next_holders(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renewal's write hangs past the holder's lease (storage stalls, a
    partition); a contender takes the lease meanwhile. When the write gets
    going again, the renewal rechecks before its rename: the new holder's
    record stays, and the old holder has lost."""
    held = take(state)
    original = lease_mod._write_lease
    contender_won = threading.Event()

    def stalled(state_: Path, info: LeaseInfo, *rest: Any) -> None:
        if info.holder == held.holder:
            assert contender_won.wait(30)
        original(state_, info, *rest)

    monkeypatch.setattr(lease_mod, "_write_lease", stalled)
    outcome: list[BaseException] = []

    def renew() -> None:
        try:
            held.renew()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    renewal = threading.Thread(target=renew)
    renewal.start()
    try:
        second = take(state, timeout=10)
    finally:
        contender_won.set()
        renewal.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], LeaseLost), outcome
    info = read_lease(state)
    assert info is not None and (info.holder, info.generation) == (second.holder, 2)
    second.renew()  # the new holder never noticed


def test_a_record_of_a_lower_generation_is_a_late_write(state: Path) -> None:
    """An earlier holder's write that lands late (a rename retried after a
    partition heals) puts a lower generation back: the holder stamps over
    it and keeps its lease."""
    first = take(state)
    first.release()
    second = take(state)
    assert second.generation == 2
    lease_mod._write_lease(state, LeaseInfo(
        holder=first.holder, host=first.host, pid=os.getpid(), generation=1,
        renewed=time.time(), duration=DURATION))
    second.renew()
    info = read_lease(state)
    assert info is not None and (info.holder, info.generation) == (second.holder, 2)
    assert second.valid_for() > 0


def test_a_renewal_flushes_before_it_stamps(state: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What was written under the old stamp reaches storage before the lease
    is extended; a flush that fails extends nothing. By default the flush
    is a syncfs of the state's file system."""
    held = take(state)
    flushed: list[Path] = []
    monkeypatch.setattr(lease_mod, "sync_file_system", flushed.append)
    held.renew()
    assert flushed == [state]
    steps: list[str] = []
    original = lease_mod._write_lease

    def recording(*args: Any) -> None:
        steps.append("stamp")
        original(*args)

    monkeypatch.setattr(lease_mod, "_write_lease", recording)
    held.flush = lambda: steps.append("flush")
    held.renew()
    assert steps == ["flush", "stamp"]

    def failing() -> None:
        raise OSError(errno.EIO, "write error")

    before = read_lease(state)
    held.flush = failing
    with pytest.raises(LeaseError, match="flush"):
        held.renew()
    assert read_lease(state) == before and steps == ["flush", "stamp"]


def test_keep_renewed_never_abandons_a_hung_renewal(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal that hangs past the guard: on_lost is called in time, and
    when the hung write gets going again it does not replace the lease file
    (a late rename would fence whoever took the lease over meanwhile)."""
    held = take(state, duration=1.0)
    stamp = read_lease(state)
    original = lease_mod._write_lease
    release, finished = threading.Event(), threading.Event()

    def hung(*args: Any) -> None:
        try:
            assert release.wait(30)
            original(*args)
        finally:
            finished.set()

    monkeypatch.setattr(lease_mod, "_write_lease", hung)
    lost: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_renewed, held, lambda: lost.append(held.valid_for()))
            with trio.fail_after(10):
                while not lost:
                    await trio.sleep(0.01)
            release.set()  # the storage answers again, after the lease was given up

    trio.run(main)
    assert finished.wait(10)
    assert lost == [0.0]
    assert read_lease(state) == stamp  # the hung renewal never renamed


def test_a_renewer_thread_keeps_the_lease_while_the_state_opens(state: Path) -> None:
    held = take(state)
    first = read_lease(state)
    renewals: list[float] = []
    with lease_mod.Renewer(held, lambda: renewals.append(time.monotonic())):
        time.sleep(3 * DURATION)
        assert held.valid_for() > 0
    assert len(renewals) >= 3
    after = read_lease(state)
    assert after is not None and first is not None
    assert after.generation == 1 and after.renewed > first.renewed


# -- offline commands --------------------------------------------------------------


def test_an_offline_command_takes_the_lease_and_gives_it_back(state: Path) -> None:
    lease_mod.Offline(state).claim()  # no lease file: a single host's state
    assert read_lease(state) is None
    holder = acquire(state, 30.0, **FAST)
    with pytest.raises(LeaseHeld), lease_mod.Offline(state) as offline:
        offline.claim()
    holder.release()
    with lease_mod.Offline(state) as offline:
        offline.claim()
        assert offline.lease is not None and offline.lease.generation == 2
        offline.guard()
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 2


def test_fsck_refuses_a_state_whose_lease_is_live_and_takes_a_free_one(state: Path) -> None:
    Volume(state).close()
    holder = acquire(state, 60.0, host="other-host", **FAST)
    refused = swapfs("fsck", "--state", str(state))
    assert refused.returncode == 8, refused
    assert "lease held" in refused.stderr and "other-host" in refused.stderr
    assert read_lease(state).holder == holder.holder  # type: ignore[union-attr]
    holder.release()
    checked = swapfs("fsck", "--state", str(state))
    assert checked.returncode == 0, checked
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 2  # taken, then released


# -- a state that opens slowly ---------------------------------------------------------


def two_chains(state: Path) -> Path:
    """A state of two chains of a block each: two slot tables to load."""
    volume = Volume(state)
    for name in (b"a", b"b"):
        chain = volume.mkdir(ROOT_INO, name, 0o755, 0, 0)
        file = volume.create(chain.ino, b"f", 0o100600, 0, 0)
        volume.write(file.ino, 0, os.urandom(4096))
    volume.close()
    return state


def test_the_lease_is_renewed_while_a_slow_state_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a state without a daemon scans every chain's slot table (about
    0.2 s per GiB stored): the lease must not lapse meanwhile. Each scan here
    takes longer than the whole lease lasts."""
    state = two_chains(tmp_path / "state")
    seconds = 4.0  # the daemon's least lease_seconds
    scan = State._scan
    scanned: list[int] = []

    def slow_scan(self: Any, table: SlotTable, *args: Any, **kwargs: Any) -> None:
        time.sleep(seconds)
        scanned.append(table.chain_id)
        scan(self, table, *args, **kwargs)

    monkeypatch.setattr(State, "_scan", slow_scan)
    link = Link(str(tmp_path / "m"), None, None, None)
    try:
        volume = Volume(state, claim=lambda: link.claim_lease(state, seconds))
    finally:
        link.opened()
    try:
        assert len(scanned) == 2, "each chain's scan outlasted a lease"
        assert link.lease is not None and link.lease.valid_for() > 0
        volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)  # and it may write
    finally:
        volume.close()
        link.lease.release()  # type: ignore[union-attr]


def take_by_force(state: Path) -> bytes:
    """Break the live lease on *state* and take it as another host; the
    holder id. A renewal of the holder's already in flight may land right
    after the break and make the lease live again: then break it again."""
    for _ in range(20):
        break_lease(state, force=True)
        try:
            # A settle long enough for a renewal in flight to land first.
            return acquire(state, 60.0, host="other-host", settle=1.0,
                           skew_margin=MARGIN).holder
        except LeaseHeld:
            continue
    raise AssertionError("the holder's renewals kept the lease through 20 breaks")


def test_a_lease_lost_while_the_state_opens_leaves_it_unwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host breaks the lease and takes the state while this one
    still scans its slot tables: what opened writes nothing from then on,
    and the daemon sees the lease lost before it serves (mountd/daemon.py)."""
    state = two_chains(tmp_path / "state")
    seconds = 4.0  # the daemon's least lease_seconds
    scan = State._scan
    taken: list[Any] = []  # the other host's holder id, then the state as it took it

    def contended_scan(self: Any, table: SlotTable, *args: Any, **kwargs: Any) -> None:
        if not taken:
            taken.append(take_by_force(state))
            taken.append(snapshot(state))
            # This host's next renewal, in its Renewer thread, finds it lost.
            assert wait_until(lambda: link.lease is not None and link.lease.valid_for() == 0,
                              timeout=30)
        scan(self, table, *args, **kwargs)

    monkeypatch.setattr(State, "_scan", contended_scan)
    link = Link(str(tmp_path / "m"), None, None, None)
    try:
        volume = Volume(state, claim=lambda: link.claim_lease(state, seconds),
                        guard=link.guard)
    finally:
        link.opened()
    try:
        assert link.lease is not None and link.lease.valid_for() == 0
        with pytest.raises(SwapfsError) as refused:
            volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        assert refused.value.errno == errno.EROFS
        assert "other-host" in str(refused.value)  # a renewal found it taken
    finally:
        volume.close()
        link.lease.release()  # type: ignore[union-attr]
    assert snapshot(state) == taken[1]  # not a byte the state stores written since
    info = read_lease(state)
    assert info is not None and info.holder == taken[0] and info.generation == 2


def test_the_opening_reports_each_slow_step(tmp_path: Path) -> None:
    """An orphan purged is a step the daemon reports as progress of its
    start (swapfs/cli/spawn.py), so a standby waits for it."""
    state = tmp_path / "state"
    volume = Volume(state)
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
    for name in (b"a", b"b", b"c"):
        file = volume.create(chain.ino, name, 0o100600, 0, 0)
        volume.write(file.ino, 0, name * 4096)
        volume.unlink(chain.ino, name, still_open=True)
    volume.close()
    steps: list[int] = []
    Volume(state, progress=lambda: steps.append(1)).close()
    assert len(steps) == 3


def test_rekey_refuses_a_state_whose_lease_is_live(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old, new = keys.generate(tmp_path / "old.key"), keys.generate(
        tmp_path / "new.key")
    Volume(state, master=old).close()
    holder = acquire(state, 60.0, host="other-host", **FAST)
    refused = swapfs("rekey", "--state", str(state), "--key-file", old.source,
                     "--new-key-file", new.source)
    assert refused.returncode == 1, refused
    assert "lease held" in refused.stderr and "other-host" in refused.stderr
    holder.release()
    done = swapfs("rekey", "--state", str(state), "--key-file", old.source,
                  "--new-key-file", new.source)
    assert done.returncode == 0, done
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 2  # taken, then released


# -- a lease file that lost its generation -----------------------------------------


def _write_under_new_holder(state: Path, name: bytes) -> lease_mod.Lease:
    """Take the lease, open the state under it, create *name*, close; the
    lease given back."""
    held = take(state, duration=30.0)
    volume = Volume(state, claim=lambda: held.generation, guard=held.guard,
                    restamp=held.restamp_above)
    try:
        volume.mkdir(ROOT_INO, name, 0o755, 0, 0)
    finally:
        volume.close()
        held.release()
    return held


def test_a_broken_corrupt_lease_does_not_brick_the_state(state: Path) -> None:
    """Breaking a corrupt lease removes it, so the next claim is generation 1
    again while the index records 3: the holder re-stamps its lease above
    the index's, and writes (docs/lease.md, "The file")."""
    for generation in (1, 2, 3):
        assert _write_under_new_holder(state, b"g%d" % generation).generation == generation
    assert recorded_generation(state / "index.lmdb") == 3
    (state / "lease").write_bytes(b"not a lease record")
    assert break_lease(state) is None
    assert read_lease(state) is None
    held = _write_under_new_holder(state, b"after")  # claimed as 1, writes as 4
    assert held.generation == 4
    assert recorded_generation(state / "index.lmdb") == 4
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 4


def test_a_re_stamp_refuses_a_lease_another_holder_took(state: Path) -> None:
    """A holder whose lease file names another holder by the time the state
    opens does not re-stamp it: the index's higher generation fences it."""
    held = take(state, duration=30.0)
    break_lease(state, force=True)
    other = take(state, duration=30.0, host="other-host")
    with pytest.raises(LeaseLost):
        held.restamp_above(other.generation)
    info = read_lease(state)
    assert info is not None and (info.holder, info.generation) == (other.holder, 2)
    other.release()


def test_an_offline_command_takes_the_lease_the_index_records(state: Path) -> None:
    """With its lease file removed, a state whose index records a lease
    generation is still a shared one: fsck takes the lease (above that
    generation) and gives it back, rather than run with no lease."""
    for generation in (1, 2, 3):
        _write_under_new_holder(state, b"g%d" % generation)
    (state / "lease").unlink()
    checked = swapfs("fsck", "--state", str(state))
    assert checked.returncode == 0, checked
    info = read_lease(state)
    assert info is not None and info.free and info.generation == 4
    assert lease_mod.Offline(state, lambda: 0).claim() is not None  # the file is back
    single = state.parent / "single"
    single.mkdir()
    assert lease_mod.Offline(single, lambda: 0).claim() is None  # never shared
    assert not (single / "lease").exists()


# -- reclaiming a lease this host's dead daemon left --------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("expires_in, settles", [(10.0, False), (2.5, True)])
def test_a_local_reclaim_near_the_lapse_is_a_full_claim(
        state: Path, monkeypatch: pytest.MonkeyPatch, expires_in: float, settles: bool) -> None:
    """A dead local holder's lease is reclaimed without the settle delay
    only while it is clearly live (more than settle + 2 * skew margin, here
    3 s, before it may be taken); nearer its lapse, another host's standby
    may be claiming it already, so the reclaim settles and reads back."""
    settle, margin, duration = 1.0, 1.0, 30.0
    lease_mod._write_lease(state, LeaseInfo(
        holder=new_holder(), host=socket.gethostname(), pid=_dead_pid(), generation=5,
        renewed=time.time() - duration - margin + expires_in, duration=duration))
    sleeps: list[float] = []
    monkeypatch.setattr(lease_mod.time, "sleep", sleeps.append)
    held = acquire(state, duration, settle=settle, skew_margin=margin, reclaim_local=True)
    assert held.generation == 6
    assert [pause for pause in sleeps if pause] == ([settle] if settles else [])


# -- the guard at commit -----------------------------------------------------------


def test_a_write_transaction_is_guarded_again_at_its_commit(tmp_path: Path) -> None:
    """The guard is read at the start of a write transaction and again
    right before its commit: a lease that lapsed meanwhile aborts it."""
    allowed = [True]

    def guard() -> None:
        if not allowed[0]:
            raise SwapfsError(errno.EROFS, "the lease has lapsed")

    index = Index(tmp_path / "index", guard)
    try:
        txn = index.begin(write=True)
        txn.put_meta(b"probe", 7)
        allowed[0] = False
        with pytest.raises(SwapfsError) as refused:
            txn.commit()
        assert refused.value.errno == errno.EROFS
        with pytest.raises(SwapfsError):
            index.grow()  # allocates nothing for a holder that may not write
        allowed[0] = True
        with index.begin() as reader:
            assert reader.get_meta(b"probe") is None
    finally:
        index.close()



def test_a_state_does_not_open_under_a_lapsed_lease(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease that lapsed while it was claimed refuses the opening before
    it finishes a reseal that a crash interrupted (renames in the state)."""
    state = tmp_path / "state"
    Volume(state).close()
    finished: list[Path] = []
    monkeypatch.setattr(reseal, "finish", finished.append)

    def lapsed() -> None:
        raise SwapfsError(errno.EROFS, "the lease has lapsed")

    with pytest.raises(SwapfsError) as refused:
        Volume(state, claim=lambda: 1, guard=lapsed)
    assert refused.value.errno == errno.EROFS
    assert finished == []
    Volume(state).close()  # nothing left open

# -- a daemon's start ------------------------------------------------------------


def test_lease_renewals_are_no_progress_of_a_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standby gives a start up once it shows no progress for
    START_STALL: renewals of the lease while the state opens keep the lease,
    and must not keep a start hung elsewhere alive. Here the opening hangs
    (past two renewals) without a step of its own: no progress reported."""
    state = tmp_path / "state"
    Volume(state).close()
    config = Config(state=state, mountpoint=str(tmp_path / "m"), lease_seconds=4.0)
    renewed: list[float] = []

    def hung_open(path: Path, *, claim: Any, progress: Any, **kwargs: Any) -> Any:
        claim()
        first = read_lease(path)
        assert first is not None
        for _ in range(2):  # two renewals by the Renewer thread
            assert wait_until(lambda: read_lease(path).renewed  # type: ignore[union-attr]
                              > (renewed[-1] if renewed else first.renewed), timeout=30)
            renewed.append(read_lease(path).renewed)  # type: ignore[union-attr]
        return "volume"

    monkeypatch.setattr(daemon, "Volume", hung_open)
    link = Link(str(tmp_path / "m"), None, None, None)
    steps: list[int] = []
    try:
        assert daemon._open_volume(config, link, None, lambda: steps.append(1)) == "volume"
    finally:
        if link.lease is not None:
            link.lease.release()
    assert len(renewed) == 2 and steps == []
