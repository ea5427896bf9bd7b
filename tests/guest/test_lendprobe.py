"""Why the pool's blocks stay out of guests' code pages, checked against a real guest.

tools/lendprobe.py boots a QEMU guest (TCG) whose RAM is a file the host
maps, finds the largest unused tail of the guest's own code with the
driver's scan, and writes there from the host, as a pool in guest memory
would. docs/caches.md rests its choice on what the guest then sees: the
file's bytes, as ``read()`` returns them, are the host's. Asserted here,
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
    # The tail lies inside the file: no byte of it past the file's end.
    assert result["file_offset"] + result["length"] <= result["file_size"], result
    # The guest read its own code page where the host wrote, and so did read().
    assert result["after"]["mapped_bytes"] == result["host_wrote"]
    assert result["after"]["file_bytes"] == result["host_wrote"]
    assert result["before"]["file_bytes"] != result["host_wrote"]
    assert result["file_changed"]
