"""SPDY/3.1 framing and a server-side multiplexed connection.

Only what the Kubernetes streaming protocols need is implemented: the peer
(kubelet, crictl, critest through client-go's spdystream) opens every stream;
this side answers each with SYN_REPLY and exchanges DATA on it.

Flow control: client-go's spdystream neither sends WINDOW_UPDATE nor obeys
it. If this side strictly waited for a window that a real client never
re-opens, any stream would stall after 64 KiB. So the peer's windows are
tracked from the start but only *enforced* once the peer has proved it does
flow control (it sent a WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting).
In the other direction this side always advertises WINDOW_UPDATEs as the
application consumes data, and applies back-pressure by not reading the
socket while a stream, or the connection as a whole, holds too much unconsumed
data.

Everything the peer controls is bounded (limits.py): frame sizes, the inflated
size of each header block (a few bytes of zlib can inflate to gigabytes), the
number of open streams, and how many frames are parsed before other work on the
event loop gets a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sandbox.streaming.buffers import next_chunk
from sandbox.streaming.limits import (
    FRAMES_PER_YIELD,
    MAX_BUFFERED_PER_CONNECTION,
    MAX_BUFFERED_PER_STREAM,
    StreamLimits,
    close_writer,
)

log = logging.getLogger(__name__)


SPDY_VERSION = 3

TYPE_SYN_STREAM = 1
TYPE_SYN_REPLY = 2
TYPE_RST_STREAM = 3
TYPE_SETTINGS = 4
TYPE_PING = 6
TYPE_GOAWAY = 7
TYPE_HEADERS = 8
TYPE_WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

RST_PROTOCOL_ERROR = 1
RST_INVALID_STREAM = 2
RST_REFUSED_STREAM = 3
RST_CANCEL = 5
RST_INTERNAL_ERROR = 6
RST_FLOW_CONTROL_ERROR = 7
RST_STREAM_IN_USE = 8

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

SETTINGS_INITIAL_WINDOW_SIZE = 7

# Header names and values in one block: kubelet's clients send fewer than ten; a block of
# tens of thousands of empty ones would take tens of ms of the event loop to decode.
MAX_HEADER_VALUES = 1024
# SPDY/3 defines eight settings; a frame with thousands of entries is not a client's.
MAX_SETTINGS = 64

DEFAULT_WINDOW = 64 * 1024
MAX_DATA_FRAME = 16 * 1024

# Header names of the SPDY/3 compression dictionary, each stored in the
# dictionary behind a 4-byte big-endian length (section 2.6.10.1 of draft 3).
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
# The dictionary ends with common values, concatenated without lengths.
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _build_dictionary() -> bytes:
    parts = [struct.pack(">I", len(word)) + word.encode() for word in _DICTIONARY_WORDS]
    return b"".join(parts) + _DICTIONARY_TAIL.encode()


HEADER_DICTIONARY = _build_dictionary()

Headers = Mapping[str, Sequence[str]]


class SpdyProtocolError(Exception):
    """The peer sent something that is not valid SPDY/3.1."""


class StreamResetError(ConnectionError):
    """The stream was reset, or the connection went away, before the write."""


# ---------------------------------------------------------------------------
# Header blocks


class HeaderCompressor:
    """One zlib deflate context per connection direction, as SPDY/3 requires."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15,
                                         zdict=HEADER_DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self, max_block: int = StreamLimits.max_header_block_bytes) -> None:
        self._inflate = zlib.decompressobj(15, zdict=HEADER_DICTIONARY)
        self._max_block = max_block

    def decompress(self, data: bytes) -> dict[str, list[str]]:
        """Inflates at most max_block + 1 bytes: a bigger block is refused before it
        exists in memory. The zlib context is then out of step, so the caller must end
        the connection (a SpdyProtocolError does)."""
        try:
            block = self._inflate.decompress(data, self._max_block + 1)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header block decompression failed: {exc}") from exc
        if len(block) > self._max_block:
            raise SpdyProtocolError(
                f"header block inflates to more than {self._max_block} bytes")
        return decode_header_block(block)


def encode_header_block(headers: Headers) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name = name.lower().encode()
        # Several values of one header travel as one NUL-separated value.
        raw_value = b"\x00".join(v.encode() for v in values)
        out.append(struct.pack(">I", len(raw_name)) + raw_name)
        out.append(struct.pack(">I", len(raw_value)) + raw_value)
    return b"".join(out)


def decode_header_block(block: bytes) -> dict[str, list[str]]:
    view = memoryview(block)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise SpdyProtocolError("truncated header block")
        chunk = bytes(view[pos:pos + n])
        pos += n
        return chunk

    (count,) = struct.unpack(">I", take(4))
    headers: dict[str, list[str]] = {}
    total_values = 0
    if count > MAX_HEADER_VALUES:
        raise SpdyProtocolError(f"header block has {count} headers, more than "
                                f"{MAX_HEADER_VALUES}")
    for _ in range(count):
        (name_len,) = struct.unpack(">I", take(4))
        name = take(name_len).decode("utf-8", "replace").lower()
        (value_len,) = struct.unpack(">I", take(4))
        raw_values = take(value_len)
        # Count before splitting: 256 KiB of NULs would be 256 Ki empty strings.
        total_values += raw_values.count(b"\x00") + 1
        if total_values > MAX_HEADER_VALUES:
            raise SpdyProtocolError(f"header block has more than {MAX_HEADER_VALUES} values")
        values = raw_values.decode("utf-8", "replace").split("\x00")
        headers.setdefault(name, []).extend(values)
    return headers


# ---------------------------------------------------------------------------
# Frames


@dataclass
class DataFrame:
    stream_id: int
    flags: int
    data: bytes


@dataclass
class ControlFrame:
    frame_type: int
    flags: int
    payload: bytes


@dataclass
class SynStream:
    stream_id: int
    associated_id: int
    priority: int
    flags: int
    headers: dict[str, list[str]]


Frame = DataFrame | ControlFrame


def encode_control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > 0xFFFFFF:
        raise ValueError("control frame payload too large")
    head = struct.pack(">HHI", 0x8000 | SPDY_VERSION, frame_type, (flags << 24) | len(payload))
    return head + payload


def encode_data(stream_id: int, flags: int, data: bytes) -> bytes:
    if len(data) > 0xFFFFFF:
        raise ValueError("data frame payload too large")
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_syn_stream(stream_id: int, headers: Headers, compressor: HeaderCompressor,
                      flags: int = 0, priority: int = 0, associated_id: int = 0) -> bytes:
    payload = struct.pack(">IIBB", stream_id, associated_id, (priority & 7) << 5, 0)
    return encode_control(TYPE_SYN_STREAM, flags, payload + compressor.compress(headers))


def encode_syn_reply(stream_id: int, headers: Headers, compressor: HeaderCompressor,
                     flags: int = 0) -> bytes:
    payload = struct.pack(">I", stream_id) + compressor.compress(headers)
    return encode_control(TYPE_SYN_REPLY, flags, payload)


def encode_headers(stream_id: int, headers: Headers, compressor: HeaderCompressor,
                   flags: int = 0) -> bytes:
    payload = struct.pack(">I", stream_id) + compressor.compress(headers)
    return encode_control(TYPE_HEADERS, flags, payload)


def encode_rst_stream(stream_id: int, status: int) -> bytes:
    return encode_control(TYPE_RST_STREAM, 0, struct.pack(">II", stream_id, status))


def encode_settings(settings: Mapping[int, int], flags: int = 0) -> bytes:
    entries = b"".join(struct.pack(">II", setting_id & 0xFFFFFF, value)
                       for setting_id, value in settings.items())
    return encode_control(TYPE_SETTINGS, flags, struct.pack(">I", len(settings)) + entries)


def encode_ping(ping_id: int) -> bytes:
    return encode_control(TYPE_PING, 0, struct.pack(">I", ping_id))


def encode_goaway(last_good_stream_id: int, status: int) -> bytes:
    return encode_control(TYPE_GOAWAY, 0, struct.pack(">II", last_good_stream_id, status))


def encode_window_update(stream_id: int, delta: int) -> bytes:
    return encode_control(TYPE_WINDOW_UPDATE, 0,
                          struct.pack(">II", stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF))


def parse_syn_stream(frame: ControlFrame, decompressor: HeaderDecompressor) -> SynStream:
    if len(frame.payload) < 10:
        raise SpdyProtocolError("short SYN_STREAM")
    stream_id, associated_id, priority, _slot = struct.unpack(">IIBB", frame.payload[:10])
    headers = decompressor.decompress(frame.payload[10:])
    return SynStream(stream_id & 0x7FFFFFFF, associated_id & 0x7FFFFFFF, priority >> 5,
                     frame.flags, headers)


def parse_stream_headers(frame: ControlFrame,
                         decompressor: HeaderDecompressor) -> tuple[int, dict[str, list[str]]]:
    """SYN_REPLY and HEADERS: a stream id then a header block."""
    if len(frame.payload) < 4:
        raise SpdyProtocolError("short header frame")
    (stream_id,) = struct.unpack(">I", frame.payload[:4])
    return stream_id & 0x7FFFFFFF, decompressor.decompress(frame.payload[4:])


def parse_two_words(frame: ControlFrame) -> tuple[int, int]:
    """RST_STREAM, GOAWAY and WINDOW_UPDATE carry two 32-bit words."""
    if len(frame.payload) != 8:
        raise SpdyProtocolError(f"control frame type {frame.frame_type} has bad length")
    first, second = struct.unpack(">II", frame.payload)
    return first & 0x7FFFFFFF, second


def parse_settings(frame: ControlFrame) -> dict[int, int]:
    if len(frame.payload) < 4:
        raise SpdyProtocolError("short SETTINGS")
    (count,) = struct.unpack(">I", frame.payload[:4])
    if count > MAX_SETTINGS:
        raise SpdyProtocolError(f"SETTINGS with {count} entries, more than {MAX_SETTINGS}")
    if len(frame.payload) != 4 + 8 * count:
        raise SpdyProtocolError("SETTINGS length mismatch")
    settings: dict[int, int] = {}
    for index in range(count):
        flags_and_id, value = struct.unpack(">II", frame.payload[4 + 8 * index:12 + 8 * index])
        settings[flags_and_id & 0xFFFFFF] = value
    return settings


class ByteTransport(Protocol):
    """A reliable byte stream: TCP, TLS, or SPDY tunnelled in WebSocket messages."""

    async def read_exactly(self, n: int) -> bytes: ...  # raises EOFError at end of stream

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


async def read_frame(transport: ByteTransport,
                     max_frame: int = StreamLimits.max_frame_bytes) -> Frame:
    head = await transport.read_exactly(8)
    first, second = struct.unpack(">II", head)
    flags = second >> 24
    length = second & 0xFFFFFF
    if length > max_frame:
        raise SpdyProtocolError(f"frame of {length} bytes exceeds {max_frame}")
    if first & 0x80000000:
        version = (first >> 16) & 0x7FFF
        frame_type = first & 0xFFFF
        if version != SPDY_VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        payload = await transport.read_exactly(length) if length else b""
        return ControlFrame(frame_type, flags, payload)
    data = await transport.read_exactly(length) if length else b""
    return DataFrame(first & 0x7FFFFFFF, flags, data)


class StreamTransport:
    """ByteTransport over an asyncio reader/writer pair (TCP or TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read_exactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise EOFError from exc
        except (ConnectionError, OSError) as exc:
            raise EOFError from exc

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        await close_writer(self._writer)


# ---------------------------------------------------------------------------
# Streams and the connection


@dataclass
class _Window:
    """A flow-control window and a condition to wait for it to open."""

    size: int
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def grow(self, delta: int) -> None:
        self.size += delta
        if self.size > 0:
            self.opened.set()


class SpdyStream:
    """One SPDY stream opened by the peer, with a reader and a writer side."""

    def __init__(self, connection: SpdyConnection, stream_id: int,
                 headers: dict[str, list[str]], remote_closed: bool) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.headers = headers
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._unacknowledged = 0  # consumed bytes not yet returned by WINDOW_UPDATE
        self._data_ready = asyncio.Event()
        self.remote_closed = remote_closed  # the peer sent FIN
        self.local_closed = False  # we sent FIN
        self.reset = False
        self.replied = False
        self.send_window = _Window(connection.peer_initial_window)
        if remote_closed:
            self._data_ready.set()

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    # reading ---------------------------------------------------------------

    async def read(self, max_bytes: int = 64 * 1024) -> bytes:
        """Next chunk of data; b"" once the peer half-closed or the stream died."""
        chunk = await next_chunk(self._chunks, self._data_ready, self._ended, max_bytes)
        if chunk:
            await self._consumed(len(chunk))
        return chunk

    def _ended(self) -> bool:
        return self.remote_closed or self.reset

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    async def _consumed(self, n: int) -> None:
        self._buffered -= n
        self.connection.buffered -= n
        self.connection.buffer_room.set()
        self._unacknowledged += n
        # Return credit in batches so small reads don't each cost a frame.
        if self._unacknowledged >= DEFAULT_WINDOW // 2 and not self.remote_closed:
            delta, self._unacknowledged = self._unacknowledged, 0
            await self.connection.acknowledge(self.stream_id, delta)

    def _on_data(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self.connection.buffered += len(data)
        if fin:
            self.remote_closed = True
        self._data_ready.set()

    def _on_reset(self) -> None:
        self.reset = True
        # Nobody will read what is left: give its room back to the connection.
        self.connection.buffered -= self._buffered
        self._buffered = 0
        self._chunks.clear()
        self.connection.buffer_room.set()
        self._data_ready.set()
        self.send_window.opened.set()

    @property
    def over_buffer_limit(self) -> bool:
        return self._buffered >= MAX_BUFFERED_PER_STREAM

    # writing ---------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = await self.connection.reserve_send_window(self, len(view))
            await self.connection.send_data(self, bytes(view[:size]), fin=False)
            view = view[size:]

    async def close_write(self) -> None:
        """Half-close: send FIN. Reading stays possible."""
        if self.local_closed or self.reset:
            return
        await self.connection.send_data(self, b"", fin=True)

    async def send_reset(self, status: int = RST_CANCEL) -> None:
        if self.reset:
            return
        self._on_reset()
        await self.connection.send_rst(self.stream_id, status)

    @property
    def fully_closed(self) -> bool:
        return self.reset or (self.local_closed and self.remote_closed)


class SpdyConnection:
    """Server side of a SPDY/3.1 session: the peer opens (odd-numbered) streams."""

    def __init__(self, transport: ByteTransport, limits: StreamLimits | None = None) -> None:
        self._transport = transport
        self._limits = limits or StreamLimits()
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor(self._limits.max_header_block_bytes)
        # Unconsumed client data in all streams, and a wakeup when some is consumed.
        self.buffered = 0
        self.buffer_room = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._incoming: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_peer_stream_id = 0
        self.peer_initial_window = DEFAULT_WINDOW
        self._send_window = _Window(DEFAULT_WINDOW)
        self._connection_unacknowledged = 0
        # See the module docstring: only enforce windows for peers that use them.
        self.peer_flow_control = False
        self.closed = asyncio.Event()  # no more frames will be read
        self._goaway_sent = False
        self._reader_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def accept(self) -> SpdyStream | None:
        """Next stream the peer opened, or None when the connection is done."""
        if self.closed.is_set() and self._incoming.empty():
            return None
        return await self._incoming.get()

    # writing frames ----------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        async with self._write_lock:
            await self._transport.write(frame)

    async def reply(self, stream: SpdyStream, headers: Headers | None = None) -> None:
        async with self._write_lock:
            # Compress under the lock: the zlib context must see frames in wire order.
            frame = encode_syn_reply(stream.stream_id, headers or {}, self._compressor)
            await self._transport.write(frame)
        stream.replied = True

    async def send_data(self, stream: SpdyStream, data: bytes, fin: bool) -> None:
        if stream.reset or stream.local_closed:
            raise StreamResetError(f"stream {stream.stream_id} is closed for writing")
        if self.closed.is_set() and not self._goaway_sent:
            raise StreamResetError("connection closed")
        if fin:
            stream.local_closed = True
        try:
            await self._send(encode_data(stream.stream_id, FLAG_FIN if fin else 0, data))
        except (ConnectionError, OSError) as exc:
            stream._on_reset()
            raise StreamResetError(str(exc)) from exc
        self._forget_if_done(stream)

    async def send_rst(self, stream_id: int, status: int) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._send(encode_rst_stream(stream_id, status))
        self._streams.pop(stream_id, None)

    async def acknowledge(self, stream_id: int, delta: int) -> None:
        """Give the peer credit back for consumed data (stream and connection windows)."""
        self._connection_unacknowledged += delta
        frames = encode_window_update(stream_id, delta)
        if self._connection_unacknowledged >= DEFAULT_WINDOW // 2:
            frames += encode_window_update(0, self._connection_unacknowledged)
            self._connection_unacknowledged = 0
        with contextlib.suppress(ConnectionError, OSError):
            await self._send(frames)

    async def reserve_send_window(self, stream: SpdyStream, wanted: int) -> int:
        """How many bytes may go in the next DATA frame (waits for window if enforced)."""
        wanted = min(wanted, MAX_DATA_FRAME)
        if not self.peer_flow_control:
            stream.send_window.size -= wanted
            self._send_window.size -= wanted
            return wanted
        while True:
            if stream.reset or self.closed.is_set():
                raise StreamResetError(f"stream {stream.stream_id} closed while waiting")
            size = min(wanted, stream.send_window.size, self._send_window.size)
            if size > 0:
                stream.send_window.size -= size
                self._send_window.size -= size
                return size
            blocked = stream.send_window if stream.send_window.size <= 0 else self._send_window
            blocked.opened.clear()
            await blocked.opened.wait()

    async def ping(self, ping_id: int) -> None:
        await self._send(encode_ping(ping_id))

    async def close(self) -> None:
        """Send GOAWAY, reset what is left, close the transport."""
        if not self._goaway_sent:
            self._goaway_sent = True
            with contextlib.suppress(ConnectionError, OSError):
                await self._send(encode_goaway(self._last_peer_stream_id, GOAWAY_OK))
        await self._transport.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._shutdown()

    def _shutdown(self) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset()
        self._streams.clear()
        self._send_window.opened.set()
        if not self.closed.is_set():
            self.closed.set()
            self._incoming.put_nowait(None)

    def _forget_if_done(self, stream: SpdyStream) -> None:
        if stream.fully_closed:
            self._streams.pop(stream.stream_id, None)

    # reading frames ------------------------------------------------------------

    async def _read_loop(self) -> None:
        frames = 0
        try:
            while True:
                frame = await read_frame(self._transport, self._limits.max_frame_bytes)
                frames += 1
                if frames % FRAMES_PER_YIELD == 0:
                    # Frames already buffered are parsed without awaiting anything: let
                    # the rest of the daemon run between batches.
                    await asyncio.sleep(0)
                if isinstance(frame, DataFrame):
                    await self._on_data(frame)
                elif not await self._on_control(frame):
                    break
        except EOFError:
            pass
        except SpdyProtocolError as exc:
            log.warning("spdy: protocol error from peer: %s", exc)
            with contextlib.suppress(ConnectionError, OSError):
                await self._send(encode_goaway(self._last_peer_stream_id, GOAWAY_PROTOCOL_ERROR))
        finally:
            self._shutdown()

    async def _on_data(self, frame: DataFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.remote_closed:
            if frame.stream_id not in self._streams:
                await self.send_rst(frame.stream_id, RST_INVALID_STREAM)
            return
        stream._on_data(frame.data, bool(frame.flags & FLAG_FIN))
        self._forget_if_done(stream)
        # Back-pressure on peers that ignore our window: stop reading the socket.
        while (stream.over_buffer_limit and not stream.reset) \
                or self.buffered >= MAX_BUFFERED_PER_CONNECTION:
            self.buffer_room.clear()
            await self.buffer_room.wait()

    async def _on_control(self, frame: ControlFrame) -> bool:
        """Handle one control frame; False ends the read loop."""
        if frame.frame_type == TYPE_SYN_STREAM:
            await self._on_syn_stream(parse_syn_stream(frame, self._decompressor))
        elif frame.frame_type in (TYPE_SYN_REPLY, TYPE_HEADERS):
            # Decompress to keep the shared zlib context in step; content unused.
            parse_stream_headers(frame, self._decompressor)
        elif frame.frame_type == TYPE_RST_STREAM:
            stream_id, _status = parse_two_words(frame)
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream._on_reset()
        elif frame.frame_type == TYPE_SETTINGS:
            self._on_settings(parse_settings(frame))
        elif frame.frame_type == TYPE_PING:
            await self._on_ping(frame)
        elif frame.frame_type == TYPE_GOAWAY:
            return False
        elif frame.frame_type == TYPE_WINDOW_UPDATE:
            self._on_window_update(*parse_two_words(frame))
        # Unknown control frame types are ignored, as the draft says.
        return True

    async def _on_syn_stream(self, syn: SynStream) -> None:
        if syn.stream_id % 2 == 0 or syn.stream_id <= self._last_peer_stream_id:
            await self.send_rst(syn.stream_id, RST_PROTOCOL_ERROR)
            return
        self._last_peer_stream_id = syn.stream_id
        if self._goaway_sent or len(self._streams) >= self._limits.max_streams_per_connection:
            await self.send_rst(syn.stream_id, RST_REFUSED_STREAM)
            return
        stream = SpdyStream(self, syn.stream_id, syn.headers,
                            remote_closed=bool(syn.flags & FLAG_FIN))
        if syn.flags & FLAG_UNIDIRECTIONAL:
            stream.local_closed = True
        self._streams[syn.stream_id] = stream
        await self._incoming.put(stream)

    def _on_settings(self, settings: dict[int, int]) -> None:
        window = settings.get(SETTINGS_INITIAL_WINDOW_SIZE)
        if window is None:
            return
        self.peer_flow_control = True
        delta = window - self.peer_initial_window
        self.peer_initial_window = window
        for stream in self._streams.values():
            stream.send_window.grow(delta)

    async def _on_ping(self, frame: ControlFrame) -> None:
        if len(frame.payload) != 4:
            raise SpdyProtocolError("bad PING length")
        (ping_id,) = struct.unpack(">I", frame.payload)
        if ping_id % 2 == 1:  # peer-initiated (client ids are odd): echo it
            with contextlib.suppress(ConnectionError, OSError):
                await self._send(encode_ping(ping_id))

    def _on_window_update(self, stream_id: int, delta: int) -> None:
        delta &= 0x7FFFFFFF
        self.peer_flow_control = True
        if stream_id == 0:
            self._send_window.grow(delta)
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.send_window.grow(delta)
