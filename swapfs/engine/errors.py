"""The error types the engine raises.

Every failure the engine can name carries the errno that the FUSE layer
answers with, so `fs.py` translates without guessing.
"""

import errno
import os


class SwapfsError(Exception):
    """An engine failure with the errno a caller should see."""

    def __init__(self, errno_: int, message: str | None = None) -> None:
        super().__init__(message or os.strerror(errno_))
        self.errno = errno_

    @classmethod
    def of(cls, exc: OSError) -> "SwapfsError":
        """Wrap an OSError from the backing file system, keeping its errno."""
        return cls(exc.errno or errno.EIO, str(exc))


class CorruptBlock(SwapfsError):
    """A stored block whose data no longer matches its digest (answered EIO);
    *slot* of chain *chain_id* when the damaged block is known."""

    def __init__(self, message: str, chain_id: int | None = None,
                 slot: int | None = None) -> None:
        super().__init__(errno.EIO, message)
        self.chain_id = chain_id
        self.slot = slot


class CorruptIndex(SwapfsError):
    """An index record that does not verify against its checksum, or that is
    missing where the index says one must be (answered EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)
