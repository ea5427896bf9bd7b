"""Tests in QEMU guests (tools/guest.py): each module is marked ``slow``
and skipped only where a prerequisite of the guests is missing."""

import os

import pytest

from tools.guest import missing


def guest_marks(*lacking: str) -> list[pytest.MarkDecorator]:
    """``slow``, and a skip naming what a guest lacks here: root, what
    tools/setup.sh installs, and *lacking* (the module's own needs, found
    missing by the caller)."""
    lacks = ["root"] if os.geteuid() != 0 else [*missing(), *lacking]
    return [pytest.mark.slow,
            pytest.mark.skipif(bool(lacks), reason=f"a QEMU guest needs: {'; '.join(lacks)}")]
