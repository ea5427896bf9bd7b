#!/usr/bin/env python3
"""What a pool in a guest's code pages would do to the guest's files.

The seeds' transient pool keeps blocks in the unused bytes of code pages
inside the guests: the bytes of a code segment's first and last pages
outside its file range (:mod:`swapfs.guest.codescan`). This probe tries
the one step such a pool takes, with a real guest, and shows what the
guest sees:

1. the guest (tools/guest.py, its RAM a file the host maps: a
   ``memory-backend-file`` shared with QEMU) finds the largest unused tail
   of its own interpreter's code, with the driver's scan, and the guest
   physical address of those bytes (``/proc/self/pagemap``); it prints
   them, the file offset they hold, and the file's SHA-256 as ``read()``
   returns it;
2. the host writes random bytes there, in the guest's RAM, as a pool
   would place a sealed block;
3. the guest reads the file again with ``read()``, and its own mapping.

A code page is a page of the guest's page cache: the bytes past the
segment are the file's own bytes at those offsets (padding, or the next
section), which every ``read()`` of the file returns. So step 3 sees the
host's bytes in the file: its checksum changes, and stays changed for as
long as the page is cached. The probe prints both and exits 0 when the
file read back changed exactly where the host wrote.

    python tools/lendprobe.py           # about 20 s under TCG
    python tools/lendprobe.py --json

The guest is killed (by pid) when the probe ends, however it ends, and the
RAM file removed.
"""

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

PAGE = 4096
PREFIX = "lendprobe:"
CONTROL_PORT = "org.swapfs.probe"


# -- the guest's side ----------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _physical(address: int) -> int:
    """The guest physical address of this process's virtual *address* (root)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE * 8)
        entry = int.from_bytes(pagemap.read(8), "little")
    if not entry >> 63:
        raise RuntimeError(f"{address:#x} is not resident")
    pfn = entry & ((1 << 55) - 1)
    if not pfn:
        raise RuntimeError("pagemap shows no frame numbers: not root?")
    return pfn * PAGE + address % PAGE


def _memory(address: int, length: int) -> bytes:
    with open("/proc/self/mem", "rb") as memory:
        memory.seek(address)
        return memory.read(length)


def _cached_frame(path: str, offset: int) -> int:
    """The frame of the file's cached page at *offset* now: a fresh shared
    mapping of that page, read once, points at the page cache's page."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    with open(path, "rb") as file:
        address = libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(),
                            offset // PAGE * PAGE)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            ctypes.string_at(address, 1)
            return _physical(address) // PAGE
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(PAGE))


def _state(path: str, offset: int, address: int, length: int) -> dict[str, Any]:
    with open(path, "rb") as file:
        file.seek(offset)
        in_file = file.read(length)
    return {"sha256": _sha256(path), "file_bytes": in_file.hex(),
            "mapped_bytes": _memory(address, length).hex(),
            "mapped_frame": _physical(address) // PAGE,
            "file_frame": _cached_frame(path, offset)}


def guest_main() -> int:
    """Find a tail, report it, wait for the host's write, report again."""
    from swapfs.guest import parse_maps, scan

    maps = parse_maps(Path("/proc/self/maps").read_text())
    tails = [extent for extent in scan([os.getpid()]).extents if extent.part == "tail"]
    extent = max(tails, key=lambda extent: extent.length)
    mapping = next(m for m in maps if m.start <= extent.address < m.end)
    offset = mapping.offset + extent.address - mapping.start
    _memory(extent.address, 1)  # resident, so that it has a frame
    report = {"path": extent.path, "file_offset": offset, "file_size":
              os.stat(extent.path).st_size, "length": extent.length,
              "guest_physical": _physical(extent.address),
              "before": _state(extent.path, offset, extent.address, extent.length)}
    print(f"{PREFIX} {json.dumps(report)}", flush=True)
    control = next(port for port in Path("/sys/class/virtio-ports").iterdir()
                   if (port / "name").read_text().strip() == CONTROL_PORT)
    with open(f"/dev/{control.name}", "rb") as commands:
        commands.readline()  # the host wrote
    after = _state(extent.path, offset, extent.address, extent.length)
    print(f"{PREFIX} {json.dumps({'after': after})}", flush=True)
    return 0


# -- the host's side -----------------------------------------------------------------


def probe(timeout: float = 300.0) -> dict[str, Any]:
    """Boot the guest, write where it says, and return what it saw."""
    from tools.guest import Guest

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lendprobe-",
                                                                    dir="/var/tmp")))
        ram = Path(tempfile.mktemp(prefix="swapfs-lendprobe-", dir="/dev/shm"))
        stack.callback(lambda: ram.unlink(missing_ok=True))
        control = work / "probe.sock"
        script = (f"cd {ROOT} && exec {sys.executable} {Path(__file__).resolve()} "
                  "--in-guest")
        guest = stack.enter_context(Guest(script, memory_mib=384, cpus=1, workdir=work,
                                          channels={CONTROL_PORT: control},
                                          memory_file=ram))
        deadline = time.monotonic() + timeout
        reports = []
        connection = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        for line in guest.lines(timeout):
            if not line.startswith(PREFIX):
                continue
            reports.append(json.loads(line[len(PREFIX):]))
            if len(reports) == 2:
                break
            found = reports[0]
            written = os.urandom(found["length"])
            with open(ram, "r+b") as memory:
                memory.seek(found["guest_physical"])
                memory.write(written)
            found["host_wrote"] = written.hex()
            while connection.connect_ex(str(control)) != 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("QEMU's probe port never came up")
                time.sleep(0.1)
            connection.sendall(b"written\n")
        guest.wait(60)
        if len(reports) != 2:
            tail = "\n".join(guest.transcript.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the guest reported {len(reports)} of 2 steps:\n{tail}")
    result = {**reports[0], **reports[1]}
    result["file_changed"] = result["before"]["sha256"] != result["after"]["sha256"]
    result["read_returns_host_bytes"] = result["after"]["file_bytes"] == result["host_wrote"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        return guest_main()
    result = probe()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['path']}: {result['length']} unused bytes after its code, at file "
              f"offset {result['file_offset']} of {result['file_size']}, guest physical "
              f"{result['guest_physical']:#x}")
        print(f"before: sha256 {result['before']['sha256']}, file bytes "
              f"{result['before']['file_bytes'][:32]}...")
        print(f"host wrote {result['host_wrote'][:32]}... into the guest's RAM there")
        print(f"after:  sha256 {result['after']['sha256']}, file bytes "
              f"{result['after']['file_bytes'][:32]}...")
        print("read() of the file returns the host's bytes" if result["read_returns_host_bytes"]
              else "read() of the file does not return the host's bytes")
    return 0 if result["file_changed"] and result["read_returns_host_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
