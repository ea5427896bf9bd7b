"""Shared fixtures.

Engine fixtures (no FUSE): ``state_dir`` is a fresh state directory and
``volume`` a :class:`~swapfs.engine.volume.Volume` open on it, closed after the
test, once unencrypted and once encrypted with ``master_key``. Tests that
close and reopen a volume take ``state_dir`` and open their own.

Every daemon and check a test starts finds a master key the way systemd's
``LoadCredentialEncrypted=`` hands one over (``$CREDENTIALS_DIRECTORY``), so
mounts are encrypted, as new states are by default.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapfs.engine import Volume, keys
from tests import mounting
from tests.mounting import Mount, mounted


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Let the shared helpers see which test runs (mounting.needs_marker)."""
    mounting.running = item


def pytest_runtest_teardown(item: pytest.Item) -> None:
    mounting.running = None


def pytest_sessionfinish(session: pytest.Session) -> None:
    mounting.remove_scratch()


@pytest.fixture(autouse=True, scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's credentials directory, holding its master key."""
    directory = tmp_path_factory.mktemp("credentials")
    directory.chmod(0o700)
    keys.generate(directory / keys.CREDENTIAL)
    before = os.environ.get("CREDENTIALS_DIRECTORY")
    os.environ["CREDENTIALS_DIRECTORY"] = str(directory)
    yield directory
    if before is None:
        del os.environ["CREDENTIALS_DIRECTORY"]
    else:
        os.environ["CREDENTIALS_DIRECTORY"] = before


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory that does not exist yet (Volume creates it)."""
    return tmp_path / "state"


@pytest.fixture
def master_key(tmp_path: Path) -> keys.MasterKey:
    """A fresh master key, in a key file of its own (``master_key.source``)."""
    return keys.generate(tmp_path / "master.key")


@pytest.fixture(params=["plain", "encrypted"])
def volume(request: pytest.FixtureRequest, state_dir: Path,
           master_key: keys.MasterKey) -> Iterator[Volume]:
    vol = Volume(state_dir, master=master_key if request.param == "encrypted" else None)
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
