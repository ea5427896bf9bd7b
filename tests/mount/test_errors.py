"""Failures through a real mount: each must be reported with the right errno,
must never return wrong data, and must leave the mount serving."""

import contextlib
import errno
import json
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapfs.control import protocol
from swapfs.engine import MAP_RUN, MAX_FILE_SIZE, SwapfsError, fsck
from tests.mounting import (
    BLOCK,
    Mount,
    aligned_buffer,
    fill_until_enospc,
    mounted,
    os_error,
    read_direct,
    remove_tree,
    requires_mount,
    short_tempdir,
    swapfs,
    tmpfs,
)

pytestmark = [pytest.mark.mount, requires_mount]


# -- corrupt data ---------------------------------------------------------------------


def test_corrupt_block_reads_eio_and_other_blocks_still_read(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "f")
    data = random.Random(1).randbytes(8 * BLOCK)
    path.write_bytes(data)
    chain_id = mount.chain("c")["id"]
    mount.umount()
    # One write of 8 distinct blocks into an empty chain fills slots 0..7 in order.
    blocks_file = mount.state / "data" / f"{chain_id}.blocks"
    raw = bytearray(blocks_file.read_bytes())
    assert len(raw) == 8 * BLOCK
    assert raw[3 * BLOCK:4 * BLOCK] != data[3 * BLOCK:4 * BLOCK]  # encrypted at rest
    raw[3 * BLOCK + 100] ^= 0x01
    blocks_file.write_bytes(bytes(raw))
    mount.mount()

    assert os_error(read_direct, path, 3 * BLOCK, BLOCK) == errno.EIO
    assert os_error(read_direct, path, 0, 8 * BLOCK) == errno.EIO
    with open(path, "rb") as file:
        file.seek(3 * BLOCK + 5)
        with pytest.raises(OSError) as caught:
            file.read(10)
        assert caught.value.errno == errno.EIO
    for block in (0, 1, 2, 4, 5, 6, 7):
        want = data[block * BLOCK:(block + 1) * BLOCK]
        assert read_direct(path, block * BLOCK, BLOCK) == want
    # Buffered reads of the good blocks work too (readahead may touch the bad one).
    with open(path, "rb") as file:
        file.seek(6 * BLOCK)
        assert file.read(2 * BLOCK) == data[6 * BLOCK:]
    # A partial write needs the old block: EIO. A whole-block write replaces it.
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os_error(os.pwrite, fd, b"x", 3 * BLOCK + 7) == errno.EIO
    finally:
        os.close(fd)
    mount.umount()
    report = mount.fsck()
    assert [problem.kind for problem in report.problems] == ["corrupt-block"]
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    mount.mount()
    fresh = random.Random(2).randbytes(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buffer = aligned_buffer(BLOCK)
        buffer[:] = fresh
        assert os.pwrite(fd, buffer, 3 * BLOCK) == BLOCK
    finally:
        os.close(fd)
    healed = data[:3 * BLOCK] + fresh + data[4 * BLOCK:]
    assert read_direct(path, 0, 8 * BLOCK) == healed
    mount.remount()
    assert path.read_bytes() == healed
    # The fixture's fsck must now be clean: the corrupt slot was freed.


# -- a full backing disk -----------------------------------------------------------------


def test_full_backing_disk_gives_enospc_and_keeps_every_acknowledged_write() -> None:
    """State on a 4 MiB tmpfs: fill it with random data, then with metadata only.

    Random data runs the data file out of space first (ENOSPC from the block
    store). Writes of blocks the chain already holds need no data, only index
    pages, so they run the LMDB index out of space: those must fail cleanly
    too, with the mount still serving.
    """
    chunk = 16 * BLOCK
    root = short_tempdir()
    try:
        with tmpfs(root / "s", "4m") as state, mounted(root, state) as mount:
            os.mkdir(mount.path("c"))
            rng = random.Random(3)
            written = fill_until_enospc(mount.path("c", "f"), rng, chunk, limit=1000)
            fd = os.open(mount.path("c", "f"), os.O_RDWR)
            try:
                assert len(written) > 10
                assert os.fstat(fd).st_size == len(written) * chunk
                # The failed write may have left room (slots it wrote but never
                # committed), so a few more may succeed; each is all or nothing.
                for _ in range(5):
                    data = rng.randbytes(chunk)
                    try:
                        os.pwrite(fd, data, len(written) * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        continue
                    written.append(data)
                assert os.fstat(fd).st_size == len(written) * chunk
            finally:
                os.close(fd)
            expected = b"".join(written)
            assert read_direct(mount.path("c", "f"), 0, len(expected)) == expected

            # Metadata only: blocks the chain already stores, at new places:
            # the last block of each run of the map, so that each takes a
            # whole run (about half a page) of index.
            copies: dict[int, bytes] = {}
            fd = os.open(mount.path("c", "g"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                for n in range(100_000):
                    block = (n + 1) * MAP_RUN - 1
                    data = expected[(n % 64) * BLOCK:(n % 64 + 1) * BLOCK]
                    try:
                        os.pwrite(fd, data, block * BLOCK)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
                    copies[block] = data
                else:
                    raise AssertionError("the index never ran out of space")
            finally:
                os.close(fd)
            assert sorted(os.listdir(mount.path("c"))) == ["f", "g"]
            assert read_direct(mount.path("c", "f"), 0, len(expected)) == expected
            for block, data in copies.items():
                assert read_direct(mount.path("c", "g"), block * BLOCK, BLOCK) == data

            mount.remount()
            assert mount.path("c", "f").read_bytes() == expected
            with open(mount.path("c", "g"), "rb") as g:
                for block, data in copies.items():
                    assert os.pread(g.fileno(), BLOCK, block * BLOCK) == data
            assert mount.chain("c")["unique_blocks"] == len(written) * chunk // BLOCK
    finally:
        remove_tree(root)


# -- limits ---------------------------------------------------------------------------


def test_writes_beyond_the_largest_file_size_are_efbig(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    path = mount.path("c", "huge")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.pwrite(fd, b"z", MAX_FILE_SIZE - 1) == 1
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        # Across the limit: the kernel sends the part in the last page on its
        # own, so the write is short (what fits) or refused, never longer.
        try:
            assert os.pwrite(fd, b"yy", MAX_FILE_SIZE - 1) <= 1
        except OSError as exc:
            assert exc.errno == errno.EFBIG
        assert os_error(os.pwrite, fd, b"z", MAX_FILE_SIZE) == errno.EFBIG
        assert os_error(os.pwrite, fd, b"z" * 2 * BLOCK, MAX_FILE_SIZE - BLOCK) == errno.EFBIG
        assert os_error(os.ftruncate, fd, MAX_FILE_SIZE + 1) == errno.EFBIG
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        assert os.pread(fd, 10, MAX_FILE_SIZE - 1) in (b"y", b"z")
        assert os.pread(fd, 10, 12345 * BLOCK) == bytes(10)
        assert os.fstat(fd).st_blocks == BLOCK // 512
    finally:
        os.close(fd)
    entry = mount.chain("c")["files"]["huge"]
    assert (entry["size"], entry["mapped_blocks"]) == (MAX_FILE_SIZE, 1)
    os.unlink(path)


# -- the control socket -------------------------------------------------------------------


def raw_request(mount: Mount, payload: bytes) -> dict[str, Any]:
    """Send raw bytes to the control socket; the first reply line, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(protocol.socket_of(str(mount.mnt)))
        # The daemon may answer and hang up before it has read everything.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        line = sock.makefile("rb").readline()
    assert line, "the daemon closed the connection without an answer"
    reply: dict[str, Any] = json.loads(line)
    return reply


BAD_REQUESTS = {
    "not json": b"this is not json\n",
    "not utf-8": b"\xff\xfe{}\n",
    "json list": b"[1, 2, 3]\n",
    "json string": b'"status"\n',
    "no op": b"{}\n",
    "unknown op": b'{"op": "format-everything"}\n',
    "op not a string": b'{"op": ["status"]}\n',
    "op an object": b'{"op": {"a": 1}}\n',
    "deeply nested": b"[" * 100_000 + b"\n",
    "huge integer": b'{"op": "status", "n": ' + b"1" * 5000 + b"}\n",
    "clone without fields": b'{"op": "clone"}\n',
    "clone without target": b'{"op": "clone", "source": "c/f"}\n',
    "clone target not a string": b'{"op": "clone", "source": "c/f", "target": 7}\n',
    "clone empty not a bool": b'{"op": "clone", "source": "c/f", "target": "c/h", '
                              b'"empty": "yes"}\n',
    "clone source a lone surrogate": b'{"op": "clone", "source": "c/\\ud800", '
                                     b'"target": "c/h"}\n',
    "clone target a lone surrogate": b'{"op": "clone", "source": "c/f", '
                                     b'"target": "c/\\udfff"}\n',
    "priority path a lone surrogate": b'{"op": "priority", "path": "\\ud83d"}\n',
}


@pytest.fixture
def control_mount(mount: Mount) -> Mount:
    os.mkdir(mount.path("c"))
    os.mkdir(mount.path("d"))
    mount.path("c", "f").write_bytes(b"data" * 3000)
    mount.path("c", "g").write_bytes(b"other")
    return mount


@pytest.mark.parametrize("payload", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_control_requests_get_einval_and_the_daemon_serves_on(
        control_mount: Mount, payload: bytes) -> None:
    mount = control_mount
    pid = mount.status()["pid"]
    reply = raw_request(mount, payload)
    assert reply["ok"] is False
    assert reply["errno"] == errno.EINVAL
    assert isinstance(reply["error"], str) and reply["error"]
    assert mount.status()["pid"] == pid
    assert mount.path("c", "f").read_bytes() == b"data" * 3000
    assert sorted(mount.chain("c")["files"]) == ["f", "g"]
    assert "Traceback" not in (mount.state / "daemon.log").read_text()


@pytest.mark.parametrize(("source", "target", "code"), [
    ("c/f", "c/g", errno.EEXIST),
    ("c/f", "d/f", errno.EXDEV),
    ("c/missing", "c/h", errno.ENOENT),
    ("c", "c/h", errno.EISDIR),
    ("c/f", "top", errno.EPERM),
    ("c/f", "c/" + "n" * 300, errno.ENAMETOOLONG),
])
def test_refused_clones_get_their_errno(control_mount: Mount, source: str, target: str,
                                        code: int) -> None:
    mount = control_mount
    request = json.dumps({"op": "clone", "source": source, "target": target}).encode()
    reply = raw_request(mount, request + b"\n")
    assert (reply["ok"], reply["errno"]) == (False, code)
    with pytest.raises(protocol.ControlError) as caught:
        protocol.request(protocol.socket_of(str(mount.mnt)),
                        {"op": "clone", "source": source, "target": target})
    assert caught.value.errno == code
    assert sorted(mount.chain("c")["files"]) == ["f", "g"]
    assert mount.path("c", "g").read_bytes() == b"other"
    assert mount.chain("d")["files"] == {}


def test_one_connection_serves_many_requests_and_refuses_huge_lines(mount: Mount) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(protocol.socket_of(str(mount.mnt)))
        sock.sendall(b'{"op": "status"}\n{"op": "stats"}\n')
        lines = sock.makefile("rb")
        first, second = json.loads(lines.readline()), json.loads(lines.readline())
    assert first["ok"] and first["pid"] == mount.pid
    assert second["ok"] and second["chains"] == {}
    reply = raw_request(mount, b"x" * (protocol.MAX_LINE + 70_000))
    assert (reply["ok"], reply["errno"]) == (False, errno.E2BIG)
    assert mount.status()["pid"] == mount.pid


# -- the command line ----------------------------------------------------------------------


def test_fsck_of_a_mounted_state_is_refused(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    mount.path("c", "f").write_bytes(b"x" * 5000)
    result = swapfs("fsck", "--state", str(mount.state), check=False)
    assert result.returncode != 0
    assert "in use" in result.stderr
    with pytest.raises(SwapfsError) as caught:
        fsck.check(mount.state)
    assert caught.value.errno == errno.EBUSY
    assert mount.path("c", "f").read_bytes() == b"x" * 5000


def test_stats_of_a_path_not_on_swapfs_fails(tmp_path: Path) -> None:
    result = swapfs("stats", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "not a swapfs mount" in result.stderr
    assert result.stdout == ""


def test_second_mount_of_a_state_in_use_is_refused(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    other = mount.root / "m2"
    other.mkdir()
    result = swapfs("mount", "--state", str(mount.state), str(other), check=False)
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert not os.path.ismount(other)
    # The first mount, and its control socket, are untouched.
    assert mount.status()["pid"] == mount.pid
    assert os.listdir(mount.mnt) == ["c"]


# -- a busy control socket ------------------------------------------------------------------


@pytest.fixture
def busy_mount() -> Iterator[Mount]:
    """A mount that serves 16 control connections at once and closes idle ones after 2 s.

    ``mounted`` removes only a root it made itself; this one holds the
    configuration file too, so it is removed here."""
    root = short_tempdir()
    try:
        config = root / "swapfs.toml"
        config.write_text("control_idle_timeout = 2\ncontrol_max_connections = 16\n")
        with mounted(root=root, config=config) as mount:
            yield mount
    finally:
        remove_tree(root)


def open_connections(mount: Mount, count: int) -> list[socket.socket]:
    path = protocol.socket_of(str(mount.mnt))
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        held.append(sock)
    return held


def test_an_idle_control_connection_is_closed(busy_mount: Mount) -> None:
    (sock,) = open_connections(busy_mount, 1)
    with sock:
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the daemon after 2 s of silence


def test_connections_past_the_limit_get_eagain_and_the_cli_retries(busy_mount: Mount) -> None:
    mount = busy_mount
    held = open_connections(mount, 16)
    try:
        reply = raw_request(mount, b'{"op": "status"}\n')
        assert (reply["ok"], reply["errno"]) == (False, errno.EAGAIN)
        # The command line tries again while the idle ones time out.
        result = swapfs("stats", "--json", str(mount.mnt))
        assert json.loads(result.stdout)["chains"] == {}
    finally:
        for sock in held:
            sock.close()


def test_hundreds_of_idle_connections_do_not_disturb_io(busy_mount: Mount) -> None:
    mount = busy_mount
    os.mkdir(mount.path("c"))
    data = random.Random(7).randbytes(256 * BLOCK)
    held = open_connections(mount, 300)
    try:
        fds = len(os.listdir(f"/proc/{mount.pid}/fd"))
        assert fds < 16 + 64, f"the daemon holds {fds} descriptors"
        for name in ("f", "g"):  # the second chain file needs a descriptor of its own
            mount.path("c", name).write_bytes(data)
        assert read_direct(mount.path("c", "f"), 0, len(data)) == data
        assert read_direct(mount.path("c", "g"), 0, len(data)) == data
    finally:
        for sock in held:
            sock.close()
    assert mount.stats()["chains"]["c"]["files"]["f"]["logical_bytes"] == len(data)
    assert "Traceback" not in (mount.state / "daemon.log").read_text()


def malformed_lines(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes, and valid requests cut short, with bytes flipped, or with
    a field of the wrong type (at most *count*: blank ones are left out)."""
    valid: list[dict[str, object]] = [
        {"op": "status"}, {"op": "stats"}, {"op": "clone", "source": "c/f", "target": "c/x"},
        {"op": "priority", "path": "c/f", "priority": 3},
        {"op": "driver.register", "driver": "d", "extents": []}]
    junk: list[object] = [None, True, -1, 1 << 70, 1.5, "", "\ud800", [], {}, [[[]]]]
    lines = []
    for _ in range(count):
        how = rng.randrange(4)
        if how == 0:
            line = rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b" ")
        else:
            message = dict(rng.choice(valid))
            if how == 3:
                message[rng.choice(list(message))] = rng.choice(junk)
            line = json.dumps(message).encode()
            if how == 1:
                line = line[:rng.randrange(len(line))]
            elif how == 2:
                at = rng.randrange(len(line))
                line = line[:at] + bytes([line[at] ^ (1 << rng.randrange(8))]) + line[at + 1:]
                line = line.replace(b"\n", b" ")
        if line.strip():  # a blank line is no request: it gets no answer
            lines.append(line + b"\n")
    return lines


def test_thousands_of_malformed_requests_while_io_runs(mount: Mount) -> None:
    os.mkdir(mount.path("c"))
    mount.path("c", "f").write_bytes(b"f" * BLOCK)
    data = random.Random(9).randbytes(64 * BLOCK)
    failures: list[BaseException] = []

    def io() -> None:
        try:
            for round_ in range(20):
                mount.path("c", "io").write_bytes(data[round_ * BLOCK:] + data[:round_ * BLOCK])
                got = read_direct(mount.path("c", "io"), 0, len(data))
                assert got == data[round_ * BLOCK:] + data[:round_ * BLOCK]
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    worker = threading.Thread(target=io)
    worker.start()
    try:
        for line in malformed_lines(random.Random(10), 2000):
            reply = raw_request(mount, line)
            assert isinstance(reply.get("ok"), bool), reply
            if not reply["ok"]:
                assert isinstance(reply["errno"], int) and reply["errno"] != errno.EIO, reply
    finally:
        worker.join()
    assert not failures, failures
    assert mount.status()["pid"] == mount.pid
    assert "Traceback" not in (mount.state / "daemon.log").read_text()
