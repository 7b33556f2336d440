"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.cri import CriClient
from tests.daemon import Daemon, running_daemon
from tests.pods import mounts_under, remove_all_pods, wait_for

if TYPE_CHECKING:
    from tests.support.plugin import TestImages
    from tests.test_streaming_support import ServerHarness

pytest_plugins = ["tests.support.plugin", "tests.support.netns"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh `flatpod serve` of this test's own."""
    with running_daemon(tmp_path) as d:
        yield d


@pytest.fixture
def cri(daemon: Daemon) -> Iterator[CriClient]:
    client = daemon.client()
    yield client
    client.close()


@pytest.fixture
def harness() -> Iterator[ServerHarness]:
    """A streaming server over real local processes (tests/test_streaming_support.py)."""
    from tests.test_streaming_support import running_harness

    yield from running_harness()


@pytest.fixture(scope="session", autouse=True)
def _host_port_chains_removed() -> Iterator[None]:
    """flatpod's top host-port chains stay while a node runs; after the tests, when no pod
    owns a rule in them, they go too (flatpod makes them again at its next hostPort)."""
    yield
    from netns import ports

    if not ports.list_owners():
        ports.remove_base_chains(ports.HostPortChains())
    _remove_portmap_plugin_chains()


# The CNI portmap plugin's shared chains (it makes them on first use and never removes them).
PORTMAP_JUMPS = (
    ("PREROUTING", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
    ("OUTPUT", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
    ("POSTROUTING",
     '-m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ'),
)
PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK")


def _remove_portmap_plugin_chains() -> None:
    """After the CNI tests: the plugin's chains, when no pod has a rule left in them."""
    import shlex
    import subprocess

    def nat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["iptables", "-w", "-t", "nat", *args],
                              capture_output=True, text=True)

    listed = nat("-S", "CNI-HOSTPORT-DNAT")
    if listed.returncode != 0 or any(line.startswith("-A") for line in listed.stdout.splitlines()):
        return  # absent, or still in use
    for builtin, rule in PORTMAP_JUMPS:
        nat("-D", builtin, *shlex.split(rule))
    for chain in PORTMAP_CHAINS:
        nat("-F", chain)
    for chain in PORTMAP_CHAINS:
        nat("-X", chain)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One `flatpod serve` for a whole test module; every pod is removed at the end, and
    nothing may stay mounted under its dirs."""
    base = tmp_path_factory.mktemp("flatpod")
    with running_daemon(base) as d:
        yield d
        client = d.client()
        remove_all_pods(client)
        client.close()
        # The removals' cleanups follow their answers (sandbox/removals.py).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not mounts_under(d.state) + mounts_under(d.root),
                     what="the removals' cleanups")
        leftovers = mounts_under(d.state) + mounts_under(d.root)
        assert not leftovers, f"mounts left behind: {leftovers}"


@pytest.fixture(scope="module")
def fp(shared_daemon: Daemon) -> Iterator[CriClient]:
    client = shared_daemon.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def pulled(fp: CriClient, test_images: TestImages) -> TestImages:
    """The test images, pulled into the module's daemon."""
    from cri_api import api_pb2 as pb

    for image in (test_images.busybox, test_images.web, test_images.busybox_user):
        fp.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image.reference)))
    return test_images
