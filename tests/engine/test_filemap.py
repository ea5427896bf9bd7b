"""File maps read run by run: what a read after an open costs does not grow
with the file, reads stay right when runs are dropped from memory and read
again, and a lost run or a lost run directory reads EIO or right, never a
hole's zeros (swapfs/engine/filemap.py)."""

import errno
import stat
import struct
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import lmdb
import pytest

from swapfs.engine import cleanmark, fsck, keys
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.filemap import MAP_RUN
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Volume

BS = BLOCK_SIZE
#: A bound of one run: every run read drops the one read before it.
ONE_RUN = 1


def block(n: int) -> bytes:
    """A block of its own, never all zeros."""
    return (n + 1).to_bytes(8, "big") * (BS // 8)


class Model:
    """A file as it should read: the bytes written, zeros elsewhere."""

    def __init__(self, vol: Volume, ino: int) -> None:
        self.vol, self.ino, self.data = vol, ino, bytearray()

    def write(self, at_block: int, data: bytes) -> None:
        self.vol.write(self.ino, at_block * BS, data)
        end = at_block * BS + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[at_block * BS:end] = data

    def check(self, vol: Volume) -> None:
        """Every block reads back as written, in reads of one block and of a run."""
        size = len(self.data)
        for offset in range(0, size, MAP_RUN * BS):
            assert vol.read(self.ino, offset, MAP_RUN * BS) == \
                self.data[offset:offset + MAP_RUN * BS], offset // BS
        for n in range(0, -(-size // BS)):
            if n % 97 == 0 or any(self.data[n * BS:(n + 1) * BS]):
                assert vol.read(self.ino, n * BS, BS) == self.data[n * BS:(n + 1) * BS], n


def new_file(vol: Volume, chain: int, name: bytes) -> int:
    return vol.create(chain, name, stat.S_IFREG | 0o600, 0, 0).ino


def runs_file(vol: Volume) -> tuple[int, Model]:
    """A chain with a file whose map has runs 0, 2 and 5, holes between."""
    chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0).ino
    model = Model(vol, new_file(vol, chain, b"f"))
    model.write(0, block(0) + block(1))
    model.write(2 * MAP_RUN + 5, block(2) + block(3))
    model.write(5 * MAP_RUN + 1000, block(4) + bytes(BS) + block(5))
    model.write(6 * MAP_RUN - 1, block(6))
    return chain, model


@pytest.mark.parametrize("encrypted", [False, True])
def test_reads_stay_right_while_runs_are_dropped_and_read_again(
        state_dir: Path, master_key: keys.MasterKey, encrypted: bool) -> None:
    master = master_key if encrypted else None
    with closing(Volume(state_dir, master=master, map_cache_bytes=ONE_RUN)) as vol:
        assert vol.opened.map_runs.limit == 1
        chain, model = runs_file(vol)
        model.check(vol)
        # A clone, then changes to each: the clone's runs are its own.
        clone = Model(vol, vol.clone(model.ino, chain, b"clone").ino)
        clone.data = bytearray(model.data)
        clone.write(3 * MAP_RUN, block(7))
        model.write(1, block(8))
        # A truncation inside run 2, a discard of all of run 5 and part of 0.
        vol.setattr(clone.ino, size=(2 * MAP_RUN + 6) * BS - 100)
        del clone.data[(2 * MAP_RUN + 6) * BS - 100:]
        vol.fallocate(model.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      BS, 6 * MAP_RUN * BS - BS)
        model.data[BS:6 * MAP_RUN * BS] = bytes(6 * MAP_RUN * BS - BS)
        for file in (model, clone):
            file.check(vol)
        assert sum(len(fmap.runs) for fmap in vol.opened.maps.values()) <= 1
        loads = vol.opened.map_runs.loads
        clone.check(vol)
        assert vol.opened.map_runs.loads > loads  # dropped, and read again
    with closing(Volume(state_dir, master=master, map_cache_bytes=ONE_RUN)) as vol:
        for file in (model, clone):
            file.check(vol)
        assert list(vol.mapped(model.ino)) == [0]
        assert sorted(vol.mapped(clone.ino)) == [0, 1, 2 * MAP_RUN + 5]
    assert fsck.check(state_dir, master=master).clean


def test_a_write_over_several_runs_keeps_its_changes_until_it_commits(
        state_dir: Path) -> None:
    """One write changes a run and then reads others past the bound: the
    changed run is not dropped before the commit, which would read it again
    as the last commit left it."""
    with closing(Volume(state_dir, map_cache_bytes=ONE_RUN)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0).ino
        model = Model(vol, new_file(vol, chain, b"f"))
        for run in range(4):
            model.write(run * MAP_RUN + 3, block(run))
        model.write(MAP_RUN - 1, b"".join(block(10 + n) for n in range(2 * MAP_RUN + 2)))
        model.check(vol)
    with closing(Volume(state_dir)) as vol:
        model.check(vol)


# -- damage behind the engine's back ------------------------------------------------


def edit_index(state: Path, edit: Callable[[lmdb.Environment, lmdb.Transaction], None]
               ) -> None:
    """Change the closed state's index without swapfs, as a bug or a bad
    disk would, and leave it marked clean as swapfs closes it."""
    env = lmdb.open(str(state / "index.lmdb"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            edit(env, txn)
        page_size = int(env.stat()["psize"])
    finally:
        env.close()
    cleanmark.mark_clean(state / "index.lmdb", page_size)


def delete_run(ino: int, run: int) -> Callable[[lmdb.Environment, lmdb.Transaction], None]:
    def edit(env: lmdb.Environment, txn: lmdb.Transaction) -> None:
        assert txn.delete(struct.pack(">QI", ino, run), db=env.open_db(b"filemaps", txn=txn))
    return edit


def delete_directory(ino: int) -> Callable[[lmdb.Environment, lmdb.Transaction], None]:
    def edit(env: lmdb.Environment, txn: lmdb.Transaction) -> None:
        assert txn.delete(struct.pack(">Q", ino), db=env.open_db(b"mapdirs", txn=txn))
    return edit


def flip_directory(ino: int, bit: int) -> Callable[[lmdb.Environment, lmdb.Transaction], None]:
    def edit(env: lmdb.Environment, txn: lmdb.Transaction) -> None:
        mapdirs = env.open_db(b"mapdirs", txn=txn)
        found = txn.get(struct.pack(">Q", ino), db=mapdirs)
        assert found is not None
        raw = bytearray(found)
        raw[bit // 8] ^= 1 << bit % 8
        txn.put(struct.pack(">Q", ino), bytes(raw), db=mapdirs)
    return edit


def closed_runs_file(state: Path) -> Model:
    with closing(Volume(state)) as vol:
        return runs_file(vol)[1]


def assert_lost_run(state: Path, model: Model, run: int, holes_known: bool = True) -> None:
    """Every block of *run* reads EIO, mapped or a hole; the blocks of the
    other runs read right, and so do their holes if *holes_known* (without
    a directory, a lost run makes every run not found unknown)."""
    with closing(Volume(state, map_cache_bytes=ONE_RUN)) as vol:
        for n in (run * MAP_RUN, run * MAP_RUN + 5, (run + 1) * MAP_RUN - 1):
            with pytest.raises(SwapfsError) as lost:
                vol.read(model.ino, n * BS, BS)
            assert lost.value.errno == errno.EIO, n
        for n in range(0, len(model.data) // BS):
            want = model.data[n * BS:(n + 1) * BS]
            if n // MAP_RUN != run and (any(want) or holes_known and n % 97 == 0):
                assert vol.read(model.ino, n * BS, BS) == want, n


def kinds(report: fsck.Report) -> set[str]:
    return {problem.kind for problem in report.problems}


def test_a_run_lost_behind_the_engines_back_reads_eio(state_dir: Path) -> None:
    model = closed_runs_file(state_dir)
    edit_index(state_dir, delete_run(model.ino, 2))
    assert_lost_run(state_dir, model, 2)
    report = fsck.check(state_dir, repair=True)
    # The directory still names the run: it is lost, not wrongly named.
    assert "block-count" in kinds(report) and "map-directory" not in kinds(report)
    assert_lost_run(state_dir, model, 2)


def test_a_write_that_fails_leaves_the_map_as_last_committed(state_dir: Path) -> None:
    """A write that makes a run appear, then meets a lost run, aborts: the
    map it changed in memory is dropped, and read again as committed."""
    model = closed_runs_file(state_dir)
    edit_index(state_dir, delete_run(model.ino, 2))
    with closing(Volume(state_dir, map_cache_bytes=ONE_RUN)) as vol:
        model.vol = vol
        with pytest.raises(SwapfsError) as lost:
            vol.write(model.ino, (2 * MAP_RUN - 1) * BS, block(9) + block(10))
        assert lost.value.errno == errno.EIO
        assert vol.read(model.ino, (2 * MAP_RUN - 1) * BS, BS) == bytes(BS)
        model.write(MAP_RUN, block(11))  # a run of its own, named now
        assert vol.read(model.ino, MAP_RUN * BS, BS) == block(11)
    with closing(Volume(state_dir)) as vol:
        assert vol.read(model.ino, MAP_RUN * BS, BS) == block(11)
        assert vol.read(model.ino, 0, 2 * BS) == block(0) + block(1)
    assert "map-directory" not in kinds(fsck.check(state_dir))


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_lost_directory_reads_right_and_fsck_rebuilds_it(
        state_dir: Path, damage: str) -> None:
    model = closed_runs_file(state_dir)
    edit_index(state_dir, delete_directory(model.ino) if damage == "deleted"
               else flip_directory(model.ino, 3))
    with closing(Volume(state_dir, map_cache_bytes=ONE_RUN)) as vol:
        model.check(vol)  # read whole instead
    report = fsck.check(state_dir)
    assert kinds(report) == {"map-directory"} and report.exit_code == fsck.EXIT_UNREPAIRED
    assert fsck.check(state_dir, repair=True).exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state_dir).clean
    with closing(Volume(state_dir, map_cache_bytes=ONE_RUN)) as vol:
        loads = vol.opened.map_runs.loads
        assert vol.read(model.ino, 0, BS) == block(0)
        assert vol.opened.map_runs.loads - loads == 1  # the directory is used again
        model.check(vol)


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_lost_directory_and_a_lost_run_read_eio_never_zeros(
        state_dir: Path, damage: str) -> None:
    model = closed_runs_file(state_dir)
    edit_index(state_dir, delete_run(model.ino, 2))
    edit_index(state_dir, delete_directory(model.ino) if damage == "deleted"
               else flip_directory(model.ino, 2))
    assert_lost_run(state_dir, model, 2, holes_known=False)
    with closing(Volume(state_dir)) as vol, pytest.raises(SwapfsError) as unknown:
        vol.read(model.ino, MAP_RUN * BS, BS)  # a hole of run 1, perhaps not
    assert unknown.value.errno == errno.EIO
    report = fsck.check(state_dir, repair=True)
    assert {"block-count", "map-directory"} <= kinds(report)
    assert not any(problem.repaired for problem in report.problems
                   if problem.kind == "map-directory")  # it would name run 2 no more
    assert_lost_run(state_dir, model, 2, holes_known=False)


def test_a_directory_that_names_a_run_too_many_is_rebuilt(state_dir: Path) -> None:
    """A directory naming a run the map does not have, while the runs add
    up: that run's blocks read EIO until fsck --repair names it no more."""
    model = closed_runs_file(state_dir)
    with closing(Volume(state_dir)) as vol, vol.index.begin(write=True) as txn:
        named = bytearray(txn.get_map_dir(model.ino) or b"")
        named[0] |= 1 << 3  # run 3, which holds holes
        txn.put_map_dir(model.ino, bytes(named))
    with closing(Volume(state_dir)) as vol, pytest.raises(SwapfsError) as lost:
        vol.read(model.ino, 3 * MAP_RUN * BS, BS)
    assert lost.value.errno == errno.EIO
    report = fsck.check(state_dir, repair=True)
    assert kinds(report) == {"map-directory"} and report.exit_code == fsck.EXIT_REPAIRED
    with closing(Volume(state_dir)) as vol:
        model.check(vol)


def test_a_directory_of_no_file_is_stray(state_dir: Path) -> None:
    closed_runs_file(state_dir)
    with closing(Volume(state_dir)) as vol, vol.index.begin(write=True) as txn:
        txn.put_map_dir(999_999, b"\x01")
    report = fsck.check(state_dir, repair=True)
    assert kinds(report) == {"stray-map-directory"}
    assert report.exit_code == fsck.EXIT_REPAIRED
    assert fsck.check(state_dir).clean


# -- the cost of a read after an open ---------------------------------------------------


def filled_file(state: Path, blocks: int) -> int:
    """A state with one file of *blocks* distinct blocks: its inode number."""
    with closing(Volume(state)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o755, 0, 0).ino
        ino = new_file(vol, chain, b"f")
        step = 256  # blocks a write
        for first in range(0, blocks, step):
            vol.write(ino, first * BS, b"".join(
                n.to_bytes(8, "big") + bytes(BS - 8) for n in range(first + 1, first + step + 1)))
    return ino


def map_runs_of_first_read(vol: Volume, ino: int, n: int) -> int:
    """How many runs of the file's map the first read of block *n* after the
    open reads."""
    loads = vol.opened.map_runs.loads
    assert vol.read(ino, n * BS, BS)[:8] == (n + 1).to_bytes(8, "big")
    return vol.opened.map_runs.loads - loads


def test_the_first_read_after_an_open_reads_as_many_map_runs_small_or_large(
        tmp_path: Path) -> None:
    """8 MiB or 256 MiB stored: the first read after the open reads one run
    of the map, whatever the file's size."""
    runs = {}
    for name, blocks in (("small", 2048), ("large", 65536)):
        state = tmp_path / name
        ino = filled_file(state, blocks)
        with closing(Volume(state)) as vol:
            runs[name] = map_runs_of_first_read(vol, ino, blocks // 2)
    assert runs["small"] == runs["large"] <= 1, runs
