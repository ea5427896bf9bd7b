"""Block math and slot-run coalescing: the arithmetic every I/O path relies on."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swapfs.engine.blocks import BLOCK_SIZE, ZERO_BLOCK, Piece, blocks_for, is_zero, pieces
from swapfs.engine.store import slot_runs

BS = BLOCK_SIZE

offsets = st.one_of(
    st.integers(0, 8 * BS),
    st.integers(0, 8).map(lambda n: n * BS),  # block-aligned
    st.integers(1, 8).map(lambda n: n * BS - 1),  # last byte of a block
    st.integers(0, 1 << 40),  # far into a large file
)
lengths = st.one_of(
    st.integers(0, 4 * BS),
    st.sampled_from([0, 1, BS - 1, BS, BS + 1, 2 * BS, 3 * BS + 17]),
)


# -- pieces() ---------------------------------------------------------------------


def test_pieces_of_nothing_is_empty() -> None:
    assert list(pieces(0, 0)) == []
    assert list(pieces(12345, 0)) == []


def test_pieces_of_one_whole_block() -> None:
    assert list(pieces(3 * BS, BS)) == [Piece(3, 0, BS, 0)]
    assert Piece(3, 0, BS, 0).whole


def test_pieces_straddling_a_block_boundary() -> None:
    assert list(pieces(BS - 1, 2)) == [Piece(0, BS - 1, BS, 0), Piece(1, 0, 1, 1)]


def test_pieces_of_an_unaligned_multi_block_range() -> None:
    got = list(pieces(100, 2 * BS))
    assert got == [
        Piece(0, 100, BS, 0),
        Piece(1, 0, BS, BS - 100),
        Piece(2, 0, 100, 2 * BS - 100),
    ]
    assert [p.whole for p in got] == [False, True, False]


@given(offset=offsets, length=lengths)
def test_pieces_tile_the_range_exactly(offset: int, length: int) -> None:
    """Pieces are consecutive blocks that cover [offset, offset+length) once, in order."""
    got = list(pieces(offset, length))
    assert len(got) == (blocks_for(offset + length) - offset // BS if length else 0)
    buf_pos = 0
    for i, piece in enumerate(got):
        assert piece.block == offset // BS + i
        assert 0 <= piece.start < piece.end <= BS
        assert piece.buf_start == buf_pos
        assert piece.block * BS + piece.start == offset + buf_pos
        assert piece.whole == (piece.start == 0 and piece.end == BS)
        if 0 < i < len(got) - 1:
            assert piece.whole, "only the first and last piece may be partial"
        buf_pos += piece.end - piece.start
    assert buf_pos == length


@given(offset=st.integers(0, 3 * BS), data=st.binary(max_size=3 * BS))
def test_writing_through_pieces_equals_a_slice_assignment(offset: int, data: bytes) -> None:
    """Copying each piece into its block gives the same bytes as a flat write."""
    flat = bytearray(7 * BS)
    flat[offset:offset + len(data)] = data
    blocks = [bytearray(BS) for _ in range(7)]
    for p in pieces(offset, len(data)):
        blocks[p.block][p.start:p.end] = data[p.buf_start:p.buf_start + p.end - p.start]
    assert b"".join(blocks) == flat


# -- blocks_for() and is_zero() ------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count"),
    [(0, 0), (1, 1), (BS - 1, 1), (BS, 1), (BS + 1, 2), (10 * BS, 10), (1 << 50, 1 << 38)],
)
def test_blocks_for(size: int, count: int) -> None:
    assert blocks_for(size) == count


@given(st.integers(0, 1 << 52))
def test_blocks_for_is_the_ceiling(size: int) -> None:
    n = blocks_for(size)
    assert (n - 1) * BS < size <= n * BS or size == n == 0


def test_is_zero_of_the_zero_block() -> None:
    assert is_zero(ZERO_BLOCK)
    assert is_zero(bytes(BS))
    assert len(ZERO_BLOCK) == BS


@given(st.integers(0, BS - 1), st.integers(1, 255))
def test_is_zero_sees_any_non_zero_byte(pos: int, value: int) -> None:
    block = bytearray(BS)
    block[pos] = value
    assert not is_zero(bytes(block))


# -- slot_runs() -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "runs"),
    [
        ([], []),
        ([7], [(7, 1)]),
        ([0, 1, 2], [(0, 3)]),
        ([5, 3, 4, 10, 0], [(0, 1), (3, 3), (10, 1)]),
        ([9, 8, 2, 1], [(1, 2), (8, 2)]),
    ],
)
def test_slot_runs_examples(slots: list[int], runs: list[tuple[int, int]]) -> None:
    assert slot_runs(slots) == runs


@given(st.sets(st.integers(0, 200)))
def test_slot_runs_are_maximal_and_cover_the_slots(slots: set[int]) -> None:
    """Runs are sorted, never touch each other, and expand back to the slots."""
    runs = slot_runs(slots)
    expanded = [slot for first, count in runs for slot in range(first, first + count)]
    assert expanded == sorted(slots)
    assert all(count >= 1 for _, count in runs)
    for (first, count), (next_first, _) in zip(runs, runs[1:], strict=False):
        assert first + count < next_first, "adjacent runs should have been merged"
