"""``swapfs rekey --reseal``: new chain secrets, every block sealed again,
nothing of the old keys left in any file of the state, and a kill at any
point leaves the state that one key or the other opens (swapfs/engine/reseal.py)."""

import errno
from contextlib import closing
from pathlib import Path

import pytest

from swapfs.engine import BLOCK_SIZE, SEAL_SIZE, CorruptIndex, Volume, fsck, keys, reseal
from tests.engine.test_upgrade import flip_slot_entry
from tests.killing import run_until_killed
from tests.mounting import swapfs
from tests.security.test_encryption import errno_of, make, page, state_bytes

BS = BLOCK_SIZE
#: What make() leaves in each file: f holds pages 0..7; g and h, page 1.
CONTENTS = {"f": b"".join(page(number) for number in range(8)), "g": page(1), "h": page(1)}


def old_material(state: Path, master: keys.MasterKey) -> list[bytes]:
    """Everything of the state that its keys made: each chain's wrapped
    secret, and each stored block's ciphertext, seal record and digest."""
    found = []
    with closing(Volume(state, master=master)) as vol, vol.index.begin() as txn:
        for chain in txn.iter_chains():
            found.append(chain.key)
            blocks = (state / "data" / f"{chain.id_}.blocks").read_bytes()
            seals = (state / "data" / f"{chain.id_}.seals").read_bytes()
            for slot, (digest, _refcount) in vol.blocks(chain.id_).items():
                found += [blocks[slot * BS:(slot + 1) * BS], digest,
                          seals[slot * SEAL_SIZE:(slot + 1) * SEAL_SIZE]]
    return found


def figures(state: Path, master: keys.MasterKey) -> dict[str, tuple[int, float]]:
    with closing(Volume(state, master=master)) as vol:
        return {name: (chain["unique_blocks"], chain["dedup_ratio"])
                for name, chain in vol.stats()["chains"].items()}


def assert_contents(state: Path, master: keys.MasterKey, inos: dict[str, int]) -> None:
    with closing(Volume(state, master=master)) as vol:
        for name, data in CONTENTS.items():
            assert vol.read(inos[name], 0, len(data) + BS) == data, name


def test_reseal_leaves_nothing_the_old_keys_open(tmp_path: Path,
                                                 master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol:
        old_id = vol.state_id
    old = old_material(state, master_key)
    before = figures(state, master_key)
    assert len(old) == 1 + 8 * 3 + 1 + 3  # two chains: 8 blocks and 1
    new = keys.generate(tmp_path / "new.key")

    result = swapfs("rekey", "--reseal", "--state", str(state), "--key-file",
                    master_key.source, "--new-key-file", new.source)
    assert "2 chain keys replaced and every block sealed again" in result.stdout

    everything = state_bytes(state)
    assert not [needle for needle in old if needle in everything]
    assert sorted(path.name for path in state.iterdir()) == ["data", "index.lmdb", "lock"]
    assert errno_of(Volume, state, master=master_key) == errno.EKEYREJECTED
    with closing(Volume(state, master=new)) as vol, vol.index.begin() as txn:
        assert vol.state_id not in (None, old_id)
        for chain in txn.iter_chains():
            for state_id in (vol.state_id, old_id):
                with pytest.raises(CorruptIndex):
                    master_key.unwrap(state_id, chain.id_, chain.key)
    assert_contents(state, new, inos)
    assert figures(state, new) == before
    assert fsck.check(state, master=new).clean


def test_reseal_with_the_same_master_key_and_then_write(tmp_path: Path,
                                                        master_key: keys.MasterKey) -> None:
    """Without --new-key-file the master key stays; the chain secrets change."""
    state = tmp_path / "state"
    inos = make(state, master_key)
    old = old_material(state, master_key)
    swapfs("rekey", "--reseal", "--state", str(state), "--key-file", master_key.source)
    assert not [needle for needle in old if needle in state_bytes(state)]
    with closing(Volume(state, master=master_key)) as vol:
        vol.write(inos["g"], 0, page(2))  # dedups onto f's page 2, under the new keys
        assert vol.stats()["chains"]["a"]["unique_blocks"] == 8
    with closing(Volume(state, master=master_key)) as vol:
        for name, data in dict(CONTENTS, g=page(2)).items():
            assert vol.read(inos[name], 0, len(data) + BS) == data, name
    assert fsck.check(state, master=master_key).clean


def test_reseal_tells_its_progress(tmp_path: Path, master_key: keys.MasterKey) -> None:
    state = tmp_path / "state"
    make(state, master_key)
    told: list[tuple[int, int, int]] = []
    with closing(Volume(state, master=master_key)) as vol:
        assert vol.reseal(master_key, lambda *args: told.append(args)) == 2
    assert told == [(1, 8, 8), (2, 1, 1)]  # chain id, blocks sealed again, of all


def test_a_damaged_block_stays_unreadable(tmp_path: Path, master_key: keys.MasterKey) -> None:
    """A block that does not open cannot be sealed again: it is kept as a
    block that reads EIO, set aside, and fsck still reports it alone."""
    state = tmp_path / "state"
    inos = make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol:
        slot = vol.mapped(inos["f"])[3]
    with open(state / "data" / "1.blocks", "r+b") as data:
        data.seek(slot * BS + 9)
        data.write(b"\xff")
    swapfs("rekey", "--reseal", "--state", str(state), "--key-file", master_key.source)
    with closing(Volume(state, master=master_key)) as vol:
        assert errno_of(vol.read, inos["f"], 3 * BS, BS) == errno.EIO
        for number in (0, 1, 2, 4, 5, 6, 7):
            assert vol.read(inos["f"], number * BS, BS) == page(number)
        assert vol.read(inos["g"], 0, BS) == page(1)
    report = fsck.check(state, master=master_key)
    assert [problem.kind for problem in report.problems] == ["corrupt-block"]


def test_an_unencrypted_state_is_not_resealed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make(state, None)
    refused = swapfs("rekey", "--reseal", "--state", str(state), check=False)
    assert refused.returncode == 1 and "is not encrypted" in refused.stderr


#: Run in a child: reseal with one function dying on its Nth call
#: (tests/killing.py).
_RESEAL = """
from pathlib import Path
from swapfs.engine import keys, reseal, sealing, volume
owner, name = {"fsync": (reseal, "sync_directory"),
               "seal": (sealing.ChainKeys, "seal")}[sys.argv[2]]
_die_at_call(owner, name, int(sys.argv[3]))
vol = volume.Volume(Path(sys.argv[1]), master=keys.read(Path(sys.argv[4])))
vol.reseal(keys.read(Path(sys.argv[5])))
vol.close()
"""


@pytest.mark.parametrize(("target", "nth", "resealed"), [
    ("seal", 5, False),  # while blocks are sealed again
    ("fsync", 3, False),  # the new state complete, not committed
    ("fsync", 4, True),  # committed, nothing swapped yet
    ("fsync", 5, True),  # the old data files moved out, the new ones not in
    ("fsync", 7, True),  # the new data files in place, the old index too
    ("fsync", 9, True),  # the old index moved out, the new one not in
])
def test_a_kill_during_a_reseal_leaves_one_key_in_force(
        tmp_path: Path, master_key: keys.MasterKey, target: str, nth: int,
        resealed: bool) -> None:
    state = tmp_path / "state"
    inos = make(state, master_key)
    new = keys.generate(tmp_path / "new.key")
    run_until_killed(_RESEAL, str(state), target, str(nth), master_key.source, new.source)
    assert (state / reseal.READY).exists() == resealed
    works, refused = (new, master_key) if resealed else (master_key, new)
    # The first to open the state after the kill is swapfs fsck, which
    # completes (or undoes) the reseal first, as every open does.
    checked = swapfs("fsck", "--state", str(state), "--key-file", works.source, check=False)
    assert checked.returncode == fsck.EXIT_CLEAN, checked.stdout + checked.stderr
    assert not (state / reseal.BUILDING).exists() and not (state / reseal.READY).exists()
    assert errno_of(Volume, state, master=refused) == errno.EKEYREJECTED
    assert_contents(state, works, inos)


def test_a_lost_slot_entry_stays_lost_and_fsck_rebuilds_it(
        tmp_path: Path, master_key: keys.MasterKey) -> None:
    """A slot whose entry does not verify does not stop the reseal: it
    reads EIO as before, its block is sealed again from its seal record,
    and fsck --repair rebuilds its entry afterwards."""
    state = tmp_path / "state"
    inos = make(state, master_key)
    with closing(Volume(state, master=master_key)) as vol:
        slot = vol.mapped(inos["f"])[3]
    flip_slot_entry(state, 1, slot)
    swapfs("rekey", "--reseal", "--state", str(state), "--key-file", master_key.source)
    with closing(Volume(state, master=master_key)) as vol:
        assert errno_of(vol.read, inos["f"], 3 * BS, BS) == errno.EIO
        assert vol.read(inos["f"], 4 * BS, BS) == page(4)
    report = fsck.check(state, repair=True, master=master_key)
    assert [problem.kind for problem in report.problems] == ["corrupt-slot"]
    assert report.exit_code == fsck.EXIT_REPAIRED
    assert_contents(state, master_key, inos)
    assert fsck.check(state, master=master_key).clean
