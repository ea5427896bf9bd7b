"""Block math: how a byte range of a file maps onto 4 KiB logical blocks."""

from collections.abc import Iterator
from typing import NamedTuple

BLOCK_SIZE = 4096
ZERO_BLOCK = bytes(BLOCK_SIZE)

#: Largest file size swapfs accepts: 2**50 bytes (1 PiB) leaves every block
#: number well inside the 64-bit keys of the index.
MAX_FILE_SIZE = 1 << 50


class Piece(NamedTuple):
    """The part of one logical block that an I/O request touches."""

    block: int  # logical block number within the file
    start: int  # first byte within the block
    end: int  # one past the last byte within the block
    buf_start: int  # where this piece begins in the request's buffer

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == BLOCK_SIZE


def pieces(offset: int, length: int) -> Iterator[Piece]:
    """Split ``[offset, offset + length)`` into per-block pieces, in order."""
    pos = offset
    stop = offset + length
    while pos < stop:
        block, start = divmod(pos, BLOCK_SIZE)
        end = min(BLOCK_SIZE, start + (stop - pos))
        yield Piece(block, start, end, pos - offset)
        pos += end - start


def blocks_for(size: int) -> int:
    """Number of logical blocks a file of *size* bytes spans."""
    return -(-size // BLOCK_SIZE)


def is_zero(block: bytes) -> bool:
    """True when a full block holds only zero bytes (it is stored as a hole)."""
    return block == ZERO_BLOCK
