#!/usr/bin/env python3
"""Virtual machines that swap to the files of one clone chain.

Clones booted from one image hold largely the same pages, and swap them out
alike. This tool shows what swapfs does with that, with real guests: it
boots several QEMU guests at once (tools/guest.py: Debian's kernel under
TCG, the host's root read-only over 9p), each with one virtio disk that is
its swap area. On swapfs the disks are files of one chain: the parent's,
made a swap area once with ``mkswap``, and a clone of it for each other
guest (``swapfs clone``), as a host would give each VM cloned from a parent
a clone of the parent's swap file. QEMU opens them ``cache=none``
(``O_DIRECT``), ``aio=threads``.

Each guest runs the workload of this module (``--in-guest``, with the
host's interpreter): it builds ``--shared-mib`` of pages that every guest
builds alike (the parent's image) and ``--own-mib`` of its own, in anonymous
memory of more than its RAM holds, so the kernel swaps out as it builds;
then it asks the kernel to page out all of it (``MADV_PAGEOUT``), so that
every page of the workload is on the swap disk once, whatever the pressure
left in memory; then it reads every page back and checks it byte for byte,
which swaps it in. It reports the swap traffic its kernel counted
(``pswpout``, ``pswpin`` of /proc/vmstat), the seconds of each phase and
the pages that did not read back as written.

On swapfs the chain then stores the pages the guests share once: the
ideal is the shared pages once and each guest's own, ``(shared + own x
guests)``, against ``(shared + own) x guests`` swapped out.

    python tools/vmswap.py /mnt/swapfs                      # 3 guests, chain "vms"
    python tools/vmswap.py /mnt/swapfs --guests 2 --json
    python tools/vmswap.py --plain /var/tmp/vmdisks          # plain files, to compare

The guests are killed (by pid) when the tool ends, however it ends; the
swap files stay on the mount for ``swapfs stats`` to show.
"""

import argparse
import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

PAGE = 4096
MIB = 1 << 20
#: What a guest prints before its report on the console.
PREFIX = "vmswap:"
#: The kind of the pages every guest builds alike; guest n builds its own as kind n + 1.
SHARED = 0
#: Room on each swap disk beyond the workload, for the rest of the guest's memory.
SLACK_MIB = 64
#: madvise(2)'s MADV_PAGEOUT (Linux 5.4), which Python's mmap module may not name.
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)


def page(kind: int, index: int) -> bytes:
    """Page *index* of kind *kind*: its kind and index, repeated to 4 KiB.
    Cheap to make under TCG, and no two pages alike."""
    return (kind.to_bytes(8, "little") + index.to_bytes(8, "little")) * (PAGE // 16)


# -- the guest's side ----------------------------------------------------------------


def _vmstat() -> dict[str, int]:
    return {name: int(value) for name, value in
            (line.split() for line in Path("/proc/vmstat").read_text().splitlines())}


def workload(vm: int, shared_mib: int, own_mib: int) -> dict[str, Any]:
    """Build, page out and check the guest's memory (run inside the guest)."""
    shared, own = shared_mib * MIB // PAGE, own_mib * MIB // PAGE
    kinds = [(SHARED, index) for index in range(shared)] + [
        (vm + 1, index) for index in range(own)]
    memory = mmap.mmap(-1, len(kinds) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    before = _vmstat()
    start = time.monotonic()
    for at, (kind, index) in enumerate(kinds):
        memory[at * PAGE:(at + 1) * PAGE] = page(kind, index)
    memory.madvise(MADV_PAGEOUT)
    built = time.monotonic()
    middle = _vmstat()
    wrong = sum(1 for at, (kind, index) in enumerate(kinds)
                if memory[at * PAGE:(at + 1) * PAGE] != page(kind, index))
    checked = time.monotonic()
    after = _vmstat()
    return {"vm": vm, "pages": len(kinds), "wrong_pages": wrong,
            "build_seconds": built - start, "verify_seconds": checked - built,
            "swapped_out_bytes": (middle["pswpout"] - before["pswpout"]) * PAGE,
            "swapped_in_bytes": (after["pswpin"] - middle["pswpin"]) * PAGE,
            # The check's swap-ins push other pages out: its own swap-outs.
            "swapped_out_checking_bytes": (after["pswpout"] - middle["pswpout"]) * PAGE}


def elf_slack(count_self: bool = True) -> dict[str, int]:
    """The unused bytes of the code pages mapped in this machine now (by
    every process, this one only if *count_self*), counted from ``readelf
    -lW`` and ``/proc/*/maps`` alone (no code of the driver's):
    for each executable file mapping, the bytes of its segment's pages before
    and after the segment's file range. Per process, and physical (each file
    segment once)."""
    mappings = []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if not count_self and maps.parent.name == str(os.getpid()):
            continue
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                    mappings.append((int(fields[2], 16), fields[3], int(fields[4]), fields[5]))
    loads: dict[str, list[tuple[int, int]]] = {}
    per_process, physical = 0, {}
    for offset, device, inode, path in mappings:
        if path not in loads:
            result = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True)
            loads[path] = [(int(words[1], 16), int(words[4], 16))
                           for words in (line.split() for line in result.stdout.splitlines())
                           if words[:1] == ["LOAD"] and "E" in words[6:-1]]
        for file_offset, file_size in loads[path]:
            if file_offset // PAGE * PAGE == offset:
                unused = file_offset % PAGE + -(file_offset + file_size) % PAGE
                per_process += unused
                physical[(device, inode, file_offset)] = unused
    return {"per_process_bytes": per_process, "physical_bytes": sum(physical.values())}


def start_driver(vm: int, port: str) -> tuple[subprocess.Popen[bytes], int]:
    """``swapfs-driver run`` on this guest's virtio-serial port *port*, as
    driver vm<N>; once it registered, it and the share the daemon granted it."""
    command = [str(Path(sys.executable).parent / "swapfs-driver"), "run", "--name", f"vm{vm}",
               "--port", port, "--agent", "/tmp/agent.sock"]
    driver = subprocess.Popen(command, stderr=subprocess.PIPE)
    assert driver.stderr is not None
    for raw in driver.stderr:
        line = raw.decode(errors="replace")
        if " registered " in line:
            return driver, int(line.split(" share ")[1].split()[0])
    raise RuntimeError(f"the driver exited ({driver.wait()}) before it registered")


def guest_main(vm: int, device: str, shared_mib: int, own_mib: int, port: str | None) -> int:
    """The guest's script: swap on *device*, run the workload, report; with
    a driver *port*, under a driver that registers this guest's unused
    code-page bytes with the host's daemon, reported against an independent
    count."""
    subprocess.run(["swapon", device], check=True)
    running = None
    if port is not None:
        running, share = start_driver(vm, port)
        counted = elf_slack()
    report = workload(vm, shared_mib, own_mib)
    if running is not None:
        # Fields 12, 14 and 15 of /proc/PID/stat: major faults, user and system ticks.
        fields = Path(f"/proc/{running.pid}/stat").read_text().rsplit(")", 1)[1].split()
        running.terminate()
        tick = os.sysconf("SC_CLK_TCK")
        report.update(driver_share_bytes=share, elf_slack=counted,
                      driver_user_seconds=int(fields[11]) / tick,
                      driver_system_seconds=int(fields[12]) / tick,
                      driver_major_faults=int(fields[9]), driver_exit=running.wait())
    print(f"{PREFIX} {json.dumps(report, separators=(',', ':'))}", flush=True)
    return 1 if report["wrong_pages"] or report.get("driver_exit") else 0


# -- the host's side -----------------------------------------------------------------


@dataclass
class GuestReport:
    """What one guest reported, or why it did not."""

    vm: int
    disk: str
    status: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.error and self.report.get("wrong_pages") == 0


def disk_bytes(shared_mib: int, own_mib: int) -> int:
    """The size of each guest's swap disk: its workload, and room for the rest."""
    return (shared_mib + own_mib + SLACK_MIB) * MIB


def _swapfs(*args: str) -> str:
    script = Path(sys.executable).parent / "swapfs"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "swapfs.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"swapfs {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _mkswap(path: Path) -> None:
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)


def chain_disks(mnt: Path, chain: str, guests: int, size: int) -> list[Path]:
    """The guests' swap disks as files of chain *chain* on the swapfs mount
    *mnt*: the parent's, made a swap area, and a clone of it for each other guest."""
    directory = mnt / chain
    directory.mkdir()
    parent = directory / "vm0.swap"
    with open(parent, "wb") as made:
        made.truncate(size)
    _mkswap(parent)
    disks = [parent]
    for vm in range(1, guests):
        clone = directory / f"vm{vm}.swap"
        _swapfs("clone", str(parent), str(clone))
        disks.append(clone)
    return disks


def plain_disks(directory: Path, guests: int, size: int) -> list[Path]:
    """The guests' swap disks as plain files in *directory*, allocated in
    full (as a swap file on a disk is), each a swap area."""
    directory.mkdir(parents=True, exist_ok=True)
    disks = []
    for vm in range(guests):
        path = directory / f"vm{vm}.swap"
        with open(path, "wb") as made:
            os.posix_fallocate(made.fileno(), 0, size)
        _mkswap(path)
        disks.append(path)
    return disks


def _script(vm: int, shared_mib: int, own_mib: int, port: str | None) -> str:
    # -S: the workload needs only the standard library, and the site's
    # start-up is slow under TCG (the driver, a program of its own, has it).
    return (f"cd {ROOT} && exec {sys.executable} -S {Path(__file__).resolve()} --in-guest "
            f"--vm {vm} --shared-mib {shared_mib} --own-mib {own_mib}"
            + (f" --driver-port {port}" if port is not None else ""))


def channel_paths(directory: Path, guests: int) -> list[Path]:
    """Where guest vm<N>'s driver channel is (QEMU listens there)."""
    return [directory / f"vm{vm}.sock" for vm in range(guests)]


def channel_config(directory: Path, guests: int) -> str:
    """The daemon's configuration lines that bind driver vm<N> to guest N's channel."""
    return "".join(f'[drivers.vm{vm}]\nchannel = "{path}"\n'
                   for vm, path in enumerate(channel_paths(directory, guests)))


def run_guests(disks: Sequence[Path], shared_mib: int, own_mib: int, memory_mib: int = 256,
               timeout: float = 1200.0, channels: Path | None = None) -> list[GuestReport]:
    """Boot one guest per disk, all at once, each running the workload; their
    reports. With *channels* (a directory), each guest runs a driver too, on a
    virtio-serial port whose host end is ``channels/vm<N>.sock``, which the
    mount's daemon must have bound to driver vm<N> (:func:`channel_config`)."""
    from swapfs.guest import PORT_NAME
    from tools.guest import Guest

    reports = [GuestReport(vm, str(disk)) for vm, disk in enumerate(disks)]
    paths = channel_paths(channels, len(disks)) if channels is not None else None
    with contextlib.ExitStack() as stack:
        guests = [stack.enter_context(Guest(
            _script(vm, shared_mib, own_mib, PORT_NAME if paths is not None else None), [disk],
            memory_mib=memory_mib,
            cpus=1, channels={PORT_NAME: paths[vm]} if paths is not None else None))
                  for vm, disk in enumerate(disks)]
        deadline = time.monotonic() + timeout
        for guest, report in zip(guests, reports, strict=True):
            try:
                for line in guest.lines(deadline - time.monotonic()):
                    if line.startswith(PREFIX):
                        report.report = json.loads(line[len(PREFIX):])
                guest.wait(max(deadline - time.monotonic(), 30))
            except Exception as exc:  # a guest that hangs or dies: reported, not raised
                report.error = f"{type(exc).__name__}: {exc}"
                tail = guest.transcript.read_text(errors="replace").splitlines()[-20:]
                report.error += "\n" + "\n".join(tail)
            report.status = guest.status
            if not report.report and not report.error:
                report.error = "the guest reported nothing"
    return reports


def summary(reports: Sequence[GuestReport], shared_mib: int, own_mib: int,
            stored_bytes: int | None) -> dict[str, Any]:
    """Totals over the guests, with swap-out and swap-in MB/s inside them and,
    on swapfs, what the chain stores against the ideal."""
    done = [report.report for report in reports if report.report]
    out = sum(report["swapped_out_bytes"] for report in done)
    into = sum(report["swapped_in_bytes"] for report in done)
    ideal = (shared_mib + own_mib * len(reports)) * MIB
    return {
        "guests": len(reports), "failed": sum(not report.ok for report in reports),
        "wrong_pages": sum(report.get("wrong_pages", 0) for report in done),
        "swapped_out_bytes": out, "swapped_in_bytes": into,
        # Pages of the guests' memory besides the workloads, swapped out while
        # they built or checked: what a chain may store beyond the ideal.
        "other_swapped_out_bytes": sum(
            report["swapped_out_bytes"] + report["swapped_out_checking_bytes"]
            - report["pages"] * PAGE for report in done),
        # Each guest's MB/s inside it, summed: the guests ran at once.
        "swap_out_mbps": sum(report["swapped_out_bytes"] / MIB / report["build_seconds"]
                             for report in done),
        "swap_in_mbps": sum(report["swapped_in_bytes"] / MIB / report["verify_seconds"]
                            for report in done),
        "ideal_bytes": ideal, "stored_bytes": stored_bytes,
        "stored_vs_ideal": None if stored_bytes is None else stored_bytes / ideal,
        # With drivers in the guests: each one's share of the pool (the
        # daemon's figure) and the same guest's slack counted by readelf.
        "driver_share_bytes": [report.get("driver_share_bytes") for report in done],
        "elf_slack_bytes": [report.get("elf_slack", {}).get("physical_bytes")
                            for report in done],
        "driver_user_seconds": [report.get("driver_user_seconds") for report in done],
        "driver_system_seconds": [report.get("driver_system_seconds") for report in done],
        "driver_major_faults": [report.get("driver_major_faults") for report in done],
    }


def pool_figures(mnt: Path) -> dict[str, int]:
    """The transient pool's counters (``swapfs stats``): hits, misses, admissions."""
    pool = json.loads(_swapfs("stats", "--json", str(mnt)))["transient_cache"]
    return {key: int(pool[key]) for key in ("hits", "misses", "admissions", "capacity_bytes")}


def stored_bytes(mnt: Path, chain: str) -> int:
    """What swapfs stores for chain *chain* (``swapfs stats``)."""
    return int(json.loads(_swapfs("stats", "--json", str(mnt)))["chains"][chain]["stored_bytes"])


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Make SIGTERM an exit, so that the guests are killed as at any other
    (their ``with`` blocks, and tools/guest.py at interpreter exit)."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mount", nargs="?", type=Path, help="a swapfs mount")
    parser.add_argument("--plain", type=Path, help="plain swap files in this directory instead")
    parser.add_argument("--chain", default="vms", help="the chain made on the mount")
    parser.add_argument("--guests", type=int, default=3)
    parser.add_argument("--shared-mib", type=int, default=160,
                        help="pages every guest builds alike")
    parser.add_argument("--own-mib", type=int, default=96, help="pages of each guest's own")
    parser.add_argument("--memory-mib", type=int, default=256, help="each guest's RAM")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--channels", type=Path, metavar="DIR",
                        help="run a driver in each guest, on a virtio-serial port whose host "
                             "end is DIR/vm<N>.sock; the mount's daemon must bind driver "
                             "vm<N> to it ([drivers.vmN] channel = ...)")
    parser.add_argument("--elf-slack", action="store_true",
                        help="print the unused code-page bytes of this machine's other "
                             "processes, counted with readelf (what a driver here should "
                             "report), as JSON, and exit")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--driver-port", help=argparse.SUPPRESS)
    parser.add_argument("--vm", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="/dev/vda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.elf_slack:
        print(json.dumps(elf_slack(count_self=False)))
        return 0
    if args.in_guest:
        return guest_main(args.vm, args.device, args.shared_mib, args.own_mib,
                          args.driver_port)
    if (args.mount is None) == (args.plain is None):
        parser.error("give a swapfs mount or --plain DIR")
    size = disk_bytes(args.shared_mib, args.own_mib)
    with _exit_on_sigterm():
        if args.mount is not None:
            disks = chain_disks(args.mount, args.chain, args.guests, size)
        else:
            disks = plain_disks(args.plain, args.guests, size)
        reports = run_guests(disks, args.shared_mib, args.own_mib, args.memory_mib,
                             channels=args.channels)
    stored = stored_bytes(args.mount, args.chain) if args.mount is not None else None
    figures = summary(reports, args.shared_mib, args.own_mib, stored)
    if args.mount is not None:
        figures["pool"] = pool_figures(args.mount)
    if args.json:
        print(json.dumps({"summary": figures, "guests": [asdict(report) for report in reports]},
                         indent=2))
    else:
        for report in reports:
            shown = report.report or {}
            print(f"vm{report.vm}: {'ok' if report.ok else 'FAILED'}; swapped out "
                  f"{shown.get('swapped_out_bytes', 0) / MIB:.0f} MiB, in "
                  f"{shown.get('swapped_in_bytes', 0) / MIB:.0f} MiB, "
                  f"{shown.get('wrong_pages', '?')} wrong pages {report.error}")
        print(f"{figures['guests']} guests: swap-out {figures['swap_out_mbps']:.1f} MB/s, "
              f"swap-in {figures['swap_in_mbps']:.1f} MB/s inside them", end="")
        if stored is not None:
            print(f"; stored {stored / MIB:.0f} MiB for "
                  f"{figures['swapped_out_bytes'] / MIB:.0f} MiB swapped out, ideal "
                  f"{figures['ideal_bytes'] / MIB:.0f} MiB ({figures['stored_vs_ideal']:.2f}x)")
        else:
            print()
        if args.channels is not None:
            print(f"drivers' shares {figures['driver_share_bytes']} bytes, counted by "
                  f"readelf {figures['elf_slack_bytes']}; pool {figures.get('pool')}")
    return 0 if figures["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
