"""Config loading: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import cgroups, config
from sandbox.config import Config, ConfigError, RuntimeHandlerConfig, load_config


def test_defaults() -> None:
    config = Config()
    assert config.network.bridge == "flatpod0"
    assert config.network.subnet == "10.88.0.0/16"
    assert str(config.socket_path) == "/run/flatpod/flatpod.sock"
    # ksmd is a host-wide setting: by default flatpod only marks shim pages mergeable.
    assert config.shim_page_merging == "advise"
    assert config.event_loop == "uvloop"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_values_and_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'log_level = "debug"\n'
        "[network]\nsubnet = \"10.9.0.0/24\"\nmasquerade = false\n"
        '[images.mirrors]\n"registry.k8s.io" = ["http://127.0.0.1:5000"]\n'
    )
    config = load_config(path, {"socket": "/tmp/s.sock", "root_dir": None})
    assert config.log_level == "debug"
    assert config.network.subnet == "10.9.0.0/24"
    assert config.network.masquerade is False
    assert config.images.mirrors == {"registry.k8s.io": ["http://127.0.0.1:5000"]}
    assert str(config.socket_path) == "/tmp/s.sock"
    assert config.root_dir == "/var/lib/flatpod"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1", "'bogus'"),
        ("[network]\nmtu = true", "'network.mtu'"),
        ("[network]\nsubnet = \"nope\"", "'network.subnet'"),
        ("[streaming]\ntls_cert = \"/x\"", "'streaming.tls_cert'"),
        ("log_level = \"loud\"", "'log_level'"),
        ("shim_page_merging = \"yes\"", "'shim_page_merging'"),
        ("max_concurrent_lifecycle_calls = -1", "'max_concurrent_lifecycle_calls'"),
        ("network = 3", "'network'"),
        ("root_dir = \"relative\"", "'root_dir'"),
        ("[images]\nmirrors = {a = 1}", "'images.mirrors'"),
        ("[streaming]\nmax_connections = 0", "'streaming.max_connections'"),
        ("[streaming]\nmax_header_block_bytes = 100", "'streaming.max_header_block_bytes'"),
        ("[streaming]\nmax_streams_per_connection = 4",
         "'streaming.max_streams_per_connection'"),
        ("[streaming]\nhandshake_timeout_seconds = 1.5", "'streaming.handshake_timeout_seconds'"),
        ("metrics_address = \"9110\"", "'metrics_address'"),
        ("metrics_address = \"[::1:9110\"", "'metrics_address'"),
        ("metrics_address = \":70000\"", "'metrics_address'"),
        ("runtime_path = \"runc\"", "'runtime_path'"),
        ("event_loop = \"trio\"", "'event_loop' must be one of uvloop, asyncio"),
        ("default_runtime = \"crun\"", "'default_runtime' names 'crun'.*runc"),
        ("runtimes = 1", "'runtimes'"),
        ("[runtimes]\ncrun = 1", "'runtimes.crun'"),
        ("[runtimes.crun]\nruntime_root = \"/r\"", "'runtimes.crun.runtime_path' is required"),
        ("[runtimes.crun]\nruntime_path = \"crun\"", "'runtimes.crun.runtime_path'"),
        ("[runtimes.crun]\nruntime_path = \"/c\"\nruntime_root = \"r\"",
         "'runtimes.crun.runtime_root'"),
        ("[runtimes.crun]\nruntime_path = \"/c\"\nbogus = 1", "'runtimes.crun.bogus'"),
        ("[runtimes.crun]\nruntime_path = \"/c\"\nglobal_args = \"--debug\"",
         "'runtimes.crun.global_args'"),
        ("[runtimes.Crun]\nruntime_path = \"/c\"", "'runtimes.Crun'.*DNS label"),
        ("[runtimes.pods]\nruntime_path = \"/c\"", "'runtimes.pods.runtime_root' is required"),
        ("[runtimes.crun]\nruntime_path = \"/c\"\nruntime_root = \"/run/flatpod/runc\"",
         "'runtimes.crun.runtime_root' is also the root of handler 'runc'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("= = =")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_default_handler_is_runc_from_runtime_path() -> None:
    config = Config(runtime_path="/opt/runc", state_dir="/run/fp")
    assert config.default_runtime == "runc"
    assert config.handlers() == {
        "runc": RuntimeHandlerConfig(runtime_path="/opt/runc", runtime_root="/run/fp/runc"),
    }


def test_runtime_handler_tables(tmp_path: Path) -> None:
    """The node e2e harness's spelling (a quoted key with '-') and a crun handler; a
    [runtimes.runc] without a runtime_path keeps the top-level one."""
    path = tmp_path / "c.toml"
    path.write_text(
        'state_dir = "/run/fp"\nruntime_path = "/opt/runc"\ndefault_runtime = "crun"\n'
        '[runtimes."test-handler"]\nruntime_path = "/usr/sbin/runc"\n'
        '[runtimes.crun]\nruntime_path = "/usr/bin/crun"\nruntime_root = "/run/crun"\n'
        'global_args = ["--debug"]\n'
        '[runtimes.runc]\nruntime_root = "/run/fp/the-runc"\n'
    )
    config = load_config(path)
    assert config.default_runtime == "crun"
    assert config.handlers() == {
        "runc": RuntimeHandlerConfig("/opt/runc", "/run/fp/the-runc"),
        "test-handler": RuntimeHandlerConfig("/usr/sbin/runc", "/run/fp/test-handler"),
        "crun": RuntimeHandlerConfig("/usr/bin/crun", "/run/crun", ["--debug"]),
    }
    assert '"test-handler": {"global_args": [], "runtime_path": "/usr/sbin/runc"' in (
        config.to_json())


def test_cgroup_driver_resolved_and_checked(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("")
    resolved = load_config(conf)
    assert resolved.cgroup_driver == cgroups.detect_driver().value
    assert resolved.default_cgroup_parent in ("/flatpod", "system.slice")
    no_systemd = config._resolve_cgroups(config.Config(), tmp_path / "absent")
    assert (no_systemd.cgroup_driver, no_systemd.default_cgroup_parent) == ("cgroupfs", "/flatpod")
    (tmp_path / "system").mkdir()
    with_systemd = config._resolve_cgroups(config.Config(), tmp_path / "system")
    assert (with_systemd.cgroup_driver, with_systemd.default_cgroup_parent) == (
        "systemd", "system.slice")
    assert with_systemd.driver is cgroups.Driver.SYSTEMD
    for text, key in (('cgroup_driver = "docker"', "cgroup_driver"),
                      ('cgroup_driver = "systemd"\ndefault_cgroup_parent = "/flatpod"',
                       "default_cgroup_parent"),
                      ('cgroup_driver = "cgroupfs"\ndefault_cgroup_parent = "pods.slice"',
                       "default_cgroup_parent")):
        conf.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load_config(conf)
    conf.write_text('cgroup_driver = "systemd"\ndefault_cgroup_parent = "pods.slice"')
    assert load_config(conf).default_cgroup_parent == "pods.slice"
