"""Config loading: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.config import Config, ConfigError, load_config


def test_defaults() -> None:
    config = Config()
    assert config.network.bridge == "flatpod0"
    assert config.network.subnet == "10.88.0.0/16"
    assert str(config.socket_path) == "/run/flatpod/flatpod.sock"


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
