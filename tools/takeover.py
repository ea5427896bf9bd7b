#!/usr/bin/env python3
"""Kill a swapfs daemon under load and time how long its standby takes over.

A takeover is timed twice:

- from the outside, by a **probe**: a process of its own (this file run as
  a script) that holds a file on the mount open with ``O_DIRECT`` and reads
  one block of it when told to. The killer tells it right after the daemon
  is dead; the read waits in the kernel until a new daemon answers it, so
  "kill -> probe answered" is what a program using the mount sees.
- from the inside, by the new daemon: ``last_takeover.seconds`` in its
  status, from the moment the standby noticed the death to serving.

The probe is a separate process so that a read which never comes back
hangs it and not the caller, who kills it (by its pid) after a timeout.
The caller must never hold the mount's FUSE descriptor itself.

Used by the takeover swap tests and the demo::

    with Probe(mnt / "web" / "probe") as probe:
        killer = Killer(socket_path, daemon_pid, probe, {"build": 3, "verify": 6})
        killer.start()
        run_workload(..., on_phase=killer.enter_phase)
        killer.finish()
"""

import argparse
import mmap
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swapfs.control import protocol  # noqa: E402

BLOCK = 4096


class TakeoverError(Exception):
    """A kill that no daemon took over, or a probe that did not answer."""


class Probe:
    """A process that reads one block of *path* with O_DIRECT on request."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Probe":
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--probe", self.path], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self._expect("ready", 60.0)
        return self

    def read(self, timeout: float = 60.0) -> float:
        """Have the probe read its block; seconds until it answered."""
        assert self._process is not None and self._process.stdin is not None
        start = time.monotonic()
        self._process.stdin.write("read\n")
        self._process.stdin.flush()
        self._expect("ok", timeout)
        return time.monotonic() - start

    def _expect(self, word: str, timeout: float) -> None:
        assert self._process is not None and self._process.stdout is not None
        readable, _, _ = select.select([self._process.stdout], [], [], timeout)
        line = self._process.stdout.readline().strip() if readable else "(no answer)"
        if line != word:
            raise TakeoverError(f"the probe of {self.path}: {line or 'exited'}")

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.close()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()  # a read stuck on a dead mount: SIGKILL ends it
            process.wait()


def _probe(path: str) -> int:
    """The probe process: one O_DIRECT read of the first block per request."""
    with open(path, "rb") as plain:
        expected = plain.read(BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, BLOCK)  # O_DIRECT wants a page-aligned buffer
    print("ready", flush=True)
    for _request in sys.stdin:
        try:
            count = os.preadv(fd, [buffer], 0)
        except OSError as exc:
            print(f"error {exc}", flush=True)
            continue
        print("ok" if count == BLOCK and buffer[:] == expected else "wrong bytes", flush=True)
    return 0


@dataclass
class Takeover:
    """One kill and what it cost."""

    number: int  # the new daemon's last_takeover.number
    phase: str  # what the workload was doing ("" before it said)
    probe_seconds: float  # kill -> the probe's read answered
    daemon_seconds: float | None  # the daemon's own: death noticed -> serving
    waiting: int | None  # requests outstanding at the takeover (None: no fusectl)
    resent: bool
    pid: int  # the new daemon


def alive(pid: int) -> bool:
    """Is any thread of process *pid* still running (not a zombie)?

    Every thread counts: the main thread of a killed daemon can be a zombie
    while its other threads (trio's worker threads) are still exiting, and
    until the last one has, the process keeps its files open, the state
    directory's lock among them.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] not in ("Z", "X"):
            return True
    return False


def status(socket_path: str) -> dict[str, Any]:
    return protocol.request(socket_path, {"op": "status"}, timeout=5)


def kill_daemon(socket_path: str, pid: int, probe: Probe, phase: str = "",
                timeout: float = 60.0) -> Takeover:
    """SIGKILL daemon *pid* (nothing else), time the probe, wait for its successor."""
    pidfd = os.pidfd_open(pid)
    try:
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        readable, _, _ = select.select([pidfd], [], [], 10.0)
        if not readable:
            raise TakeoverError(f"daemon {pid} survived SIGKILL")
    finally:
        os.close(pidfd)
    # Started only once the daemon is gone, so the dead one cannot answer it.
    probe.read(timeout)
    probe_seconds = time.monotonic() - start
    deadline = time.monotonic() + timeout
    while True:
        try:
            latest = status(socket_path)
            if latest["pid"] != pid:
                break
        except protocol.ControlError:
            pass
        if time.monotonic() > deadline:
            raise TakeoverError(f"no daemon took over from {pid}")
        time.sleep(0.01)
    last = latest["last_takeover"]
    return Takeover(last["number"], phase, probe_seconds, last.get("seconds"),
                    last.get("waiting"), bool(last.get("resent")), int(latest["pid"]))


class Killer:
    """Kills the daemon every *gap* seconds, from a thread of its own, once
    *ready* says so, while the workload is in a phase named in *kills*
    (``enter_phase``) and fewer than ``kills[phase]`` kills were made so far:
    ``{"build": 3, "verify": 6}`` kills up to three times while the workers
    swap out and the rest of six while they swap in.

    It records every takeover in ``takeovers`` and stops at the first
    failure, which :meth:`finish` raises.
    """

    def __init__(self, socket_path: str, pid: int, probe: Probe, kills: dict[str, int],
                 gap: float = 1.0, ready: Callable[[], bool] = lambda: True) -> None:
        self.socket_path = socket_path
        self.pid = pid
        self.probe = probe
        self.kills = kills
        self.gap = gap
        self.ready = ready
        self.phase = ""
        self.takeovers: list[Takeover] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="takeover killer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enter_phase(self, name: str) -> None:
        self.phase = name

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.05):
                if self.ready():
                    break
            while not self._stop.is_set():
                phase = self.phase
                if len(self.takeovers) >= self.kills.get(phase, 0):
                    self._stop.wait(0.05)
                    continue
                kill = kill_daemon(self.socket_path, self.pid, self.probe, phase)
                self.takeovers.append(kill)
                self.pid = kill.pid
                self._stop.wait(self.gap)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[Takeover]:
        """Stop killing; the takeovers so far. Raises what stopped the thread."""
        self._stop.set()
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            raise TakeoverError("the killer is stuck in a takeover")
        if self.error is not None:
            raise TakeoverError(f"a kill failed: {self.error}") from self.error
        return self.takeovers


def summary(takeovers: list[Takeover]) -> str:
    """Median and worst of both timings, in milliseconds."""
    probe = [kill.probe_seconds * 1000 for kill in takeovers]
    daemon = [kill.daemon_seconds * 1000 for kill in takeovers
              if kill.daemon_seconds is not None]
    text = (f"{len(takeovers)} kills; kill -> probe answered: median "
            f"{statistics.median(probe):.0f} ms, worst {max(probe):.0f} ms")
    if daemon:
        text += (f"; daemon-reported (death noticed -> serving): median "
                 f"{statistics.median(daemon):.0f} ms, worst {max(daemon):.0f} ms")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description="the probe of a takeover timing")
    parser.add_argument("--probe", required=True, help="a file on the mount")
    return _probe(parser.parse_args().probe)


if __name__ == "__main__":
    sys.exit(main())
