"""HTTP/2 frames (RFC 9113, section 6): their types, flags, error codes and settings, and the
few encodings a server writes. Facts only; the connection's rules live in connection.py."""

from __future__ import annotations

import enum
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
# Length (24 bits, split as 8 + 16), type, flags, stream id (the top bit is reserved).
FRAME_HEADER = struct.Struct(">BHBBI")
STREAM_ID_MASK = 0x7FFF_FFFF
MAX_WINDOW = 0x7FFF_FFFF
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 0xFF_FFFF
PING_BYTES = 8


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    """Frame flags, plain ints: tested on every frame, where IntFlag's arithmetic would cost."""

    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class Http2Error(Exception):
    """A connection error (RFC 9113, 5.4.1): the connection ends with a GOAWAY of this code."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def frame(kind: FrameType, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


def settings_frame(values: dict[Setting, int]) -> bytes:
    payload = b"".join(struct.pack(">HI", key, value) for key, value in values.items())
    return frame(FrameType.SETTINGS, 0, 0, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(FrameType.RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: ErrorCode, reason: str = "") -> bytes:
    payload = struct.pack(">II", last_stream_id, code) + reason.encode()[:256]
    return frame(FrameType.GOAWAY, 0, 0, payload)


def header_block_frames(
    stream_id: int, block: bytes, end_stream: bool, max_frame: int
) -> list[bytes]:
    """A header block as HEADERS and, past the peer's frame size, CONTINUATION frames."""
    first, rest = block[:max_frame], block[max_frame:]
    end = Flag.END_STREAM if end_stream else 0
    if not rest:
        return [frame(FrameType.HEADERS, end | Flag.END_HEADERS, stream_id, first)]
    frames = [frame(FrameType.HEADERS, end, stream_id, first)]
    while rest:
        piece, rest = rest[:max_frame], rest[max_frame:]
        frames.append(frame(FrameType.CONTINUATION, 0 if rest else Flag.END_HEADERS,
                            stream_id, piece))
    return frames


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541, 5.1) whose first byte carries `first`'s high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal never added to the peer's table (RFC 7541, 6.2.2 with a new
    name, no Huffman): a server that never indexes needs no encoder state at all."""
    return (b"\x00" + hpack_integer(len(name), 7) + name
            + hpack_integer(len(value), 7) + value)
