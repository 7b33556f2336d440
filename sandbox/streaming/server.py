"""The CRI streaming server: single-use URLs for Exec, Attach and PortForward.

GET/POST /exec/<token>, /attach/<token>, /portforward/<token>, upgraded to
SPDY/3.1 (X-Stream-Protocol-Version) or WebSocket (Sec-WebSocket-Protocol).

What a client may cost is bounded (limits.py): open connections node-wide, sessions per
container (per pod for port-forward), and the time from accept to the end of the upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sandbox.streaming import remotecommand as rc
from sandbox.streaming.backend import ProcessStreams, StreamBackend
from sandbox.streaming.limits import KeyedSlots, SlotsFull, StreamLimits, close_writer
from sandbox.streaming.portforward import PROTOCOL_PORTFORWARD, PortForwardSession
from sandbox.streaming.spdy import (
    RST_PROTOCOL_ERROR,
    RST_STREAM_IN_USE,
    SpdyConnection,
    SpdyStream,
    StreamTransport,
)
from sandbox.streaming.websocket import (
    WebSocketConnection,
    WebSocketError,
    choose_subprotocol,
    handshake_response,
    offered_subprotocols,
)
from sandbox.streaming.wschannels import WebSocketChannels, WebSocketTransport

log = logging.getLogger(__name__)


TOKEN_TTL = 60.0  # seconds, as kubelet's streaming server
MAX_PENDING_TOKENS = 1000
STREAM_CREATION_TIMEOUT = 30.0
CLIENT_CLOSE_GRACE = 5.0  # after the session, how long to wait for the client to hang up
MAX_REQUEST_HEAD = 64 * 1024
WEBSOCKET_TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
_PATH = re.compile(r"^/(exec|attach|portforward)/([A-Za-z0-9_-]+)/?$")


class AttachRequestLike(Protocol):
    """cri_api AttachRequest, or AttachParams."""

    @property
    def container_id(self) -> str: ...
    @property
    def tty(self) -> bool: ...
    @property
    def stdin(self) -> bool: ...
    @property
    def stdout(self) -> bool: ...
    @property
    def stderr(self) -> bool: ...


class ExecRequestLike(AttachRequestLike, Protocol):
    """cri_api ExecRequest, or ExecParams: an attach's streams, and the command."""

    @property
    def cmd(self) -> Sequence[str]: ...


class PortForwardRequestLike(Protocol):
    @property
    def pod_sandbox_id(self) -> str: ...
    @property
    def port(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class AttachParams:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class ExecParams(AttachParams):
    cmd: Sequence[str] = field(kw_only=True)


@dataclass(frozen=True)
class PortForwardParams:
    pod_sandbox_id: str
    port: Sequence[int] = ()


@dataclass(frozen=True)
class PendingSession:
    """What a token stands for until it is used or expires."""

    kind: str  # "exec" | "attach" | "portforward"
    target_id: str  # container id, or pod sandbox id for port-forward
    options: rc.StreamOptions
    cmd: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@dataclass
class TokenCache:
    """Single-use tokens that expire after ttl seconds."""

    ttl: float = TOKEN_TTL
    max_pending: int = MAX_PENDING_TOKENS
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, tuple[float, PendingSession]] = field(default_factory=dict)

    def insert(self, session: PendingSession) -> str:
        self._evict_expired()
        if len(self._entries) >= self.max_pending:
            raise RuntimeError("too many pending streaming requests")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (self.clock() + self.ttl, session)
        return token

    def consume(self, token: str) -> PendingSession | None:
        entry = self._entries.pop(token, None)
        if entry is None or entry[0] < self.clock():
            return None
        return entry[1]

    def _evict_expired(self) -> None:
        now = self.clock()
        for token in [t for t, (deadline, _) in self._entries.items() if deadline < now]:
            del self._entries[token]


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def header_tokens(self, name: str) -> list[str]:
        """Comma-separated values of every copy of a header."""
        tokens: list[str] = []
        for value in self.headers.get(name.lower(), []):
            tokens.extend(t.strip() for t in value.split(",") if t.strip())
        return tokens


class HttpError(Exception):
    def __init__(self, status: int, reason: str, body: str,
                 extra_headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(body)
        self.status = status
        self.reason = reason
        self.body = body
        self.extra_headers = extra_headers


async def read_request(reader: asyncio.StreamReader) -> HttpRequest:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431, "Request Header Fields Too Large", "headers too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "Bad Request", "malformed request line")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "Bad Request", "malformed header")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return HttpRequest(parts[0], parts[1].split("?", 1)[0], headers)


def http_response(status: int, reason: str, body: str,
                  extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(payload)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def negotiate_spdy_protocol(request: HttpRequest, supported: Sequence[str]) -> str:
    """Client's order wins, as apimachinery's handshake; "" if the client sent none."""
    offered = request.header_tokens("x-stream-protocol-version")
    if not offered:
        return ""
    for protocol in offered:
        if protocol in supported:
            return protocol
    raise HttpError(403, "Forbidden",
                    f"unable to upgrade: unable to negotiate protocol: client supports "
                    f"{offered}, server accepts {list(supported)}",
                    [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])


def upgrade_kind(request: HttpRequest) -> str:
    if "upgrade" not in [t.lower() for t in request.header_tokens("connection")]:
        return ""
    upgrade = [t.lower() for t in request.header_tokens("upgrade")]
    if "websocket" in upgrade:
        return "websocket"
    if "spdy/3.1" in upgrade:
        return "spdy"
    return ""


class StreamingServer:
    """Serves the URLs returned by the CRI Exec, Attach and PortForward calls."""

    def __init__(self, backend: StreamBackend, address: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str] | None = None, token_ttl: float = TOKEN_TTL,
                 stream_creation_timeout: float = STREAM_CREATION_TIMEOUT,
                 limits: StreamLimits | None = None) -> None:
        self._backend = backend
        self._limits = limits or StreamLimits()
        # Sessions running per container (exec, attach) or pod (port-forward).
        self._sessions = KeyedSlots(self._limits.max_sessions_per_container)
        self._address = address
        self._port = port
        self._tls = tls
        self._tokens = TokenCache(ttl=token_ttl)
        self._stream_creation_timeout = stream_creation_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        context = None
        if self._tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self._tls)
        handshake = self._limits.handshake_timeout_seconds
        self._server = await asyncio.start_server(
            self._on_connection, self._address, self._port, ssl=context,
            ssl_handshake_timeout=handshake if context else None, limit=MAX_REQUEST_HEAD)
        bound_port = self._server.sockets[0].getsockname()[1]
        host = self._address
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.url = f"{'https' if context else 'http'}://{host}:{bound_port}"

    async def stop(self) -> None:
        """Stop listening and end every session (their execs are killed)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # URLs ------------------------------------------------------------------

    def get_exec_url(self, request: ExecRequestLike) -> str:
        options = container_stream_options(request)
        if not request.cmd:
            raise ValueError("missing required cmd")
        session = PendingSession("exec", request.container_id, options, cmd=tuple(request.cmd))
        return f"{self.url}/exec/{self._tokens.insert(session)}"

    def get_attach_url(self, request: AttachRequestLike) -> str:
        options = container_stream_options(request)
        session = PendingSession("attach", request.container_id, options)
        return f"{self.url}/attach/{self._tokens.insert(session)}"

    def get_portforward_url(self, request: PortForwardRequestLike) -> str:
        if not request.pod_sandbox_id:
            raise ValueError("missing required pod_sandbox_id")
        session = PendingSession("portforward", request.pod_sandbox_id,
                                 rc.StreamOptions(False, False, False, False),
                                 ports=tuple(int(p) for p in request.port))
        return f"{self.url}/portforward/{self._tokens.insert(session)}"

    # HTTP ----------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._limits.max_connections:
            log.debug("streaming: refusing a connection: %d open",
                      self._limits.max_connections)
            writer.write(http_response(503, "Service Unavailable",
                                       "too many streaming connections"))
            writer.close()
            return
        # The session runs in its own task so stop() can cancel it without the
        # cancellation escaping into asyncio's server callback machinery.
        task = asyncio.create_task(self._serve_connection(reader, writer))
        self._connections.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._connections.discard(task)

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_http(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("streaming: connection failed")
        finally:
            await close_writer(writer)

    async def _serve_http(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(read_request(reader),
                                                 self._limits.handshake_timeout_seconds)
            except TimeoutError as exc:
                raise HttpError(408, "Request Timeout", "request head not received in "
                                f"{self._limits.handshake_timeout_seconds:g}s") from exc
            session = self._route(request)
            kind = upgrade_kind(request)
            if kind not in ("spdy", "websocket"):
                raise HttpError(400, "Bad Request",
                                "unable to upgrade: missing upgrade headers in request")
            with self._session_slot(session):
                if kind == "spdy":
                    await self._serve_spdy(request, session, reader, writer)
                else:
                    await self._serve_websocket(request, session, reader, writer)
        except HttpError as exc:
            writer.write(http_response(exc.status, exc.reason, exc.body, exc.extra_headers))
            await writer.drain()

    @contextlib.contextmanager
    def _session_slot(self, session: PendingSession) -> Iterator[None]:
        """Counts the session against its container's (pod's) cap for as long as it runs."""
        try:
            with self._sessions.hold(session.target_id):
                yield
        except SlotsFull as full:
            what = "pod" if session.kind == "portforward" else "container"
            raise HttpError(429, "Too Many Requests",
                            f"{what} {session.target_id} already has {full.held} streaming "
                            f"sessions (streaming.max_sessions_per_container)") from None

    def _route(self, request: HttpRequest) -> PendingSession:
        match = _PATH.match(request.path)
        if match is None or request.method not in ("GET", "POST"):
            raise HttpError(404, "Not Found", "404 page not found")
        session = self._tokens.consume(match.group(2))
        if session is None or session.kind != match.group(1):
            raise HttpError(404, "Not Found", "404 page not found")
        return session

    # SPDY ----------------------------------------------------------------------

    async def _serve_spdy(self, request: HttpRequest, session: PendingSession,
                          reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        supported = (PROTOCOL_PORTFORWARD,) if session.kind == "portforward" \
            else rc.SPDY_PROTOCOLS
        protocol = negotiate_spdy_protocol(request, supported)
        head = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade",
                "Upgrade: SPDY/3.1"]
        if protocol:
            head.append(f"X-Stream-Protocol-Version: {protocol}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        connection = SpdyConnection(StreamTransport(reader, writer), self._limits)
        connection.start()
        try:
            if session.kind == "portforward":
                await self._port_forward(connection, session)
            else:
                await self._remote_command_spdy(connection, session, protocol or rc.PROTOCOL_V1)
        finally:
            await connection.close()

    async def _port_forward(self, connection: SpdyConnection, session: PendingSession) -> None:
        await PortForwardSession(connection, self._backend, session.target_id,
                                 session.ports, self._stream_creation_timeout).run()

    async def _remote_command_spdy(self, connection: SpdyConnection, session: PendingSession,
                                   protocol: str) -> None:
        expected = session.options.expected_stream_types()
        try:
            streams = await asyncio.wait_for(collect_streams(connection, expected),
                                             self._stream_creation_timeout)
        except TimeoutError:
            log.info("streaming: timed out waiting for client to create streams")
            return
        if streams is None:
            return  # client went away first
        refuse_extra = asyncio.create_task(refuse_further_streams(connection))
        try:
            channels = rc.SessionChannels(
                error=SpdyOutput(streams[rc.STREAM_ERROR]),
                stdin=streams.get(rc.STREAM_STDIN),
                stdout=_output(streams.get(rc.STREAM_STDOUT)),
                stderr=_output(streams.get(rc.STREAM_STDERR)),
                resize=streams.get(rc.STREAM_RESIZE))
            await rc.run_remote_command(channels, protocol, self._starter(session),
                                        describe(session), connection.closed)
            # Let the client read everything and hang up itself.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connection.closed.wait(), CLIENT_CLOSE_GRACE)
        finally:
            refuse_extra.cancel()

    def _starter(self, session: PendingSession) -> Callable[[], asyncio.Future[ProcessStreams]]:
        options = session.options
        stderr = options.stderr and not options.tty

        def start() -> asyncio.Future[ProcessStreams]:
            if session.kind == "exec":
                return asyncio.ensure_future(self._backend.exec(
                    session.target_id, list(session.cmd), options.tty, options.stdin,
                    options.stdout, stderr))
            return asyncio.ensure_future(self._backend.attach(
                session.target_id, options.tty, options.stdin, options.stdout, stderr))
        return start

    # WebSocket ---------------------------------------------------------------------

    async def _serve_websocket(self, request: HttpRequest, session: PendingSession,
                               reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        supported = (WEBSOCKET_TUNNEL_PROTOCOL,) if session.kind == "portforward" \
            else rc.WEBSOCKET_PROTOCOLS
        protocol = choose_subprotocol(offered_subprotocols(request.headers), supported)
        if protocol is None:
            raise HttpError(400, "Bad Request",
                            f"unable to upgrade: no supported subprotocol; server accepts "
                            f"{list(supported)}")
        try:
            response = handshake_response(request.headers, protocol)
        except WebSocketError as exc:
            raise HttpError(400, "Bad Request", f"unable to upgrade: {exc}") from exc
        writer.write(response)
        await writer.drain()
        websocket = WebSocketConnection(reader, writer, protocol,
                                        self._limits.max_websocket_message_bytes)
        if session.kind == "portforward":
            await self._port_forward_tunnelled(websocket, session)
        else:
            await self._remote_command_websocket(websocket, session, protocol)

    async def _port_forward_tunnelled(self, websocket: WebSocketConnection,
                                      session: PendingSession) -> None:
        transport = WebSocketTransport(websocket)
        transport.start()
        connection = SpdyConnection(transport, self._limits)
        connection.start()
        try:
            await self._port_forward(connection, session)
        finally:
            await connection.close()

    async def _remote_command_websocket(self, websocket: WebSocketConnection,
                                        session: PendingSession, protocol: str) -> None:
        channels = WebSocketChannels(websocket, session.options, protocol)
        channels.start()
        try:
            await channels.announce()
            await rc.run_remote_command(channels.session_channels(), protocol,
                                        self._starter(session), describe(session),
                                        websocket.closed)
            await websocket.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channels.finished.wait(), CLIENT_CLOSE_GRACE)
        finally:
            await channels.stop()


def container_stream_options(request: AttachRequestLike) -> rc.StreamOptions:
    """The streams an exec or attach asks for, checked as kubelet's streaming server checks
    them (ValueError: what is wrong)."""
    if not request.container_id:
        raise ValueError("missing required container_id")
    if request.tty and request.stderr:
        raise ValueError("tty and stderr cannot both be true")
    if not (request.stdin or request.stdout or request.stderr):
        raise ValueError("one of stdin, stdout, or stderr must be set")
    return rc.StreamOptions(request.stdin, request.stdout, request.stderr, request.tty)


def describe(session: PendingSession) -> str:
    if session.kind == "exec":
        return f"command {list(session.cmd)}"
    return f"attach to container {session.target_id}"


class SpdyOutput:
    """An output channel on a SPDY stream: close() half-closes it."""

    def __init__(self, stream: SpdyStream) -> None:
        self._stream = stream

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        await self._stream.close_write()


def _output(stream: SpdyStream | None) -> SpdyOutput | None:
    return SpdyOutput(stream) if stream is not None else None


async def collect_streams(connection: SpdyConnection,
                          expected: set[str]) -> dict[str, SpdyStream] | None:
    """Accept (and reply to) the client's streams until every expected type is
    there, as kubelet does before starting the command. None if the client left."""
    streams: dict[str, SpdyStream] = {}
    while not expected.issubset(streams):
        stream = await connection.accept()
        if stream is None:
            return None
        stream_type = stream.header("streamtype") or ""
        if stream_type not in rc.STREAM_TYPES:
            await stream.send_reset(RST_PROTOCOL_ERROR)
            continue
        if stream_type in streams:
            await stream.send_reset(RST_STREAM_IN_USE)
            continue
        await connection.reply(stream)
        streams[stream_type] = stream
    return streams


async def refuse_further_streams(connection: SpdyConnection) -> None:
    while (stream := await connection.accept()) is not None:
        await stream.send_reset(RST_PROTOCOL_ERROR)
