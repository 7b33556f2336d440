"""What the runtime sees of a pod network, whichever implementation (built-in bridge or CNI)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from netns.ports import PortMapping


@dataclass(frozen=True)
class NetworkResult:
    """The pod's primary address, as PodSandboxStatus reports it."""

    ip: str
    prefix_len: int
    gateway: str
    interface: str = "eth0"
    additional_ips: list[str] = field(default_factory=list)


class PodNetwork(Protocol):
    """Attach pods to a network and detach them. Every method is idempotent."""

    def setup(
        self,
        pod_id: str,
        netns_path: Path,
        port_mappings: Sequence[PortMapping] = (),
        pod_name: str = "",
        pod_namespace: str = "",
    ) -> NetworkResult:
        """Give the pod's netns an interface, an address, routes and its host ports."""
        ...

    def teardown(self, pod_id: str, netns_path: Path | None, host_ports: bool = True) -> None:
        """Undo setup; works when the netns is already gone and when nothing is left to undo.
        `host_ports` False: setup was given no port mappings (nothing to look for)."""
        ...

    def status(self) -> tuple[bool, str]:
        """(ready, reason) for the runtime's NetworkReady condition."""
        ...


class NetworkAhead(Protocol):
    """A pod network that a netns can get before its pod is known: the built-in bridge's
    (CNI plugins are given the pod's name and namespace). sandbox/shims.py plumbs a spare
    shim's netns with it."""

    def plumb(self, pod_id: str, netns_path: Path) -> NetworkResult:
        """All of setup() but the host ports; idempotent, and nothing is left on failure."""
        ...

    def add_host_ports(self, pod_id: str, ip: str,
                       port_mappings: Sequence[PortMapping]) -> None:
        """The rest of setup(), for a pod whose netns was plumbed."""
        ...

    def teardown(self, pod_id: str, netns_path: Path | None, host_ports: bool = True) -> None:
        """As PodNetwork.teardown."""
        ...
