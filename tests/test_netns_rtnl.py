"""netns/rtnl.py's requests against the real kernel, each in namespaces of its own, checked
with iproute2 (`ip -n`), which shares no code with it."""

from __future__ import annotations

import errno
import os
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netns.enter import run_in_netns
from netns.rtnl import Link, Rtnl
from tests.support.netns import NetnsFactory


def ip(netns: Path, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns.name, *args], capture_output=True, text=True,
                          check=True).stdout


def test_a_bridge_and_a_veth_pair_are_made_addressed_routed_and_deleted(
    netns_factory: NetnsFactory,
) -> None:
    host, pod = netns_factory.new(), netns_factory.new()

    def plumb() -> None:
        with Rtnl() as rtnl:
            # A link without IFLA_LINKINFO (no kind) and without a master decodes too.
            assert rtnl.link("lo") == Link(index=1, name="lo", kind=None, master=0, mtu=65536,
                                           up=True)
            assert rtnl.link("br-t") is None
            assert rtnl.link_by_index(12345) is None
            rtnl.add_bridge("br-t", 1400)
            bridge = rtnl.link("br-t")
            assert bridge is not None and bridge.kind == "bridge" and bridge.mtu == 1400
            assert not bridge.up
            rtnl.add_address(bridge.index, IPv4Address("10.77.0.1"), 24)
            with pytest.raises(OSError) as again:
                rtnl.add_address(bridge.index, IPv4Address("10.77.0.1"), 24)
            assert again.value.errno == errno.EEXIST
            assert rtnl.addresses(bridge.index) == ["10.77.0.1"]
            assert rtnl.addresses(1) == ["127.0.0.1"]  # each link's own, not every link's
            rtnl.set_link(bridge.index, up=True)
            ns_fd = os.open(pod, os.O_RDONLY | os.O_CLOEXEC)
            try:
                rtnl.add_veth("veth-t", "eth0", ns_fd)
            finally:
                os.close(ns_fd)
            veth = rtnl.link("veth-t")
            assert veth is not None and veth.kind == "veth" and veth.master == 0
            rtnl.set_link(veth.index, master=bridge.index, mtu=1400, up=True)
            assert rtnl.link_by_index(veth.index) == rtnl.link("veth-t")
            joined = rtnl.link("veth-t")
            assert joined is not None and joined.master == bridge.index and joined.up

    def pod_side() -> None:
        with Rtnl() as rtnl:
            eth0 = rtnl.link("eth0")
            assert eth0 is not None
            rtnl.set_link(eth0.index, up=True)
            rtnl.add_address(eth0.index, IPv4Address("10.77.0.2"), 24)
            rtnl.add_default_route(IPv4Address("10.77.0.1"), eth0.index)
            with pytest.raises(OSError) as again:
                rtnl.add_default_route(IPv4Address("10.77.0.1"), eth0.index)
            assert again.value.errno == errno.EEXIST

    run_in_netns(host, plumb)
    run_in_netns(pod, pod_side)
    assert "master br-t" in ip(host, "-o", "link", "show", "veth-t")
    assert "inet 10.77.0.1/24" in ip(host, "-o", "addr", "show", "br-t")
    assert "inet 10.77.0.2/24" in ip(pod, "-o", "addr", "show", "eth0")
    assert ip(pod, "route", "show", "default").startswith("default via 10.77.0.1 dev eth0")

    def unplumb() -> None:
        with Rtnl() as rtnl:
            veth = rtnl.link("veth-t")
            assert veth is not None
            rtnl.delete_link(veth.index)
            with pytest.raises(OSError) as gone:
                rtnl.delete_link(veth.index)
            assert gone.value.errno == errno.ENODEV
            assert rtnl.link("veth-t") is None

    run_in_netns(host, unplumb)
    assert "eth0" not in ip(pod, "-o", "link")  # deleting one end took the peer too


def test_loopback_of_a_fresh_namespace_is_up_and_a_bad_request_names_itself(
    netns_factory: NetnsFactory,
) -> None:
    netns = netns_factory.new()  # create_netns brings lo up through rtnl
    assert "UP" in ip(netns, "-o", "link", "show", "lo")

    def bad() -> None:
        with Rtnl() as rtnl:
            rtnl.set_link(12345, up=True)

    with pytest.raises(OSError) as failed:
        run_in_netns(netns, bad)
    assert failed.value.errno == errno.ENODEV
    assert "set link 12345" in str(failed.value)
