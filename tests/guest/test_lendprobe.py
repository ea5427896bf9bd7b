"""Why the pool's blocks stay out of guests' code pages, checked against a real guest.

tools/lendprobe.py boots a QEMU guest (TCG) whose RAM is a file the host
maps, finds the largest unused tail of the guest's own code with the
driver's scan, and writes there from the host, as a pool in guest memory
would. docs/caches.md rests its choice on what the guest then sees: the
file's bytes, as ``read()`` returns them, are the host's, because the
code page is the file's page in the guest's page cache. Asserted here,
so that the reason stays true of the kernels the project runs (it would
stop holding if a kernel copied code pages out of the page cache), along
with what the probe itself relies on: a guest physical address from
``/proc/self/pagemap`` is that offset of the memory-backend file.

Marked ``slow``; skipped only where a prerequisite of the guest is missing.
"""



from tests.guest import guest_marks
from tools import lendprobe

pytestmark = [*guest_marks()]


def test_bytes_after_a_guests_code_are_its_files_bytes() -> None:
    result = lendprobe.probe()
    before, after = result["before"], result["after"]
    # The tail lies inside the file: no byte of it past the file's end.
    assert result["file_offset"] + result["length"] <= result["file_size"], result
    # The code page is the file's page in the page cache: a fresh mapping of
    # the file reaches the same frame.
    assert before["mapped_frame"] == before["file_frame"], before
    # The host's write reached the guest's code page ...
    assert after["mapped_bytes"] == result["host_wrote"]
    assert before["file_bytes"] != result["host_wrote"]
    if after["file_frame"] == after["mapped_frame"]:
        # ... and so every read() of the file while that page is cached.
        assert after["file_bytes"] == result["host_wrote"]
        assert result["file_changed"]
    else:
        # The kernel let the page go from the cache while the process still
        # mapped it (seen once in a dozen runs): a reader gets the disk's
        # bytes, and the page is no longer the file's to lend.
        assert after["file_bytes"] == before["file_bytes"]
