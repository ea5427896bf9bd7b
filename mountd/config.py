"""The daemon's configuration: a TOML file, overridden by command-line flags.

Every setting is a field of :class:`Config`: its type is the field's
annotation, its default the field's, and its documentation (markdown) is in
the field's metadata, ``doc``. ``load`` checks a file's values against the
annotations; the settings table of ``docs/configuration.md`` and
``systemd/example.toml`` are written from the same fields
(``python -m tools.config_docs``), and a test fails when they drift. An
unknown key or a value of the wrong type is an error that names the key,
never silently ignored.
"""

import copy
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mountd import peercred
from mountd.access import Binding
from swapfs.cache import STRATEGIES
from swapfs.control import NAME_PATTERN


class ConfigError(Exception):
    """The configuration file or flags are invalid; the message says how."""


def setting(default: Any, doc: str, example: str | None = None) -> Any:
    """A :class:`Config` field with its documentation.

    *doc* is one markdown paragraph (its line breaks are spaces), the
    meaning column of ``docs/configuration.md``; *example* is the value
    ``systemd/example.toml`` gives a setting that has no default (``None``:
    required) or, for a table, the lines it shows commented out. A list or
    table default is copied for each Config, as ``default_factory`` would.
    """
    metadata = {"doc": " ".join(doc.split()), "example": example}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """The daemon's settings, one field each (see the module's docstring)."""

    state: Path | None = setting(None, """
        directory holding `index.lmdb`, `data/<chain>.blocks` and, encrypted,
        `data/<chain>.seals`""", example='"/var/lib/swapfs/main"')
    mountpoint: str | None = setting(None, """
        where the file system is mounted""", example='"/mnt/swapfs"')
    allow_other: bool = setting(False, """
        let users other than the one mounting use the mount""")
    lock_memory: bool = setting(True, """
        lock the daemon's memory, so that serving swap never needs swap:
        `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`""")
    io_flusher: bool = setting(True, """
        `prctl(PR_SET_IO_FLUSHER)` on the serving threads""")
    oom_score_adj: int = setting(-1000, """
        the daemon's OOM score adjustment (-1000..1000); -1000 exempts it from
        the OOM killer""")
    log_level: str = setting("info", """
        `debug`, `info`, `warning` or `error`""")
    control_socket: str = setting("", """
        the control socket; empty means `<state>/control.sock` (or
        `/run/swapfs/<hash>.sock` when that path is too long for a Unix
        socket)""")
    transient_cache_max_bytes: int = setting(268435456, """
        the transient cache's largest capacity (its real capacity is the
        drivers' unused code-page space, up to this); `0` disables it""")
    content_cache_bytes: int = setting(64 << 20, """
        the content cache's budget of host memory (64 MiB: 16384 blocks, about
        70 MiB locked with their entries; the flag `swapfs mount
        --content-cache-bytes N` overrides it); `0` disables it. See
        [caches.md](caches.md)""")
    dedup_table_bytes: int = setting(256 << 20, """
        the memory all chains' dedup tables (digest -> slot) may take
        together, at least 4096. An entry takes 7.1 to 12 bytes (a table is
        built 75% full and rebuilt larger when it is 85% full), so the
        default names at least 22 million stored blocks (about 85 GiB of
        distinct data), 33 million (128 GiB) in tables built at an open.
        Past it a chain's table stops growing and dedup is partial: a
        block the table does not name is stored again, nothing is lost, and
        `swapfs stats` counts such blocks (`dedup_table.unindexed`). See
        [performance.md](performance.md#what-bounds-the-rest)""")
    slot_table_cache_bytes: int = setting(16 << 20, """
        the memory each chain's slot table may keep of its runs (24 bytes a
        slot; 16 MiB covers about 10 GiB of stored blocks); runs beyond it
        are read again from the index when needed. The open reads none""")
    map_cache_bytes: int = setting(8 << 20, """
        the memory the files' maps may keep of their runs, over all files (4
        bytes a logical block; 8 MiB covers about 8 GiB of mapped blocks);
        runs beyond it are read again from the index when needed. The open
        reads none""")
    manifest_interval: float = setting(5, """
        seconds between two writes of the content cache's manifest,
        `<state>/cache.manifest` (also written at stop; a restarted daemon
        warms its cache from it)""")
    host_cache_bytes: int = setting(0, """
        the fail-over planner's budget for all the content caches of this host
        together, when a starting daemon chooses which blocks of its state's
        last manifest to warm ([failover.md](failover.md)); `0`: this daemon's
        content cache plus what the other daemons of the host hold, so that
        none of them has to give anything up""")
    driver_timeout: float = setting(30, """
        seconds a registered driver may stay silent before it is revoked and
        its connection closed""")
    control_idle_timeout: float = setting(60, """
        seconds any other control connection may stay silent before the daemon
        closes it (a standby keeping the mount excepted), so that idle clients
        cannot pile up""")
    control_max_connections: int = setting(128, """
        control connections (on the Unix socket and vsock together) served at
        once, 1..65536; one more is answered `EAGAIN` and closed, and the
        `swapfs` command (and a standby attaching) tries again for up to 5 s.
        The daemon also raises its open-files limit to the hard limit at
        start, and listens with the kernel's largest backlog (`SOMAXCONN`)""")
    control_root_reserve: int = setting(8, """
        of `control_max_connections`, how many only root may open
        (0..`control_max_connections`-1): however many connections the other
        peers hold, `swapfs status` and a standby's `keeper.attach` still get
        in ([connections per peer](#connections-per-peer))""")
    control_max_per_uid: int = setting(16, """
        control connections one Unix user other than root (a `control_group`
        member) may hold at once, 1..65536""")
    control_max_per_cid: int = setting(4, """
        control connections one guest (a vsock CID) may hold at once,
        1..65536; a driver holds one""")
    control_group: str = setting("", """
        a group (name or number) whose members the control socket serves
        besides root: `status`, `stats`, reading a priority, and drivers of
        names bound to their uid that may report only their own user's
        processes ([who may do what](#who-may-do-what)). Membership is the
        primary group or a supplementary one, read from the socket at connect
        (`SO_PEERGROUPS`). The socket then moves to `/run/swapfs/<hash>.sock`,
        mode 0660 with that group, since the state directory stays root's
        alone. Empty: root only, socket 0600""")
    vsock_port: int = setting(0, """
        also listen for drivers on this `AF_VSOCK` port (how a driver inside a
        virtual machine reaches its host); `0` means no vsock listener""")
    vsock_cids: list[int] = setting([], """
        the guests (context ids, 3 and up) whose drivers the vsock port
        admits; any other CID is refused with `EACCES` and a log line naming
        it. Over vsock only driver messages are served, never the commands
        that change or reveal the host's state; a guest registers only the
        names bound to its CID (`[drivers.NAME]`)""")
    drivers: dict[str, Binding] = setting({}, """
        binds the driver name `NAME` to the one peer that may register it:
        `cid = N` (a guest, which must be in `vsock_cids`), `uid = N` (a
        Unix user: root, or a `control_group` member) or `channel = PATH` (the
        guest behind that virtual machine's channel, which the daemon dials:
        a QEMU virtio-serial socket, or with `vsock_port = N` a Firecracker or
        cloud-hypervisor vsock socket). See [driver names](#driver-names)""",
        example="[drivers.vm1]\ncid = 5\n\n[drivers.vm2]\n"
                "channel = \"/run/vms/vm2.swapfs.sock\"")
    failover_strategies: list[str] = setting(list(STRATEGIES), """
        the fail-over planner's strategies ([failover.md](failover.md)), tried
        in this order when the cache of a failed daemon is rebuilt; each name
        at most once; `[]` means the eviction fallback alone""")
    encrypt: bool = setting(True, """
        create a new state encrypted at rest; an existing state in the other
        mode is refused (`EINVAL`), never mixed. A state of an index format
        before 3 is unencrypted: it needs `false`. See
        [encryption.md](encryption.md)""")
    key_file: str = setting("", """
        the master key file (mode 0600 or stricter; `swapfs keygen` makes
        one); empty: the systemd credential `swapfs.key` if the daemon has one
        (`LoadCredentialEncrypted=`), else `/etc/swapfs/master.key`. A missing
        or wrong key refuses the mount (`ENOKEY`, `EKEYREJECTED`)""")
    lease_seconds: float = setting(0, """
        `0`: no lease, for a state directory that only this host reaches (the
        daemon's flock fences it). Otherwise (4..86400; under 4 s the 2 s
        settle of a claim would leave the daemon less than its renewal guard)
        how long the state directory's lease lasts unless renewed: set it when
        the state directory is on storage that another host's standby reaches.
        The daemon renews it every third of that, and a standby on another
        host takes the directory over only once it has lapsed for this long
        plus the clock-skew margin ([lease.md](lease.md))""")


def _toml_type(hint: Any) -> type | tuple[type, ...]:
    """What TOML value a field annotated *hint* takes: a path is a string, a
    float may be written as an integer, ``X | None`` (required) is an X."""
    if typing.get_origin(hint) is types.UnionType:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is float:
        return (int, float)
    if hint is Path:
        return str
    origin = typing.get_origin(hint)
    return typing.cast(type, origin or hint)


#: Each setting's TOML type, from its annotation.
_TYPES = {entry.name: _toml_type(entry.type) for entry in fields(Config)}
_LEVELS = ("debug", "info", "warning", "error")


def load(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read *path* (if given), then apply *overrides* (flags; None = not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as source:
                values = tomllib.load(source)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    values.update({key: value for key, value in overrides.items() if value is not None})
    for key, value in values.items():
        if key not in _TYPES:
            raise ConfigError(f"unknown setting {key!r}")
        want = _TYPES[key]
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            name = "number" if isinstance(want, tuple) else want.__name__
            raise ConfigError(f"{key} must be a {name}, not {value!r}")
    config = Config(**values)
    if config.state is None or config.mountpoint is None:
        raise ConfigError("both 'state' and 'mountpoint' are needed")
    config.state = Path(config.state)
    if config.log_level not in _LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(_LEVELS)}")
    if not -1000 <= config.oom_score_adj <= 1000:
        raise ConfigError("oom_score_adj must be within -1000..1000")
    if config.transient_cache_max_bytes < 0:
        raise ConfigError("transient_cache_max_bytes must not be negative")
    if config.content_cache_bytes < 0:
        raise ConfigError("content_cache_bytes must not be negative")
    if config.dedup_table_bytes < 4096:
        raise ConfigError("dedup_table_bytes must be at least 4096")
    if config.slot_table_cache_bytes < 1 << 20:
        raise ConfigError("slot_table_cache_bytes must be at least 1048576")
    if config.map_cache_bytes < 1 << 20:
        raise ConfigError("map_cache_bytes must be at least 1048576")
    if config.host_cache_bytes < 0:
        raise ConfigError("host_cache_bytes must not be negative")
    if not 0 < config.manifest_interval < 1e9:
        raise ConfigError("manifest_interval must be a positive number of seconds")
    if not 0 < config.driver_timeout < 1e9:
        raise ConfigError("driver_timeout must be a positive number of seconds")
    if not 0 < config.control_idle_timeout < 1e9:
        raise ConfigError("control_idle_timeout must be a positive number of seconds")
    if not 1 <= config.control_max_connections <= 65536:
        raise ConfigError("control_max_connections must be within 1..65536")
    if not 0 <= config.control_root_reserve < config.control_max_connections:
        raise ConfigError("control_root_reserve must be within 0..control_max_connections-1")
    for key in ("control_max_per_uid", "control_max_per_cid"):
        if not 1 <= getattr(config, key) <= 65536:
            raise ConfigError(f"{key} must be within 1..65536")
    if config.control_group:
        try:
            peercred.group_id(config.control_group)
        except KeyError:
            raise ConfigError(f"control_group: no group {config.control_group!r}") from None
    if not 0 <= config.vsock_port <= 0xFFFFFFFE:
        raise ConfigError("vsock_port must be within 0..4294967294")
    if any(not isinstance(cid, int) or isinstance(cid, bool) or not 3 <= cid <= 0xFFFFFFFE
           for cid in config.vsock_cids):
        raise ConfigError("vsock_cids must list guest context ids, each within 3..4294967294")
    config.drivers = {name: _binding(name, value, config.vsock_cids)
                      for name, value in values.get("drivers", {}).items()}
    channels = [binding.channel for binding in config.drivers.values() if binding.channel]
    if len(set(channels)) != len(channels):
        raise ConfigError("drivers: two names are bound to one channel (one VM has one)")
    for name in config.failover_strategies:
        if name not in STRATEGIES:
            raise ConfigError(f"failover_strategies: unknown strategy {name!r}; "
                              f"valid: {', '.join(STRATEGIES)}")
    if len(set(config.failover_strategies)) != len(config.failover_strategies):
        raise ConfigError("failover_strategies names a strategy twice")
    if config.lease_seconds != 0 and not 4 <= config.lease_seconds <= 86400:
        # Under 4 s the 2 s settle of a claim leaves less than the renewal
        # guard (a third of the lease): the daemon would fence itself at once.
        raise ConfigError("lease_seconds must be 0 (no lease) or within 4..86400 seconds")
    return config


def _binding(name: str, value: Any, vsock_cids: list[int]) -> Binding:
    """A ``[drivers.NAME]`` table: exactly one of ``cid`` (a guest in
    vsock_cids), ``uid`` or ``channel`` (an absolute path; with
    ``vsock_port`` for a Firecracker or cloud-hypervisor vsock socket)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"drivers.{name}: a driver name is 1..64 letters, digits or "
                          "._:@- (starting with a letter or digit)")
    if not isinstance(value, dict):
        raise ConfigError(f"drivers.{name} must be a table")
    if "channel" in value:
        return _channel(name, value)
    if len(value) != 1 or set(value) - {"cid", "uid"}:
        raise ConfigError(f"drivers.{name} must set exactly one of cid, uid or channel")
    ((key, number),) = value.items()
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(f"drivers.{name}.{key} must be an int, not {number!r}")
    if key == "cid":
        if number not in vsock_cids:
            raise ConfigError(f"drivers.{name}.cid: CID {number} is not in vsock_cids")
        return Binding(cid=number)
    if not 0 <= number <= 0xFFFFFFFE:
        raise ConfigError(f"drivers.{name}.uid must be within 0..4294967294")
    return Binding(uid=number)


def _channel(name: str, value: dict[str, Any]) -> Binding:
    """``channel = PATH`` and, for a vsock socket, ``vsock_port = N``."""
    if set(value) - {"channel", "vsock_port"}:
        raise ConfigError(f"drivers.{name}: a channel takes only vsock_port besides it, "
                          "never cid or uid")
    path = value["channel"]
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"drivers.{name}.channel must be an absolute path, not {path!r}")
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"drivers.{name}.channel: a Unix socket's path is at most "
                          "107 bytes")
    port = value.get("vsock_port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 0xFFFFFFFE):
        raise ConfigError(f"drivers.{name}.vsock_port must be within 1..4294967294")
    return Binding(channel=path, vsock_port=port)
