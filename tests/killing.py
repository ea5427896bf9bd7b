"""Crash tests' common part: a child process that dies by SIGKILL at the Nth
call of one function, so that a test can look at what a crash at exactly
that point left on disk."""

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Prepended to the child's script: replaces ``OWNER.NAME`` (an attribute of
#: an imported module or class, named by the first two arguments after the
#: script's own) by a wrapper that kills the process on call number NTH.
_DIE_AT_CALL = """
import os, signal, sys
def _die_at_call(owner, name, nth):
    real = getattr(owner, name)
    calls = 0
    def dying(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, name, dying)
"""


def run_until_killed(script: str, *args: str) -> None:
    """Run *script* (which calls ``_die_at_call`` itself) in a child with
    *args* as its ``sys.argv[1:]``, and check that it died by SIGKILL."""
    child = subprocess.run([sys.executable, "-c", _DIE_AT_CALL + script, *args],
                           cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
