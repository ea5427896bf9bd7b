"""The daemon's configuration: a TOML file, overridden by command-line flags.

Every setting, its type and its default is in :data:`SETTINGS`; the same
table is documented in ``docs/configuration.md``. An unknown key or a value
of the wrong type is an error that names the key, never silently ignored.
"""

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mountd import peercred
from mountd.access import Binding
from swapfs.cache import STRATEGIES
from swapfs.control import NAME_PATTERN


class ConfigError(Exception):
    """The configuration file or flags are invalid; the message says how."""


@dataclass
class Config:
    #: Directory holding the index and the chains' data files.
    state: Path | None = None
    #: Where the file system is mounted.
    mountpoint: str | None = None
    #: Let users other than the one mounting use the mount (FUSE allow_other).
    allow_other: bool = False
    #: mlockall the daemon so that serving swap never needs swap.
    lock_memory: bool = True
    #: PR_SET_IO_FLUSHER on the serving threads.
    io_flusher: bool = True
    #: The daemon's OOM score adjustment; -1000 exempts it from the OOM killer.
    oom_score_adj: int = -1000
    #: Log level: debug, info, warning or error.
    log_level: str = "info"
    #: Control socket path; empty means ``<state>/control.sock``.
    control_socket: str = ""
    #: The transient cache's largest capacity in bytes; 0 disables it.
    transient_cache_max_bytes: int = 268435456
    #: The content cache's budget of host memory in bytes; 0 disables it.
    content_cache_bytes: int = 64 << 20
    #: The memory all chains' dedup tables may take together, in bytes.
    dedup_table_bytes: int = 256 << 20
    #: Seconds between two writes of the content cache's manifest.
    manifest_interval: float = 5
    #: The fail-over planner's budget for this host's content caches together;
    #: 0: this daemon's content cache plus what the other daemons hold.
    host_cache_bytes: int = 0
    #: Seconds a registered driver may stay silent before it is revoked.
    driver_timeout: float = 30
    #: Seconds any other control connection may stay silent before it is closed
    #: (a standby keeping the mount excepted).
    control_idle_timeout: float = 60
    #: Control connections served at once; more are answered EAGAIN and closed.
    control_max_connections: int = 128
    #: Of those, how many only root may open (mountd/limits.py).
    control_root_reserve: int = 8
    #: Control connections one Unix user other than root may hold at once.
    control_max_per_uid: int = 16
    #: Control connections one guest (vsock CID) may hold at once.
    control_max_per_cid: int = 4
    #: A group served on the control socket besides root (a name or a number);
    #: empty: root only.
    control_group: str = ""
    #: AF_VSOCK port drivers in virtual machines connect to; 0 = none.
    vsock_port: int = 0
    #: The guests (context ids) whose drivers the vsock port admits.
    vsock_cids: list[int] = field(default_factory=list)
    #: Driver name -> the one peer that may register it (``[drivers.NAME]``
    #: with ``cid`` or ``uid``; mountd/access.py).
    drivers: dict[str, Binding] = field(default_factory=dict)
    #: The fail-over planner's strategies, tried in this order (docs/failover.md).
    failover_strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    #: Encrypt a new state directory's swap at rest; an existing state in the
    #: other mode is refused (docs/encryption.md).
    encrypt: bool = True
    #: The master key file; empty: the systemd credential ``swapfs.key`` if
    #: the daemon has one, else /etc/swapfs/master.key.
    key_file: str = ""
    #: Seconds the state directory's lease lasts unless renewed (swapfs.engine.lease);
    #: 0: no lease, for a state directory on storage only this host reaches.
    lease_seconds: float = 0


_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str, "mountpoint": str, "allow_other": bool, "lock_memory": bool,
    "io_flusher": bool, "oom_score_adj": int, "log_level": str, "control_socket": str,
    "transient_cache_max_bytes": int, "driver_timeout": (int, float), "vsock_port": int,
    "failover_strategies": list,
    "lease_seconds": (int, float),
    "content_cache_bytes": int, "manifest_interval": (int, float), "host_cache_bytes": int,
    "dedup_table_bytes": int, "control_idle_timeout": (int, float),
    "control_max_connections": int, "vsock_cids": list, "encrypt": bool, "key_file": str,
    "control_group": str, "control_root_reserve": int, "control_max_per_uid": int,
    "control_max_per_cid": int, "drivers": dict,
}
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
    known = {field.name for field in fields(Config)}
    for key, value in values.items():
        if key not in known:
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
    vsock_cids) or ``uid``."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"drivers.{name}: a driver name is 1..64 letters, digits or "
                          "._:@- (starting with a letter or digit)")
    if not isinstance(value, dict) or len(value) != 1 or set(value) - {"cid", "uid"}:
        raise ConfigError(f"drivers.{name} must set exactly one of cid or uid")
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
