"""The LMDB index: every piece of metadata swapfs keeps, and nothing else.

One LMDB environment (``index.lmdb`` in the state directory) holds these
named databases. Keys are big-endian so that LMDB's byte order is their
numeric order and a cursor walks a file's runs or a chain's slots in order.

==========  ==============================  ==================================
database    key                             value
==========  ==============================  ==================================
meta        ``b"format"``                   schema version (u64)
            ``b"next_ino"``                 next inode number to hand out (u64)
            ``b"next_chain"``               next chain id to hand out (u64)
            ``b"cipher"``                   how blocks are stored: 0 as they
                                            are, 2 sealed (``swapfs/engine/sealing.py``;
                                            1 in format 3 only)
            ``b"key_id"``                   the master key's id, if sealed
                                            (``swapfs/engine/keys.py``)
            ``b"uuid"``                     the state's UUID (16 bytes), to
                                            which the key wrap is bound
            ``b"lease_generation"``         the generation of the lease of the
                                            last holder that wrote, if any
                                            (``swapfs/engine/lease.py``)
inodes      ino (u64)                       :class:`Inode` record
dirents     parent ino (u64) + name         child ino (u64)
chains      chain id (u32)                  :class:`Chain` record
slots       chain id (u32) + run (u32)      a run of the chain's slot table
                                            (``swapfs/engine/slottable.py``)
filemaps    ino (u64) + run (u32)           a run of the file's block map
                                            (``swapfs/engine/filemap.py``)
mapdirs     ino (u64)                       the file's run directory: a bitmap
                                            of the runs of its map present in
                                            ``filemaps`` (format 5)
orphans     ino (u64)                       nothing: unlinked, still open
damaged     chain id (u32) + slot (u32)     nothing: a used slot whose data was
                                            found not to match its digest, set
                                            aside so that no write dedups onto it
priorities  ino (u64)                       the file's priority (i32); absent
                                            means 0 (``swapfs priority``)
==========  ==============================  ==================================

Every value ends in a CRC-32 of its database's tag, its key and itself
(:func:`checksummed`), except the runs of ``slots``, whose entries carry one each:
a value that does not verify is :class:`CorruptIndex` (EIO), so a flipped
bit reads as an error, never as other data. CRC-32 detects every error of
up to 32 consecutive bits, so every single bit flip.

Invariants (``fsck`` checks each one):

* A slot's refcount is the number of ``filemaps`` entries, over all files
  of its chain, that name it. A slot with refcount 0 is free.
* Holes (never written, written as zeros, discarded) map to no slot, and a
  run of a file's map with no slot in it has no entry.
* ``Inode.blocks`` is the number of mapped blocks of that file, which is how
  a lost run of its map is noticed.
* A file's directory (``mapdirs``) names exactly the runs of its map present
  in ``filemaps``, and a file with no run has none: a run it names that
  LMDB lacks is lost, which a read finds without reading the other runs.
* The slot table of a chain has every run below ``Chain.next_slot``.
* ``Chain.stored`` is the number of the chain's slots with a refcount above
  zero, so that an open knows it without reading the slot table.
* A ``priorities`` entry names an existing file; deleting a file deletes it.
"""

import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
from zlib_ng.zlib_ng import crc32

from swapfs.engine import checkpoint, cleanmark, journal
from swapfs.engine.errors import CorruptIndex, SwapfsError
from swapfs.engine.store import preallocate

log = logging.getLogger(__name__)

FORMAT_VERSION = 5
#: A chain record of format 4 did not count its stored blocks.
STORED_UNKNOWN = -1
#: The meta record of the generation of the lease of the last holder that
#: wrote the index (Index.generation); readers that do not know it ignore it.
LEASE_GENERATION = b"lease_generation"
ROOT_INO = 1

KIND_DIR = 1
KIND_FILE = 2

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_CHAIN_RUN = struct.Struct(">II")
_INO_RUN = struct.Struct(">QI")
CRC_SIZE = 4


def checksummed(tag: int, key: bytes, payload: bytes) -> bytes:
    """*payload* followed by the CRC-32 of the database *tag*, *key* and itself."""
    return payload + _U32.pack(crc32(payload, crc32(key, tag)))


def verified(tag: int, key: bytes, raw: bytes, what: str) -> bytes:
    """The payload of a checksummed value; CorruptIndex unless its checksum matches."""
    payload = raw[:-CRC_SIZE]
    if len(raw) < CRC_SIZE or _U32.unpack_from(raw, len(payload))[0] != crc32(
            payload, crc32(key, tag)):
        raise CorruptIndex(f"the index record of {what} is corrupt")
    return payload


# Each database's tag, so that a record copied under another database's key
# does not verify.
(_META, _INODES, _DIRENTS, _CHAINS, _ORPHANS, _PRIORITIES, _FILEMAPS, _DAMAGED,
 _MAPDIRS) = range(1, 10)
#: The databases of checksummed records, by name (the slot table's entries are
#: checked one by one instead: swapfs/engine/slottable.py).
_CHECKSUMMED = {b"meta": _META, b"inodes": _INODES, b"dirents": _DIRENTS, b"chains": _CHAINS,
           b"orphans": _ORPHANS, b"priorities": _PRIORITIES, b"filemaps": _FILEMAPS,
           b"damaged": _DAMAGED, b"mapdirs": _MAPDIRS}


@dataclass(slots=True)
class Inode:
    """A directory (the root or a chain) or a swap file."""

    ino: int
    kind: int  # KIND_DIR or KIND_FILE
    mode: int  # permission bits and file type, as st_mode
    uid: int
    gid: int
    chain: int  # the chain a file or chain directory belongs to; 0 for the root
    size: int = 0  # apparent size in bytes (files only)
    blocks: int = 0  # number of mapped (non-zero) logical blocks (files only)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    _FORMAT = struct.Struct(">BIIIIQQqqq")

    def pack(self) -> bytes:
        return self._FORMAT.pack(
            self.kind, self.mode, self.uid, self.gid, self.chain, self.size,
            self.blocks, self.atime_ns, self.mtime_ns, self.ctime_ns,
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> "Inode":
        return cls(ino, *cls._FORMAT.unpack(raw))

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR


@dataclass(slots=True)
class Chain:
    """A clone chain: the dedup domain whose blocks share one data file."""

    id_: int
    #: 32 bytes: the chain's BLAKE3 key in a plain state; in an encrypted
    #: one, its secret wrapped by the master key (swapfs/engine/keys.py).
    key: bytes
    next_slot: int = 0  # slots below this have been handed out at least once
    #: Slots with a refcount above zero (format 5; an index of format 4
    #: reads as STORED_UNKNOWN until its conversion counts them).
    stored: int = 0

    _FORMAT = struct.Struct(">32sQQ")
    _FORMAT_4 = struct.Struct(">32sQ")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.key, self.next_slot, self.stored)

    @classmethod
    def unpack(cls, id_: int, raw: bytes) -> "Chain":
        if len(raw) == cls._FORMAT_4.size:
            key, next_slot = cls._FORMAT_4.unpack(raw)
            return cls(id_, key, next_slot, STORED_UNKNOWN)
        return cls(id_, *cls._FORMAT.unpack(raw))


#: The database of the files' maps: ``filemaps`` in this format, ``maps`` in
#: format 1. :class:`IndexSpace` counts whichever the index has as map bytes.
MAP_DATABASES = ("maps", "filemaps")


@dataclass(slots=True)
class IndexSpace:
    """The index's pages in use, in bytes, by what holds them.

    A logical block costs a map entry; a stored block the rest (its entry
    in the chain's slot table, and a share of the few per-file and
    per-chain records). So the two figures per block are the
    maps' bytes over the mapped blocks and the other trees' over the stored
    blocks. The databases are the ones the index lists, not a list
    of this format's, so that the figures compare across formats.
    """

    #: Each named database's B+ tree (branch, leaf and overflow pages), by name.
    databases: dict[str, int]
    #: The main database's tree: the names and roots of the named ones.
    main_bytes: int
    #: Every page up to the highest in use (:meth:`Index.file_bytes`).
    file_bytes: int

    @property
    def maps_bytes(self) -> int:
        return sum(self.databases.get(name, 0) for name in MAP_DATABASES)

    @property
    def other_bytes(self) -> int:
        """Every tree but the maps: the other named databases and the main one."""
        return sum(self.databases.values()) - self.maps_bytes + self.main_bytes

    @property
    def unused_bytes(self) -> int:
        """Pages below the highest in use that no named or main tree holds:
        mostly pages that commits freed and later ones reuse, with LMDB's
        two meta pages and its free list's own tree (the lmdb module has no
        handle to that tree, so its pages are not counted apart)."""
        return self.file_bytes - sum(self.databases.values()) - self.main_bytes

    def figures(self, logical_blocks: int, stored_blocks: int) -> dict[str, Any]:
        """The report of ``swapfs stats``: bytes per database and per block,
        given the mapped blocks of every file and the stored blocks of every
        chain (None per block when there are none)."""
        return {
            "databases": dict(sorted(self.databases.items())),
            "main_bytes": self.main_bytes,
            "unused_bytes": self.unused_bytes,
            "maps_bytes": self.maps_bytes,
            "other_bytes": self.other_bytes,
            "logical_blocks": logical_blocks,
            "stored_blocks": stored_blocks,
            "bytes_per_logical_block":
                self.maps_bytes / logical_blocks if logical_blocks else None,
            "bytes_per_stored_block":
                self.other_bytes / stored_blocks if stored_blocks else None,
        }


def _tree_bytes(stat: Mapping[str, int]) -> int:
    """Bytes of the pages of one database's B+ tree, from LMDB's stat of it."""
    return stat["psize"] * (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])


#: The index's map (and data file) is a multiple of this, at least one; it
#: grows by this much, or by a quarter of its size if that is more.
MAP_STEP = 1 << 20


#: keep_room looks at the room left once every this many calls.
KEEP_ROOM_EVERY = 8


def recorded_generation(path: Path) -> int:
    """The lease generation the index in *path* records (Index.generation),
    0 for none or no index; read before its lease is taken, so without
    LMDB's lock file and without writing anything (an offline command asks
    whether the state was shared: swapfs.engine.lease.Offline). An index
    whose meta pages LMDB refuses (damaged; ``fsck --repair`` writes them
    back from the clean mark) counts as 0: the lease file alone then says
    whether the state is shared."""
    if not (path / "data.mdb").is_file():
        return 0
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16, readahead=False)
    except lmdb.InvalidError:
        return 0
    try:
        with env.begin() as txn:
            try:
                meta = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.NotFoundError:
                return 0
            raw = txn.get(LEASE_GENERATION, db=meta)
            if raw is None:
                return 0
            payload = verified(_META, LEASE_GENERATION, raw, "the counter lease_generation")
            return int(_U64.unpack(payload)[0])
    finally:
        env.close()


def _map_steps(size: int) -> int:
    return MAP_STEP * max(1, -(-size // MAP_STEP))


#: What the overlay holds for a key deleted there.
_GONE = None
#: A patch's value: the offset in the payload, then the bytes written there.
_OFFSET = struct.Struct("<I")
#: The bytes of values the overlay holds before LMDB commits the batch with
#: them: what it costs in memory, and what a commit has to put at once.
OVERLAY_BYTES = 8 << 20
#: What the overlay reckons a value takes in the map beyond its own bytes:
#: pages of the tree on its path, made anew when it is put.
OVERLAY_PAGES_PER_VALUE = 3
#: Room in the map the overlay's reckoning leaves alone: LMDB's own pages
#: at a commit (its free list, the meta pages).
OVERLAY_SLACK = 64 << 12


class _BatchView:
    """The batch as its write transactions left it: LMDB's transaction,
    under the overlay of the values they put or deleted that are not in it
    yet (Index.overlay). A write transaction changes only the overlay and
    the journal: a value that a thousand writes of a batch change is put
    in LMDB once, when the batch commits or the overlay is full."""

    __slots__ = ("index", "raw", "overlay")

    def __init__(self, index: "Index") -> None:
        self.index = index
        self.raw = index._batch
        self.overlay = index.overlay

    def get(self, key: bytes, db: Any = None) -> bytes | None:
        held = self.overlay.get(id(db))
        if held is not None and key in held:
            return held[key]
        return self.raw.get(key, db=db)

    def pending(self, db: Any, prefix: bytes, start: bytes) -> list[tuple[bytes, bytes | None]]:
        """The overlay's entries of *db* whose key starts with *prefix*, from
        *start* on, in key order."""
        held = self.overlay.get(id(db))
        if not held:
            return []
        start = max(start, prefix)
        return sorted(item for item in held.items()
                      if item[0] >= start and item[0].startswith(prefix))

    def cursor(self, db: Any = None) -> Any:
        """LMDB's cursor, for a walk outside the accessors (an upgrade, a
        reseal): the overlay's values of *db* go into LMDB first."""
        if self.overlay.get(id(db)):
            self.index.settle()
        return self.raw.cursor(db=db)

    def stat(self, db: Any) -> dict[str, int]:
        return self.raw.stat(db)


class _Recorder(_BatchView):
    """A write transaction's view of the batch: its puts and deletes go to
    the overlay, and are noted for the journal (swapfs/engine/journal.py),
    a changed run of a map or a slot table as the entries that changed
    (:meth:`patch`). Any other change, a database the journal does not
    name, or more than the journal holds leaves it unjournaled (``ops``
    None): the overlay goes into LMDB's transaction, and its commit is LMDB's."""

    __slots__ = ("names", "ops", "bytes")

    def __init__(self, index: "Index") -> None:
        super().__init__(index)
        self.names = index._names
        self.ops: list[journal.Op] | None = []
        self.bytes = 0

    def _journaled(self, db: Any, size: int) -> bytes | None:
        """The name of *db* if a change of *size* bytes to it can be
        journaled; None, the transaction unjournaled, if not."""
        if self.ops is None:
            return None
        name = self.names.get(id(db))
        self.bytes += size
        if name is None or self.bytes > journal.JOURNAL_BYTES:
            self.unjournal()
            return None
        return name

    def _hold(self, db: Any, key: bytes, value: bytes | None) -> None:
        held = self.overlay.get(id(db))
        if held is None:
            held = self.overlay[id(db)] = {}
        size = len(held)
        held[key] = value
        if len(held) != size:
            # What it may take in the map when it is put: a bound, so that
            # a batch acknowledged is a batch LMDB has room for.
            self.index.overlay_bytes += self.index.value_room(key, value)

    def unjournal(self) -> None:
        """Make this transaction LMDB's to commit: the overlay goes into
        LMDB's transaction, and every change after it too."""
        if self.ops is not None:
            self.ops = None
            self.index.settle()

    def put(self, key: bytes, value: bytes, db: Any = None, **flags: Any) -> bool:
        if not flags:
            name = self._journaled(db, len(key) + len(value))
            if name is not None:
                key, value = bytes(key), bytes(value)
                self.ops.append((journal.PUT, name, key, value))  # type: ignore[union-attr]
                self._hold(db, key, value)
                return True
        self.unjournal()
        return bool(self.raw.put(key, value, db=db, **flags))

    def patch(self, key: bytes, value: bytes, changes: list[tuple[int, bytes]],
              db: Any = None) -> None:
        """Put *value* in place of the one *key* has, which differs from it
        only in the *changes* (offset in the payload, bytes there): what
        the journal names."""
        name = self._journaled(db, len(key) + sum(len(data) + 4 for _, data in changes))
        if name is None:
            self.raw.put(key, value, db=db)
            return
        ops = self.ops
        for offset, data in changes:
            ops.append((journal.PATCH, name, key,  # type: ignore[union-attr]
                        _OFFSET.pack(offset) + data))
        self._hold(db, key, bytes(value))

    def delete(self, key: bytes, value: bytes = b"", db: Any = None) -> bool:
        if not value:
            name = self._journaled(db, len(key))
            if name is not None:
                key = bytes(key)
                existed = self.get(key, db) is not None
                self.ops.append((journal.DELETE, name, key, b""))  # type: ignore[union-attr]
                self._hold(db, key, _GONE)
                return existed
        self.unjournal()
        return bool(self.raw.delete(key, value, db=db))

    def drop(self, db: Any, delete: bool = True) -> None:
        self.unjournal()
        self.raw.drop(db, delete=delete)


def _apply(raw: Any, named: dict[bytes, Any], records: list[list[journal.Op]]) -> None:
    """Make the changes of a batch's journal records in LMDB transaction
    *raw*: each record's in order, in memory, then every value changed put
    once (a patch changes the payload in memory and is checksummed at the
    end), so that taking up a full journal costs a put per value it
    names, not one per change."""
    values: dict[tuple[bytes, bytes], bytes | bytearray | None] = {}
    lost: set[tuple[bytes, bytes]] = set()
    for ops in records:
        for kind, name, key, value in ops:
            at = (name, key)
            if kind != journal.PATCH:
                values[at] = value if kind == journal.PUT else None
                lost.discard(at)
                continue
            if at in lost:
                continue
            current = values[at] if at in values else raw.get(key, db=named[name])
            payload = _payload(name, key, current)
            if payload is None or len(value) < _OFFSET.size:
                log.warning("a journal record patches %s key %s, which is missing or "
                            "damaged: that change is lost", name.decode(), key.hex())
                values.pop(at, None)
                lost.add(at)
                continue
            (offset,) = _OFFSET.unpack_from(value)
            data = value[_OFFSET.size:]
            if len(payload) < offset + len(data):
                payload.extend(bytes(offset + len(data) - len(payload)))
            payload[offset:offset + len(data)] = data
            values[at] = payload
    for (name, key), made in sorted(values.items()):
        db = named[name]
        if made is None:
            raw.delete(key, db=db)
        elif isinstance(made, bytearray):
            tag = _CHECKSUMMED.get(name)
            raw.put(key, bytes(made) if tag is None else checksummed(tag, key, bytes(made)),
                    db=db)
        else:
            raw.put(key, made, db=db)


def _payload(name: bytes, key: bytes, value: bytes | bytearray | None) -> bytearray | None:
    """A value's payload to patch in place: *value* itself if it is one
    already (a bytearray), else the payload of the value as stored, None if
    it is missing or does not verify."""
    if value is None or isinstance(value, bytearray):
        return value
    tag = _CHECKSUMMED.get(name)
    if tag is None:
        return bytearray(value)
    try:
        return bytearray(verified(tag, key, value, ""))
    except CorruptIndex:
        return None


class Index:
    """The LMDB environment and its named databases.

    LMDB runs with ``writemap``: a transaction writes its pages straight into
    the shared memory map of the data file, instead of into copies that the
    commit then writes out with a system call each (about a fifth of the
    cost of a 4 KiB overwrite: docs/performance.md). Through a memory map,
    writing into a hole of a full file system is SIGBUS, not ENOSPC, so the
    data file never has holes: it is the map's size, allocated in full on
    disk (fallocate) as soon as it is opened. :meth:`keep_room` grows it
    ahead of need; when a transaction finds it full all the same
    (MDB_MAP_FULL, before it wrote anything) :meth:`grow` allocates the new
    room before mapping it, answering ENOSPC if the file system has none.
    (On a copy-on-write file system such as btrfs, allocated space is no
    promise of room for a write: keep the state elsewhere.)
    """

    def __init__(self, path: Path, guard: Callable[[], None] | None = None,
                 generation: int = 0, roll_back: bool = True) -> None:
        """Open (or create) the index in *path*. One left by a process of an
        earlier boot, not closed cleanly, is rolled back to its checkpoint
        first if *roll_back* allows (swapfs/engine/checkpoint.py)."""
        self.path = path
        #: Raises (EROFS) when this process may not write the state now: the
        #: lease's check (swapfs/engine/lease.py), made at every write transaction.
        self.guard = guard
        #: The generation of the lease this process holds, 0 for none. The
        #: first write transaction of each batch records it in the meta
        #: database; one that finds a higher generation there refuses (EROFS):
        #: a holder that took the state over since has written it, so this
        #: write would be a late one.
        self.generation = generation
        data = path / "data.mdb"
        try:
            used = data.stat().st_size
        except FileNotFoundError:
            used = 0
        self.map_size = _map_steps(used)
        #: The checkpoint in force (None before the first), and what the
        #: open did to reach it.
        self.checkpointed: checkpoint.Record | None = None
        self.rolled_back: str | None = None
        #: Whether the open may write: roll back, checkpoint, mark clean. A
        #: read-only check (fsck without --repair) leaves an index a crash
        #: left as it found it, so that the next open still rolls it back.
        self._roll_back = roll_back
        #: Whether the index was closed cleanly (or is new).
        self.clean_at_open = True
        if used:
            self.clean_at_open = cleanmark.check_and_clear(path)
            self.checkpointed, self.rolled_back = checkpoint.at_open(
                path, self.clean_at_open, roll_back)
        #: The read transaction that keeps the checkpoint's tree whole.
        self._pin: lmdb.Transaction | None = None
        #: Flushes the data files before a checkpoint, and hears of each one
        #: taken (State sets them: the slots freed so far become reusable).
        self.flush_data: Callable[[], None] = lambda: None
        self.checkpoint_taken: Callable[[], None] = lambda: None
        #: Commits since the last checkpoint; 1 for an index a crash left
        #: (opened to be written), whose last commits may not be on disk.
        self.commits = 1 if roll_back and not self.clean_at_open else 0
        #: Whether the tree of the checkpoint in force is the one LMDB opened:
        #: it was closed cleanly, or rolled back. Then it is pinned at once;
        #: otherwise (a crash in this boot: commits since the checkpoint are
        #: in the page cache) the first write transaction takes a checkpoint
        #: first, since its commits could reuse the checkpoint's pages.
        self._unprotected = roll_back and not self.clean_at_open and not self.rolled_back
        # sync=False: a commit reaches the page cache, which a crash of this
        # process cannot lose; fsync(2) on a swap file and unmount flush it to
        # disk (see docs/write-ordering.md).
        # The directory first: LMDB would make it with the files' mode, 0600.
        path.mkdir(mode=0o700, exist_ok=True)
        self.env = lmdb.open(
            str(path), map_size=self.map_size, max_dbs=16, sync=False, metasync=False,
            readahead=False, writemap=True, mode=0o600,
        )
        try:
            self._fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
            try:
                # LMDB made the file as big as the map: allocate it before
                # anything writes to it.
                preallocate(self._fd, 0, self.map_size)
            except OSError as exc:
                os.close(self._fd)
                raise SwapfsError(exc.errno or errno.EIO,
                                  f"no room for the index ({self.map_size} bytes): {exc}"
                                  ) from exc
        except BaseException:
            self.env.close()
            raise
        self._page_size = self.env.stat()["psize"]
        if not self._unprotected and self.checkpointed is not None:
            self._pin = self.env.begin()
        #: The main database, whose keys are the names of the named ones.
        self.main = self.env.open_db(None)
        #: The handles of the named databases opened here, by name.
        self.named: dict[bytes, Any] = {}
        self.meta = self._open(b"meta")
        self.inodes = self._open(b"inodes")
        self.dirents = self._open(b"dirents")
        self.chains = self._open(b"chains")
        self.slots = self._open(b"slots")
        self.filemaps = self._open(b"filemaps")
        self.orphans = self._open(b"orphans")
        self.damaged = self._open(b"damaged")
        self.priorities = self._open(b"priorities")
        self.mapdirs = self._open(b"mapdirs")
        #: Why writes are refused (see fence); None while they are allowed.
        self.fenced: str | None = None
        #: Inodes read or written since they were last verified, by number:
        #: the committed records plus the changes of the write transaction
        #: in progress, forgotten whole when one aborts (Txn.get_inode).
        self.inode_cache: dict[int, Inode] = {}
        #: Inodes whose timestamps alone changed since they were last put,
        #: by number (Txn.touch_inode): put when the batch next settles.
        self.lazy_times: dict[int, Inode] = {}
        #: The write transaction in progress, if any: what is read on demand
        #: while it runs (a slot table's runs) must see its changes.
        self.writer: Txn | None = None
        #: Checksummed values read so far (Txn's gets and scans): what tests
        #: count to show that a cost does not grow with the state.
        self.values_read = 0
        self._calls = 0  # of keep_room
        #: The LMDB write transaction that the write transactions of a batch
        #: share (swapfs/engine/journal.py), None between batches; LMDB's
        #: last transaction id when it began; whether the lease generation
        #: was checked in it.
        self._batch: Any = None
        self._base = 0
        #: What the batch's write transactions put (a value) or deleted
        #: (None) that is not in LMDB's transaction yet, by database (the
        #: id of its handle) and key; and the most that may take in the map
        #: (Index.value_room of each, and of each inode in lazy_times).
        self.overlay: dict[int, dict[bytes, bytes | None]] = {}
        self.overlay_bytes = 0
        #: What the batch may put in the map, as LMDB said when it began.
        self._room = 0
        self._generation_checked = False
        #: What each write transaction of the batch changed, in order. While
        #: LMDB's transaction is given up (an abort, a full map), these are
        #: made again in a new one before anything reads the index.
        self._records: list[list[journal.Op]] = []
        self._names = {id(handle): name for name, handle in self.named.items()
                       if journal.journaled(name)}
        self.journal: journal.Journal | None = None
        #: Whether the records were taken up from the journal at the open:
        #: LMDB commits them as soon as they are made again, so that records
        #: past the first one that did not follow are dead for good.
        self._taken_up = False
        self._open_journal()

    def _open_journal(self) -> None:
        """Open the journal; take up the batch a killed process of this boot
        left in it (made again at the first transaction, once the state has
        hooked its checkpoints). A read-only check makes them too, in a
        transaction it never commits: it checks the index as the next open
        will find it."""
        boot = checkpoint.boot_id()
        try:
            self.journal = journal.Journal(self.path, boot, writable=self._roll_back)
        except FileNotFoundError:
            return  # read-only, and nothing ever wrote one
        except OSError as exc:
            log.warning("%s: no journal (%s): every write transaction commits in LMDB",
                        self.path, exc)
            try:  # what a killed process left in it is still taken up
                reader = journal.Journal(self.path, boot, writable=False)
            except OSError:
                return
            try:
                self._take_up(reader)
            finally:
                reader.close()
            return
        self._take_up(self.journal)

    def _take_up(self, source: journal.Journal) -> None:
        if self.clean_at_open or self.rolled_back:
            return  # a clean close committed the last batch; a rollback left it
        self._base = int(self.env.info()["last_txnid"])
        self._records = list(source.records(self._base))
        if not self._records:
            return
        log.info("%s: %d write transactions of the journal to make again", self.path,
                 len(self._records))
        self._taken_up = True
        # The killed process's commits since its checkpoint may have freed
        # pages of the checkpoint's tree, which making the records again
        # could write over: a checkpoint of the tree as it is comes first,
        # in a read-only check too.
        self._unprotected = True

    def _open(self, name: bytes) -> Any:
        handle = self.named[name] = self.env.open_db(name)
        return handle

    def check_write(self) -> None:
        """Raise EROFS unless this process may write the state now: not
        fenced, and the guard (the lease) agrees, read at this moment."""
        if self.fenced is not None:
            raise SwapfsError(errno.EROFS, self.fenced)
        if self.guard is not None:
            self.guard()

    def begin(self, write: bool = False) -> "Txn":
        """A transaction. A write transaction joins the batch (LMDB's write
        transaction, begun if none is open); a read transaction reads
        through the batch while one is open, so that it sees every write
        transaction's changes."""
        if write:
            self.check_write()
        if self._batch is None and (write or self._records):
            self._open_batch()
        if write:
            if self.generation and not self._generation_checked:
                self._check_generation()
            txn = Txn(self, _Recorder(self), write=True)
            self.writer = txn
            return txn
        if self._batch is not None:
            return Txn(self, _BatchView(self), shared=True)
        return Txn(self, self.env.begin())

    def _open_batch(self) -> None:
        """Begin LMDB's write transaction for a batch and make in it again
        the changes of the batch's write transactions so far, growing the
        map if it is too small for them."""
        if self._unprotected:
            # Commits of this boot since the checkpoint may not be on disk,
            # and this batch could reuse the checkpoint's pages.
            self._checkpoint_tree(cover=not self._records)
        while True:
            batch = self.env.begin(write=True)
            try:
                _apply(batch, self.named, self._records)
            except lmdb.MapFullError:
                batch.abort()
                self._resize()
                continue
            except BaseException:
                batch.abort()
                raise
            break
        self._batch = batch
        self._base = batch.id() - 1
        self._generation_checked = False
        self._taken_up = False
        if self._records and self._roll_back and self.writable():
            # Committed at once: the room the map has left is then LMDB's
            # to say, for the overlay's reckoning below.
            self.flush()
            self._batch = self.env.begin(write=True)
            self._base = self._batch.id() - 1
        self._room = self.map_size - self.file_bytes() - OVERLAY_SLACK

    def _give_up_batch(self) -> None:
        """Abort LMDB's transaction and drop the overlay; the journal's
        records are kept, to be made again in the next one."""
        self.overlay.clear()
        self.overlay_bytes = 0
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.abort()

    def write_committed(self, recorder: _Recorder) -> None:
        """A write transaction of the batch commits: its record is appended
        to the journal; or, when the journal cannot name it or has no room
        left, LMDB commits the batch with it. On an error, nothing of it
        happened (lmdb.MapFullError for the caller to grow the index and try
        again)."""
        # A full overlay commits the batch, before this write is
        # acknowledged: should the map have no room for it, this write is
        # the one refused, and those before it were reckoned to fit.
        if (recorder.ops is not None and self.journal is not None
                and self.overlay_bytes <= min(OVERLAY_BYTES, self._room)
                and self.journal.append(self._base, recorder.ops)):
            self._records.append(recorder.ops)
            return
        self.settle()
        batch, self._batch = self._batch, None
        batch.commit()  # should it fail, LMDB aborts it: the records are made again
        self._batch_committed()

    def value_room(self, key: bytes, value: bytes | None) -> int:
        """The most a value put (or deleted) can take in the map."""
        size = len(key) + (0 if value is None else len(value))
        return size + OVERLAY_PAGES_PER_VALUE * self._page_size

    def settle(self) -> None:
        """Put the overlay's values into LMDB's transaction, in key order.
        On an error (lmdb.MapFullError: the map has no room) the batch is
        given up, its records to be made again in the next one."""
        batch = self._batch
        try:
            for db_id, held in self.overlay.items():
                db = self.named[self._names[db_id]]
                for key in sorted(held):
                    value = held[key]
                    if value is None:
                        batch.delete(key, db=db)
                    else:
                        batch.put(key, value, db=db)
            for ino in sorted(self.lazy_times):
                key = _U64.pack(ino)
                batch.put(key, checksummed(_INODES, key, self.lazy_times[ino].pack()),
                          db=self.inodes)
        except BaseException:
            self._give_up_batch()
            raise
        self.overlay.clear()
        self.overlay_bytes = 0
        self.lazy_times.clear()

    def write_aborted(self) -> None:
        """A write transaction of the batch aborts: LMDB's transaction goes
        with its changes; the next begin makes the earlier ones again."""
        self._give_up_batch()

    def _batch_committed(self) -> None:
        self._records = []
        if self.journal is not None:
            self.journal.restart()

    def flush(self) -> None:
        """Commit the batch, if one is open or waits to be made again (not
        in a read-only check, whose batch only shows the journal's changes)."""
        while self._roll_back and (self._batch is not None or self._records):
            if self._batch is None:
                self._open_batch()
            self.check_write()
            try:
                self.settle()
            except lmdb.MapFullError:
                self._resize()
                continue
            batch, self._batch = self._batch, None
            try:
                batch.commit()
            except lmdb.MapFullError:
                self._resize()
                continue
            self._batch_committed()

    def _check_generation(self) -> None:
        """Refuse to write if a later lease holder has written the index;
        record this holder's generation if it is the first to write. Once
        a batch, in LMDB's transaction."""
        txn = Txn(self, self._batch, shared=True)
        try:
            recorded = txn.get_meta(LEASE_GENERATION) or 0
            if recorded > self.generation:
                raise SwapfsError(errno.EROFS, f"{self.path} was written under lease generation "
                                  f"{recorded}, after this holder's {self.generation}: "
                                  "another host owns the state now")
            if recorded < self.generation:
                txn.put_meta(LEASE_GENERATION, self.generation)
        except BaseException:
            self._give_up_batch()
            raise
        self._generation_checked = True

    def recorded_generation(self) -> int:
        """The lease generation of the index's last writer, 0 for none: LMDB's
        last commit says it (no journal record names one), read without
        taking up the batch, which the state has not hooked yet."""
        with Txn(self, self.env.begin()) as txn:
            return txn.get_meta(LEASE_GENERATION) or 0

    def fence(self, reason: str) -> None:
        """Refuse every write from now on (EROFS): this process may no longer
        own the state, because its lease lapsed and another host may hold it."""
        self.fenced = reason

    def writable(self) -> bool:
        """May this process write the state now (not fenced, the guard agrees)?"""
        if self.fenced is not None:
            return False
        try:
            if self.guard is not None:
                self.guard()
        except SwapfsError:
            return False
        return True

    def keep_room(self) -> None:
        """Grow the map ahead of need when less than a quarter of it (and at
        least MAP_STEP) is left above the highest page in use, so that a
        transaction seldom finds it full and has to run again. A disk with
        no room for that is no error yet: the transaction that needs the room
        will get ENOSPC. The batch is committed first: LMDB resizes its map
        only with no transaction open. No write transaction may be in progress.

        Asking LMDB costs as much as a small request, so only every
        KEEP_ROOM_EVERY-th call looks: the room kept ahead (MAP_STEP at
        least, 256 pages) outlasts that many requests, and one that finds
        the map full all the same runs again after Index.grow.
        """
        self._calls += 1
        if self._calls % KEEP_ROOM_EVERY:
            return
        room = self.map_size - self.file_bytes() - self.overlay_bytes
        if room < max(MAP_STEP, self.map_size // 4):
            try:
                self.flush()
                self.grow()
            except SwapfsError as exc:
                log.debug("%s", exc)
            except lmdb.Error as exc:  # the batch's records wait to be made again
                log.warning("%s: the batch did not commit: %s", self.path, exc)

    def grow(self) -> None:
        """Make the map bigger, after a transaction found it full: allocate
        the new room on disk first (SwapfsError ENOSPC if the file system has
        none), then map it; refused (EROFS) when this process may not write
        the state now. No write transaction may be in progress."""
        self.check_write()
        self._resize()

    def _resize(self) -> None:
        size = _map_steps(max(self.map_size + MAP_STEP, self.map_size * 5 // 4))
        try:
            preallocate(self._fd, self.map_size, size - self.map_size)
        except OSError as exc:
            raise SwapfsError(exc.errno or errno.EIO,
                              f"the index cannot grow to {size} bytes: {exc}") from exc
        # LMDB resizes its map only with no transaction open: the batch's
        # write transactions are made again in the next one.
        self._give_up_batch()
        pinned = self._pin is not None
        if pinned:
            # The tree now: pinned again once the map is resized.
            self._checkpoint_tree(cover=not self._records)
        self._unpin()
        self.env.set_mapsize(size)
        log.info("the index grew to %d MiB", size >> 20)
        self.map_size = size
        if pinned:
            self._pin = self.env.begin()

    def checkpoint(self) -> None:
        """Make every commit durable and the tree it left the checkpoint:
        the batch committed, the data files flushed, then the index's
        pages, then its meta pages recorded (swapfs/engine/checkpoint.py),
        and that tree pinned by a read transaction until the next checkpoint."""
        self.flush()
        self._checkpoint_tree(cover=True)

    def _checkpoint_tree(self, cover: bool) -> None:
        """Make LMDB's last commit the checkpoint. Unless *cover*, the slots
        freed so far stay unusable: the batch's write transactions that
        freed them are not in that tree."""
        self.flush_data()
        self.env.sync(True)
        self.checkpointed = checkpoint.taken(self.path, self._page_size, self.checkpointed)
        # The new pin first: should anything above fail, the old one keeps
        # the tree of the checkpoint still in force.
        pin, self._pin = self._pin, self.env.begin()
        if pin is not None:
            pin.abort()
        self.commits = max(1, self.commits) if self._records else 0
        self._unprotected = False
        if cover:
            self.checkpoint_taken()

    def _unpin(self) -> None:
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    def close(self) -> None:
        """Commit the batch, flush and close; then mark the index clean
        (swapfs/engine/cleanmark.py). An index that may not be written any
        more (fenced, or its lease lapsed: another host may own it) is closed
        without any of it."""
        if not self.writable():
            self._give_up_batch()
            self._close_files()
            return
        # A check that wrote nothing leaves an index a crash left as it found
        # it (no checkpoint, no mark), for the next open to roll back.
        synced = False
        if self._roll_back and (self.commits or self._records or self._batch is not None
                                or self.checkpointed is None):
            self.checkpoint()
            synced = True
        self._give_up_batch()  # a read-only check's
        self._close_files()
        if synced or self.clean_at_open:
            cleanmark.mark_clean(self.path, self._page_size)

    def _close_files(self) -> None:
        self._unpin()
        self.env.close()
        os.close(self._fd)
        if self.journal is not None:
            self.journal.close()

    def file_bytes(self) -> int:
        """Bytes of the index's pages in use (the file itself is the whole map)."""
        return int((self.env.info()["last_pgno"] + 1) * self._page_size)


def _merged(stored: Iterator[tuple[bytes, bytes]], pending: list[tuple[bytes, bytes | None]]
            ) -> Iterator[tuple[bytes, bytes]]:
    """The entries of *stored* in key order with *pending*'s (in key order
    too) in place: a pending value replaces the stored one of its key, and
    a pending None deletes it."""
    if not pending:
        yield from stored
        return
    at = 0
    for key, value in stored:
        while at < len(pending) and pending[at][0] < key:
            if pending[at][1] is not None:
                yield pending[at]  # type: ignore[misc]
            at += 1
        if at < len(pending) and pending[at][0] == key:
            if pending[at][1] is not None:
                yield pending[at]  # type: ignore[misc]
            at += 1
            continue
        yield key, value
    for item in pending[at:]:
        if item[1] is not None:
            yield item  # type: ignore[misc]


class Txn:
    """One LMDB transaction with typed, checksummed accessors for every database."""

    __slots__ = ("index", "txn", "write", "shared", "_after", "lenient")

    def __init__(self, index: Index, txn: Any, write: bool = False,
                 shared: bool = False) -> None:
        """*txn* is LMDB's transaction; a write transaction's is the batch's,
        seen through its recorder; a *shared* read transaction reads through
        the batch's, and leaves it open when it ends."""
        self.index = index
        self.write = write
        self.shared = shared
        #: Set by fsck: iterators skip records that do not verify (it reports
        #: them itself) instead of raising CorruptIndex.
        self.lenient = False
        # lmdb's stubs type values as bytes | memoryview; without buffers=True
        # they are always bytes, which is what every accessor below relies on.
        self.txn: Any = txn
        self._after: list[Callable[[bool], None]] = []

    def __enter__(self) -> "Txn":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, lmdb.Error) and not isinstance(exc, lmdb.MapFullError):
            # LMDB's own check of a damaged page (MDB_CORRUPTED,
            # MDB_PAGE_NOTFOUND, ...): the index is damaged, which is EIO.
            raise CorruptIndex(f"LMDB finds the index damaged: {exc}") from exc

    def after(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(committed)`` once this transaction has ended: what
        may happen only after a commit (reusing the slots it freed), or must
        be undone if it aborts, waits for it here."""
        self._after.append(callback)

    def _ended(self, committed: bool) -> None:
        if self.write:
            self.index.writer = None
            if committed:
                self.index.commits += 1
            else:
                # Both may hold this transaction's changes.
                self.index.inode_cache.clear()
                self.index.lazy_times.clear()
        callbacks, self._after = self._after, []
        for callback in callbacks:
            callback(committed)

    @property
    def raw(self) -> lmdb.Transaction:
        """LMDB's transaction itself, for what the accessors do not do
        (opening a database by name). A write transaction that asks for it
        is no longer journaled: its commit is LMDB's, and the batch's
        overlay is in LMDB's transaction from then on."""
        if self.write:
            self.txn.unjournal()
            return self.txn.raw
        if isinstance(self.txn, _BatchView):
            return self.txn.raw
        return self.txn

    def abort(self) -> None:
        if self.write:
            self.index.write_aborted()
        elif not self.shared:
            self.txn.abort()
        self._ended(False)

    def commit(self) -> None:
        """Commit, or raise SwapfsError with nothing changed; lmdb.MapFullError
        as it is, so that the caller can grow the index and try again. A
        write transaction checks again, right before its commit, that this
        process may still write the state (its puts went into the index's
        mapped pages already, and the transaction may have been long):
        refused (EROFS), it is aborted. It then joins the journal, or LMDB
        commits the batch with it (Index.write_committed)."""
        if self.write:
            try:
                self.index.check_write()
            except BaseException:
                self.abort()
                raise
        try:
            if self.write:
                self.index.write_committed(self.txn)
            elif not self.shared:
                self.txn.commit()
        except lmdb.MapFullError:
            self._ended(False)
            raise
        except lmdb.Error as exc:
            self._ended(False)
            raise SwapfsError(self._commit_errno(exc), f"index commit failed: {exc}") from exc
        self._ended(True)

    def _commit_errno(self, exc: lmdb.Error) -> int:
        if isinstance(exc, lmdb.DiskError):
            return errno.ENOSPC
        # LMDB turns a short write of its pages into EIO ("short write,
        # filesystem full?"): on a full file system that is ENOSPC.
        try:
            full = os.statvfs(self.index.path).f_bavail == 0
        except OSError:
            full = False
        return errno.ENOSPC if full else errno.EIO


    # -- checksummed records ----------------------------------------------------

    def _get(self, db: Any, tag: int, key: bytes, what: str) -> bytes | None:
        raw = self.txn.get(key, db=db)
        if raw is None:
            return None
        self.index.values_read += 1
        return verified(tag, key, raw, what)

    def _put(self, db: Any, tag: int, key: bytes, payload: bytes) -> None:
        self.txn.put(key, checksummed(tag, key, payload), db=db)

    def _scan(self, db: Any, prefix: bytes, start: bytes = b""
              ) -> Iterator[tuple[bytes, bytes]]:
        """(key, raw value) of the entries whose key starts with *prefix*,
        from *start* (default: the prefix) on, in key order: LMDB's, and
        in a batch the overlay's over them."""
        txn = self.txn
        if isinstance(txn, _BatchView):
            pending, txn = txn.pending(db, prefix, start), txn.raw
        else:
            pending = []
        with txn.cursor(db=db) as cur:
            stored = cur if cur.set_range(start or prefix) else iter(())
            for key, raw in _merged(stored, pending):
                if not key.startswith(prefix):
                    return
                self.index.values_read += 1
                yield key, raw

    def _iter(self, db: Any, tag: int, prefix: bytes = b"", start: bytes = b""
              ) -> Iterator[tuple[bytes, bytes]]:
        """(key, payload) of the checksummed records of :meth:`_scan`."""
        for key, raw in self._scan(db, prefix, start):
            try:
                yield key, verified(tag, key, raw, f"key {key.hex()}")
            except CorruptIndex:
                if not self.lenient:
                    raise

    def corrupt_records(self) -> list[tuple[str, bytes]]:
        """(database, key) of every checksummed record that does not verify."""
        found = []
        for name, tag in _CHECKSUMMED.items():
            for key, raw in self._scan(self.index.named[name], b""):
                try:
                    verified(tag, key, raw, "")
                except CorruptIndex:
                    found.append((name.decode(), key))
        return found

    # -- space ----------------------------------------------------------------

    def space(self) -> IndexSpace:
        """The bytes each database's pages take, as this transaction sees
        them: every database the main one names, opened here if this format
        does not open it (a database of another format)."""
        index = self.index
        txn: Any = self.raw  # a batch's as LMDB holds it, the overlay's not counted
        with txn.cursor(db=index.main) as cur:
            names = list(cur.iternext(values=False))
        databases = {}
        for name in names:
            handle = index.named.get(name)
            if handle is None:
                handle = index.env.open_db(name, txn=txn, create=False)
            databases[name.decode()] = _tree_bytes(txn.stat(handle))
        return IndexSpace(databases, _tree_bytes(txn.stat(index.main)), index.file_bytes())

    # -- meta ---------------------------------------------------------------

    def get_meta(self, name: bytes) -> int | None:
        raw = self._get(self.index.meta, _META, name, f"the counter {name.decode()}")
        return None if raw is None else int(_U64.unpack(raw)[0])

    def put_meta(self, name: bytes, value: int) -> None:
        self._put(self.index.meta, _META, name, _U64.pack(value))

    def get_state_id(self) -> bytes | None:
        """The state's UUID (format 4 on), which the chain keys' wrap is bound to."""
        return self._get(self.index.meta, _META, b"uuid", "the state's UUID")

    def put_state_id(self, state_id: bytes) -> None:
        self._put(self.index.meta, _META, b"uuid", state_id)

    def next_id(self, name: bytes) -> int:
        value = self.get_meta(name)
        if value is None:
            raise CorruptIndex(f"the index has no {name.decode()} counter")
        self.put_meta(name, value + 1)
        return value

    # -- inodes and directory entries ----------------------------------------

    def get_inode(self, ino: int) -> Inode | None:
        """The inode, verified when first read and then kept in memory.

        Every caller that changes an inode puts it back in the same write
        transaction (put_inode), so the object kept is the one the index
        holds; a write transaction that aborts forgets every inode kept.
        """
        cache = self.index.inode_cache
        inode = cache.get(ino)
        if inode is None:
            raw = self._get(self.index.inodes, _INODES, _U64.pack(ino), f"inode {ino}")
            if raw is None:
                return None
            inode = cache[ino] = Inode.unpack(ino, raw)
        return inode

    def put_inode(self, inode: Inode) -> None:
        self._put(self.index.inodes, _INODES, _U64.pack(inode.ino), inode.pack())
        self.index.inode_cache[inode.ino] = inode
        self.index.lazy_times.pop(inode.ino, None)

    def touch_inode(self, inode: Inode) -> None:
        """Keep a change of *inode*'s timestamps alone in memory, where
        every reader through this index sees it, until the batch next
        settles (Index.settle: at the latest its commit, at the next
        checkpoint) rather than journal it with the write that made it.
        Linux's ``lazytime`` does the same: a killed process loses the
        times of its last second of writes, never a block or a size."""
        index = self.index
        index.inode_cache[inode.ino] = inode
        if inode.ino not in index.lazy_times:
            # Put when the batch settles: room the overlay's reckoning keeps.
            index.overlay_bytes += index.value_room(_U64.pack(inode.ino), inode.pack())
        index.lazy_times[inode.ino] = inode

    def delete_inode(self, ino: int) -> None:
        self.txn.delete(_U64.pack(ino), db=self.index.inodes)
        self.index.inode_cache.pop(ino, None)
        self.index.lazy_times.pop(ino, None)

    def iter_inodes(self) -> Iterator[Inode]:
        lazy = self.index.lazy_times
        for key, raw in self._iter(self.index.inodes, _INODES):
            ino = _U64.unpack(key)[0]
            yield lazy.get(ino) or Inode.unpack(ino, raw)

    def get_dirent(self, parent: int, name: bytes) -> int | None:
        raw = self._get(self.index.dirents, _DIRENTS, _U64.pack(parent) + name,
                        f"the entry {name!r} of directory {parent}")
        return None if raw is None else int(_U64.unpack(raw)[0])

    def put_dirent(self, parent: int, name: bytes, ino: int) -> None:
        self._put(self.index.dirents, _DIRENTS, _U64.pack(parent) + name, _U64.pack(ino))

    def delete_dirent(self, parent: int, name: bytes) -> None:
        self.txn.delete(_U64.pack(parent) + name, db=self.index.dirents)

    def iter_dirents(self, parent: int, after: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """Entries of *parent* in name order, starting after the name *after*."""
        prefix = _U64.pack(parent)
        for key, raw in self._iter(self.index.dirents, _DIRENTS, prefix, prefix + after):
            name = key[8:]
            if after and name == after:
                continue
            yield name, int(_U64.unpack(raw)[0])

    def iter_all_dirents(self) -> Iterator[tuple[int, bytes, int]]:
        for key, raw in self._iter(self.index.dirents, _DIRENTS):
            yield int(_U64.unpack(key[:8])[0]), key[8:], int(_U64.unpack(raw)[0])

    # -- chains ---------------------------------------------------------------

    def get_chain(self, chain_id: int) -> Chain | None:
        raw = self._get(self.index.chains, _CHAINS, _U32.pack(chain_id), f"chain {chain_id}")
        return None if raw is None else Chain.unpack(chain_id, raw)

    def put_chain(self, chain: Chain) -> None:
        self._put(self.index.chains, _CHAINS, _U32.pack(chain.id_), chain.pack())

    def delete_chain(self, chain_id: int) -> None:
        self.txn.delete(_U32.pack(chain_id), db=self.index.chains)

    def iter_chains(self) -> Iterator[Chain]:
        for key, raw in self._iter(self.index.chains, _CHAINS):
            yield Chain.unpack(_U32.unpack(key)[0], raw)

    # -- the chains' slot tables (entries checksummed one by one) ---------------

    def put_slot_run(self, chain_id: int, run: int,
                     entries: bytes | bytearray | memoryview) -> None:
        self.txn.put(_CHAIN_RUN.pack(chain_id, run), entries, db=self.index.slots)

    def patch_slot_run(self, chain_id: int, run: int, entries: bytes | bytearray,
                       changes: list[tuple[int, bytes]]) -> None:
        """Put a run whose entries differ from the stored run's only in
        *changes* (offset, bytes): the journal names those alone."""
        self.txn.patch(_CHAIN_RUN.pack(chain_id, run), entries, changes, db=self.index.slots)

    def get_slot_run(self, chain_id: int, run: int) -> bytes | None:
        """One run of the chain's slot table as it is stored, or None."""
        raw = self.txn.get(_CHAIN_RUN.pack(chain_id, run), db=self.index.slots)
        if raw is None:
            return None
        self.index.values_read += 1
        return bytes(raw)

    def iter_slot_runs(self, chain_id: int) -> Iterator[tuple[int, bytes]]:
        """(run, raw entries) of the chain's slot table, in run order."""
        for key, raw in self._scan(self.index.slots, _U32.pack(chain_id)):
            yield _CHAIN_RUN.unpack(key)[1], raw

    def delete_slot_run(self, chain_id: int, run: int) -> None:
        self.txn.delete(_CHAIN_RUN.pack(chain_id, run), db=self.index.slots)

    def delete_slot_runs(self, chain_id: int) -> None:
        """Delete the chain's slot table, and the marks of its damaged slots."""
        for run, _ in list(self.iter_slot_runs(chain_id)):
            self.delete_slot_run(chain_id, run)
        for slot in list(self.iter_damaged(chain_id)):
            self.delete_damaged(chain_id, slot)

    def keys_of(self, name: bytes) -> list[bytes]:
        """Every key of the database *name*, whatever it holds (fsck)."""
        return [key for key, _ in self._scan(self.index.named[name], b"")]

    def delete_key(self, name: bytes, key: bytes) -> None:
        self.txn.delete(key, db=self.index.named[name])

    # -- damaged slots ----------------------------------------------------------

    def put_damaged(self, chain_id: int, slot: int) -> None:
        self._put(self.index.damaged, _DAMAGED, _CHAIN_RUN.pack(chain_id, slot), b"")

    def delete_damaged(self, chain_id: int, slot: int) -> None:
        self.txn.delete(_CHAIN_RUN.pack(chain_id, slot), db=self.index.damaged)

    def iter_damaged(self, chain_id: int) -> Iterator[int]:
        """The chain's slots set aside as damaged. A mark that does not verify
        is skipped, not raised: without it a write may dedup onto a damaged
        slot, whose reads answer EIO, never other bytes (fsck reports it)."""
        for key, raw in self._scan(self.index.damaged, _U32.pack(chain_id)):
            try:
                verified(_DAMAGED, key, raw, "")
            except CorruptIndex:
                continue
            if len(key) == _CHAIN_RUN.size:
                yield _CHAIN_RUN.unpack(key)[1]

    # -- each file's block map ----------------------------------------------------

    def put_map_run(self, ino: int, run: int, entries: bytes) -> None:
        self._put(self.index.filemaps, _FILEMAPS, _INO_RUN.pack(ino, run), entries)

    def patch_map_run(self, ino: int, run: int, entries: bytes,
                      changes: list[tuple[int, bytes]]) -> None:
        """Put a run whose entries differ from the stored run's only in
        *changes* (offset in the entries, bytes): the journal names those alone."""
        key = _INO_RUN.pack(ino, run)
        self.txn.patch(key, checksummed(_FILEMAPS, key, entries), changes,
                       db=self.index.filemaps)

    def delete_map_run(self, ino: int, run: int) -> None:
        self.txn.delete(_INO_RUN.pack(ino, run), db=self.index.filemaps)

    def get_map_run(self, ino: int, run: int) -> bytes | None:
        """One run of file *ino*'s map, verified; None if it has no value."""
        return self._get(self.index.filemaps, _FILEMAPS, _INO_RUN.pack(ino, run),
                         f"run {run} of the map of file {ino}")

    def iter_map_runs(self, ino: int) -> Iterator[tuple[int, bytes | None]]:
        """(run, entries) of file *ino*'s map in run order; entries is None
        for a run whose checksum does not verify."""
        for key, raw in self._scan(self.index.filemaps, _U64.pack(ino)):
            run = _INO_RUN.unpack(key)[1] if len(key) == _INO_RUN.size else -1
            try:
                yield run, verified(_FILEMAPS, key, raw, "")
            except CorruptIndex:
                yield run, None

    def iter_mapped_inos(self) -> Iterator[int]:
        """Every inode number that has map runs, once each, in order."""
        last = None
        with self.txn.cursor(db=self.index.filemaps) as cur:
            for key in cur.iternext(values=False):
                ino = int(_U64.unpack(key[:8])[0])
                if ino != last:
                    yield ino
                    last = ino

    def delete_map_runs(self, ino: int) -> None:
        """Delete file *ino*'s map: every run, and its directory."""
        for run, _ in list(self.iter_map_runs(ino)):
            self.delete_map_run(ino, run)
        self.delete_map_dir(ino)

    # -- each file's run directory (which runs of its map are present) -------------

    def get_map_dir(self, ino: int) -> bytes | None:
        """File *ino*'s run directory, verified; None if it has none."""
        return self._get(self.index.mapdirs, _MAPDIRS, _U64.pack(ino),
                         f"the run directory of file {ino}")

    def put_map_dir(self, ino: int, bitmap: bytes) -> None:
        self._put(self.index.mapdirs, _MAPDIRS, _U64.pack(ino), bitmap)

    def delete_map_dir(self, ino: int) -> None:
        self.txn.delete(_U64.pack(ino), db=self.index.mapdirs)

    # -- orphans -------------------------------------------------------------------

    def put_orphan(self, ino: int) -> None:
        self._put(self.index.orphans, _ORPHANS, _U64.pack(ino), b"")

    def delete_orphan(self, ino: int) -> None:
        self.txn.delete(_U64.pack(ino), db=self.index.orphans)

    def is_orphan(self, ino: int) -> bool:
        return self._get(self.index.orphans, _ORPHANS, _U64.pack(ino),
                         f"the orphan mark of {ino}") is not None

    def iter_orphans(self) -> Iterator[int]:
        for key, _ in self._iter(self.index.orphans, _ORPHANS):
            yield int(_U64.unpack(key)[0])

    # -- file priorities ----------------------------------------------------------

    def get_priority(self, ino: int) -> int:
        raw = self._get(self.index.priorities, _PRIORITIES, _U64.pack(ino),
                        f"the priority of {ino}")
        return 0 if raw is None else int(_I32.unpack(raw)[0])

    def put_priority(self, ino: int, priority: int) -> None:
        """Set a file's priority; 0, the default, is stored as no entry."""
        if priority:
            self._put(self.index.priorities, _PRIORITIES, _U64.pack(ino), _I32.pack(priority))
        else:
            self.delete_priority(ino)

    def delete_priority(self, ino: int) -> None:
        self.txn.delete(_U64.pack(ino), db=self.index.priorities)

    def iter_priorities(self) -> Iterator[tuple[int, int]]:
        for key, raw in self._iter(self.index.priorities, _PRIORITIES):
            yield int(_U64.unpack(key)[0]), int(_I32.unpack(raw)[0])
