"""One flipped bit in the index, or one damage to a data file: the campaigns
of tools/bitflip.py against their goals, and the campaign's own classifier,
so that a pass means the goals hold and not that the harness saw nothing."""

import faulthandler
import os
import signal
import time
from types import SimpleNamespace

import pytest

from swapfs.engine.blocks import BLOCK_SIZE
from swapfs.engine.errors import CorruptBlock
from tools import bitflip
from tools.bitflip import Phase, Reads, Trial


@pytest.mark.slow
def test_a_flipped_bit_never_reads_wrong_and_fsck_reports_it(tmp_path):
    """300 seeded flips among the index's pages in use: no read returns
    wrong bytes (before or after fsck --repair), fsck never crashes and
    reports every flip that changed a read, and no step dies or hangs."""
    _, trials = bitflip.campaign(tmp_path, trials=300, seed=1, jobs=2)
    summary = bitflip.summarize(trials)
    missed = bitflip.missed_goals(summary)
    assert not missed, bitflip.table(summary, trials)


@pytest.mark.slow
def test_damaged_data_files_never_read_wrong_and_fsck_reports_them(tmp_path):
    """150 seeded damages to the data files (a flipped bit, a zeroed slot, a
    file cut short): the same goals, and each damage reads as an error."""
    _, trials = bitflip.campaign(tmp_path, trials=150, seed=4, jobs=2, data=True)
    summary = bitflip.summarize(trials)
    assert not bitflip.missed_goals(summary), bitflip.table(summary, trials)
    assert {trial.kind.split()[1] for trial in trials} == {"flip", "zero", "cut"}
    assert len(summary.read_errors) > 100  # the state's data files are nearly all in use


@pytest.mark.slow
def test_damaged_data_and_seal_files_of_an_encrypted_state(tmp_path):
    """100 seeded damages to an encrypted state's data and seal files: the
    same goals; each damage reads as an error."""
    _, trials = bitflip.campaign(tmp_path, trials=100, seed=6, jobs=2, data=True,
                                 encrypt=True)
    summary = bitflip.summarize(trials)
    assert not bitflip.missed_goals(summary), bitflip.table(summary, trials)
    assert {trial.kind.split()[2].split(".")[1] for trial in trials} == {"blocks", "seals"}
    assert len(summary.read_errors) > 90


class FakeVolume:
    """A file of three blocks and a short one that reads back as *answers*
    says: block number -> bytes to return, or an exception to raise."""

    def __init__(self, answers):
        self.answers = answers

    def resolve(self, path):
        return SimpleNamespace(ino=1)

    def read(self, ino, offset, size):
        answer = self.answers.get(offset // BLOCK_SIZE)
        if isinstance(answer, Exception):
            raise answer
        return answer if answer is not None else WANT[offset:offset + size]


WANT = os.urandom(3 * BLOCK_SIZE + 100)


def test_reads_count_wrong_bytes_errors_and_unnamed_errors():
    reads = Reads()
    volume = FakeVolume({0: bytes(BLOCK_SIZE), 1: CorruptBlock("slot 7"), 2: KeyError(9),
                         3: WANT[3 * BLOCK_SIZE:] + b"x"})  # the file grew by a byte
    bitflip.read_file(volume, "c/f", WANT, reads)
    assert (reads.right, reads.wrong) == (0, {"c/f": 2})
    assert (reads.errors, reads.unnamed) == ({"EIO": 1}, {"KeyError": 1})
    assert reads.phase().outcome == "wrong"


def test_reads_right_and_a_file_that_is_gone():
    reads = Reads()
    bitflip.read_file(FakeVolume({}), "c/f", WANT, reads)
    assert reads.phase() == Phase("right", {"right": 4, "errors": {}, "unnamed": {},
                                            "wrong": {}})
    gone = Reads()
    bitflip.read_file(FakeVolume({}), "c/f", WANT + bytes(BLOCK_SIZE - 100), gone)
    assert gone.wrong == {"c/f": 1}  # the file is a block short: one read at its end


def _segfault() -> Phase:
    os.kill(os.getpid(), signal.SIGSEGV)
    return Phase("unreachable")


def _sleep() -> Phase:
    time.sleep(60)
    return Phase("unreachable")


def _raise() -> Phase:
    raise ValueError("bad value")


def _grab() -> Phase:
    return Phase("grabbed", len(bytearray(2 * bitflip.MEMORY_ROOM)))


def test_forked_steps_report_how_they_died():
    assert bitflip.forked(lambda: Phase("4", {"refcount": 1}), 10) == Phase("4", {"refcount": 1})
    assert bitflip.forked(_raise, 10) == Phase("crash", "ValueError: bad value")
    assert bitflip.forked(_grab, 10) == Phase("crash", "MemoryError: ")
    started = time.monotonic()
    assert bitflip.forked(_sleep, 0.5).outcome == "hang"
    assert time.monotonic() - started < 30


def test_a_step_meant_to_segfault_reports_into_its_own_capture(tmp_path):
    """The child's fault handler (pytest's, when on) reports the fatal signal
    into the descriptor given, not into the test's log."""
    with open(tmp_path / "stderr", "w+b") as capture:
        assert bitflip.forked(_segfault, 10, stderr=capture.fileno()) == Phase("signal", "SIGSEGV")
    report = (tmp_path / "stderr").read_text()
    assert ("Fatal Python error: Segmentation fault" in report) == faulthandler.is_enabled()


def _trial(number, reads="right", fsck="0", repair="0", reads_after=None, fsck_after=None):
    def phase(outcome, errors=None):
        if outcome in ("right", "error", "wrong"):
            return Phase(outcome, {"right": 1, "errors": errors or {}, "unnamed": {},
                                   "wrong": {"c/f": 1} if outcome == "wrong" else {}})
        return Phase(outcome, "")
    return Trial(number, number * 10, 3, 0, "leaf",
                 phase(reads, {"EIO": 1} if reads == "error" else None), phase(fsck),
                 phase(repair), phase(reads_after or reads), phase(fsck_after or fsck))


def test_summary_sorts_trials_into_the_goals_they_miss():
    trials = [
        _trial(0),                                           # changed nothing
        _trial(1, reads="error", fsck="4", repair="4"),      # an error fsck reports
        _trial(2, reads="wrong", fsck="4", repair="1"),      # wrong bytes
        _trial(3, reads="error"),                            # an error fsck missed
        _trial(4, fsck="crash", repair="crash"),             # fsck raised
        _trial(5, reads="signal", fsck="refused", repair="refused"),  # reads segfaulted
        _trial(6, reads="right", fsck="1", repair="1", reads_after="hang"),
        _trial(7, reads="error", fsck="4", repair="1", fsck_after="0"),  # missed after repair
    ]
    summary = bitflip.summarize(trials)
    assert summary.unchanged == [0]
    assert summary.reported == [1, 2, 5, 6, 7]
    assert summary.read_errors == [1, 3, 7]
    assert bitflip.missed_goals(summary) == {
        "wrong": [2], "fsck_crashes": [4], "silent": [3, 7], "child_crashes": [5, 6],
        "worse": [6]}  # reads after the repair hung: no block read at all
    more = _trial(8, reads="error", fsck="4", repair="4")
    more.reads_after = Phase("error", {"right": 0, "errors": {"EIO": 2}, "unnamed": {},
                                       "wrong": {}})
    assert bitflip.summarize([more]).worse == [8]
    assert "#3 byte 30 bit 3" in bitflip.table(summary, trials)


def test_copies_keep_holes_and_a_flip_flips_one_bit(tmp_path):
    source = tmp_path / "a"
    source.mkdir()
    with open(source / "f", "wb") as file:
        file.write(b"\1" * BLOCK_SIZE)
        file.truncate(1 << 20)  # a hole up to the end, as a punched data file has
    bitflip.copy_state(source, tmp_path / "b")
    copy = tmp_path / "b" / "f"
    assert copy.read_bytes() == (source / "f").read_bytes()
    assert copy.stat().st_blocks * 512 < 1 << 20
    bitflip.flip(copy, 1, 7)
    assert copy.read_bytes()[:3] == b"\1\x81\1"
