"""A state directory on a file system that is 100% full.

Whatever fills the disk, deleting or truncating a swap file must succeed
and give the space back, and the store must remount: freeing never needs
new space. The index's file is allocated in full ahead of need
(docs/write-ordering.md), so its transactions reuse pages it holds; the
data files shrink by hole punching. Shown on tmpfs and on ext4.
"""

import errno
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.mounting import (
    BLOCK,
    Mount,
    ext4_image,
    fill_until_enospc,
    mounted,
    read_direct,
    remove_tree,
    requires_mount,
    short_tempdir,
    tmpfs,
    wait_until,
)

pytestmark = [pytest.mark.mount, requires_mount]

FILESYSTEMS: dict[str, Callable[[Path], AbstractContextManager[Path]]] = {
    "tmpfs": lambda path: tmpfs(path, "24m"),
    "ext4": lambda path: ext4_image(path, 32),
}


@pytest.fixture(params=list(FILESYSTEMS))
def full_mount(request: pytest.FixtureRequest) -> Iterator[Mount]:
    root = short_tempdir()
    try:
        with FILESYSTEMS[request.param](root / "disk") as disk, \
                mounted(root, disk / "state") as mount:
            yield mount
    finally:
        remove_tree(root)


def fill_the_rest(disk: Path) -> Path:
    """Take every byte still free on *disk* with a file beside the state."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, BLOCK, 512, 1):
            while True:
                try:
                    out.write(bytes(size))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_delete_and_truncate_free_space_on_a_full_disk(full_mount: Mount) -> None:
    mount = full_mount
    disk = mount.state.parent
    os.mkdir(mount.path("c"))
    rng = random.Random(11)
    written = fill_until_enospc(mount.path("c", "f"), rng, 16 * BLOCK)
    assert len(written) > 10
    kept = written[:len(written) // 2]
    mount.path("c", "g").write_bytes(b"".join(kept[:4]))  # a second file, kept
    fill_the_rest(disk)

    # Truncating half of f and deleting it both succeed on the full disk.
    os.truncate(mount.path("c", "f"), len(kept) * 16 * BLOCK)
    assert read_direct(mount.path("c", "f"), 0, 16 * BLOCK) == kept[0]
    os.unlink(mount.path("c", "f"))
    assert os.listdir(mount.path("c")) == ["g"]
    # The slots it freed are punched within a few seconds: the space is back.
    assert wait_until(lambda: os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                      >= len(written) * 16 * BLOCK // 2, 20), os.statvfs(disk)
    assert read_direct(mount.path("c", "g"), 0, 4 * 16 * BLOCK) == b"".join(kept[:4])

    # The disk full again, the store still remounts and serves.
    fill_the_rest(disk)
    mount.remount()
    assert mount.path("c", "g").read_bytes() == b"".join(kept[:4])
    os.unlink(mount.path("c", "g"))
    (disk / "filler").unlink()
