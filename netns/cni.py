"""A PodNetwork that delegates to CNI plugins (spec 1.0, also 0.3.x/0.4.0 results).

Like libcni (containerd, CRI-O): the first network config in lexical order of conf_dir is used;
each plugin of the list gets ADD in order with the previous result as prevResult, and DEL in
reverse order. The final ADD result is cached on disk so DEL/CHECK get the prevResult and the
same runtimeConfig, even after a runtime restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, ip_interface
from pathlib import Path
from typing import Any

from netns.network import NetworkResult
from netns.pin import is_pinned
from netns.ports import PortMapping, check_pod_id

IFNAME = "eth0"
_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9_.-]+$")
_PLUGIN_TIMEOUT_S = 60.0
JsonObject = dict[str, Any]


class CniError(RuntimeError):
    """No usable network configuration, or a malformed plugin result."""


class CniPluginError(CniError):
    """A plugin failed; carries the CNI error code and message it returned."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        self.plugin, self.command, self.code, self.msg, self.details = (
            plugin, command, code, msg, details
        )
        super().__init__(f"CNI plugin {plugin} {command} failed (code {code}): {msg} {details}")


@dataclass(frozen=True)
class NetworkConfigList:
    """A loaded .conflist (a .conf is wrapped as a one-plugin list)."""

    name: str
    cni_version: str
    plugins: list[JsonObject]
    source: Path

    def plugin_conf(
        self, plugin: JsonObject, runtime_config: JsonObject, prev_result: JsonObject | None
    ) -> JsonObject:
        """The plugin's stdin: its conf plus name, cniVersion, prevResult and runtimeConfig."""
        conf = dict(plugin)
        conf["name"] = self.name
        conf["cniVersion"] = self.cni_version
        capabilities = plugin.get("capabilities", {})
        wanted = {k: v for k, v in runtime_config.items() if capabilities.get(k)}
        if wanted:
            conf["runtimeConfig"] = wanted
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf


def load_network_config(conf_dir: Path) -> NetworkConfigList:
    """The first .conflist/.conf/.json file of `conf_dir` in lexical order."""
    candidates = sorted(
        p for p in conf_dir.glob("*") if p.suffix in (".conflist", ".conf", ".json")
    ) if conf_dir.is_dir() else []
    if not candidates:
        raise CniError(f"no CNI network config in {conf_dir}")
    source = candidates[0]
    data = json.loads(source.read_text())
    if source.suffix == ".conflist":
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise CniError(f"{source}: no plugins")
    else:
        plugins = [data]
    for plugin in plugins:
        if not _PLUGIN_TYPE.match(str(plugin.get("type", ""))):
            raise CniError(f"{source}: bad plugin type {plugin.get('type')!r}")
    name, version = data.get("name"), data.get("cniVersion", "1.0.0")
    if not name:
        raise CniError(f"{source}: no network name")
    return NetworkConfigList(str(name), str(version), plugins, source)


def parse_result(result: JsonObject, ifname: str = IFNAME) -> NetworkResult:
    """Primary IPv4 (preferring the one on `ifname`) and the other addresses of a result."""
    interfaces = result.get("interfaces", [])
    ips: list[tuple[str, str]] = []  # (address/prefix, gateway)
    for entry in result.get("ips", []):  # 0.3.0 and later
        idx = entry.get("interface")
        on_if = idx is None or (
            0 <= idx < len(interfaces) and interfaces[idx].get("name") == ifname
        )
        if on_if:
            ips.append((entry["address"], entry.get("gateway", "")))
    if "ip4" in result:  # 0.1.0 / 0.2.0
        ips.append((result["ip4"]["ip"], result["ip4"].get("gateway", "")))
    v4 = [(addr, gw) for addr, gw in ips if isinstance(ip_interface(addr), IPv4Interface)]
    if not v4:
        raise CniError(f"CNI result has no IPv4 address on {ifname}: {result}")
    primary = ip_interface(v4[0][0])
    others = [str(ip_interface(a).ip) for a, _ in ips if ip_interface(a).ip != primary.ip]
    return NetworkResult(
        ip=str(primary.ip),
        prefix_len=primary.network.prefixlen,
        gateway=v4[0][1],
        interface=ifname,
        additional_ips=others,
    )


@dataclass
class CniNetwork:
    """A PodNetwork backed by the CNI plugins of the first config in conf_dir."""

    conf_dir: Path = Path("/etc/cni/net.d")
    bin_dirs: list[Path] = field(
        default_factory=lambda: [Path("/opt/cni/bin"), Path("/usr/lib/cni")]
    )
    cache_dir: Path = Path("/var/lib/flatpod/cni/results")

    def _find_plugin(self, plugin_type: str) -> Path:
        for directory in self.bin_dirs:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise CniError(f"CNI plugin {plugin_type} not found in {[str(d) for d in self.bin_dirs]}")

    def _cache_path(self, network: str, pod_id: str) -> Path:
        return self.cache_dir / f"{network}-{pod_id}-{IFNAME}.json"

    def _invoke(
        self,
        command: str,
        plugin_conf: JsonObject,
        pod_id: str,
        netns: str,
        cni_args: str,
    ) -> JsonObject:
        plugin_type = str(plugin_conf["type"])
        binary = self._find_plugin(plugin_type)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": IFNAME,
            "CNI_ARGS": cni_args,
            "CNI_PATH": os.pathsep.join(str(d) for d in self.bin_dirs),
        }
        proc = subprocess.run(
            [str(binary)],
            input=json.dumps(plugin_conf).encode(),
            env=env,
            capture_output=True,
            timeout=_PLUGIN_TIMEOUT_S,
            check=False,
        )
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                code, msg, details = int(err.get("code", 0)), str(err.get("msg", "")), str(
                    err.get("details", "")
                )
            except (ValueError, AttributeError):
                code, msg, details = proc.returncode, out, ""
            stderr = proc.stderr.decode(errors="replace").strip()
            raise CniPluginError(plugin_type, command, code, msg, details or stderr)
        if not out:
            return {}
        parsed = json.loads(out)
        if not isinstance(parsed, dict):
            raise CniError(f"CNI plugin {plugin_type} {command} printed a non-object")
        return parsed

    @staticmethod
    def _cni_args(pod_id: str, pod_name: str, pod_namespace: str) -> str:
        args = [("IgnoreUnknown", "1"), ("K8S_POD_INFRA_CONTAINER_ID", pod_id)]
        if pod_name:
            args.append(("K8S_POD_NAME", pod_name))
        if pod_namespace:
            args.append(("K8S_POD_NAMESPACE", pod_namespace))
        for key, value in args:
            if any(c in value for c in ";="):
                raise ValueError(f"{key} value {value!r} cannot go into CNI_ARGS")
        return ";".join(f"{k}={v}" for k, v in args)

    @staticmethod
    def _runtime_config(port_mappings: Sequence[PortMapping]) -> JsonObject:
        return {
            "portMappings": [
                {
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": m.protocol,
                    **({"hostIP": m.bound_host_ip} if m.bound_host_ip else {}),
                }
                for m in port_mappings
            ]
        }

    def setup(
        self,
        pod_id: str,
        netns_path: Path,
        port_mappings: Sequence[PortMapping] = (),
        pod_name: str = "",
        pod_namespace: str = "",
    ) -> NetworkResult:
        """Run ADD of each plugin in order; on failure, DEL what was added and re-raise."""
        check_pod_id(pod_id)
        config = load_network_config(self.conf_dir)
        cni_args = self._cni_args(pod_id, pod_name, pod_namespace)
        runtime_config = self._runtime_config(port_mappings)
        cache = self._cache_path(config.name, pod_id)
        # Written before ADD, so a crash mid-ADD still lets teardown run DEL with the same args.
        self._write_cache(cache, config, cni_args, runtime_config, None)
        result: JsonObject | None = None
        try:
            for plugin in config.plugins:
                conf = config.plugin_conf(plugin, runtime_config, result)
                result = self._invoke("ADD", conf, pod_id, str(netns_path), cni_args)
        except BaseException:
            # Roll back what was added; the ADD error is what the caller must see. If DEL fails
            # too, the cache stays so a later teardown() retries it.
            with contextlib.suppress(CniError, OSError, subprocess.SubprocessError):
                self.teardown(pod_id, netns_path)
            raise
        if result is None:
            raise CniError("no CNI result")
        self._write_cache(cache, config, cni_args, runtime_config, result)
        return parse_result(result)

    @staticmethod
    def _write_cache(
        path: Path,
        config: NetworkConfigList,
        cni_args: str,
        runtime_config: JsonObject,
        result: JsonObject | None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "config": {"name": config.name, "cniVersion": config.cni_version,
                       "plugins": config.plugins},
            "cniArgs": cni_args,
            "runtimeConfig": runtime_config,
            "result": result,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def _cached(self, pod_id: str) -> tuple[NetworkConfigList, JsonObject, Path] | None:
        for path in sorted(self.cache_dir.glob(f"*-{pod_id}-{IFNAME}.json")):
            record = json.loads(path.read_text())
            conf = record["config"]
            config = NetworkConfigList(conf["name"], conf["cniVersion"], conf["plugins"], path)
            return config, record, path
        return None

    def teardown(self, pod_id: str, netns_path: Path | None, host_ports: bool = True) -> None:
        """Run DEL in reverse order with the cached config; idempotent and netns-tolerant.
        (`host_ports`: the plugins' DEL cleans what they made; taken for the bridge's sake.)"""
        check_pod_id(pod_id)
        cached = self._cached(pod_id)
        if cached is None:
            return  # never set up, or already torn down
        config, record, path = cached
        # An empty CNI_NETNS tells plugins the namespace is gone: they clean up the host side.
        netns = str(netns_path) if netns_path is not None and is_pinned(netns_path) else ""
        prev = record.get("result")
        for plugin in reversed(config.plugins):
            conf = config.plugin_conf(plugin, record["runtimeConfig"], prev)
            self._invoke("DEL", conf, pod_id, netns, record["cniArgs"])
        path.unlink(missing_ok=True)

    def check(self, pod_id: str, netns_path: Path) -> bool:
        """Run CHECK of each plugin in order; False on any plugin error or missing state."""
        cached = self._cached(pod_id)
        if cached is None or not is_pinned(netns_path):
            return False
        config, record, _ = cached
        if record.get("result") is None:
            return False
        try:
            for plugin in config.plugins:
                conf = config.plugin_conf(plugin, record["runtimeConfig"], record["result"])
                self._invoke("CHECK", conf, pod_id, str(netns_path), record["cniArgs"])
        except CniError:
            return False
        return True

    def status(self) -> tuple[bool, str]:
        """Ready when a config loads and all its plugin binaries exist."""
        try:
            config = load_network_config(self.conf_dir)
            for plugin in config.plugins:
                self._find_plugin(str(plugin["type"]))
        except (CniError, OSError, ValueError) as exc:
            return False, f"cni config uninitialized: {exc}"
        return True, ""
