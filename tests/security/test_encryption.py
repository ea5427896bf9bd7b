"""Encryption at rest: what is on disk is ciphertext, chains differ, damage
reads as EIO, and a state opens only with its master key, in its own mode.

The engine tests open volumes directly; the last ones go through a real
mount and real kernel swap (the swap test is marked slow).
"""

import errno
import hashlib
import os
import random
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import (
    BLOCK_SIZE,
    ROOT_INO,
    SEAL_SIZE,
    CorruptIndex,
    SwapfsError,
    Txn,
    Volume,
    fsck,
    keys,
)
from tests.mounting import mounted, requires_mount, swapfs
from tools.swapload import MIB, MemoryCgroup

BS = BLOCK_SIZE
MODE = stat.S_IFREG | 0o600
SECRET = b"password=hunter2;"


def page(number: int) -> bytes:
    """A page full of the secret, different for every *number*."""
    return (SECRET + b"%010d;" % number) * (BS // 28) + bytes(BS % 28)


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(SwapfsError) as caught:
        call(*args, **kwargs)
    return caught.value.errno


def state_bytes(state: Path) -> bytes:
    """Every byte of every file of the state directory, in one string."""
    return b"".join(path.read_bytes() for path in sorted(state.rglob("*")) if path.is_file())


def make(state: Path, master: keys.MasterKey | None) -> dict[str, int]:
    """Chains a (files f, g) and b (file h), all holding page 1; f holds pages 0..7."""
    with closing(Volume(state, master=master)) as vol:
        inos = {}
        for chain, files in ((b"a", (b"f", b"g")), (b"b", (b"h",))):
            directory = vol.mkdir(ROOT_INO, chain, 0o700, 0, 0)
            for name in files:
                inos[name.decode()] = vol.create(directory.ino, name, MODE, 0, 0).ino
        vol.write(inos["f"], 0, b"".join(page(number) for number in range(8)))
        vol.write(inos["g"], 0, page(1))
        vol.write(inos["h"], 0, page(1))
    return inos


def test_no_plaintext_at_rest_and_chains_seal_apart(tmp_path: Path,
                                                    master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)
    assert SECRET not in state_bytes(state)
    data = state / "data"
    # Page 1 is stored once in chain a (f and g share it), once in chain b.
    with closing(Volume(state, master=master_key)) as vol:
        assert vol.encrypted
        stats = vol.stats()["chains"]
        assert stats["a"]["unique_blocks"] == 8 and stats["b"]["unique_blocks"] == 1
        slot_a, slot_b = vol.mapped(inos["g"])[0], vol.mapped(inos["h"])[0]
        assert vol.read(inos["g"], 0, BS) == vol.read(inos["h"], 0, BS) == page(1)
        assert vol.read(inos["f"], 0, 8 * BS) == b"".join(page(n) for n in range(8))
    raw_a = (data / "1.blocks").read_bytes()[slot_a * BS:(slot_a + 1) * BS]
    raw_b = (data / "2.blocks").read_bytes()[slot_b * BS:(slot_b + 1) * BS]
    assert len(raw_a) == len(raw_b) == BS and raw_a != raw_b
    # Room for the records of 4096 slots is made at once (swapfs/engine/store.py).
    assert (data / "1.seals").stat().st_size == 4096 * SEAL_SIZE


def test_a_plain_state_holds_the_plaintext(tmp_path: Path) -> None:
    """The control: the scan above finds the secret when nothing seals it."""
    state = tmp_path / "state"
    make(state, None)
    assert SECRET in state_bytes(state)
    assert not (state / "data" / "1.seals").exists()


@pytest.mark.parametrize("target", ["data", "seal-tag", "seal-digest"])
def test_a_flipped_bit_reads_eio_and_fsck_reports_it(
        tmp_path: Path, master_key: keys.MasterKey, target: str) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol:
        slot = vol.mapped(inos["f"])[3]
    name, offset = {"data": ("1.blocks", slot * BS + 100),
                    "seal-tag": ("1.seals", slot * SEAL_SIZE + 20),
                    "seal-digest": ("1.seals", slot * SEAL_SIZE + 2)}[target]
    with open(state / "data" / name, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))
    report = fsck.check(state, master=master_key)
    assert [p.kind for p in report.problems] == ["corrupt-block"]
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    with closing(Volume(state, master=master_key)) as vol:
        assert errno_of(vol.read, inos["f"], 3 * BS, BS) == errno.EIO
        for number in (0, 1, 2, 4, 5, 6, 7):
            assert vol.read(inos["f"], number * BS, BS) == page(number)


def test_a_lost_slot_entry_is_rebuilt_from_its_seal_record(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol:
        slot = vol.mapped(inos["f"])[5]
        chain_id = vol.getattr(inos["f"]).chain
        with vol.index.begin(write=True) as txn:
            raw = bytearray(dict(txn.iter_slot_runs(chain_id))[0])
            raw[slot * 24 + 3] ^= 0x04
            txn.put_slot_run(chain_id, 0, bytes(raw))
    report = fsck.check(state, master=master_key, repair=True)
    assert [p.kind for p in report.problems] == ["corrupt-slot"] and report.problems[0].repaired
    assert fsck.check(state, master=master_key).clean
    with closing(Volume(state, master=master_key)) as vol:
        assert vol.read(inos["f"], 5 * BS, BS) == page(5)


def test_a_state_opens_only_with_its_key_and_in_its_mode(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    encrypted, plain = tmp_path / "encrypted", tmp_path / "plain"
    make(encrypted, master_key)
    make(plain, None)
    other = keys.generate(tmp_path / "other.key")
    assert errno_of(Volume, encrypted) == errno.ENOKEY
    assert errno_of(Volume, encrypted, master=other) == errno.EKEYREJECTED
    assert errno_of(Volume, encrypted, master=master_key, encrypt=False) == errno.EINVAL
    assert errno_of(Volume, plain, master=master_key, encrypt=True) == errno.EINVAL
    assert errno_of(Volume, tmp_path / "new", encrypt=True) == errno.ENOKEY
    assert errno_of(fsck.check, encrypted, master=other) == errno.EKEYREJECTED
    refused = swapfs("fsck", "--state", str(encrypted), "--key-file", other.source,
                     check=False)
    assert refused.returncode == fsck.EXIT_FAILED and "encrypted with key" in refused.stderr
    with closing(Volume(plain, master=master_key)) as vol:  # a key does not hurt
        assert not vol.encrypted


def test_a_chain_key_moved_to_another_chain_does_not_unwrap(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)

    def swap_keys(txn: Txn) -> None:
        first, second = txn.get_chain(1), txn.get_chain(2)
        assert first is not None and second is not None
        first.key, second.key = second.key, first.key
        txn.put_chain(first)
        txn.put_chain(second)

    with closing(Volume(state, master=master_key)) as vol, \
            vol.index.begin(write=True) as txn:
        swap_keys(txn)
    # Refused by the key wrap itself (bound to the chain id), not merely by
    # blocks that another chain's key cannot open.
    with closing(Volume(state, master=master_key)) as vol, \
            pytest.raises(CorruptIndex, match="does not unwrap"):
        vol.read(inos["h"], 0, BS)


def test_a_chain_key_copied_into_another_state_does_not_unwrap(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    """The key wrap is bound to the state's UUID: two states made alike with
    one master key, and the first's chain record put in the second."""
    first, second = tmp_path / "first", tmp_path / "second"
    make(first, master_key)
    inos = make(second, master_key)
    with closing(Volume(first, master=master_key)) as vol, vol.index.begin() as txn:
        copied = txn.get_chain(2)
    assert copied is not None
    with closing(Volume(second, master=master_key)) as vol, \
            vol.index.begin(write=True) as txn:
        txn.put_chain(copied)
    with closing(Volume(second, master=master_key)) as vol, \
            pytest.raises(CorruptIndex, match="does not unwrap"):
        vol.read(inos["h"], 0, BS)
    ids = set()
    for state in (first, second):
        with closing(Volume(state, master=master_key)) as vol:
            ids.add(vol.state_id)
    assert None not in ids and len(ids) == 2


def test_an_encrypted_state_without_its_uuid_is_refused(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    """Every state sealed with a key per block has a UUID, which its chain
    keys' wrap is bound to: one without is damaged, never a state whose
    wraps are bound to no state (index format 3)."""
    state = tmp_path / "state"
    make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol, \
            vol.index.begin(write=True) as txn:
        assert txn.txn.delete(b"uuid", db=vol.index.meta)
    with pytest.raises(CorruptIndex, match="UUID"):
        Volume(state, master=master_key)


def test_rekey_rewraps_the_chain_keys_and_rewrites_no_data(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)

    def data_digests() -> dict[str, str]:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in (state / "data").iterdir()}

    before = data_digests()
    new = keys.generate(tmp_path / "new.key")
    result = swapfs("rekey", "--state", str(state), "--key-file", master_key.source,
                    "--new-key-file", new.source)
    assert "2 chain keys rewrapped" in result.stdout
    assert data_digests() == before
    assert errno_of(Volume, state, master=master_key) == errno.EKEYREJECTED
    with closing(Volume(state, master=new)) as vol:
        assert vol.read(inos["h"], 0, BS) == page(1)
        vol.write(inos["h"], BS, page(9))  # the new key seals new blocks too
    with closing(Volume(state, master=new)) as vol:
        assert vol.read(inos["h"], BS, BS) == page(9)
    assert fsck.check(state, master=new).clean


def test_key_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k"
    master = keys.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.read(path).key_id == master.key_id
    assert errno_of(keys.generate, path) == errno.EEXIST
    raw = tmp_path / "raw"
    raw.write_bytes(os.urandom(32))
    raw.chmod(0o600)
    assert keys.read(raw).key_id != master.key_id
    path.chmod(0o640)
    assert errno_of(keys.read, path) == errno.EACCES
    path.chmod(0o600)
    short = tmp_path / "short"
    short.write_bytes(b"00" * 31 + b"\n")
    short.chmod(0o600)
    assert errno_of(keys.read, short) == errno.EINVAL
    link = tmp_path / "link"
    link.symlink_to(path)
    assert errno_of(keys.read, link) == errno.ELOOP
    assert errno_of(keys.read, tmp_path / "absent") == errno.ENOKEY
    if os.geteuid() == 0:  # a key file another user owns: they could replace it
        os.chown(path, 65534, -1)
        assert errno_of(keys.read, path) == errno.EACCES
        with pytest.raises(SwapfsError, match="owned by uid 65534"):
            keys.read(path)
        os.chown(path, 0, -1)
        assert keys.read(path).key_id == master.key_id
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    keys.generate(credentials / keys.CREDENTIAL)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    found = keys.load()
    assert found is not None and found.source == str(credentials / keys.CREDENTIAL)
    found = keys.load(path)  # a key file named explicitly comes first
    assert found is not None and found.key_id == master.key_id
    assert "hunter" not in repr(found) and found.source in repr(found)


# -- through a mount ----------------------------------------------------------------


@requires_mount
@pytest.mark.mount
def test_a_mount_refuses_a_wrong_key_and_the_wrong_mode(tmp_path: Path) -> None:
    with mounted() as mount:
        os.mkdir(mount.path("c"))
        mount.path("c", "f").write_bytes(page(3))
        mount.umount()
        other = keys.generate(tmp_path / "other.key")
        for flags, words in ((["--key-file", other.source], "is encrypted with key"),
                             (["--no-encrypt"], "encryption is off")):
            result = swapfs("mount", "--state", str(mount.state), *flags, str(mount.mnt),
                            check=False)
            assert result.returncode == 1, result.stderr
            assert words in result.stderr and len(result.stderr.splitlines()) == 1, \
                result.stderr
        mount.mount()
        assert mount.path("c", "f").read_bytes() == page(3)


_HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from tests.security.test_encryption import page
    with open(sys.argv[1] + "/cgroup.procs", "w") as procs:
        procs.write(str(__import__("os").getpid()))
    pages = int(sys.argv[2])
    held = bytearray(pages * 4096)
    for number in range(pages):
        held[number * 4096:(number + 1) * 4096] = page(number)
    print("held", flush=True)
    sys.stdin.readline()
    ok = all(held[n * 4096:(n + 1) * 4096] == page(n) for n in range(pages))
    print("intact" if ok else "changed", flush=True)
""")


@requires_mount
@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("encrypt", [True, False])
def test_swapped_out_secrets_are_not_on_disk(tmp_path: Path, encrypt: bool) -> None:
    """A process holding 96 MiB of pages full of a password, limited to
    32 MiB: the kernel swaps most of them to swapfs. Encrypted, no byte of
    the state directory shows the password; unencrypted (the control), it does."""
    from tests.swap.test_swap import swap_file, swap_on

    config = tmp_path / "plain.toml"
    config.write_text("encrypt = false\n")
    with mounted(config=None if encrypt else config) as mount:
        path = swap_file(mount, "vm.swap", 256)
        with swap_on(path), MemoryCgroup("secret", 32 * MIB) as cgroup:
            holder = subprocess.Popen(
                [sys.executable, "-c", _HOLDER, str(cgroup.path), str(96 * MIB // BS),
                 str(Path(__file__).resolve().parents[2])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout is not None and holder.stdin is not None
                assert holder.stdout.readline().strip() == "held"
                swapped = mount.chain("web")["stored_bytes"]
                assert swapped >= 48 * MIB, swapped
                found = SECRET in state_bytes(mount.state)
                holder.stdin.write("verify\n")
                holder.stdin.flush()
                assert holder.stdout.readline().strip() == "intact"
            finally:
                holder.kill()
                holder.wait()
        assert found != encrypt
        assert mount.stats()["encrypted"] is encrypt


def test_random_pages_read_back_after_reopen(tmp_path: Path,
                                             master_key: keys.MasterKey) -> None:
    """Overwrites, dedup hits and frees over many runs of slots, reopened."""
    state = tmp_path / "state"
    rng = random.Random(7)
    pool = [rng.randbytes(BS) for _ in range(40)]
    want = bytearray(256 * BS)
    with closing(Volume(state, master=master_key)) as vol:
        chain = vol.mkdir(ROOT_INO, b"c", 0o700, 0, 0)
        ino = vol.create(chain.ino, b"f", MODE, 0, 0).ino
        for _ in range(300):
            first, count = rng.randrange(250), rng.randrange(1, 7)
            data = b"".join(rng.choice(pool) if rng.random() < 0.9 else bytes(BS)
                            for _ in range(count))
            vol.write(ino, first * BS, data)
            want[first * BS:first * BS + len(data)] = data
    with closing(Volume(state, master=master_key)) as vol:
        size = vol.getattr(ino).size
        assert vol.read(ino, 0, len(want)) == bytes(want[:size])
    assert fsck.check(state, master=master_key).clean
