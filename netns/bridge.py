"""The built-in pod network: a Linux bridge, one veth per pod, host-side NAT.

All link/address/route work goes through netlink (`netns/rtnl.py`), with no `ip` subprocess on
the path; only the iptables rules (masquerade, host ports) exec a binary.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from netns import ports
from netns.enter import run_in_netns
from netns.ipam import LeaseBook, allocate, default_gateway
from netns.network import NetworkResult
from netns.pin import is_pinned
from netns.ports import HostPortChains, PortMapping, check_pod_id
from netns.rtnl import Rtnl

POD_IFNAME = "eth0"
_IFNAMSIZ = 15
_MASQ_COMMENT_PREFIX = "flatpod-masq="


@dataclass(frozen=True)
class BridgeConfig:
    """The bridge network; defaults are flatpod's real default network."""

    name: str = "flatpod0"
    subnet: str = "10.88.0.0/16"
    gateway: str | None = None  # None: the first host address of the subnet
    mtu: int = 1500
    masquerade: bool = True
    veth_prefix: str = "fp"  # host-side veth names are prefix + hash of the pod id
    hostport_chains: HostPortChains = field(default_factory=HostPortChains)

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= _IFNAMSIZ:
            raise ValueError(f"bad bridge name {self.name!r}")
        if _IFNAMSIZ - len(self.veth_prefix) < 8:
            raise ValueError(f"veth prefix {self.veth_prefix!r} leaves fewer than 8 hash chars")
        if self.gateway is not None and IPv4Address(self.gateway) not in self.network:
            raise ValueError(f"gateway {self.gateway} outside {self.subnet}")

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    @property
    def gateway_address(self) -> IPv4Address:
        return IPv4Address(self.gateway) if self.gateway else default_gateway(self.network)

    def host_veth_name(self, pod_id: str) -> str:
        """Deterministic, so teardown finds the veth from the pod id alone."""
        digest = hashlib.sha256(pod_id.encode()).hexdigest()
        return self.veth_prefix + digest[: _IFNAMSIZ - len(self.veth_prefix)]


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "r+") as knob:
        if knob.read().strip() != value:
            knob.seek(0)
            knob.write(value)


def _ignore_errno(exc: OSError, *codes: int) -> None:
    if exc.errno not in codes:
        raise exc


def _lookup(rtnl: Rtnl, ifname: str) -> int | None:
    link = rtnl.link(ifname)
    return None if link is None else link.index


def _configure_pod_side(address: IPv4Interface, gateway: IPv4Address, mtu: int) -> None:
    """Runs inside the pod netns: address eth0, bring links up, route via the bridge."""
    with Rtnl() as rtnl:
        rtnl.set_link(1, up=True)
        index = _lookup(rtnl, POD_IFNAME)
        if index is None:
            raise RuntimeError(f"{POD_IFNAME} did not arrive in the pod namespace")
        rtnl.set_link(index, mtu=mtu, up=True)
        try:
            rtnl.add_address(index, address.ip, address.network.prefixlen)
        except OSError as exc:
            _ignore_errno(exc, errno.EEXIST)
        try:
            rtnl.add_default_route(gateway, index)
        except OSError as exc:
            _ignore_errno(exc, errno.EEXIST)


def _pod_side_has(address: str) -> bool:
    with Rtnl() as rtnl:
        index = _lookup(rtnl, POD_IFNAME)
        return index is not None and address in rtnl.addresses(index)


class BridgeNetwork:
    """A PodNetwork on a Linux bridge with leases from a LeaseBook."""

    def __init__(self, config: BridgeConfig, leases: LeaseBook) -> None:
        self.config = config
        self.leases = leases
        # Caches of host-wide idempotent steps, so a steady-state setup skips the execs.
        self._masquerade_installed = False
        # The pods with host-port rules: read from iptables once (they may predate this
        # process), then kept. A pod without host ports, the common case, then costs no
        # iptables exec (about 7 ms of CPU, beside the pause's runc) at setup or teardown.
        self._port_owners: set[str] | None = None
        self._port_owners_lock = threading.Lock()

    # ---- host-wide pieces -------------------------------------------------------------------

    def ensure_bridge(self) -> int:
        """Create the bridge if needed, give it the gateway address, bring it up; its index."""
        cfg = self.config
        with Rtnl() as rtnl:
            link = rtnl.link(cfg.name)
            if link is None:
                try:
                    rtnl.add_bridge(cfg.name, cfg.mtu)
                except OSError as exc:
                    _ignore_errno(exc, errno.EEXIST)  # a concurrent setup made it first
                link = rtnl.link(cfg.name)
                if link is None:
                    raise RuntimeError(f"bridge {cfg.name} vanished while being created")
            if link.kind != "bridge":
                raise RuntimeError(f"{cfg.name} exists and is not a bridge")
            gateway = cfg.gateway_address
            if str(gateway) not in rtnl.addresses(link.index):
                try:
                    rtnl.add_address(link.index, gateway, cfg.network.prefixlen)
                except OSError as exc:
                    _ignore_errno(exc, errno.EEXIST)
            if not link.up:
                rtnl.set_link(link.index, up=True)
        return link.index

    def _masquerade_rule(self) -> list[str]:
        subnet = str(self.config.network)
        comment = _MASQ_COMMENT_PREFIX + self.config.name
        return ["-s", subnet, "!", "-d", subnet, "-m", "comment", "--comment", comment,
                "-j", "MASQUERADE"]

    def ensure_masquerade(self) -> None:
        rule = self._masquerade_rule()
        try:
            ports.run_iptables(["-t", "nat", "-C", "POSTROUTING", *rule])
        except ports.IptablesError:
            ports.run_iptables(["-t", "nat", "-A", "POSTROUTING", *rule])
        self._masquerade_installed = True

    def _hostport_owners(self) -> set[str]:
        with self._port_owners_lock:  # read once, even by setups on two threads at once
            if self._port_owners is None:
                self._port_owners = ports.list_owners(self.config.hostport_chains)
            return self._port_owners

    def _ensure_host(self) -> int:
        index = self.ensure_bridge()
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        if self.config.masquerade and not self._masquerade_installed:
            self.ensure_masquerade()
        return index

    def destroy(self) -> None:
        """Remove the bridge and its masquerade rule (uninstall, tests). Idempotent."""
        rule = self._masquerade_rule()
        while True:
            try:
                ports.run_iptables(["-t", "nat", "-D", "POSTROUTING", *rule])
            except ports.IptablesError:
                break
        self._masquerade_installed = False
        with Rtnl() as rtnl:
            index = _lookup(rtnl, self.config.name)
            if index is not None:
                try:
                    rtnl.delete_link(index)
                except OSError as exc:
                    _ignore_errno(exc, errno.ENODEV)

    # ---- per pod ----------------------------------------------------------------------------

    def setup(
        self,
        pod_id: str,
        netns_path: Path,
        port_mappings: Sequence[PortMapping] = (),
        pod_name: str = "",
        pod_namespace: str = "",
    ) -> NetworkResult:
        """Attach the pod: lease an address, plumb a veth into the netns, install host ports.

        Retrying after a failure (or after success) is safe and yields the same address.
        """
        result = self.plumb(pod_id, netns_path)
        try:
            self.add_host_ports(pod_id, result.ip, port_mappings)
        except BaseException:
            self.teardown(pod_id, netns_path)
            raise
        return result

    def plumb(self, pod_id: str, netns_path: Path) -> NetworkResult:
        """setup() without the host ports: all of it that needs only the pod id and its
        netns, so a spare shim's netns gets it ahead of its pod (sandbox/shims.py). On
        failure nothing is left; idempotent as setup()."""
        check_pod_id(pod_id)
        cfg = self.config
        bridge_index = self._ensure_host()
        address = allocate(self.leases, cfg.name, cfg.network, cfg.gateway_address, pod_id)
        try:
            self._plumb(pod_id, netns_path, bridge_index, address)
        except BaseException:
            self.teardown(pod_id, netns_path)
            raise
        return NetworkResult(
            ip=str(address.ip),
            prefix_len=address.network.prefixlen,
            gateway=str(cfg.gateway_address),
            interface=POD_IFNAME,
        )

    def add_host_ports(self, pod_id: str, ip: str,
                       port_mappings: Sequence[PortMapping]) -> None:
        """The pod's host ports, to its plumbed address (a pod already given host ports gets
        them replaced; without any, and without old rules, nothing runs)."""
        owners = self._hostport_owners()
        if port_mappings or pod_id in owners:  # else there is nothing to install or replace
            if port_mappings:
                ports.enable_route_localnet(self.config.name)
            owners.add(pod_id)  # before: rules half made are found and removed
            ports.install(pod_id, ip, port_mappings, self.config.hostport_chains)
            if not port_mappings:
                owners.discard(pod_id)

    def _plumb(
        self, pod_id: str, netns_path: Path, bridge_index: int, address: IPv4Interface
    ) -> None:
        cfg = self.config
        host_name = cfg.host_veth_name(pod_id)
        with Rtnl() as rtnl:
            stale = _lookup(rtnl, host_name)
            if stale is not None:  # a half-done earlier attempt: start over
                rtnl.delete_link(stale)
            ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                rtnl.add_veth(host_name, POD_IFNAME, ns_fd)
            finally:
                os.close(ns_fd)
            host_index = _lookup(rtnl, host_name)
            if host_index is None:
                raise RuntimeError(f"veth {host_name} vanished after creation")
            rtnl.set_link(host_index, master=bridge_index, mtu=cfg.mtu, up=True)
        run_in_netns(
            netns_path, lambda: _configure_pod_side(address, cfg.gateway_address, cfg.mtu)
        )

    def teardown(self, pod_id: str, netns_path: Path | None, host_ports: bool = True) -> None:
        """Detach the pod. Deleting the host end removes both ends, netns or not; idempotent.
        Host-port rules are removed only for a pod in the owner set (read from the nat table
        once, then kept): the bridge knows its own, so `host_ports` (which spares CNI's
        portmap a look when the pod had no mappings) changes nothing here."""
        check_pod_id(pod_id)
        with Rtnl() as rtnl:
            index = _lookup(rtnl, self.config.host_veth_name(pod_id))
            if index is not None:
                try:
                    rtnl.delete_link(index)
                except OSError as exc:
                    _ignore_errno(exc, errno.ENODEV)
        owners = self._hostport_owners()
        if pod_id in owners:
            ports.remove_all_for(pod_id, self.config.hostport_chains)
            owners.discard(pod_id)
        self.leases.release(self.config.name, pod_id)

    def check(self, pod_id: str, netns_path: Path) -> bool:
        """True if the pod still has its lease, its veth on the bridge, and its address."""
        cfg = self.config
        owned = self.leases.owned_by(cfg.name, pod_id)
        if not owned or not is_pinned(netns_path):
            return False
        with Rtnl() as rtnl:
            bridge = _lookup(rtnl, cfg.name)
            host = rtnl.link(cfg.host_veth_name(pod_id))
            if bridge is None or host is None or host.master != bridge:
                return False
        return run_in_netns(netns_path, lambda: _pod_side_has(owned[0]))

    def status(self) -> tuple[bool, str]:
        """Ready if the bridge is (or can be made) up and forwarding is on."""
        try:
            self._ensure_host()
        except (OSError, RuntimeError, ports.IptablesError) as exc:
            return False, f"bridge network {self.config.name} not ready: {exc}"
        return True, ""
