"""Upgrading an index in place: state directories made by formats 1, 2 and
3 (the fixtures in tests/fixtures), and 4 (made from today's), open with
today's code, read back every byte, and check clean; a kill at any point
of the conversion leaves one format or the other, never a mix, and either
reads back the same bytes. An encrypted state of format 3 is sealed again
as it is converted."""

import errno
import struct
import subprocess
import sys
import tarfile
from contextlib import closing
from pathlib import Path
from typing import Any

import lmdb
import pytest

from swapfs.cli import commands as cli
from swapfs.engine import cleanmark, fsck, keys, reseal
from swapfs.engine import index as index_module
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import SwapfsError
from swapfs.engine.filemap import MAP_RUN, run_directory
from swapfs.engine.index import FORMAT_VERSION, Index
from swapfs.engine.slottable import ENTRY, SLOT_RUN
from swapfs.engine.state import OldFormat
from swapfs.engine.volume import Volume
from tests.fixtures.make_state import FIXTURE_KEY, expected_contents, make, small_contents
from tests.killing import REPO, run_until_killed

FIXTURES = Path(__file__).parents[1] / "fixtures"


def unpack(tmp_path: Path, version: int | str = 1) -> Path:
    """The state directory of format *version*'s fixture, with its punched
    slots holes again (tar stored them as zeros; a stored block is never all
    zeros, and a seal file's zeros are records never written)."""
    with tarfile.open(FIXTURES / f"format{version}-state.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    state = tmp_path / "state"
    for data in (state / "data").iterdir():
        subprocess.run(["fallocate", "--dig-holes", str(data)], check=True)
    return state


def raw_format(state: Path) -> int:
    """The index's format number, read without swapfs: format 1 stored a
    bare big-endian u64, format 2 the same followed by a CRC-32."""
    env = lmdb.open(str(state / "index.lmdb"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            raw = txn.get(b"format", db=env.open_db(b"meta", txn=txn, create=False))
    finally:
        env.close()
    assert raw is not None and len(raw) in (8, 12)
    return int.from_bytes(raw[:8], "big")


def assert_contents(state: Path) -> None:
    with closing(Volume(state)) as vol:
        for path, data in expected_contents().items():
            assert vol.read(vol.resolve(path).ino, 0, len(data) + BLOCK_SIZE) == data, path
        assert vol.priorities() == {vol.resolve("other/solo2").ino: 7}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_old_state_opens_converted_and_checks_clean(tmp_path: Path, version: int) -> None:
    state = unpack(tmp_path, version)
    assert raw_format(state) == version
    assert_contents(state)
    assert raw_format(state) == FORMAT_VERSION
    report = fsck.check(state)
    assert report.clean, report.problems
    with closing(Volume(state)) as vol:
        chains = vol.stats()["chains"]
        assert chains["vms"]["unique_blocks"] == 826  # what format 1's fsck counted
        assert chains["other"]["unique_blocks"] == 2
        assert not vol.encrypted  # an old state was never encrypted
        # and it keeps working: a write, a clone, a discard
        base = vol.resolve("vms/base")
        vol.write(base.ino, 0, b"\x01" * BLOCK_SIZE)
        vol.clone(base.ino, vol.resolve("vms").ino, b"again")
        vol.fallocate(base.ino, 0x03, 10 * BLOCK_SIZE, 100 * BLOCK_SIZE)
    assert fsck.check(state).clean


def to_format_4(state: Path) -> None:
    """Make today's state one of format 4, as that format wrote it: no run
    directories, chain records without the count of blocks stored."""
    index = Index(state / "index.lmdb")
    try:
        with index.begin(write=True) as txn:
            for chain in list(txn.iter_chains()):
                key = struct.pack(">I", chain.id_)
                txn.txn.put(key, index_module.checksummed(
                    index_module._CHAINS, key, struct.pack(">32sQ", chain.key, chain.next_slot)),
                    db=index.chains)
            txn.txn.drop(index.mapdirs, delete=True)
            txn.put_meta(b"format", 4)
    finally:
        index.close()


def test_a_format_4_state_gets_its_files_run_directories(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make(state)
    to_format_4(state)
    assert raw_format(state) == 4
    assert_contents(state)
    assert raw_format(state) == FORMAT_VERSION
    with closing(Volume(state)) as vol, vol.index.begin() as txn:
        clone = vol.resolve("vms/clone").ino
        assert vol.getattr(clone).size > MAP_RUN * BLOCK_SIZE  # a map of two runs
        for path in expected_contents():
            ino = vol.resolve(path).ino
            named = txn.get_map_dir(ino)
            assert named == (run_directory(txn, ino) or None), path
        assert txn.get_map_dir(clone) == b"\x03"
    assert fsck.check(state).clean


def test_fsck_leaves_an_old_format_alone_unless_told(tmp_path: Path) -> None:
    state = unpack(tmp_path)
    report = fsck.check(state)
    assert [problem.kind for problem in report.problems] == ["old-format"]
    assert report.exit_code == fsck.EXIT_UNREPAIRED
    assert raw_format(state) == 1
    with pytest.raises(OldFormat):
        Volume(state, upgrade=False)
    upgraded = subprocess.run(
        [sys.executable, "-m", "swapfs.cli", "fsck", "--upgrade", "--state", str(state)],
        cwd=REPO, capture_output=True, text=True)
    assert upgraded.returncode == fsck.EXIT_CLEAN, upgraded.stderr
    assert raw_format(state) == FORMAT_VERSION
    assert_contents(state)


#: Run in a child: open the state (which converts it) with one function
#: dying on its Nth call (tests/killing.py).
_CONVERT = """
from pathlib import Path
from swapfs.engine import filemap, index, upgrade, volume
owner = {"map": filemap.FileMap, "txn": index.Txn, "upgrade": upgrade}[sys.argv[2]]
_die_at_call(owner, sys.argv[3], int(sys.argv[4]))
volume.Volume(Path(sys.argv[1])).close()
"""


@pytest.mark.parametrize(("target", "name", "nth", "converted"), [
    ("txn", "put_slot_run", 1, False),  # before the slot tables are written
    ("map", "save", 3, False),  # in the middle of the file maps
    ("txn", "commit", 1, False),  # everything written, not committed
    ("txn", "commit", 3, True),  # committed; killed at a later commit
])
def test_a_kill_during_the_conversion_leaves_one_format(
        tmp_path: Path, target: str, name: str, nth: int, converted: bool) -> None:
    state = unpack(tmp_path)
    run_until_killed(_CONVERT, str(state), target, name, str(nth))
    assert raw_format(state) == (FORMAT_VERSION if converted else 1)
    assert_contents(state)  # converts now if it was not
    assert raw_format(state) == FORMAT_VERSION
    assert fsck.check(state).clean


@pytest.mark.parametrize(("target", "name", "nth"), [
    ("txn", "put_chain", 2),  # the second chain's blocks counted, not written
    ("upgrade", "add_map_dirs", 1),  # counted, the run directories not written
    ("txn", "commit", 1),  # everything written, not committed
])
def test_a_kill_during_the_conversion_from_format_4_leaves_format_4(
        tmp_path: Path, target: str, name: str, nth: int) -> None:
    state = tmp_path / "state"
    make(state)
    to_format_4(state)
    run_until_killed(_CONVERT, str(state), target, name, str(nth))
    assert raw_format(state) == 4
    assert_contents(state)  # converts now
    assert raw_format(state) == FORMAT_VERSION
    assert fsck.check(state).clean


def test_an_encrypted_format_3_state_is_sealed_again_as_it_is_converted(
        tmp_path: Path) -> None:
    """Format 3 sealed a chain's blocks under one key: converting such a
    state needs its master key, and seals every block again under new
    chain secrets bound to the state's new UUID (swapfs/engine/reseal.py)."""
    state = unpack(tmp_path, "3-encrypted")
    old_ciphertext = (state / "data" / "1.blocks").read_bytes()[:BLOCK_SIZE]
    assert raw_format(state) == 3 and len(old_ciphertext) == BLOCK_SIZE
    master = keys.MasterKey(FIXTURE_KEY, "fixture")
    with pytest.raises(OldFormat):
        Volume(state, upgrade=False, master=master)
    with pytest.raises(SwapfsError) as refused:
        Volume(state)
    assert refused.value.errno == errno.ENOKEY and raw_format(state) == 3
    with closing(Volume(state, master=master)) as vol:
        assert vol.encrypted and vol.state_id is not None
        for path, data in small_contents().items():
            assert vol.read(vol.resolve(path).ino, 0, len(data) + BLOCK_SIZE) == data, path
    assert raw_format(state) == FORMAT_VERSION
    assert old_ciphertext not in (state / "data" / "1.blocks").read_bytes()
    assert sorted(path.name for path in state.iterdir()) == ["data", "index.lmdb", "lock"]
    assert fsck.check(state, master=master).clean


def fixture_key(tmp_path: Path) -> keys.MasterKey:
    """The encrypted fixture's master key, in a key file of its own."""
    path = tmp_path / "fixture.key"
    path.write_bytes(FIXTURE_KEY)
    path.chmod(0o600)
    return keys.read(path)


def flip_slot_entry(state: Path, chain_id: int, slot: int) -> None:
    """Flip one bit of the digest in *slot*'s slot-table entry, without swapfs."""
    env = lmdb.open(str(state / "index.lmdb"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            slots = env.open_db(b"slots", txn=txn, create=False)
            key = struct.pack(">II", chain_id, slot // SLOT_RUN)
            found = txn.get(key, db=slots)
            assert found is not None
            raw = bytearray(found)
            raw[(slot % SLOT_RUN) * ENTRY.size] ^= 0x01
            txn.put(key, bytes(raw), db=slots)
        page_size = int(env.stat()["psize"])
    finally:
        env.close()
    cleanmark.mark_clean(state / "index.lmdb", page_size)  # closed as swapfs closes it


def test_an_encrypted_format_3_state_with_a_bad_slot_entry_converts(
        tmp_path: Path) -> None:
    """A slot-table entry that does not verify is lost already: the
    conversion seals its block again from its seal record, leaves the
    entry lost (that slot reads EIO, as before), and fsck --repair then
    rebuilds it from the new seal record and the maps."""
    master = fixture_key(tmp_path)
    # A block keeps its slot through the conversion: a copy converted tells which.
    with closing(Volume(unpack(tmp_path / "copy", "3-encrypted"), master=master)) as vol:
        chain = vol.resolve("vms").chain
        slot = vol.mapped(vol.resolve("vms/base").ino)[0]
    state = unpack(tmp_path, "3-encrypted")
    flip_slot_entry(state, chain, slot)
    want = small_contents()
    with closing(Volume(state, master=master)) as vol:  # mounts, converted
        base = vol.resolve("vms/base").ino
        with pytest.raises(SwapfsError) as lost:
            vol.read(base, 0, BLOCK_SIZE)
        assert lost.value.errno == errno.EIO
        for path, data in want.items():  # every other block reads back
            ino = vol.resolve(path).ino
            for block, mapped in vol.mapped(ino).items():
                if not (path.startswith("vms/") and mapped == slot):
                    assert vol.read(ino, block * BLOCK_SIZE, BLOCK_SIZE) == \
                        data[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE], (path, block)
    assert raw_format(state) == FORMAT_VERSION
    repaired = subprocess.run(
        [sys.executable, "-m", "swapfs.cli", "fsck", "--repair", "--state", str(state),
         "--key-file", master.source], cwd=REPO, capture_output=True, text=True)
    assert repaired.returncode == fsck.EXIT_REPAIRED, repaired.stdout + repaired.stderr
    assert "corrupt-slot" in repaired.stdout + repaired.stderr
    with closing(Volume(state, master=master)) as vol:
        for path, data in want.items():
            assert vol.read(vol.resolve(path).ino, 0, len(data) + BLOCK_SIZE) == data, path
    assert fsck.check(state, master=master).clean


def test_fsck_repair_converts_an_encrypted_format_3_state_with_a_bad_slot_entry(
        tmp_path: Path) -> None:
    state = unpack(tmp_path, "3-encrypted")
    master = fixture_key(tmp_path)
    flip_slot_entry(state, 1, 0)
    report = fsck.check(state, repair=True, master=master)
    assert report.exit_code == fsck.EXIT_REPAIRED, report.problems
    assert raw_format(state) == FORMAT_VERSION
    assert fsck.check(state, master=master).clean
    with closing(Volume(state, master=master)) as vol:
        for path, data in small_contents().items():
            assert vol.read(vol.resolve(path).ino, 0, len(data) + BLOCK_SIZE) == data, path


def test_the_conversion_of_an_encrypted_format_3_state_reports_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealing every block again takes long: the open tells each batch of
    blocks, so that whoever waits for the start sees it move."""
    monkeypatch.setattr(reseal, "_BATCH", 4)
    state = unpack(tmp_path, "3-encrypted")
    steps: list[None] = []
    with closing(Volume(state, master=fixture_key(tmp_path),
                        progress=lambda: steps.append(None))) as vol, \
            vol.index.begin() as txn:
        blocks = sum(-(-len(vol.blocks(chain.id_)) // 4) for chain in txn.iter_chains())
    assert blocks >= 3 and len(steps) >= blocks


def test_a_converted_state_keeps_checking_lease_generations(tmp_path: Path) -> None:
    state = unpack(tmp_path, "3-encrypted")
    with closing(Volume(state, master=fixture_key(tmp_path), claim=lambda: 5)) as vol:
        assert vol.index.generation == 5
    assert raw_format(state) == FORMAT_VERSION


def test_rekey_reseal_converts_an_encrypted_format_3_state_in_one_reseal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = unpack(tmp_path, "3-encrypted")
    old = fixture_key(tmp_path)
    new = keys.generate(tmp_path / "new.key")
    builds: list[int] = []
    build = reseal.build

    def counted(*args: Any, **kwargs: Any) -> int:
        builds.append(args[4].key_id)
        return build(*args, **kwargs)
    monkeypatch.setattr(reseal, "build", counted)
    assert cli.main(["rekey", "--reseal", "--state", str(state), "--key-file", old.source,
                     "--new-key-file", new.source]) == 0
    assert "2 chain keys replaced" in capsys.readouterr().out
    assert builds == [new.key_id]
    assert raw_format(state) == FORMAT_VERSION
    with closing(Volume(state, master=new)) as vol:
        for path, data in small_contents().items():
            assert vol.read(vol.resolve(path).ino, 0, len(data) + BLOCK_SIZE) == data, path
    assert fsck.check(state, master=new).clean
