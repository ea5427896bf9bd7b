"""What the daemon, the command line and the drivers say to each other: the
control protocol and the drivers' sealed records. Imports no other floor, so
that the guest side carries nothing of the engine."""

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
    "ControlError",
    "DRIVER_OPS",
    "DriverError",
    "Extent",
    "KeyExchange",
    "MAX_EXTENTS",
    "MAX_LINE",
    "MAX_SEALED",
    "MAX_VALUE",
    "NAME_PATTERN",
    "PAGE_SIZE",
    "RecordError",
    "RecordKey",
    "Records",
    "SOURCE_PREFIX",
    "check_message",
    "check_name",
    "decode_bytes",
    "encode_bytes",
    "nodump",
    "protocol",
    "swapfs_sockets",
    "unescape",
    "unix_peer",
]
