"""The per-pod shim: one epoll loop over clients, container stdio and SIGCHLD.

It is the child subreaper of the pause and every container of its pod: runc create /
exec --detach leave their processes re-parented here, so this process reaps them and
records their exits.

Its protocol is a table of handlers (OPS), split by concern: process lifecycle
(shim/ops_lifecycle.py), exec (shim/ops_exec.py), attach and logs (shim/ops_attach.py). This
module reads requests, dispatches them, and does what no request asks for: reading
container output into logs and attachers, reaping, and recording exits and OOM kills.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; see set_signal_handler
import errno
import json
import os
import signal
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shim import ops_attach, ops_exec, ops_lifecycle, protocol
from shim.crilog import DEFAULT_MAX_LINE
from shim.runc import Runc, RuncError
from shim.state import (
    Callback,
    Container,
    ExecSession,
    Loop,
    Op,
    OpError,
    parent_oom_events,
    read_oom_kills,
    read_oom_kills_if_present,
)

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
READ_SIZE = 65536
MAX_CONN_BACKLOG = 4 << 20  # drop an attacher/subscriber that falls this far behind
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
STREAM_NAMES = {protocol.STREAM_STDOUT: b"stdout", protocol.STREAM_STDERR: b"stderr"}
# The shim's protocol: each op's handler, by concern. Why a table and not getattr on
# "op_<name>": the protocol reads in one place, each concern's module owns its ops, and no
# request can reach a method that was never meant to be an op.
# A dict typed read-only, not a MappingProxyType: its get() is a method call on the dict
# behind it, whose lookup writes zygote pages in every shim (hack/shim-memory: +55 KiB).
OPS: Mapping[str, Op] = {**ops_lifecycle.OPS, **ops_exec.OPS, **ops_attach.OPS}


@dataclass
class Logger:
    level: int = LOG_LEVELS["info"]

    def log(self, level: str, message: str) -> None:
        # Straight to fd 2 (the shim log): sys.stderr's text and buffer layers would run,
        # and copy zygote pages, in every forked shim. Escaped as sys.stderr would.
        if LOG_LEVELS[level] >= self.level:
            line = f"{protocol.rfc3339nano()} {level} {message}\n"
            os.write(2, line.encode(errors="backslashreplace"))


class Connection:
    """A client connection: request lines, then possibly events or attach frames."""

    def __init__(self, shim: Shim, sock: socket.socket) -> None:
        self.shim = shim
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.mode = "rpc"  # rpc | events | attach | closing
        self.attached: Container | None = None
        self.attach_stdin = False
        self.frames = protocol.FrameDecoder()
        self.closed = False
        sock.setblocking(False)
        self._watch()

    def _watch(self) -> None:
        if self.closed:
            return
        self.shim.loop.watch(self.fd, self.on_readable, self.flush if self.outbuf else None)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.outbuf += data
        if len(self.outbuf) > MAX_CONN_BACKLOG:
            self.shim.logger.log("warning", "dropping a client that does not read")
            self.close()
            return
        self.flush()

    def send_message(self, message: dict[str, Any]) -> None:
        self.send(protocol.encode_message({"v": protocol.PROTOCOL_VERSION, **message}))

    def flush(self) -> None:
        try:
            while self.outbuf:
                del self.outbuf[: self.sock.send(self.outbuf)]
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        if not self.outbuf and self.mode == "closing":
            self.close()
            return
        self._watch()

    def close_after_flush(self) -> None:
        self.mode = "closing"
        self.flush()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.mode == "attach":
            self._on_frames(data)
        elif self.mode == "rpc":
            self.inbuf += data
            self._on_lines()

    def _on_lines(self) -> None:
        while self.mode == "rpc" and not self.closed:
            newline = self.inbuf.find(b"\n")
            if newline < 0:
                if len(self.inbuf) > protocol.MAX_LINE:
                    self.close()
                return
            line = bytes(self.inbuf[:newline])
            del self.inbuf[: newline + 1]
            self.shim.handle_request(self, line)
        if self.mode == "attach" and self.inbuf:
            rest = bytes(self.inbuf)
            self.inbuf.clear()
            self._on_frames(rest)

    def _on_frames(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except protocol.ProtocolError:
            self.close()
            return
        for stream, payload in frames:
            if stream == protocol.STREAM_STDIN and self.attached is not None:
                self.shim.attach_stdin(self, payload)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.shim.loop.forget(self.fd)
        self.sock.close()
        self.shim.connection_closed(self)


class Shim:
    def __init__(self, pod_id: str, state_dir: str, runc: Runc, listener: socket.socket,
                 logger: Logger, max_log_line: int = DEFAULT_MAX_LINE) -> None:
        self.pod_id = pod_id
        self.state_dir = state_dir
        self.runc = runc
        self.listener = listener
        self.logger = logger
        self.max_log_line = max_log_line
        self.loop = Loop()
        self.containers: dict[str, Container] = {}
        self.execs: dict[str, ExecSession] = {}
        self.pids: dict[int, Container | ExecSession] = {}
        self.subscribers: list[Connection] = []
        self.serial = 0
        self.shutting_down = False
        self.running = True
        self.wakeup_reader, self.wakeup_writer = socket.socketpair()
        self.oom_inotify = -1  # made with the first watch
        self.oom_watches: dict[int, Container] = {}

    # ---- lifecycle ----------------------------------------------------------------

    def run(self) -> None:
        for sock in (self.wakeup_reader, self.wakeup_writer, self.listener):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_writer.fileno(), warn_on_full_buffer=False)
        # Handlers only need to exist: set_wakeup_fd wakes the loop, which reaps.
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            set_signal_handler(signum, _ignore_signal)
        self.loop.watch(self.wakeup_reader.fileno(), self._on_signal, None)
        self.loop.watch(self.listener.fileno(), self._on_accept, None)
        self.logger.log("info", f"shim for pod {self.pod_id} serving in {self.state_dir}")
        self.reap()
        while self.running:
            self.loop.run_once(None)
        self.logger.log("info", "shim exiting")

    def _on_signal(self) -> None:
        try:
            received = self.wakeup_reader.recv(512)
        except BlockingIOError:
            received = b""
        if signal.SIGTERM in received or signal.SIGINT in received:
            self.shutting_down = True
        self.reap()
        self.maybe_exit()

    def _on_accept(self) -> None:
        try:
            sock = accept(self.listener)
        except (BlockingIOError, ConnectionAbortedError):
            return
        Connection(self, sock)

    def maybe_exit(self) -> None:
        # A container made at start that never started holds nothing: no reason to stay.
        if self.shutting_down and all(c.status == "exited" or (c.status == "created" and not c.pid)
                                      for c in self.containers.values()):
            for conn in list(self.subscribers):
                conn.flush()
            self.running = False

    def connection_closed(self, conn: Connection) -> None:
        if conn in self.subscribers:
            self.subscribers.remove(conn)
        container = conn.attached
        if container is not None and conn in container.attachers:
            container.attachers.remove(conn)
            if conn.attach_stdin:
                self._stdin_detached(container)

    # ---- requests -----------------------------------------------------------------

    def handle_request(self, conn: Connection, line: bytes) -> None:
        request_id: Any = None
        try:
            request = protocol.decode_message(line)
            request_id = request.get("id")
            if request.get("v") != protocol.PROTOCOL_VERSION:
                raise OpError(f"unsupported protocol version {request.get('v')!r}")
            op = str(request.get("op"))
            handler = OPS.get(op)
            if handler is None:
                raise OpError(f"unknown op {op!r}")
            reply = handler(self, conn, request)
        except (OpError, RuncError, protocol.ProtocolError, OSError, KeyError,
                ValueError, TypeError) as exc:
            conn.send_message({"id": request_id, "ok": False, "error": _describe(exc)})
            return
        except Exception as exc:  # a bug, or input no check foresaw: one failed request
            self.logger.log("error", f"request {request_id!r} failed: {exc!r}")
            conn.send_message({"id": request_id, "ok": False, "error": f"internal: {exc!r}"})
            return
        if reply is not None:
            conn.send_message({"id": request_id, "ok": True, **reply})

    def container_for(self, request: dict[str, Any]) -> Container:
        container_id = str(request["container_id"])
        container = self.containers.get(container_id)
        if container is None:
            raise OpError(f"container {container_id} not found in this shim")
        return container

    def next_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    # ---- exec ---------------------------------------------------------------------

    # ---- attach -------------------------------------------------------------------

    def attach_stdin(self, conn: Connection, data: bytes) -> None:
        container = conn.attached
        if container is None or not conn.attach_stdin:
            return
        if not data:
            conn.attach_stdin = False
            self._stdin_detached(container)
        elif container.stdin is not None:
            container.stdin.write(data)

    def _stdin_detached(self, container: Container) -> None:
        """stdin_once: the first attacher to close its stdin closes the container's."""
        if container.stdin_once and container.stdin is not None:
            if container.tty:
                container.stdin.write(b"\x04")  # EOF for the line discipline
            else:
                container.stdin.close_after_drain()
                container.stdin = None

    # ---- container output ---------------------------------------------------------

    def output_reader(self, container: Container, fd: int) -> Callback:
        return lambda: self._read_output(container, fd)

    def _read_output(self, container: Container, fd: int, drain: bool = False) -> None:
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: the pty's other side is gone
                    self.logger.log("warning", f"read {container.id}: {exc}")
                data = b""
            if not data:
                self._output_closed(container, fd)
                return
            self._deliver(container, fd, data)
            if not drain:
                return

    def _deliver(self, container: Container, fd: int, data: bytes) -> None:
        stream = container.outputs[fd]
        if container.log is not None:
            records = container.splitters[fd].feed(data)
            self._write_log(container, stream, records)
        frame = protocol.encode_frame(stream, data)
        for conn in list(container.attachers):
            conn.send(frame)

    def _write_log(self, container: Container, stream: int,
                   records: list[tuple[bytes, bytes]]) -> None:
        if container.log is None:
            return
        try:
            container.log.write_records(STREAM_NAMES[stream], records)
        except OSError as exc:
            self.logger.log("warning", f"log write {container.id}: {exc}")

    def _output_closed(self, container: Container, fd: int) -> None:
        stream = container.outputs.pop(fd)
        self._write_log(container, stream, container.splitters.pop(fd).finish())
        self.loop.forget(fd)
        os.close(fd)
        if fd == container.pty_master:
            container.pty_master = -1
        for conn in list(container.attachers):
            conn.send(protocol.encode_frame(stream, b""))

    # ---- exits --------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            exit_code = 128 - code if code < 0 else code
            owner = self.pids.pop(pid, None)
            if isinstance(owner, Container):
                self.container_exited(owner, exit_code)
            elif isinstance(owner, ExecSession):
                self._exec_exited(owner, exit_code)
            else:
                self.logger.log("debug", f"reaped unknown pid {pid} ({exit_code})")

    def container_exited(self, container: Container, exit_code: int) -> None:
        if container.kill_all_on_exit and not container.all_killed:
            self._kill_leftovers(container)
        # Whatever the container wrote before it died belongs in its log before the exit.
        for fd in list(container.outputs):
            self._read_output(container, fd, drain=True)
        for fd in list(container.outputs):
            self._output_closed(container, fd)
        if container.stdin is not None:
            container.stdin.close()
            container.stdin = None
        container.status = "exited"
        container.exit_code = exit_code
        container.exited_at = protocol.rfc3339nano()
        self._on_oom_event()  # a kill notified but not handled yet is read first
        self._unwatch_oom(container)
        kills = max(read_oom_kills(container.oom_control), container.oom_kills_seen)
        container.oom_killed = (kills > container.oom_kills_at_create
                                or _killed_in_a_removed_scope(container, exit_code))
        try:
            _write_exit_file(container.exit_file, container.view())
        except OSError as exc:
            self.logger.log("error", f"exit file {container.exit_file}: {exc}")
        if container.log is not None:
            container.log.close()
        self.logger.log("info", f"container {container.id} exited {exit_code}")
        view = container.view()
        self._publish({"event": "exit", **view})
        for conn, request_id in container.waiters:
            conn.send_message({"id": request_id, "ok": True, **view})
        container.waiters.clear()
        for conn in list(container.attachers):
            conn.close_after_flush()
        self.maybe_exit()

    def watch_oom(self, container: Container) -> None:
        """cgroup v2 notifies a change of memory.events (inotify IN_MODIFY) when the kernel
        OOM-kills in the cgroup: the count is read then, while the cgroup exists. At exit it
        may be gone already: systemd removes an emptied scope's cgroup on its own."""
        path = container.oom_control
        if path is None or not path.endswith("memory.events"):
            return  # v1's memory.oom_control notifies nothing; its cgroup stays until delete
        libc = load_libc()
        if self.oom_inotify < 0:
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                self.logger.log("warning", f"inotify_init1: {os.strerror(_errno_of_ctypes())}")
                return
            self.oom_inotify = fd
            self.loop.watch(fd, self._on_oom_event, None)
        wd = libc.inotify_add_watch(self.oom_inotify, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            self.logger.log("warning", f"watching {path}: {os.strerror(_errno_of_ctypes())}")
            return
        container.oom_watch = wd
        self.oom_watches[wd] = container

    def _unwatch_oom(self, container: Container) -> None:
        if container.oom_watch >= 0:
            self.oom_watches.pop(container.oom_watch, None)
            load_libc().inotify_rm_watch(self.oom_inotify, container.oom_watch)
            container.oom_watch = -1

    def _on_oom_event(self) -> None:
        if self.oom_inotify < 0:
            return
        while True:
            try:
                data = os.read(self.oom_inotify, 4096)
            except BlockingIOError:
                return
            offset = 0
            while offset + INOTIFY_EVENT.size <= len(data):
                wd, _mask, _cookie, name_len = INOTIFY_EVENT.unpack_from(data, offset)
                offset += INOTIFY_EVENT.size + name_len
                container = self.oom_watches.get(wd)
                if container is not None:
                    kills = read_oom_kills(container.oom_control)
                    container.oom_kills_seen = max(container.oom_kills_seen, kills)

    def _kill_leftovers(self, container: Container) -> None:
        """A container sharing a PID namespace does not take its other processes down with
        its init, as a PID namespace's init would: kill them, as containerd does, so that
        an exited container runs nothing."""
        try:
            self.runc.kill(container.id, "KILL", all=True)
        except RuncError as exc:
            self.logger.log("warning", f"killing what {container.id} left: {exc}")

    def _exec_exited(self, session: ExecSession, exit_code: int) -> None:
        session.exit_code = exit_code
        session.exited_at = protocol.rfc3339nano()
        view = session.view()
        self._publish({"event": "exit", **view})
        for conn, request_id in session.waiters:
            conn.send_message({"id": request_id, "ok": True, **view})
        session.waiters.clear()
        ops_exec.answer_kill_waiters(self, session)

    def _publish(self, event: dict[str, Any]) -> None:
        for conn in list(self.subscribers):
            conn.send_message(event)


def accept(listener: socket.socket) -> socket.socket:
    """listener.accept() without its Python layer, which turns the family and type into
    enum members (enum code that would run in every zygote-forked shim, and in the zygote
    at each spawn: ~50 KiB of USS per shim). The new socket is blocking, as accept()
    makes it for a listener without a timeout."""
    accept_fd: Callable[[], tuple[int, object]] = getattr(listener, "_accept")  # noqa: B009
    fd, _address = accept_fd()
    return socket.socket(fileno=fd)


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def set_signal_handler(signum: int, handler: Callable[[int, object], None]) -> None:
    """signal.signal without its Python wrapper, whose enum conversions raise and catch
    exceptions (the handler is no int, the previous one no Handlers member): all that
    would run in every zygote-forked shim. Measured: 60 KiB of USS per shim."""
    _signal.signal(signum, handler)


def ignore_signal(signum: int) -> None:
    """SIG_IGN for `signum`, through _signal as set_signal_handler (which names why)."""
    _signal.signal(signum, _signal.SIG_IGN)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc) or type(exc).__name__


def _write_exit_file(path: str, view: dict[str, Any]) -> None:
    record = {"exit_code": view["exit_code"], "exited_at": view["exited_at"],
              "oom_killed": view["oom_killed"], "pid": view["pid"]}
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


_libc: Any = None
IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


def load_libc() -> Any:
    """libc through ctypes, loaded once: the zygote calls this (and looks up prctl) before
    it forks, so a shim finds the CDLL and the function pointer made (ctypes builds both in
    Python code that would otherwise run, and allocate, in every shim)."""
    global _libc
    if _libc is None:
        import ctypes  # only here: ctypes is heavy and only shim processes need it

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def load_prctl() -> Any:
    return load_libc().prctl


def set_child_subreaper(process_name: bytes = b"flatpod-shim") -> None:
    """Become the subreaper of every descendant; also name the process (comm), since a
    zygote-forked shim's cmdline is the zygote's."""
    prctl = load_prctl()
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(_errno_of_ctypes(), "prctl(PR_SET_CHILD_SUBREAPER)")
    prctl(PR_SET_NAME, process_name[:15], 0, 0, 0)


def _errno_of_ctypes() -> int:
    import ctypes

    return ctypes.get_errno()


def _killed_in_a_removed_scope(container: Container, exit_code: int) -> bool:
    """A SIGKILLed container whose scope systemd already removed (its count gone with it),
    while the parent's count of OOM kills went up: the kernel counts a kill before it sends
    the signal, so the parent's count is up by the time the exit is seen."""
    at_create = container.oom_parent_kills_at_create
    if at_create is None or exit_code != 128 + signal.SIGKILL:
        return False
    if read_oom_kills_if_present(container.oom_control) is not None:
        return False  # the scope is still there: its own count was the answer
    now = read_oom_kills_if_present(parent_oom_events(container.oom_control))
    return now is not None and now > at_create
