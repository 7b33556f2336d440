"""RFC 6455 WebSocket, server side, over asyncio streams.

A client controls frame and message sizes and the number of fragments: each is bounded
(limits.py), a message is reassembled from a list of fragments joined once (linear in its
size), and the reader yields to the event loop between batches of frames."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from collections.abc import Mapping, Sequence

from sandbox.streaming.limits import (
    FRAMES_PER_YIELD,
    MAX_WEBSOCKET_FRAGMENTS,
    StreamLimits,
    close_writer,
)

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009


class WebSocketError(Exception):
    pass


class FrameTooBig(WebSocketError):
    """A frame, message or fragment count over its limit (close code 1009)."""


def accept_key(client_key: str) -> str:
    digest = hashlib.sha1((client_key + WEBSOCKET_GUID).encode()).digest()
    return base64.b64encode(digest).decode()


def offered_subprotocols(headers: Mapping[str, Sequence[str]]) -> list[str]:
    """Sec-WebSocket-Protocol may be repeated and each may be a comma list."""
    offered: list[str] = []
    for value in headers.get("sec-websocket-protocol", []):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return offered


def choose_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The first protocol in the client's order that we support, as Kubernetes' wsstream
    does. A client that offers none gets "" if "" is supported (no protocol header)."""
    for protocol in offered or [""]:
        if protocol in supported:
            return protocol
    return None


def handshake_response(headers: Mapping[str, Sequence[str]], subprotocol: str | None) -> bytes:
    """The 101 response; raises WebSocketError if the request is not a valid upgrade."""
    keys = headers.get("sec-websocket-key", [])
    versions = headers.get("sec-websocket-version", [])
    if len(keys) != 1 or len(base64.b64decode(keys[0] + "==", validate=False)) < 16:
        raise WebSocketError("missing or bad Sec-WebSocket-Key")
    if "13" not in [v.strip() for v in versions]:
        raise WebSocketError("unsupported Sec-WebSocket-Version")
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(keys[0].strip())}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (servers never mask)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", first, size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", first, 126, size)
    else:
        head = struct.pack(">BBQ", first, 127, size)
    return head + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR as one big integer: much faster in CPython than a per-byte loop.
    repeated = (mask * (len(payload) // 4 + 1))[:len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


class WebSocketConnection:
    """A WebSocket after the handshake: whole messages in, binary messages out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 subprotocol: str | None,
                 max_message: int = StreamLimits.max_websocket_message_bytes) -> None:
        self._reader = reader
        self._max_message = max_message
        self._frames_read = 0
        self._writer = writer
        self.subprotocol = subprotocol
        self._write_lock = asyncio.Lock()
        self._close_sent = False
        self.closed = asyncio.Event()

    async def _write(self, frame: bytes) -> None:
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()

    async def send_binary(self, data: bytes) -> None:
        await self.send(OP_BINARY, data)

    async def send(self, opcode: int, data: bytes) -> None:
        """One unfragmented text or binary message."""
        if self._close_sent:
            raise ConnectionResetError("websocket is closing")
        await self._write(encode_frame(opcode, data))

    async def ping(self, data: bytes = b"") -> None:
        await self._write(encode_frame(OP_PING, data))

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if not self._close_sent:
            self._close_sent = True
            with contextlib.suppress(ConnectionError, OSError):
                await self._write(encode_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode()))
        self.closed.set()

    async def abort(self) -> None:
        self.closed.set()
        await close_writer(self._writer)

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = await self._reader.readexactly(2)
        fin = bool(first & 0x80)
        if first & 0x70:
            raise WebSocketError("reserved bits set without a negotiated extension")
        opcode = first & 0x0F
        if not second & 0x80:
            raise WebSocketError("client frames must be masked")
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", await self._reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", await self._reader.readexactly(8))
        if size > self._max_message:
            raise FrameTooBig(f"frame of {size} bytes exceeds {self._max_message}")
        self._frames_read += 1
        if self._frames_read % FRAMES_PER_YIELD == 0:
            await asyncio.sleep(0)  # buffered frames parse without awaiting: let others run
        mask = await self._reader.readexactly(4)
        payload = await self._reader.readexactly(size) if size else b""
        return fin, opcode, unmask(payload, mask) if payload else b""

    async def receive(self) -> bytes | None:
        """Next text or binary message's bytes; None once the connection is closed."""
        fragments: list[bytes] = []
        size = 0
        fragment_count = 0
        message_started = False
        try:
            while True:
                fin, opcode, payload = await self._read_frame()
                if opcode >= 0x8:
                    if not fin or len(payload) > 125:
                        raise WebSocketError("bad control frame")
                    if not await self._on_control(opcode, payload):
                        return None
                    continue
                if opcode == OP_CONTINUATION and not message_started:
                    raise WebSocketError("continuation without a message")
                if opcode != OP_CONTINUATION and message_started:
                    raise WebSocketError("new message inside a fragmented one")
                if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
                    raise WebSocketError(f"unknown opcode {opcode}")
                message_started = True
                fragment_count += 1
                size += len(payload)
                if size > self._max_message:
                    raise FrameTooBig(f"message exceeds {self._max_message} bytes")
                if fragment_count > MAX_WEBSOCKET_FRAGMENTS:
                    raise FrameTooBig(f"message has more than {MAX_WEBSOCKET_FRAGMENTS} "
                                      f"fragments")
                if payload:
                    fragments.append(payload)
                if fin:
                    return b"".join(fragments)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.closed.set()
            return None
        except FrameTooBig as exc:
            await self.close(CLOSE_TOO_BIG, str(exc)[:100])
            return None
        except WebSocketError as exc:
            await self.close(CLOSE_PROTOCOL_ERROR, str(exc)[:100])
            return None

    async def _on_control(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PING:
            with contextlib.suppress(ConnectionError, OSError):
                await self._write(encode_frame(OP_PONG, payload))
            return True
        if opcode == OP_PONG:
            return True
        # OP_CLOSE: echo the status code, then the connection is over.
        code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NORMAL
        await self.close(code)
        return False
