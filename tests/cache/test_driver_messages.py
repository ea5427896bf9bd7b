"""Every integer field of every driver message, at its bounds.

``swapfs.control.protocol.check_message`` is what stands between a driver (a guest,
a group member) and the pool: each bound is tried on both sides, so that a
bound off by one, or one missing, fails here rather than in a fuzzer's luck.
"""

import errno
from typing import Any

import pytest

from swapfs.control import MAX_EXTENTS, PAGE_SIZE, DriverError, check_message

U64 = 1 << 64
#: The kernel's PID_MAX_LIMIT: pids are below it.
PID_LIMIT = 1 << 22


def extent(**fields: Any) -> dict[str, Any]:
    good = {"pid": 100, "path": "/bin/prog", "device": "fe:00", "inode": 7,
            "address": 0x1000, "length": PAGE_SIZE, "segment": 0, "part": "tail"}
    return {**good, **fields}


def messages(extents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The driver messages that carry extents."""
    return [{"op": "driver.register", "driver": "d", "extents": extents},
            {"op": "driver.update", "driver": "d", "token": "t", "extents": extents}]


def refused(extents: list[dict[str, Any]]) -> bool:
    outcomes = []
    for message in messages(extents):
        try:
            check_message(message)
            outcomes.append(False)
        except DriverError as exc:
            assert exc.errno == errno.EINVAL
            outcomes.append(True)
    assert len(set(outcomes)) == 1  # register and update agree
    return outcomes[0]


#: field -> (values accepted, values refused). An extent is the unused part
#: of one page: its length is 1..a page and it ends within its page.
BOUNDS: dict[str, tuple[list[Any], list[Any]]] = {
    "length": ([1, PAGE_SIZE - 1, PAGE_SIZE],
               [0, -1, PAGE_SIZE + 1, U64, U64 - 1, 1.0, True, "1", None]),
    "pid": ([1, PID_LIMIT - 1], [0, -1, PID_LIMIT, U64, 1.0, True, None]),
    "inode": ([0, U64 - 1], [-1, U64, 1.5, False, "7"]),
    "segment": ([0, 0xFFFF], [-1, 0x10000, U64, 0.0, None]),
    "address": ([0, U64 - PAGE_SIZE], [-1, U64, 4096.0, [4096]]),
}


@pytest.mark.parametrize("field", sorted(BOUNDS))
def test_each_integer_field_at_its_bounds(field: str) -> None:
    accepted, refused_values = BOUNDS[field]
    for value in accepted:
        assert not refused([extent(**{field: value})]), (field, value)
    for value in refused_values:
        assert refused([extent(**{field: value})]), (field, value)


def test_an_extent_ends_within_its_page() -> None:
    """A head starts a page and a tail ends one: an extent that crosses a
    page boundary, or the end of the address space, is refused."""
    last_page = U64 - PAGE_SIZE
    assert not refused([extent(address=last_page + PAGE_SIZE - 1, length=1)])
    assert not refused([extent(address=last_page + 1, length=PAGE_SIZE - 1)])
    assert refused([extent(address=U64 - 1, length=2)])
    assert refused([extent(address=0x1001, length=PAGE_SIZE)])
    assert refused([extent(address=0x1FFF, length=2)])


def test_the_number_of_extents_at_its_bound() -> None:
    many = [extent(inode=number, length=1) for number in range(MAX_EXTENTS)]
    assert not refused(many)
    assert refused([*many, extent(inode=MAX_EXTENTS, length=1)])
    assert not refused([])
