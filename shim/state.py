"""What a shim keeps and its ops share: the fd loop, containers and exec sessions, and the
small helpers for pid files and runc's console socket.

The shim's protocol is a table of handlers by concern (shim/ops_lifecycle.py, ops_exec.py,
ops_attach.py), which shim/server.py dispatches to; this module is what they have in common.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shim import protocol
from shim.crilog import CriLogFile, LineSplitter

if TYPE_CHECKING:
    from shim.server import Connection, Shim

Callback = Callable[[], None]
Request = dict[str, Any]
# An op's handler: the shim, the client's connection and its request; the reply's fields,
# or None when the handler answers later (wait) or itself (exec, attach, shutdown).
Op = Callable[["Shim", "Connection", Request], "dict[str, Any] | None"]


class OpError(Exception):
    """A request failed; the message goes back to the client."""


@dataclass
class Handlers:
    on_read: Callback | None = None
    on_write: Callback | None = None


class Loop:
    """An epoll set where each fd has an optional read and write callback.

    select.epoll directly rather than the selectors module: its Python layer (keys,
    mappings, namedtuples) would run in every zygote-forked shim and copy the zygote's
    pages that hold it (hack/shim-memory).
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handlers] = {}

    def watch(self, fd: int, on_read: Callback | None, on_write: Callback | None) -> None:
        events = (select.EPOLLIN if on_read else 0) | (select.EPOLLOUT if on_write else 0)
        known = fd in self.handlers
        if not events:
            if known:
                self.epoll.unregister(fd)
                del self.handlers[fd]
            return
        self.handlers[fd] = Handlers(on_read, on_write)
        if known:
            self.epoll.modify(fd, events)
        else:
            self.epoll.register(fd, events)

    def forget(self, fd: int) -> None:
        self.watch(fd, None, None)

    def run_once(self, timeout: float | None) -> None:
        for fd, events in self.epoll.poll(-1 if timeout is None else timeout):
            # An error or hang-up wakes both callbacks, as with selectors.
            handlers = self.handlers.get(fd)
            if handlers and events & ~select.EPOLLOUT and handlers.on_read:
                handlers.on_read()
            handlers = self.handlers.get(fd)
            if handlers and events & ~select.EPOLLIN and handlers.on_write:
                handlers.on_write()

    def close(self) -> None:
        self.epoll.close()


class FdWriter:
    """Non-blocking buffered writes to a pipe / pty (a container's stdin)."""

    def __init__(self, loop: Loop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.pending = bytearray()
        self.close_when_drained = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        self.pending += data
        self.flush()

    def flush(self) -> None:
        try:
            while self.pending:
                self.pending = self.pending[os.write(self.fd, self.pending):]
        except BlockingIOError:
            pass
        except OSError:
            self.pending.clear()
        if self.pending:
            self.loop.watch(self.fd, None, self.flush)
        else:
            self.loop.forget(self.fd)
            if self.close_when_drained:
                self.close()

    def close_after_drain(self) -> None:
        self.close_when_drained = True
        self.flush()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.forget(self.fd)
            os.close(self.fd)
            self.fd = -1


@dataclass
class Container:
    id: str
    bundle: str
    pid: int
    tty: bool
    stdin_once: bool
    exit_file: str
    log: CriLogFile | None
    stdin: FdWriter | None
    # Output fd -> stream id (the pty master reads as stdout).
    outputs: dict[int, int] = field(default_factory=dict)
    splitters: dict[int, LineSplitter] = field(default_factory=dict)
    pty_master: int = -1
    oom_control: str | None = None  # the file whose oom_kill line counts its OOM kills
    oom_kills_at_create: int = 0
    oom_kills_seen: int = 0  # the count as last read while the cgroup still existed
    oom_watch: int = -1  # inotify watch descriptor on oom_control (v2 memory.events)
    # The parent's count at create, where systemd owns the scope (see parent_oom_events).
    oom_parent_kills_at_create: int | None = None
    systemd_cgroup: bool = False  # runc makes its cgroup as a systemd scope
    kill_all_on_exit: bool = False
    # Everything in its cgroup was SIGKILLed (runc kill --all) and nothing joined it since
    # (an exec resets it): its exit needs no second kill of what it left.
    all_killed: bool = False
    want_stdin: bool = False
    restore: Restore | None = None  # start restores it from a checkpoint (no runc create)
    status: str = "created"
    exit_code: int | None = None
    exited_at: str | None = None
    oom_killed: bool = False
    attachers: list[Connection] = field(default_factory=list)
    waiters: list[tuple[Connection, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {"container_id": self.id, "pid": self.pid, "status": self.status,
                "exit_code": self.exit_code, "exited_at": self.exited_at,
                "oom_killed": self.oom_killed}


@dataclass(frozen=True)
class Restore:
    """Where a container's checkpoint is: CRIU's images, a work dir for restore.log, and
    the CRIU binary runc runs."""

    image_path: str
    work_path: str
    criu: str

    @classmethod
    def from_request(cls, raw: Any) -> Restore | None:
        if not raw:
            return None
        return cls(str(raw["image_path"]), str(raw["work_path"]), str(raw["criu"]))


@dataclass
class ExecSession:
    id: str
    container_id: str
    pid: int
    exit_code: int | None = None
    exited_at: str | None = None
    waiters: list[tuple[Connection, Any]] = field(default_factory=list)
    # After exec_kill with "wait": pidfds of the killed tree's processes not yet dead, and
    # who to answer once they all are and the exec's own process has been reaped.
    dying: set[int] = field(default_factory=set)
    kill_waiters: list[tuple[Connection, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {"exec_id": self.id, "container_id": self.container_id, "pid": self.pid,
                "status": "running" if self.exit_code is None else "exited",
                "exit_code": self.exit_code, "exited_at": self.exited_at}


def read_pid(pid_file: str) -> int:
    # Files are read as bytes throughout: text mode would import and run the ascii codec
    # in the forked shim, a few private pages for nothing.
    with open(pid_file, "rb") as file:
        return int(file.read().strip())


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ConsoleListener:
    """A listening unix socket for runc's --console-socket; removed on exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def __enter__(self) -> socket.socket:
        unlink_quietly(self.path)
        self.sock.bind(self.path)
        self.sock.listen(1)
        return self.sock

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()
        unlink_quietly(self.path)


def receive_console(listener: socket.socket, timeout: float = 10.0) -> int:
    """runc connected during create/exec and sent the pty master as SCM_RIGHTS; the
    connection already sits in the backlog, so accept() does not wait for runc."""
    listener.settimeout(timeout)
    conn, _addr = listener.accept()
    with conn:
        conn.settimeout(timeout)
        _data, fds = protocol.receive_fds(conn)
    if not fds:
        raise OpError("runc sent no console fd")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def owns_pid_namespace(bundle: str) -> bool:
    """Whether config.json gives the container a PID namespace of its own (not the pod's, a
    target's by path, or the host's)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as file:
            namespaces = json.loads(file.read()).get("linux", {}).get("namespaces", [])
    except (OSError, ValueError):
        return True
    return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def read_oom_kills(path: str | None) -> int:
    return read_oom_kills_if_present(path) or 0


def read_oom_kills_if_present(path: str | None) -> int | None:
    """The `oom_kill` count in `path`; None when the file cannot be read (its cgroup gone)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            for line in file:
                name, _, value = line.partition(b" ")
                if name == b"oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return 0


def parent_oom_events(path: str | None) -> str | None:
    """The parent cgroup's memory.events (cgroup v2 only). Its counts include the children's,
    and it outlives a systemd scope: systemd removes an emptied scope on its own, and under a
    slow shim that can happen before the exit is handled, taking the scope's count with it."""
    if path is None or os.path.basename(path) != "memory.events":
        return None
    return os.path.join(os.path.dirname(os.path.dirname(path)), "memory.events")
