"""The clean mark: a flipped bit in LMDB's meta pages of a closed index is
refused (EIO, and fsck says so), never an older tree opened in silence."""

import errno
import os
import signal
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import CorruptIndex, SwapfsError
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume

TXNID = 144  # of LMDB's MDB_meta within its page: after the header and the databases


def make(state: Path) -> bytes:
    data = os.urandom(4 * BLOCK_SIZE)
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0)
        vol.write(file.ino, 0, os.urandom(4 * BLOCK_SIZE))
        vol.write(file.ino, 0, data)  # the older tree maps other bytes
    return data


def older_meta(state: Path) -> int:
    """The offset of the transaction id of the meta page LMDB does not use."""
    with open(state / "index.lmdb" / "data.mdb", "rb") as index:
        ids = []
        for page in (0, 1):
            index.seek(page * 4096 + TXNID)
            ids.append(int.from_bytes(index.read(8), "little"))
    assert abs(ids[0] - ids[1]) == 1
    return (0 if ids[0] < ids[1] else 4096) + TXNID


def test_a_clean_index_opens_and_its_mark_goes_while_open(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = make(state)
    mark = state / "index.lmdb" / "clean"
    assert mark.exists()
    with closing(Volume(state)) as vol:
        assert not mark.exists(), "a crash from here on leaves no mark"
        assert vol.read(vol.resolve("c/f").ino, 0, len(data)) == data
    assert mark.exists()


def test_a_flip_that_would_open_the_older_tree_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = make(state)
    at = older_meta(state)
    with open(state / "index.lmdb" / "data.mdb", "r+b") as index:
        index.seek(at)
        txnid = int.from_bytes(index.read(8), "little")
        index.seek(at)
        index.write((txnid + 2).to_bytes(8, "little"))  # bit 1: now the newer one
    with pytest.raises(CorruptIndex) as refused:
        Volume(state)
    assert refused.value.errno == errno.EIO
    report = fsck.check(state)
    assert [problem.kind for problem in report.problems] == ["corrupt-index"]
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    (state / "index.lmdb" / "clean").unlink()  # what the message says to do, knowingly
    with closing(Volume(state)) as vol:  # LMDB now opens the older tree: what the mark
        try:                             # kept out, the first write's blocks, or EIO
            assert vol.read(vol.resolve("c/f").ino, 0, len(data)) != data
        except SwapfsError as exc:
            assert exc.errno == errno.EIO


def test_an_index_left_by_a_killed_process_opens_without_a_mark(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = make(state)
    child = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
         "from swapfs.engine.volume import Volume; v = Volume(Path(sys.argv[1])); "
         "v.write(v.resolve('c/f').ino, 0, b'x' * 4096); "
         "os.kill(os.getpid(), signal.SIGKILL)", str(state)],
        cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == -signal.SIGKILL
    assert not (state / "index.lmdb" / "clean").exists()
    with closing(Volume(state)) as vol:
        assert vol.read(vol.resolve("c/f").ino, 0, len(data)) == b"x" * 4096 + data[4096:]
    assert fsck.check(state).clean
