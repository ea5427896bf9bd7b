"""Starting a swapfs process in the background and waiting until it is ready.

The daemon and the standby take ``--ready-fd N`` and write ``1`` to it
once they serve (or watch); before that, the daemon writes a ``.`` at each
step of its start that took a while (a chain's slot table verified, its
lease renewed while a large state opens). The command line and the standby
start them in a session of their own, logging to a file, and return only
once ready. A process that shows no sign of progress for the timeout is
killed (a slow start that progresses is waited for: opening a state takes
time in proportion to what it stores); the last error it logged (not an
earlier process's: the log is appended to) is the cause that the error
names.
"""

import os
import select
import subprocess
from pathlib import Path

#: What a starting process writes to its ready descriptor: once serving,
#: and at each step of progress before that.
READY, PROGRESS = b"1", b"."


class NotReady(Exception):
    """The process exited or timed out before it said it was ready.

    Its message is one line; ``lines`` holds what the process logged.
    """

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


def _cause(lines: list[str]) -> str | None:
    """The message of the last ERROR or CRITICAL line of a log, else its
    last line (an error printed before logging was set up), if any."""
    for line in reversed(lines):
        for level in (" CRITICAL: ", " ERROR: "):
            if level in line:
                return line.split(level, 1)[1].strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


class Starting:
    """A process started with ``--ready-fd``, not yet known to be ready."""

    def __init__(self, process: subprocess.Popen[bytes], ready_fd: int, log_path: Path,
                 log_start: int = 0) -> None:
        self.process = process
        self.ready_fd = ready_fd
        self.log_path = log_path
        self.log_start = log_start  # where this process's lines begin

    def wait_ready(self, timeout: float) -> int:
        """The pid once the process says it is ready; NotReady (and the process
        killed) if it exits first, or if *timeout* seconds pass with no sign
        of progress from it (each ``.`` it writes starts the wait again)."""
        ready = False
        try:
            while True:
                readable, _, _ = select.select([self.ready_fd], [], [], timeout)
                sign = os.read(self.ready_fd, 1) if readable else b""
                if sign != PROGRESS:
                    ready = sign == READY
                    break
        finally:
            os.close(self.ready_fd)
        if not ready:
            self.stop()
            with open(self.log_path, "rb") as log:
                log.seek(self.log_start)
                lines = log.read().decode(errors="replace").splitlines()
            cause = _cause(lines) or (f"exit {self.process.returncode}"
                                      if self.process.returncode else "no sign of life")
            raise NotReady(f"{cause} (see {self.log_path})", lines)
        return self.process.pid

    def stop(self) -> None:
        """Kill it (if it still runs) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start(command: list[str], log_path: Path, pass_fds: tuple[int, ...] = ()) -> Starting:
    """Run *command* ``--ready-fd N`` in a session of its own, output to *log_path*."""
    read_end, write_end = os.pipe()
    # The log is the state directory's: its owner's alone (swapfs/engine/statedir.py).
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "ab") as log_file:
        log_start = log_file.seek(0, os.SEEK_END)
        process = subprocess.Popen(
            [*command, "--ready-fd", str(write_end)], pass_fds=(*pass_fds, write_end),
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )
    os.close(write_end)
    return Starting(process, read_end, log_path, log_start)


def start_ready(command: list[str], log_path: Path, timeout: float,
                pass_fds: tuple[int, ...] = ()) -> int:
    """:func:`start`, then wait until it is ready; its pid."""
    return start(command, log_path, pass_fds).wait_ready(timeout)
