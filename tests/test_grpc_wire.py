"""The CRI socket judged by raw HTTP/2 frames (RFC 9113, gRPC's PROTOCOL-HTTP2.md).

Whatever server `flatpod serve` runs, a client that speaks the wire directly (kubelet's Go
stack, crictl, an attacker on the socket) must get gRPC's answers and HTTP/2's errors, and no
misbehaving connection may take the daemon down: after every test a grpcio call still answers.
"""

from __future__ import annotations

import signal
import struct
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.daemon import TIME_SCALE, Daemon, running_daemon
from tests.support.h2client import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    ConnectionClosed,
    ErrorCode,
    Flag,
    FrameType,
    H2Connection,
    Setting,
    StreamState,
    encode_frame,
    error_name,
    grpc_message,
    grpc_request_headers,
    plain_header_block,
    settings_payload,
    window_update_payload,
)

VERSION = "/runtime.v1.RuntimeService/Version"
STATUS = "/runtime.v1.RuntimeService/Status"
LIST_PODS = "/runtime.v1.RuntimeService/ListPodSandbox"
IMAGE_STATUS = "/runtime.v1.ImageService/ImageStatus"
# Every wait is bounded; the bound is generous for a loaded 2-core machine (answers take ms).
WAIT = 3.0 * TIME_SCALE
# How long a test watches for frames that must NOT come (a server that sends them does so in
# well under this on an idle loop).
QUIET = 0.5 * TIME_SCALE
MAX_MESSAGE = 64 * 1024 * 1024  # the daemon's message limit both ways (README)

OK, DEADLINE_EXCEEDED, UNIMPLEMENTED, RESOURCE_EXHAUSTED = 0, 4, 12, 8


def version_body() -> bytes:
    return pb.VersionRequest(version="v1").SerializeToString()


def assert_serving(daemon: Daemon) -> None:
    """The daemon is alive and answers a grpcio client on a new connection."""
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    client = CriClient(daemon.socket, timeout=10 * TIME_SCALE)
    try:
        assert client.Version(pb.VersionRequest()).runtime_name == "flatpod"
    finally:
        client.close()


@pytest.fixture(scope="module")
def wire_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One `flatpod serve` for the module: a daemon's start costs seconds on a loaded
    machine, a wire test milliseconds. `server` checks it after every test."""
    with running_daemon(tmp_path_factory.mktemp("wire")) as d:
        yield d


@pytest.fixture
def server(wire_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon; after the test it must still answer a grpcio client. If it does
    not, this test fails and the next one gets a new daemon."""
    yield wire_daemon
    try:
        assert_serving(wire_daemon)
    except BaseException:
        wire_daemon.stop()
        wire_daemon.start()
        raise


@pytest.fixture
def conn(server: Daemon) -> Iterator[H2Connection]:
    """A connection past the preface and both SETTINGS."""
    connection = H2Connection(server.socket, timeout=WAIT)
    connection.handshake()
    yield connection
    connection.close()


def assert_version_answer(state: StreamState) -> None:
    """A complete, successful unary Version answer."""
    assert state.reset is None, state.describe()
    assert state.headers is not None and (":status", "200") in state.headers, state.describe()
    assert (state.header("content-type") or "").startswith("application/grpc"), state.describe()
    assert state.trailers is not None and state.ended, state.describe()
    assert state.grpc_status == OK, state.describe()
    [message] = state.messages()
    assert pb.VersionResponse.FromString(message).runtime_name == "flatpod"


def call_version_on(conn: H2Connection) -> None:
    assert_version_answer(conn.wait_stream(conn.unary(VERSION, version_body())))


def refused(state: StreamState) -> bool:
    """The server did not run the call: a reset, a non-200 status or a non-OK gRPC status."""
    if state.reset is not None:
        return True
    if state.headers is not None and (":status", "200") not in state.headers:
        return True
    return state.grpc_status not in (None, OK)


def connection_error(conn: H2Connection, code: ErrorCode) -> None:
    """The server ends the connection with GOAWAY(code), then closes it."""
    conn.read_until_closed(WAIT)
    assert conn.goaway is not None, f"closed without GOAWAY; frames: {conn.received[-10:]}"
    assert conn.goaway.error_code == code, (
        f"GOAWAY {error_name(conn.goaway.error_code)}, expected {code.name} "
        f"({conn.goaway.debug!r})")


def new_conn(daemon: Daemon, **kwargs: bool) -> H2Connection:
    connection = H2Connection(daemon.socket, timeout=WAIT, **kwargs)
    connection.handshake()
    return connection


def new_connection_serves(daemon: Daemon) -> None:
    """A new raw connection's Version call answers (whatever became of the test's own)."""
    fresh = new_conn(daemon)
    try:
        call_version_on(fresh)
    finally:
        fresh.close()


# --- calls that work --------------------------------------------------------------------


def test_unary_call_by_raw_frames(conn: H2Connection) -> None:
    state = conn.wait_stream(conn.unary(VERSION, version_body()))
    assert_version_answer(state)
    assert state.headers is not None
    assert state.header(":status") == "200"
    assert state.header("content-type") == "application/grpc" or (
        (state.header("content-type") or "").startswith("application/grpc+"))
    assert state.trailers is not state.headers, "an OK answer is not Trailers-Only"


def test_settings_first_then_acks_and_ping(server: Daemon) -> None:
    connection = H2Connection(server.socket, timeout=WAIT)
    try:
        connection.send_preface({Setting.ENABLE_PUSH: 0})
        first = connection.read_frame(WAIT)
        assert first is not None, "the server sent nothing after the preface"
        assert first.type == FrameType.SETTINGS and not first.has(Flag.ACK), first
        assert first.stream_id == 0 and len(first.payload) % 6 == 0, first
        connection.read_until(lambda: connection.settings_acks >= 1, what="ACK of our SETTINGS")
        opaque = b"\x01flatpod"
        connection.ping(opaque)
        connection.read_until(lambda: opaque in connection.ping_acks, what="PING ACK")
        # A second SETTINGS mid-connection is ACKed too.
        connection.send_settings({Setting.INITIAL_WINDOW_SIZE: 100_000})
        connection.read_until(lambda: connection.settings_acks >= 2, what="second SETTINGS ACK")
        call_version_on(connection)
    finally:
        connection.close()


def test_headers_split_across_continuation_frames(conn: H2Connection) -> None:
    headers = grpc_request_headers(VERSION, [(f"x-pad-{i}", "v" * 40) for i in range(20)])
    stream_id = conn.send_headers(headers, fragment=200)  # ~7 frames: floods are refused
    conn.send_data(stream_id, grpc_message(version_body()), end_stream=True)
    assert_version_answer(conn.wait_stream(stream_id))


def test_request_data_in_many_frames_beyond_the_initial_windows(conn: H2Connection) -> None:
    """A request in 4 KiB frames, 64 KiB more than the server's windows (at least 200 KiB):
    it completes only if the server returns credit (WINDOW_UPDATE) as it reads."""
    conn.sync()  # the server's first WINDOW_UPDATEs are in
    stream_id = conn.send_headers(grpc_request_headers(IMAGE_STATUS))
    window = min(conn.stream(stream_id).send_window, conn.connection_send_window)
    name = "a" * max(200 * 1024, window + 64 * 1024)
    body = pb.ImageStatusRequest(image=pb.ImageSpec(image=name)).SerializeToString()
    conn.send_data(stream_id, grpc_message(body), end_stream=True, frame_size=4096)
    state = conn.wait_stream(stream_id)
    granted = sum(struct.unpack(">I", f.payload)[0] for f in conn.received
                  if f.type == FrameType.WINDOW_UPDATE and f.stream_id in (0, stream_id))
    print(f"ImageStatus({len(name)} B name): grpc-status {state.grpc_status} "
          f"{state.grpc_message!r}; WINDOW_UPDATE credit {granted}")
    assert state.reset is None and state.ended, state.describe()
    # Not found (OK with no image, as CRI answers), NOT_FOUND or INVALID_ARGUMENT.
    assert state.grpc_status in (0, 3, 5), state.describe()


def test_two_interleaved_calls_on_one_connection(conn: H2Connection) -> None:
    first = conn.send_headers(grpc_request_headers(VERSION))
    second = conn.send_headers(grpc_request_headers(LIST_PODS))
    conn.send_data(second, grpc_message(pb.ListPodSandboxRequest().SerializeToString())[:3])
    conn.send_data(first, grpc_message(version_body())[:4])
    conn.send_data(second, grpc_message(pb.ListPodSandboxRequest().SerializeToString())[3:],
                   end_stream=True)
    conn.send_data(first, grpc_message(version_body())[4:], end_stream=True)
    listed = conn.wait_stream(second)
    assert listed.grpc_status == OK, listed.describe()
    assert pb.ListPodSandboxResponse.FromString(listed.messages()[0]).items == []
    assert_version_answer(conn.wait_stream(first))


def test_200_calls_pipelined_on_one_connection(conn: H2Connection) -> None:
    limit = min(200, conn.server_settings.get(Setting.MAX_CONCURRENT_STREAMS, 200))
    request = grpc_message(version_body())
    pending: list[int] = []
    answered = 0
    for _ in range(200):
        if len(pending) >= limit:
            assert_version_answer(conn.wait_stream(pending.pop(0)))
            answered += 1
        stream_id = conn.new_stream_id()
        conn.send_raw(
            encode_frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id,
                         conn.encode_headers(grpc_request_headers(VERSION)))
            + encode_frame(FrameType.DATA, Flag.END_STREAM, stream_id, request))
        conn.stream(stream_id)
        pending.append(stream_id)
    for stream_id in pending:
        assert_version_answer(conn.wait_stream(stream_id))
        answered += 1
    assert answered == 200


def test_unknown_frame_types_are_ignored(conn: H2Connection) -> None:
    """RFC 9113 §4.1: frames of unknown types are discarded (extensions rely on it)."""
    conn.send_frame(0xFA, 0xFF, 0, b"ignore me")
    stream_id = conn.send_headers(grpc_request_headers(VERSION))
    conn.send_frame(0xFB, 0, stream_id, b"on an open stream")
    conn.send_data(stream_id, grpc_message(version_body()), end_stream=True)
    assert_version_answer(conn.wait_stream(stream_id))
    assert conn.goaway is None


# --- gRPC errors on one stream ------------------------------------------------------------


def test_unknown_method_is_unimplemented_and_named(conn: H2Connection) -> None:
    state = conn.wait_stream(conn.unary("/runtime.v1.RuntimeService/NoSuch", b""))
    assert state.grpc_status == UNIMPLEMENTED, state.describe()
    message = urllib.parse.unquote(state.grpc_message or "")
    assert "NoSuch" in message, state.describe()
    call_version_on(conn)


def test_body_that_is_not_the_request_type_is_an_error(conn: H2Connection) -> None:
    # An 11-byte varint never ends within the message: no protobuf parser accepts it.
    state = conn.wait_stream(conn.unary(VERSION, b"\x0a" + b"\xff" * 11))
    print(f"invalid protobuf: grpc-status {state.grpc_status} {state.grpc_message!r}")
    assert state.grpc_status not in (None, OK), state.describe()
    call_version_on(conn)


def test_message_over_the_limit_is_refused_before_its_body(conn: H2Connection) -> None:
    stream_id = conn.send_headers(grpc_request_headers(IMAGE_STATUS))
    # The prefix alone, without END_STREAM: the server must not wait for 64 MiB.
    conn.send_data(stream_id, grpc_message(b"", length=MAX_MESSAGE + 1))
    state = conn.wait_stream(stream_id)
    assert state.grpc_status == RESOURCE_EXHAUSTED, state.describe()
    call_version_on(conn)


def test_compressed_flag_without_grpc_encoding_is_an_error(conn: H2Connection) -> None:
    stream_id = conn.send_headers(grpc_request_headers(VERSION))
    conn.send_data(stream_id, grpc_message(version_body(), compressed=True), end_stream=True)
    state = conn.wait_stream(stream_id)
    print(f"compressed flag: grpc-status {state.grpc_status} {state.grpc_message!r}")
    assert refused(state), state.describe()
    call_version_on(conn)


@pytest.mark.parametrize("timeout", ["1n", "1u"])
def test_a_tiny_grpc_timeout_expires_or_races(conn: H2Connection, timeout: str) -> None:
    state = conn.wait_stream(conn.unary(VERSION, version_body(), [("grpc-timeout", timeout)]))
    print(f"grpc-timeout {timeout}: grpc-status {state.grpc_status} reset {state.reset}")
    # PROTOCOL-HTTP2.md: a server that sees the deadline pass cancels with RST_STREAM(CANCEL).
    if state.reset is not None:
        assert state.reset == ErrorCode.CANCEL, state.describe()
    else:
        assert state.grpc_status in (OK, DEADLINE_EXCEEDED), state.describe()
    call_version_on(conn)


@pytest.mark.parametrize("timeout", ["abc", "1x", "123456789S"])
def test_a_malformed_grpc_timeout_is_an_error(conn: H2Connection, timeout: str) -> None:
    state = conn.wait_stream(conn.unary(VERSION, version_body(), [("grpc-timeout", timeout)]))
    print(f"grpc-timeout {timeout!r}: grpc-status {state.grpc_status} reset {state.reset}")
    assert refused(state), state.describe()
    call_version_on(conn)


@pytest.mark.parametrize("header", [(":method", "GET"), ("content-type", "text/plain")])
def test_not_a_grpc_request_is_refused(conn: H2Connection, header: tuple[str, str]) -> None:
    headers = [h for h in grpc_request_headers(VERSION) if h[0] != header[0]]
    headers.insert(0 if header[0].startswith(":") else len(headers), header)
    stream_id = conn.send_headers(headers)
    conn.send_data(stream_id, grpc_message(version_body()), end_stream=True)
    state = conn.wait_stream(stream_id)
    print(f"{header}: :status {state.header(':status')} grpc-status {state.grpc_status} "
          f"reset {state.reset}")
    assert refused(state), state.describe()
    call_version_on(conn)


# --- flow control of the server's answers ---------------------------------------------------


def test_answer_waits_for_stream_credit(server: Daemon) -> None:
    conn = H2Connection(server.socket, timeout=WAIT, auto_window_update=False)
    try:
        conn.handshake({Setting.INITIAL_WINDOW_SIZE: 10})
        conn.read_until(lambda: conn.settings_acks >= 1, what="ACK of our SETTINGS")
        stream_id = conn.unary(VERSION, version_body())
        state = conn.stream(stream_id)
        conn.drain(QUIET)
        assert len(state.data) <= 10, f"{len(state.data)} bytes sent into a 10-byte window"
        assert not state.ended and state.reset is None, state.describe()
        conn.window_update(stream_id, 1000)
        assert_version_answer(conn.wait_stream(stream_id))
    finally:
        conn.close()


def test_answers_wait_for_connection_credit(server: Daemon) -> None:
    """Answers that need more than the connection's 65535 bytes stop there until the client
    grants more on stream 0 (each stream has a large window of its own)."""
    conn = H2Connection(server.socket, timeout=WAIT, auto_window_update=False)
    try:
        conn.handshake({Setting.INITIAL_WINDOW_SIZE: 1 << 20})
        body = pb.StatusRequest(verbose=True).SerializeToString()
        probe = conn.wait_stream(conn.unary(STATUS, body))
        assert probe.grpc_status == OK, probe.describe()
        size = len(probe.data)
        calls = min(DEFAULT_WINDOW // size + 20,
                    conn.server_settings.get(Setting.MAX_CONCURRENT_STREAMS, 1 << 30))
        assert calls * size > DEFAULT_WINDOW, f"answers of {size} bytes; cannot fill the window"
        streams = [conn.unary(STATUS, body) for _ in range(calls)]
        conn.drain(QUIET)
        sent = size + sum(len(conn.stream(s).data) for s in streams)
        assert sent <= DEFAULT_WINDOW, f"{sent} bytes of DATA into a 65535-byte connection window"
        assert not all(conn.stream(s).ended for s in streams)
        conn.window_update(0, calls * size)
        for stream_id in streams:
            state = conn.wait_stream(stream_id)
            assert state.grpc_status == OK and len(state.data) == size, state.describe()
    finally:
        conn.close()


# --- resets ---------------------------------------------------------------------------------


def test_client_reset_ends_the_stream_and_not_the_connection(conn: H2Connection) -> None:
    after_headers = conn.send_headers(grpc_request_headers(VERSION))
    conn.reset(after_headers)
    after_data = conn.send_headers(grpc_request_headers(VERSION))
    conn.send_data(after_data, grpc_message(version_body()))
    conn.reset(after_data)
    after_request = conn.unary(VERSION, version_body())
    conn.reset(after_request)
    # Sent after the resets, so processed after them: once it is answered, nothing more may
    # come on the reset streams (in-flight frames of theirs arrive before its answer).
    call_version_on(conn)
    marker = len(conn.received)
    conn.drain(QUIET)
    late = [f for f in conn.received[marker:]
            if f.stream_id in (after_headers, after_data, after_request)]
    assert not late, f"frames on reset streams after the server processed the resets: {late}"
    # RFC 9113 §5.4.2: no RST_STREAM in answer to RST_STREAM. A NO_ERROR reset right after
    # the server's own trailers is gRPC's "early server closure" of a call it had answered
    # before it read the client's reset.
    rst_back = [f for f in conn.received if f.type == FrameType.RST_STREAM
                and f.stream_id in (after_headers, after_data, after_request)
                and not (conn.stream(f.stream_id).trailers is not None
                         and f.payload == struct.pack(">I", ErrorCode.NO_ERROR))]
    assert not rst_back, f"RST_STREAM answered with RST_STREAM: {rst_back}"
    call_version_on(conn)


def test_rapid_reset_of_2000_streams(server: Daemon, conn: H2Connection) -> None:
    block = plain_header_block(grpc_request_headers(VERSION))
    cancel = struct.pack(">I", ErrorCode.CANCEL)
    for _ in range(20):
        batch = bytearray()
        for _ in range(100):
            stream_id = conn.new_stream_id()
            batch += encode_frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, block)
            batch += encode_frame(FrameType.RST_STREAM, 0, stream_id, cancel)
        # A server may end such a connection (GOAWAY ENHANCE_YOUR_CALM).
        if not conn.send_tolerant(bytes(batch)):
            break
        conn.drain(0)
    if conn.goaway is None and not conn.closed:
        # The connection may serve on, or shed the abuser's next call; either way it answers.
        try:
            state = conn.wait_stream(conn.unary(VERSION, version_body()))
        except ConnectionClosed:
            print(f"rapid reset: the connection closed at the next call, GOAWAY {conn.goaway}")
        else:
            print(f"rapid reset: the next call on the connection: {state.describe()}")
            if not refused(state):
                assert_version_answer(state)
    else:
        print(f"rapid reset: GOAWAY {conn.goaway}")
    new_connection_serves(server)


def test_streams_beyond_max_concurrent_are_refused(server: Daemon, conn: H2Connection) -> None:
    limit = conn.server_settings.get(Setting.MAX_CONCURRENT_STREAMS)
    if limit is None or limit > 1000:
        pytest.skip(f"the server advertises no usable SETTINGS_MAX_CONCURRENT_STREAMS ({limit})")
    opened = [conn.send_headers(grpc_request_headers(VERSION)) for _ in range(limit + 5)]
    excess = opened[limit:]
    try:
        conn.read_until(
            lambda: conn.goaway is not None or all(conn.stream(s).reset for s in excess),
            what="REFUSED_STREAM for the streams beyond the limit (or GOAWAY)")
    except ConnectionClosed:
        assert conn.goaway is not None, "closed without GOAWAY"
    if conn.goaway is None:
        for stream_id in excess:
            # RFC 9113 §5.1.2: PROTOCOL_ERROR or REFUSED_STREAM.
            assert conn.stream(stream_id).reset in (ErrorCode.REFUSED_STREAM,
                                                    ErrorCode.PROTOCOL_ERROR)
        # The accepted streams still run.
        conn.send_data(opened[0], grpc_message(version_body()), end_stream=True)
        assert_version_answer(conn.wait_stream(opened[0]))
    new_connection_serves(server)


def test_client_that_hangs_up_mid_call(server: Daemon) -> None:
    for cut in ("headers", "half data", "whole request"):
        connection = new_conn(server)
        stream_id = connection.send_headers(grpc_request_headers(STATUS))
        message = grpc_message(pb.StatusRequest(verbose=True).SerializeToString())
        if cut == "half data":
            connection.send_data(stream_id, message[:3])
        elif cut == "whole request":
            connection.send_data(stream_id, message, end_stream=True)
        connection.close()
    new_connection_serves(server)


# --- connection errors ----------------------------------------------------------------------


def test_bad_preface_ends_the_connection(server: Daemon) -> None:
    """RFC 9113 §3.4: a PROTOCOL_ERROR; the GOAWAY MAY be omitted (the peer is not HTTP/2)."""
    connection = H2Connection(server.socket, timeout=WAIT)
    try:
        connection.send_raw(b"GET / HTTP/1.1\r\nHost: flatpod\r\n\r\n")
        connection.read_until_closed(WAIT)
        if connection.goaway is not None:
            assert connection.goaway.error_code == ErrorCode.PROTOCOL_ERROR, connection.goaway
    finally:
        connection.close()


def test_frame_larger_than_max_frame_size(conn: H2Connection) -> None:
    """A HEADERS frame (it carries a field block, so RFC 9113 §4.2 makes it a connection error)
    one byte over the server's SETTINGS_MAX_FRAME_SIZE, its HPACK otherwise valid."""
    max_frame = conn.server_settings.get(Setting.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
    pad = max_frame + 1 - len(plain_header_block(grpc_request_headers(VERSION, [("x-big", "")])))
    while True:  # the value's length prefix grows with it
        block = plain_header_block(grpc_request_headers(VERSION, [("x-big", "v" * pad)]))
        if len(block) == max_frame + 1:
            break
        pad -= len(block) - (max_frame + 1)
    conn.send_tolerant(encode_frame(FrameType.HEADERS, Flag.END_HEADERS, conn.new_stream_id(),
                                    block))
    connection_error(conn, ErrorCode.FRAME_SIZE_ERROR)


@pytest.mark.parametrize("stream_id", [0, 2])
def test_headers_on_stream_0_or_an_even_stream(conn: H2Connection, stream_id: int) -> None:
    block = plain_header_block(grpc_request_headers(VERSION))
    conn.send_raw(encode_frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, block))
    connection_error(conn, ErrorCode.PROTOCOL_ERROR)


def test_window_update_of_zero_on_the_connection(conn: H2Connection) -> None:
    conn.send_frame(FrameType.WINDOW_UPDATE, 0, 0, window_update_payload(0))
    connection_error(conn, ErrorCode.PROTOCOL_ERROR)


def test_garbage_hpack_is_a_compression_error(conn: H2Connection) -> None:
    # Index 0 is never valid (RFC 7541 §6.1), then an index far beyond both tables.
    conn.send_frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, conn.new_stream_id(),
                    b"\x80\xff\xff\xff\xff\x0f")
    connection_error(conn, ErrorCode.COMPRESSION_ERROR)


def open_block_then(frame: bytes) -> bytes:
    """HEADERS on stream 1 without END_HEADERS, then `frame` in the middle of the block."""
    block = plain_header_block(grpc_request_headers(VERSION))
    return encode_frame(FrameType.HEADERS, 0, 1, block[:10]) + frame


# More of RFC 9113's MUSTs (by section), each a connection error: (what is sent, the GOAWAY's code).
CONNECTION_ERRORS = {
    "PING of 7 bytes (sec 6.7)": (
        encode_frame(FrameType.PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
    "PING on a stream (sec 6.7)": (
        encode_frame(FrameType.PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
    "SETTINGS of 5 bytes (sec 6.5)": (
        encode_frame(FrameType.SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
    "SETTINGS_ENABLE_PUSH of 2 (sec 6.5.2)": (
        encode_frame(FrameType.SETTINGS, 0, 0, settings_payload({Setting.ENABLE_PUSH: 2})),
        ErrorCode.PROTOCOL_ERROR),
    "SETTINGS_INITIAL_WINDOW_SIZE of 2^31 (sec 6.5.2)": (
        encode_frame(FrameType.SETTINGS, 0, 0,
                     settings_payload({Setting.INITIAL_WINDOW_SIZE: 1 << 31})),
        ErrorCode.FLOW_CONTROL_ERROR),
    "DATA on stream 0 (sec 6.1)": (
        encode_frame(FrameType.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    "connection window past 2^31-1 (sec 6.9.1)": (
        encode_frame(FrameType.WINDOW_UPDATE, 0, 0, window_update_payload((1 << 31) - 1)),
        ErrorCode.FLOW_CONTROL_ERROR),
    "CONTINUATION without HEADERS (sec 6.10)": (
        encode_frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1,
                     plain_header_block(grpc_request_headers(VERSION))),
        ErrorCode.PROTOCOL_ERROR),
    "PING inside a header block (sec 6.10)": (
        open_block_then(encode_frame(FrameType.PING, 0, 0, b"12345678")),
        ErrorCode.PROTOCOL_ERROR),
    "CONTINUATION of another stream (sec 6.10)": (
        open_block_then(encode_frame(FrameType.CONTINUATION, Flag.END_HEADERS, 3, b"")),
        ErrorCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", CONNECTION_ERRORS)
def test_protocol_violations_end_the_connection(conn: H2Connection, case: str) -> None:
    frames, code = CONNECTION_ERRORS[case]
    conn.send_tolerant(frames)
    connection_error(conn, code)


def test_data_beyond_the_advertised_window(conn: H2Connection) -> None:
    """DATA past the server's windows is a FLOW_CONTROL_ERROR (RFC 9113 §6.9.1 leaves stream
    or connection error to the server). The client sends its whole view of the windows and
    64 KiB more at once. A server that returned credit for each frame as it read was never
    overrun (no client can prove otherwise); so without the error, the test checks only
    that the server's credit covered every byte it took."""
    conn.sync()  # the server's first WINDOW_UPDATEs are in
    stream_id = conn.send_headers(grpc_request_headers(IMAGE_STATUS))
    window = min(conn.stream(stream_id).send_window, conn.connection_send_window)
    max_frame = conn.server_settings.get(Setting.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
    total = window + 4 * DEFAULT_MAX_FRAME
    frame = min(max_frame, DEFAULT_MAX_FRAME)
    payload = grpc_message(b"\x00" * (total - 5), length=MAX_MESSAGE - 1)[:total]
    frames = bytearray()
    for offset in range(0, total, frame):
        frames += encode_frame(FrameType.DATA, 0, stream_id, payload[offset:offset + frame])
    conn.send_tolerant(bytes(frames))
    conn.drain(QUIET)
    state = conn.stream(stream_id)
    if conn.goaway is not None and conn.goaway.error_code == ErrorCode.FLOW_CONTROL_ERROR:
        return
    if state.reset == ErrorCode.FLOW_CONTROL_ERROR:
        return
    credit = {0: DEFAULT_WINDOW, stream_id: conn.server_settings.get(
        Setting.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)}
    for f in conn.received:
        if f.type == FrameType.WINDOW_UPDATE and f.stream_id in credit:
            credit[f.stream_id] += struct.unpack(">I", f.payload)[0] & 0x7FFFFFFF
    print(f"no FLOW_CONTROL_ERROR; credit granted {credit}, sent {total}; "
          f"goaway {conn.goaway} reset {state.reset}")
    assert min(credit.values()) >= total, (
        f"the server took {total} bytes against a credit of {credit} without "
        f"FLOW_CONTROL_ERROR")


def test_header_list_beyond_the_limit_is_refused(server: Daemon, conn: H2Connection) -> None:
    limit = conn.server_settings.get(Setting.MAX_HEADER_LIST_SIZE, 1 << 20)
    count = limit // 1000 + 2  # each field: 1000 bytes of value, name and 32 of overhead
    headers = grpc_request_headers(VERSION, [(f"x-h{i}", "v" * 1000) for i in range(count)])
    max_frame = conn.server_settings.get(Setting.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME)
    try:
        stream_id = conn.send_headers(headers, fragment=min(max_frame, DEFAULT_MAX_FRAME),
                                      plain=True)
        conn.send_data(stream_id, grpc_message(version_body()), end_stream=True)
        state = conn.wait_stream(stream_id)
        print(f"header list of {count} KB: {state.describe()}")
        assert refused(state), f"a {count} KB header list was served: {state.describe()}"
    except (ConnectionClosed, OSError):
        print(f"header list of {count} KB: connection ended, GOAWAY {conn.goaway}")
    new_connection_serves(server)


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_continuation_flood_is_refused_in_bounded_memory(
    server: Daemon, conn: H2Connection
) -> None:
    """HEADERS without END_HEADERS, then 64 MiB of CONTINUATION frames (CVE-2024-27316's
    kind): the server refuses the block without holding it all."""
    assert server.process is not None
    # Peak RSS from now on (Linux resets VmHWM to the current RSS on "5").
    with open(f"/proc/{server.process.pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = rss_kib(server.process.pid, "VmRSS")
    stream_id = conn.new_stream_id()
    # 16 KiB of header-block bytes per frame (they decode as a run of literal fields).
    conn.send_frame(FrameType.HEADERS, 0, stream_id,
                    plain_header_block(grpc_request_headers(VERSION)))
    chunk = encode_frame(FrameType.CONTINUATION, 0, stream_id, b"\x00\x01x\x7f" + b"v" * 16380)
    for _ in range(64):
        if not conn.send_tolerant(chunk * 64):
            break
        conn.drain(0)
        if conn.closed or conn.goaway is not None:
            break
    if not conn.closed and conn.goaway is None:
        try:
            conn.send_frame(FrameType.CONTINUATION, Flag.END_HEADERS, stream_id, b"")
            conn.send_frame(FrameType.DATA, Flag.END_STREAM, stream_id,
                            grpc_message(version_body()))
            conn.read_until(lambda: conn.goaway is not None or conn.stream(stream_id).closed,
                            what="refusal of the flooded header block")
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
            pass
    ended = conn.closed
    state = conn.stream(stream_id)
    peak = rss_kib(server.process.pid, "VmHWM")
    print(f"CONTINUATION flood: RSS {before} KiB before, peak {peak} KiB; ended {ended} "
          f"GOAWAY {conn.goaway} stream {state.describe()}")
    assert ended or conn.goaway is not None or refused(state), state.describe()
    assert peak - before <= 50 * 1024, f"RSS grew from {before} to a peak of {peak} KiB"


# --- shutdown ---------------------------------------------------------------------------------


def test_sigterm_sends_goaway_before_closing(daemon: Daemon) -> None:
    conn = new_conn(daemon)
    try:
        call_version_on(conn)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        conn.read_until_closed(20 * TIME_SCALE)
        took = time.monotonic() - started
    finally:
        conn.close()
    assert daemon.process.wait(20 * TIME_SCALE) == 0, daemon.log()
    daemon.process = None
    assert conn.goaway is not None, f"closed without GOAWAY; frames {conn.received[-10:]}"
    assert conn.goaway.error_code == ErrorCode.NO_ERROR, conn.goaway
    print(f"GOAWAY {conn.goaway} {took:.2f} s after SIGTERM")
    daemon.start()
    assert_serving(daemon)
