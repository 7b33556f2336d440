"""The built-in bridge network and host ports, against the real kernel and iptables."""

from __future__ import annotations

import random
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from netns.bridge import BridgeConfig, BridgeNetwork
from netns.enter import connect_in_netns
from netns.ipam import JsonFileLeaseBook
from netns.pin import unpin
from netns.ports import HostPortChains, PortMapping, list_owners, remove_base_chains
from tests.support import netns as support
from tests.support.netns import (
    BUSYBOX,
    EchoServer,
    NetnsFactory,
    assert_nothing_named,
    link_names,
    nat_table,
    nc_fetch,
    new_pod_id,
    pods_torn_down,
    run_in,
    tcp_fetch,
)

CLIENT_HOST_IP = support.CLIENT_HOST_IP
CLIENT_IP = support.CLIENT_IP


SUBNET = "10.231.0.0/25"
GATEWAY = "10.231.0.1"


@dataclass
class Bridge:
    net: BridgeNetwork
    run: str
    pods: list[str] = field(default_factory=list)

    def pod_id(self) -> str:
        return new_pod_id(self.run, "pod", self.pods)


@pytest.fixture
def bridge(run_id: str, tmp_path: Path) -> Iterator[Bridge]:
    chains = HostPortChains(
        dnat=f"fpt-nn-HP-{run_id}", masq=f"fpt-nn-HM-{run_id}", pod_prefix="fpt-nn-P-"
    )
    config = BridgeConfig(
        name=f"fpt-nn-b{run_id}", subnet=SUBNET, veth_prefix="fpt-nn", hostport_chains=chains
    )
    fixture = Bridge(BridgeNetwork(config, JsonFileLeaseBook(tmp_path / "leases.json")), run_id)

    def host_global() -> None:
        fixture.net.destroy()
        remove_base_chains(chains)

    with pods_torn_down(fixture.net, fixture.pods, host_global):
        yield fixture
    for pod in fixture.pods:
        assert config.host_veth_name(pod) not in link_names()
        assert chains.pod_chain(pod) not in nat_table()
    assert f"flatpod-masq={config.name}" not in nat_table()
    assert_nothing_named(run_id)


def test_two_pods_get_distinct_ips_and_reach_each_other(
    bridge: Bridge, netns_factory: NetnsFactory, echo_servers: object
) -> None:
    ns_a, ns_b = netns_factory.new(), netns_factory.new()
    pod_a, pod_b = bridge.pod_id(), bridge.pod_id()
    a = bridge.net.setup(pod_a, ns_a)
    b = bridge.net.setup(pod_b, ns_b)
    assert a.ip != b.ip
    assert {a.gateway, b.gateway} == {GATEWAY}
    assert a.prefix_len == 25 and a.interface == "eth0"
    assert bridge.net.check(pod_a, ns_a) and bridge.net.check(pod_b, ns_b)

    ping = run_in(ns_a, [BUSYBOX, "ping", "-c", "1", "-W", "3", b.ip])
    assert ping.returncode == 0, ping
    server: EchoServer = echo_servers(ns_b)  # type: ignore[operator]
    reply = nc_fetch(ns_a, b.ip, server.port)
    assert reply.stdout.strip() == f"hello {a.ip}", reply
    # The pod's default route goes via the bridge: the host's gateway address answers.
    assert run_in(ns_a, [BUSYBOX, "ping", "-c", "1", "-W", "3", GATEWAY]).returncode == 0


def test_teardown_removes_veth_and_lease_and_is_idempotent(
    bridge: Bridge, netns_factory: NetnsFactory
) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    first = bridge.net.setup(pod, ns)
    again = bridge.net.setup(pod, ns)  # a retried setup is safe and keeps the address
    assert again.ip == first.ip
    veth = bridge.net.config.host_veth_name(pod)
    assert veth in link_names()
    bridge.net.teardown(pod, ns)
    assert veth not in link_names()
    assert not bridge.net.check(pod, ns)
    assert bridge.net.leases.owned_by(bridge.net.config.name, pod) == []
    assert run_in(ns, [BUSYBOX, "ip", "link", "show", "eth0"]).returncode != 0
    bridge.net.teardown(pod, ns)
    bridge.net.teardown(pod, None)


def test_teardown_after_netns_is_gone(bridge: Bridge, netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    bridge.net.setup(pod, ns, [PortMapping("tcp", 80, random.randint(20000, 29999))])
    unpin(ns)  # the pod's netns disappears before the network is torn down
    bridge.net.teardown(pod, ns)
    assert bridge.net.config.host_veth_name(pod) not in link_names()
    assert pod not in list_owners(bridge.net.config.hostport_chains)
    assert bridge.net.leases.owned_by(bridge.net.config.name, pod) == []


def test_hostport_reachable_from_other_netns_and_host_then_gone(
    bridge: Bridge, netns_factory: NetnsFactory, client_netns: Path, echo_servers: object
) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    chains = bridge.net.config.hostport_chains
    server: EchoServer = echo_servers(ns, "0.0.0.0", 8080)  # type: ignore[operator]
    host_port = random.randint(20000, 29999)
    result = bridge.net.setup(pod, ns, [PortMapping("tcp", server.port, host_port)])
    assert list_owners(chains) == {pod}

    from_client = nc_fetch(client_netns, CLIENT_HOST_IP, host_port)
    assert from_client.stdout.strip() == f"hello {CLIENT_IP}", from_client
    from_loopback = tcp_fetch(lambda: socket.create_connection(("127.0.0.1", host_port), 3))
    assert from_loopback.startswith("hello 10.231.0."), from_loopback  # hairpin masquerade
    via_gateway = tcp_fetch(lambda: socket.create_connection((GATEWAY, host_port), 3))
    assert via_gateway.startswith("hello "), via_gateway
    assert result.ip in nat_table()

    bridge.net.teardown(pod, ns)
    assert list_owners(chains) == set()
    assert chains.pod_chain(pod) not in nat_table()
    assert pod not in nat_table()
    after = nc_fetch(client_netns, CLIENT_HOST_IP, host_port)
    assert "hello" not in after.stdout


def test_hostport_bound_to_one_host_ip(
    bridge: Bridge, netns_factory: NetnsFactory, client_netns: Path, echo_servers: object
) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    server: EchoServer = echo_servers(ns)  # type: ignore[operator]
    host_port = random.randint(20000, 29999)
    bridge.net.setup(pod, ns, [PortMapping("tcp", server.port, host_port, CLIENT_HOST_IP)])
    assert "hello" in nc_fetch(client_netns, CLIENT_HOST_IP, host_port).stdout
    with pytest.raises(OSError):
        tcp_fetch(lambda: socket.create_connection((GATEWAY, host_port), 2))


def test_pod_traffic_leaving_the_subnet_is_masqueraded(
    bridge: Bridge, netns_factory: NetnsFactory, client_netns: Path, echo_servers: object
) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    bridge.net.setup(pod, ns)
    assert f"flatpod-masq={bridge.net.config.name}" in nat_table()
    server: EchoServer = echo_servers(client_netns)  # type: ignore[operator]
    reply = tcp_fetch(lambda: connect_in_netns(ns, CLIENT_IP, server.port))
    assert reply.strip() == f"hello {CLIENT_HOST_IP}"  # the pod ip was rewritten


def test_status_reports_a_name_clash(run_id: str, tmp_path: Path) -> None:
    name = f"fpt-nn-d{run_id}"
    with IPRoute() as ipr:
        # A veth (no dummy module here) squatting on the bridge's name.
        ipr.link("add", ifname=name, kind="veth", peer=f"fpt-nn-e{run_id}")
    try:
        net = BridgeNetwork(
            BridgeConfig(name=name, subnet=SUBNET, masquerade=False),
            JsonFileLeaseBook(tmp_path / "l.json"),
        )
        ready, reason = net.status()
        assert not ready and "not a bridge" in reason
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
    assert not {name, f"fpt-nn-e{run_id}"} & link_names()


def test_status_ready_and_bridge_has_gateway(bridge: Bridge) -> None:
    assert bridge.net.status() == (True, "")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=bridge.net.config.name)[0]
        addrs = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
    assert GATEWAY in addrs
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"


def test_setup_teardown_is_fast(bridge: Bridge, netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new()
    pod = bridge.pod_id()
    bridge.net.setup(pod, ns)  # warm: bridge and masquerade exist
    bridge.net.teardown(pod, ns)
    durations = []
    for _ in range(20):
        start = time.perf_counter()
        result = bridge.net.setup(pod, ns)
        bridge.net.teardown(pod, ns)
        durations.append(time.perf_counter() - start)
        assert IPv4Address(result.ip) in bridge.net.config.network
    median = statistics.median(durations)
    print(f"bridge setup+teardown median over 20: {median * 1000:.1f} ms")
    assert median < 0.5


def test_many_pods_concurrently(bridge: Bridge, netns_factory: NetnsFactory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(bridge.pod_id(), netns_factory.new()) for _ in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda p: bridge.net.setup(p[0], p[1]), pairs))
    assert len({r.ip for r in results}) == 6
    assert all(bridge.net.check(pod, ns) for pod, ns in pairs)
    subprocess.run(["true"], check=True)
