#!/usr/bin/env python3
"""The swapfs demo: a clone chain on a real mount, and what dedup saves.

It mounts swapfs on a temporary state directory, writes a parent's swap
file, clones it into four VMs, lets each VM diverge a little (pages of its
own, pages all VMs share), checks every byte, and prints the figures. A
second chain with the same parent shows that dedup stops at the chain.
Everything it sets up is undone on the way out, Ctrl-C included.

Run it with ``make demo`` (which installs what it needs first).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAGE = 4096
MIB = 1 << 20
IMAGE_MIB = 64  # the parent's swapped-out pages
OWN_MIB = 4  # pages each VM writes that nobody else has
SHARED_MIB = 8  # pages every VM writes alike after boot (a common library, say)
VMS = 4

SWAPFS = [sys.executable, "-m", "swapfs.cli"]


def page(seed: str, number: int) -> bytes:
    """A reproducible 4 KiB page; every eighth page of an image is zeros."""
    if number % 8 == 7:
        return bytes(PAGE)
    return hashlib.shake_256(f"{seed}:{number}".encode()).digest(PAGE)


def pages(seed: str, first: int, count: int) -> bytes:
    return b"".join(page(seed, number) for number in range(first, first + count))


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def swapfs(*args: str) -> str:
    return subprocess.run([*SWAPFS, *args], check=True, capture_output=True,
                          text=True).stdout


def write_file(path: Path, offset: int, data: bytes) -> float:
    """Write *data* at *offset* in 1 MiB requests; returns MB/s."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for pos in range(0, len(data), MIB):
            os.pwrite(fd, data[pos:pos + MIB], offset + pos)
    finally:
        os.close(fd)
    return len(data) / MIB / (time.perf_counter() - start)


def expected_vm(number: int) -> bytes:
    """A VM's swap file: the parent's image, then its own and the shared pages."""
    image = bytearray(pages("parent", 0, IMAGE_MIB * MIB // PAGE))
    own = pages(f"vm{number}", 0, OWN_MIB * MIB // PAGE)
    shared = pages("libshared", 0, SHARED_MIB * MIB // PAGE)
    image[:len(own)] = own
    image[len(own):len(own) + len(shared)] = shared
    return bytes(image)


def run(workdir: Path) -> dict[str, Any]:
    state, mnt = workdir / "state", workdir / "mnt"
    mnt.mkdir()
    step(f"mounting swapfs: state {state}, mount point {mnt}")
    swapfs("mount", "--state", str(state), str(mnt))
    try:
        chain = mnt / "web"
        chain.mkdir()
        parent = chain / "base.swap"
        parent.touch()
        os.truncate(parent, 256 * MIB)
        image = pages("parent", 0, IMAGE_MIB * MIB // PAGE)
        speed = write_file(parent, 0, image)
        step(f"wrote the parent's {IMAGE_MIB} MiB of swapped-out pages ({speed:.0f} MB/s)")

        start = time.perf_counter()
        for number in range(1, VMS + 1):
            swapfs("clone", str(parent), str(chain / f"vm{number}.swap"))
        step(f"cloned {VMS} VMs from it in {1000 * (time.perf_counter() - start):.0f} ms "
             "(no data copied)")

        shared = pages("libshared", 0, SHARED_MIB * MIB // PAGE)
        for number in range(1, VMS + 1):
            vm = chain / f"vm{number}.swap"
            write_file(vm, 0, pages(f"vm{number}", 0, OWN_MIB * MIB // PAGE))
            write_file(vm, OWN_MIB * MIB, shared)
        step(f"each VM swapped out {OWN_MIB} MiB of its own pages and {SHARED_MIB} MiB "
             "that all VMs share")

        other = mnt / "db"
        other.mkdir()
        (other / "base.swap").touch()
        write_file(other / "base.swap", 0, image)
        step("a second chain, 'db', got the same parent image (chains never share blocks)")

        step("verifying every byte")
        start = time.perf_counter()
        checked = 0
        for number in range(1, VMS + 1):
            data = (chain / f"vm{number}.swap").read_bytes()[:IMAGE_MIB * MIB]
            if data != expected_vm(number):
                raise SystemExit(f"vm{number}.swap does not read back as written")
            checked += len(data)
        for path in (parent, other / "base.swap"):
            if path.read_bytes()[:IMAGE_MIB * MIB] != image:
                raise SystemExit(f"{path} does not read back as written")
            checked += len(image)
        read_speed = checked / MIB / (time.perf_counter() - start)
        step(f"all {checked // MIB} MiB read back equal ({read_speed:.0f} MB/s)")

        print(swapfs("stats", str(mnt)))
        stats = json.loads(swapfs("stats", "--json", str(mnt)))
    finally:
        step("unmounting")
        swapfs("umount", str(mnt))
    fsck = subprocess.run([*SWAPFS, "fsck", "--state", str(state)], capture_output=True,
                          text=True)
    step(f"fsck: {fsck.stdout.strip()} (exit {fsck.returncode})")
    if fsck.returncode != 0:
        raise SystemExit("fsck found problems")
    return stats


def main() -> int:
    if os.geteuid() != 0:
        print("the demo mounts file systems: run it as root", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="swapfs-demo-", dir="/tmp"))
    try:
        stats = run(workdir)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        mnt = workdir / "mnt"
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    web, db = stats["chains"]["web"], stats["chains"]["db"]
    print(f"\nchain 'web': {web['logical_bytes'] / MIB:.0f} MiB logical in "
          f"{len(web['files'])} files, {web['stored_bytes'] / MIB:.0f} MiB stored: "
          f"dedup ratio {web['dedup_ratio']:.2f}x")
    print(f"chain 'db':  {db['logical_bytes'] / MIB:.0f} MiB logical, "
          f"{db['stored_bytes'] / MIB:.0f} MiB stored (the same image, stored again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
