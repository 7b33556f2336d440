"""gRPC over the HTTP/2 connection (grpc/grpc's PROTOCOL-HTTP2.md): a request's headers name
its method and deadline, its body is one length-prefixed message, and the answer is headers,
length-prefixed messages and trailers carrying the status.

Methods take and give serialized messages (bytes): what they mean is the caller's business
(sandbox/server.py). Each call runs as its own task, so a slow one never holds up the
connection; the task is cancelled when the peer resets the stream, the connection drops or the
deadline passes. A method marked inline is the exception: a lookup answered from memory is
made at once, in the callback that read its request, with no task to wait behind the loop's
other work (sandbox/server.py's Inline says which may be).
"""

from __future__ import annotations

import asyncio
import enum
import re
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from sandbox.http2.connection import Application, Http2Connection, Stream
from sandbox.http2.frames import hpack_integer, hpack_literal

# A method gets the request's serialized message and its deadline (time.monotonic(), or None).
UnaryMethod = Callable[[bytes, float | None], Awaitable[bytes]]
StreamMethod = Callable[[bytes, float | None], AsyncGenerator[bytes, None]]
InlineMethod = Callable[[bytes, float | None], bytes]

MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length
MAX_STATUS_MESSAGE = 8 * 1024


class Status(enum.IntEnum):
    """The gRPC status codes (grpc/grpc doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """What a method raises to answer with a status other than OK."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Method:
    unary: UnaryMethod | None = None
    stream: StreamMethod | None = None
    # The same call as `unary`, made to its end at once: it holds the event loop while it runs,
    # so it must answer from memory in time of the order of its answer.
    inline: InlineMethod | None = None


# Response header blocks: ":status: 200" is entry 8 of HPACK's static table, "content-type"
# entry 31's name; nothing is ever added to the peer's dynamic table.
RESPONSE_HEADERS = (b"\x88" + hpack_integer(31, 4) + hpack_integer(16, 7)
                    + b"application/grpc")
UNSUPPORTED_MEDIA = hpack_integer(8, 4) + hpack_integer(3, 7) + b"415"
OK_TRAILERS = hpack_literal(b"grpc-status", b"0")
# grpc-timeout: at most 8 digits and a unit (PROTOCOL-HTTP2.md).
TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")
TIMEOUT_UNIT_SECONDS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Printable ASCII but "%" goes as is in grpc-message; every other byte is percent-encoded.
STATUS_MESSAGE_PLAIN = re.compile(rb"[ -$&-~]*")


@dataclass(eq=False, slots=True)
class Call:
    path: str
    method: Method
    deadline: float | None  # time.monotonic(), from the request's grpc-timeout
    task: asyncio.Task[None] | None = None
    expired: bool = False


class GrpcApplication(Application):
    """Serves the methods of `methods` ({"/package.Service/Method": Method})."""

    def __init__(self, methods: Mapping[str, Method], max_message_bytes: int) -> None:
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.max_message_bytes = max_message_bytes
        self.calls: set[asyncio.Task[None]] = set()

    # --- Application ------------------------------------------------------------------------

    def request_started(self, conn: Http2Connection, stream: Stream) -> None:
        path = method_name = content_type = timeout = b""
        for name, value in stream.headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method_name = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
        if method_name != b"POST" or not _is_grpc(content_type):
            conn.send_headers(stream, UNSUPPORTED_MEDIA, end_stream=True)
            return
        method = self.methods.get(path)
        path_text = path.decode(errors="replace")
        if method is None:
            answer_status(conn, stream, Status.UNIMPLEMENTED, f"unknown method {path_text}")
            return
        deadline: float | None = None
        if timeout:
            parsed = TIMEOUT.fullmatch(timeout)
            if parsed is None:
                shown = timeout.decode(errors="replace")
                answer_status(conn, stream, Status.INVALID_ARGUMENT,
                              f"{path_text}: malformed grpc-timeout {shown!r}")
                return
            deadline = time.monotonic() + int(parsed[1]) * TIMEOUT_UNIT_SECONDS[parsed[2]]
        stream.call = Call(path_text, method, deadline)

    def request_data(self, conn: Http2Connection, stream: Stream) -> None:
        body = stream.body
        if len(body) < MESSAGE_PREFIX.size or not isinstance(stream.call, Call):
            return
        compressed, length = MESSAGE_PREFIX.unpack_from(body)
        problem = self._message_problem(stream.call.path, compressed, length)
        if problem is not None:
            answer_status(conn, stream, *problem)

    def request_complete(self, conn: Http2Connection, stream: Stream) -> None:
        call = stream.call
        if not isinstance(call, Call):
            return
        body = stream.body
        stream.body = bytearray()
        if len(body) < MESSAGE_PREFIX.size:
            answer_status(conn, stream, Status.INVALID_ARGUMENT,
                          f"{call.path}: the request has no message")
            return
        length = MESSAGE_PREFIX.unpack_from(body)[1]  # the flag was checked as it came
        if MESSAGE_PREFIX.size + length != len(body):
            answer_status(conn, stream, Status.INVALID_ARGUMENT,
                          f"{call.path}: the request is not exactly one message")
            return
        message = bytes(body[MESSAGE_PREFIX.size:])
        if call.method.inline is not None:
            self._answer_inline(conn, stream, call, message)
            return
        loop = asyncio.get_running_loop()
        run = (self._run_unary(conn, stream, call, message) if call.method.unary is not None
               else self._run_stream(conn, stream, call, message))
        task = loop.create_task(run)
        call.task = task
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        if call.deadline is not None:
            timer = loop.call_later(max(0.0, call.deadline - time.monotonic()), _expire, call)
            task.add_done_callback(lambda _: timer.cancel())

    def stream_cancelled(self, conn: Http2Connection, stream: Stream) -> None:
        call = stream.call
        if isinstance(call, Call) and call.task is not None:
            call.task.cancel()

    # --- calls ------------------------------------------------------------------------------

    def _message_problem(self, path: str, compressed: int, length: int
                         ) -> tuple[Status, str] | None:
        if compressed:
            return Status.UNIMPLEMENTED, f"{path}: compressed messages are not accepted"
        if length > self.max_message_bytes:
            return (Status.RESOURCE_EXHAUSTED,
                    f"{path}: a message of {length} bytes is beyond {self.max_message_bytes}")
        return None

    @staticmethod
    def _answer_inline(conn: Http2Connection, stream: Stream, call: Call,
                       message: bytes) -> None:
        assert call.method.inline is not None
        try:
            answer = call.method.inline(message, call.deadline)
        except RpcError as err:
            answer_status(conn, stream, err.status, err.message)
            return
        answer_message(conn, stream, answer)

    async def _run_unary(self, conn: Http2Connection, stream: Stream, call: Call,
                         message: bytes) -> None:
        assert call.method.unary is not None
        try:
            answer = await call.method.unary(message, call.deadline)
        except asyncio.CancelledError:
            if call.expired:
                answer_status(conn, stream, Status.DEADLINE_EXCEEDED,
                              f"{call.path}: the call's deadline passed")
            return
        except RpcError as err:
            answer_status(conn, stream, err.status, err.message)
            return
        answer_message(conn, stream, answer)

    async def _run_stream(self, conn: Http2Connection, stream: Stream, call: Call,
                          message: bytes) -> None:
        assert call.method.stream is not None
        started = False
        try:
            answers = call.method.stream(message, call.deadline)
            async with aclosing(answers):
                async for answer in answers:
                    if not started:
                        conn.send_headers(stream, RESPONSE_HEADERS)
                        started = True
                    conn.send_data(stream, MESSAGE_PREFIX.pack(0, len(answer)) + answer)
                    await conn.writable(stream)
                    if stream.local_closed:
                        return
        except asyncio.CancelledError:
            if call.expired:
                self._end(conn, stream, started, Status.DEADLINE_EXCEEDED,
                          f"{call.path}: the call's deadline passed")
            return
        except RpcError as err:
            self._end(conn, stream, started, err.status, err.message)
            return
        self._end(conn, stream, started, Status.OK, "")

    @staticmethod
    def _end(conn: Http2Connection, stream: Stream, started: bool, status: Status,
             message: str) -> None:
        if started:
            conn.send_headers(stream, status_block(status, message), end_stream=True)
        else:
            answer_status(conn, stream, status, message)


def answer_message(conn: Http2Connection, stream: Stream, answer: bytes) -> None:
    """A unary call's answer and an OK status."""
    conn.respond(stream, RESPONSE_HEADERS, MESSAGE_PREFIX.pack(0, len(answer)) + answer,
                 OK_TRAILERS)


def answer_status(conn: Http2Connection, stream: Stream, status: Status, message: str) -> None:
    """A status with no message before it: one header block ("Trailers-Only")."""
    conn.send_headers(stream, RESPONSE_HEADERS + status_block(status, message), end_stream=True)


def status_block(status: Status, message: str) -> bytes:
    if status is Status.OK and not message:
        return OK_TRAILERS
    block = hpack_literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += hpack_literal(b"grpc-message", percent_encoded(message))
    return block


def percent_encoded(message: str) -> bytes:
    raw = message.encode()[:MAX_STATUS_MESSAGE]
    if STATUS_MESSAGE_PLAIN.fullmatch(raw):
        return raw
    return b"".join(b"%%%02X" % byte if byte < 0x20 or byte > 0x7E or byte == 0x25
                    else bytes([byte]) for byte in raw)


def _is_grpc(content_type: bytes) -> bool:
    return content_type == b"application/grpc" or content_type.startswith(
        (b"application/grpc+", b"application/grpc;"))


def _expire(call: Call) -> None:
    if call.task is not None and not call.task.done():
        call.expired = True
        call.task.cancel()
