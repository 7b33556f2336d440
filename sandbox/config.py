"""flatpod's configuration: embedded defaults, overridden by a TOML file.

A missing file means all defaults. An unknown key or a value of the wrong type is an error that
names the key, because a typo silently ignored is a node that runs with a setting nobody chose.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sandbox import cgroups
from sandbox.streaming.limits import StreamLimits

DEFAULT_CONFIG_PATH = Path("/etc/flatpod/config.toml")
# The built-in runtime handler, whose binary is the top-level runtime_path.
RUNC_HANDLER = "runc"
# kubelet's checkpoint API writes here (its --root-dir's checkpoints/, by default).
KUBELET_CHECKPOINT_DIR = Path("/var/lib/kubelet/checkpoints")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class NetworkConfig:
    # The built-in bridge network, used when no CNI config exists in cni_conf_dir.
    bridge: str = "flatpod0"
    subnet: str = "10.88.0.0/16"
    gateway: str = ""  # empty: the subnet's first host address
    mtu: int = 1500
    masquerade: bool = True
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dirs: list[str] = field(default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"])


@dataclass(frozen=True)
class ImagesConfig:
    # Registry hosts reached over plain HTTP; everything else needs TLS.
    insecure_registries: list[str] = field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"]
    )
    # Registry host -> endpoints tried in order before the origin, e.g.
    # "registry.k8s.io" = ["http://127.0.0.1:5000"].
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    # A pull that makes no progress for this long is cancelled (containerd's default).
    pull_progress_timeout_seconds: int = 300
    max_concurrent_downloads: int = 3
    # What one layer may expand to, checked while it streams: a small gzip of zeros must not
    # fill the disk or take the node's inodes (see sandbox/images/snapshots.py for why these).
    max_layer_bytes: int = 64 << 30
    max_layer_entries: int = 500_000


@dataclass(frozen=True)
class StreamingConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port chosen at start
    tls_cert: str = ""
    tls_key: str = ""
    # What one client may cost the node (sandbox/streaming/limits.py says why each exists).
    max_connections: int = StreamLimits.max_connections
    max_sessions_per_container: int = StreamLimits.max_sessions_per_container
    handshake_timeout_seconds: int = int(StreamLimits.handshake_timeout_seconds)
    max_header_block_bytes: int = StreamLimits.max_header_block_bytes
    max_frame_bytes: int = StreamLimits.max_frame_bytes
    max_streams_per_connection: int = StreamLimits.max_streams_per_connection
    max_websocket_message_bytes: int = StreamLimits.max_websocket_message_bytes
    port_forward_connect_timeout_seconds: int = int(
        StreamLimits.port_forward_connect_timeout_seconds)
    max_port_forward_connects_per_pod: int = StreamLimits.max_port_forward_connects_per_pod

    def limits(self) -> StreamLimits:
        return StreamLimits(
            max_connections=self.max_connections,
            max_sessions_per_container=self.max_sessions_per_container,
            handshake_timeout_seconds=float(self.handshake_timeout_seconds),
            max_header_block_bytes=self.max_header_block_bytes,
            max_frame_bytes=self.max_frame_bytes,
            max_streams_per_connection=self.max_streams_per_connection,
            max_websocket_message_bytes=self.max_websocket_message_bytes,
            port_forward_connect_timeout_seconds=float(
                self.port_forward_connect_timeout_seconds),
            max_port_forward_connects_per_pod=self.max_port_forward_connects_per_pod,
        )


@dataclass(frozen=True)
class RuntimeHandlerConfig:
    """One `[runtimes.<handler>]` table: an OCI runtime with runc's command line (runc, crun)
    that pods choose by RuntimeClass handler name."""

    # The binary. Empty only in [runtimes.runc], which then uses the top-level runtime_path.
    runtime_path: str = ""
    # Its --root, where it keeps container state. Empty: <state_dir>/<handler>.
    runtime_root: str = ""
    # Global options put before every command, e.g. ["--debug"].
    global_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
    root_dir: str = "/var/lib/flatpod"
    state_dir: str = "/run/flatpod"
    socket: str = ""  # empty: <state_dir>/flatpod.sock
    log_level: str = "info"
    # The binary of the built-in "runc" handler (unless [runtimes.runc] names another).
    runtime_path: str = "/usr/sbin/runc"
    # The handler of pods whose RunPodSandbox names none (kubelet sends "" for the default).
    default_runtime: str = RUNC_HANDLER
    runtimes: dict[str, RuntimeHandlerConfig] = field(default_factory=dict)
    # Empty: the built-in pause, `catatonit -P` in a rootfs assembled from pause_binary.
    sandbox_image: str = ""
    pause_binary: str = "/usr/bin/catatonit"
    # "cgroupfs" or "systemd"; empty: systemd when it is PID 1, else cgroupfs (resolved by
    # load_config, so `flatpod config` and RuntimeConfig show the driver in use).
    cgroup_driver: str = ""
    # Where pods go when kubelet gives no cgroup_parent (crictl users often don't): a
    # cgroupfs path, or with systemd a slice. Empty: /flatpod, or system.slice.
    default_cgroup_parent: str = ""
    # CRI log records longer than this are split into partial (P) records.
    max_log_line_size: int = 16384
    # KSM for the shims' memory (shim/ksm.py): "advise" (the default) marks the pages the
    # shims inherit from the zygote mergeable and leaves ksmd, a host-wide kernel setting, to
    # the administrator (marking costs nothing while ksmd is stopped); "on" also starts ksmd
    # if it is stopped; "off" does neither.
    shim_page_merging: str = "advise"
    # The daemon's event loop: "uvloop" (libuv's, the uvloop package) or "asyncio" (the
    # standard library's). ARCHITECTURE.md, "Inside flatpod serve", has what each measured.
    event_loop: str = "uvloop"
    # The server on the CRI socket: "flatpod" (its own HTTP/2 server, sandbox/http2) or
    # "grpcio" (grpc.aio). ARCHITECTURE.md, "The CRI socket's own HTTP/2 server", says why.
    grpc_server: str = "flatpod"
    # Empty: no Prometheus endpoint. Otherwise "host:port".
    metrics_address: str = ""
    # CheckpointContainer writes archives, and CreateContainer restores them, only inside
    # this directory (empty: <root_dir>/checkpoints) or kubelet's, KUBELET_CHECKPOINT_DIR:
    # an archive holds every memory page of a container, and a pod's image field is the
    # tenant's to choose.
    checkpoint_dir: str = ""
    # The CRIU binary runc runs to checkpoint and restore (runc's --criu).
    criu_path: str = "/usr/sbin/criu"
    # Lifecycle RPCs (run/stop/remove pod, create/start/stop/remove container) running at
    # once; more wait their turn, so that kubelet's relist never queues behind a dozen of
    # them on the event loop (sandbox/slots.py). 0: the CPUs flatpod may use, at least 2.
    max_concurrent_lifecycle_calls: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    @property
    def driver(self) -> cgroups.Driver:
        """The cgroup driver (load_config resolves it; a bare Config() asks the host)."""
        return cgroups.Driver(self.cgroup_driver) if self.cgroup_driver else cgroups.detect_driver()

    @property
    def checkpoint_dirs(self) -> tuple[Path, ...]:
        """Where checkpoint archives may be written and read from."""
        own = Path(self.checkpoint_dir or Path(self.root_dir) / "checkpoints")
        return (own, KUBELET_CHECKPOINT_DIR) if own != KUBELET_CHECKPOINT_DIR else (own,)

    @property
    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket else Path(self.state_dir) / "flatpod.sock"

    def handlers(self) -> dict[str, RuntimeHandlerConfig]:
        """Every runtime handler with its paths filled in: the built-in "runc" (from
        runtime_path) and the [runtimes.*] tables, which may replace it."""
        tables = {RUNC_HANDLER: RuntimeHandlerConfig(), **self.runtimes}
        return {
            name: dataclasses.replace(
                table,
                runtime_path=table.runtime_path
                or (self.runtime_path if name == RUNC_HANDLER else ""),
                runtime_root=table.runtime_root or str(Path(self.state_dir) / name),
            )
            for name, table in tables.items()
        }

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["runtimes"] = {n: dataclasses.asdict(h) for n, h in self.handlers().items()}
        return json.dumps(doc, sort_keys=True)


# RuntimeClass handlers are DNS labels (Kubernetes validates them so).
_HANDLER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# What flatpod keeps in the state dir: no handler's default root may be one of them.
_STATE_DIR_ENTRIES = ("pods", "containers", "pause-rootfs")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_PAGE_MERGING = ("on", "advise", "off")
_EVENT_LOOPS = ("uvloop", "asyncio")
_GRPC_SERVERS = ("flatpod", "grpcio")
_CGROUP_DRIVERS = tuple(d.value for d in cgroups.Driver)
# <state_dir>/pods/<64-hex pod id>/shim.sock must fit in sockaddr_un's 108 bytes.
MAX_STATE_DIR_LEN = 107 - len("/pods/") - 64 - len("/shim.sock")

T = TypeVar("T")


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Reads `path` (the default path when None; missing is fine) and applies CLI overrides."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    elif explicit:
        raise ConfigError(f"{path}: no such config file")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    config = _build(Config, raw, "")
    _validate(config)
    return _resolve_cgroups(config)


def _resolve_cgroups(config: Config, systemd_run_dir: Path = cgroups.SYSTEMD_RUN_DIR) -> Config:
    """Fills in the automatic cgroup settings and checks the parent against the driver."""
    if config.cgroup_driver not in ("", *_CGROUP_DRIVERS):
        raise ConfigError(f"config key 'cgroup_driver' must be one of {', '.join(_CGROUP_DRIVERS)}")
    driver = (cgroups.Driver(config.cgroup_driver) if config.cgroup_driver
              else cgroups.detect_driver(systemd_run_dir))  # fmt: skip
    parent = config.default_cgroup_parent or (
        cgroups.DEFAULT_SLICE if driver is cgroups.Driver.SYSTEMD else cgroups.DEFAULT_PARENT
    )
    try:
        cgroups.check_parent(driver, parent)
    except cgroups.CgroupError as err:
        raise ConfigError(
            f"config key 'default_cgroup_parent' does not fit cgroup_driver {driver.value!r}: {err}"
        ) from err
    return dataclasses.replace(config, cgroup_driver=driver.value, default_cgroup_parent=parent)


def _build(cls: type[T], raw: dict[str, Any], prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    values: dict[str, Any] = {}
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        default = getattr(defaults, name)
        where = f"{prefix}{name}"
        table_type = _table_of_tables(hints[name])
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), _table(where, value), f"{where}.")
        elif table_type is not None:
            values[name] = {
                key: _build(table_type, _table(f"{where}.{key}", table), f"{where}.{key}.")
                for key, table in _table(where, value).items()
            }
        else:
            values[name] = _check_type(where, default, value)
    return cls(**values)


def _table_of_tables(hint: Any) -> type | None:
    """The dataclass D of a field typed dict[str, D] (e.g. runtimes), else None."""
    if typing.get_origin(hint) is not dict:
        return None
    value_type = typing.get_args(hint)[1]
    is_table = isinstance(value_type, type) and dataclasses.is_dataclass(value_type)
    return value_type if is_table else None


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"config key {where!r} must be a table")
    return value


def _check_type(where: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, dict):
        ok = isinstance(value, dict) and all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in value.values()
        )
    else:
        ok = False
    if not ok:
        raise ConfigError(
            f"config key {where!r} has {value!r}, expected a {type(default).__name__}"
        )
    return value


def _validate(config: Config) -> None:
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"config key 'log_level' must be one of {', '.join(_LOG_LEVELS)}")
    try:
        subnet = ipaddress.ip_network(config.network.subnet)
    except ValueError as err:
        raise ConfigError(f"config key 'network.subnet': {err}") from err
    if config.network.gateway:
        try:
            gateway = ipaddress.ip_address(config.network.gateway)
        except ValueError as err:
            raise ConfigError(f"config key 'network.gateway': {err}") from err
        if gateway not in subnet:
            raise ConfigError("config key 'network.gateway' is outside network.subnet")
    if not 576 <= config.network.mtu <= 65535:
        raise ConfigError("config key 'network.mtu' must be between 576 and 65535")
    if not 0 <= config.streaming.port <= 65535:
        raise ConfigError("config key 'streaming.port' must be between 0 and 65535")
    if bool(config.streaming.tls_cert) != bool(config.streaming.tls_key):
        raise ConfigError("config keys 'streaming.tls_cert' and 'streaming.tls_key' go together")
    _validate_stream_limits(config.streaming)
    if config.metrics_address:
        _validate_metrics_address(config.metrics_address)
    if config.shim_page_merging not in _PAGE_MERGING:
        raise ConfigError(
            f"config key 'shim_page_merging' must be one of {', '.join(_PAGE_MERGING)}"
        )
    if config.event_loop not in _EVENT_LOOPS:
        raise ConfigError(f"config key 'event_loop' must be one of {', '.join(_EVENT_LOOPS)}")
    if config.grpc_server not in _GRPC_SERVERS:
        raise ConfigError(
            f"config key 'grpc_server' must be one of {', '.join(_GRPC_SERVERS)}")
    if config.max_log_line_size < 256:
        raise ConfigError("config key 'max_log_line_size' must be at least 256")
    if config.images.pull_progress_timeout_seconds < 1:
        raise ConfigError("config key 'images.pull_progress_timeout_seconds' must be positive")
    for key in ("max_layer_bytes", "max_layer_entries"):
        if getattr(config.images, key) < 1:
            raise ConfigError(f"config key 'images.{key}' must be positive")
    if config.max_concurrent_lifecycle_calls < 0:
        raise ConfigError("config key 'max_concurrent_lifecycle_calls' must be 0 (the CPU "
                          "count) or positive")
    if config.images.max_concurrent_downloads < 1:
        raise ConfigError("config key 'images.max_concurrent_downloads' must be positive")
    for key in ("root_dir", "state_dir", "runtime_path", "criu_path"):
        if not Path(getattr(config, key)).is_absolute():
            raise ConfigError(f"config key {key!r} must be an absolute path")
    if config.checkpoint_dir and not Path(config.checkpoint_dir).is_absolute():
        raise ConfigError("config key 'checkpoint_dir' must be an absolute path")
    _validate_handlers(config)
    if len(config.state_dir) > MAX_STATE_DIR_LEN:
        raise ConfigError(
            f"config key 'state_dir' is longer than {MAX_STATE_DIR_LEN} characters: each pod's "
            "shim socket lives below it, and unix socket paths are limited to 108 bytes"
        )


# [streaming] limits: (key, smallest, largest). The smallest keeps the protocols working
# (a SPDY session needs five streams; kubelet's headers need a few KiB); the largest keeps
# a typo from turning a bound off.
_STREAM_LIMIT_RANGES = (
    ("max_connections", 1, 1 << 20),
    ("max_sessions_per_container", 1, 1 << 20),
    ("handshake_timeout_seconds", 1, 3600),
    ("max_header_block_bytes", 4096, 16 << 20),
    ("max_frame_bytes", 16384, 16 << 20),
    ("max_streams_per_connection", 5, 1 << 16),
    ("max_websocket_message_bytes", 4096, 64 << 20),
    ("port_forward_connect_timeout_seconds", 1, 3600),
    ("max_port_forward_connects_per_pod", 1, 1 << 16),
)


def _validate_stream_limits(streaming: StreamingConfig) -> None:
    for key, smallest, largest in _STREAM_LIMIT_RANGES:
        if not smallest <= getattr(streaming, key) <= largest:
            raise ConfigError(
                f"config key 'streaming.{key}' must be between {smallest} and {largest}")


def _validate_metrics_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"config key 'metrics_address' must be host:port, [v6]:port or :port, "
            f"got {address!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"config key 'metrics_address' has an unbalanced bracket: {address!r}")


def _validate_handlers(config: Config) -> None:
    handlers = config.handlers()
    roots: dict[str, str] = {}
    for name, handler in handlers.items():
        where = f"runtimes.{name}"
        if not _HANDLER_NAME.fullmatch(name):
            raise ConfigError(
                f"config key {where!r}: a handler name is a DNS label (at most 63 lowercase "
                "letters, digits and '-'), as Kubernetes requires of RuntimeClass handlers"
            )
        if not handler.runtime_path:
            raise ConfigError(f"config key '{where}.runtime_path' is required")
        for key in ("runtime_path", "runtime_root"):
            if not Path(getattr(handler, key)).is_absolute():
                raise ConfigError(f"config key '{where}.{key}' must be an absolute path")
        if name in _STATE_DIR_ENTRIES and not config.runtimes[name].runtime_root:
            raise ConfigError(
                f"config key '{where}.runtime_root' is required: the default, "
                f"<state_dir>/{name}, is flatpod's own"
            )
        other = roots.setdefault(handler.runtime_root, name)
        if other != name:
            raise ConfigError(
                f"config key '{where}.runtime_root' is also the root of handler {other!r}: "
                "each handler keeps its containers' state apart"
            )
    if config.default_runtime not in handlers:
        raise ConfigError(
            f"config key 'default_runtime' names {config.default_runtime!r}, which is not a "
            f"configured handler ({', '.join(sorted(handlers))})"
        )
