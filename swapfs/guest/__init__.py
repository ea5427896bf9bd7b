"""The guest side: what runs where the swapping processes live.

``swapfs-driver`` (:func:`main`, ``driver.py``) finds the unused bytes in
the code pages of its host or virtual machine (:func:`scan`,
``codescan.py``, reading ELF program headers with
:func:`read_program_headers`, ``elf.py``), reports them to the daemon,
which pools them into the transient cache; ``swapfs-driver secret`` keeps
sealed records in the driver's share of it. It reaches the daemon over one
of the transports of ``transport.py`` (:class:`Transport`): the host's
Unix socket, or from inside a virtual machine vsock or the VM's
virtio-serial port (:data:`PORT_NAME`).

This package imports only :mod:`swapfs.control`, so a guest carries
nothing of the engine, LMDB or FUSE (``tests/test_layers.py`` checks); and
nothing below imports it: the pool takes any region with a physical key
and a length (``swapfs.cache.transient.Region``).
"""

from swapfs.guest.codescan import Mapping, parse_maps, scan, unused_parts
from swapfs.guest.driver import main
from swapfs.guest.elf import (
    PF_X,
    PT_LOAD,
    NotElf,
    ProgramHeader,
    TruncatedElf,
    read_program_headers,
)
from swapfs.guest.transport import PORT_NAME, Transport, port_device

__all__ = [
    # The driver, and how it reaches the daemon.
    "main",
    "Transport",
    "PORT_NAME",
    "port_device",
    # Finding the unused bytes of code pages.
    "scan",
    "Mapping",
    "parse_maps",
    "unused_parts",
    # Reading ELF program headers.
    "ProgramHeader",
    "read_program_headers",
    "NotElf",
    "TruncatedElf",
    "PT_LOAD",
    "PF_X",
]
