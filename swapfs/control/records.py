"""Sealed records: small secrets a driver keeps in its share of the pool.

The pool's regions are unused code-page space that a driver's guest gives
to swapfs. As the third seed document proposes, the same space can carry
confidential records between that guest and the host: ``swapfs-driver
secret put NAME`` keeps one, ``get`` reads it back, ``rm`` deletes it.

**The key.** When a driver registers, it and the daemon each make an X25519
key pair and exchange public keys; both derive the same 32-byte record key
from the shared secret with HKDF-SHA256, bound to both public keys and the
driver's name. The key never crosses the wire. A new registration (a
restarted driver, a new daemon) agrees a new key.

**Sealing.** A record's value is sealed with AES-256-GCM under that key, a
random nonce, and the driver's and the record's names as associated data.
The driver seals and opens its own records, so the daemon stores and hands
back only ciphertext; a record moved to another name or driver does not
open. The daemon holds the key too, which lets the host share a record
with the guest (``swapfs secret``): the one time the daemon seals or opens.

**Space and lifetime.** Each record takes whole slots of the pool (4 KiB,
the size the daemon gives :class:`Records`: this floor knows no engine),
out of its driver's share; the pool keeps that much less for blocks. The
daemon's driver manager (``mountd/drivers.py``) keeps the records and tells
the pool how many slots they hold back. Records are transient like
everything else in the pool: when the driver's share is revoked (it exits,
falls silent, or its report no longer covers them) its records are wiped
(overwritten with zeros, then dropped) and the driver is told. They are a
way to hand a secret over, never a place to keep one.
"""

import errno
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The largest value a record holds.
MAX_VALUE = 4096
_NONCE = 12
_TAG = 16
#: The largest sealed record: nonce, value, tag.
MAX_SEALED = _NONCE + MAX_VALUE + _TAG
PUBLIC_KEY_SIZE = 32
_INFO = b"swapfs 2026-11-27 driver record key"


class RecordError(Exception):
    """A record that cannot be kept, found or opened; *errno* says why."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class KeyExchange:
    """One side's half of the agreement: a fresh X25519 key pair."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def agree(self, driver: str, driver_public: bytes, daemon_public: bytes) -> "RecordKey":
        """The record key of *driver*, whose side sent *driver_public* and the
        daemon's *daemon_public* (one of them this side's own)."""
        peer = daemon_public if driver_public == self.public else driver_public
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:  # a low-order point: no secret is shared
            raise RecordError(errno.EINVAL, f"unusable public key: {exc}") from None
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=_INFO + driver_public + daemon_public + driver.encode()).derive(shared)
        return RecordKey(driver, key)


class RecordKey:
    """The key one driver and the daemon agreed, and what it seals."""

    __slots__ = ("driver", "_aead")

    def __init__(self, driver: str, key: bytes) -> None:
        self.driver = driver
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"RecordKey(driver={self.driver!r})"

    def _associated(self, name: str) -> bytes:
        return self.driver.encode() + b"\0" + name.encode()

    def seal(self, name: str, value: bytes) -> bytes:
        if len(value) > MAX_VALUE:
            raise RecordError(errno.E2BIG, f"a record holds at most {MAX_VALUE} bytes")
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, value, self._associated(name))

    def open(self, name: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:],
                                      self._associated(name))
        except (InvalidTag, ValueError):
            raise RecordError(errno.EBADMSG, f"record {name!r} does not open with "
                              f"driver {self.driver!r}'s key") from None


class Records:
    """Every driver's sealed records, as the daemon keeps them, each taking
    whole slots of *slot_size* bytes (the pool's)."""

    def __init__(self, slot_size: int) -> None:
        self.slot_size = slot_size
        #: Driver -> record name -> sealed record, oldest first.
        self._shelves: dict[str, dict[str, bytearray]] = {}

    def _slots_of(self, sealed: bytes | bytearray) -> int:
        return -(-len(sealed) // self.slot_size)

    def _slots(self, records: dict[str, bytearray]) -> int:
        return sum(self._slots_of(record) for record in records.values())

    def put(self, driver: str, name: str, sealed: bytes, room_slots: int) -> None:
        """Keep (or replace) a record, if the driver's records then take at
        most *room_slots* slots (ENOSPC otherwise)."""
        if not _NONCE + _TAG <= len(sealed) <= MAX_SEALED:
            raise RecordError(errno.EINVAL, "not a sealed record")
        shelf = self._shelves.setdefault(driver, {})
        old = shelf.get(name)
        slots = (self._slots(shelf) - (self._slots_of(old) if old is not None else 0)
                 + self._slots_of(sealed))
        if slots > room_slots:
            raise RecordError(errno.ENOSPC, f"driver {driver!r}'s records would take "
                              f"{slots} slots of its share's {room_slots}")
        if old is not None:
            _zero(old)
        shelf[name] = bytearray(sealed)

    def get(self, driver: str, name: str) -> bytes:
        record = self._shelves.get(driver, {}).get(name)
        if record is None:
            raise RecordError(errno.ENOENT, f"driver {driver!r} has no record {name!r}")
        return bytes(record)

    def remove(self, driver: str, name: str) -> None:
        record = self._shelves.get(driver, {}).pop(name, None)
        if record is None:
            raise RecordError(errno.ENOENT, f"driver {driver!r} has no record {name!r}")
        _zero(record)

    def wipe(self, driver: str, keep_slots: int = 0) -> list[str]:
        """Wipe the driver's newest records until the rest take at most
        *keep_slots* slots (all with 0); the names wiped."""
        shelf = self._shelves.get(driver, {})
        wiped: list[str] = []
        while shelf and self._slots(shelf) > keep_slots:
            name, record = shelf.popitem()
            _zero(record)
            wiped.append(name)
        if not shelf:
            self._shelves.pop(driver, None)
        return wiped

    def slots(self, driver: str | None = None) -> int:
        """Slots the records take: one driver's, or all."""
        if driver is not None:
            return self._slots(self._shelves.get(driver, {}))
        return sum(self._slots(shelf) for shelf in self._shelves.values())

    def stats(self, driver: str) -> dict[str, int]:
        records = self._shelves.get(driver, {})
        return {"records": len(records),
                "record_bytes": sum(len(record) for record in records.values()),
                "record_slots": self._slots(records)}


def _zero(record: bytearray) -> None:
    """Overwrite a record in place, so that its bytes do not outlive it."""
    record[:] = bytes(len(record))
