"""The content cache's manifest: which blocks a daemon caches, how hot, whose.

A daemon writes it into its state directory (``cache.manifest``) every few
seconds and at stop; a restarted daemon warms its cache from it, and the
fail-over planner merges several daemons' manifests. This module only turns
entries into bytes and back (plus an atomic write); warming is
:func:`swapfs.cache.warm.warm`.

Layout, all integers big-endian (the byte-by-byte table is in
``docs/caches.md``)::

    header      32 bytes: magic, version, digest size, and the number of
                chains, files, owner sets and blocks
    chains      8 bytes each: chain id (u32), its blocks (u32); the blocks
                come in sections, one per chain, in this order
    files       12 bytes each: inode number (u64), priority (i32)
    owner sets  8 bytes each: four file indexes (u16), 0xFFFF = none
    blocks      24 bytes each: digest (16), heat (u32), owner set (u32)
    checksum    32 bytes: BLAKE3 of everything before it

So a block costs at most 32 bytes: its record, and at worst an owner set
of its own (owner sets are shared: the blocks of one file share one).
Anything that does not parse exactly (short, long, wrong magic or version,
an index out of range, a checksum that differs) is :class:`ManifestError`.
"""

import os
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import blake3

from swapfs.cache.blockcache import MAX_OWNERS, CacheEntry
from swapfs.engine import DIGEST_SIZE, sync_directory

MAGIC = b"SWFSCMAN"
VERSION = 1
NO_FILE = 0xFFFF
#: Most files a manifest names; owners past them are left out.
MAX_FILES = NO_FILE
CHECKSUM_SIZE = 32

_HEADER = struct.Struct(">8sIIIIII")
_CHAIN = struct.Struct(">II")
_FILE = struct.Struct(">Qi")
_OWNERS = struct.Struct(">4H")
_RECORD = struct.Struct(f">{DIGEST_SIZE}sII")
_U32_MAX = 0xFFFFFFFF

assert MAX_OWNERS == 4 and _HEADER.size == 32 and _RECORD.size <= 24


class ManifestError(ValueError):
    """Bytes that are not a manifest this version can read."""


def serialize(entries: Iterable[CacheEntry], priorities: Mapping[int, int]) -> bytes:
    """The manifest of *entries*; *priorities* gives each owning file's (absent: 0)."""
    sections: dict[int, list[CacheEntry]] = {}
    for entry in entries:
        sections.setdefault(entry.chain, []).append(entry)
    files: dict[int, int] = {}  # ino -> index
    sets: dict[tuple[int, ...], int] = {}  # file indexes -> owner set index
    chains = bytearray()
    records = bytearray()
    for chain, blocks in sections.items():
        chains += _CHAIN.pack(chain, len(blocks))
        for entry in blocks:
            indexes = []
            for ino in entry.owners[:MAX_OWNERS]:
                if ino not in files and len(files) < MAX_FILES:
                    files[ino] = len(files)
                if ino in files:
                    indexes.append(files[ino])
            owner_set = sets.setdefault(tuple(indexes), len(sets))
            records += _RECORD.pack(entry.digest, min(entry.heat, _U32_MAX), owner_set)
    body = b"".join([
        _HEADER.pack(MAGIC, VERSION, DIGEST_SIZE, len(sections), len(files), len(sets),
                     len(records) // _RECORD.size),
        bytes(chains),
        b"".join(_FILE.pack(ino, priorities.get(ino, 0)) for ino in files),
        b"".join(_OWNERS.pack(*indexes, *[NO_FILE] * (MAX_OWNERS - len(indexes)))
                 for indexes in sets),
        bytes(records),
    ])
    return body + blake3.blake3(body).digest(CHECKSUM_SIZE)


def parse(raw: bytes) -> list[CacheEntry]:
    """The entries of a manifest, in its order; ManifestError unless it is whole."""
    if len(raw) < _HEADER.size + CHECKSUM_SIZE:
        raise ManifestError(f"{len(raw)} bytes is too short for a manifest")
    body, checksum = raw[:-CHECKSUM_SIZE], raw[-CHECKSUM_SIZE:]
    magic, version, digest_size, n_chains, n_files, n_sets, n_blocks = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ManifestError("not a swapfs cache manifest (wrong magic)")
    if version != VERSION or digest_size != DIGEST_SIZE:
        raise ManifestError(f"manifest version {version}, digest size {digest_size}: "
                            f"this swapfs reads version {VERSION}, digest size {DIGEST_SIZE}")
    want = (_HEADER.size + n_chains * _CHAIN.size + n_files * _FILE.size
            + n_sets * _OWNERS.size + n_blocks * _RECORD.size + CHECKSUM_SIZE)
    if len(raw) != want:
        raise ManifestError(f"manifest is {len(raw)} bytes, its header says {want}")
    if blake3.blake3(body).digest(CHECKSUM_SIZE) != checksum:
        raise ManifestError("manifest checksum does not match")
    offset = _HEADER.size
    chains = list(_CHAIN.iter_unpack(raw[offset:offset + n_chains * _CHAIN.size]))
    offset += n_chains * _CHAIN.size
    files = list(_FILE.iter_unpack(raw[offset:offset + n_files * _FILE.size]))
    offset += n_files * _FILE.size
    sets = []
    for indexes in _OWNERS.iter_unpack(raw[offset:offset + n_sets * _OWNERS.size]):
        if any(index >= n_files for index in indexes if index != NO_FILE):
            raise ManifestError("an owner set names a file the manifest does not list")
        owners = tuple(files[index] for index in indexes if index != NO_FILE)
        sets.append((tuple(ino for ino, _ in owners),
                     max((priority for _, priority in owners), default=0)))
    offset += n_sets * _OWNERS.size
    if sum(count for _, count in chains) != n_blocks:
        raise ManifestError("the chains' block counts do not add up to the blocks")
    records = _RECORD.iter_unpack(raw[offset:offset + n_blocks * _RECORD.size])
    entries = []
    for chain, count in chains:
        for _ in range(count):
            digest, heat, owner_set = next(records)
            if owner_set >= n_sets:
                raise ManifestError("a block names an owner set the manifest does not hold")
            owners, priority = sets[owner_set]
            entries.append(CacheEntry(chain, digest, heat, owners, priority))
    return entries


def max_size(max_blocks: int) -> int:
    """The most bytes a manifest of at most *max_blocks* blocks can take: each
    block in a chain and an owner set of its own, with four files of its own
    (up to MAX_FILES)."""
    return (_HEADER.size + CHECKSUM_SIZE
            + max_blocks * (_CHAIN.size + _OWNERS.size + _RECORD.size)
            + min(MAX_OWNERS * max_blocks, MAX_FILES) * _FILE.size)


def read_manifest(path: Path, max_blocks: int, owner: int | None = None) -> list[CacheEntry]:
    """The entries of the manifest at *path*, if it has at most *max_blocks*
    blocks (what the reader's cache budget could hold) and, with *owner*,
    belongs to that user (OSError, ManifestError).

    A daemon reads manifests as root with its memory locked, and a peer's
    state directory is not its own: so the file is opened without following
    a symlink (``/dev/zero`` would never end), must be a regular file, and is
    refused from its size, or after reading one byte past the most it may
    hold, never read whole.
    """
    limit = max_size(max_blocks)
    # O_NONBLOCK: a FIFO must not hold the open until a writer comes.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(f"{path} is not a regular file")
        if owner is not None and info.st_uid != owner:
            raise ManifestError(f"{path} belongs to uid {info.st_uid}, not {owner}")
        if info.st_size > limit:
            raise ManifestError(f"{path} is {info.st_size} bytes, more than a manifest of "
                                f"{max_blocks} blocks ({limit} bytes)")
        chunks, left = [], limit + 1
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        raise ManifestError(f"{path} grew past {limit} bytes while it was read")
    entries = parse(raw)
    if len(entries) > max_blocks:
        raise ManifestError(f"{path} holds {len(entries)} blocks, more than the "
                            f"{max_blocks} this cache budget holds")
    return entries


def write_manifest(path: Path, raw: bytes) -> None:
    """Replace *path* with *raw* atomically: a crash leaves the old or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    sync_directory(path.parent)
