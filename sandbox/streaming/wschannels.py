"""Adapters over a WebSocket: channel.k8s.io channels, and a byte pipe for tunnelled SPDY."""

from __future__ import annotations

import asyncio
import contextlib

from sandbox.streaming import remotecommand as rc
from sandbox.streaming.websocket import WebSocketConnection

INPUT_QUEUE_MESSAGES = 64  # back-pressure: the reader waits when a consumer lags
MAX_OUTPUT_MESSAGE = 64 * 1024
MAX_TUNNEL_BUFFER = 4 * 1024 * 1024


class WebSocketInput:
    """An input channel fed by the demultiplexer; b"" is end of input (sticky)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(INPUT_QUEUE_MESSAGES)
        self._ended = False

    async def read(self) -> bytes:
        if self._ended:
            return b""
        data = await self._queue.get()
        if not data:
            self._ended = True
        return data

    async def feed(self, data: bytes) -> None:
        if data:
            await self._queue.put(data)

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(b"")


class WebSocketOutput:
    """An output channel: each write is one or more [channel, data...] messages."""

    def __init__(self, websocket: WebSocketConnection, channel: int) -> None:
        self._websocket = websocket
        self._channel = channel

    async def write(self, data: bytes) -> None:
        prefix = bytes([self._channel])
        for start in range(0, len(data), MAX_OUTPUT_MESSAGE):
            await self._websocket.send_binary(prefix + data[start:start + MAX_OUTPUT_MESSAGE])

    async def close(self) -> None:
        # Nothing to send: the session ends with the WebSocket close frame,
        # which every client treats as the end of all output channels. (v5's
        # close signal is only relied upon from client to server.)
        return


class WebSocketChannels:
    """Demultiplexes a v4/v5 channel.k8s.io WebSocket for one exec/attach."""

    def __init__(self, websocket: WebSocketConnection, options: rc.StreamOptions,
                 close_signal: bool) -> None:
        self._websocket = websocket
        self._options = options
        self._close_signal = close_signal
        self._inputs = {rc.CHANNEL_STDIN: WebSocketInput(), rc.CHANNEL_RESIZE: WebSocketInput()}
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # the client closed or the connection dropped

    def start(self) -> None:
        self._task = asyncio.create_task(self._demultiplex())

    def session_channels(self) -> rc.SessionChannels:
        def output(channel: int) -> WebSocketOutput:
            return WebSocketOutput(self._websocket, channel)

        options = self._options
        return rc.SessionChannels(
            error=output(rc.CHANNEL_ERROR),
            stdin=self._inputs[rc.CHANNEL_STDIN] if options.stdin else None,
            stdout=output(rc.CHANNEL_STDOUT) if options.stdout else None,
            stderr=output(rc.CHANNEL_STDERR) if options.stderr and not options.tty else None,
            resize=self._inputs[rc.CHANNEL_RESIZE] if options.tty else None)

    async def _demultiplex(self) -> None:
        try:
            while (message := await self._websocket.receive()) is not None:
                if not message:
                    continue
                channel = message[0]
                if channel == rc.CHANNEL_CLOSE and self._close_signal and len(message) > 1:
                    closed = self._inputs.get(message[1])
                    if closed is not None:
                        closed.end()
                    continue
                target = self._inputs.get(channel)
                if target is not None:
                    await target.feed(message[1:])
        finally:
            for channel_input in self._inputs.values():
                channel_input.end()
            self.finished.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._websocket.abort()


class WebSocketTransport:
    """A byte stream carried in WebSocket binary messages (SPDY/3.1+portforward.k8s.io).

    Message boundaries mean nothing: the peer may split SPDY frames anywhere."""

    def __init__(self, websocket: WebSocketConnection) -> None:
        self._websocket = websocket
        self._buffer = bytearray()
        self._eof = False
        self._more = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        try:
            while (message := await self._websocket.receive()) is not None:
                self._buffer += message
                self._more.set()
                if len(self._buffer) > MAX_TUNNEL_BUFFER:
                    # Back-pressure: let the SPDY reader catch up before reading more.
                    self._drained.clear()
                    await self._drained.wait()
        finally:
            self._eof = True
            self._more.set()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise EOFError
            self._more.clear()
            await self._more.wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if len(self._buffer) <= MAX_TUNNEL_BUFFER:
            self._drained.set()
        return data

    async def write(self, data: bytes) -> None:
        await self._websocket.send_binary(data)

    async def close(self) -> None:
        await self._websocket.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._websocket.abort()
