"""Keyed BLAKE3 digests of blocks.

Each chain has its own 32-byte secret key. Identical blocks in one chain
hash alike and are stored once; identical blocks in two chains hash apart,
so one tenant can never learn, by timing a dedup hit, that another tenant
holds a given page.

Digests are truncated to 16 bytes. The hash is keyed, so nobody without the
chain's key can construct a collision, and the chance of an accidental one
among 2**40 blocks (4 PiB) is below 2**-47. Halving the digest halves the
largest part of the index and keeps more of it in the page cache.
"""

import secrets

import blake3

KEY_SIZE = 32
DIGEST_SIZE = 16


def new_key() -> bytes:
    """A fresh random chain key."""
    return secrets.token_bytes(KEY_SIZE)


def block_digest(key: bytes, data: bytes) -> bytes:
    """The keyed digest that names *data* within the chain owning *key*."""
    return blake3.blake3(data, key=key).digest(DIGEST_SIZE)
