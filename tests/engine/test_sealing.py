"""Block sealing, checked against an AES-GCM computed apart from swapfs's
code, and against an attacker who finds two blocks sharing a nonce.

GCM under one key and one nonce is linear: from two blocks sealed with the
same nonce, anyone who can write the state's files can make a third, with a
digest of the same 12 nonce bytes, whose tag verifies (no key needed; see
:func:`forge`). Each block is therefore sealed under a key of its own,
derived from its whole digest (``swapfs/engine/sealing.py``), and such a block
reads as EIO.
"""

import errno
import random
import stat
from contextlib import closing
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swapfs.engine import keys
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.digest import block_digest
from swapfs.engine.errors import CorruptBlock, SwapfsError
from swapfs.engine.index import ROOT_INO
from swapfs.engine.sealing import SEAL_SIZE, ChainKeys
from swapfs.engine.slottable import ENTRY, RUN_BYTES, SLOT_RUN, entry_crc
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE
MODE = stat.S_IFREG | 0o600
SECRET = bytes(range(100, 124))  # a chain secret (24 bytes)


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(BS)


# -- a known answer, computed from the design, not from swapfs/engine/sealing.py ------------


def test_block_sealing_matches_an_independent_aes_gcm() -> None:
    """docs/encryption.md: digest and data keys derived from the chain secret
    with BLAKE3's KDF; the block key is the keyed BLAKE3 of the whole digest
    under the data key; nonce = digest[:12]; associated data = the digest."""
    digest_key = blake3.blake3(SECRET, derive_key_context="swapfs 2026-11-27 chain digest key"
                               ).digest(32)
    data_key = blake3.blake3(SECRET, derive_key_context="swapfs 2026-11-27 chain data key"
                             ).digest(32)
    data = page(1)
    digest = blake3.blake3(data, key=digest_key).digest(16)
    block_key = blake3.blake3(digest, key=data_key).digest(32)
    expected = AESGCM(block_key).encrypt(digest[:12], data, digest)

    chain = ChainKeys.from_secret(7, SECRET)
    assert chain.digest(data) == digest
    sealed, record = chain.seal(digest, data)
    assert sealed == expected[:BS]
    assert record == digest + expected[BS:] and len(record) == SEAL_SIZE
    # Pinned, so that a change of the scheme cannot pass unnoticed.
    assert record.hex() == ("3eeff1abab06ca785106dfa4e9d470bd"
                            "7d9f419d5116f2fac8918d06d9f0e36f")
    assert chain.open(3, digest, sealed, record) == data


@pytest.mark.parametrize("at", range(12, 16))
def test_a_digest_that_differs_past_the_nonce_bytes_is_refused(at: int) -> None:
    """Byte *at* of the digest is not in the nonce: a record, or a record and
    the slot's entry together, that differ there do not open."""
    chain = ChainKeys.from_secret(1, SECRET)
    data = page(2)
    digest = chain.digest(data)
    sealed, record = chain.seal(digest, data)
    other = bytearray(digest)
    other[at] ^= 0x01
    other_record = bytes(other) + record[len(digest):]
    with pytest.raises(CorruptBlock):
        chain.open(0, digest, sealed, other_record)  # the record names another block
    with pytest.raises(CorruptBlock):
        chain.open(0, bytes(other), sealed, other_record)  # entry and record both changed
    assert chain.recover_digest(0, sealed, other_record) is None


def test_a_seal_record_changed_past_the_nonce_bytes_reads_eio(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    with closing(Volume(state, master=master_key)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o700, 0, 0)
        ino = vol.create(chain.ino, b"f", MODE, 0, 0).ino
        vol.write(ino, 0, page(3) + page(4))
        slot = vol.mapped(ino)[1]
    with open(state / "data" / "1.seals", "r+b") as seals:
        seals.seek(slot * SEAL_SIZE + 14)
        byte = seals.read(1)[0]
        seals.seek(slot * SEAL_SIZE + 14)
        seals.write(bytes([byte ^ 0x80]))
    with closing(Volume(state, master=master_key)) as vol:
        assert vol.read(ino, 0, BS) == page(3)
        with pytest.raises(SwapfsError) as caught:
            vol.read(ino, BS, BS)
        assert caught.value.errno == errno.EIO


# -- a nonce collision ---------------------------------------------------------------


def gf_mult(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (NIST SP 800-38D, algorithm 1),
    on 16-byte blocks read as big-endian integers."""
    product, v = 0, y
    for bit in range(127, -1, -1):
        if (x >> bit) & 1:
            product ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return product


def gf_inverse(x: int) -> int:
    """x^(2^128 - 2): the inverse of a non-zero element."""
    result, power, exponent = 1 << 127, x, (1 << 128) - 2  # 1 << 127 is the field's one
    while exponent:
        if exponent & 1:
            result = gf_mult(result, power)
        power = gf_mult(power, power)
        exponent >>= 1
    return result


def _int(block: bytes) -> int:
    return int.from_bytes(block, "big")


def _block(value: int) -> bytes:
    return value.to_bytes(16, "big")


def forge(first: tuple[bytes, bytes, bytes], second: tuple[bytes, bytes, bytes],
          delta: bytes) -> tuple[bytes, bytes, bytes]:
    """(digest, ciphertext, tag) of a block no one sealed, from two blocks
    sealed as (digest, ciphertext, tag) under one key and one nonce, their
    digests differing past the nonce bytes; *delta* is 12 zero bytes and 4
    others. With X the associated data, ciphertext and lengths in 16-byte
    blocks, GHASH is linear in X: with lam * (X1 ^ X2) added to X1 blockwise
    (lam a field element), the tag gains lam * (T1 ^ T2), whatever the
    hash key. lam = delta / (d1 ^ d2) keeps the nonce bytes of the digest."""
    (d1, c1, t1), (d2, c2, t2) = first, second
    lam = gf_mult(_int(delta), gf_inverse(_int(d1) ^ _int(d2)))
    digest = _block(_int(d1) ^ gf_mult(lam, _int(d1) ^ _int(d2)))
    assert digest[:12] == d1[:12] and digest not in (d1, d2)
    ciphertext = b"".join(
        _block(_int(c1[at:at + 16]) ^ gf_mult(lam, _int(c1[at:at + 16]) ^ _int(c2[at:at + 16])))
        for at in range(0, len(c1), 16))
    return digest, ciphertext, _block(_int(t1) ^ gf_mult(lam, _int(t1) ^ _int(t2)))


NONCE = bytes.fromhex("5eed5eed5eed5eed5eed5eed")
DELTA = bytes(12) + b"\x0f\x00\xba\x11"


def test_the_forgery_holds_against_plain_gcm() -> None:
    """The attack above, against AES-GCM with one key and one nonce for
    two blocks: the forged block opens, as bytes nobody sealed."""
    aead = AESGCM(bytes(range(32)))
    sealed = []
    for seed, tail in ((5, b"\x01\x02\x03\x04"), (6, b"\x0a\x0b\x0c\x0d")):
        digest = NONCE + tail
        out = aead.encrypt(NONCE, page(seed), digest)
        sealed.append((digest, out[:BS], out[BS:]))
    digest, ciphertext, tag = forge(sealed[0], sealed[1], DELTA)
    forged = aead.decrypt(NONCE, ciphertext + tag, digest)
    assert forged not in (page(5), page(6))


def test_two_blocks_sharing_a_nonce_do_not_let_a_third_be_forged(
        tmp_path: Path, master_key: keys.MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different pages whose digests share their first 12 bytes (the
    digest function is replaced to make them), stored in one chain. An
    attacker who can write the state's files (not the key) forges a block
    from them as above, and puts it in the second one's slot: its digest in
    the slot table (with a valid CRC), the ciphertext, the seal record.
    Reading it is EIO, never the forged bytes."""
    state = tmp_path / "state"
    monkeypatch.setattr(ChainKeys, "digest",
                        lambda self, data: NONCE + block_digest(self.digest_key, data)[12:])
    with closing(Volume(state, master=master_key)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o700, 0, 0)
        ino = vol.create(chain.ino, b"f", MODE, 0, 0).ino
        vol.write(ino, 0, page(5) + page(6))
        first, second = vol.mapped(ino)[0], vol.mapped(ino)[1]
        chain_id = vol.getattr(ino).chain
    monkeypatch.undo()

    data, seals = state / "data" / f"{chain_id}.blocks", state / "data" / f"{chain_id}.seals"
    sealed = []
    for slot in (first, second):
        ciphertext = data.read_bytes()[slot * BS:(slot + 1) * BS]
        record = seals.read_bytes()[slot * SEAL_SIZE:(slot + 1) * SEAL_SIZE]
        assert record[:12] == NONCE
        sealed.append((record[:16], ciphertext, record[16:]))
    digest, ciphertext, tag = forge(sealed[0], sealed[1], DELTA)
    with open(data, "r+b") as file:
        file.seek(second * BS)
        file.write(ciphertext)
    with open(seals, "r+b") as file:
        file.seek(second * SEAL_SIZE)
        file.write(digest + tag)
    with closing(Volume(state, master=master_key)) as vol, \
            vol.index.begin(write=True) as txn:
        run = second // SLOT_RUN
        raw = bytearray(dict(txn.iter_slot_runs(chain_id))[run])
        at = (second % SLOT_RUN) * ENTRY.size
        refcount = ENTRY.unpack_from(raw, at)[1]
        ENTRY.pack_into(raw, at, digest, refcount, entry_crc(chain_id, second, digest, refcount))
        assert len(raw) == RUN_BYTES
        txn.put_slot_run(chain_id, run, bytes(raw))

    with closing(Volume(state, master=master_key)) as vol:
        assert vol.read(ino, 0, BS) == page(5)
        with pytest.raises(SwapfsError) as caught:
            vol.read(ino, BS, BS)
        assert caught.value.errno == errno.EIO
