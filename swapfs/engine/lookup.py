"""The index records a request names, fetched with the errno it answers when
they are absent or of the wrong kind.

Shared by the namespace (:mod:`.volume`), the opening of a state
(:mod:`.state`, which purges orphaned files) and the report
(:mod:`.report`), each of which runs them inside its own transaction.
"""

import errno

from swapfs.engine.errors import CorruptBlock, SwapfsError
from swapfs.engine.index import ROOT_INO, Chain, Inode, Txn


def inode_of(txn: Txn, ino: int) -> Inode:
    """The inode *ino* (ENOENT if there is none)."""
    inode = txn.get_inode(ino)
    if inode is None:
        raise SwapfsError(errno.ENOENT)
    return inode


def dir_of(txn: Txn, ino: int) -> Inode:
    """The directory *ino*: the root or a chain (ENOTDIR for a file)."""
    inode = inode_of(txn, ino)
    if not inode.is_dir:
        raise SwapfsError(errno.ENOTDIR)
    return inode


def chain_dir_of(txn: Txn, ino: int) -> Inode:
    """The chain directory *ino*, where swap files live (EPERM for the root)."""
    inode = dir_of(txn, ino)
    if ino == ROOT_INO:
        raise SwapfsError(errno.EPERM, "swap files live inside a chain")
    return inode


def file_of(txn: Txn, ino: int) -> Inode:
    """The swap file *ino* (EISDIR for a directory)."""
    inode = inode_of(txn, ino)
    if inode.is_dir:
        raise SwapfsError(errno.EISDIR)
    return inode


def chain_of(txn: Txn, chain_id: int) -> Chain:
    """The record of a chain an inode names: its absence is damage (EIO)."""
    chain = txn.get_chain(chain_id)
    if chain is None:
        raise CorruptBlock(f"chain {chain_id} is missing from the index")
    return chain
