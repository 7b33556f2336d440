"""flatpod pod networking: namespace pinning, bridge + IPAM, host ports, CNI.

Standalone: nothing here imports sandbox/ or gRPC. The runtime picks a PodNetwork
(BridgeNetwork or CniNetwork) and passes it pinned netns paths.
"""

from netns.network import NetworkResult, PodNetwork
from netns.ports import PortMapping

__all__ = ["NetworkResult", "PodNetwork", "PortMapping"]
