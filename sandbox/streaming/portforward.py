"""portforward.k8s.io: each forwarded connection is an (error, data) pair of SPDY streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from sandbox.streaming.backend import StreamBackend
from sandbox.streaming.limits import close_writer
from sandbox.streaming.spdy import (
    RST_PROTOCOL_ERROR,
    RST_REFUSED_STREAM,
    SpdyConnection,
    SpdyStream,
    StreamResetError,
)

log = logging.getLogger(__name__)


PROTOCOL_PORTFORWARD = "portforward.k8s.io"
STREAM_ERROR = "error"
STREAM_DATA = "data"
STREAM_PAIR_TIMEOUT = 30.0
COPY_CHUNK = 32 * 1024


@dataclass
class StreamPair:
    request_id: str
    error: SpdyStream | None = None
    data: SpdyStream | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, stream_type: str, stream: SpdyStream) -> bool:
        """False if that half of the pair already exists."""
        if stream_type == STREAM_ERROR and self.error is None:
            self.error = stream
        elif stream_type == STREAM_DATA and self.data is None:
            self.data = stream
        else:
            return False
        if self.error is not None and self.data is not None:
            self.complete.set()
        return True


def request_id_of(stream: SpdyStream, stream_type: str) -> str:
    """The requestID header; old clients omit it, then the pair is derived
    from stream ids (error stream opened just before its data stream)."""
    request_id = stream.header("requestid")
    if request_id:
        return request_id
    base = stream.stream_id if stream_type == STREAM_ERROR else stream.stream_id - 2
    return str(base)


def parse_port(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    port = int(value)
    return port if 0 < port < 65536 else None


class PortForwardSession:
    """Serves every stream pair a client opens on one SPDY connection."""

    def __init__(self, connection: SpdyConnection, backend: StreamBackend,
                 pod_sandbox_id: str, allowed_ports: Sequence[int],
                 pair_timeout: float = STREAM_PAIR_TIMEOUT) -> None:
        self._connection = connection
        self._backend = backend
        self._pod_sandbox_id = pod_sandbox_id
        self._allowed_ports = set(allowed_ports)
        self._pair_timeout = pair_timeout
        self._pairs: dict[str, StreamPair] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while (stream := await self._connection.accept()) is not None:
                await self._on_stream(stream)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_stream(self, stream: SpdyStream) -> None:
        stream_type = stream.header("streamtype")
        if stream_type not in (STREAM_ERROR, STREAM_DATA):
            await stream.send_reset(RST_PROTOCOL_ERROR)
            return
        request_id = request_id_of(stream, stream_type)
        pair = self._pairs.get(request_id)
        if pair is None:
            pair = StreamPair(request_id)
            self._pairs[request_id] = pair
            self._spawn(self._serve_pair(pair))
        if not pair.add(stream_type, stream):
            await stream.send_reset(RST_REFUSED_STREAM)
            return
        await self._connection.reply(stream)

    async def _serve_pair(self, pair: StreamPair) -> None:
        try:
            await asyncio.wait_for(pair.complete.wait(), self._pair_timeout)
        except TimeoutError:
            log.info("portforward: timed out waiting for the streams of request %s",
                     pair.request_id)
            for stream in (pair.error, pair.data):
                if stream is not None:
                    await stream.send_reset()
            return
        finally:
            self._pairs.pop(pair.request_id, None)
        assert pair.error is not None and pair.data is not None
        try:
            await self._forward(pair.error, pair.data)
        finally:
            for stream in (pair.data, pair.error):
                with contextlib.suppress(StreamResetError):
                    await stream.close_write()

    async def _forward(self, error: SpdyStream, data: SpdyStream) -> None:
        port = parse_port(data.header("port"))
        if port is None or (self._allowed_ports and port not in self._allowed_ports):
            await self._report(error, f"invalid port {data.header('port')!r}")
            return
        try:
            reader, writer = await self._backend.port_forward(self._pod_sandbox_id, port)
        except Exception as exc:  # any failure to connect is reported to the client
            await self._report(error, f"error forwarding port {port} to pod "
                                      f"{self._pod_sandbox_id}: {exc}")
            return
        try:
            await copy_both_ways(data, error, reader, writer)
        finally:
            await close_writer(writer)

    @staticmethod
    async def _report(error: SpdyStream, message: str) -> None:
        log.info("portforward: %s", message)
        with contextlib.suppress(StreamResetError):
            await error.write(message.encode())


async def _client_to_pod(data: SpdyStream, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await data.read(COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _pod_to_client(reader: asyncio.StreamReader, data: SpdyStream) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await reader.read(COPY_CHUNK):
            await data.write(chunk)
        await data.close_write()


async def copy_both_ways(data: SpdyStream, error: SpdyStream,
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the pod side is done; then end the error stream so the
    client finishes the pair, and wait for the client's half."""
    upstream = asyncio.create_task(_client_to_pod(data, writer))
    try:
        await _pod_to_client(reader, data)
        with contextlib.suppress(StreamResetError):
            await error.close_write()
        await upstream
    finally:
        if not upstream.done():
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upstream
