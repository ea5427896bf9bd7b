"""The master key, and the chain keys it wraps.

An encrypted state directory is opened with one 32-byte master key, which
swapfs never stores. Each chain has its own random 24-byte secret, kept in
the chain's index record wrapped (AES key wrap, RFC 3394) under a key
derived from the master key, the state's UUID and the chain's id: a reader
of the index alone learns nothing of it, a wrapped secret copied to another
chain or into another state does not unwrap, and rotating the master key
rewraps the secrets without touching a block of data (``swapfs rekey``;
``--reseal`` issues new secrets and seals every block again:
``swapfs/engine/reseal.py``). From a chain's secret come its digest key (the keyed BLAKE3
that names blocks for dedup) and its data key (``swapfs/engine/sealing.py``).

The master key comes from the key file named in the configuration, else
from systemd's credentials (``swapfs.key`` in ``$CREDENTIALS_DIRECTORY``,
as ``LoadCredentialEncrypted=`` provides it), else from
``/etc/swapfs/master.key``. A key file that its group or others may read or
write is refused, as ssh refuses such a private key: a key anyone else can
read protects nothing. So is one that another user owns (not the process's
effective uid, root for the daemon): its owner could change its mode, or
swap in a key of their own.
"""

import errno
import os
import secrets
import stat
import struct
import uuid
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from swapfs.engine.errors import CorruptIndex, SwapfsError

MASTER_KEY_SIZE = 32
CHAIN_SECRET_SIZE = 24
#: A wrapped chain secret fills the 32-byte key field of the chain's record.
WRAPPED_SIZE = CHAIN_SECRET_SIZE + 8
#: The systemd credential the daemon looks for first.
CREDENTIAL = "swapfs.key"
DEFAULT_KEY_FILE = Path("/etc/swapfs/master.key")

_CHAIN_ID = struct.Struct(">I")
# BLAKE3 key derivation contexts: fixed, unique to their purpose.
_KEY_ID_CONTEXT = "swapfs 2026-11-27 master key id"
_WRAP_CONTEXT = "swapfs 2026-11-27 chain secret wrapping key"  # index format 3 only
_BOUND_WRAP_CONTEXT = "swapfs 2026-12-06 chain secret wrapping key bound to a state"
DIGEST_KEY_CONTEXT = "swapfs 2026-11-27 chain digest key"
DATA_KEY_CONTEXT = "swapfs 2026-11-27 chain data key"


def derive(context: str, material: bytes) -> bytes:
    """A 32-byte key for *context* from secret *material* (BLAKE3's KDF)."""
    return blake3.blake3(material, derive_key_context=context).digest(32)


class MasterKey:
    """The key that opens an encrypted state directory."""

    __slots__ = ("_secret", "source")

    def __init__(self, secret: bytes, source: str) -> None:
        if len(secret) != MASTER_KEY_SIZE:
            raise SwapfsError(errno.EINVAL, f"{source}: a master key is "
                              f"{MASTER_KEY_SIZE} bytes, not {len(secret)}")
        self._secret = secret
        #: Where the key came from, for messages (never the key itself).
        self.source = source

    def __repr__(self) -> str:
        return f"MasterKey(source={self.source!r})"

    @property
    def key_id(self) -> int:
        """A 64-bit number that names the key, stored in the state so that
        a wrong key is told apart from damage. It reveals nothing of the key."""
        return int.from_bytes(derive(_KEY_ID_CONTEXT, self._secret)[:8], "big")

    def _wrapping_key(self, state_id: bytes | None, chain_id: int) -> bytes:
        if state_id is None:  # index format 3
            return derive(_WRAP_CONTEXT, self._secret + _CHAIN_ID.pack(chain_id))
        return derive(_BOUND_WRAP_CONTEXT,
                      self._secret + state_id + _CHAIN_ID.pack(chain_id))

    def wrap(self, state_id: bytes, chain_id: int, secret: bytes) -> bytes:
        """Chain *chain_id*'s *secret*, wrapped for its index record in the
        state whose UUID is *state_id*."""
        return aes_key_wrap(self._wrapping_key(state_id, chain_id), secret)

    def unwrap(self, state_id: bytes | None, chain_id: int, wrapped: bytes) -> bytes:
        """The secret of chain *chain_id* in state *state_id* (None: a state
        of index format 3, which had no UUID); CorruptIndex (EIO) if the
        record was damaged or belongs to another chain or another state."""
        try:
            return aes_key_unwrap(self._wrapping_key(state_id, chain_id), wrapped)
        except (InvalidUnwrap, ValueError):
            raise CorruptIndex(f"the key of chain {chain_id} does not unwrap: its "
                               "index record is damaged, or was made for another "
                               "chain or state") from None


def new_chain_secret() -> bytes:
    return secrets.token_bytes(CHAIN_SECRET_SIZE)


def new_state_id() -> bytes:
    """A new state's UUID (random, version 4)."""
    return uuid.uuid4().bytes


def key_id_text(key_id: int) -> str:
    return f"{key_id:016x}"


def load(key_file: Path | None = None) -> MasterKey | None:
    """The master key: from *key_file* if one is named (an error if it is
    missing), else the systemd credential if the process was given one, else
    the default key file if it exists; None when there is none."""
    if key_file is not None:
        return read(key_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).exists():
        return read(Path(credentials) / CREDENTIAL)
    if DEFAULT_KEY_FILE.exists():
        return read(DEFAULT_KEY_FILE)
    return None


def read(path: Path) -> MasterKey:
    """The master key in *path*: 32 bytes, raw or as 64 hexadecimal digits.

    EACCES when the file's group or others have any access to it or
    another user owns it, ENOKEY when it is missing, EINVAL when it does not
    hold a key.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SwapfsError(errno.ENOKEY, f"no master key file {path}") from None
    except OSError as exc:
        raise SwapfsError(exc.errno or errno.EIO, f"cannot open {path}: {exc.strerror}") \
            from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SwapfsError(errno.EINVAL, f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise SwapfsError(errno.EACCES, f"{path} is owned by uid {info.st_uid}, not "
                              f"{os.geteuid()}: a key another user owns protects nothing; "
                              f"chown {os.geteuid()} it")
        if info.st_mode & 0o077:
            raise SwapfsError(errno.EACCES, f"{path} is accessible by group or others "
                              f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        raw = os.read(fd, 4 * MASTER_KEY_SIZE)
    finally:
        os.close(fd)
    if len(raw) != MASTER_KEY_SIZE:
        text = raw.strip()
        try:
            raw = bytes.fromhex(text.decode("ascii")) if len(text) == 2 * MASTER_KEY_SIZE \
                else b""
        except (UnicodeDecodeError, ValueError):
            raw = b""
        if len(raw) != MASTER_KEY_SIZE:
            raise SwapfsError(errno.EINVAL, f"{path} holds no master key: {MASTER_KEY_SIZE} "
                              f"bytes, raw or as {2 * MASTER_KEY_SIZE} hexadecimal digits")
    return MasterKey(raw, str(path))


def generate(path: Path) -> MasterKey:
    """Write a new random master key to *path* (mode 0600, never over an
    existing file), as 64 hexadecimal digits and a newline."""
    secret = secrets.token_bytes(MASTER_KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SwapfsError(errno.EEXIST, f"{path} exists; swapfs never overwrites a key") \
            from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secret.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return MasterKey(secret, str(path))
