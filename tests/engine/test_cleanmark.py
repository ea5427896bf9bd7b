"""The clean mark: a flipped bit in LMDB's meta pages of a closed index is
refused (EIO, and fsck says so), never an older tree opened in silence."""

import errno
import os
import signal
import stat
import subprocess
import sys
import zlib
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
        vol.sync()  # its own LMDB commit, not in one batch with the next write
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


def flip(path: Path, offset: int, value: int | None = None) -> None:
    """Flip bit 0 of the byte at *offset* (or set it to *value*)."""
    with open(path, "r+b") as target:
        target.seek(offset)
        byte = target.read(1)[0]
        target.seek(offset)
        target.write(bytes([byte ^ 0x01 if value is None else value]))


def repair(state: Path) -> subprocess.CompletedProcess[str]:
    """``swapfs fsck --repair``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "swapfs.cli", "fsck", "--repair", "--state", str(state)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("where", ["newer-txnid", "byte-19", "root-page"])
def test_a_flip_in_the_meta_pages_is_undone_by_a_repair(tmp_path: Path, where: str) -> None:
    """Once a flip here could only be refused: the state stayed unmountable
    and fsck --repair exited 4 for good. The mark keeps both pages whole,
    so the repair writes them back and the state is as it was closed."""
    state = tmp_path / "state"
    data = make(state)
    index = state / "index.lmdb" / "data.mdb"
    if where == "newer-txnid":
        at = older_meta(state)
        flip(index, at, 0xFF)
    elif where == "byte-19":
        flip(index, 19, 0xB6)  # printf '\xb6' | dd of=data.mdb bs=1 seek=19 conv=notrunc
    else:
        flip(index, 4096 + 16 + 48 + 40)  # a root page number in the second page
    with pytest.raises(CorruptIndex):
        Volume(state)
    repaired = repair(state)
    assert repaired.returncode == fsck.EXIT_REPAIRED, repaired.stdout + repaired.stderr
    assert "meta-pages" in repaired.stdout + repaired.stderr
    with closing(Volume(state)) as vol:
        assert vol.read(vol.resolve("c/f").ino, 0, len(data)) == data
    assert fsck.check(state).clean


def test_a_damaged_mark_is_removed_by_a_repair_and_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = make(state)
    flip(state / "index.lmdb" / "clean", 40)
    with pytest.raises(CorruptIndex) as refused:
        Volume(state)
    assert "fsck --repair removes it" in str(refused.value)
    repaired = repair(state)
    assert repaired.returncode == fsck.EXIT_REPAIRED, repaired.stdout + repaired.stderr
    with closing(Volume(state)) as vol:
        assert vol.read(vol.resolve("c/f").ino, 0, len(data)) == data
    assert fsck.check(state).clean


def test_a_mark_of_the_first_format_is_still_checked(tmp_path: Path) -> None:
    """A state closed by a daemon of the first mark format: its mark (a CRC
    of both pages) still catches a flip, though it cannot undo it."""
    state = tmp_path / "state"
    data = make(state)
    index, mark = state / "index.lmdb" / "data.mdb", state / "index.lmdb" / "clean"
    with open(index, "rb") as pages:
        first = pages.read(152)
        pages.seek(4096)
        crc = zlib.crc32(pages.read(152), zlib.crc32(first))
    mark.write_bytes(b"SWCM" + (4096).to_bytes(4, "little") + crc.to_bytes(4, "little"))
    with closing(Volume(state)) as vol:
        assert vol.read(vol.resolve("c/f").ino, 0, len(data)) == data
    assert len(mark.read_bytes()) > 12, "closed again: a mark of the new format"
    mark.write_bytes(b"SWCM" + (4096).to_bytes(4, "little") + crc.to_bytes(4, "little"))
    flip(index, older_meta(state), 0xFF)
    with pytest.raises(CorruptIndex):
        Volume(state)
    assert repair(state).returncode == fsck.EXIT_UNREPAIRED
