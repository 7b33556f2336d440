"""Test support for the streaming server: a real-process backend, a server running
on its own event-loop thread, and a SPDY/3.1 client written from the protocol
(SPDY draft 3.1 + the Kubernetes remotecommand/portforward stream conventions)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import struct
import termios
import threading
from collections.abc import Awaitable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import WSClient

from sandbox.exec import pty_writer
from sandbox.streaming import spdy
from sandbox.streaming.limits import StreamLimits
from sandbox.streaming.pipes import pipe_file
from sandbox.streaming.server import ExecParams, StreamingServer
from tests.daemon import new_event_loop

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Backend running real local processes


class LocalProcess:
    """ProcessStreams for a local subprocess (pipes, or a pty for tty)."""

    def __init__(self, process: asyncio.subprocess.Process,
                 stdin: asyncio.StreamWriter | None, stdout: asyncio.StreamReader | None,
                 stderr: asyncio.StreamReader | None, pty_master: int | None) -> None:
        self.process = process
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pty_master = pty_master
        self._slave_closer: asyncio.Future[None] | None = None
        self.resizes: list[tuple[int, int]] = []

    async def resize(self, width: int, height: int) -> None:
        self.resizes.append((width, height))
        if self._pty_master is not None:
            fcntl.ioctl(self._pty_master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", height, width, 0, 0))

    def hold_pty_slave(self, slave: int) -> None:
        """Keeps the pty's slave side open until the process has exited, as flatpod's shim
        does: when the last slave fd closes with the exit, the kernel hangs the pty up and
        the master's reads fail with EIO, dropping output the process wrote just before
        exiting that was not read yet."""
        async def close_at_exit() -> None:
            try:
                await self.process.wait()
            finally:
                os.close(slave)
        self._slave_closer = asyncio.ensure_future(close_at_exit())

    async def wait(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def _pty_streams(master: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 pipe_file(master, "rb"))
    return reader, pty_writer(os.dup(master))  # as flatpod's own exec sessions


@dataclass
class LocalProcessBackend:
    """StreamBackend over real local processes and real local TCP servers.

    Attach starts the 'container' command registered in attach_commands."""

    attach_commands: dict[str, list[str]] = field(default_factory=dict)
    processes: list[LocalProcess] = field(default_factory=list)
    exec_started: asyncio.Queue[LocalProcess] | None = None

    async def exec(self, container_id: str, cmd: list[str], tty: bool, stdin: bool,
                   stdout: bool, stderr: bool) -> LocalProcess:
        started = await self._spawn(cmd, tty, stdin, stdout, stderr)
        if self.exec_started is not None:
            await self.exec_started.put(started)
        return started

    async def attach(self, container_id: str, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> LocalProcess:
        if container_id not in self.attach_commands:
            raise LookupError(f"container {container_id} not found")
        return await self._spawn(self.attach_commands[container_id], tty, stdin, stdout,
                                 stderr)

    async def port_forward(self, pod_sandbox_id: str,
                           port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    async def _spawn(self, cmd: list[str], tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> LocalProcess:
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        if not tty:
            try:
                process = await asyncio.create_subprocess_exec(
                    *cmd, stdin=pipe if stdin else devnull, stdout=pipe if stdout else devnull,
                    stderr=pipe if stderr else devnull, start_new_session=True)
            except FileNotFoundError as exc:  # uvloop's leaves the program out: as asyncio's
                raise FileNotFoundError(exc.errno, exc.strerror, cmd[0]) from exc
            started = LocalProcess(process, process.stdin, process.stdout, process.stderr,
                                   None)
        else:
            master, slave = pty.openpty()
            try:
                process = await asyncio.create_subprocess_exec(
                    *cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
            except BaseException:
                os.close(slave)
                raise
            reader, writer = await _pty_streams(master)
            started = LocalProcess(process, writer if stdin else None, reader, None, master)
            started.hold_pty_slave(slave)
        self.processes.append(started)
        return started

    async def kill_all(self) -> None:
        for started in self.processes:
            with contextlib.suppress(ProcessLookupError):
                await started.kill()
            if started.stdin is not None:
                started.stdin.close()
        # Let the subprocess transports see their pipes close before the loop stops.
        await asyncio.sleep(0.2)
        for started in self.processes:
            # One still open (a pipe not yet at EOF under load) is closed here, on the loop:
            # left to the garbage collector after the loop closes, it raises "Event loop is
            # closed" from its __del__.
            started.process._transport.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The server on its own loop thread


class ServerHarness:
    def __init__(self, tls: tuple[str, str] | None = None, token_ttl: float = 60.0,
                 stream_creation_timeout: float = 30.0,
                 limits: StreamLimits | None = None) -> None:
        self.loop = new_event_loop()  # FLATPOD_TEST_EVENT_LOOP's, as the daemon's
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.backend = LocalProcessBackend()
        self.server = StreamingServer(self.backend, tls=tls, token_ttl=token_ttl,
                                      stream_creation_timeout=stream_creation_timeout,
                                      limits=limits)
        self.call(self.server.start())

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def on_loop(self, function: Any, *args: Any) -> Any:
        async def invoke() -> Any:
            return function(*args)
        return self.call(invoke())

    def close(self) -> None:
        try:
            self.call(self.server.stop())
            self.call(self.backend.kill_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def running_harness(limits: StreamLimits | None = None) -> Iterator[ServerHarness]:
    """Body of a `harness` fixture (tests/conftest.py's, or a module's own with other
    limits): a server, always stopped."""
    started = ServerHarness(limits=limits)
    try:
        yield started
    finally:
        started.close()


def ws_client(url: str, protocol: str | None = None) -> WSClient:
    """The kubernetes Python client's WebSocket client on `url` (http: ws, https: wss),
    offering `protocol`, or no subprotocol."""
    headers = {"sec-websocket-protocol": protocol} if protocol else None
    config = Configuration()
    config.verify_ssl = False
    return WSClient(config, url.replace("http", "ws", 1), headers, capture_all=True,
                    binary=True)


def echo_hello_then_eof(client: WSClient) -> None:
    """Drives a shell attached over WebSocket: `echo -n hello` comes back on stdout, and the
    end of stdin ends the shell and the connection."""
    client.write_stdin(b"echo -n hello\n")
    client.update(timeout=5)
    assert client.read_stdout(timeout=5) == b"hello"
    client.close_channel(0)
    client.run_forever(timeout=20)
    assert not client.is_open()


def exec_url(harness: ServerHarness, cmd: list[str], **options: bool) -> str:
    """A single-use URL for an exec of `cmd` in the local backend's container "c1"."""
    url: str = harness.on_loop(harness.server.get_exec_url, ExecParams("c1", cmd=cmd, **options))
    return url


# ---------------------------------------------------------------------------
# SPDY/3.1 client


@dataclass
class ClientStream:
    stream_id: int
    data: bytearray = field(default_factory=bytearray)
    replied: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # FIN or RST received
    reset_status: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SpdyClient:
    """Client half of a SPDY/3.1 session after an HTTP Upgrade (as kubelet/crictl)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 response_head: str, flow_control: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.response_head = response_head
        self._deflate = spdy.HeaderCompressor()
        self._inflate = spdy.HeaderDecompressor()
        self._next_id = 1
        self.streams: dict[int, ClientStream] = {}
        self.pings: list[int] = []
        self.goaway = asyncio.Event()
        self.window_updates = 0
        self._flow_control = flow_control  # send WINDOW_UPDATEs for what we read
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, url: str, protocols: list[str], flow_control: bool = False,
                      ssl_context: Any = None) -> SpdyClient:
        reader, writer, head = await http_upgrade(
            url, "POST", [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
            + [("X-Stream-Protocol-Version", p) for p in protocols], ssl_context)
        if not head.startswith("HTTP/1.1 101"):
            writer.close()
            raise UpgradeRefused(head)
        return cls(reader, writer, head, flow_control)

    def negotiated(self) -> str:
        for line in self.response_head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "x-stream-protocol-version":
                return value.strip()
        return ""

    async def open_stream(self, headers: dict[str, str], fin: bool = False) -> ClientStream:
        stream = ClientStream(self._next_id)
        self._next_id += 2
        self.streams[stream.stream_id] = stream
        block = {name: [value] for name, value in headers.items()}
        self.writer.write(spdy.encode_syn_stream(stream.stream_id, block, self._deflate,
                                                 flags=spdy.FLAG_FIN if fin else 0))
        await self.writer.drain()
        return stream

    async def send(self, stream: ClientStream, data: bytes, fin: bool = False) -> None:
        for start in range(0, max(len(data), 1), 16384):
            last = start + 16384 >= len(data)
            self.writer.write(spdy.encode_data(stream.stream_id,
                                               spdy.FLAG_FIN if fin and last else 0,
                                               data[start:start + 16384]))
        await self.writer.drain()

    async def raw(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def read_to_end(self, stream: ClientStream, timeout: float = 30.0) -> bytes:
        await asyncio.wait_for(stream.finished.wait(), timeout)
        return bytes(stream.data)

    async def wait_for_data(self, stream: ClientStream, needle: bytes,
                            timeout: float = 10.0) -> None:
        async def until() -> None:
            while needle not in stream.data:
                stream.changed.clear()
                await stream.changed.wait()
        await asyncio.wait_for(until(), timeout)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(spdy.encode_goaway(0, spdy.GOAWAY_OK))
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def abort(self) -> None:
        """Drop the TCP connection without GOAWAY (a client killed mid-session)."""
        self.writer.transport.abort()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read_loop(self) -> None:
        transport = spdy.StreamTransport(self.reader, self.writer)
        try:
            while True:
                frame = await spdy.read_frame(transport)
                if isinstance(frame, spdy.DataFrame):
                    await self._on_data(frame)
                else:
                    self._on_control(frame)
        except EOFError:
            pass
        finally:
            for stream in self.streams.values():
                stream.finished.set()
                stream.changed.set()

    async def _on_data(self, frame: spdy.DataFrame) -> None:
        stream = self.streams[frame.stream_id]
        assert stream.replied.is_set(), "DATA before SYN_REPLY"
        stream.data += frame.data
        if frame.flags & spdy.FLAG_FIN:
            stream.finished.set()
        stream.changed.set()
        if self._flow_control and frame.data:
            self.writer.write(spdy.encode_window_update(frame.stream_id, len(frame.data))
                              + spdy.encode_window_update(0, len(frame.data)))

    def _on_control(self, frame: spdy.ControlFrame) -> None:
        if frame.frame_type == spdy.TYPE_SYN_REPLY:
            stream_id, _ = spdy.parse_stream_headers(frame, self._inflate)
            self.streams[stream_id].replied.set()
        elif frame.frame_type == spdy.TYPE_RST_STREAM:
            stream_id, status = spdy.parse_two_words(frame)
            stream = self.streams[stream_id]
            stream.reset_status = status
            stream.finished.set()
            stream.changed.set()
        elif frame.frame_type == spdy.TYPE_PING:
            self.pings.append(struct.unpack(">I", frame.payload)[0])
        elif frame.frame_type == spdy.TYPE_GOAWAY:
            self.goaway.set()
        elif frame.frame_type == spdy.TYPE_WINDOW_UPDATE:
            self.window_updates += 1


class UpgradeRefused(Exception):
    def __init__(self, head: str) -> None:
        super().__init__(head.split("\r\n", 1)[0])
        self.head = head
        self.status = int(head.split(" ", 2)[1])


async def http_upgrade(url: str, method: str, headers: list[tuple[str, str]],
                       ssl_context: Any = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    scheme, rest = url.split("://", 1)
    hostport, path = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=ssl_context if scheme == "https" else None)
    lines = [f"{method} /{path} HTTP/1.1", f"Host: {hostport}", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    return reader, writer, head


# ---------------------------------------------------------------------------
# remotecommand over the SPDY client


@dataclass
class CommandResult:
    stdout: bytes
    stderr: bytes
    error: bytes

    @property
    def status(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.error)
        return parsed


@dataclass
class RemoteCommand:
    client: SpdyClient
    error: ClientStream
    stdin: ClientStream | None
    stdout: ClientStream | None
    stderr: ClientStream | None
    resize: ClientStream | None

    @classmethod
    async def open(cls, url: str, stdin: bool = False, stdout: bool = True,
                   stderr: bool = True, tty: bool = False,
                   protocols: tuple[str, ...] = ("v4.channel.k8s.io",),
                   flow_control: bool = False, ssl_context: Any = None) -> RemoteCommand:
        client = await SpdyClient.connect(url, list(protocols), flow_control, ssl_context)

        async def open_typed(kind: str) -> ClientStream:
            stream = await client.open_stream({"streamType": kind})
            return stream

        # Client-side order: error first, then the data streams.
        error = await open_typed("error")
        in_stream = await open_typed("stdin") if stdin else None
        out_stream = await open_typed("stdout") if stdout else None
        err_stream = await open_typed("stderr") if stderr and not tty else None
        resize = await open_typed("resize") if tty else None
        # The error stream is read-only for a client: half-close it at once.
        await client.send(error, b"", fin=True)
        for stream in (error, in_stream, out_stream, err_stream, resize):
            if stream is not None:
                await asyncio.wait_for(stream.replied.wait(), 10)
        return cls(client, error, in_stream, out_stream, err_stream, resize)

    async def result(self, timeout: float = 60.0) -> CommandResult:
        error = await self.client.read_to_end(self.error, timeout)
        out = await self.client.read_to_end(self.stdout, timeout) if self.stdout else b""
        err = await self.client.read_to_end(self.stderr, timeout) if self.stderr else b""
        return CommandResult(out, err, error)


async def run_command(url: str, stdin_data: bytes | None = None, **options: Any
                      ) -> CommandResult:
    command = await RemoteCommand.open(url, stdin=stdin_data is not None, **options)
    try:
        if command.stdin is not None and stdin_data is not None:
            await command.client.send(command.stdin, stdin_data, fin=True)
        return await command.result()
    finally:
        await command.client.close()


def run(awaitable: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await awaitable
    return asyncio.run(wrapper())


# ---------------------------------------------------------------------------
# channel.k8s.io over WebSocket, every variant, with websocket-client


BASE64_PROTOCOLS = ("base64.channel.k8s.io", "v4.base64.channel.k8s.io")


@dataclass
class ChannelClient:
    """A channel.k8s.io client of any version, binary or base64 (wsstream's encodings: a
    channel byte, or an ASCII digit then base64), on websocket-client."""

    ws: Any
    protocol: str
    received: dict[int, bytearray] = field(default_factory=dict)
    opcodes: set[int] = field(default_factory=set)

    @classmethod
    def connect(cls, url: str, protocol: str | None) -> ChannelClient:
        import websocket

        ws = websocket.create_connection(url.replace("http", "ws", 1), timeout=20,
                                         subprotocols=[protocol] if protocol else None)
        return cls(ws, protocol or "")

    @property
    def base64(self) -> bool:
        return self.protocol in BASE64_PROTOCOLS

    def send(self, channel: int, data: bytes) -> None:
        import base64

        import websocket

        if self.base64:
            self.ws.send(chr(ord("0") + channel) + base64.b64encode(data).decode(),
                         websocket.ABNF.OPCODE_TEXT)
        else:
            self.ws.send(bytes([channel]) + data, websocket.ABNF.OPCODE_BINARY)

    def run_to_close(self) -> dict[int, bytes]:
        """Every message until the server closes, by channel."""
        import base64

        import websocket

        while True:
            opcode, data = self.ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            self.opcodes.add(opcode)
            if not data:
                continue
            if self.base64:
                channel, payload = data[0] - ord("0"), base64.b64decode(data[1:])
            else:
                channel, payload = data[0], data[1:]
            self.received.setdefault(channel, bytearray()).extend(payload)
        self.ws.close()
        return {channel: bytes(data) for channel, data in self.received.items()}
