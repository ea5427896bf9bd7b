"""What ``swapfs stats`` and statfs(2) show of an open state.

Reading only: per chain and per file, the logical, stored and zero blocks
and the dedup ratio; the index's bytes per database and per block; the
read caches' figures. :meth:`swapfs.engine.volume.Volume.stats` and
:meth:`~swapfs.engine.volume.Volume.statfs` answer with these.
"""

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swapfs.engine.blocks import BLOCK_SIZE, blocks_for
from swapfs.engine.index import ROOT_INO
from swapfs.engine.lookup import chain_of, inode_of
from swapfs.engine.readcache import ReadCache
from swapfs.engine.state import State


def statfs(path: Path) -> os.statvfs_result:
    """The backing file system's figures: its free space is ours."""
    return os.statvfs(path)


def stats(state: State, caches: Iterable[tuple[str, ReadCache | None]]) -> dict[str, Any]:
    """Per chain and per file: logical, stored and zero blocks, dedup ratio;
    the index's bytes per database and per block; and the figures of each
    read cache in *caches* (name, cache or None), under its name."""
    chains: dict[str, Any] = {}
    if state.index.writable():
        state.index.flush()  # the index's figures are of pages LMDB committed
    with state.index.begin() as txn:
        for chain_name, chain_ino in txn.iter_dirents(ROOT_INO):
            chain_dir = inode_of(txn, chain_ino)
            chain = chain_of(txn, chain_dir.chain)
            files = {}
            for file_name, file_ino in txn.iter_dirents(chain_ino):
                inode = inode_of(txn, file_ino)
                files[os.fsdecode(file_name)] = {
                    "size": inode.size,
                    "logical_bytes": inode.blocks * BLOCK_SIZE,
                    "mapped_blocks": inode.blocks,
                    "zero_blocks": blocks_for(inode.size) - inode.blocks,
                    "priority": txn.get_priority(file_ino),
                }
            logical = sum(f["logical_bytes"] for f in files.values())
            table = state.table(txn, chain.id_)
            unique = table.stored
            stored = unique * BLOCK_SIZE
            chains[os.fsdecode(chain_name)] = {
                "id": chain.id_,
                "logical_bytes": logical,
                "stored_bytes": stored,
                "unique_blocks": unique,
                "zero_blocks": sum(f["zero_blocks"] for f in files.values()),
                "dedup_ratio": logical / stored if stored else 1.0,
                "disk_bytes": state.store.disk_bytes(chain.id_),
                "seal_bytes": state.store.disk_bytes(chain.id_, seals=True),
                "dedup_table": {"bytes": table.dedup.size_bytes,
                                "entries": table.dedup.entries,
                                "unindexed": table.dedup.unindexed,
                                "scanned": table.scanned},
                "slot_table": {"runs_in_memory": len(table.runs),
                               "runs_read": table.runs_loaded,
                               "free_slots_known": table.free_count},
                "files": files,
            }
        # Over every file and chain, unlinked files still open included:
        # their map entries and blocks are in the index too.
        logical = sum(inode.blocks for inode in txn.iter_inodes() if not inode.is_dir)
        stored = sum(state.table(txn, chain.id_).stored for chain in txn.iter_chains())
        index = txn.space().figures(logical, stored)
    report: dict[str, Any] = {"chains": chains, "index_bytes": state.index.file_bytes(),
                              "index": index, "encrypted": state.encrypted}
    names = {chain["id"]: name for name, chain in chains.items()}
    for name, cache in caches:
        if cache is not None:
            report[name] = cache.stats()
            report[name]["chains"] = name_chains(report[name]["chains"], names)
    return report


def name_chains(by_id: dict[int, int], names: dict[int, str]) -> dict[str, int]:
    """A cache's bytes per chain id, by chain name (a chain removed meanwhile
    keeps its id as its name)."""
    return {names.get(chain_id, str(chain_id)): count for chain_id, count in by_id.items()}
