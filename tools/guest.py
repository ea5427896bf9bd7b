"""A QEMU guest that runs one command of the host's, on the host's own files.

Some promises can only be tested inside a machine of their own: that an
``fsync`` survives a power cut needs a page cache that can be lost whole
while the disk keeps what reached it, and a guest that swaps to a swapfs
file needs a kernel of its own. This module starts such a guest with as
little as possible between the host and the code under test:

- the **kernel** is Debian's ``linux-image-amd64`` in /boot, run by
  ``qemu-system-x86_64`` under TCG (``-accel tcg``: the machines the
  project runs on have no working KVM), uncompressed once and entered
  through its PVH entry point (:func:`boot_image`);
- a small **initramfs**, built here in Python and cached (build/guest,
  rebuilt when the kernel, busybox or this module's init changes), holds
  ``busybox-static`` and the kernel modules the guest needs (virtio, 9p,
  ext4, fuse), taken with their dependencies from the kernel's
  ``/lib/modules/VERSION`` and decompressed;
- its **init** mounts the host's root read-only over 9p, mounts /proc,
  /sys, /dev, and tmpfs on /tmp and /run over it, and runs a shell script
  the host wrote there as root in a chroot of it: the guest runs the
  checkout's own virtual environment, nothing installed in it. It then
  prints ``guest: exit N`` and powers off (QEMU exits);
- **disks** are raw image files on virtio-blk with ``cache=none``: the
  guest's writes reach the image only when its kernel writes them out, and
  it must flush for them to be on the host's stable storage;
- the **console** (ttyS0: the kernel's messages and the script's output)
  comes back line by line as it is printed (:meth:`Guest.readline`), and
  is kept in a transcript file.

Every QEMU started here is killed (SIGKILL, by its pid) and reaped when its
:class:`Guest` is closed or leaves its ``with`` block, at interpreter exit,
and, through its parent-death signal (``setpriv --pdeathsig KILL``), even
when the process that started it dies by SIGKILL: the thread that starts a
guest must outlive it. Killing QEMU is also how a power cut is made.

    with Guest("echo hello; sync", disks=[image]) as guest:
        for line in guest.lines(timeout=120):
            print(line)
    guest.status  # the script's exit code
"""

import atexit
import compileall
import contextlib
import hashlib
import lzma
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
#: Where built initramfs images are kept (ignored by git, like the rest of build/).
CACHE = ROOT / "build" / "guest"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
#: The Debian packages this module needs (tools/setup.sh installs them).
PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static")
#: Kernel modules the guest loads, with what they depend on: the virtio PCI
#: transport and disk, 9p over virtio (the host's root), ext4 (state disks),
#: FUSE (swapfs in the guest) and virtio-serial (a driver's channel).
MODULES = ("virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "ext4", "fuse",
           "virtio_console")
#: Host paths that the guest's own file systems hide: a script there would
#: not be seen.
HIDDEN = ("/tmp", "/run", "/dev", "/proc", "/sys")

#: The guest's /init. It loads the modules listed in /modules/order, mounts
#: the host's root on /host and runs the script named by ``guest.run=`` on
#: the kernel command line there, then powers off (QEMU runs with
#: -no-reboot, so a reboot ends it, a panic too: panic=-1).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "guest: init: $*"; echo "guest: exit 255"; sync; reboot -f; }
for module in $(cat /modules/order); do
    insmod "/modules/$module" || fail "insmod $module failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host \
    || fail "cannot mount the host's root"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
# A checkout under /tmp or /run (guest.keep=) stays seen through the tmpfs.
keep=$(sed -n 's/.*guest\.keep=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$keep" ]; then
    mkdir -p /keep && mount -o bind "/host$keep" /keep || fail "cannot keep $keep"
fi
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
if [ -n "$keep" ]; then
    mkdir -p "/host$keep" && mount -o bind /keep "/host$keep" || fail "cannot keep $keep"
fi
script=$(sed -n 's/.*guest\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 chroot /host /bin/sh "$script"
echo "guest: exit $?"
sync
reboot -f
"""
_EXIT = re.compile(r"^guest: exit (\d+)$")


class GuestError(Exception):
    """The guest could not be built or started, or did not answer in time."""


@dataclass(frozen=True)
class Kernel:
    """A kernel of the host's, with its modules."""

    version: str
    image: Path
    modules: Path


def find_kernel() -> Kernel:
    """The newest kernel in /boot whose modules are installed (GuestError if none)."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists():
            found.append(Kernel(version, image, modules))
    if not found:
        raise GuestError("no kernel in /boot with its modules in /lib/modules "
                         "(apt-get install linux-image-amd64)")
    return max(found, key=lambda kernel: _version_key(kernel.version))


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"[.+-]", version)]


def missing() -> list[str]:
    """What this machine lacks to start a guest (empty when it has it all)."""
    lacks = []
    if shutil.which(QEMU) is None:
        lacks.append(f"{QEMU} (Debian package qemu-system-x86)")
    if shutil.which("setpriv") is None:
        lacks.append("setpriv (Debian package util-linux)")
    if not BUSYBOX.exists() or _dynamic(BUSYBOX):
        lacks.append(f"a static {BUSYBOX} (Debian package busybox-static)")
    try:
        kernel = find_kernel()
    except GuestError as exc:
        lacks.append(str(exc))
    else:
        if not os.access(kernel.image, os.R_OK):
            lacks.append(f"read access to {kernel.image} (root)")
    return lacks


def _dynamic(path: Path) -> bool:
    """Does the ELF file *path* name a dynamic loader? (Its PT_INTERP string
    comes right after the program headers; a static busybox has none.)"""
    with open(path, "rb") as elf:
        return b"/lib64/ld-linux" in elf.read(4096)


# -- the initramfs -------------------------------------------------------------------


def _module_name(path: str) -> str:
    name = Path(path).name
    return name[:name.index(".ko")].replace("-", "_")


class ModuleTree:
    """The kernel's module files, their dependencies (modules.dep, and the
    ``pre:`` soft dependencies of modules.softdep, such as ext4's crc32c)
    and what is built in (modules.builtin)."""

    def __init__(self, kernel: Kernel) -> None:
        self.root = kernel.modules
        self.paths: dict[str, str] = {}
        self.deps: dict[str, list[str]] = {}
        for line in (self.root / "modules.dep").read_text().splitlines():
            target, _, needed = line.partition(":")
            name = _module_name(target)
            self.paths[name] = target
            self.deps[name] = [_module_name(dep) for dep in needed.split()]
        self.builtin = set()
        builtin = self.root / "modules.builtin"
        if builtin.exists():
            self.builtin = {_module_name(line) for line in builtin.read_text().split()}
        self.aliases: dict[str, list[str]] = {}
        aliases = self.root / "modules.alias"
        if aliases.exists():
            for line in aliases.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias" and "*" not in words[1]:
                    self.aliases.setdefault(words[1].replace("-", "_"), []).append(words[2])
        self.soft: dict[str, list[str]] = {}
        softdeps = self.root / "modules.softdep"
        if softdeps.exists():
            for line in softdeps.read_text().splitlines():
                words = line.split()
                if len(words) > 2 and words[0] == "softdep":
                    pre = words[words.index("pre:") + 1:] if "pre:" in words else []
                    pre = [word for word in pre if not word.endswith(":")]
                    self.soft[words[1].replace("-", "_")] = pre

    def resolve(self, name: str) -> str | None:
        """The module file's name for *name* (a module or an alias), None if
        built in; KeyError if the kernel has no such module."""
        name = name.replace("-", "_")
        if name in self.builtin:
            return None
        if name in self.paths:
            return name
        # An algorithm's generic module runs on any CPU (crc32c_intel needs
        # SSE 4.2, which the guest's CPU may lack).
        targets = sorted(self.aliases.get(name, []), key=lambda target: not
                         target.endswith("_generic"))
        if targets:
            return self.resolve(targets[0])
        raise KeyError(name)

    def load_order(self, wanted: Sequence[str]) -> list[str]:
        """*wanted* and everything they need, each after what it needs."""
        order: list[str] = []

        def visit(name: str, soft: bool) -> None:
            try:
                module = self.resolve(name)
            except KeyError:
                if soft:
                    return  # a soft dependency this kernel does not have
                raise GuestError(f"kernel {self.root.name} has no module {name}") from None
            if module is None or module in order:
                return
            for pre in self.soft.get(module, []):
                visit(pre, True)
            for dep in self.deps[module]:
                visit(dep, False)
            order.append(module)

        for name in wanted:
            visit(name, False)
        return order

    def read(self, name: str) -> bytes:
        """The module's object, decompressed."""
        path = self.root / self.paths[name]
        data = path.read_bytes()
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko"):
            return data
        raise GuestError(f"{path}: a compression this module cannot undo")


class Cpio:
    """A cpio archive in the kernel's "newc" format, built in memory."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
            ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self.parts += [header, encoded, bytes(-(len(header) + len(encoded)) % 4),
                       data, bytes(-len(data) % 4)]

    def bytes(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def initramfs(kernel: Kernel, cache: Path = CACHE) -> Path:
    """The initramfs for *kernel*: built once, then taken from *cache* while
    the kernel, busybox and the init script stay as they were."""
    tree = ModuleTree(kernel)
    order = tree.load_order(MODULES)
    key = hashlib.sha256()
    for part in (kernel.version, INIT, " ".join(order)):
        key.update(part.encode() + b"\0")
    for path in (kernel.image, BUSYBOX, kernel.modules / "modules.dep"):
        info = path.stat()
        key.update(f"{path}:{info.st_size}:{info.st_mtime_ns}\0".encode())
    target = cache / f"initramfs-{kernel.version}-{key.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "host", "modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    archive.add("init", stat.S_IFREG | 0o755, INIT.encode())
    files = [f"{name}.ko" for name in order]
    for name, file in zip(order, files, strict=True):
        archive.add(f"modules/{file}", stat.S_IFREG | 0o644, tree.read(name))
    archive.add("modules/order", stat.S_IFREG | 0o644, "\n".join(files).encode() + b"\n")
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"initramfs-{kernel.version}-*.cpio"):
        old.unlink(missing_ok=True)  # built for a kernel or an init that changed since
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        out.write(archive.bytes())
    os.replace(out.name, target)
    return target


def boot_image(kernel: Kernel, cache: Path = CACHE) -> Path:
    """What QEMU boots: the kernel uncompressed (an ELF with a PVH entry
    point, which QEMU enters directly), cached beside the initramfs; the
    bzImage itself for a kernel built without PVH or compressed otherwise
    than with xz. Under TCG the bzImage's own decompression takes seconds
    of each boot."""
    config = kernel.image.with_name(f"config-{kernel.version}")
    if not config.exists() or "CONFIG_PVH=y" not in config.read_text().split():
        return kernel.image
    info = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}:{info.st_size}:{info.st_mtime_ns}".encode())
    target = cache / f"vmlinux-{kernel.version}-{key.hexdigest()[:16]}"
    if target.exists():
        return target
    packed = kernel.image.read_bytes()
    start = packed.find(b"\xfd7zXZ\x00")
    if start < 0:
        return kernel.image
    elf = lzma.LZMADecompressor().decompress(packed[start:])
    if not elf.startswith(b"\x7fELF"):
        return kernel.image
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"vmlinux-{kernel.version}-*"):
        old.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        out.write(elf)
    os.replace(out.name, target)
    return target


def precompile(*trees: Path) -> None:
    """Compile the Python modules under *trees* to bytecode beside them, as
    imports would (when the environment lets them write it): a guest runs
    the host's files read-only, so it could not keep what it compiles, and
    would compile every module of them again in each process, which under
    TCG costs seconds a start."""
    for tree in trees:
        compileall.compile_dir(tree, quiet=1)


# -- the guest -----------------------------------------------------------------------

#: Guests started and not yet reaped, killed at interpreter exit.
_LIVE: set["Guest"] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def kill_all() -> None:
    """Kill every guest this process started and has not reaped (guests run
    by other threads included: a Ctrl-C in the main thread stops them all)."""
    with _LIVE_LOCK:
        guests = list(_LIVE)
    for guest in guests:
        guest.kill()


def _keep(checkout: Path) -> str:
    """The kernel parameter that keeps *checkout* seen in the guest when
    its own tmpfs on /tmp or /run would hide it (a clone under /tmp), else
    nothing."""
    hidden = any(str(checkout).startswith(top + "/") for top in ("/tmp", "/run"))
    return f" guest.keep={checkout}" if hidden else ""


class Guest:
    """One boot of a guest that runs *script* (shell, run by the host's
    /bin/sh as root in the chroot of the host's root) with *disks* attached
    as /dev/vda, /dev/vdb, ... in that order, a virtio-serial port for
    each of *channels* (port name -> the Unix socket QEMU listens on), and
    its RAM in *memory_file* (shared with the host) if given.

    *workdir* holds the script, the transcript and QEMU's own messages; it
    must be on a host file system the guest sees (not under /tmp or /run:
    the guest's own tmpfs hides them). By default a fresh directory in
    /var/tmp, removed by :meth:`close` unless ``keep`` is set.
    """

    def __init__(self, script: str, disks: Sequence[Path] = (), memory_mib: int = 1024,
                 cpus: int = 2, workdir: Path | None = None, kernel: Kernel | None = None,
                 channels: Mapping[str, Path] | None = None,
                 memory_file: Path | None = None) -> None:
        self.script = script
        self.disks = [Path(disk).resolve() for disk in disks]
        #: virtio-serial port name -> the Unix socket QEMU listens on for its host end.
        self.channels = dict(channels or {})
        #: A file that is the guest's RAM, shared with the host (guest physical
        #: address = offset while RAM stays below the PCI hole, 3.5 GiB on "pc").
        self.memory_file = memory_file
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.kernel = kernel if kernel is not None else find_kernel()
        self._own_workdir = workdir is None
        self.workdir = (Path(tempfile.mkdtemp(prefix="swapfs-guest-", dir="/var/tmp"))
                        if workdir is None else workdir.resolve())
        if any(str(self.workdir) == top or str(self.workdir).startswith(top + "/")
               for top in HIDDEN):
            raise GuestError(f"{self.workdir}: the guest would not see it (its own "
                             f"{', '.join(HIDDEN)} hide them)")
        self.keep = False
        self.transcript = self.workdir / "console.log"
        self.status: int | None = None  # the script's exit code, once printed
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._ended = False

    def command(self, initrd: Path, script_path: Path) -> list[str]:
        """QEMU's command line."""
        line = ["setpriv", "--pdeathsig", "KILL", "--",
                QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "max",
                "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-kernel", str(boot_image(self.kernel)), "-initrd", str(initrd),
                # No speculation mitigations: nothing to protect in a test guest,
                # and each is emulated at a cost under TCG.
                "-append", f"console=ttyS0 loglevel=4 panic=-1 mitigations=off "
                           f"guest.run={script_path}" + _keep(ROOT),
                "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,"
                          "multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
        for disk in self.disks:
            line += ["-drive", f"file={disk},if=virtio,format=raw,cache=none,aio=threads"]
        if self.memory_file is not None:
            line += ["-object", f"memory-backend-file,id=ram,size={self.memory_mib}M,"
                                f"mem-path={self.memory_file},share=on",
                     "-machine", "memory-backend=ram"]
        if self.channels:
            line += ["-device", "virtio-serial-pci,id=channels"]
        for number, (name, path) in enumerate(sorted(self.channels.items())):
            # QEMU listens; the daemon dials (mountd/channels.py).
            line += ["-chardev", f"socket,id=channel{number},path={path},server=on,wait=off",
                     "-device", f"virtserialport,bus=channels.0,chardev=channel{number},"
                                f"name={name}"]
        return line

    def start(self) -> "Guest":
        """Boot the guest; returns at once (read its console to follow it)."""
        if self.process is not None:
            raise GuestError("this guest was started already")
        if any(c.isspace() for c in str(self.workdir)):
            raise GuestError(f"{self.workdir}: a path with spaces cannot go on the "
                             "kernel command line")
        initrd = initramfs(self.kernel)
        script_path = self.workdir / "run.sh"
        script_path.write_text(self.script if self.script.endswith("\n")
                               else self.script + "\n")
        with open(self.workdir / "qemu.log", "wb") as qemu_log:
            self.process = subprocess.Popen(
                self.command(initrd, script_path), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=qemu_log, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, name=f"guest-{self.process.pid}",
                                        daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        """Move the console's lines to the queue and the transcript, to its end."""
        assert self.process is not None and self.process.stdout is not None
        with open(self.transcript, "a", encoding="utf-8") as transcript:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
                transcript.write(f"{time.monotonic() - self.started:9.3f} {line}\n")
                transcript.flush()
                matched = _EXIT.match(line)
                if matched:
                    self.status = int(matched.group(1))
                self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def readline(self, timeout: float) -> str | None:
        """The console's next line; None once it has ended (QEMU exited and
        every line was read); TimeoutError if none came within *timeout* s."""
        if self._ended:
            return None
        try:
            line = self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError(f"the guest printed nothing for {timeout:.0f} s") from None
        if line is None:
            self._ended = True
        return line

    def lines(self, timeout: float) -> Iterator[str]:
        """The console's lines until it ends; TimeoutError if the whole of
        it takes longer than *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while (line := self.readline(deadline - time.monotonic())) is not None:
            yield line

    def kill(self) -> None:
        """SIGKILL QEMU (a power cut: what the guest had not written to its
        disks is lost) and reap it; then the console ends. Safe to call again."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                # Not reaped yet, so the pid is still this QEMU's.
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if self._reader is not None:
            self._reader.join(10)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the script ended: the guest powered
        off); its exit code. On timeout it is killed and GuestError raised."""
        assert self.process is not None, "not started"
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(f"the guest did not power off within {timeout:.0f} s") from None
        self.kill()  # reaped already: this joins the reader
        return code

    def close(self) -> None:
        """Kill QEMU if it still runs, and remove the work directory unless
        it is kept (or was given)."""
        self.kill()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def run(script: str, timeout: float, disks: Sequence[Path] = (), memory_mib: int = 1024,
        cpus: int = 2) -> tuple[int | None, list[str]]:
    """Boot a guest, run *script* to its end, power off: its exit code (None
    if it printed none) and the console's lines."""
    with Guest(script, disks, memory_mib, cpus) as guest:
        lines = list(guest.lines(timeout))
        guest.wait(30)
        return guest.status, lines


__all__ = ["CACHE", "Guest", "GuestError", "Kernel", "ModuleTree", "PACKAGES", "find_kernel",
           "boot_image", "initramfs", "kill_all", "missing", "precompile", "run"]
