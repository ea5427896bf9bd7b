"""Stateful property test: the Volume against a plain in-memory model.

The model is, per chain, a dict of file name -> bytearray (plus the files
unlinked while still open). Hypothesis runs random sequences of creates,
writes (random, all-zero, repeated-byte, and copied from other files, so that
duplicate blocks are common), clones, truncates, renames, unlinks, purges,
hole punches of freed slots and remounts, and after every step checks
contents and space accounting exactly: within a chain dedup is exact, so
stored bytes are a pure function of the model's contents. At the end, fsck
must find nothing wrong.
"""

import random
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from swapfs.engine import fsck
from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.index import ROOT_INO
from swapfs.engine.volume import Volume

BS = BLOCK_SIZE
MAX_SIZE = 64 * 1024  # small files keep every step cheap
MAX_FILES = 8
CHAINS = ("a", "b")

lengths = st.one_of(
    st.integers(0, 3 * BS),
    st.sampled_from([1, 7, BS - 1, BS, BS + 1, 2 * BS, 3 * BS]),
)


def offsets(length: int) -> st.SearchStrategy[int]:
    top = MAX_SIZE - length
    return st.one_of(st.integers(0, top), st.integers(0, top // BS).map(lambda b: b * BS))


def sizes() -> st.SearchStrategy[int]:
    return offsets(0)


def blocks_of(data: bytes | bytearray) -> list[bytes]:
    """The file's 4 KiB blocks, the last one padded with zeros as stored."""
    return [bytes(data[i:i + BS]).ljust(BS, b"\0") for i in range(0, len(data), BS)]


def non_zero(block: bytes) -> bool:
    return block.count(0) != len(block)


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="swapfs-model-"))
        self.state = self.tmp / "state"
        self.vol = Volume(self.state)
        self.chain_ino = {
            name: self.vol.mkdir(ROOT_INO, name.encode(), 0o755, 0, 0).ino for name in CHAINS
        }
        self.files: dict[str, dict[str, bytearray]] = {name: {} for name in CHAINS}
        self.inos: dict[tuple[str, str], int] = {}
        # Unlinked while open: still readable and still holding blocks.
        self.orphans: dict[str, dict[int, bytearray]] = {name: {} for name in CHAINS}
        self.names = 0
        self.dirty = False  # changed since the last (re)mount

    # -- helpers ------------------------------------------------------------------

    def new_name(self) -> str:
        self.names += 1
        return f"f{self.names}"

    def paths(self) -> list[tuple[str, str]]:
        return sorted((chain, name) for chain in CHAINS for name in self.files[chain])

    def pick(self, data: st.DataObject, label: str = "file") -> tuple[str, str]:
        return data.draw(st.sampled_from(self.paths()), label=label)

    def has_files(self) -> bool:
        return bool(self.paths())

    def has_room(self) -> bool:
        return len(self.paths()) < MAX_FILES

    def has_orphans(self) -> bool:
        return any(self.orphans.values())

    # -- rules ----------------------------------------------------------------------

    @precondition(has_room)
    @rule(chain=st.sampled_from(CHAINS))
    def create(self, chain: str) -> None:
        name = self.new_name()
        inode = self.vol.create(self.chain_ino[chain], name.encode(), stat.S_IFREG | 0o600,
                                0, 0)
        self.files[chain][name] = bytearray()
        self.inos[chain, name] = inode.ino
        self.dirty = True

    def do_write(self, data: st.DataObject, payload_for: Callable[[int], bytes]) -> None:
        """Write bytes from *payload_for(length)* at a random place of a random file."""
        chain, name = self.pick(data)
        length = data.draw(lengths, label="length")
        offset = data.draw(offsets(length), label="offset")
        payload = payload_for(length)
        assert self.vol.write(self.inos[chain, name], offset, payload) == length
        model = self.files[chain][name]
        if length and offset + length > len(model):
            model.extend(bytes(offset + length - len(model)))
        model[offset:offset + length] = payload
        self.dirty = True

    @precondition(has_files)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write_random(self, data: st.DataObject, seed: int) -> None:
        self.do_write(data, random.Random(seed).randbytes)

    @precondition(has_files)
    @rule(data=st.data(), byte=st.sampled_from([0, 0, 1, 2, 3]))
    def write_pattern(self, data: st.DataObject, byte: int) -> None:
        """All zeros (stores nothing) or one of few fill bytes (blocks repeat often)."""
        self.do_write(data, lambda length: bytes([byte]) * length)

    @precondition(has_files)
    @rule(data=st.data())
    def write_copy(self, data: st.DataObject) -> None:
        """Copy another file's bytes (maybe from the other chain): duplicate blocks."""
        src_chain, src_name = self.pick(data, label="source")
        src = bytes(self.files[src_chain][src_name])
        src_offset = data.draw(offsets(0), label="source offset")
        self.do_write(data, lambda length: src[src_offset:src_offset + length].ljust(
            length, b"\0"))

    @precondition(lambda self: self.has_files() and self.has_room())
    @rule(data=st.data(), empty=st.booleans())
    def clone(self, data: st.DataObject, empty: bool) -> None:
        chain, name = self.pick(data)
        new = self.new_name()
        inode = self.vol.clone(self.inos[chain, name], self.chain_ino[chain], new.encode(),
                               empty=empty)
        source = self.files[chain][name]
        self.files[chain][new] = bytearray(len(source)) if empty else bytearray(source)
        self.inos[chain, new] = inode.ino
        self.dirty = True

    @precondition(has_files)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        chain, name = self.pick(data)
        size = data.draw(sizes(), label="size")
        self.vol.setattr(self.inos[chain, name], size=size)
        model = self.files[chain][name]
        if size < len(model):
            del model[size:]
        else:
            model.extend(bytes(size - len(model)))
        self.dirty = True

    @precondition(has_files)
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        """Rename to a new name or over another file of the chain (freeing it)."""
        chain, name = self.pick(data)
        others = sorted(set(self.files[chain]) - {name})
        target = data.draw(st.sampled_from([self.new_name(), *others]), label="target")
        parent = self.chain_ino[chain]
        assert self.vol.rename(parent, name.encode(), parent, target.encode(), 0,
                               False) is None
        self.files[chain][target] = self.files[chain].pop(name)
        self.inos[chain, target] = self.inos.pop((chain, name))
        self.dirty = True

    @precondition(has_files)
    @rule(data=st.data(), still_open=st.booleans())
    def unlink(self, data: st.DataObject, still_open: bool) -> None:
        chain, name = self.pick(data)
        ino = self.vol.unlink(self.chain_ino[chain], name.encode(), still_open=still_open)
        assert ino == self.inos.pop((chain, name))
        content = self.files[chain].pop(name)
        if still_open:
            self.orphans[chain][ino] = content
        self.dirty = True

    @precondition(has_orphans)
    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        chain, ino = data.draw(st.sampled_from(sorted(
            (chain, ino) for chain in CHAINS for ino in self.orphans[chain])))
        self.vol.purge(ino)
        del self.orphans[chain][ino]
        self.dirty = True

    @rule(max_slots=st.one_of(st.none(), st.integers(1, 4)))
    def punch(self, max_slots: int | None) -> None:
        """A checkpoint, then punch some or all of the free slots still on disk
        (what the daemon does every second): contents stay; once all are
        punched, no free slot holds disk space. (Checked slot by slot: the
        data file's st_blocks also counts the file system's extent blocks,
        which depend on how fragmented the disk is.)"""
        self.vol.sync()  # slots freed since the last checkpoint are not punched
        self.vol.punch_pending(max_slots)
        if max_slots is None:
            with self.vol.index.begin() as txn:
                chains = [chain.id_ for chain in txn.iter_chains()]
            free = {chain_id: self.vol.free_slots(chain_id) for chain_id in chains}
            for chain_id, slots in free.items():
                assert not [slot for slot in slots
                            if self.vol.store.holds_data(chain_id, slot)]

    @precondition(lambda self: self.dirty)
    @rule()
    def remount(self) -> None:
        """Close and reopen: everything persists, orphans are purged on open."""
        self.dirty = False
        self.vol.close()
        self.vol = Volume(self.state)
        for chain in CHAINS:
            for ino in self.orphans[chain]:
                assert not self.vol.is_orphan(ino)
            self.orphans[chain].clear()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def contents_match(self) -> None:
        for (chain, name), ino in self.inos.items():
            assert self.vol.read(ino, 0, MAX_SIZE + BS) == self.files[chain][name], name
        for chain in CHAINS:
            for ino, content in self.orphans[chain].items():
                assert self.vol.read(ino, 0, MAX_SIZE + BS) == content

    @invariant()
    def space_accounting_is_exact(self) -> None:
        stats = self.vol.stats()["chains"]
        for chain in CHAINS:
            files = stats[chain]["files"]
            assert set(files) == set(self.files[chain])
            distinct: set[bytes] = set()
            for name, content in self.files[chain].items():
                mapped = [b for b in blocks_of(content) if non_zero(b)]
                assert files[name]["size"] == len(content)
                assert files[name]["logical_bytes"] == len(mapped) * BS, name
                distinct.update(mapped)
            for content in self.orphans[chain].values():
                distinct.update(b for b in blocks_of(content) if non_zero(b))
            assert stats[chain]["stored_bytes"] == len(distinct) * BS

    def teardown(self) -> None:
        try:
            self.vol.close()
            report = fsck.check(self.state)
            assert report.clean, report.problems
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


VolumeMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None)
TestVolumeModel = VolumeMachine.TestCase
