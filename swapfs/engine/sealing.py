"""How a chain's blocks are named, sealed at rest and checked when read.

Every block is named by its keyed BLAKE3 digest (``swapfs/engine/digest.py``). In
a plain state it is stored as it is and checked, when read, by hashing it
again. In an encrypted state it is sealed with AES-256-GCM under a key of
its own, the *block key*: the keyed BLAKE3 of its whole digest under the
chain's data key. The nonce is the first 12 bytes of the digest and the
associated data the whole digest. The same page seals to the same
ciphertext within a chain (and is stored once), while another chain, with
other keys, seals it to other bytes.

A block key seals one page only: two different pages share a key only if
their whole 16-byte digests collide, which would already make dedup store
one for the other. So two pages whose digests share the 12 nonce bytes
give away nothing: under one key and one nonce they would have leaked the
XOR of the two pages and GCM's hash key, with which every block of the
chain could be forged (docs/encryption.md says why this and not a second
hash of each block read, and what each costs).

The 16-byte GCM tag does not fit in the 4 KiB slot. It goes, with a copy of
the digest, into the chain's seal file: a 32-byte *seal record* per slot
(``swapfs/engine/store.py``). Opening a block checks both: a record whose digest
is not the slot's belongs to another block; a tag that does not verify
means the data, the record or the key is not what was sealed. Either is
EIO (:class:`CorruptBlock`), never other bytes. A verified tag under the
block key proves the digest, so an encrypted block is not hashed again
when read. The digest's copy lets ``swapfs fsck --repair`` rebuild a
slot-table entry that was lost, as it does for a plain chain from the data
itself.

States of index format 3 sealed every block of a chain under the data key
itself (:data:`LEGACY`). Such a chain is only ever read to be sealed again
(``swapfs/engine/reseal.py``), and then a block is also hashed again, so that a
block forged through a nonce collision is refused there too.
"""

import logging

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.digest import DIGEST_SIZE, block_digest
from swapfs.engine.errors import CorruptBlock
from swapfs.engine.keys import DATA_KEY_CONTEXT, DIGEST_KEY_CONTEXT, derive

log = logging.getLogger(__name__)

NONCE_SIZE = 12
TAG_SIZE = 16
#: A slot's seal record: its block's digest, then the GCM tag.
SEAL_SIZE = DIGEST_SIZE + TAG_SIZE
#: The ``cipher`` record of the index's meta database: how blocks are
#: stored. LEGACY only in index format 3, whose states are sealed again
#: when they are upgraded.
PLAIN, LEGACY, BLOCK_KEYS = 0, 1, 2


def block_key(data_key: bytes, digest: bytes) -> bytes:
    """The AES-256 key of the one block named *digest*: the keyed BLAKE3 of
    the digest under the chain's *data_key*."""
    return blake3.blake3(digest, key=data_key).digest(32)


class ChainKeys:
    """One chain's digest key, and its data key if the state is encrypted."""

    __slots__ = ("chain_id", "digest_key", "_data_key", "legacy")

    def __init__(self, chain_id: int, digest_key: bytes, data_key: bytes | None = None,
                 legacy: bool = False) -> None:
        self.chain_id = chain_id
        self.digest_key = digest_key
        self._data_key = data_key
        #: Sealed as index format 3 did, every block under the data key:
        #: read only, to be sealed again, and each block hashed again.
        self.legacy = legacy

    @classmethod
    def from_secret(cls, chain_id: int, secret: bytes, legacy: bool = False
                    ) -> "ChainKeys":
        """The keys of an encrypted chain, derived from its secret."""
        return cls(chain_id, derive(DIGEST_KEY_CONTEXT, secret),
                   derive(DATA_KEY_CONTEXT, secret), legacy)

    @property
    def sealed(self) -> bool:
        """Are this chain's blocks encrypted at rest?"""
        return self._data_key is not None

    def digest(self, data: bytes) -> bytes:
        return block_digest(self.digest_key, data)

    def _aead(self, digest: bytes) -> AESGCM:
        """The cipher of the block named *digest*."""
        assert self._data_key is not None
        return AESGCM(self._data_key if self.legacy else block_key(self._data_key, digest))

    def seal(self, digest: bytes, data: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, seal record) of the block *data* named *digest*."""
        assert not self.legacy
        sealed = self._aead(digest).encrypt(digest[:NONCE_SIZE], data, digest)
        return sealed[:BLOCK_SIZE], digest + sealed[BLOCK_SIZE:]

    def open(self, slot: int, digest: bytes, data: bytes, record: bytes | None) -> bytes:
        """The block named *digest*, from what *slot* holds: its *data* and,
        in an encrypted chain, its seal *record*. CorruptBlock unless it is
        exactly what was stored."""
        if len(data) == BLOCK_SIZE:
            if self._data_key is None:
                if block_digest(self.digest_key, data) == digest:
                    return data
            elif record is not None and record[:DIGEST_SIZE] == digest:
                try:
                    plain = self._aead(digest).decrypt(digest[:NONCE_SIZE],
                                                       data + record[DIGEST_SIZE:], digest)
                except InvalidTag:
                    pass
                else:
                    if not self.legacy or block_digest(self.digest_key, plain) == digest:
                        return plain
        log.error("chain %d slot %d does not match digest %s", self.chain_id, slot,
                  digest.hex())
        raise CorruptBlock(f"chain {self.chain_id} slot {slot} is corrupt", self.chain_id,
                           slot)

    def recover_digest(self, slot: int, data: bytes, record: bytes | None) -> bytes | None:
        """The digest of the block *slot* holds, found from the slot alone
        (fsck, when the slot's entry was lost); None if it cannot be trusted."""
        if len(data) != BLOCK_SIZE:
            return None
        if self._data_key is None:
            return block_digest(self.digest_key, data)
        if record is None or len(record) != SEAL_SIZE:
            return None
        try:
            self.open(slot, record[:DIGEST_SIZE], data, record)
        except CorruptBlock:
            return None
        return record[:DIGEST_SIZE]
