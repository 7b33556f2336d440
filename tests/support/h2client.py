"""A raw HTTP/2 client for wire tests (RFC 9113 framing, HPACK from the `hpack` package).

It judges a gRPC server by the frames it sends, so it does no more than the tests ask: it
writes any frame (malformed ones too), keeps HPACK state and each stream's headers, data,
trailers and resets as frames arrive, answers the server's SETTINGS and (optionally) returns
flow-control credit. It never hides a protocol error from the test.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import hpack

# RFC 9113's numbers are facts, shared with the server; the client's behaviour is its own.
from sandbox.http2.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
)

FRAME_HEADER = struct.Struct(">HBBBI")  # 24-bit length as (16 high bits, 8 low bits)


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_frame(self.type, self.flags, self.stream_id, self.payload)

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)

    def __repr__(self) -> str:
        try:
            kind = FrameType(self.type).name
        except ValueError:
            kind = f"type 0x{self.type:x}"
        return f"<{kind} flags=0x{self.flags:x} stream={self.stream_id} len={len(self.payload)}>"


def encode_frame(kind: int, flags: int, stream_id: int, payload: bytes,
                 length: int | None = None) -> bytes:
    """A frame's bytes; `length` overrides the header's length field (for malformed frames)."""
    n = len(payload) if length is None else length
    return FRAME_HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id & 0xFFFFFFFF) + payload


def settings_payload(settings: dict[int, int]) -> bytes:
    return b"".join(struct.pack(">HI", key, value) for key, value in settings.items())


def window_update_payload(increment: int) -> bytes:
    return struct.pack(">I", increment)


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1: an integer with an N-bit prefix (`first` holds the byte's other bits)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 0x80:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    out.append(value)
    return bytes(out)


def plain_header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing and without Huffman (RFC 7541 §6.2.2):
    its size is exact and it leaves both HPACK tables alone, so it can be sent any number
    of times, or never, between blocks of the connection's encoder."""
    out = bytearray()
    for name, value in headers:
        raw_name, raw_value = name.encode(), value.encode()
        out += b"\x00" + hpack_integer(len(raw_name), 7) + raw_name
        out += hpack_integer(len(raw_value), 7) + raw_value
    return bytes(out)


def grpc_message(body: bytes, compressed: bool = False, length: int | None = None) -> bytes:
    """A Length-Prefixed-Message; `length` overrides the announced length."""
    announced = len(body) if length is None else length
    return struct.pack(">BI", 1 if compressed else 0, announced) + body


def grpc_request_headers(path: str, extra: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
        ("te", "trailers"), ("content-type", "application/grpc"), *extra,
    ]


@dataclass(frozen=True)
class Goaway:
    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass
class StreamState:
    """What the server sent on one stream."""

    headers: list[tuple[str, str]] | None = None
    trailers: list[tuple[str, str]] | None = None
    data: bytearray = field(default_factory=bytearray)
    data_frames: int = 0
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False  # END_STREAM seen
    # The server's send credit for this stream as we account it (its window for our DATA).
    send_window: int = DEFAULT_WINDOW

    @property
    def closed(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def all_headers(self) -> list[tuple[str, str]]:
        return [*(self.headers or []), *(self.trailers or [])]

    def header(self, name: str) -> str | None:
        for key, value in self.all_headers:
            if key == name:
                return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str | None:
        return self.header("grpc-message")

    def messages(self) -> list[bytes]:
        """The Length-Prefixed-Messages of the response body (raises on a torn one)."""
        out, rest = [], bytes(self.data)
        while rest:
            if len(rest) < 5:
                raise ValueError(f"torn message prefix: {rest!r}")
            flag, size = struct.unpack(">BI", rest[:5])
            if flag != 0:
                raise ValueError(f"compressed flag {flag} in a response without grpc-encoding")
            if len(rest) < 5 + size:
                raise ValueError(f"message of {size} bytes, only {len(rest) - 5} arrived")
            out.append(rest[5:5 + size])
            rest = rest[5 + size:]
        return out

    def describe(self) -> str:
        return (f"headers={self.headers} trailers={self.trailers} data={len(self.data)}B "
                f"in {self.data_frames} frames reset={self.reset} ended={self.ended}")


class ConnectionClosed(Exception):
    """The server closed the socket."""


class H2Connection:
    """One HTTP/2 connection over a unix socket, blocking, driven by the test."""

    def __init__(self, path: Path, timeout: float = 5.0, auto_window_update: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        # Return credit for every DATA byte received (off: the test grants it by hand).
        self.auto_window_update = auto_window_update
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.buffer = bytearray()
        self.received: list[Frame] = []  # every frame, in order
        self.server_settings: dict[int, int] = {}
        self.settings_seen = 0
        self.settings_acks = 0
        self.ping_acks: list[bytes] = []
        self.goaway: Goaway | None = None
        self.closed = False
        self.streams: dict[int, StreamState] = {}
        self.connection_send_window = DEFAULT_WINDOW
        self.next_stream_id = 1
        self._block: tuple[int, bytearray] | None = None  # a header block being continued

    # --- sending ---------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            # Not a refusal: the server neither read nor hung up (the test must not take it
            # for a closed connection).
            raise AssertionError(f"the server stopped reading for {self.timeout} s") from None

    def send_frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.send_raw(encode_frame(kind, flags, stream_id, payload))

    def send_settings(self, settings: dict[int, int] | None = None) -> None:
        self.send_frame(FrameType.SETTINGS, 0, 0, settings_payload(settings or {}))

    def send_preface(self, settings: dict[int, int] | None = None) -> None:
        self.send_raw(PREFACE)
        self.send_settings(settings)

    def handshake(self, settings: dict[int, int] | None = None) -> dict[int, int]:
        """Preface and SETTINGS both ways; the server's settings once its SETTINGS arrived."""
        self.send_preface(settings)
        self.read_until(lambda: self.settings_seen > 0, what="the server's SETTINGS")
        return self.server_settings

    def sync(self) -> None:
        """A PING round trip: every frame the server sent before its ACK has been read."""
        opaque = struct.pack(">Q", time.monotonic_ns())
        self.ping(opaque)
        self.read_until(lambda: opaque in self.ping_acks, what="PING ACK")

    def send_tolerant(self, data: bytes) -> bool:
        """Sends what a server may refuse mid-way; False if it hung up first."""
        try:
            self.send_raw(data)
            return True
        except OSError:
            self.closed = True
            return False

    def encode_headers(self, headers: Iterable[tuple[str, str]]) -> bytes:
        block: bytes = self.encoder.encode(list(headers))
        return block

    def new_stream_id(self) -> int:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        return stream_id

    def stream(self, stream_id: int) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            initial = self.server_settings.get(Setting.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
            state = self.streams[stream_id] = StreamState(send_window=initial)
        return state

    def send_headers(self, headers: Iterable[tuple[str, str]], end_stream: bool = False,
                     stream_id: int | None = None, fragment: int | None = None,
                     plain: bool = False) -> int:
        """HEADERS (split into CONTINUATION frames of `fragment` bytes if given); `plain`:
        a block of `plain_header_block` (fast for huge headers) instead of the encoder's."""
        sid = self.new_stream_id() if stream_id is None else stream_id
        self.stream(sid)
        block = plain_header_block(headers) if plain else self.encode_headers(headers)
        size = fragment or len(block) or 1
        pieces = [block[i:i + size] for i in range(0, len(block), size)] or [b""]
        out = bytearray()
        for index, piece in enumerate(pieces):
            flags = Flag.END_HEADERS if index == len(pieces) - 1 else 0
            if index == 0:
                flags |= Flag.END_STREAM if end_stream else 0
            kind = FrameType.HEADERS if index == 0 else FrameType.CONTINUATION
            out += encode_frame(kind, flags, sid, piece)
        self.send_raw(bytes(out))
        return sid

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False,
                  frame_size: int | None = None) -> None:
        """DATA within the server's flow-control windows, waiting for its WINDOW_UPDATEs."""
        max_frame = self.server_settings.get(Setting.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
        size = min(frame_size or max_frame, max_frame)
        state = self.stream(stream_id)
        view = memoryview(data)
        while True:
            credit = min(state.send_window, self.connection_send_window, size)
            if view and credit <= 0:
                self.read_until(
                    lambda: state.closed or min(state.send_window,
                                                self.connection_send_window) > 0,
                    what=f"flow-control credit for stream {stream_id}")
                if state.closed:
                    return
                continue
            chunk = bytes(view[:credit])
            view = view[len(chunk):]
            last = not view
            self.send_frame(FrameType.DATA, Flag.END_STREAM if last and end_stream else 0,
                            stream_id, chunk)
            state.send_window -= len(chunk)
            self.connection_send_window -= len(chunk)
            if last:
                return

    def unary(self, path: str, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> int:
        """A gRPC unary request (HEADERS, then one DATA with END_STREAM); its stream id."""
        stream_id = self.send_headers(grpc_request_headers(path, extra))
        self.send_data(stream_id, grpc_message(body), end_stream=True)
        return stream_id

    def reset(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        self.send_frame(FrameType.RST_STREAM, 0, stream_id, struct.pack(">I", code))

    def ping(self, opaque: bytes) -> None:
        self.send_frame(FrameType.PING, 0, 0, opaque)

    def window_update(self, stream_id: int, increment: int) -> None:
        self.send_frame(FrameType.WINDOW_UPDATE, 0, stream_id, window_update_payload(increment))

    # --- receiving -------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """More bytes into the buffer; False when the deadline passed first."""
        remaining = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.sock], [], [], remaining)
        if not ready:
            return False
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            raise ConnectionClosed("the server closed the connection")
        self.buffer += chunk
        return True

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next frame (already processed), or None if none came within the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buffer) >= 9:
                high, low, kind, flags, sid = FRAME_HEADER.unpack_from(self.buffer)
                length = (high << 8) | low
                if len(self.buffer) >= 9 + length:
                    frame = Frame(kind, flags, sid & 0x7FFFFFFF, bytes(self.buffer[9:9 + length]))
                    del self.buffer[:9 + length]
                    self._process(frame)
                    return frame
            if not self._fill(deadline):
                return None

    def read_until(self, done: Callable[[], bool], timeout: float | None = None,
                   what: str = "the expected frames") -> None:
        """Reads frames until `done()`; AssertionError naming `what` after the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or (self.read_frame(left) is None and not done()):
                raise AssertionError(
                    f"no {what} within the timeout; frames so far: {self.received[-20:]}")

    def drain(self, timeout: float) -> list[Frame]:
        """Every frame that arrives within `timeout` (stops early if the server closes)."""
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        try:  # at least one poll, so that drain(0) takes what has already arrived
            while (frame := self.read_frame(max(0.0, deadline - time.monotonic()))) is not None:
                frames.append(frame)
        except ConnectionClosed:
            pass
        return frames

    def read_until_closed(self, timeout: float | None = None) -> list[Frame]:
        """Frames until the server closes the socket; AssertionError if it stays open."""
        frames: list[Frame] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while (left := deadline - time.monotonic()) > 0:
                frame = self.read_frame(left)
                if frame is not None:
                    frames.append(frame)
        except ConnectionClosed:
            return frames
        raise AssertionError(f"the server kept the connection open; frames: {frames[-20:]}")

    def wait_stream(self, stream_id: int, timeout: float | None = None) -> StreamState:
        """The stream once it ended (END_STREAM or RST_STREAM)."""
        state = self.stream(stream_id)
        self.read_until(lambda: state.closed, timeout, what=f"end of stream {stream_id}")
        return state

    def _process(self, frame: Frame) -> None:
        self.received.append(frame)
        if self._block is not None and frame.type != FrameType.CONTINUATION:
            raise AssertionError(f"server interrupted a header block with {frame}")
        handlers: dict[int, Callable[[Frame], None]] = {
            FrameType.SETTINGS: self._on_settings,
            FrameType.PING: self._on_ping,
            FrameType.GOAWAY: self._on_goaway,
            FrameType.WINDOW_UPDATE: self._on_window_update,
            FrameType.RST_STREAM: self._on_rst,
            FrameType.DATA: self._on_data,
            FrameType.HEADERS: self._on_headers,
            FrameType.CONTINUATION: self._on_continuation,
        }
        handler = handlers.get(frame.type)
        if handler is not None:
            handler(frame)

    def _reply(self, data: bytes) -> None:
        """An automatic answer (ACK, credit); a server that already hung up is the test's
        to judge, not an error of the client's."""
        try:
            self.send_raw(data)
        except OSError:
            self.closed = True

    def _on_settings(self, frame: Frame) -> None:
        if frame.has(Flag.ACK):
            self.settings_acks += 1
            return
        for offset in range(0, len(frame.payload) - len(frame.payload) % 6, 6):
            key, value = struct.unpack_from(">HI", frame.payload, offset)
            if key == Setting.INITIAL_WINDOW_SIZE:
                delta = value - self.server_settings.get(key, DEFAULT_WINDOW)
                for state in self.streams.values():
                    state.send_window += delta
            self.server_settings[key] = value
        self.settings_seen += 1
        self._reply(encode_frame(FrameType.SETTINGS, Flag.ACK, 0, b""))

    def _on_ping(self, frame: Frame) -> None:
        if frame.has(Flag.ACK):
            self.ping_acks.append(frame.payload)
        else:
            self._reply(encode_frame(FrameType.PING, Flag.ACK, 0, frame.payload))

    def _on_goaway(self, frame: Frame) -> None:
        if len(frame.payload) < 8:
            raise AssertionError(f"malformed GOAWAY from the server: {frame.payload!r}")
        last, code = struct.unpack_from(">II", frame.payload)
        self.goaway = Goaway(last & 0x7FFFFFFF, code, frame.payload[8:])

    def _on_window_update(self, frame: Frame) -> None:
        (increment,) = struct.unpack(">I", frame.payload)
        if frame.stream_id == 0:
            self.connection_send_window += increment & 0x7FFFFFFF
        else:
            self.stream(frame.stream_id).send_window += increment & 0x7FFFFFFF

    def _on_rst(self, frame: Frame) -> None:
        (self.stream(frame.stream_id).reset,) = struct.unpack(">I", frame.payload[:4])

    def _on_data(self, frame: Frame) -> None:
        state = self.stream(frame.stream_id)
        body = frame.payload
        if frame.has(Flag.PADDED):
            body = body[1:len(body) - body[0]]
        state.data += body
        state.data_frames += 1
        state.ended = state.ended or frame.has(Flag.END_STREAM)
        if self.auto_window_update and frame.payload:
            increment = window_update_payload(len(frame.payload))
            self._reply(encode_frame(FrameType.WINDOW_UPDATE, 0, 0, increment)
                          + encode_frame(FrameType.WINDOW_UPDATE, 0, frame.stream_id, increment))

    def _on_headers(self, frame: Frame) -> None:
        block = frame.payload
        if frame.has(Flag.PADDED):
            block = block[1:len(block) - block[0]]
        if frame.has(Flag.PRIORITY):
            block = block[5:]
        self._block = (frame.flags, bytearray(block))
        if frame.has(Flag.END_HEADERS):
            self._end_block(frame.stream_id)

    def _on_continuation(self, frame: Frame) -> None:
        if self._block is None:
            raise AssertionError(f"CONTINUATION without a header block: {frame}")
        self._block[1].extend(frame.payload)
        if frame.has(Flag.END_HEADERS):
            self._end_block(frame.stream_id)

    def _end_block(self, stream_id: int) -> None:
        assert self._block is not None
        flags, block = self._block
        self._block = None
        headers = [(str(k), str(v)) for k, v in self.decoder.decode(bytes(block))]
        state = self.stream(stream_id)
        if state.headers is None and flags & Flag.END_STREAM and any(
                k == "grpc-status" for k, _ in headers):
            state.headers, state.trailers = headers, headers  # Trailers-Only
        elif state.headers is None:
            state.headers = headers
        else:
            state.trailers = headers
        state.ended = state.ended or bool(flags & Flag.END_STREAM)

    def close(self) -> None:
        self.sock.close()
