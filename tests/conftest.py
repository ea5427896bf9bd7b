"""Shared fixtures.

Engine fixtures (no FUSE): ``state_dir`` is a fresh state directory and
``volume`` a :class:`~swapfs.volume.Volume` open on it, closed after the test.
Tests that close and reopen a volume take ``state_dir`` and open their own.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from swapfs.volume import Volume
from tests.mounting import Mount, mounted


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory that does not exist yet (Volume creates it)."""
    return tmp_path / "state"


@pytest.fixture
def volume(state_dir: Path) -> Iterator[Volume]:
    vol = Volume(state_dir)
    yield vol
    vol.close()


@pytest.fixture
def mount() -> Iterator[Mount]:
    """A real swapfs mount on short temporary paths (root and /dev/fuse needed).

    Always unmounted (or killed) and removed afterwards; after a passing test
    the daemon must still be alive and the offline fsck of its state clean.
    """
    with mounted() as mnt:
        yield mnt
