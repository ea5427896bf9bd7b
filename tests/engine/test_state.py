"""The parts of the engine a Volume is built from, used alone: a State
(what fsck and ``swapfs rekey`` open), a ChainWrite given what it uses, and
the report."""

import errno
import os
from collections.abc import Collection
from pathlib import Path

import pytest

from swapfs.engine import keys, report
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.chainwrite import ChainWrite, load_block
from swapfs.engine.errors import SwapfsError
from swapfs.engine.filemap import FileMap
from swapfs.engine.index import ROOT_INO, Inode, Txn
from swapfs.engine.reclaim import PendingPunches
from swapfs.engine.state import State
from swapfs.engine.volume import Volume


def _block(seed: int) -> bytes:
    return seed.to_bytes(4, "big") * (BLOCK_SIZE // 4)


def _one_file(state_dir: Path, master: keys.MasterKey | None) -> tuple[int, int]:
    """A state with one chain holding one file of two distinct blocks: (chain, ino)."""
    volume = Volume(state_dir, master=master)
    try:
        chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)
        file = volume.create(chain.ino, b"f", 0o600, 0, 0)
        volume.write(file.ino, 0, _block(1) + _block(2))
        return chain.chain, file.ino
    finally:
        volume.close()


def test_a_state_is_locked_while_open(state_dir: Path) -> None:
    opened = State(state_dir)
    try:
        with pytest.raises(SwapfsError) as refused:
            State(state_dir)
        assert refused.value.errno == errno.EBUSY
    finally:
        opened.close()
    State(state_dir).close()  # released


def test_a_state_without_an_index_is_enoent_unless_created(tmp_path: Path) -> None:
    with pytest.raises(SwapfsError) as refused:
        State(tmp_path / "none", create=False)
    assert refused.value.errno == errno.ENOENT


def test_a_state_rekeyed_alone_opens_with_the_new_key_only(
        state_dir: Path, master_key: keys.MasterKey, tmp_path: Path) -> None:
    chain_id, ino = _one_file(state_dir, master_key)
    new = keys.generate(tmp_path / "new.key")
    opened = State(state_dir, recover=False, create=False, master=master_key)
    try:
        assert opened.rekey(new) == 1
    finally:
        opened.close()
    with pytest.raises(SwapfsError) as refused:
        State(state_dir, master=master_key)
    assert refused.value.errno == errno.EKEYREJECTED
    volume = Volume(state_dir, master=new)
    try:
        assert volume.read(ino, 0, 2 * BLOCK_SIZE) == _block(1) + _block(2)
    finally:
        volume.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_state_reads_its_blocks_without_a_volume(
        state_dir: Path, master_key: keys.MasterKey, encrypted: bool) -> None:
    chain_id, ino = _one_file(state_dir, master_key if encrypted else None)
    opened = State(state_dir, recover=False, master=master_key if encrypted else None)
    try:
        assert opened.encrypted is encrypted
        with opened.index.begin() as txn:
            table = opened.table(txn, chain_id)
            chain_keys = opened.chain_keys(table.chain)
            datas = {load_block(opened.store, chain_keys, slot, digest)
                     for slot, digest, _ in table.used()}
        assert datas == {_block(1), _block(2)}
    finally:
        opened.close()


class _Recording:
    """A State's maps as a ChainWrite sees them, recording what it forgets."""

    def __init__(self, opened: State) -> None:
        self.opened = opened
        self.forgotten: list[tuple[int, set[int]]] = []

    def map(self, txn: Txn, inode: Inode) -> FileMap:
        return self.opened.map(txn, inode)

    def adopt_map(self, fmap: FileMap) -> None:
        self.opened.adopt_map(fmap)

    def forget(self, chain_id: int, inos: Collection[int]) -> None:
        self.forgotten.append((chain_id, set(inos)))
        self.opened.forget(chain_id, inos)


def test_a_chain_write_uses_only_what_it_is_given(state_dir: Path) -> None:
    chain_id, ino = _one_file(state_dir, None)
    opened = State(state_dir)
    maps, pending = _Recording(opened), PendingPunches()
    try:
        with opened.index.begin(write=True) as txn:
            table = opened.table(txn, chain_id)
            change = ChainWrite(txn, table, opened.chain_keys(table.chain), opened.store,
                                pending, maps)
            inode = txn.get_inode(ino)
            assert inode is not None
            # The second block now repeats the first: its slot is freed.
            change.set_blocks(inode, [(1, _block(1))])
            assert change.mapped_block(inode, 1) == _block(1)
            txn.put_inode(inode)
            change.finish()
        assert pending.slots(chain_id) and not maps.forgotten
        with pytest.raises(RuntimeError), opened.index.begin(write=True) as txn:
            table = opened.table(txn, chain_id)
            change = ChainWrite(txn, table, opened.chain_keys(table.chain), opened.store,
                                pending, maps)
            inode = txn.get_inode(ino)
            assert inode is not None
            change.unmap_range(inode, 0)
            raise RuntimeError("abort")
        assert maps.forgotten == [(chain_id, {ino})]
    finally:
        opened.close()


def test_the_report_names_each_cache_it_is_given(volume: Volume) -> None:
    chain = volume.mkdir(ROOT_INO, b"c", 0o755, 0, 0)

    class Cache:
        def get(self, key: bytes, ino: int) -> bytes | None:
            return None

        def offer(self, key: bytes, data: bytes, ino: int) -> None:
            pass

        def stats(self) -> dict[str, object]:
            return {"hits": 3, "chains": {chain.chain: 7, 99: 1}}

    figures = report.stats(volume.opened, [("transient_cache", None),
                                           ("content_cache", Cache())])
    assert "transient_cache" not in figures
    assert figures["content_cache"] == {"hits": 3, "chains": {"c": 7, "99": 1}}
    assert figures["chains"]["c"]["id"] == chain.chain
    assert report.statfs(volume.state).f_bsize == os.statvfs(volume.state).f_bsize
