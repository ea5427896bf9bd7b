"""Sealed records in the drivers' shares of the pool.

The unit tests take the key agreement, the sealing and the pool's
accounting apart; the mount tests run real drivers (``swapfs-driver run``)
and the ``secret`` commands against a real daemon, and read the daemon's
memory to show that it holds only ciphertext.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mountd.drivers import DriverManager, Session
from mountd.peercred import Peer
from swapfs.cache import TransientCache
from swapfs.control import MAX_VALUE, KeyExchange, RecordError, Records, protocol
from swapfs.engine import BLOCK_SIZE
from tests.cache.test_drivers import DRIVER, quick_pool
from tests.mounting import SWAPFS, Mount, requires_mount, swapfs, wait_until
from tests.security.test_permissions import NOBODY, ask_as


class Segment:
    """A reported region of *length* unused bytes."""

    def __init__(self, number: int, length: int) -> None:
        self.physical_key = ("fe:00", number, 0, "tail")
        self.length = length


def agreed(driver: str = "vm") -> tuple[Any, Any]:
    guest, host = KeyExchange(), KeyExchange()
    return (guest.agree(driver, guest.public, host.public),
            host.agree(driver, guest.public, host.public))


def test_both_sides_agree_one_key_and_a_record_opens_only_as_itself() -> None:
    guest, host = agreed()
    sealed = guest.seal("db", b"hunter2")
    assert b"hunter2" not in sealed
    assert host.open("db", sealed) == b"hunter2"
    assert guest.seal("db", b"hunter2") != sealed  # a fresh nonce each time
    with pytest.raises(RecordError) as caught:
        host.open("other", sealed)  # moved to another name
    assert caught.value.errno == errno.EBADMSG
    with pytest.raises(RecordError):
        agreed("vm")[1].open("db", sealed)  # another registration's key
    with pytest.raises(RecordError):
        agreed("vm2")[1].open("db", sealed)
    flipped = bytearray(sealed)
    flipped[20] ^= 1
    with pytest.raises(RecordError):
        host.open("db", bytes(flipped))
    with pytest.raises(RecordError) as caught:
        guest.seal("big", bytes(MAX_VALUE + 1))
    assert caught.value.errno == errno.E2BIG
    assert "vm" in repr(guest)


def report(inode: int, blocks: int) -> list[dict[str, Any]]:
    """A driver message's extents: *blocks* whole pages of one file, each its
    own segment, laid end to end in the pool."""
    return [{"pid": 1, "path": f"/bin/prog{inode}", "device": "fe:00", "inode": inode,
             "address": 0x1000, "length": BLOCK_SIZE, "segment": segment, "part": "tail"}
            for segment in range(blocks)]


def test_records_take_pool_slots_and_are_wiped_in_place() -> None:
    manager = DriverManager(TransientCache(64 * BLOCK_SIZE), 30.0)
    cache, session = manager.cache, Session(Peer(pid=1, uid=0))
    token = manager.handle(session, {"op": "driver.register", "driver": "a",
                                     "extents": report(1, 3)})["token"]
    manager.handle(Session(Peer(pid=2, uid=0)),
                   {"op": "driver.register", "driver": "b", "extents": report(2, 4)})
    assert cache.capacity_bytes == 7 * BLOCK_SIZE
    guest, _ = agreed("a")

    def put(name: str, value: bytes) -> dict[str, Any]:
        return manager.handle(session, {"op": "driver.secret.put", "driver": "a",
                                        "token": token, "name": name,
                                        "sealed": protocol.encode_bytes(guest.seal(name, value))})

    put("one", b"1")
    assert put("two", bytes(MAX_VALUE)) == {"records": 2, "record_bytes": 2 * 28 + 1 + MAX_VALUE,
                                            "record_slots": 3}  # two takes 2 slots
    assert cache.capacity_bytes == 4 * BLOCK_SIZE
    assert manager.stats()["drivers"]["a"]["records"] == 2
    assert manager.stats()["drivers"]["a"]["record_slots"] == manager.stats()["record_slots"] == 3
    assert manager.stats()["drivers"]["b"]["record_slots"] == 0
    with pytest.raises(RecordError) as caught:  # a's share is 3 slots
        put("three", b"3")
    assert caught.value.errno == errno.ENOSPC
    held = manager.records._shelves["a"]["two"]  # the daemon's very bytes
    reply = manager.handle(session, {"op": "driver.update", "driver": "a", "token": token,
                                     "extents": report(9, 1)})  # the share shrinks to 1 slot
    assert reply["wiped"] == ["two"]  # the newest goes first
    assert held == bytes(len(held))  # overwritten before it was dropped
    assert manager.records.get("a", "one")
    assert cache.capacity_bytes == 4 * BLOCK_SIZE
    held = manager.records._shelves["a"]["one"]
    manager.close(session, "disconnected")
    assert held == bytes(len(held))
    with pytest.raises(RecordError) as caught:
        manager.records.get("a", "one")
    assert caught.value.errno == errno.ENOENT
    assert cache.capacity_bytes == 4 * BLOCK_SIZE and manager.stats()["record_slots"] == 0
    with pytest.raises(RecordError):
        Records(BLOCK_SIZE).put("a", "x", b"short", 10)  # not sealed


def test_the_host_needs_the_key_a_driver_agreed() -> None:
    manager = DriverManager(TransientCache(64 * BLOCK_SIZE), 30.0)
    plain, keyed = Session(Peer(pid=1, uid=0)), Session(Peer(pid=2, uid=0))
    manager.handle(plain, {"op": "driver.register", "driver": "plain", "extents": []})
    guest = KeyExchange()
    reply = manager.handle(keyed, {"op": "driver.register", "driver": "keyed", "extents": [],
                                   "public_key": protocol.encode_bytes(guest.public)})
    key = guest.agree("keyed", guest.public,
                      protocol.decode_bytes(reply["daemon_public_key"], "key", 32))
    for driver, code in (("plain", errno.ENOKEY), ("absent", errno.ENOENT)):
        with pytest.raises(RecordError) as caught:
            manager.host_put(driver, "x", b"1")
        assert caught.value.errno == code
    manager.cache.update("keyed", [Segment(5, BLOCK_SIZE)])
    manager.host_put("keyed", "note", b"from the host")
    assert key.open("note", manager.records.get("keyed", "note")) == b"from the host"
    assert manager.host_get("keyed", "note") == b"from the host"


# -- through a mount ----------------------------------------------------------------


@pytest.fixture
def agents() -> Iterator[Path]:
    """A directory anyone may enter, for the agent sockets (each stays 0600)."""
    directory = Path(tempfile.mkdtemp(prefix="swapfs-agents-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def driver(mount: Mount, tmp_path: Path, name: str) -> Iterator[Path]:
    """A real ``swapfs-driver run`` named *name*; its agent socket."""
    agent = tmp_path / f"{name}.sock"
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*DRIVER, "run", "--socket", protocol.socket_of(str(mount.mnt)), "--name", name,
             "--interval", "0.5", "--agent", str(agent)],
            stdout=output, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: name in quick_pool(mount)["drivers"] and agent.exists(),
                          20), log.read_text()
        yield agent
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def secret(agent: Path, *args: str, value: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*DRIVER, "secret", *args, "--agent", str(agent)], input=value,
                          capture_output=True, timeout=30)



def memory_holds(pid: int, needle: bytes) -> bool:
    """Does any anonymous mapping of process *pid* (heap, stacks, arenas)
    hold *needle*? Read through /proc/PID/mem, as root may."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and not fields[5].startswith("[")):
                continue  # unreadable, or a file's pages
            if len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


@requires_mount
@pytest.mark.mount
def test_a_drivers_records_are_its_own(mount: Mount, agents: Path) -> None:
    tmp_path = agents
    value = b"password=" + os.urandom(8).hex().encode()
    with driver(mount, tmp_path, "vm-a") as agent_a, driver(mount, tmp_path, "vm-b") as agent_b:
        before = quick_pool(mount)
        put = secret(agent_a, "put", "db", value=value)
        assert put.returncode == 0, put.stderr
        assert secret(agent_a, "get", "db").stdout == value
        stats = quick_pool(mount)
        assert stats["drivers"]["vm-a"]["records"] == 1
        assert stats["drivers"]["vm-a"]["record_slots"] == stats["record_slots"] == 1
        assert stats["capacity_bytes"] == before["capacity_bytes"] - BLOCK_SIZE
        text = swapfs("stats", str(mount.mnt)).stdout
        assert "encrypted at rest" in text and "1 sealed records" in text, text

        other_driver = secret(agent_b, "get", "db")
        assert other_driver.returncode == 1 and b"no record" in other_driver.stderr
        get_db: dict[str, object] = {"op": "get", "name": "db"}
        assert ask_as(NOBODY, str(agent_a), get_db) == ["refused"]  # the socket is 0600
        agent_a.chmod(0o666)  # loosened by hand: the agent checks the peer itself
        (answer,) = ask_as(NOBODY, str(agent_a), get_db)
        assert json.loads(answer)["errno"] == errno.EACCES
        agent_a.chmod(0o600)
        assert not memory_holds(mount.pid or 0, value)  # the daemon keeps ciphertext
        assert memory_holds(mount.pid or 0, str(mount.mnt).encode())  # the scan sees

        # The host shares a record with vm-b, and reads vm-a's (it holds the keys).
        shared = subprocess.run([*SWAPFS, "secret", "put", "--driver", "vm-b",
                                 str(mount.mnt), "note"], input=b"from the host",
                                capture_output=True, timeout=30)
        assert shared.returncode == 0, shared.stderr
        assert secret(agent_b, "get", "note").stdout == b"from the host"
        host_read = swapfs("secret", "get", "--driver", "vm-a", str(mount.mnt), "db")
        assert host_read.stdout.encode() == value

        assert secret(agent_a, "rm", "db").returncode == 0
        gone = secret(agent_a, "get", "db")
        assert gone.returncode == 1 and b"no record" in gone.stderr
        assert quick_pool(mount)["drivers"]["vm-a"]["records"] == 0
        assert secret(agent_a, "put", "db", value=value).returncode == 0
        too_big = secret(agent_a, "put", "big", value=bytes(MAX_VALUE + 1))
        assert too_big.returncode == 1
    # Both drivers are gone: their shares were revoked and their records wiped.
    assert quick_pool(mount)["record_slots"] == 0
    with driver(mount, tmp_path, "vm-a") as agent_a:
        wiped = secret(agent_a, "get", "db")
        assert wiped.returncode == 1 and b"no record" in wiped.stderr
    log = (mount.state / "daemon.log").read_text()
    assert re.search(r"driver vm-a revoked \(disconnected\).*1 records wiped", log), log[-2000:]
