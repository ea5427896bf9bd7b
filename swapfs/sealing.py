"""How a chain's blocks are named, sealed at rest and checked when read.

Every block is named by its keyed BLAKE3 digest (``swapfs/digest.py``). In
a plain state it is stored as it is and checked, when read, by hashing it
again. In an encrypted state it is sealed with AES-256-GCM under the
chain's data key, with the first 12 bytes of its digest as the nonce and
the whole digest as associated data: a synthetic nonce, so the same page
seals to the same ciphertext within a chain (and is stored once), while
another chain, with other keys, seals it to other bytes. Two different
pages share a nonce only if their 96-bit digest prefixes collide, which
at 2**30 blocks in one chain has a chance below 2**-37.

The 16-byte GCM tag does not fit in the 4 KiB slot. It goes, with a copy of
the digest, into the chain's seal file: a 32-byte *seal record* per slot
(``swapfs/store.py``). Opening a block checks both: a record whose digest
is not the slot's belongs to another block; a tag that does not verify
means the data, the record or the key is not what was sealed. Either is
EIO (:class:`CorruptBlock`), never other bytes. A verified tag also proves
the digest, so an encrypted block is not hashed again when read. The
digest's copy lets ``swapfs fsck --repair`` rebuild a slot-table entry that
was lost, as it does for a plain chain from the data itself.
"""

import logging

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swapfs.blocks import BLOCK_SIZE
from swapfs.digest import DIGEST_SIZE, block_digest
from swapfs.errors import CorruptBlock
from swapfs.keys import DATA_KEY_CONTEXT, DIGEST_KEY_CONTEXT, derive

log = logging.getLogger(__name__)

NONCE_SIZE = 12
TAG_SIZE = 16
#: A slot's seal record: its block's digest, then the GCM tag.
RECORD_SIZE = DIGEST_SIZE + TAG_SIZE


class ChainKeys:
    """One chain's digest key, and its data key if the state is encrypted."""

    __slots__ = ("chain_id", "digest_key", "_aead")

    def __init__(self, chain_id: int, digest_key: bytes, data_key: bytes | None = None
                 ) -> None:
        self.chain_id = chain_id
        self.digest_key = digest_key
        self._aead = None if data_key is None else AESGCM(data_key)

    @classmethod
    def from_secret(cls, chain_id: int, secret: bytes) -> "ChainKeys":
        """The keys of an encrypted chain, derived from its secret."""
        return cls(chain_id, derive(DIGEST_KEY_CONTEXT, secret),
                   derive(DATA_KEY_CONTEXT, secret))

    @property
    def sealed(self) -> bool:
        """Are this chain's blocks encrypted at rest?"""
        return self._aead is not None

    def digest(self, data: bytes) -> bytes:
        return block_digest(self.digest_key, data)

    def seal(self, digest: bytes, data: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, seal record) of the block *data* named *digest*."""
        assert self._aead is not None
        sealed = self._aead.encrypt(digest[:NONCE_SIZE], data, digest)
        return sealed[:BLOCK_SIZE], digest + sealed[BLOCK_SIZE:]

    def open(self, slot: int, digest: bytes, data: bytes, record: bytes | None) -> bytes:
        """The block named *digest*, from what *slot* holds: its *data* and,
        in an encrypted chain, its seal *record*. CorruptBlock unless it is
        exactly what was stored."""
        if len(data) == BLOCK_SIZE:
            if self._aead is None:
                if block_digest(self.digest_key, data) == digest:
                    return data
            elif record is not None and record[:DIGEST_SIZE] == digest:
                try:
                    return self._aead.decrypt(digest[:NONCE_SIZE],
                                              data + record[DIGEST_SIZE:], digest)
                except InvalidTag:
                    pass
        log.error("chain %d slot %d does not match digest %s", self.chain_id, slot,
                  digest.hex())
        raise CorruptBlock(f"chain {self.chain_id} slot {slot} is corrupt", self.chain_id,
                           slot)

    def recover_digest(self, slot: int, data: bytes, record: bytes | None) -> bytes | None:
        """The digest of the block *slot* holds, found from the slot alone
        (fsck, when the slot's entry was lost); None if it cannot be trusted."""
        if len(data) != BLOCK_SIZE:
            return None
        if self._aead is None:
            return block_digest(self.digest_key, data)
        if record is None or len(record) != RECORD_SIZE:
            return None
        try:
            self.open(slot, record[:DIGEST_SIZE], data, record)
        except CorruptBlock:
            return None
        return record[:DIGEST_SIZE]
