"""Run code inside a pinned network namespace.

A network namespace is a per-thread attribute on Linux, so a dedicated short-lived thread can
setns() into the target, do its work and end. The calling thread (and the gRPC server's other
threads) never change namespace, and because the helper thread is discarded afterwards a failed
switch back cannot leak a wrong namespace into a pooled thread. A thread costs ~100 µs, a fork
of a big Python process with gRPC threads costs milliseconds and is unsafe with those threads.

Sockets keep the namespace they were created in, so a socket made on the helper thread can be
handed back and used from any thread: that is how port-forward connects to the pod's loopback.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from netns import libc

T = TypeVar("T")


@dataclass
class _Outcome(Generic[T]):
    """What the helper thread hands back: a value or the exception it raised."""

    value: T | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


def run_in_netns(netns_path: Path, fn: Callable[[], T]) -> T:
    """Call `fn()` on a fresh thread that has joined the network namespace at `netns_path`.

    Exceptions raised by `fn` (or by entering the namespace) are re-raised in the caller.
    """
    # Open in the caller so a missing/invalid path fails fast with a clear error.
    ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    outcome: _Outcome[T] = _Outcome()

    def body() -> None:
        try:
            own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc.setns(ns_fd, libc.CLONE_NEWNET)
                try:
                    outcome.value = fn()
                    outcome.done = True
                finally:
                    # Hygiene only: the thread ends right after, so a failure here is harmless.
                    with contextlib.suppress(OSError):
                        libc.setns(own_fd, libc.CLONE_NEWNET)
            finally:
                os.close(own_fd)
        except BaseException as exc:
            outcome.error = exc

    try:
        worker = threading.Thread(target=body, name=f"netns:{netns_path.name}", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(ns_fd)
    if outcome.error is not None:
        raise outcome.error
    if not outcome.done:
        raise RuntimeError(f"netns helper thread for {netns_path} ended without a result")
    return outcome.value  # type: ignore[return-value]


async def on_own_thread(fn: Callable[[], T]) -> T:
    """Awaits `fn()` run on a fresh thread that ends after it: for work that moves its thread
    into another namespace (pin.create_netns_here), which a pooled thread must never do. A
    cancelled await leaves the thread to finish its work; its result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if done.done():  # cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)  # type: ignore[arg-type]

    def body() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    # _thread, not threading.Thread: Thread.start() waits until the new thread has run,
    # and the loop with it (measured under load 6: median 0.2 ms, p90 1.1 ms, against
    # 0.03 and 0.06 ms here). The thread's outcome comes back through the loop, so none of
    # threading's bookkeeping (joining, naming) is needed.
    _thread.start_new_thread(body, ())
    return await done


def open_socket_in_netns(
    netns_path: Path,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
) -> socket.socket:
    """Create a socket that belongs to the network namespace at `netns_path`.

    The socket stays in that namespace for its whole life, whichever thread uses it later.
    """
    return run_in_netns(netns_path, lambda: socket.socket(family, kind))


def connect_in_netns(netns_path: Path, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect a TCP socket from inside the namespace (e.g. port-forward to the pod's 127.0.0.1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = open_socket_in_netns(netns_path, family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class InterfaceCounters:
    """Byte/packet counters of one interface, as the kernel reports them in /proc/net/dev."""

    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


def parse_proc_net_dev(text: str) -> dict[str, InterfaceCounters]:
    """Parse the /proc/net/dev table into counters keyed by interface name."""
    counters: dict[str, InterfaceCounters] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        f = [int(v) for v in rest.split()]
        counters[name.strip()] = InterfaceCounters(
            rx_bytes=f[0], rx_packets=f[1], rx_errors=f[2], rx_dropped=f[3],
            tx_bytes=f[8], tx_packets=f[9], tx_errors=f[10], tx_dropped=f[11],
        )
    return counters


def interface_counters(netns_path: Path) -> dict[str, InterfaceCounters]:
    """Counters of every interface inside the namespace at `netns_path`.

    Reads /proc/thread-self/net/dev on the helper thread: /proc/self/net follows the *main*
    thread's namespace and /sys/class/net follows the netns sysfs was mounted in, so neither
    would show the pod's interfaces.
    """
    text = run_in_netns(netns_path, lambda: Path("/proc/thread-self/net/dev").read_text())
    return parse_proc_net_dev(text)
