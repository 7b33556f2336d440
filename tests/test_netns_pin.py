"""Pinning namespaces and running code inside them, against the real kernel."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from netns.enter import (
    connect_in_netns,
    interface_counters,
    on_own_thread,
    open_socket_in_netns,
    run_in_netns,
)
from netns.pin import (
    NETNS_RUN_DIR,
    create_netns,
    create_netns_here,
    is_pinned,
    pin_namespace,
    unpin,
)
from tests.support.netns import (
    BUSYBOX,
    EchoServer,
    NetnsFactory,
    Processes,
    nc_fetch,
    tcp_fetch,
)


def _inode(path: Path | str) -> int:
    return os.stat(path).st_ino


def test_create_netns_is_pinned_new_and_has_loopback(netns_factory: NetnsFactory) -> None:
    path = netns_factory.new()
    assert is_pinned(path)
    assert _inode(path) != _inode("/proc/self/ns/net")
    links = subprocess.run(
        ["ip", "-n", path.name, "-o", "link", "show", "lo"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "UP" in links
    # Only lo: a brand-new namespace.
    assert set(interface_counters(path)) == {"lo"}


def test_create_netns_leaves_caller_thread_in_host_netns(netns_factory: NetnsFactory) -> None:
    before = _inode("/proc/thread-self/ns/net")
    netns_factory.new()
    assert _inode("/proc/thread-self/ns/net") == before


def test_create_netns_refuses_an_existing_pin(netns_factory: NetnsFactory) -> None:
    path = netns_factory.new()
    with pytest.raises(FileExistsError):
        create_netns(path)
    assert is_pinned(path)


def test_create_netns_here_on_its_own_thread(netns_factory: NetnsFactory) -> None:
    """RunPodSandbox's way: the thread that made the netns is in it and goes on there, with
    loopback up; the loop's thread never moves."""
    path = NETNS_RUN_DIR / f"fpt-nn-{netns_factory.run}-here"
    netns_factory.made.append(path)
    before = _inode("/proc/thread-self/ns/net")

    def make_then_look() -> tuple[int, bool]:
        create_netns_here(path)
        with socket.socket() as sock:  # made in the thread's netns: the new one's loopback
            sock.bind(("127.0.0.1", 0))
        return _inode("/proc/thread-self/ns/net"), True

    inside, bound = asyncio.run(on_own_thread(make_then_look))
    assert is_pinned(path) and bound
    assert inside == _inode(path) != before
    assert _inode("/proc/thread-self/ns/net") == before
    assert set(interface_counters(path)) == {"lo"}


def test_on_own_thread_raises_what_the_work_raised(netns_factory: NetnsFactory) -> None:
    path = netns_factory.new()
    with pytest.raises(FileExistsError):  # already pinned: nothing made, nothing undone
        asyncio.run(on_own_thread(lambda: create_netns_here(path)))
    assert is_pinned(path)


def test_run_netns_dir_is_shared_like_ip_netns() -> None:
    # create_netns under /run/netns makes it a shared mount point (as `ip netns add` does).
    lines = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(NETNS_RUN_DIR)
    ]
    assert lines and "shared:" in lines[-1]


def test_unpin_is_idempotent_and_frees_the_name(netns_factory: NetnsFactory) -> None:
    path = netns_factory.new()
    unpin(path)
    assert not path.exists() and not is_pinned(path)
    unpin(path)  # again: missing is fine
    create_netns(path)  # the name can be reused
    assert is_pinned(path)


def test_pin_namespace_keeps_ipc_ns_after_process_exit(
    tmp_path: Path, processes: Processes
) -> None:
    proc = processes.start(["unshare", "--ipc", BUSYBOX, "sleep", "60"])
    source = Path(f"/proc/{proc.pid}/ns/ipc")
    for _ in range(100):  # wait until unshare has exec'ed into the new ipc ns
        if _inode(source) != _inode("/proc/self/ns/ipc"):
            break
        subprocess.run([BUSYBOX, "sleep", "0.02"], check=True)
    target = tmp_path / "ns" / "ipc"
    pin_namespace(source, target)
    try:
        expected = _inode(source)
        assert expected != _inode("/proc/self/ns/ipc")
        proc.kill()
        proc.wait()
        assert is_pinned(target)
        assert _inode(target) == expected
    finally:
        unpin(target)
    assert not target.exists()
    assert str(target) not in Path("/proc/self/mountinfo").read_text()


def test_process_joined_to_netns_reaches_its_loopback_server(
    netns_factory: NetnsFactory, echo_servers: object
) -> None:
    path = netns_factory.new()
    server: EchoServer = echo_servers(path, "127.0.0.1")  # type: ignore[operator]
    result = nc_fetch(path, "127.0.0.1", server.port)
    assert result.stdout.startswith("hello 127.0.0.1"), result
    # The server is in the pod netns only: the host's loopback has nothing there.
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
        ("127.0.0.1", server.port), timeout=2
    ):
        pass


def test_connect_in_netns_reaches_the_pod_loopback(
    netns_factory: NetnsFactory, echo_servers: object
) -> None:
    path = netns_factory.new()
    server: EchoServer = echo_servers(path, "127.0.0.1")  # type: ignore[operator]
    assert tcp_fetch(lambda: connect_in_netns(path, "127.0.0.1", server.port)).startswith("hello")


def test_socket_stays_in_its_netns(netns_factory: NetnsFactory) -> None:
    a, b = netns_factory.new(), netns_factory.new()
    with open_socket_in_netns(a) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with open_socket_in_netns(b) as other, pytest.raises(ConnectionRefusedError):
            other.connect(("127.0.0.1", port))


def test_run_in_netns_propagates_exceptions(netns_factory: NetnsFactory) -> None:
    path = netns_factory.new()

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        run_in_netns(path, boom)
    with pytest.raises(FileNotFoundError):
        run_in_netns(path.with_name(path.name + "-missing"), lambda: None)
