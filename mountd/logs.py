"""Logging set-up: plain lines on stderr, or syslog priorities under systemd.

When systemd runs the daemon, stderr goes to the journal, which reads a
``<N>`` prefix on each line as the syslog priority (sd-daemon(3)). systemd
tells us so by setting $JOURNAL_STREAM to the device and inode of that
stream.
"""

import logging
import os
import sys

_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class SyslogPrefixFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority; the journal adds the time."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}"
                         for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd set up for us."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not inode:
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{info.st_dev}:{info.st_ino}" == f"{device}:{inode}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(SyslogPrefixFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
