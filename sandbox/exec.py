"""Exec, Attach and PortForward: the RPCs hand out a streaming URL; this is what serves it.

The RPCs only validate and return a single-use URL from the streaming server. When a client
connects, the server calls the backend here:
- exec: the pod's shim starts `runc exec` and passes us the process's pipe (or pty) fds, so
  the bytes flow between the client and the process without passing through the shim;
- attach: the shim streams the container's output to us from the moment we attach;
- port-forward: a TCP socket created inside the pod's network namespace, connected to
  127.0.0.1:<port> there (no socat, no nsenter).

Nothing here grows with what a client does not read, and no client ties up a shared worker
thread: exec output is read from the fds only as fast as the client takes it (the pipe fills
and the process blocks); attach output waits in a bounded queue, so the shim drops an attacher
that stops reading; a port-forward connect is non-blocking on the event loop, with a timeout
and a cap per pod (a pod that never accepts costs one socket per attempt, nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path

from cri_api import api_pb2 as pb
from netns.enter import open_socket_in_netns
from sandbox import validate
from sandbox.containers import exec_process, running_container, shim_of
from sandbox.errors import InvalidArgument, NotFound
from sandbox.runtime import Runtime
from sandbox.streaming.buffers import ByteQueue
from sandbox.streaming.limits import KeyedSlots, SlotsFull, StreamLimits
from sandbox.streaming.pipes import pipe_file
from shim.client import AttachStream, ExecHandle, ShimClient, ShimError, resize_fd
from shim.protocol import STREAM_STDERR, STREAM_STDOUT

# ioctl(2): open the slave side of a pty from its master (Linux 4.13+), whatever mount
# namespace the pty's devpts lives in.
TIOCGPTPEER = 0x5441
PTY_DRAIN_POLLS = 100  # x 10 ms
# An exec's exit is waited for as long as the session lasts.
FOREVER = 10.0 * 365 * 24 * 3600
# Process output read ahead of the client, per stream: a pipe's reader pauses past twice this.
EXEC_READ_AHEAD = 128 * 1024
# Pod data read ahead of the client per forwarded connection (a connection may carry 128).
FORWARD_READ_AHEAD = 32 * 1024
# Attach output queued ahead of the client, per stream; past it we stop reading the shim's
# attach socket, and the shim drops an attacher 4 MiB behind (shim/server.py).
ATTACH_READ_AHEAD = 256 * 1024
# Terminal input held for a process that does not read it; past it the client's stdin
# waits (the default high-water mark of asyncio's own write transports).
PTY_INPUT_HIGH_WATER = 64 * 1024


# --- the RPCs --------------------------------------------------------------------------------


def exec_(rt: Runtime, req: pb.ExecRequest) -> pb.ExecResponse:
    validate.exec_command(req.cmd)
    ctr = running_container(rt, req.container_id)
    req.container_id = ctr.id
    return pb.ExecResponse(url=_url(rt.streaming.get_exec_url, req))


def attach(rt: Runtime, req: pb.AttachRequest) -> pb.AttachResponse:
    ctr = running_container(rt, req.container_id)
    req.container_id = ctr.id
    return pb.AttachResponse(url=_url(rt.streaming.get_attach_url, req))


def port_forward(rt: Runtime, req: pb.PortForwardRequest) -> pb.PortForwardResponse:
    pod = rt.pod(req.pod_sandbox_id)
    for port in req.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is out of range")
    req.pod_sandbox_id = pod.id
    return pb.PortForwardResponse(url=_url(rt.streaming.get_portforward_url, req))


def _url(make: object, req: object) -> str:
    try:
        return str(make(req))  # type: ignore[operator]
    except ValueError as err:
        raise InvalidArgument(str(err)) from err


# --- the streaming backend -------------------------------------------------------------------


@dataclass
class ShimBackend:
    """sandbox.streaming.backend.StreamBackend, over the pods' shims."""

    rt: Runtime
    limits: StreamLimits = field(default_factory=StreamLimits)
    # Port-forward connects in progress, per pod.
    connecting: KeyedSlots = field(init=False)

    def __post_init__(self) -> None:
        self.connecting = KeyedSlots(self.limits.max_port_forward_connects_per_pod)

    async def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool,
                   stdout: bool, stderr: bool) -> ExecSession:
        ctr = running_container(self.rt, container_id)
        shim = shim_of(self.rt, ctr.pod_id)
        process = exec_process(self.rt, ctr, cmd, tty=tty)
        handle = await shim.exec(ctr.id, process, tty=tty, stdin=stdin)
        session = ExecSession(shim, handle)
        await session.open(stdout=stdout, stderr=stderr)
        return session

    async def attach(self, container_id: str, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> AttachSession:
        ctr = running_container(self.rt, container_id)
        shim = shim_of(self.rt, ctr.pod_id)
        stream = await shim.attach(ctr.id, stdin=stdin)
        session = AttachSession(shim, ctr.id, stream)
        await session.open(stdin=stdin and stream.has_stdin, stdout=stdout, stderr=stderr)
        return session

    async def port_forward(
        self, pod_sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pod = self.rt.find_pod(pod_sandbox_id)
        if pod is None:
            raise NotFound(f"pod sandbox {pod_sandbox_id!r} not found")
        try:
            with self.connecting.hold(pod.id):
                sock = await self._pod_socket(pod.netns_path)
                return await self._connect(sock, port)
        except SlotsFull as full:
            raise ConnectionRefusedError(
                f"{full.held} connects into pod {pod.id} already in progress "
                "(streaming.max_port_forward_connects_per_pod)") from None

    @staticmethod
    async def _pod_socket(netns_path: str) -> socket.socket:
        """A TCP socket in the pod's netns (a host-network pod's 127.0.0.1 is the host's).
        Only creating it needs the namespace: a short-lived thread does, microseconds."""
        if not netns_path:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return await asyncio.to_thread(open_socket_in_netns, Path(netns_path))

    async def _connect(self, sock: socket.socket, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connects on the event loop, not on a thread: a pod that never answers costs a
        pending socket until the timeout, not a worker."""
        timeout = self.limits.port_forward_connect_timeout_seconds
        try:
            sock.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        except TimeoutError as exc:
            sock.close()
            raise TimeoutError(f"connect to 127.0.0.1:{port} timed out after "
                               f"{timeout:g}s") from exc
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=FORWARD_READ_AHEAD)


async def _reader_for(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=EXEC_READ_AHEAD)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe_file(fd, "rb")
    )
    return reader


async def _writer_for(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, pipe_file(fd, "wb")
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


class _PtyInput(asyncio.WriteTransport):
    """A pty master's input side: os.write, and the loop's add_writer while the terminal's
    buffer is full. Not loop.connect_write_pipe: uvloop's pipe transport also reads its fd
    (to learn that the far end closed), and on a pty master, one open file both ways, it
    took the terminal's output away from the session's reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 protocol: asyncio.streams.FlowControlMixin) -> None:
        super().__init__()
        self._loop, self._fd, self._protocol = loop, fd, protocol
        self._buffer = bytearray()
        self._closing = self._paused = False
        os.set_blocking(fd, False)
        protocol.connection_made(self)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._abort(exc)
                return
            if sent == len(data):
                return
            self._loop.add_writer(self._fd, self._on_writable)
            data = memoryview(data)[sent:]
        self._buffer += data
        if not self._paused and len(self._buffer) > PTY_INPUT_HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            del self._buffer[:os.write(self._fd, self._buffer)]
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(exc)
            return
        if self._paused and len(self._buffer) <= PTY_INPUT_HIGH_WATER // 4:
            self._paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if not self._buffer:
                self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._abort(None)

    def _abort(self, exc: Exception | None) -> None:
        self._closing = True
        self._buffer.clear()
        self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._finish, exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._protocol.connection_lost(exc)


def pty_writer(fd: int) -> asyncio.StreamWriter:
    """A StreamWriter to a pty master (fd: its own copy, closed with the writer)."""
    loop = asyncio.get_running_loop()
    protocol = asyncio.streams.FlowControlMixin(loop)
    return asyncio.StreamWriter(_PtyInput(loop, fd, protocol), protocol, None, loop)


@dataclass
class ExecSession:
    """An exec started by the shim; we hold its stdio fds (or its pty master)."""

    shim: ShimClient
    handle: ExecHandle
    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None
    pty: int | None = None
    # Our own handle on the terminal's slave side: while it is open, the process's exit does
    # not hang the terminal up, so output it wrote just before exiting cannot be lost to EIO.
    # Closed once the shim reports the exit; then the reader drains to EOF.
    pty_peer: int | None = None

    async def open(self, stdout: bool, stderr: bool) -> None:
        h = self.handle
        if h.pty is not None:
            self.pty = h.pty
            self.pty_peer = fcntl.ioctl(h.pty, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
            # One fd both ways: the reader and the writer each get their own copy.
            self.stdout = await _reader_for(os.dup(h.pty))
            self.stdin = pty_writer(os.dup(h.pty))
            return
        if h.stdin is not None:
            self.stdin = await _writer_for(h.stdin)
            h.stdin = None
        if h.stdout is not None:
            self.stdout = await _reader_for(h.stdout)
            h.stdout = None
        if h.stderr is not None:
            self.stderr = await _reader_for(h.stderr)
            h.stderr = None

    async def resize(self, width: int, height: int) -> None:
        if self.pty is not None:
            resize_fd(self.pty, width, height)

    async def wait(self) -> int:
        view = await self.shim.exec_wait(self.handle.exec_id, timeout=FOREVER)
        await self._drained()
        self._release()
        return view.exit_code

    async def _drained(self) -> None:
        """Lets the reader take what the process wrote to its terminal before it exited."""
        if self.pty is None:
            return
        for _ in range(PTY_DRAIN_POLLS):
            pending = struct.unpack("i", fcntl.ioctl(self.pty, termios.FIONREAD, b"\0" * 4))[0]
            if pending == 0:
                return
            await asyncio.sleep(0.01)

    async def kill(self) -> None:
        with contextlib.suppress(ShimError, OSError):
            await self.shim.exec_kill(self.handle.exec_id)
        if self.stdin is not None:
            self.stdin.close()
        self._release()

    def _release(self) -> None:
        if self.pty_peer is not None:
            os.close(self.pty_peer)
            self.pty_peer = None
        self.handle.close()
        self.pty = None


@dataclass
class AttachSession:
    """The container's output from now on, from the shim's attach stream."""

    shim: ShimClient
    container_id: str
    stream: AttachStream
    stdin: asyncio.StreamWriter | None = None
    stdout: ByteQueue | None = None
    stderr: ByteQueue | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def open(self, stdin: bool, stdout: bool, stderr: bool) -> None:
        self.stdout = ByteQueue(ATTACH_READ_AHEAD) if stdout else None
        self.stderr = ByteQueue(ATTACH_READ_AHEAD) if stderr and not self.stream.tty else None
        self.tasks.append(asyncio.create_task(self._pump_output()))
        if stdin:
            # The server writes stdin to a StreamWriter; a pipe turns that into frames.
            read_fd, write_fd = os.pipe()
            self.stdin = await _writer_for(write_fd)
            self.tasks.append(asyncio.create_task(self._pump_stdin(await _reader_for(read_fd))))

    async def _pump_output(self) -> None:
        targets = {STREAM_STDOUT: self.stdout, STREAM_STDERR: self.stderr}
        try:
            while (frame := await self.stream.read()) is not None:
                stream_id, data = frame
                target = targets.get(stream_id, self.stdout if self.stream.tty else None)
                if target is None:
                    continue
                if data:
                    await target.put(data)  # waits while the client is behind
                else:
                    target.end()
        finally:
            for target in (self.stdout, self.stderr):
                if target is not None:
                    target.end()

    async def _pump_stdin(self, source: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, ShimError):
            while data := await source.read(65536):
                await self.stream.write_stdin(data)
            await self.stream.close_stdin()

    async def resize(self, width: int, height: int) -> None:
        with contextlib.suppress(ShimError):
            await self.shim.resize(self.container_id, width, height)

    async def wait(self) -> int:
        view = await self.shim.wait(self.container_id, timeout=FOREVER)
        return view.exit_code

    async def kill(self) -> None:
        """Detach only: the container keeps running."""
        for task in self.tasks:
            task.cancel()
        if self.stdin is not None:
            self.stdin.close()
        await self.stream.close()
