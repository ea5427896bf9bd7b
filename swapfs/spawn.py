"""Starting a swapfs process in the background and waiting until it is ready.

The daemon and the standby take ``--ready-fd N`` and write one byte to it
once they serve (or watch); the command line and the standby start them
in a session of their own, logging to a file, and return only then. A
process that does not get ready within the timeout is killed and its
log's last lines make the error.
"""

import os
import select
import subprocess
from pathlib import Path


class NotReady(Exception):
    """The process exited or timed out before it said it was ready."""


def start_ready(command: list[str], log_path: Path, timeout: float,
                pass_fds: tuple[int, ...] = ()) -> int:
    """Run *command* ``--ready-fd N`` with output to *log_path*; its pid once ready."""
    read_end, write_end = os.pipe()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [*command, "--ready-fd", str(write_end)], pass_fds=(*pass_fds, write_end),
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )
    os.close(write_end)
    try:
        readable, _, _ = select.select([read_end], [], [], timeout)
        ready = bool(readable) and os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
    if not ready:
        if process.poll() is None:
            process.kill()
        process.wait()
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        raise NotReady(f"exit {process.returncode}; {log_path}:\n  " + "\n  ".join(tail))
    return process.pid
