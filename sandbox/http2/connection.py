"""The server side of one HTTP/2 connection (RFC 9113): frames in, streams and flow control,
frames out. It knows nothing of gRPC: an `Application` sees each request's headers, body and
end, and answers through `respond`, `send_headers` and `send_data`.

Everything runs on the event loop's thread, in `data_received`: no locks, no thread handoffs
(grpc.aio's cost, ARCHITECTURE.md "The CRI socket's own HTTP/2 server"). A peer that breaks
the protocol gets a GOAWAY naming the error and loses its connection; the daemon goes on.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from sandbox.http2.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    MAX_FRAME_LIMIT,
    MAX_WINDOW,
    PING_BYTES,
    PREFACE,
    STREAM_ID_MASK,
    ErrorCode,
    Flag,
    FrameType,
    Http2Error,
    Setting,
    frame,
    goaway,
    header_block_frames,
    rst_stream,
    settings_frame,
    window_update,
)
from sandbox.http2.headers import Header, HeaderDecoder

log = logging.getLogger("flatpod.http2")

# What a stream has yet to send, in order: (is a header block, payload, ends the stream).
Outgoing = tuple[bool, bytes | memoryview, bool]
FrameReader = Callable[[int, int, bytes, list[bytes]], None]  # flags, stream id, payload, out
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class Limits:
    """What one connection may hold (ARCHITECTURE.md says why each value)."""

    max_concurrent_streams: int = 1000
    max_header_list_bytes: int = 64 * 1024
    # A request body is buffered whole (gRPC unary); the window lets a large one stream in
    # without a WINDOW_UPDATE round trip per 64 KiB.
    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024


@dataclass(eq=False, slots=True)
class Stream:
    id: int
    send_window: int
    recv_window: int
    headers: list[Header] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    remote_closed: bool = False  # the peer sent END_STREAM
    local_closed: bool = False  # we sent END_STREAM or reset it
    outbox: deque[Outgoing] = field(default_factory=deque)
    # The application's own state for this stream (gRPC: its call).
    call: object = None


class Application(Protocol):
    """What serves the requests of a connection (sandbox/http2/grpc_calls.py for gRPC)."""

    def request_started(self, conn: Http2Connection, stream: Stream) -> None: ...

    def request_data(self, conn: Http2Connection, stream: Stream) -> None: ...

    def request_complete(self, conn: Http2Connection, stream: Stream) -> None: ...

    def stream_cancelled(self, conn: Http2Connection, stream: Stream) -> None: ...


class Http2Connection(asyncio.Protocol):
    def __init__(self, app: Application, limits: Limits,
                 on_lost: Callable[[Http2Connection], None] | None = None) -> None:
        self.app = app
        self.on_lost = on_lost
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.going_away = False
        self._buffer = bytearray()
        self._preface_seen = False
        self._decoder = HeaderDecoder(limits.max_header_list_bytes)
        # A header block still waiting for its CONTINUATION frames: (stream id, flags, bytes).
        self._partial: tuple[int, int, bytearray] | None = None
        self._send_window = DEFAULT_WINDOW
        self._recv_window = limits.connection_window
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._blocked: dict[int, Stream] = {}  # streams waiting for a window, in order
        self._paused = False
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []
        self._readers = self._frame_readers()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        limits = self.limits
        transport.write(
            settings_frame({
                Setting.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                Setting.INITIAL_WINDOW_SIZE: limits.stream_window,
                Setting.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
            })
            + window_update(0, limits.connection_window - DEFAULT_WINDOW)
        )

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        try:
            if not self._preface_seen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise Http2Error(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 preface")
                    return
                if bytes(buffer[: len(PREFACE)]) != PREFACE:
                    raise Http2Error(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 preface")
                del buffer[: len(PREFACE)]
                self._preface_seen = True
            self._read_frames(buffer, out)
        except Http2Error as err:
            self._fail(err, out)
            return
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.on_lost is not None:
            self.on_lost(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for stream in streams:
            stream.local_closed = True
            self.app.stream_cancelled(self, stream)
        self._wake_waiters()

    def pause_writing(self) -> None:
        # A peer that does not read stops being read: whatever it sends next (pings,
        # settings, requests) would only grow what waits for it here.
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()
        self._wake_waiters()

    # --- reading ----------------------------------------------------------------------------

    def _read_frames(self, buffer: bytearray, out: list[bytes]) -> None:
        pos = 0
        end = len(buffer)
        while end - pos >= FRAME_HEADER_BYTES:
            high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, pos)
            length = (high << 16) | low
            if length > DEFAULT_MAX_FRAME:
                raise Http2Error(ErrorCode.FRAME_SIZE_ERROR,
                                 f"a frame of {length} bytes is beyond {DEFAULT_MAX_FRAME}")
            start = pos + FRAME_HEADER_BYTES
            if end - start < length:
                break
            payload = bytes(buffer[start : start + length])
            pos = start + length
            self._on_frame(kind, flags, stream_id & STREAM_ID_MASK, payload, out)
            if self._closed:
                return
        del buffer[:pos]

    def _frame_readers(self) -> dict[int, FrameReader]:
        return {
            FrameType.DATA: self._on_data,
            FrameType.HEADERS: self._on_headers,
            FrameType.CONTINUATION: self._on_continuation,
            FrameType.SETTINGS: self._on_settings,
            FrameType.WINDOW_UPDATE: self._on_window_update,
            FrameType.PING: self._on_ping,
            FrameType.RST_STREAM: self._on_rst_stream,
            FrameType.GOAWAY: self._on_goaway,
            FrameType.PRIORITY: self._on_priority,
            FrameType.PUSH_PROMISE: self._on_push_promise,
        }

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes,
                  out: list[bytes]) -> None:
        if self._partial is not None and kind != FrameType.CONTINUATION:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "a header block was interrupted")
        reader = self._readers.get(kind)
        if reader is not None:  # frames of unknown types are ignored (RFC 9113, 5.5)
            reader(flags, stream_id, payload, out)

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")

    def _on_priority(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0 or len(payload) != 5:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "a malformed PRIORITY frame")

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes,
                         out: list[bytes]) -> None:
        raise Http2Error(ErrorCode.PROTOCOL_ERROR, "a client may not push")

    def _on_data(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self._consume_connection_window(len(payload), out)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream_id:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream already answered or reset: its data is dropped
        stream.recv_window -= len(payload)
        if stream.recv_window < 0:
            raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR,
                             f"stream {stream_id} sent beyond its window")
        data = _unpad(flags, payload)
        end = bool(flags & Flag.END_STREAM)
        if not stream.local_closed:
            if data:
                stream.body += data
                self.app.request_data(self, stream)
            if not end and stream.recv_window < self.limits.stream_window // 2:
                out.append(window_update(stream_id, self.limits.stream_window - stream.recv_window))
                stream.recv_window = self.limits.stream_window
        if end:
            self._remote_ended(stream)

    def _consume_connection_window(self, length: int, out: list[bytes]) -> None:
        self._recv_window -= length
        if self._recv_window < 0:
            raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "data beyond the connection window")
        if self._recv_window < self.limits.connection_window // 2:
            out.append(window_update(0, self.limits.connection_window - self._recv_window))
            self._recv_window = self.limits.connection_window

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = _unpad(flags, payload)
        if flags & Flag.PRIORITY:
            if len(block) < 5:
                raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a HEADERS priority cut short")
            block = block[5:]
        if not flags & Flag.END_HEADERS:
            self._partial = (stream_id, flags, bytearray(block))
            return
        self._headers_complete(stream_id, flags, block, out)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes,
                         out: list[bytes]) -> None:
        partial = self._partial
        if partial is None or partial[0] != stream_id:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = partial[2]
        block += payload
        if len(block) > self.limits.max_header_list_bytes:
            raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM,
                             f"a header block beyond {self.limits.max_header_list_bytes} bytes")
        if flags & Flag.END_HEADERS:
            self._partial = None
            self._headers_complete(stream_id, partial[1], bytes(block), out)

    def _headers_complete(self, stream_id: int, flags: int, block: bytes,
                          out: list[bytes]) -> None:
        # Decoded even for a stream about to be refused: the decoder's table must follow
        # every block the peer's encoder wrote.
        headers = self._decoder.decode(block)
        end = bool(flags & Flag.END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers of a request
            if stream.remote_closed or not end:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR,
                                 f"a second header block on stream {stream_id}")
            self._remote_ended(stream)
            return
        if stream_id <= self.last_stream_id:
            return  # trailers for a stream already answered or reset
        self.last_stream_id = stream_id
        if self.going_away or len(self.streams) >= self.limits.max_concurrent_streams:
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        stream = Stream(stream_id, self._peer_initial_window, self.limits.stream_window,
                        headers, remote_closed=end)
        self.streams[stream_id] = stream
        self.app.request_started(self, stream)
        if end and not stream.local_closed:
            self.app.request_complete(self, stream)

    def _remote_ended(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            self._forget(stream)
        else:
            self.app.request_complete(self, stream)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS payload not of 6-byte pairs")
        for pos in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, pos)
            if key == Setting.INITIAL_WINDOW_SIZE:
                self._set_peer_initial_window(value)
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
            elif key == Setting.ENABLE_PUSH and value > 1:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
        out.append(frame(FrameType.SETTINGS, Flag.ACK, 0))
        self._flush_blocked(out)

    def _set_peer_initial_window(self, value: int) -> None:
        if value > MAX_WINDOW:
            raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
        delta = value - self._peer_initial_window
        self._peer_initial_window = value
        for stream in self.streams.values():
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "a stream window overflowed")

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes,
                          out: list[bytes]) -> None:
        if len(payload) != 4:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a WINDOW_UPDATE not of 4 bytes")
        increment = _U32.unpack(payload)[0] & STREAM_ID_MASK
        if stream_id == 0:
            if increment == 0:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise Http2Error(ErrorCode.FLOW_CONTROL_ERROR, "the connection window overflowed")
            self._flush_blocked(out)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle {stream_id}")
            return
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            out.append(rst_stream(stream_id, ErrorCode.PROTOCOL_ERROR if increment == 0
                                  else ErrorCode.FLOW_CONTROL_ERROR))
            self._reset_by_us(stream)
            return
        stream.send_window += increment
        self._flush(stream, out)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != PING_BYTES:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a PING not of 8 bytes")
        if not flags & Flag.ACK:
            out.append(frame(FrameType.PING, Flag.ACK, 0, payload))

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes,
                       out: list[bytes]) -> None:
        if len(payload) != 4:
            raise Http2Error(ErrorCode.FRAME_SIZE_ERROR, "a RST_STREAM not of 4 bytes")
        if stream_id == 0 or stream_id > self.last_stream_id:
            raise Http2Error(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_closed = stream.local_closed = True
            self._forget(stream)
            self.app.stream_cancelled(self, stream)

    def _fail(self, err: Http2Error, out: list[bytes]) -> None:
        log.info("HTTP/2 connection closed: %s: %s", err.code.name, err)
        out.append(goaway(self.last_stream_id, err.code, str(err)))
        if self.transport is not None:
            self.transport.write(b"".join(out))
            self.transport.close()
        self._closed = True

    # --- writing ----------------------------------------------------------------------------

    def respond(self, stream: Stream, headers: bytes, data: bytes, trailers: bytes) -> None:
        """A whole answer: headers, one DATA payload and trailers that end the stream, in one
        write when the windows allow (the common case: a unary gRPC answer)."""
        if stream.local_closed:
            return
        size = len(data)
        if (not stream.outbox and size <= self._peer_max_frame and size <= stream.send_window
                and size <= self._send_window and self.transport is not None
                and not self._closed):
            stream.send_window -= size
            self._send_window -= size
            stream.local_closed = True
            sid = stream.id
            out = [frame(FrameType.HEADERS, Flag.END_HEADERS, sid, headers),
                   frame(FrameType.DATA, 0, sid, data),
                   frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, sid, trailers)]
            self._closed_locally(stream, out)
            self.transport.write(b"".join(out))
            return
        stream.outbox.append((True, headers, False))
        stream.outbox.append((False, memoryview(data), False))
        stream.outbox.append((True, trailers, True))
        self._write_flushed(stream)

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        if stream.local_closed:
            return
        stream.outbox.append((True, block, end_stream))
        self._write_flushed(stream)

    def send_data(self, stream: Stream, data: bytes) -> None:
        if stream.local_closed:
            return
        stream.outbox.append((False, memoryview(data), False))
        self._write_flushed(stream)

    async def writable(self, stream: Stream) -> None:
        """Returns once what the stream sent has left for the socket (or the stream ended):
        a streaming call's pace is its reader's."""
        while (stream.outbox or self._paused) and not stream.local_closed and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _write_flushed(self, stream: Stream) -> None:
        out: list[bytes] = []
        self._flush(stream, out)
        if out and self.transport is not None and not self._closed:
            self.transport.write(b"".join(out))

    def _flush(self, stream: Stream, out: list[bytes]) -> None:
        outbox = stream.outbox
        sid = stream.id
        while outbox:
            is_headers, payload, end = outbox[0]
            if is_headers:
                outbox.popleft()
                out.extend(header_block_frames(sid, bytes(payload), end, self._peer_max_frame))
                if end:
                    self._closed_locally(stream, out)
                    break
                continue
            allowed = min(stream.send_window, self._send_window, self._peer_max_frame)
            size = len(payload)
            if size and allowed <= 0:
                self._blocked[sid] = stream
                return
            chunk = min(size, allowed)
            last = chunk == size
            flags = Flag.END_STREAM if last and end else 0
            out.append(frame(FrameType.DATA, flags, sid, bytes(payload[:chunk])))
            stream.send_window -= chunk
            self._send_window -= chunk
            if last:
                outbox.popleft()
                if end:
                    self._closed_locally(stream, out)
                    break
            else:
                outbox[0] = (False, payload[chunk:], end)
        self._blocked.pop(sid, None)
        self._wake_waiters()

    def _flush_blocked(self, out: list[bytes]) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self._flush(stream, out)

    def _closed_locally(self, stream: Stream, out: list[bytes]) -> None:
        stream.local_closed = True
        stream.outbox.clear()
        if not stream.remote_closed:
            # Answered before the request ended: the rest of it is not needed (RFC 9113, 8.1).
            out.append(rst_stream(stream.id, ErrorCode.NO_ERROR))
            stream.remote_closed = True
        self._forget(stream)

    def _reset_by_us(self, stream: Stream) -> None:
        stream.local_closed = stream.remote_closed = True
        stream.outbox.clear()
        self._forget(stream)
        self.app.stream_cancelled(self, stream)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if self.going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- shutdown ---------------------------------------------------------------------------

    def go_away(self) -> None:
        """Takes no new streams; the connection closes once the open ones are answered."""
        if self.going_away or self._closed or self.transport is None:
            return
        self.going_away = True
        self.transport.write(goaway(self.last_stream_id, ErrorCode.NO_ERROR, "shutting down"))
        if not self.streams:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & Flag.PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise Http2Error(ErrorCode.PROTOCOL_ERROR, "padding beyond the frame")
    return payload[1 : len(payload) - payload[0]]
