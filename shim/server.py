"""The per-pod shim: one epoll loop over clients, container stdio and SIGCHLD.

It is the child subreaper of the pause and every container of its pod: runc create /
exec --detach leave their processes re-parented here, so this process reaps them and
records their exits.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; see set_signal_handler
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shim import protocol
from shim.crilog import DEFAULT_MAX_LINE, CriLogFile, LineSplitter
from shim.runc import Runc, RuncError, Stdio, criu_log_errors

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
READ_SIZE = 65536
MAX_CONN_BACKLOG = 4 << 20  # drop an attacher/subscriber that falls this far behind
KEEP_EXITED_EXECS = 256
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
STREAM_NAMES = {protocol.STREAM_STDOUT: b"stdout", protocol.STREAM_STDERR: b"stderr"}
Callback = Callable[[], None]


class OpError(Exception):
    """A request failed; the message goes back to the client."""


@dataclass
class Logger:
    level: int = LOG_LEVELS["info"]

    def log(self, level: str, message: str) -> None:
        # Straight to fd 2 (the shim log): sys.stderr's text and buffer layers would run,
        # and copy zygote pages, in every forked shim. Escaped as sys.stderr would.
        if LOG_LEVELS[level] >= self.level:
            line = f"{protocol.rfc3339nano()} {level} {message}\n"
            os.write(2, line.encode(errors="backslashreplace"))


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
    systemd_cgroup: bool = False  # runc makes its cgroup as a systemd scope
    kill_all_on_exit: bool = False
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
        self._maybe_exit()

    def _on_accept(self) -> None:
        try:
            sock = accept(self.listener)
        except (BlockingIOError, ConnectionAbortedError):
            return
        Connection(self, sock)

    def _maybe_exit(self) -> None:
        if self.shutting_down and all(c.status == "exited" for c in self.containers.values()):
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
            # Interned: the type's attribute cache keys on the name's address, so a new
            # string each time misses, rewrites a random entry, and copies its page.
            handler = getattr(self, sys.intern(f"op_{op}"), None)
            if handler is None:
                raise OpError(f"unknown op {op!r}")
            reply = handler(conn, request)
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

    def _container(self, request: dict[str, Any]) -> Container:
        container_id = str(request["container_id"])
        container = self.containers.get(container_id)
        if container is None:
            raise OpError(f"container {container_id} not found in this shim")
        return container

    def _next_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def op_create(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        container_id = str(request["container_id"])
        if container_id in self.containers:
            raise OpError(f"container {container_id} already exists in this shim")
        if self.shutting_down:
            raise OpError("shim is shutting down")
        bundle = str(request["bundle"])
        tty = bool(request.get("tty"))
        want_stdin = bool(request.get("stdin"))
        log_path = request.get("log_path")
        pid_file = os.path.join(bundle, "init.pid")
        log_root = request.get("log_root")
        log = CriLogFile(str(log_path), str(log_root) if log_root else None) if log_path else None
        oom_file = request.get("oom_file")
        oom_control = str(oom_file) if oom_file else None
        container = Container(
            id=container_id, bundle=bundle, pid=0, tty=tty,
            stdin_once=bool(request.get("stdin_once")),
            exit_file=str(request.get("exit_file") or os.path.join(bundle, "exit")),
            log=log, stdin=None, oom_control=oom_control,
            systemd_cgroup=bool(request.get("systemd_cgroup")),
            kill_all_on_exit=not _owns_pid_namespace(bundle), want_stdin=want_stdin,
            restore=Restore.from_request(request.get("restore")))
        if container.restore is not None:
            if tty:
                raise OpError("a container with a terminal cannot be restored from a checkpoint")
            # Nothing runs until start restores it: runc restore makes the container.
            self.containers[container_id] = container
            self.logger.log("info", f"created {container_id} to restore at start")
            return {"pid": 0}
        self._run_container(container, pid_file)
        return {"pid": container.pid}

    def _run_container(self, container: Container, pid_file: str) -> None:
        """runc create (or restore) with the container's stdio; then it is watched."""
        try:
            if container.tty:
                self._create_with_pty(container, pid_file)
            else:
                self._create_with_pipes(container, pid_file, container.want_stdin)
            container.pid = _read_pid(pid_file)
        except BaseException:
            self._release_stdio(container)
            if container.log:
                container.log.close()
            raise
        container.oom_kills_at_create = _read_oom_kills(container.oom_control)
        container.oom_kills_seen = container.oom_kills_at_create
        self._watch_oom(container)
        self.containers[container.id] = container
        self.pids[container.pid] = container
        for fd in container.outputs:
            self.loop.watch(fd, self._output_reader(container, fd), None)
        self.logger.log("info", f"created {container.id} pid {container.pid}")

    def _create_with_pipes(self, container: Container, pid_file: str, want_stdin: bool) -> None:
        child_fds: list[int] = []
        try:
            stdin_read = -1
            if want_stdin:
                stdin_read, stdin_write = os.pipe()
                child_fds.append(stdin_read)
                container.stdin = FdWriter(self.loop, stdin_write)
            out_read, out_write = os.pipe()
            container.outputs[out_read] = protocol.STREAM_STDOUT
            child_fds.append(out_write)
            err_read, err_write = os.pipe()
            container.outputs[err_read] = protocol.STREAM_STDERR
            child_fds.append(err_write)
            stdio = Stdio(stdin_read, out_write, err_write)
            restore = container.restore
            if restore is None:
                self.runc.create(container.id, container.bundle, pid_file, stdio=stdio,
                                 systemd_cgroup=container.systemd_cgroup)
            else:
                self.runc.restore(container.id, container.bundle, restore.image_path,
                                  restore.work_path, pid_file, criu=restore.criu, stdio=stdio,
                                  systemd_cgroup=container.systemd_cgroup)
        finally:
            for fd in child_fds:
                os.close(fd)
        for fd in container.outputs:
            os.set_blocking(fd, False)
            container.splitters[fd] = LineSplitter(self.max_log_line)

    def _create_with_pty(self, container: Container, pid_file: str) -> None:
        socket_path = os.path.join(self.state_dir, self._next_name("c") + ".sock")
        with ConsoleListener(socket_path) as listener:
            self.runc.create(container.id, container.bundle, pid_file,
                             console_socket=socket_path, systemd_cgroup=container.systemd_cgroup)
            master = _receive_console(listener)
        container.pty_master = master
        os.set_blocking(master, False)
        container.outputs[master] = protocol.STREAM_STDOUT
        container.splitters[master] = LineSplitter(self.max_log_line)
        container.stdin = FdWriter(self.loop, os.dup(master))

    def _release_stdio(self, container: Container) -> None:
        for fd in list(container.outputs):
            self.loop.forget(fd)
            os.close(fd)
        container.outputs.clear()
        if container.stdin is not None:
            container.stdin.close()

    def op_start(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        container = self._container(request)
        if container.restore is not None and container.status == "created":
            # Restored, not started: the process continues where its checkpoint left it.
            restore = container.restore
            try:
                self._run_container(container, os.path.join(container.bundle, "init.pid"))
            except RuncError as exc:
                criu_says = criu_log_errors(os.path.join(restore.work_path, "restore.log"))
                raise OpError(f"{exc}; CRIU: {criu_says}" if criu_says else str(exc)) from exc
            container.restore = None
            container.status = "running"
            return container.view()
        self.runc.start(container.id)
        if container.status == "created":
            container.status = "running"
        return container.view()

    def op_signal(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        container = self._container(request)
        if container.restore is not None and container.status != "exited":
            # Never restored: no process, so a kill (a stop, a remove) ends it at once.
            container.restore = None
            self._container_exited(container, 128 + int(signal.SIGKILL))
            return container.view()
        if container.status != "exited":
            self.runc.kill(container.id, request.get("signal", "TERM"),
                           all=bool(request.get("all")))
        return container.view()

    def op_state(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        if "container_id" in request:
            return self._container(request).view()
        return {"pod_id": self.pod_id, "pid": os.getpid(),
                "containers": [c.view() for c in self.containers.values()]}

    def op_wait(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
        container = self._container(request)
        if container.status == "exited":
            return container.view()
        container.waiters.append((conn, request.get("id")))
        return None

    def op_reopen_log(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        container = self._container(request)
        if container.log is None:
            raise OpError(f"container {container.id} has no log file")
        container.log.reopen()
        return {}

    def op_subscribe(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        conn.mode = "events"
        self.subscribers.append(conn)
        return {}

    def op_shutdown(self, conn: Connection, request: dict[str, Any]) -> None:
        self.shutting_down = True
        conn.send_message({"id": request.get("id"), "ok": True})
        self._maybe_exit()
        return None

    def op_resize(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        container = self._container(request)
        if container.pty_master < 0:
            raise OpError(f"container {container.id} has no terminal")
        # A size from a client: checked here too, so no request can make struct.pack
        # raise something the request loop does not turn into an error reply.
        width, height = request.get("width"), request.get("height")
        protocol.check_terminal_size(width, height)
        size = struct.pack("HHHH", height, width, 0, 0)
        fcntl.ioctl(container.pty_master, termios.TIOCSWINSZ, size)
        return {}

    # ---- exec ---------------------------------------------------------------------

    def op_exec(self, conn: Connection, request: dict[str, Any]) -> None:
        container = self._container(request)
        if container.status != "running":
            raise OpError(f"container {container.id} is {container.status}, not running")
        tty = bool(request.get("tty"))
        process = dict(request["process"])
        process["terminal"] = tty
        exec_id = str(request.get("exec_id") or self._next_name(f"{os.getpid()}-exec"))
        if exec_id in self.execs:
            raise OpError(f"exec {exec_id} already exists")
        name = self._next_name("e")
        process_path = os.path.join(self.state_dir, name + ".json")
        pid_file = os.path.join(self.state_dir, name + ".pid")
        with open(process_path, "w", encoding="utf-8") as process_file:
            json.dump(process, process_file)
        try:
            if tty:
                caller_fds, names = self._exec_with_pty(container, process_path, pid_file)
            else:
                caller_fds, names = self._exec_with_pipes(
                    container, process_path, pid_file, bool(request.get("stdin")))
            pid = _read_pid(pid_file)
        finally:
            for path in (process_path, pid_file):
                _unlink_quietly(path)
        session = ExecSession(id=exec_id, container_id=container.id, pid=pid)
        self.execs[exec_id] = session
        self.pids[pid] = session
        reply = {"v": protocol.PROTOCOL_VERSION, "id": request.get("id"), "ok": True,
                 "exec_id": exec_id, "pid": pid, "fds": names}
        try:
            conn.flush()
            conn.sock.setblocking(True)
            protocol.send_with_fds(conn.sock, protocol.encode_message(reply), caller_fds)
            conn.sock.setblocking(False)
        except OSError:
            conn.close()
        finally:
            for fd in caller_fds:
                os.close(fd)
        self._forget_old_execs()

    def _exec_with_pipes(self, container: Container, process_path: str, pid_file: str,
                         want_stdin: bool) -> tuple[list[int], list[str]]:
        child_fds: list[int] = []
        caller_fds: list[int] = []
        names: list[str] = []
        try:
            stdin_read = -1
            if want_stdin:
                stdin_read, stdin_write = os.pipe()
                child_fds.append(stdin_read)
                caller_fds.append(stdin_write)
                names.append("stdin")
            out_read, out_write = os.pipe()
            caller_fds.append(out_read)
            child_fds.append(out_write)
            names.append("stdout")
            err_read, err_write = os.pipe()
            caller_fds.append(err_read)
            child_fds.append(err_write)
            names.append("stderr")
            self.runc.exec(container.id, process_path, pid_file,
                           stdio=Stdio(stdin_read, out_write, err_write))
        except BaseException:
            for fd in caller_fds:
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        return caller_fds, names

    def _exec_with_pty(self, container: Container, process_path: str,
                       pid_file: str) -> tuple[list[int], list[str]]:
        socket_path = os.path.join(self.state_dir, self._next_name("c") + ".sock")
        with ConsoleListener(socket_path) as listener:
            self.runc.exec(container.id, process_path, pid_file, console_socket=socket_path)
            master = _receive_console(listener)
        return [master], ["pty"]

    def _forget_old_execs(self) -> None:
        exited = [s.id for s in self.execs.values() if s.exit_code is not None]
        for exec_id in exited[: max(0, len(exited) - KEEP_EXITED_EXECS)]:
            del self.execs[exec_id]

    def _exec(self, request: dict[str, Any]) -> ExecSession:
        exec_id = str(request["exec_id"])
        session = self.execs.get(exec_id)
        if session is None:
            raise OpError(f"exec {exec_id} not found")
        return session

    def op_exec_state(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
        return self._exec(request).view()

    def op_exec_wait(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
        session = self._exec(request)
        if session.exit_code is not None:
            return session.view()
        session.waiters.append((conn, request.get("id")))
        return None

    def op_exec_kill(self, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
        """SIGKILL the exec's process tree. With "wait", the answer comes only once every
        process of the tree is dead and the exec's own process is reaped (ExecSync's timeout
        must not answer while the command still runs)."""
        session = self._exec(request)
        pidfds = kill_tree(session.pid) if session.exit_code is None else []
        if not request.get("wait"):
            for pidfd in pidfds:
                os.close(pidfd)
            return session.view()
        for pidfd in pidfds:
            session.dying.add(pidfd)
            self.loop.watch(pidfd, self._dead_reader(session, pidfd), None)
        session.kill_waiters.append((conn, request.get("id")))
        self._answer_kill_waiters(session)
        return None

    def _dead_reader(self, session: ExecSession, pidfd: int) -> Callback:
        return lambda: self._tree_member_died(session, pidfd)

    def _tree_member_died(self, session: ExecSession, pidfd: int) -> None:
        self.loop.forget(pidfd)
        os.close(pidfd)
        session.dying.discard(pidfd)
        self._answer_kill_waiters(session)

    def _answer_kill_waiters(self, session: ExecSession) -> None:
        if session.dying or session.exit_code is None:
            return
        view = session.view()
        for conn, request_id in session.kill_waiters:
            conn.send_message({"id": request_id, "ok": True, **view})
        session.kill_waiters.clear()

    # ---- attach -------------------------------------------------------------------

    def op_attach(self, conn: Connection, request: dict[str, Any]) -> None:
        container = self._container(request)
        if container.status == "exited":
            raise OpError(f"container {container.id} has exited")
        conn.send_message({"id": request.get("id"), "ok": True, "tty": container.tty,
                           "stdin": container.stdin is not None})
        conn.mode = "attach"
        conn.attached = container
        conn.attach_stdin = bool(request.get("stdin")) and container.stdin is not None
        container.attachers.append(conn)

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

    def _output_reader(self, container: Container, fd: int) -> Callback:
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
                self._container_exited(owner, exit_code)
            elif isinstance(owner, ExecSession):
                self._exec_exited(owner, exit_code)
            else:
                self.logger.log("debug", f"reaped unknown pid {pid} ({exit_code})")

    def _container_exited(self, container: Container, exit_code: int) -> None:
        if container.kill_all_on_exit:
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
        kills = max(_read_oom_kills(container.oom_control), container.oom_kills_seen)
        container.oom_killed = kills > container.oom_kills_at_create
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
        self._maybe_exit()

    def _watch_oom(self, container: Container) -> None:
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
                    kills = _read_oom_kills(container.oom_control)
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
        self._answer_kill_waiters(session)

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc) or type(exc).__name__


def _read_pid(pid_file: str) -> int:
    # Files are read as bytes throughout: text mode would import and run the ascii codec
    # in the forked shim, a few private pages for nothing.
    with open(pid_file, "rb") as file:
        return int(file.read().strip())


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ConsoleListener:
    """A listening unix socket for runc's --console-socket; removed on exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def __enter__(self) -> socket.socket:
        _unlink_quietly(self.path)
        self.sock.bind(self.path)
        self.sock.listen(1)
        return self.sock

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()
        _unlink_quietly(self.path)


def _receive_console(listener: socket.socket, timeout: float = 10.0) -> int:
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


def _owns_pid_namespace(bundle: str) -> bool:
    """Whether config.json gives the container a PID namespace of its own (not the pod's, a
    target's by path, or the host's)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as file:
            namespaces = json.loads(file.read()).get("linux", {}).get("namespaces", [])
    except (OSError, ValueError):
        return True
    return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def _read_oom_kills(path: str | None) -> int:
    if path is None:
        return 0
    try:
        with open(path, "rb") as file:
            for line in file:
                name, _, value = line.partition(b" ")
                if name == b"oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


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


def children_of(pid: int) -> list[int]:
    """pid's children, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as file:
                found.extend(int(child) for child in file.read().split())
        except (OSError, ValueError):
            continue
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL pid and all its descendants; returns a pidfd of each (the caller closes them),
    readable once that process is dead. Everything is SIGSTOPped while the tree is walked
    (so nothing forks behind our back and orphans are not re-parented away before we see
    them), then the whole set is killed. Signals go through the pidfds, so a pid that dies
    and is reused meanwhile is never signalled."""
    pidfds: dict[int, int] = {}
    frontier = [pid]
    try:
        while frontier:
            for member in frontier:
                _stop(pidfds, member)
            frontier = [c for m in frontier for c in children_of(m) if c not in pidfds]
        # A fork racing the SIGSTOP shows up only now.
        for child in [c for m in list(pidfds) for c in children_of(m) if c not in pidfds]:
            _stop(pidfds, child)
        for pidfd in pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except BaseException:
        for pidfd in pidfds.values():
            os.close(pidfd)
        raise
    return list(pidfds.values())


def _stop(pidfds: dict[int, int], pid: int) -> None:
    """Opens a pidfd for pid (kept in pidfds) and SIGSTOPs it; nothing if it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    pidfds[pid] = pidfd
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)


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
