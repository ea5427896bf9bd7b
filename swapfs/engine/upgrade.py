"""Converting an index of an earlier format to today's, in place.

The conversion is one LMDB write transaction: it reads every record of the
old format, writes the new one, drops the old databases and stores the new
format number, and commits once. A crash or a kill before that commit
leaves the old format exactly as it was (LMDB commits atomically); after
it, the new one. :class:`swapfs.engine.state.State` converts at open, and
``swapfs fsck --upgrade`` does the same without mounting.

Format 1 kept each file's map as one entry per logical block naming the
block's digest, and each chain's blocks in a hash table keyed by digest
(slot and refcount), with a separate list of free slots; no record carried
a checksum. Format 2 did not say how blocks are stored: all were stored
as they are. Format 3 had no UUID; its encrypted states sealed every block
of a chain under one key and wrapped the chain secrets under a key bound to
the chain alone. A plain state of format 3 is given a UUID here; an
encrypted one is sealed again, under new chain secrets, by
``swapfs/engine/reseal.py`` (which needs its master key). Format 4's chain
records did not count the blocks stored, so an open had to read the whole
slot table to know it, and its files had no run directory (``mapdirs``), so
a file's map was read whole at its first use to notice a lost run. Format
5 is described in ``swapfs/engine/index.py``.
"""

import logging
import struct
from collections.abc import Iterator
from typing import Any

import lmdb

from swapfs.engine.filemap import FileMap, run_directory
from swapfs.engine.index import Chain, CorruptIndex, Inode, Txn
from swapfs.engine.keys import new_state_id
from swapfs.engine.slottable import SlotTable

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_V1_CHAIN = struct.Struct(">32sQQ")  # key, next_slot, stored
_V1_HASH_VALUE = struct.Struct(">QI")  # slot, refcount
_V1_INO_BLOCK = struct.Struct(">QQ")


def format_of(txn: Txn) -> int | None:
    """The index's format number; None for an index never formatted.

    Format 1 stored it as a bare u64; later formats checksum it like every
    record, so its length tells them apart before any checksum is verified.
    """
    raw = txn.txn.get(b"format", db=txn.index.meta)
    if raw is None:
        return None
    if len(raw) == _U64.size:
        return int(_U64.unpack(raw)[0])
    return txn.get_meta(b"format")


def _records(txn: Txn, db: Any) -> list[tuple[bytes, bytes]]:
    with txn.txn.cursor(db=db) as cur:
        return [(bytes(key), bytes(value)) for key, value in cur]


def _old_db(txn: Txn, name: bytes) -> Any | None:
    try:
        return txn.index.env.open_db(name, txn=txn.raw, create=False)
    except lmdb.NotFoundError:
        return None


def from_format_1(txn: Txn) -> None:
    """Convert a format 1 index to format 2 within *txn* (the caller commits)."""
    index = txn.index
    for name in (b"next_ino", b"next_chain"):
        raw = txn.txn.get(name, db=index.meta)
        if raw is None or len(raw) != _U64.size:
            raise CorruptIndex(f"the format 1 index has no valid {name.decode()} counter")
        txn.put_meta(name, _U64.unpack(raw)[0])
    inodes = {}
    for key, raw in _records(txn, index.inodes):
        inode = Inode.unpack(_U64.unpack(key)[0], raw)
        inodes[inode.ino] = inode
        txn.put_inode(inode)
    for key, raw in _records(txn, index.dirents):
        txn.put_dirent(_U64.unpack(key[:8])[0], key[8:], _U64.unpack(raw)[0])
    for key, _ in _records(txn, index.orphans):
        txn.put_orphan(_U64.unpack(key)[0])
    for key, raw in _records(txn, index.priorities):
        txn.put_priority(_U64.unpack(key)[0], _I32.unpack(raw)[0])
    tables = {}
    for key, raw in _records(txn, index.chains):
        chain_id = struct.unpack(">I", key)[0]
        chain_key, next_slot, _stored = _V1_CHAIN.unpack(raw)
        chain = Chain(chain_id, chain_key, next_slot)
        txn.put_chain(chain)
        tables[chain_id] = SlotTable.blank(chain)
    slots: dict[tuple[int, bytes], int] = {}  # (chain, digest) -> slot
    hashes = _old_db(txn, b"hashes")
    for key, raw in ([] if hashes is None else _records(txn, hashes)):
        chain_id, digest = struct.unpack(">I", key[:4])[0], key[4:]
        slot, refcount = _V1_HASH_VALUE.unpack(raw)
        tables[chain_id].claim(slot, digest, refcount)
        slots[chain_id, digest] = slot
    maps = _old_db(txn, b"maps")
    for ino, blocks in _by_file(txn, maps):
        fmap = FileMap(ino)
        chain_id = inodes[ino].chain
        for block, digest in blocks:
            fmap.set(block, slots[chain_id, digest])
        fmap.save(txn)
    for table in tables.values():
        table.save(txn)
    for name in (b"hashes", b"maps", b"free"):
        db = _old_db(txn, name)
        if db is not None:
            txn.txn.drop(db, delete=True)
    txn.put_meta(b"format", 2)
    log.info("converted the index from format 1 to format 2: %d files, %d chains",
             len(inodes), len(tables))


def from_format_2(txn: Txn) -> None:
    """Convert a format 2 index to format 3 within *txn*: a plain state."""
    txn.put_meta(b"cipher", 0)
    txn.put_meta(b"format", 3)
    log.info("converted the index from format 2 to format 3 (unencrypted)")


def from_format_3(txn: Txn) -> None:
    """Convert the index of a plain format 3 state to format 4 within *txn*:
    the state gets its UUID."""
    txn.put_state_id(new_state_id())
    txn.put_meta(b"format", 4)
    log.info("converted the index from format 3 to format 4")


def from_format_4(txn: Txn) -> None:
    """Convert a format 4 index to format 5 within *txn*: each chain record
    counts its used slots (entries that do not verify count as free, as
    fsck's recount does), and each file gets its run directory."""
    chains = list(txn.iter_chains())
    for chain in chains:
        chain.stored = SlotTable.count_used(txn, chain)
        txn.put_chain(chain)
    files = add_map_dirs(txn)
    txn.put_meta(b"format", 5)
    log.info("converted the index from format 4 to format 5: %d chains, %d files",
             len(chains), files)


def add_map_dirs(txn: Txn) -> int:
    """Write the run directory of every file that has map runs, from the
    runs LMDB holds (a run that does not verify is named: it reads EIO);
    returns how many."""
    inos = list(txn.iter_mapped_inos())
    for ino in inos:
        txn.put_map_dir(ino, run_directory(txn, ino))
    return len(inos)


def _by_file(txn: Txn, maps: Any | None) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """A format 1 map database, one file at a time: (ino, [(block, digest)])."""
    if maps is None:
        return
    ino = 0
    blocks: list[tuple[int, bytes]] = []
    with txn.txn.cursor(db=maps) as cur:
        for key, digest in cur:
            key_ino, block = _V1_INO_BLOCK.unpack(key)
            if key_ino != ino and blocks:
                yield ino, blocks
                blocks = []
            ino = key_ino
            blocks.append((block, bytes(digest)))
    if blocks:
        yield ino, blocks
