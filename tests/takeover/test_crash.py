"""SIGKILL of the daemon in the middle of a write storm.

Two writer processes rewrite 256 blocks of two files with numbered versions
(the same sequence, so the files share blocks and every write moves
refcounts). After each write() returns, a writer appends ``block version``
to an acknowledgement log on an ordinary disk. The daemon is then killed
with SIGKILL, the dead mount detached and the state mounted again.

Every block must then hold its last acknowledged version or the one after
it (the write in flight may or may not have landed), never anything else;
the chain's counts must match the data, and fsck must be clean.
"""

import contextlib
import hashlib
import multiprocessing
import os
import random
import struct
import time
from pathlib import Path

import pytest

from tests.mounting import BLOCK, Mount, aligned_buffer, requires_mount, wait_until

pytestmark = [pytest.mark.mount, requires_mount]

BLOCKS = 256
WRITERS = 2
#: A writer that was never interrupted gives up after this long.
WRITER_DEADLINE = 30.0


def content(block: int, version: int) -> bytes:
    """Version *version* of *block*: every fifth version (and version 0) is a hole."""
    if version % 5 == 0:
        return bytes(BLOCK)
    pattern = hashlib.blake2b(struct.pack("<QQ", block, version)).digest() * (BLOCK // 64)
    return struct.pack("<QQ", block, version) + pattern[16:]


def writer(path: str, ack_path: str, seed: int) -> None:
    """Rewrite random blocks with the next version until the mount goes away."""
    rng = random.Random(seed)
    versions = [0] * BLOCKS
    buffer = aligned_buffer(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    deadline = time.monotonic() + WRITER_DEADLINE
    try:
        while time.monotonic() < deadline:
            block = rng.randrange(BLOCKS)
            version = versions[block] + 1
            buffer[:] = content(block, version)
            try:
                os.pwrite(fd, buffer, block * BLOCK)
            except OSError:
                return  # the daemon is gone (ENOTCONN, ECONNABORTED)
            versions[block] = version
            os.write(ack, f"{block} {version}\n".encode())
        os._exit(2)  # never interrupted: the test is broken
    finally:
        os.close(ack)
        with contextlib.suppress(OSError):
            os.close(fd)


def acknowledged(ack_path: Path) -> list[int]:
    """The last acknowledged version of each block (0: never written)."""
    versions = [0] * BLOCKS
    for line in ack_path.read_text().splitlines():
        block, version = map(int, line.split())
        assert version == versions[block] + 1, "acks of one block come in order"
        versions[block] = version
    return versions


@pytest.mark.parametrize("kill_after", [0.4, 1.0, 1.8])
def test_sigkill_during_a_write_storm_loses_no_acknowledged_write(
        mount: Mount, kill_after: float) -> None:
    os.mkdir(mount.path("c"))
    files = [mount.path("c", f"f{i}") for i in range(WRITERS)]
    for path in files:
        path.write_bytes(b"")
        os.truncate(path, BLOCKS * BLOCK)
    # An unlinked file held open across the crash: the next mount must purge it.
    orphan_path = mount.path("c", "orphan")
    orphan_path.write_bytes(os.urandom(8 * BLOCK))
    orphan = os.open(orphan_path, os.O_RDONLY)
    os.unlink(orphan_path)

    acks = [mount.root / f"ack{i}" for i in range(WRITERS)]
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=writer, args=(str(path), str(ack), 42))
               for path, ack in zip(files, acks, strict=True)]
    try:
        for process in writers:
            process.start()
        assert wait_until(lambda: all(ack.exists() and ack.stat().st_size for ack in acks))
        time.sleep(kill_after)
        mount.kill()
        for process in writers:
            process.join(20)
            assert process.exitcode == 0, f"writer exited {process.exitcode}"
    finally:
        for process in writers:
            if process.is_alive():
                process.kill()
                process.join()
        with contextlib.suppress(OSError):
            os.close(orphan)

    mount.mount()
    hold: list[bytes] = []
    for path, ack in zip(files, acks, strict=True):
        last = acknowledged(ack)
        assert sum(last) > 20, "the storm hardly wrote anything before the kill"
        data = path.read_bytes()
        assert len(data) == BLOCKS * BLOCK
        for block in range(BLOCKS):
            got = data[block * BLOCK:(block + 1) * BLOCK]
            allowed = {content(block, last[block]), content(block, last[block] + 1)}
            assert got in allowed, (
                f"{path.name} block {block}: acknowledged version {last[block]}, holds "
                f"{struct.unpack('<QQ', got[:16])}")
            hold.append(got)
    chain = mount.chain("c")
    assert sorted(chain["files"]) == ["f0", "f1"]
    assert chain["unique_blocks"] == len({block for block in hold if any(block)})
    assert chain["logical_bytes"] == sum(1 for block in hold if any(block)) * BLOCK


def pwrite_all(path: Path, writes: list[tuple[int, bytes]]) -> None:
    """Each (block, data) as one write request, in order."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for block, data in writes:
            assert os.pwrite(fd, data, block * BLOCK) == len(data)
    finally:
        os.close(fd)


def test_pending_punches_lost_in_a_crash_are_punched_by_the_next_mount(
        mount: Mount) -> None:
    """Slots freed just before a SIGKILL are free in the index but still on
    disk (the daemon punches a freed slot no sooner than a second later);
    the next daemon's scan of the slot table finds them, and it punches
    them after its first checkpoint, within seconds of its start."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    blocks = [content(block, 1) for block in range(64)]
    path.write_bytes(b"".join(blocks))
    pwrite_all(path, [(block, bytes(BLOCK)) for block in range(0, 64, 2)])
    mount.kill()
    report = mount.fsck()  # offline, nothing repaired
    kinds = {problem.kind for problem in report.problems}
    assert kinds <= {"unpunched-free-slot"}, [vars(problem) for problem in report.problems]
    mount.mount()
    assert mount.chain("c")["stored_bytes"] == 32 * BLOCK
    # Slack for the data file's extent blocks, which st_blocks counts too.
    assert wait_until(lambda: 0 <= mount.chain("c")["disk_bytes"] - 32 * BLOCK <= 16 * BLOCK,
                      timeout=10), "every free slot is punched"
    expected = [bytes(BLOCK) if block % 2 == 0 else blocks[block] for block in range(64)]
    assert path.read_bytes() == b"".join(expected)


def test_a_slot_reused_right_after_its_overwrite_survives_a_crash(mount: Mount) -> None:
    """An overwrite frees a slot that the next new block takes while its old
    data is still on disk; after a SIGKILL both acknowledged writes read back."""
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    old = [content(block, 1) for block in range(8)]
    path.write_bytes(b"".join(old))  # slots 0 to 7
    new = content(3, 2)
    pwrite_all(path, [(3, bytes(BLOCK)),  # frees slot 3 (kept on disk)
                      (9, new)])  # stored in slot 3
    mount.kill()
    mount.mount()
    expected = [*old[:3], bytes(BLOCK), *old[4:], bytes(BLOCK), new]
    assert path.read_bytes() == b"".join(expected)
    assert mount.chain("c")["unique_blocks"] == 8
