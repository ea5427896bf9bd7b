"""Just enough ELF to find where a file's code lies: its program headers.

The driver needs, for each loadable segment, the file range it occupies and
whether it is executable; everything else in an ELF file (sections, symbols,
dynamic tables) is of no use to it. So this reads the ELF header and the
program header table with :mod:`struct`, for both classes (32 and 64 bit)
and both byte orders, and nothing more. A file that is not ELF raises
:class:`NotElf`; one that ends before its headers do raises
:class:`TruncatedElf`, so a caller can count the two apart.
"""

import struct
from dataclasses import dataclass
from typing import BinaryIO

PT_LOAD = 1
PF_X = 1

_MAGIC = b"\x7fELF"
_CLASSES = {1: 32, 2: 64}
_ORDERS = {1: "<", 2: ">"}
_IDENT_SIZE = 16

# After e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum (the rest is about sections).
_HEADER = {32: "HHIIIIIHHH", 64: "HHIQQQIHHH"}
# The two classes order the fields of a program header differently.
_PHDR = {32: "IIIIIIII", 64: "IIQQQQQQ"}


class ElfError(Exception):
    """The file's ELF headers cannot be read."""


class NotElf(ElfError):
    """The file is not an ELF file (or not one of a kind this reads)."""


class TruncatedElf(ElfError):
    """The file ends before its ELF header or program header table does."""


@dataclass(frozen=True)
class ProgramHeader:
    """One entry of the program header table; ``index`` is its position in it."""

    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int

    @property
    def executable_load(self) -> bool:
        """A segment the loader maps with execute permission: code."""
        return self.type == PT_LOAD and bool(self.flags & PF_X)


def _read_exactly(file: BinaryIO, offset: int, size: int, what: str) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) < size:
        raise TruncatedElf(f"{what}: wanted {size} bytes at {offset}, the file has {len(data)}")
    return data


def read_program_headers(file: BinaryIO) -> list[ProgramHeader]:
    """Every program header of the ELF file open in ``file`` (binary, seekable).

    ``e_phnum`` is taken as given: the PN_XNUM escape (more than 65534
    entries, the count moved to section 0) never occurs in code a process
    maps, and such a file reads as truncated.
    """
    file.seek(0)
    ident = file.read(_IDENT_SIZE)
    if ident[:4] != _MAGIC:
        raise NotElf("no ELF magic number")
    if len(ident) < _IDENT_SIZE:
        raise TruncatedElf(f"ELF identification: {len(ident)} of {_IDENT_SIZE} bytes")
    bits = _CLASSES.get(ident[4])
    order = _ORDERS.get(ident[5])
    if bits is None or order is None:
        raise NotElf(f"unknown ELF class {ident[4]} or byte order {ident[5]}")
    header = struct.Struct(order + _HEADER[bits])
    fields = header.unpack(_read_exactly(file, _IDENT_SIZE, header.size, "ELF header"))
    phoff, phentsize, phnum = fields[4], fields[8], fields[9]
    entry = struct.Struct(order + _PHDR[bits])
    if phnum and phentsize < entry.size:
        raise NotElf(f"program header entries of {phentsize} bytes, {entry.size} needed")
    table = _read_exactly(file, phoff, phnum * phentsize, "program header table")
    headers = []
    for index in range(phnum):
        values = entry.unpack_from(table, index * phentsize)
        if bits == 64:
            p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = values
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_flags, _align = values
        headers.append(ProgramHeader(index, p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz))
    return headers
