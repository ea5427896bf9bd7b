"""The storage engine: one state directory's chains, files and deduplicated blocks.

The only compiled package: the modules listed in pyproject.toml run as
Cython extensions where the build made them (:mod:`.compiled`, installed
here before any of them is imported).
"""

from swapfs.engine import compiled

compiled.install()

# The face, imported after the finder above is in place.
# ruff: noqa: E402
from swapfs.engine import fsck, keys, lease, reseal
from swapfs.engine.blocks import BLOCK_SIZE, MAX_FILE_SIZE
from swapfs.engine.digest import DIGEST_SIZE
from swapfs.engine.errors import CorruptBlock, CorruptIndex, SwapfsError
from swapfs.engine.filemap import MAP_RUN
from swapfs.engine.fsck import check
from swapfs.engine.index import (
    FORMAT_VERSION,
    LEASE_GENERATION,
    ROOT_INO,
    Index,
    Inode,
    Txn,
    recorded_generation,
)
from swapfs.engine.keys import MasterKey
from swapfs.engine.lease import (
    LEASE_SIZE,
    Lease,
    LeaseCorrupt,
    LeaseError,
    LeaseHeld,
    LeaseInfo,
    LeaseLost,
    acquire,
    break_lease,
    encode,
    keep_renewed,
    new_holder,
    read_lease,
)
from swapfs.engine.readcache import ReadCache, cache_key
from swapfs.engine.sealing import SEAL_SIZE
from swapfs.engine.slottable import SlotTable
from swapfs.engine.state import OldFormat, State
from swapfs.engine.statedir import sync_directory
from swapfs.engine.store import punch_hole
from swapfs.engine.volume import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Volume

__all__ = [
    "BLOCK_SIZE",
    "CorruptBlock",
    "CorruptIndex",
    "DIGEST_SIZE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FORMAT_VERSION",
    "Index",
    "Inode",
    "LEASE_GENERATION",
    "LEASE_SIZE",
    "Lease",
    "LeaseCorrupt",
    "LeaseError",
    "LeaseHeld",
    "LeaseInfo",
    "LeaseLost",
    "MAP_RUN",
    "MAX_FILE_SIZE",
    "MasterKey",
    "OldFormat",
    "ReadCache",
    "ROOT_INO",
    "SEAL_SIZE",
    "SlotTable",
    "State",
    "SwapfsError",
    "Txn",
    "Volume",
    "acquire",
    "break_lease",
    "cache_key",
    "check",
    "compiled",
    "encode",
    "fsck",
    "keep_renewed",
    "keys",
    "lease",
    "new_holder",
    "punch_hole",
    "read_lease",
    "recorded_generation",
    "reseal",
    "sync_directory",
]
