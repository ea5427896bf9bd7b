"""The daemon's configuration file and logging set-up."""

import logging
from pathlib import Path

import pytest

from mountd.access import Binding
from mountd.config import Config, ConfigError, load
from mountd.logs import SyslogPrefixFormatter
from tools import config_docs
from tools.config_docs import DOCS, EXAMPLE


def test_example_file_lists_every_setting_with_its_default() -> None:
    config = load(EXAMPLE, {})
    defaults = Config(state=config.state, mountpoint=config.mountpoint)
    assert config == defaults
    assert set(EXAMPLE.read_text().split()) >= {f"{name}" for name in vars(defaults)}


def test_example_file_is_generated_from_the_settings() -> None:
    """systemd/example.toml is what ``python -m tools.config_docs`` writes."""
    assert EXAMPLE.read_text() == config_docs.example_file()


def test_docs_table_is_generated_from_the_settings() -> None:
    """docs/configuration.md's settings table is what ``python -m
    tools.config_docs`` writes; the rest of the page is left alone."""
    docs = DOCS.read_text()
    assert config_docs.markdown_table() in docs
    assert docs == config_docs.docs_with_table(docs)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state = "/s"\nmountpoint = "/m"\nlog_level = "warning"\n')
    config = load(path, {"mountpoint": "/other", "log_level": None, "allow_other": True})
    assert config.state == Path("/s")
    assert config.mountpoint == "/other"
    assert config.log_level == "warning"  # None means the flag was not given
    assert config.allow_other is True


@pytest.mark.parametrize("text, message", [
    ('state = "/s"\nmountpoint = "/m"\nbogus = 1\n', "unknown setting 'bogus'"),
    ('state = "/s"\nmountpoint = "/m"\nlock_memory = "yes"\n', "lock_memory must be a bool"),
    ('state = "/s"\nmountpoint = "/m"\noom_score_adj = true\n', "oom_score_adj must be a int"),
    ('state = "/s"\nmountpoint = "/m"\noom_score_adj = -2000\n', "within -1000..1000"),
    ('state = "/s"\nmountpoint = "/m"\nlog_level = "loud"\n', "log_level must be one of"),
    ('state = "/s"\nmountpoint = "/m"\ntransient_cache_max_bytes = -1\n', "not be negative"),
    ('state = "/s"\nmountpoint = "/m"\ndriver_timeout = "1"\n', "driver_timeout must be a number"),
    ('state = "/s"\nmountpoint = "/m"\ndriver_timeout = 0\n', "positive number of seconds"),
    ('state = "/s"\nmountpoint = "/m"\nvsock_port = -1\n', "vsock_port must be within"),
    ('state = "/s"\nmountpoint = "/m"\ncontrol_idle_timeout = 0\n', "positive number of seconds"),
    ('state = "/s"\nmountpoint = "/m"\ncontrol_max_connections = 0\n', "within 1..65536"),
    ('state = "/s"\nmountpoint = "/m"\nvsock_cids = [2]\n', "vsock_cids must list"),
    ('state = "/s"\nmountpoint = "/m"\ncontrol_root_reserve = 128\n',
     "control_root_reserve must be within 0..control_max_connections-1"),
    ('state = "/s"\nmountpoint = "/m"\ncontrol_max_per_uid = 0\n',
     "control_max_per_uid must be within 1..65536"),
    ('state = "/s"\nmountpoint = "/m"\ncontrol_max_per_cid = 0\n',
     "control_max_per_cid must be within 1..65536"),
    ('state = "/s"\nmountpoint = "/m"\ndrivers = 5\n', "drivers must be a dict"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\ncid = 5\n',
     "drivers.vm1.cid: CID 5 is not in vsock_cids"),
    ('state = "/s"\nmountpoint = "/m"\nvsock_cids = [5]\n[drivers.vm1]\ncid = 5\nuid = 0\n',
     "drivers.vm1 must set exactly one of cid, uid or channel"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nsocket = "/run/x"\n',
     "drivers.vm1 must set exactly one of cid, uid or channel"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nvsock_port = 5\n',
     "drivers.vm1 must set exactly one of cid, uid or channel"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nchannel = "/run/x"\nuid = 0\n',
     "a channel takes only vsock_port besides it"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nchannel = "run/x"\n',
     "drivers.vm1.channel must be an absolute path"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nchannel = "/' + "x" * 107 + '"\n',
     "at most 107 bytes"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nchannel = "/x"\nvsock_port = 0\n',
     "drivers.vm1.vsock_port must be within 1..4294967294"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.a]\nchannel = "/x"\n[drivers.b]\n'
     'channel = "/x"\n', "two names are bound to one channel"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers]\nvm1 = 5\n', "drivers.vm1 must be a table"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nuid = -1\n',
     "drivers.vm1.uid must be within 0..4294967294"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers.vm1]\nuid = "0"\n',
     "drivers.vm1.uid must be an int"),
    ('state = "/s"\nmountpoint = "/m"\n[drivers."-bad"]\nuid = 0\n',
     "drivers.-bad: a driver name is"),
    ('state = "/s"\nmountpoint = "/m"\nfailover_strategies = "union"\n',
     "failover_strategies must be a list"),
    ('state = "/s"\nmountpoint = "/m"\nfailover_strategies = ["union", "lru"]\n',
     "unknown strategy 'lru'; valid: union, priority, common, share"),
    ('state = "/s"\nmountpoint = "/m"\nfailover_strategies = ["share", "share"]\n',
     "names a strategy twice"),
    ('state = "/s"\nmountpoint = "/m"\nlease_seconds = "10"\n', "lease_seconds must be a number"),
    ('state = "/s"\nmountpoint = "/m"\nlease_seconds = 3\n', "or within 4..86400"),
    ('state = "/s"\nmountpoint = "/m"\nlease_seconds = 1e6\n', "or within 4..86400"),
    ('state = "/s"\nmountpoint = "/m"\ndedup_table_bytes = 100\n', "at least 4096"),
    ('state = "/s"\n', "both 'state' and 'mountpoint'"),
    ('state = \n', "a.toml"),
])
def test_bad_configuration_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(path, {})


def test_driver_names_are_bound_to_a_cid_a_uid_or_a_channel(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state = "/s"\nmountpoint = "/m"\nvsock_cids = [5]\n'
                    '[drivers.vm1]\ncid = 5\n[drivers.backup]\nuid = 1001\n'
                    '[drivers.vm2]\nchannel = "/run/vms/vm2.sock"\n'
                    '[drivers.vm3]\nchannel = "/run/vms/vm3.vsock"\nvsock_port = 5253\n')
    assert load(path, {}).drivers == {
        "vm1": Binding(cid=5), "backup": Binding(uid=1001),
        "vm2": Binding(channel="/run/vms/vm2.sock"),
        "vm3": Binding(channel="/run/vms/vm3.vsock", vsock_port=5253)}
    assert Config().drivers == {}


def test_driver_timeout_may_be_a_fraction(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state = "/s"\nmountpoint = "/m"\ndriver_timeout = 0.5\n')
    assert load(path, {}).driver_timeout == 0.5


def test_failover_strategies_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state = "/s"\nmountpoint = "/m"\nfailover_strategies = ["share", "union"]\n')
    assert load(path, {}).failover_strategies == ["share", "union"]
    path.write_text('state = "/s"\nmountpoint = "/m"\nfailover_strategies = []\n')
    assert load(path, {}).failover_strategies == []
    assert Config().failover_strategies == ["union", "priority", "common", "share"]


def test_lease_seconds_defaults_to_none_and_takes_a_fraction(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state = "/s"\nmountpoint = "/m"\n')
    assert load(path, {}).lease_seconds == 0
    path.write_text('state = "/s"\nmountpoint = "/m"\nlease_seconds = 4.5\n')
    assert load(path, {}).lease_seconds == 4.5


def test_journal_lines_carry_syslog_priorities() -> None:
    formatter = SyslogPrefixFormatter()
    record = logging.LogRecord("mountd", logging.ERROR, __file__, 1, "two\nlines", None, None)
    assert formatter.format(record) == "<3>mountd: two\n<3>lines"
    record.levelno = logging.INFO
    assert formatter.format(record).startswith("<6>")
