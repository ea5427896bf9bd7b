"""The driver's scan: ELF program headers, unused code-page bytes, the CLI.

The figures are checked against ones the tests compute on their own: the
program headers as ``readelf -lW`` prints them and the mappings as the
kernel lists them, never through swapfs.guest.elf or swapfs.guest.codescan.
"""

import io
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from swapfs.guest import (
    PF_X,
    PT_LOAD,
    Mapping,
    NotElf,
    ProgramHeader,
    TruncatedElf,
    parse_maps,
    read_program_headers,
    scan,
    unused_parts,
)

PAGE = mmap.PAGESIZE

needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None,
                                   reason="readelf (binutils) is not installed")


def readelf_loads(path: str) -> list[tuple[int, int, int, int, bool]]:
    """(offset, vaddr, filesz, memsz, executable) of every PT_LOAD, per readelf."""
    output = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True,
                            check=True).stdout
    loads = []
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            offset, vaddr, _paddr, filesz, memsz = (int(value, 16) for value in fields[1:6])
            loads.append((offset, vaddr, filesz, memsz, "E" in fields[6:-1]))
    return loads


def mapped_libc() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    pytest.skip("this interpreter maps no libc")


# --- ELF program headers ------------------------------------------------------------


@needs_readelf
@pytest.mark.parametrize("which", ["sleep", "python", "libc"])
def test_program_headers_of_real_binaries_match_readelf(which: str) -> None:
    path = {"sleep": lambda: shutil.which("sleep") or "/bin/sleep",
            "python": lambda: os.path.realpath(sys.executable),
            "libc": mapped_libc}[which]()
    with open(path, "rb") as file:
        headers = read_program_headers(file)
    loads = [(h.offset, h.vaddr, h.filesz, h.memsz, bool(h.flags & PF_X))
             for h in headers if h.type == PT_LOAD]
    assert loads == readelf_loads(path)
    assert any(h.executable_load for h in headers)


def elf_image(bits: int, order: str, phdrs: Sequence[tuple[int, ...]], phoff: int = 0x40) -> bytes:
    """A minimal ELF file: the header, then the program header table at ``phoff``.

    Each phdr is (type, flags, offset, vaddr, paddr, filesz, memsz, align),
    laid out the way its class lays it out.
    """
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if order == "<" else 2, 1])
    ident = ident.ljust(16, b"\0")
    if bits == 64:
        header = struct.pack(order + "HHIQQQIHHHHHH", 2, 62, 1, 0x401000, phoff, 0, 0, 64,
                             56, len(phdrs), 64, 0, 0)
        table = b"".join(struct.pack(order + "IIQQQQQQ", *p) for p in phdrs)
    else:
        header = struct.pack(order + "HHIIIIIHHHHHH", 2, 8, 1, 0x401000, phoff, 0, 0, 52,
                             32, len(phdrs), 40, 0, 0)
        table = b"".join(struct.pack(order + "IIIIIIII", t, o, v, pa, fs, ms, f, a)
                         for t, f, o, v, pa, fs, ms, a in phdrs)
    return (ident + header).ljust(phoff, b"\0") + table


PHDRS = [
    (6, 4, 0x40, 0x400040, 0x400040, 0xA8, 0xA8, 8),  # PT_PHDR
    (1, 4, 0x0, 0x400000, 0x400000, 0x1E8, 0x1E8, 0x1000),  # PT_LOAD r--
    (1, 5, 0x1234, 0x401234, 0x401234, 0x2345, 0x2345, 0x1000),  # PT_LOAD r-x
    (1, 6, 0x4000, 0x404000, 0x404000, 0x10, 0x80, 0x1000),  # PT_LOAD rw-, with bss
]


@pytest.mark.parametrize("bits, order", [(64, "<"), (32, ">"), (64, ">"), (32, "<")])
def test_crafted_program_headers_read_back_as_written(bits: int, order: str) -> None:
    headers = read_program_headers(io.BytesIO(elf_image(bits, order, PHDRS)))
    assert headers == [ProgramHeader(i, t, f, o, v, fs, ms)
                       for i, (t, f, o, v, _pa, fs, ms, _a) in enumerate(PHDRS)]
    assert [h.executable_load for h in headers] == [False, False, True, False]


@pytest.mark.parametrize("data", [b"", b"\x7fEL", b"#!/bin/sh\necho hello\n" * 10,
                                  b"\x7fELF\x03\x01" + bytes(100)])
def test_not_elf(data: bytes) -> None:
    with pytest.raises(NotElf):
        read_program_headers(io.BytesIO(data))


@pytest.mark.parametrize("cut", [10, 16, 40, 0x40 + 56 + 3])
def test_truncated_headers(cut: int) -> None:
    image = elf_image(64, "<", PHDRS)
    with pytest.raises(TruncatedElf):
        read_program_headers(io.BytesIO(image[:cut]))


# --- Unused bytes of one mapping -------------------------------------------------------

CODE = ProgramHeader(2, PT_LOAD, 5, 0x1234, 0x401234, 0x2345, 0x2345)  # pages 0x1000-0x4000


def mapping(start: int, offset: int, pages: int) -> Mapping:
    return Mapping(start, start + pages * PAGE, "r-xp", offset, "fe:00", 7, "/x")


@pytest.mark.skipif(PAGE != 4096, reason="the figures are worked out for 4 KiB pages")
def test_head_and_tail_follow_the_definition() -> None:
    # Whole segment mapped: head 0x234 bytes at the start of its first page,
    # tail from its end (0x3579) up to the page boundary 0x4000.
    assert unused_parts(mapping(0x7000, 0x1000, 3), CODE) == [
        ("head", 0x7000, 0x234), ("tail", 0x7000 + 0x2579, 0x1000 - 0x579)]
    # Only the first page mapped: the head only; only the last: the tail only.
    assert unused_parts(mapping(0x7000, 0x1000, 1), CODE) == [("head", 0x7000, 0x234)]
    assert unused_parts(mapping(0x9000, 0x3000, 1), CODE) == [("tail", 0x9579, 0xA87)]
    # A mapping of other pages of the file, or of a segment that is not code.
    assert unused_parts(mapping(0x9000, 0x4000, 2), CODE) == []
    data = ProgramHeader(3, PT_LOAD, 6, 0x1234, 0x401234, 0x2345, 0x2345)
    assert unused_parts(mapping(0x7000, 0x1000, 3), data) == []


def test_maps_lines_with_spaces_and_without_paths() -> None:
    text = ("55d0c0a00000-55d0c0a02000 r-xp 00002000 fe:01 1234    /opt/my app/bin (deleted)\n"
            "7ffd1a000000-7ffd1a002000 r-xp 00000000 00:00 0       [vdso]\n"
            "7ffd1b000000-7ffd1b021000 rw-p 00000000 00:00 0\n")
    first, vdso, anonymous = parse_maps(text)
    assert first == Mapping(0x55D0C0A00000, 0x55D0C0A02000, "r-xp", 0x2000, "fe:01", 1234,
                            "/opt/my app/bin (deleted)")
    assert first.executable_file and first.map_files_name == "55d0c0a00000-55d0c0a02000"
    assert not vdso.executable_file and not anonymous.executable_file


# --- Real processes ------------------------------------------------------------------


def wait_loaded(pid: int, marker: str) -> None:
    """Until the dynamic loader has mapped libc and the process has run past it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        maps = Path(f"/proc/{pid}/maps").read_text()
        if marker in maps and "libc" in maps:
            time.sleep(0.1)  # past the loader's last mprotect
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not map {marker} and libc")


@pytest.fixture
def sleepers(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """Three processes running a copy of sleep whose inode only this test uses."""
    binary = tmp_path / "swapfs-test-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(3):
            processes.append(subprocess.Popen([str(binary), "300"]))
        for process in processes:
            wait_loaded(process.pid, str(binary))
        yield binary, [process.pid for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def expected_figures(pids: list[int]) -> tuple[int, int, dict[tuple[str, int], int]]:
    """(per process, physical, unused bytes by file) worked out from readelf and maps.

    It relies on the layout every current toolchain produces and asserts it:
    each executable mapping maps exactly the pages of one code segment.
    """
    per_process = 0
    by_file: dict[tuple[str, int], int] = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or "x" not in fields[1] or not fields[5].startswith("/"):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            offset = int(fields[2], 16)
            codes = [(o, fs) for o, _v, fs, _m, x in readelf_loads(fields[5])
                     if x and o // PAGE * PAGE == offset]
            assert len(codes) == 1, line
            o, fs = codes[0]
            assert end - start == -(-(o + fs) // PAGE) * PAGE - offset, line
            unused = o % PAGE + -(o + fs) % PAGE
            per_process += unused
            by_file[(fields[3], int(fields[4]))] = unused
    return per_process, sum(by_file.values()), by_file


@needs_readelf
def test_scan_of_three_copies_matches_an_independent_count(
        sleepers: tuple[Path, list[int]]) -> None:
    binary, pids = sleepers
    result = scan(pids)
    per_process, physical, by_file = expected_figures(pids)
    assert (result.per_process_bytes, result.physical_bytes) == (per_process, physical)
    assert result.processes == 3 and not +result.skipped
    # The copy's own unused bytes: three times per process, once physically.
    inode = os.stat(binary).st_ino
    own = [e for e in result.extents if e.inode == inode]
    assert {e.pid for e in own} == set(pids)
    own_unused = sum(unused for (_dev, ino), unused in by_file.items() if ino == inode)
    assert own_unused > 0
    assert sum(e.length for e in own) == 3 * own_unused
    assert sum({e.physical_key: e.length for e in own}.values()) == own_unused
    # Every extent lies inside an executable mapping of its process.
    for extent in result.extents:
        maps = parse_maps(Path(f"/proc/{extent.pid}/maps").read_text())
        assert any(m.executable_file and m.start <= extent.address
                   and extent.address + extent.length <= m.end for m in maps)


@needs_readelf
def test_processes_gone_by_the_rescan_are_skipped(tmp_path: Path) -> None:
    binary = tmp_path / "swapfs-test-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    processes = [subprocess.Popen([str(binary), "300"]) for _ in range(3)]
    try:
        for process in processes:
            wait_loaded(process.pid, str(binary))
        assert scan([p.pid for p in processes]).per_process_bytes > 0
    finally:
        for process in processes:
            process.kill()
            process.wait()
    result = scan([p.pid for p in processes])
    assert (result.per_process_bytes, result.physical_bytes, result.processes) == (0, 0, 0)
    assert result.skipped["vanished"] == 3 and result.extents == []


def test_a_pid_that_does_not_exist_is_skipped_as_vanished() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    result = scan([pid_max + 1])
    assert result.skipped == {"vanished": 1}
    assert (result.processes, result.per_process_bytes) == (0, 0)


def test_a_deleted_binary_is_read_through_map_files(tmp_path: Path) -> None:
    binary = tmp_path / "swapfs-test-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    inode = os.stat(binary).st_ino
    process = subprocess.Popen([str(binary), "300"])
    try:
        wait_loaded(process.pid, str(binary))
        before = scan([process.pid])
        binary.unlink()
        after = scan([process.pid])
    finally:
        process.kill()
        process.wait()
    assert not +after.skipped
    assert after.per_process_bytes == before.per_process_bytes
    assert any(e.inode == inode and e.path.endswith("(deleted)") for e in after.extents)


_MAP_EXECUTABLE = """
import mmap, sys, time
maps = []
for path in sys.argv[1:]:
    with open(path, "rb") as file:
        maps.append(mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_EXEC))
print("mapped", flush=True)
time.sleep(300)
"""


def test_executable_mappings_of_non_elf_and_truncated_files_are_skipped(
        tmp_path: Path) -> None:
    not_elf = tmp_path / "not-elf"
    not_elf.write_bytes(b"#!/bin/sh\n" + bytes(PAGE))
    truncated = tmp_path / "truncated-elf"
    truncated.write_bytes(Path(shutil.which("sleep") or "/bin/sleep").read_bytes()[:100])
    child = subprocess.Popen([sys.executable, "-c", _MAP_EXECUTABLE, str(not_elf),
                              str(truncated)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"mapped\n"
        result = scan([child.pid])
    finally:
        child.kill()
        child.wait()
    assert result.skipped == {"not_elf": 1, "truncated": 1}
    assert result.processes == 1 and result.per_process_bytes > 0  # the interpreter's code
    assert not {e.path for e in result.extents} & {str(not_elf), str(truncated)}


# --- The command ---------------------------------------------------------------------


def test_scan_command_prints_the_library_figures_as_json(
        sleepers: tuple[Path, list[int]]) -> None:
    _binary, pids = sleepers
    script = Path(sys.executable).parent / "swapfs-driver"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "swapfs.guest.driver"]
    output = subprocess.run([*command, "scan", "--json", "--pid", *map(str, pids)],
                            capture_output=True, text=True, check=True).stdout
    printed = json.loads(output)
    assert {"per_process_bytes", "physical_bytes", "extents", "skipped", "processes",
            "mappings"} <= printed.keys()
    assert printed == scan(pids).as_dict()
    assert set(printed["extents"][0]) >= {"pid", "path", "device", "inode", "address",
                                          "length"}


def test_scan_command_prints_totals_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    from swapfs.guest import main

    assert main(["scan", "--pid", str(os.getpid())]) == 0
    text = capsys.readouterr().out
    assert "per process:" in text and "physical:" in text and "vanished: 0" in text
