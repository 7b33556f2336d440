"""Adapters over a WebSocket: channel.k8s.io channels, and a byte pipe for tunnelled SPDY.

The channel protocols, as Kubernetes' wsstream and kubelet define them: every message is one
channel byte then data. Binary protocols (`channel.k8s.io`, `v4.`, `v5.`, or none offered)
send binary messages with the channel as a byte; the base64 ones (`base64.channel.k8s.io`,
`v4.base64.channel.k8s.io`) send text messages whose first character is the channel as an
ASCII digit and whose rest is the data in standard base64, both ways.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from dataclasses import dataclass

from sandbox.streaming import remotecommand as rc
from sandbox.streaming.buffers import ByteQueue
from sandbox.streaming.websocket import OP_BINARY, OP_TEXT, WebSocketConnection

INPUT_BUFFER = 256 * 1024  # per input channel: the demultiplexer waits when a consumer lags
MAX_OUTPUT_MESSAGE = 64 * 1024
MAX_TUNNEL_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class ChannelCodec:
    """How a channel number and its data travel in one message."""

    base64: bool

    def encode(self, channel: int, data: bytes) -> tuple[int, bytes]:
        if self.base64:
            return OP_TEXT, bytes([ord("0") + channel]) + base64.b64encode(data)
        return OP_BINARY, bytes([channel]) + data

    def decode(self, message: bytes) -> tuple[int, bytes] | None:
        """(channel, data), or None for a message to drop (bad base64, as wsstream)."""
        if not self.base64:
            return message[0], message[1:]
        try:
            return message[0] - ord("0"), base64.b64decode(message[1:], validate=True)
        except binascii.Error:
            return None


def codec_for(protocol: str) -> ChannelCodec:
    return ChannelCodec(base64=protocol in rc.WEBSOCKET_BASE64_PROTOCOLS)


class WebSocketOutput:
    """An output channel: each write is one or more channel messages."""

    def __init__(self, websocket: WebSocketConnection, channel: int,
                 codec: ChannelCodec) -> None:
        self._websocket = websocket
        self._channel = channel
        self._codec = codec

    async def write(self, data: bytes) -> None:
        for start in range(0, max(len(data), 1), MAX_OUTPUT_MESSAGE):
            opcode, message = self._codec.encode(self._channel,
                                                 data[start:start + MAX_OUTPUT_MESSAGE])
            await self._websocket.send(opcode, message)

    async def close(self) -> None:
        # Nothing to send: the session ends with the WebSocket close frame,
        # which every client treats as the end of all output channels. (v5's
        # close signal is only relied upon from client to server.)
        return


class WebSocketChannels:
    """Demultiplexes a channel.k8s.io WebSocket (any version, binary or base64) for one
    exec/attach."""

    def __init__(self, websocket: WebSocketConnection, options: rc.StreamOptions,
                 protocol: str) -> None:
        self._websocket = websocket
        self._options = options
        self._close_signal = protocol == rc.PROTOCOL_V5
        self._codec = codec_for(protocol)
        self._inputs = {rc.CHANNEL_STDIN: ByteQueue(INPUT_BUFFER),
                        rc.CHANNEL_RESIZE: ByteQueue(INPUT_BUFFER)}
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # the client closed or the connection dropped

    def start(self) -> None:
        self._task = asyncio.create_task(self._demultiplex())

    async def announce(self) -> None:
        """An empty message on the lowest channel the client reads, as kubelet sends, so a
        client knows the session is set up before any output."""
        options = self._options
        channel = rc.CHANNEL_STDOUT if options.stdout else (
            rc.CHANNEL_STDERR if options.stderr and not options.tty else rc.CHANNEL_ERROR)
        await WebSocketOutput(self._websocket, channel, self._codec).write(b"")

    def session_channels(self) -> rc.SessionChannels:
        def output(channel: int) -> WebSocketOutput:
            return WebSocketOutput(self._websocket, channel, self._codec)

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
                decoded = self._codec.decode(message) if message else None
                if decoded is None:
                    continue
                channel, data = decoded
                if channel == rc.CHANNEL_CLOSE and self._close_signal and data:
                    closed = self._inputs.get(data[0])
                    if closed is not None:
                        closed.end()
                    continue
                target = self._inputs.get(channel)
                if target is not None:
                    await target.put(data)
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
