"""What the index's pages hold, by database and per block (``stats()["index"]``).

The figures are LMDB's own page counts, so the tests check how they add up
and what they are divided by, not their size, which is the benchmark's to
report.
"""

from contextlib import closing
from pathlib import Path

import lmdb
import pytest

from swapfs.engine.index import IndexSpace
from swapfs.engine.volume import Volume
from tests.fixtures.make_state import make


def test_a_volume_reports_the_bytes_of_each_database(state_dir: Path) -> None:
    make(state_dir)  # known content: two chains, dedup, holes, a clone
    with closing(Volume(state_dir)) as vol:
        stats = vol.stats()
    index = stats["index"]
    trees = sum(index["databases"].values()) + index["main_bytes"]
    assert 0 < trees <= stats["index_bytes"]
    assert index["maps_bytes"] > 0 and index["other_bytes"] > 0
    assert index["maps_bytes"] + index["other_bytes"] + index["unused_bytes"] \
        == stats["index_bytes"]
    files = [file for chain in stats["chains"].values() for file in chain["files"].values()]
    assert index["logical_blocks"] == sum(file["mapped_blocks"] for file in files) > 0
    assert index["stored_blocks"] == sum(
        chain["unique_blocks"] for chain in stats["chains"].values()) > 0
    assert index["bytes_per_logical_block"] == index["maps_bytes"] / index["logical_blocks"]
    assert index["bytes_per_stored_block"] == index["other_bytes"] / index["stored_blocks"]


def test_a_database_this_format_does_not_open_is_counted(state_dir: Path) -> None:
    with closing(Volume(state_dir)):
        pass
    # Written behind swapfs's back: its clean mark would refuse the new meta pages.
    (state_dir / "index.lmdb" / "clean").unlink()
    env = lmdb.open(str(state_dir / "index.lmdb"), max_dbs=16)
    try:
        extra = env.open_db(b"extra")
        with env.begin(write=True) as txn:
            for n in range(2000):
                txn.put(n.to_bytes(8, "big"), bytes(32), db=extra)
    finally:
        env.close()
    with closing(Volume(state_dir)) as vol:
        index = vol.stats()["index"]
    assert index["databases"]["extra"] > 0
    assert index["other_bytes"] >= index["databases"]["extra"] + index["main_bytes"]


def test_an_empty_volume_has_no_figure_per_block(volume: Volume) -> None:
    index = volume.stats()["index"]
    assert (index["logical_blocks"], index["stored_blocks"]) == (0, 0)
    assert index["bytes_per_logical_block"] is None is index["bytes_per_stored_block"]


@pytest.mark.parametrize("maps", ["maps", "filemaps"])
def test_the_maps_are_whichever_map_database_the_index_has(maps: str) -> None:
    space = IndexSpace({maps: 8 << 12, "slots": 3 << 12, "meta": 1 << 12},
                       main_bytes=1 << 12, file_bytes=16 << 12)
    assert (space.maps_bytes, space.other_bytes, space.unused_bytes) \
        == (8 << 12, 5 << 12, 3 << 12)
