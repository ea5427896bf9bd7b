"""What the daemon, the command line and the guests' drivers share.

- The control protocol (:mod:`protocol`): one JSON object a line over the
  daemon's socket; a client calls ``protocol.request`` or holds a
  ``protocol.Connection``. The names below it are the driver messages'
  vocabulary, which the daemon and the drivers check alike: their bounds,
  :class:`Extent`, :func:`check_message` and :class:`DriverError`.
- Sealed records (``records.py``): the key a driver and the daemon agree
  (:class:`KeyExchange`, :class:`RecordKey`) and the daemon's store of the
  sealed records (:class:`Records`), counted in slots of the size the daemon
  gives it.
- :mod:`nodump`: keeping a process's memory out of core dumps.

This package imports no other floor, so that the guest side, which imports
only this one, carries nothing of the engine.
"""

from swapfs.control import nodump, protocol
from swapfs.control.protocol import (
    DRIVER_OPS,
    MAX_EXTENTS,
    MAX_LINE,
    NAME_PATTERN,
    PAGE_SIZE,
    SOURCE_PREFIX,
    ControlError,
    DriverError,
    Extent,
    check_message,
    check_name,
    decode_bytes,
    encode_bytes,
    swapfs_sockets,
    unescape,
    unix_peer,
)
from swapfs.control.records import (
    MAX_SEALED,
    MAX_VALUE,
    KeyExchange,
    RecordError,
    RecordKey,
    Records,
)

__all__ = [
    # The control protocol: the module clients call, and its mounts and sockets.
    "protocol",
    "ControlError",
    "SOURCE_PREFIX",
    "swapfs_sockets",
    "unescape",
    "unix_peer",
    # The driver messages.
    "DRIVER_OPS",
    "MAX_LINE",
    "MAX_EXTENTS",
    "PAGE_SIZE",
    "NAME_PATTERN",
    "Extent",
    "DriverError",
    "check_message",
    "check_name",
    "encode_bytes",
    "decode_bytes",
    # Sealed records.
    "MAX_VALUE",
    "MAX_SEALED",
    "KeyExchange",
    "RecordKey",
    "RecordError",
    "Records",
    # No core dumps.
    "nodump",
]
