"""An open, and a daemon's start on a live mount, read as much of the index
for 2 GiB stored as for 128 MiB: nothing at open is proportional to the data.

Nothing here is timed: the test counts the index values read
(``Index.values_read``: records, map runs, slot-table runs) while the state
opens as a daemon opens it (its slot tables scanned later, in the
background), and while the first read of a block is answered, which after
a takeover is the first request the new daemon serves.
"""

import shutil
import stat
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume

MIB = 1 << 20
REQUEST = 256  # blocks a write


def build(state: Path, size: int) -> int:
    """A state of *size* bytes of distinct blocks in one file; its inode."""
    template = bytearray(REQUEST * BLOCK_SIZE)
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        ino = vol.create(chain.ino, b"f", stat.S_IFREG | 0o600, 0, 0).ino
        blocks = size // BLOCK_SIZE
        for first in range(0, blocks, REQUEST):
            for n in range(REQUEST):
                template[n * BLOCK_SIZE:n * BLOCK_SIZE + 8] = (first + n + 1).to_bytes(8, "big")
            vol.write(ino, first * BLOCK_SIZE, bytes(template))
    return ino


def values_read(state: Path, ino: int, block: int, **opening: object) -> tuple[int, int]:
    """Index values read by the open, and by a first read of *block*."""
    with closing(Volume(state, background_scan=True, **opening)) as vol:  # type: ignore[arg-type]
        at_open = vol.index.values_read
        data = vol.read(ino, block * BLOCK_SIZE, BLOCK_SIZE)
        assert data[:8] == (block + 1).to_bytes(8, "big")
        return at_open, vol.index.values_read - at_open


@pytest.mark.slow
def test_open_and_takeover_read_as_much_for_2_gib_as_for_128_mib(tmp_path: Path) -> None:
    counts = {}
    for size in (128 * MIB, 2048 * MIB):
        state = tmp_path / str(size)
        ino = build(state, size)
        last = size // BLOCK_SIZE - 1
        try:
            counts[size] = {
                "open": values_read(state, ino, last),
                # As a daemon taking over a live mount opens it: no new state,
                # the files the kernel holds open named.
                "takeover": values_read(state, ino, last // 2, create=False,
                                        still_open=(ino,)),
            }
        finally:
            shutil.rmtree(state)  # 2 GiB: not left for pytest's kept temporaries
    small, large = counts[128 * MIB], counts[2048 * MIB]
    assert small == large, counts
    for at_open, first_read in small.values():
        assert at_open < 64 and first_read < 16, counts
