"""A daemon takes the pages of the state's files out of its page tables
(mountd/lifecycle.py, unmap_file_pages_under): the kernel tears a killed
daemon's mappings down before its standby can notice the death, so each
page mapped delays a takeover. The advice must change no byte of a file,
a page written through the mapping and not yet written back included, and
must leave private mappings and files elsewhere alone."""

import mmap
import os
from pathlib import Path

from mountd import lifecycle

PAGES = 256


def _resident_kib(path: Path) -> int:
    """Rss of this process's mapping of *path* (it has one), in kB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError(f"no mapping of {path}")


def _mapped(path: Path, flags: int) -> mmap.mmap:
    path.write_bytes(os.urandom(PAGES * mmap.PAGESIZE))
    with open(path, "r+b") as file:
        return mmap.mmap(file.fileno(), 0, flags=flags)


def test_the_state_files_leave_the_page_tables_with_every_byte_kept(tmp_path: Path) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    state.mkdir()
    elsewhere.mkdir()
    shared = _mapped(state / "index", mmap.MAP_SHARED)
    private = _mapped(state / "private", mmap.MAP_PRIVATE)
    other = _mapped(elsewhere / "index", mmap.MAP_SHARED)
    try:
        written = os.urandom(PAGES * mmap.PAGESIZE)
        shared[:] = written  # dirty pages, not written back yet
        private[:mmap.PAGESIZE] = bytes(mmap.PAGESIZE)  # this mapping's own copy
        private_bytes, other_bytes = private[:], other[:]  # every page mapped
        paths = [state / "index", state / "private", elsewhere / "index"]
        assert all(_resident_kib(path) >= PAGES * 4 for path in paths)

        advised = lifecycle.unmap_file_pages_under(state)

        assert advised == PAGES * mmap.PAGESIZE, "the shared mapping only"
        assert _resident_kib(paths[0]) == 0
        assert _resident_kib(paths[1]) >= PAGES * 4, "a private mapping is left alone"
        assert _resident_kib(paths[2]) >= PAGES * 4, "a file elsewhere is left alone"
        assert (state / "index").read_bytes() == written
        assert shared[:] == written, "the mapping reads the same bytes again"
        assert private[:] == private_bytes and private_bytes.startswith(bytes(mmap.PAGESIZE))
        assert other[:] == other_bytes
    finally:
        for view in (shared, private, other):
            view.close()
