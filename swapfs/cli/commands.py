"""``swapfs``: the operator's command line.

Exit codes: 0 success; 1 the operation failed (the message says why); 2 bad
usage; ``fsck`` uses 0 clean, 1 repaired, 4 problems left, 8 the check
could not run or finish (no state, in use, unreadable).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from swapfs.cli import mountcheck, spawn, swaparea
from swapfs.control import MAX_VALUE, protocol
from swapfs.engine import State, SwapfsError, fsck, keys, lease, recorded_generation, reseal

EXAMPLES = """\
examples:
  swapfs keygen /etc/swapfs/master.key
  swapfs mount --state /var/lib/swapfs/a /mnt/swapfs --standby
  swapfs standby --state /shared/swapfs/a --config /etc/swapfs/a.toml /mnt/swapfs
  mkdir /mnt/swapfs/web
  truncate -s 4G /mnt/swapfs/web/base.swap
  swapfs clone /mnt/swapfs/web/base.swap /mnt/swapfs/web/vm1.swap
  swapfs clone --empty /mnt/swapfs/web/base.swap /mnt/swapfs/web/vm2.swap
  swapfs priority /mnt/swapfs/web/vm1.swap 10
  swapfs stats /mnt/swapfs --json
  swapfs swapon /mnt/swapfs/web/vm1.swap --priority 10
  swapfs status
  swapfs swapoff /mnt/swapfs/web/vm1.swap
  swapfs umount /mnt/swapfs
  swapfs fsck --state /var/lib/swapfs/a --repair
  swapfs lease --state /var/lib/swapfs/a --json
  swapfs rekey --state /var/lib/swapfs/a --new-key-file /etc/swapfs/next.key
  swapfs rekey --state /var/lib/swapfs/a --new-key-file /etc/swapfs/next.key --reseal
"""

#: How long ``mount`` waits for a sign of progress from the starting daemon
#: (it waits as long as the daemon reports some: swapfs/cli/spawn.py), and
#: ``umount`` for the daemon to exit.
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 60.0


class CommandError(Exception):
    """A failure to report to the user as one line, exit code 1."""


def _mount(args: argparse.Namespace) -> int:
    state: Path = args.state.resolve()
    mountcheck.check_new_mount(args.mountpoint, state)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mountd", "--state", str(state), args.mountpoint]
    if args.config:
        command += ["--config", str(args.config)]
    if args.allow_other:
        command.append("--allow-other")
    if args.debug:
        command += ["--log-level", "debug"]
    if args.content_cache_bytes is not None:
        command += ["--content-cache-bytes", str(args.content_cache_bytes)]
    if args.key_file:
        command += ["--key-file", str(args.key_file.resolve())]
    if not args.encrypt:
        command.append("--no-encrypt")
    if args.foreground:
        os.execv(sys.executable, command)
    pid = _start_background(command, state / "daemon.log", "the daemon did not start")
    print(f"swapfs: {state} mounted on {os.path.realpath(args.mountpoint)} (pid {pid})")
    if args.standby:
        _standby(argparse.Namespace(mountpoint=args.mountpoint, state=None, config=None,
                                    foreground=False))
    return 0


def _start_background(command: list[str], log_path: Path, failure: str) -> int:
    """Start *command* in the background; its pid once it says it is ready."""
    try:
        return spawn.start_ready(command, log_path, READY_TIMEOUT)
    except spawn.NotReady as exc:
        for line in exc.lines:
            logging.getLogger(__name__).debug("%s", line)
        raise CommandError(f"{failure}: {exc}") from exc


def _standby(args: argparse.Namespace) -> int:
    mountpoint = os.path.realpath(args.mountpoint)
    command = [sys.executable, "-m", "mountd.takeover.standby", mountpoint]
    if args.state is not None:
        state = args.state.resolve()
        command += ["--state", str(state)]
        if args.config is not None:
            command += ["--config", str(args.config.resolve())]
    if args.foreground:
        os.execv(sys.executable, command)
    if args.state is None:
        state = Path(protocol.request(protocol.socket_of(mountpoint), {"op": "status"})["state"])
    pid = _start_background(command, state / "standby.log", "the standby did not start")
    if args.state is None:
        print(f"swapfs: standby {pid} keeps {mountpoint}")
    else:
        print(f"swapfs: standby {pid} watches the lease on {state} for {mountpoint}")
    return 0


def _exited(pid: int) -> bool:
    """Has *pid* exited? A zombie has: only its parent's reaping is left."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            return True
        time.sleep(0.05)
    return False


def _umount(args: argparse.Namespace) -> int:
    mountpoint = mountcheck.check_own_mount(args.mountpoint)
    active = swaparea.active_areas([mountpoint])
    if active:
        raise CommandError(f"swap is active on {active[0].file} ({active[0].device}): "
                           f"run 'swapfs swapoff {active[0].file}' first")
    attached = swaparea.status()["mounts"].get(mountpoint, {}).get("loop_devices", [])
    if attached:
        raise CommandError(f"{attached[0]['file']} is attached to {attached[0]['device']}: "
                           "detach it first")
    pid = None
    try:
        pid = protocol.request(protocol.socket_of(mountpoint), {"op": "status"})["pid"]
    except protocol.ControlError as exc:
        logging.getLogger(__name__).debug("no daemon answers: %s", exc)
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    if pid is not None and not _wait_exit(pid, EXIT_TIMEOUT):
        raise CommandError(f"unmounted, but daemon {pid} has not exited")
    return 0


def _clone(args: argparse.Namespace) -> int:
    source = os.path.realpath(args.source)
    target = os.path.join(os.path.realpath(os.path.dirname(args.target) or "."),
                          os.path.basename(args.target))
    root = protocol.mount_root(source)
    if protocol.mount_root(os.path.dirname(target)) != root:
        raise CommandError("source and target must be on the same swapfs mount")
    protocol.request(protocol.socket_of(root), {
        "op": "clone", "source": os.path.relpath(source, root),
        "target": os.path.relpath(target, root), "empty": args.empty,
    })
    return 0


def _priority(args: argparse.Namespace) -> int:
    path = os.path.realpath(args.file)
    root = protocol.mount_root(path)
    message: dict[str, Any] = {"op": "priority", "path": os.path.relpath(path, root)}
    if args.priority is not None:
        message["priority"] = args.priority
    reply = protocol.request(protocol.socket_of(root), message)
    if args.priority is None:
        print(reply["priority"])
    return 0


def _secret(args: argparse.Namespace) -> int:
    """The host's side of a driver's sealed records: share one with it, read
    one it kept, or delete one."""
    message: dict[str, Any] = {"op": "secret", "action": args.action, "driver": args.driver,
                               "name": args.record}
    if args.action == "put":
        value = sys.stdin.buffer.read(MAX_VALUE + 1)
        if len(value) > MAX_VALUE:
            raise CommandError(f"a record holds at most {MAX_VALUE} bytes")
        message["value"] = protocol.encode_bytes(value)
    reply = protocol.request(protocol.socket_of(args.mountpoint), message)
    if args.action == "get":
        sys.stdout.buffer.write(protocol.decode_bytes(reply["value"], "value", MAX_VALUE))
        sys.stdout.flush()
    return 0


def _swapon(args: argparse.Namespace) -> int:
    print(swaparea.swap_on(args.file, args.priority, discard=args.discard))
    # stdout is the device alone, for scripts; the host setting goes to stderr.
    print(f"swapfs: {swaparea.page_cluster_advice()}", file=sys.stderr)
    return 0


def _swapoff(args: argparse.Namespace) -> int:
    swaparea.swap_off(args.file)
    return 0


def _status(args: argparse.Namespace) -> int:
    report = swaparea.status()
    for mount, entry in report["mounts"].items():
        try:
            daemon = protocol.request(protocol.socket_of(mount), {"op": "status"})
            daemon.pop("ok")
            stats = protocol.request(protocol.socket_of(mount), {"op": "stats"})
            entry["daemon"] = daemon
            entry["stored_bytes"] = sum(c["stored_bytes"] for c in stats["chains"].values())
            entry["logical_bytes"] = sum(c["logical_bytes"] for c in stats["chains"].values())
            entry["index_bytes"] = stats["index_bytes"]
            if "index" in stats:
                entry["index"] = stats["index"]
        except protocol.ControlError as exc:
            entry["daemon"] = {"error": str(exc)}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    if not report["mounts"]:
        print("no swapfs mounts")
    for mount, entry in sorted(report["mounts"].items()):
        daemon = entry["daemon"]
        if "error" in daemon:
            print(f"{mount}: daemon not answering ({daemon['error']})")
        else:
            print(f"{mount}: pid {daemon['pid']}, state {daemon['state']}, "
                  f"{_size(entry['logical_bytes'])} logical in "
                  f"{_size(entry['stored_bytes'])} stored")
            print(f"  {_keeper_line(daemon)}")
            if "index" in entry:
                print(f"  index {_size(entry['index_bytes'])}: {_per_block(entry['index'])}")
        for loop in entry["loop_devices"]:
            swap = loop["swap"]
            use = (f"swap, {_size(swap['used_bytes'])} of {_size(swap['size_bytes'])} used, "
                   f"priority {swap['priority']}" if swap else "not swap")
            print(f"  {loop['device']} {loop['file']}: {use}")
    return 0


def _keeper_line(daemon: dict[str, Any]) -> str:
    """Who keeps the mount's connection alive, and its last takeover."""
    if not daemon.get("takeover_capable"):
        return "no takeover: libfuse mounted it (the daemon lacked CAP_SYS_ADMIN)"
    keeper = daemon.get("keeper")
    line = ("kept by " + (f"standby {daemon['keeper_pid']}" if keeper == "standby"
                          else "systemd's file descriptor store")
            if keeper else "no keeper: the mount ends if the daemon dies")
    last = daemon.get("last_takeover")
    if last:
        seconds = last.get("seconds")
        line += (f"; takeover {last['number']} "
                 + (f"took {seconds:.3f} s" if seconds is not None else "")
                 + f", resent: {'yes' if last.get('resent') else 'no'}")
    return line


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Run tools/bench.py of the source tree swapfs was installed from."""
    script = Path(__file__).resolve().parents[2] / "tools" / "bench.py"
    if not script.exists():
        raise CommandError("swapfs bench runs from a source checkout (tools/bench.py)")
    return subprocess.run([sys.executable, str(script), *rest]).returncode


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _print_stats(stats: dict[str, Any]) -> None:
    print(f"{'chain / file':<32} {'logical':>11} {'stored':>11} {'zero blocks':>12} "
          f"{'dedup':>7} {'priority':>8}")
    for name, chain in sorted(stats["chains"].items()):
        print(f"{name:<32} {_size(chain['logical_bytes']):>11} "
              f"{_size(chain['stored_bytes']):>11} {chain['zero_blocks']:>12} "
              f"{chain['dedup_ratio']:>6.2f}x")
        for file_name, entry in sorted(chain["files"].items()):
            print(f"  {file_name:<30} {_size(entry['logical_bytes']):>11} {'':>11} "
                  f"{entry['zero_blocks']:>12} {'':>7} {entry['priority']:>8}")
    print("encrypted at rest" if stats.get("encrypted") else "not encrypted")
    index = stats.get("index")
    print(f"index: {_size(stats['index_bytes'])}"
          + (f"; {_per_block(index)}" if index is not None else ""))
    if index is not None:
        trees = sorted(index["databases"].items(), key=lambda item: -item[1])
        print("  " + ", ".join(f"{name} {_size(used)}" for name, used in trees if used)
              + f", main {_size(index['main_bytes'])}, unused {_size(index['unused_bytes'])}")
    memory = stats.get("memory")
    if memory is not None:
        per_gib = memory["rss_bytes_per_gib_stored"]
        print(f"daemon memory: resident {_size(memory['rss_bytes'])}, locked "
              f"{_size(memory['locked_bytes'])}"
              + (f"; {_size(round(per_gib))} resident per GiB stored" if per_gib else ""))
    requests = sorted(stats.get("requests", {}).items(), key=lambda item: -item[1])
    if requests:
        print("requests: " + ", ".join(f"{name} {count}" for name, count in requests))
    content = stats.get("content_cache")
    if content is not None:
        print(f"content cache: capacity {_size(content['capacity_bytes'])}, "
              f"used {_size(content['used_bytes'])}")
        _print_traffic(content)
    pool = stats.get("transient_cache")
    if pool is not None:
        _print_pool(pool)


def _per_block(index: dict[str, Any]) -> str:
    """The index's bytes per logical block (the maps) and per stored block (the rest)."""
    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} B"
    return (f"maps {figure(index['bytes_per_logical_block'])} per logical block, "
            f"the rest {figure(index['bytes_per_stored_block'])} per stored block")


def _print_traffic(cache: dict[str, Any]) -> None:
    """A cache's hits, misses, admissions and evictions, and each chain's share."""
    looked_up = cache["hits"] + cache["misses"]
    rate = f" ({100 * cache['hits'] / looked_up:.1f}% hits)" if looked_up else ""
    print(f"  hits {cache['hits']}  misses {cache['misses']}{rate}  "
          f"admissions {cache['admissions']}  evictions {cache['evictions']}  "
          f"revocations {cache['revocations']}")
    for name, used in sorted(cache["chains"].items()):
        print(f"  chain {name}: {_size(used)}")


def _print_pool(pool: dict[str, Any]) -> None:
    """The transient cache: its capacity, its traffic and each driver's share."""
    print(f"transient cache: capacity {_size(pool['capacity_bytes'])} "
          f"(max {_size(pool['max_bytes'])}), used {_size(pool['used_bytes'])}")
    _print_traffic(pool)
    drivers = pool["drivers"]
    if not drivers:
        print("  no drivers")
    for name, driver in sorted(drivers.items()):
        extra = ""
        if "processes" in driver:
            extra = (f", {driver['processes']} processes, {driver['extents']} extents, "
                     f"idle {driver['idle_seconds']:.1f} s")
        if driver.get("records"):
            extra += f", {driver['records']} sealed records"
        print(f"  driver {name}: {_size(driver['bytes'])} in {driver['segments']} "
              f"segments{extra}")


def _stats(args: argparse.Namespace) -> int:
    reply = protocol.request(protocol.socket_of(args.path), {"op": "stats"})
    reply.pop("ok")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        _print_stats(reply)
    return 0


def _offline(state: Path) -> lease.Offline:
    """The lease of an offline command on *state*: taken if the state has a
    lease file, or if its index records a lease generation (the file was
    removed)."""
    return lease.Offline(state, lambda: recorded_generation(state / "index.lmdb"))


def _fsck(args: argparse.Namespace) -> int:
    """Exit codes as e2fsck's; a check that cannot start (no state, in use,
    its lease held by a live daemon, unreadable) is an operational error, 8."""
    try:
        if not ((args.state / "index.lmdb").exists() or reseal.pending(args.state)):
            raise CommandError(f"{args.state} holds no swapfs state")
        with _offline(args.state) as held:
            report = fsck.check(args.state, repair=args.repair, upgrade=args.upgrade,
                                master=keys.load(args.key_file), claim=held.claim,
                                guard=held.guard, restamp=held.restamp)
    except (CommandError, SwapfsError, OSError) as exc:
        print(f"swapfs fsck: {exc}", file=sys.stderr)
        return fsck.EXIT_FAILED
    if args.json:
        print(json.dumps({
            "clean": report.clean, "exit_code": report.exit_code,
            "blocks_checked": report.blocks_checked,
            "problems": [vars(problem) for problem in report.problems],
        }, indent=2))
    else:
        for problem in report.problems:
            print(("info: " if problem.info else "") + f"{problem.kind}: {problem.detail}"
                  + (" [repaired]" if problem.repaired else ""))
        notes = len(report.problems) - len(report.serious)
        print(f"{report.blocks_checked} blocks checked, {len(report.serious)} problems"
              + (f", {notes} for information" if notes else ""))
    return report.exit_code


def _lease(args: argparse.Namespace) -> int:
    if not args.state.is_dir():
        raise CommandError(f"{args.state} is not a directory")
    if args.break_:
        try:
            broken = lease.break_lease(args.state, force=args.force)
        except lease.LeaseHeld as held:
            raise CommandError(f"{held}; --break --force breaks it anyway, which is safe "
                               "only once its holder is known to be dead") from None
        if args.json:
            print(json.dumps({"broken": broken is not None and not broken.free,
                              "was": None if broken is None
                              else broken.to_json(time.time())}, indent=2))
        elif broken is None:
            print(f"no valid lease left on {args.state}: acquire may take it")
        elif broken.free:
            print(f"lease on {args.state} is already free")
        else:
            print(f"lease of {broken.holder_hex} on host {broken.host!r} "
                  f"(generation {broken.generation}) broken")
        return 0
    info = lease.read_lease(args.state)
    now = time.time()
    if args.json:
        print(json.dumps(None if info is None else info.to_json(now), indent=2))
    elif info is None:
        print(f"no lease on {args.state}")
    elif info.free:
        print(f"lease on {args.state} is free (generation {info.generation})")
    else:
        fields = info.to_json(now)
        print(f"holder      {info.holder_hex}\n"
              f"host        {info.host}\n"
              f"pid         {info.pid}\n"
              f"generation  {info.generation}\n"
              f"age         {fields['age_seconds']:.1f} s (duration {info.duration:g} s)\n"
              f"expires in  {fields['expires_in_seconds']:.1f} s"
              + ("" if fields["state"] == "held" else " (expired: a standby may take it)"))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    args.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    master = keys.generate(args.file)
    print(f"swapfs: wrote master key {keys.key_id_text(master.key_id)} to {args.file}")
    return 0


def _rekey(args: argparse.Namespace) -> int:
    """Rewrap every chain key of an unmounted state under a new master key;
    with --reseal, replace the chain keys and seal every block again."""
    old = keys.load(args.key_file)
    if old is None:
        raise CommandError("no master key: give --key-file")
    if args.new_key_file is None and not args.reseal:
        raise CommandError("give --new-key-file (or --reseal, to keep the master key)")
    new = old if args.new_key_file is None else keys.read(args.new_key_file)
    with _offline(args.state) as held:  # a state shared with another host
        # A reseal converts a state of format 3 as it opens, under the new key.
        opened = State(args.state, recover=False, create=False, upgrade=args.reseal,
                       master=old, claim=held.claim, guard=held.guard,
                       restamp=held.restamp, reseal_to=new if args.reseal else None)
        try:
            if not args.reseal:
                chains = opened.rekey(new)
            elif opened.converted is not None:
                chains = opened.converted
            else:
                chains = opened.reseal(new, _sealed)
        finally:
            opened.close()
    done = ("chain keys replaced and every block sealed again" if args.reseal
            else "chain keys rewrapped")
    print(f"swapfs: {args.state}: {chains} {done}, master key "
          f"{keys.key_id_text(old.key_id)} -> {keys.key_id_text(new.key_id)}")
    return 0


def _sealed(chain_id: int, done: int, total: int) -> None:
    """rekey --reseal's progress: one line on a terminal, rewritten as a
    chain's blocks are sealed again."""
    if sys.stderr.isatty():
        print(f"\rswapfs rekey: chain {chain_id}: {done}/{total} blocks sealed again",
              end="\n" if done == total else "", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapfs", description="Swap files deduplicated per clone chain.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    mount = commands.add_parser("mount", help="mount a state directory")
    mount.add_argument("--state", required=True, type=Path, help="state directory")
    mount.add_argument("mountpoint")
    mount.add_argument("--config", type=Path, help="daemon configuration (TOML)")
    mount.add_argument("--foreground", action="store_true", help="stay attached")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users access the mount")
    mount.add_argument("--standby", action="store_true",
                       help="also start 'swapfs standby' for the mount")
    mount.add_argument("--content-cache-bytes", type=int, metavar="N",
                       help="the content cache's budget of host memory in bytes "
                            "(default 64 MiB; 0 disables it)")
    mount.add_argument("--key-file", type=Path, metavar="FILE",
                       help="the master key (default: the systemd credential swapfs.key, "
                            f"else {keys.DEFAULT_KEY_FILE})")
    mount.add_argument("--no-encrypt", dest="encrypt", action="store_false",
                       help="serve (or create) an unencrypted state")
    mount.set_defaults(run=_mount)

    standby = commands.add_parser(
        "standby", help="keep a mount alive across daemon failures: hold its connection "
                        "and start a new daemon when the daemon dies")
    standby.add_argument("mountpoint")
    standby.add_argument("--state", type=Path,
                         help="stand in for another host: mount this shared state directory "
                              "on MOUNTPOINT once its lease lapses")
    standby.add_argument("--config", type=Path,
                         help="with --state: the daemon's configuration (sets lease_seconds)")
    standby.add_argument("--foreground", action="store_true", help="stay attached")
    standby.set_defaults(run=_standby)

    umount = commands.add_parser("umount", help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")
    umount.set_defaults(run=_umount)

    clone = commands.add_parser("clone", help="a new swap file sharing a sibling's blocks")
    clone.add_argument("--empty", action="store_true",
                       help="same size as the source, no content")
    clone.add_argument("source")
    clone.add_argument("target")
    clone.set_defaults(run=_clone)

    priority = commands.add_parser(
        "priority", help="show or set a swap file's priority (default 0)",
        description="A file's priority ranks its blocks in the content cache's "
                    "manifest, which fail-over uses. Without N, print it.")
    priority.add_argument("file")
    priority.add_argument("priority", nargs="?", type=int, metavar="N",
                          help="the new priority, a signed 32-bit integer")
    priority.set_defaults(run=_priority)

    secret = commands.add_parser(
        "secret", help="share a sealed record with a running driver, read or delete one "
                       "(docs/records.md)")
    secret.add_argument("action", choices=("put", "get", "rm"))
    secret.add_argument("mountpoint", help="the mount point or any path on it")
    secret.add_argument("record", metavar="NAME", help="the record's name")
    secret.add_argument("--driver", required=True, help="the driver's name")
    secret.set_defaults(run=_secret)

    swapon = commands.add_parser("swapon", help="put a swap file into service")
    swapon.add_argument("file")
    swapon.add_argument("--priority", type=int, help="swap priority (swapon -p)")
    swapon.add_argument("--no-discard", dest="discard", action="store_false",
                        help="keep the blocks of freed swap slots stored "
                             "(default: discard them, which frees them)")
    swapon.set_defaults(run=_swapon)

    swapoff = commands.add_parser("swapoff", help="take a swap file out of service")
    swapoff.add_argument("file")
    swapoff.set_defaults(run=_swapoff)

    status = commands.add_parser("status", help="mounts, swap areas, loop devices, usage")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    stats = commands.add_parser("stats", help="dedup figures per chain and file")
    stats.add_argument("path", help="the mount point or any path on it")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(run=_stats)

    commands.add_parser(
        "bench", add_help=False,
        help="fio and end-to-end swap against the baselines (--quick, --out DIR; "
             "'swapfs bench --help' for more)")

    check = commands.add_parser("fsck", help="check an unmounted state directory")
    check.add_argument("--state", required=True, type=Path, help="state directory")
    check.add_argument("--repair", action="store_true",
                       help="fix what can be fixed (converts an old index format too)")
    check.add_argument("--upgrade", action="store_true",
                       help="convert an index of an earlier format, then check it")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--key-file", type=Path, metavar="FILE",
                       help="the master key of an encrypted state (default as for mount)")
    check.set_defaults(run=_fsck)

    keygen = commands.add_parser("keygen", help="write a new random master key (mode 0600)")
    keygen.add_argument("file", type=Path)
    keygen.set_defaults(run=_keygen)

    rekey = commands.add_parser(
        "rekey", help="rewrap the chain keys of an unmounted state under a new master key "
                      "(no data is rewritten); with --reseal, replace them and seal every "
                      "block again")
    rekey.add_argument("--state", required=True, type=Path, help="state directory")
    rekey.add_argument("--key-file", type=Path, metavar="FILE",
                       help="the current master key (default as for mount)")
    rekey.add_argument("--new-key-file", type=Path, metavar="FILE",
                       help="the new master key (swapfs keygen makes one); with --reseal, "
                            "the current one if not given")
    rekey.add_argument("--reseal", action="store_true",
                       help="new chain secrets, every block sealed again under them, the "
                            "index rebuilt compacted: nothing the old keys open remains in "
                            "the state (docs/encryption.md)")
    rekey.set_defaults(run=_rekey)

    held = commands.add_parser(
        "lease", help="show (or break) the lease that fences a state directory across hosts",
        epilog="examples:\n  swapfs lease --state /var/lib/swapfs/a --json\n"
               "  swapfs lease --state /var/lib/swapfs/a --break",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    held.add_argument("--state", required=True, type=Path, help="state directory")
    held.add_argument("--json", action="store_true", help="machine-readable output")
    held.add_argument("--break", dest="break_", action="store_true",
                      help="clear a corrupt or expired lease so that a daemon may take it")
    held.add_argument("--force", action="store_true",
                      help="with --break: break a live lease too (only when its holder "
                           "is known to be dead)")
    held.set_defaults(run=_lease)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "lease" and args.force and not args.break_:
        build_parser().error("lease: --force only goes with --break")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="swapfs: %(message)s")
    try:
        return int(args.run(args))
    except (CommandError, protocol.ControlError, SwapfsError, OSError) as exc:
        print(f"swapfs {args.command}: {exc}", file=sys.stderr)
        return 1
