"""The guest side: what runs where the swapping processes live.

``swapfs-driver`` (:mod:`.driver`) finds the unused bytes in the code pages
of its host or virtual machine (:mod:`.codescan`, reading ELF program
headers with :mod:`.elf`) and reports them to the daemon, which pools them
into the transient cache. The storage engine never imports this package:
the pool takes any region with a physical key and a length
(``swapfs.cache.transient.Region``).
"""

from swapfs.guest import codescan
from swapfs.guest.codescan import PAGE_SIZE, Mapping, scan, unused_parts
from swapfs.guest.driver import main
from swapfs.guest.elf import (
    PF_X,
    PT_LOAD,
    NotElf,
    ProgramHeader,
    TruncatedElf,
    read_program_headers,
)

__all__ = [
    "Mapping",
    "NotElf",
    "PAGE_SIZE",
    "PF_X",
    "PT_LOAD",
    "ProgramHeader",
    "TruncatedElf",
    "codescan",
    "main",
    "read_program_headers",
    "scan",
    "unused_parts",
]
