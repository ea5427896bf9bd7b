"""Sealing a whole state again under new chain secrets: ``swapfs rekey --reseal``.

``swapfs rekey`` rewraps the chain secrets under a new master key and
leaves everything else as it was, so whoever kept the old master key and
an old copy of the index (a backup, or the free pages of LMDB's file,
where the old wrapped secrets stay) still holds the chain secrets, and
with them every block, past and future. Resealing leaves nothing of the
old keys: every chain gets a new secret, so new digest and data keys, and
every block is opened under the old keys and sealed again under the new
ones. Digests change with the digest key, so the slot tables, the seal
records and the dedup tables are made again; the file maps are not, since
each block keeps its slot.

The new state is built beside the old one, in ``reseal.new/`` inside the
state directory: a new LMDB index, written from scratch (so it never held
an old secret or digest) and then copied compacted, and new data and seal
files. Nothing of the old state changes while it is built. Then:

1. everything new is flushed, and ``reseal.new/`` is renamed
   ``reseal.ready/``: the commit point;
2. ``data/`` and ``index.lmdb/`` are each moved into ``reseal.ready/``
   (as ``old.data``, ``old.index.lmdb``) and the new ones into their place;
3. ``reseal.ready/`` is deleted, with the old index and data files in it,
   and the content cache's manifest, whose digests are the old keys'.

Each rename is followed by an fsync of the directories it touched. A crash
before step 1 leaves the old state, which opens with the old master key;
one after it leaves a state that :func:`finish` completes, and which then
opens with the new one. :class:`swapfs.engine.state.State` calls :func:`finish`
each time it opens a state, so a daemon, fsck or another rekey find one
state or the other, never a mix. The files deleted in step 3 leave no
name in the state directory; their blocks are the file system's to
reuse, as for any deleted file (docs/encryption.md).

An index of format 3 sealed every block under its chain's data key
(``swapfs/engine/sealing.py``); converting such a state is a reseal under the same
master key.
"""

import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from swapfs.engine import cleanmark, keys
from swapfs.engine.errors import CorruptBlock
from swapfs.engine.index import FORMAT_VERSION, Chain, Index, Txn
from swapfs.engine.sealing import BLOCK_KEYS, ChainKeys
from swapfs.engine.slottable import SlotTable
from swapfs.engine.statedir import sync_directory
from swapfs.engine.store import BlockStore

log = logging.getLogger(__name__)

#: The new state while it is built, and once it is complete (the commit point).
BUILDING, READY = "reseal.new", "reseal.ready"
#: The parts of a state that a reseal replaces, in the order they are swapped.
INDEX_NAME = "index.lmdb"
PARTS = ("data", INDEX_NAME)
#: Blocks read, sealed and written at a time.
_BATCH = 256
#: Records copied per transaction of the new index.
_COPY_BATCH = 4096
#: What :func:`build` tells as it goes: chain id, its blocks sealed again
#: so far, and all its blocks.
Progress = Callable[[int, int, int], None]
#: Records of the old meta database that the new one does not copy.
_NEW_META = (b"format", b"cipher", b"key_id", b"uuid")


def pending(state: Path) -> bool:
    """Is a committed reseal of *state* still to be completed by :func:`finish`?"""
    return (state / READY).is_dir()


def finish(state: Path) -> None:
    """Complete or undo a reseal a crash interrupted; nothing if there was
    none. The caller holds the state's lock."""
    building = state / BUILDING
    if building.exists():
        log.warning("%s: discarding a reseal that did not complete", state)
        shutil.rmtree(building)
        sync_directory(state)
    ready = state / READY
    if not ready.is_dir():
        return
    for part in PARTS:
        new, old = ready / part, ready / f"old.{part}"
        if not new.exists():
            continue  # in place already
        if (state / part).exists() and not old.exists():
            os.rename(state / part, old)
            _fsync_dirs(state, ready)
        os.rename(new, state / part)
        _fsync_dirs(state, ready)
    (state / "cache.manifest").unlink(missing_ok=True)
    shutil.rmtree(ready)
    sync_directory(state)
    log.info("%s: resealed", state)


def build(state: Path, index: Index, store: BlockStore,
          old_keys: Callable[[Chain], ChainKeys], new: keys.MasterKey,
          guard: Callable[[], None] | None = None, progress: Progress | None = None
          ) -> int:
    """Build the resealed state of *state* (whose *index* and *store* are
    open, and whose chains' keys *old_keys* gives) under new chain secrets
    wrapped by *new*, telling *progress* as blocks are sealed, and commit
    it (step 1 above) if *guard* (the lease's check) lets this process
    still write the state; :func:`finish` puts it in place once the caller
    has closed the old one. Returns the number of chains. A block whose
    data does not open stays unreadable (EIO), and so does a slot whose
    entry does not verify (its entry stays lost: fsck rebuilds it)."""
    building = state / BUILDING
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(mode=0o700)
    try:
        chains = _build(building, index, store, old_keys, new, progress)
        if guard is not None:
            guard()
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    os.rename(building, state / READY)
    sync_directory(state)
    return chains


def _build(building: Path, index: Index, store: BlockStore,
           old_keys: Callable[[Chain], ChainKeys], new: keys.MasterKey,
           progress: Progress | None) -> int:
    """Everything of :func:`build` but its commit: the new state, flushed."""
    work = building / "build.lmdb"
    target = Index(work)
    target_store = BlockStore(building / "data")
    try:
        while target.map_size < index.map_size:  # room for what the old one holds
            target.grow()
        state_id = keys.new_state_id()
        with index.begin() as old:
            chains = list(old.iter_chains())
            _copy(old, target, state_id, new)
            for chain in chains:
                _reseal_chain(old, store, old_keys(chain), chain, target, target_store,
                              state_id, new, progress)
        target_store.sync()
    finally:
        target_store.close()
        target.close()
    _compact(work, building / INDEX_NAME)
    shutil.rmtree(work)
    for directory in (building / "data", building / INDEX_NAME, building):
        sync_directory(directory)
    return len(chains)


def _copy(old: Txn, target: Index, state_id: bytes, new: keys.MasterKey) -> None:
    """Copy every database but the chains and their slot tables as it is
    (each record's checksum covers its database and key, which stay the
    same), and write the meta records that change."""
    with old.txn.cursor(db=old.index.main) as cursor:
        names = [bytes(name) for name in cursor.iternext(values=False)]
    for name in names:
        if name in (b"chains", b"slots"):
            continue
        handle = old.index.named.get(name) or old.index.env.open_db(
            name, txn=old.raw, create=False)
        records = _records(old, handle, skip=_NEW_META if name == b"meta" else ())
        while batch := [record for _, record in zip(range(_COPY_BATCH), records,
                                                      strict=False)]:
            _write(target, functools.partial(_put_raw, name=name, records=batch))

    def meta(txn: Txn) -> None:
        txn.put_meta(b"format", FORMAT_VERSION)
        txn.put_meta(b"cipher", BLOCK_KEYS)
        txn.put_meta(b"key_id", new.key_id)
        txn.put_state_id(state_id)
    _write(target, meta)


def _records(txn: Txn, handle: Any, skip: tuple[bytes, ...]) -> Iterator[tuple[bytes, bytes]]:
    with txn.txn.cursor(db=handle) as cursor:
        for key, value in cursor:
            if key not in skip:
                yield bytes(key), bytes(value)


def _put_raw(txn: Txn, name: bytes, records: list[tuple[bytes, bytes]]) -> None:
    handle = txn.index.named.get(name)
    if handle is None:  # a database this format does not open by name
        handle = txn.index.named[name] = txn.index.env.open_db(name, txn=txn.raw)
    for key, value in records:
        txn.txn.put(key, value, db=handle)


def _reseal_chain(old: Txn, store: BlockStore, old_keys: ChainKeys, chain: Chain,
                  target: Index, target_store: BlockStore, state_id: bytes,
                  new: keys.MasterKey, progress: Progress | None) -> None:
    """Open every used slot of *chain* and seal it again, in the same slot,
    under a new secret; write the chain's new record and slot table."""
    secret = keys.new_chain_secret()
    new_keys = ChainKeys.from_secret(chain.id_, secret)
    record = Chain(chain.id_, new.wrap(state_id, chain.id_, secret), chain.next_slot)
    table = SlotTable.load(old, chain)
    resealed = SlotTable.blank(record)
    used = list(table.used())
    for first in range(0, len(used), _BATCH):
        batch = used[first:first + _BATCH]
        slots = [slot for slot, _digest, _refcount in batch]
        datas = store.read_many(chain.id_, slots)
        seals = (store.read_seals(chain.id_, slots) if old_keys.sealed
                 else [None] * len(slots))
        blocks, records = [], []
        for (slot, digest, refcount), data, seal in zip(batch, datas, seals, strict=True):
            try:
                plain = old_keys.open(slot, digest, data, seal)
            except CorruptBlock:
                # Unreadable before, unreadable after: a digest no page has,
                # no data, no seal record; set aside, so still EIO.
                resealed.claim(slot, os.urandom(len(digest)), refcount)
                resealed.set_aside(slot)
                continue
            new_digest = new_keys.digest(plain)
            sealed, seal_record = new_keys.seal(new_digest, plain)
            blocks.append((slot, sealed))
            records.append((slot, seal_record))
            resealed.claim(slot, new_digest, refcount)
        if blocks:
            target_store.write_many(chain.id_, blocks)
            target_store.write_seals(chain.id_, records)
        if progress is not None:
            progress(chain.id_, first + len(batch), len(used))
    _reseal_lost(store, old_keys, new_keys, chain.id_, sorted(table.bad), resealed,
                 target_store)

    def save(txn: Txn) -> None:
        record.stored = resealed.stored
        txn.put_chain(record)
        for run in sorted(resealed.runs):
            txn.put_slot_run(chain.id_, run, resealed.runs[run])
        for slot in resealed.damaged:
            txn.put_damaged(chain.id_, slot)
    _write(target, save)
    log.info("chain %d: %d blocks sealed again", chain.id_, len(used))


def _reseal_lost(store: BlockStore, old_keys: ChainKeys, new_keys: ChainKeys,
                 chain_id: int, slots: list[int], resealed: SlotTable,
                 target_store: BlockStore) -> None:
    """The slots whose entry does not verify: lost before, lost after. Each
    keeps an entry that does not verify, so it still reads EIO; its block,
    if its seal record names it and it opens, is sealed again, so that
    ``swapfs fsck --repair`` rebuilds the entry afterwards from the new
    seal record and the file maps, as it would have before."""
    for first in range(0, len(slots), _BATCH):
        batch = slots[first:first + _BATCH]
        datas = store.read_many(chain_id, batch)
        seals = (store.read_seals(chain_id, batch) if old_keys.sealed
                 else [None] * len(batch))
        blocks, records = [], []
        for slot, data, seal in zip(batch, datas, seals, strict=True):
            resealed.lose(slot)
            digest = old_keys.recover_digest(slot, data, seal)
            if digest is None:
                continue  # free, or its block lost too
            plain = old_keys.open(slot, digest, data, seal)
            new_digest = new_keys.digest(plain)
            sealed, seal_record = new_keys.seal(new_digest, plain)
            blocks.append((slot, sealed))
            records.append((slot, seal_record))
        if blocks:
            target_store.write_many(chain_id, blocks)
            target_store.write_seals(chain_id, records)
    if slots:
        log.warning("chain %d: the entries of %d slots do not verify; they stay lost "
                    "(swapfs fsck --repair rebuilds them)", chain_id, len(slots))


def _write(index: Index, fill: Callable[[Txn], None]) -> None:
    """Run *fill* in a write transaction of *index*, again once the map has
    grown if it found it full (*fill* writes the same records each time)."""
    while True:
        try:
            with index.begin(write=True) as txn:
                fill(txn)
            return
        except lmdb.MapFullError:
            index.grow()


def _compact(source: Path, target: Path) -> None:
    """Copy the index in *source* to *target* with only the pages in use
    (LMDB's compacting copy), and mark it clean."""
    target.mkdir(mode=0o700)
    env = lmdb.open(str(source), readonly=True, lock=False, max_dbs=16)
    try:
        page_size = int(env.stat()["psize"])
        env.copy(str(target), compact=True)
    finally:
        env.close()
    data = target / "data.mdb"
    data.chmod(0o600)
    with open(data, "rb") as file:
        os.fsync(file.fileno())
    cleanmark.mark_clean(target, page_size)


def _fsync_dirs(*directories: Path) -> None:
    for directory in directories:
        sync_directory(directory)

