"""asyncio client for a pod shim, for the flatpod daemon.

Every call opens its own connection to shim.sock, so concurrent calls on one client
are independent (no request multiplexing, no shared lock). Long-lived streams
(`events`, `attach`) hold their own connection too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shim import protocol

SOCKET_NAME = "shim.sock"
DEFAULT_TIMEOUT = 10.0
CREATE_TIMEOUT = 60.0
STREAM_LIMIT = protocol.MAX_LINE
REPLY_READ_BYTES = 65536
MAX_EXEC_SYNC_OUTPUT = 16 << 20
# How long ExecSync's timeout waits for the killed process tree to be dead; only processes
# stuck in the kernel (uninterruptible sleep) take longer than a moment.
EXEC_KILL_WAIT = 10.0


class ShimError(Exception):
    """A shim call failed: the shim said no (this class), or one of the kinds below."""

    def __init__(self, op: str, message: str) -> None:
        self.op = op
        super().__init__(f"shim {op}: {message}")


class ShimTimeout(ShimError):
    """No answer within the call's deadline (for `wait`: the process is still running)."""


class ShimGone(ShimError):
    """The shim cannot be reached, or it closed the connection without answering."""


class ZygoteUnavailable(ShimError):
    """The zygote cannot be reached or does not answer (a new one may be started)."""


ProcessStatus = Literal["created", "running", "exited"]
_STATUSES: dict[str, ProcessStatus] = {"created": "created", "running": "running",
                                       "exited": "exited"}


@dataclass(frozen=True)
class ProcessState:
    """A container's (or an exec's) process, as the shim reports it: state, wait, start,
    signal, its exit event, and its exit file."""

    status: ProcessStatus
    exit_code: int = 0
    exited_at: str | None = None  # RFC 3339, when it exited
    oom_killed: bool = False
    pid: int = 0
    container_id: str = ""
    exec_id: str = ""

    @property
    def exited(self) -> bool:
        return self.status == "exited"

    @classmethod
    def from_message(cls, op: str, message: Mapping[str, Any]) -> ProcessState:
        status = _STATUSES.get(str(message.get("status")))
        if status is None:
            raise ShimError(op, f"unknown process status {message.get('status')!r}")
        exited_at = message.get("exited_at")
        return cls(
            status=status,
            exit_code=int(message.get("exit_code") or 0),
            exited_at=str(exited_at) if exited_at else None,
            oom_killed=bool(message.get("oom_killed")),
            pid=int(message.get("pid") or 0),
            container_id=str(message.get("container_id") or ""),
            exec_id=str(message.get("exec_id") or ""),
        )


@dataclass(frozen=True)
class ShimState:
    """The whole shim: its own pid and its containers."""

    pid: int
    pod_id: str
    containers: list[ProcessState]

    def of(self, container_id: str) -> ProcessState | None:
        """The process of one container (or of the pause: the pod id); None when the shim
        holds no such container, as `state` with that id would answer an error."""
        return next((c for c in self.containers if c.container_id == container_id), None)


@dataclass
class Subscription:
    """An open event stream of a shim: exits from the moment the shim answered the
    subscribe on, until the stream is read (ShimClient.events) or closed."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class ExecHandle:
    """A started exec: the caller owns these fds (close them). For a tty exec `pty` is
    the master; resize it directly with `resize_fd`."""

    exec_id: str
    pid: int
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    pty: int | None = None

    def close(self) -> None:
        for name in ("stdin", "stdout", "stderr", "pty"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


@dataclass
class ExecSyncResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    # With timed_out: False when some process of the killed tree was not dead yet after
    # EXEC_KILL_WAIT (the shim is still waiting for it).
    tree_gone: bool = True


@dataclass
class AttachStream:
    """The container's output from attach onward; stdin if the container has one."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tty: bool
    has_stdin: bool
    _closed: bool = field(default=False)

    async def read(self) -> tuple[int, bytes] | None:
        """Next (stream id, data); data b"" is that stream's EOF; None when the
        connection ends (the container exited or the shim went away)."""
        try:
            header = await self.reader.readexactly(protocol.FRAME_HEADER.size)
            stream, length = protocol.FRAME_HEADER.unpack(header)
            data = await self.reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return stream, data

    async def write_stdin(self, data: bytes) -> None:
        for start in range(0, len(data), protocol.MAX_FRAME):
            chunk = data[start:start + protocol.MAX_FRAME]
            self.writer.write(protocol.encode_frame(protocol.STREAM_STDIN, chunk))
        await self.writer.drain()

    async def close_stdin(self) -> None:
        self.writer.write(protocol.encode_frame(protocol.STREAM_STDIN, b""))
        await self.writer.drain()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


class ShimClient:
    def __init__(self, shim_dir: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.shim_dir = shim_dir
        self.socket_path = os.path.join(shim_dir, SOCKET_NAME)
        self.timeout = timeout
        self._serial = 0

    def _request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self._serial += 1
        return {"v": protocol.PROTOCOL_VERSION, "op": op, "id": self._serial, **args}

    async def _open(self, op: str, timeout: float
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancellation that comes as
        # the connection is made, and a follower cancelled then would read events for ever.
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.open_unix_connection(self.socket_path, limit=STREAM_LIMIT)
        except TimeoutError as exc:
            raise ShimTimeout(op, f"cannot connect to {self.socket_path}: {exc!r}") from exc
        except OSError as exc:
            raise ShimGone(op, f"cannot connect to {self.socket_path}: {exc!r}") from exc

    async def _exchange(self, op: str, args: dict[str, Any], timeout: float,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> dict[str, Any]:
        try:
            writer.write(protocol.encode_message(self._request(op, args)))
            await writer.drain()
            async with asyncio.timeout(timeout):  # see _open: not wait_for
                line = await reader.readline()
        except TimeoutError as exc:
            raise ShimTimeout(op, f"no reply within {timeout}s") from exc
        except OSError as exc:
            raise ShimGone(op, repr(exc)) from exc
        except ValueError as exc:
            raise ShimError(op, repr(exc)) from exc
        return _check_reply(op, line)

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """One request on a fresh connection.

        A plain non-blocking socket and the loop's sock_* calls, not asyncio streams: a
        stream reader, writer, transport and protocol per call, closed with a wait, and a
        task for wait_for, were about a fifth of the event loop's time under pod churn
        (py-spy), and every lifecycle step makes a few of these calls."""
        limit = timeout if timeout is not None else self.timeout
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(limit):
                    await loop.sock_connect(sock, self.socket_path)
            except TimeoutError as exc:
                raise ShimTimeout(op, f"cannot connect to {self.socket_path}: {exc!r}") from exc
            except OSError as exc:
                raise ShimGone(op, f"cannot connect to {self.socket_path}: {exc!r}") from exc
            try:
                async with asyncio.timeout(limit):
                    await loop.sock_sendall(sock, protocol.encode_message(self._request(op, args)))
                    line = await _receive_line(loop, sock, op)
            except TimeoutError as exc:
                raise ShimTimeout(op, f"no reply within {limit}s") from exc
            except OSError as exc:
                raise ShimGone(op, repr(exc)) from exc
            return _check_reply(op, line)
        finally:
            sock.close()

    async def create(self, container_id: str, bundle: str, *, stdin: bool = False,
                     stdin_once: bool = False, tty: bool = False, log_path: str | None = None,
                     log_root: str | None = None, exit_file: str | None = None,
                     oom_file: str | None = None, systemd_cgroup: bool = False,
                     restore: dict[str, str] | None = None, run_at_start: bool = False,
                     timeout: float = CREATE_TIMEOUT) -> int:
        """`log_path` is opened beneath `log_root` (the pod's log directory), following no
        symlink (shim/crilog.py). `oom_file` counts the container's OOM kills (`oom_kill`
        line: memory.events, or v1's memory.oom_control); `systemd_cgroup`: runc makes its
        cgroup as a systemd scope. `restore` (image_path, work_path, criu): nothing runs now,
        start restores the container from that checkpoint; the pid is then 0 until start.
        `run_at_start`: nothing runs now either, start makes and starts it with one `runc
        run --detach` (pid 0 until then); a shim from before this option runs `runc create`
        now (pid set) and `runc start` at start."""
        reply = await self.call("create", timeout, container_id=container_id, bundle=bundle,
                                stdin=stdin, stdin_once=stdin_once, tty=tty,
                                log_path=log_path, log_root=log_root, exit_file=exit_file,
                                oom_file=oom_file, systemd_cgroup=systemd_cgroup,
                                restore=restore, run_at_start=run_at_start)
        return int(reply["pid"])

    async def run(self, container_id: str, bundle: str, *, exit_file: str | None = None,
                  oom_file: str | None = None, systemd_cgroup: bool = False,
                  timeout: float = CREATE_TIMEOUT) -> int:
        """create, then start, in one call and one runc process (`runc run --detach`): for a
        process nothing needs to reach between the two (a pod's pause). A shim from before
        this call only creates it (its reply has no status), so it is then started here."""
        reply = await self.call("create", timeout, container_id=container_id, bundle=bundle,
                                exit_file=exit_file, oom_file=oom_file,
                                systemd_cgroup=systemd_cgroup, start=True)
        if reply.get("status") != "running":
            await self.start(container_id, timeout)
        return int(reply["pid"])

    async def _process(self, op: str, timeout: float | None = None, **args: Any
                       ) -> ProcessState:
        return ProcessState.from_message(op, await self.call(op, timeout, **args))

    async def start(self, container_id: str, timeout: float = CREATE_TIMEOUT) -> ProcessState:
        return await self._process("start", timeout, container_id=container_id)

    async def signal(self, container_id: str, signal: int | str, all: bool = False
                     ) -> ProcessState:
        return await self._process("signal", container_id=container_id, signal=signal, all=all)

    async def state(self, container_id: str) -> ProcessState:
        """One container's process."""
        return await self._process("state", container_id=container_id)

    async def shim_state(self) -> ShimState:
        """The whole shim's view."""
        reply = await self.call("state")
        return ShimState(
            pid=int(reply.get("pid") or 0), pod_id=str(reply.get("pod_id") or ""),
            containers=[ProcessState.from_message("state", c) for c in reply.get("containers", [])],
        )

    async def wait(self, container_id: str, timeout: float) -> ProcessState:
        """The process once it has exited; ShimTimeout when it runs past `timeout`."""
        return await self._process("wait", timeout, container_id=container_id)

    async def reopen_log(self, container_id: str) -> None:
        await self.call("reopen_log", container_id=container_id)

    async def resize(self, container_id: str, width: int, height: int) -> None:
        await self.call("resize", container_id=container_id, width=width, height=height)

    async def exec(self, container_id: str, process: dict[str, Any], *, tty: bool = False,
                   stdin: bool = False, exec_id: str | None = None,
                   timeout: float = CREATE_TIMEOUT) -> ExecHandle:
        request = self._request("exec", {"container_id": container_id, "process": process,
                                         "tty": tty, "stdin": stdin, "exec_id": exec_id})
        reply, fds = await asyncio.to_thread(self._exec_blocking, request, timeout)
        names = [str(name) for name in reply.get("fds", [])]
        if len(names) != len(fds):
            for fd in fds:
                os.close(fd)
            raise ShimError("exec", f"expected fds {names}, got {len(fds)}")
        handle = ExecHandle(exec_id=str(reply["exec_id"]), pid=int(reply["pid"]))
        for name, fd in zip(names, fds, strict=True):
            setattr(handle, name, fd)
        return handle

    def _exec_blocking(self, request: dict[str, Any], timeout: float
                       ) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        buffer = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(self.socket_path)
                sock.sendall(protocol.encode_message(request))
                while b"\n" not in buffer:
                    data, received = protocol.receive_fds(sock)
                    fds.extend(received)
                    if not data:
                        break
                    buffer += data
            reply = _check_reply("exec", buffer.split(b"\n", 1)[0])
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            if isinstance(exc, TimeoutError):
                raise ShimTimeout("exec", repr(exc)) from exc
            if isinstance(exc, OSError):
                raise ShimGone("exec", repr(exc)) from exc
            raise
        return reply, fds

    async def exec_state(self, exec_id: str) -> ProcessState:
        return await self._process("exec_state", exec_id=exec_id)

    async def exec_wait(self, exec_id: str, timeout: float) -> ProcessState:
        return await self._process("exec_wait", timeout, exec_id=exec_id)

    async def exec_kill(self, exec_id: str, wait: bool = False) -> ProcessState:
        """SIGKILL the exec's process tree; with `wait`, answer once all of it is dead."""
        return await self._process("exec_kill", EXEC_KILL_WAIT if wait else None,
                                   exec_id=exec_id, wait=wait)

    async def exec_sync(self, container_id: str, process: dict[str, Any],
                        timeout: float | None) -> ExecSyncResult:
        """ExecSync: run, collect stdout/stderr to EOF and the exit code. On timeout the
        exec's process tree is killed and, once all of it is dead (at most EXEC_KILL_WAIT),
        the result says timed_out (exit code 137)."""
        handle = await self.exec(container_id, process)
        assert handle.stdout is not None and handle.stderr is not None
        work = asyncio.gather(read_to_eof(handle.stdout), read_to_eof(handle.stderr),
                              self.exec_wait(handle.exec_id, timeout=sys.float_info.max))
        try:
            stdout, stderr, final = await asyncio.wait_for(work, timeout)
            return ExecSyncResult(final.exit_code, stdout, stderr)
        except TimeoutError:
            try:
                await self.exec_kill(handle.exec_id, wait=True)
            except ShimError:
                return ExecSyncResult(137, b"", b"", timed_out=True, tree_gone=False)
            return ExecSyncResult(137, b"", b"", timed_out=True)
        finally:
            handle.close()

    async def attach(self, container_id: str, stdin: bool = False) -> AttachStream:
        reader, writer = await self._open("attach", self.timeout)
        try:
            reply = await self._exchange("attach", {"container_id": container_id,
                                                    "stdin": stdin},
                                         self.timeout, reader, writer)
        except BaseException:
            writer.close()
            raise
        return AttachStream(reader, writer, tty=bool(reply.get("tty")),
                            has_stdin=bool(reply.get("stdin")))

    async def subscribe(self) -> Subscription:
        """Opens the event stream; exits after this returns reach it. Subscribe, then ask
        state: exits before the subscription are only visible through state."""
        reader, writer = await self._open("subscribe", self.timeout)
        try:
            await self._exchange("subscribe", {}, self.timeout, reader, writer)
        except BaseException:
            writer.close()
            raise
        return Subscription(reader, writer)

    async def events(self, subscription: Subscription | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Event lines ({"event": "exit", ...}) until the shim goes away, from
        `subscription` (else from a new one)."""
        sub = subscription if subscription is not None else await self.subscribe()
        try:
            while True:
                line = await sub.reader.readline()
                if not line:
                    return
                yield protocol.decode_message(line)
        finally:
            sub.writer.close()

    async def shutdown(self) -> None:
        await self.call("shutdown")

    async def close(self) -> None:
        """Nothing persistent is held; kept so callers can treat clients uniformly."""


async def _receive_line(loop: asyncio.AbstractEventLoop, sock: socket.socket, op: str) -> bytes:
    """The reply's line with its newline, or what came before the shim closed (b"": nothing),
    as StreamReader.readline answers; longer than a line may be is a ShimError."""
    buffer = b""
    while True:
        data = await loop.sock_recv(sock, REPLY_READ_BYTES)
        if not data:
            return buffer
        buffer += data
        end = buffer.find(b"\n")
        if end >= 0:
            return buffer[:end + 1]
        if len(buffer) > STREAM_LIMIT:
            raise ShimError(op, f"reply longer than {STREAM_LIMIT} bytes")


def _check_reply(op: str, line: bytes) -> dict[str, Any]:
    if not line:
        raise ShimGone(op, "connection closed without a reply")
    try:
        reply = protocol.decode_message(line)
    except protocol.ProtocolError as exc:
        raise ShimError(op, str(exc)) from exc
    if not reply.get("ok"):
        raise ShimError(op, str(reply.get("error", "unknown error")))
    return reply


async def read_to_eof(fd: int, limit: int = MAX_EXEC_SYNC_OUTPUT) -> bytes:
    """Read a pipe until EOF without blocking the loop; output past limit is dropped."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        nonlocal size
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if not done.done():
                done.set_result(None)
            return
        if size < limit:
            chunks.append(data[: limit - size])
            size += len(chunks[-1])

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def resize_fd(pty_master: int, width: int, height: int) -> None:
    """Resize an exec's terminal: the caller holds its pty master. Raises
    protocol.TerminalSizeError for a size no terminal can have."""
    protocol.check_terminal_size(width, height)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(pty_master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


async def connect(shim_dir: str, timeout: float = DEFAULT_TIMEOUT) -> ShimClient:
    """A client for a running shim (e.g. after flatpod restarted); checks it answers."""
    client = ShimClient(shim_dir, timeout)
    await client.shim_state()
    return client


async def _run_detaching(op: str, argv: list[str], timeout: float) -> None:
    """Run a `python -m ...` that detaches and exits 0 once it listens."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError as exc:
        # It may have exited with a detached child holding the pipe open: nothing to kill.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise ShimTimeout(op, f"{argv[2]} did not detach in {timeout}s") from exc
    if process.returncode != 0:
        raise ShimError(op, f"{argv[2]} exited {process.returncode}: {err.decode().strip()}")


async def start_zygote(socket_path: str, *, python: str = sys.executable,
                       log_path: str = os.devnull, merge_pages: bool = False,
                       timeout: float = DEFAULT_TIMEOUT) -> None:
    """Start a detached shim zygote listening on socket_path (see shim/zygote.py);
    merge_pages offers the memory its shims inherit to KSM (see shim/ksm.py)."""
    argv = [python, "-m", "shim.zygote", "--socket", socket_path, "--log", log_path]
    await _run_detaching("zygote", argv + (["--merge-pages"] if merge_pages else []), timeout)


async def spawn_shim(pod_id: str, shim_dir: str, runc_root: str, *,
                     python: str = sys.executable, runc: str | None = None,
                     runc_args: list[str] | None = None,
                     log_level: str = "info", zygote_socket: str | None = None,
                     timeout: float = DEFAULT_TIMEOUT) -> ShimClient:
    """Start a detached shim and return a client once it listens: forked by the zygote
    at zygote_socket when given, else a fresh `python -m shim`. runc (the OCI runtime's
    binary), runc_root and runc_args (its global options) are the shim's for life."""
    if zygote_socket is not None:
        client, _ = await fork_shim(zygote_socket, pod_id, shim_dir, runc_root, runc=runc,
                                    runc_args=runc_args, log_level=log_level, timeout=timeout)
        return client
    argv = [python, "-m", "shim", "--pod-id", pod_id, "--dir", shim_dir,
            "--runc-root", runc_root, "--log-level", log_level]
    if runc is not None:
        argv += ["--runc", runc]
    # "--runc-arg=--x": an option's value that starts with "-" must be joined to it.
    argv += [f"--runc-arg={arg}" for arg in runc_args or []]
    await _run_detaching("spawn", argv, timeout)
    return await connect(shim_dir, timeout)


async def fork_shim(zygote_socket: str, pod_id: str, shim_dir: str, runc_root: str, *,
                    runc: str | None = None, runc_args: list[str] | None = None,
                    log_level: str = "info", timeout: float = DEFAULT_TIMEOUT
                    ) -> tuple[ShimClient, int]:
    """A shim forked by the zygote at zygote_socket (see spawn_shim), and its pid.

    The zygote answers once the shim's socket listens (it bound it before the fork): the
    first call waits in its backlog until the shim accepts, so no round trip is spent here
    asking whether it answers (or for its pid); a shim that died fails that call."""
    reply = await zygote_call(zygote_socket, "spawn", timeout, pod_id=pod_id, dir=shim_dir,
                              runc_root=runc_root, runc=runc, runc_args=runc_args or [],
                              log_level=log_level)
    return ShimClient(shim_dir, timeout), int(reply["pid"])


async def zygote_call(zygote_socket: str, op: str, timeout: float = DEFAULT_TIMEOUT,
                      **args: Any) -> dict[str, Any]:
    """One request to the zygote: spawn, ping (its pid) or stop."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(zygote_socket), timeout)
    except (OSError, TimeoutError) as exc:
        raise ZygoteUnavailable(op, f"cannot reach zygote {zygote_socket}: {exc!r}") from exc
    try:
        request = {"v": protocol.PROTOCOL_VERSION, "op": op, **args}
        writer.write(protocol.encode_message(request))
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as exc:
        raise ZygoteUnavailable(op, f"zygote: {exc!r}") from exc
    finally:
        writer.close()
    return _check_reply(op, line)
