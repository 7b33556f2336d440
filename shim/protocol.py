"""Wire format shared by the shim and its clients (stdlib only, no asyncio).

Requests and responses are JSON objects, one per line:
    -> {"v": 1, "op": "state", "id": 7, "container_id": "abc"}
    <- {"v": 1, "id": 7, "ok": true, ...}  or  {"v": 1, "id": 7, "ok": false, "error": "..."}
After a successful `attach` the connection carries binary frames (see FRAME_HEADER);
after `subscribe` it carries event lines {"v": 1, "event": "exit", ...}.
`exec` responses carry the caller's ends of the exec's stdio as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import json
import socket
import struct
import time
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20
MAX_FDS = 4

# Attach frames: 1 byte stream id, 4 byte big-endian length, data.
# A frame of length 0 is the EOF of that stream.
FRAME_HEADER = struct.Struct(">BI")
STREAM_STDIN = 0
STREAM_STDOUT = 1
STREAM_STDERR = 2
MAX_FRAME = 1 << 20


# Made once: json.dumps(separators=...) builds a new encoder per call, and json.loads
# sniffs the encoding of bytes; both run Python code that, in a zygote-forked shim, copies
# the zygote's pages holding it. Lines are UTF-8 (the encoder's output is ASCII).
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
JSON_DECODER = json.JSONDecoder()


class ProtocolError(Exception):
    pass


# TIOCSWINSZ takes unsigned shorts; kubelet decodes sizes as uint16.
MAX_TERMINAL_DIMENSION = 65535


class TerminalSizeError(ValueError):
    """A terminal size that no terminal can have."""


def check_terminal_size(width: object, height: object) -> None:
    """Raises TerminalSizeError unless both are integers from 0 to 65535."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 0 <= value <= MAX_TERMINAL_DIMENSION:
            raise TerminalSizeError(
                f"terminal {name} {value!r} is not an integer from 0 to {MAX_TERMINAL_DIMENSION}")


def encode_message(message: dict[str, Any]) -> bytes:
    return COMPACT_JSON.encode(message).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    try:
        message = JSON_DECODER.decode(line.decode("utf-8", "surrogatepass"))
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON line: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def encode_frame(stream: int, data: bytes) -> bytes:
    return FRAME_HEADER.pack(stream, len(data)) + data


class FrameDecoder:
    """Incremental decoder for attach frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= FRAME_HEADER.size:
            stream, length = FRAME_HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = FRAME_HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((stream, bytes(self._buffer[FRAME_HEADER.size:end])))
            del self._buffer[:end]
        return frames


def rfc3339nano(ns: int | None = None) -> str:
    """UTC time with nine fractional digits, as containerd writes CRI log timestamps."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send data with fds attached (SCM_RIGHTS) on the first byte; the rest plainly."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_fds(sock: socket.socket, bufsize: int = 4096) -> tuple[bytes, list[int]]:
    """One recvmsg; returns the data and any fds received with it."""
    fds = array.array("i")
    data, ancillary, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - (len(payload) % fds.itemsize)
            fds.frombytes(payload[:usable])
    return data, list(fds)
