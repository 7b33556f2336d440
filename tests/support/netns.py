"""Shared fixtures and helpers for the netns tests (imported by the test_netns_* modules).

Everything host-global gets a unique `fpt-nn` name, and every fixture checks on the way out
that nothing it named is left on the host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from netns.enter import open_socket_in_netns, run_in_netns
from netns.network import PodNetwork
from netns.pin import NETNS_RUN_DIR, create_netns, unpin

BUSYBOX = "/bin/busybox"
CLIENT_HOST_IP = "10.231.1.1"  # host end of the client netns' link
CLIENT_IP = "10.231.1.2"


def token() -> str:
    return secrets.token_hex(3)


def new_pod_id(run_id: str, kind: str, pods: list[str]) -> str:
    """A pod id of this run (`fpt-nn-<run>-<kind><n>`), added to `pods`, which the
    fixture tears down."""
    pod = f"fpt-nn-{run_id}-{kind}{len(pods)}"
    pods.append(pod)
    return pod


@contextlib.contextmanager
def pods_torn_down(
    net: PodNetwork, pods: list[str], host_global: Callable[[], None]
) -> Iterator[None]:
    """Runs the block, then tears down every one of `pods`, then removes the network's
    host-global pieces (`host_global`) even if a teardown failed."""
    try:
        yield
    finally:
        try:
            for pod in pods:
                net.teardown(pod, None)
        finally:
            host_global()


def link_names() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}


def nat_table() -> str:
    return subprocess.run(
        ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True
    ).stdout


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def assert_nothing_named(marker: str) -> None:
    """No link, netns file, mount or nat rule/chain mentions `marker`."""
    assert not [n for n in link_names() if marker in n], "leaked links"
    assert not [p for p in os.listdir(NETNS_RUN_DIR) if marker in p], "leaked netns"
    assert marker not in mountinfo(), "leaked mounts"
    assert marker not in nat_table(), "leaked iptables rules/chains"


@dataclass
class NetnsFactory:
    """Creates pinned netns named fpt-nn-<run>-<n> and removes them all at the end."""

    run: str
    made: list[Path] = field(default_factory=list)

    def new(self) -> Path:
        path = NETNS_RUN_DIR / f"fpt-nn-{self.run}-{len(self.made)}"
        self.made.append(path)
        create_netns(path)
        return path

    def cleanup(self) -> None:
        for path in self.made:
            unpin(path)


@pytest.fixture
def run_id() -> str:
    return token()


@pytest.fixture
def netns_factory(run_id: str) -> Iterator[NetnsFactory]:
    factory = NetnsFactory(run_id)
    try:
        yield factory
    finally:
        factory.cleanup()
    assert not [p for p in os.listdir(NETNS_RUN_DIR) if run_id in p]
    assert f"fpt-nn-{run_id}" not in mountinfo()


@dataclass
class Processes:
    """Subprocesses a test starts; all killed at the end."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()


def run_in(netns: Path, argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run a process joined to `netns` (as a container would be)."""
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class EchoServer:
    """A TCP server listening inside a netns; replies with the peer address it saw."""

    sock: socket.socket
    port: int
    thread: threading.Thread
    peers: list[str] = field(default_factory=list)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


def start_echo_server(netns: Path, host: str = "0.0.0.0", port: int = 0) -> EchoServer:
    sock = open_socket_in_netns(netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    server = EchoServer(sock, sock.getsockname()[1], threading.Thread(daemon=True))

    def serve() -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            with conn:
                server.peers.append(peer[0])
                conn.sendall(f"hello {peer[0]}\n".encode())

    server.thread = threading.Thread(target=serve, daemon=True)
    server.thread.start()
    return server


@pytest.fixture
def echo_servers() -> Iterator[Callable[..., EchoServer]]:
    started: list[EchoServer] = []

    def start(netns: Path, host: str = "0.0.0.0", port: int = 0) -> EchoServer:
        server = start_echo_server(netns, host, port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


def tcp_fetch(connect: Callable[[], socket.socket]) -> str:
    with connect() as sock:
        return sock.recv(100).decode()


def nc_fetch(netns: Path, host: str, port: int) -> subprocess.CompletedProcess[str]:
    """Busybox nc from inside `netns`: reads what the server sends, -w bounds the wait."""
    return run_in(netns, [BUSYBOX, "nc", "-w", "3", host, str(port)])


@pytest.fixture
def client_netns(run_id: str, netns_factory: NetnsFactory) -> Iterator[Path]:
    """A netns outside the bridge, routed to the host over its own veth pair."""
    path = netns_factory.new()
    host_end = f"fpt-nn-c{run_id}"
    fd = os.open(path, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_end, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            index = ipr.link_lookup(ifname=host_end)[0]
            ipr.addr("add", index=index, address=CLIENT_HOST_IP, prefixlen=30)
            ipr.link("set", index=index, state="up")
    finally:
        os.close(fd)

    def inside() -> None:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=CLIENT_IP, prefixlen=30)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=CLIENT_HOST_IP)

    try:
        run_in_netns(path, inside)
        yield path
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_end):
                ipr.link("del", index=index)
