"""The streaming server's listener and protocol limits (sandbox/streaming/limits.py), each
driven by a client that breaks it: slow or idle connections, too many connections, sessions
and streams, and resize events no terminal can have."""

from __future__ import annotations

import asyncio
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from sandbox.metrics import MetricsEndpoint
from sandbox.streaming import spdy
from sandbox.streaming.limits import StreamLimits
from sandbox.streaming.remotecommand import ResizeError, ResizeParser
from sandbox.streaming.server import PortForwardParams
from tests.daemon import Daemon, running_daemon
from tests.test_streaming_support import (
    RemoteCommand,
    ServerHarness,
    SpdyClient,
    UpgradeRefused,
    exec_url,
    run,
    run_command,
    running_harness,
)

LIMITS = StreamLimits(max_connections=4, max_sessions_per_container=2,
                      handshake_timeout_seconds=1.0, max_streams_per_connection=6)


@pytest.fixture
def harness() -> Iterator[ServerHarness]:
    yield from running_harness(LIMITS)


def address(harness: ServerHarness) -> tuple[str, int]:
    host, port = harness.server.url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def test_a_connection_that_never_sends_its_request_is_closed(harness: ServerHarness) -> None:
    with socket.create_connection(address(harness), timeout=10) as idle:
        idle.sendall(b"GET /exec/x HTTP/1.1\r\nHost: slow\r\n")  # and never the blank line
        started = time.monotonic()
        answer = idle.recv(4096)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.5 < waited < 8  # the 1 s handshake timeout, with room for a loaded host


def test_connections_past_the_cap_are_refused(harness: ServerHarness) -> None:
    idle = [socket.create_connection(address(harness), timeout=10) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection(address(harness), timeout=10) as extra:
            assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    # Once they are gone, the server serves again.
    time.sleep(0.2)
    assert run(run_command(exec_url(harness, ["echo", "-n", "again"]))).stdout == b"again"


def test_sessions_per_container_are_capped(harness: ServerHarness) -> None:
    async def scenario() -> int:
        held = [await RemoteCommand.open(exec_url(harness, ["sleep", "30"])) for _ in range(2)]
        try:
            with pytest.raises(UpgradeRefused) as refused:
                await RemoteCommand.open(exec_url(harness, ["true"]))
            return refused.value.status
        finally:
            for command in held:
                await command.client.close()
    assert run(scenario()) == 429


def test_streams_past_the_cap_are_refused(harness: ServerHarness) -> None:
    url: str = harness.on_loop(harness.server.get_portforward_url, PortForwardParams("pod"))

    async def scenario() -> list[int | None]:
        client = await SpdyClient.connect(url, ["portforward.k8s.io"])
        try:
            # Error streams whose data streams never come: each stays open (until the pair
            # timeout), so the seventh is one too many.
            streams = [await client.open_stream({"streamType": "error", "port": "1",
                                                 "requestID": str(n)}) for n in range(7)]
            await asyncio.sleep(0.5)
            return [stream.reset_status for stream in streams]
        finally:
            await client.close()
    assert run(scenario()) == [None] * 6 + [spdy.RST_REFUSED_STREAM]


def test_header_block_cap_refuses_before_inflating() -> None:
    decompressor = spdy.HeaderDecompressor(max_block=4096)
    block = spdy.HeaderCompressor().compress({"x": ["a" * 100_000]})
    with pytest.raises(spdy.SpdyProtocolError, match="more than 4096"):
        decompressor.decompress(block)


@pytest.mark.parametrize("block", [
    struct.pack(">I", 100_000) + b"\0" * 8 * 1000,  # a count of headers beyond the cap
    struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 50_000) + b"\0" * 50_000,  # values
])
def test_header_block_with_too_many_headers_is_refused(block: bytes) -> None:
    with pytest.raises(spdy.SpdyProtocolError, match="more than 1024"):
        spdy.decode_header_block(block)


@pytest.mark.parametrize("event", [
    b'{"Width": 65536, "Height": 1}', b'{"Width": -1, "Height": 1}',
    b'{"Width": 1.5, "Height": 1}', b'{"Width": true, "Height": 1}', b"[1, 2]", b"x",
    b"[" * 5000, b'{"Width": ' + b"1" * 5000,
])
def test_resize_parser_refuses_what_no_terminal_is(event: bytes) -> None:
    with pytest.raises(ResizeError):
        ResizeParser().feed(event)


def test_resize_parser_is_incremental() -> None:
    parser = ResizeParser()
    stream = b'{"Width": 80, "Height": 24}\n{"width":0,"height":9}{"Width": 65535, "Height": 1}'
    events = []
    for index in range(len(stream)):  # one byte at a time: objects split anywhere
        events += parser.feed(stream[index:index + 1])
    assert events == [(80, 24), (65535, 1)]  # a zero size is skipped, as kubelet does


def test_socket_in_a_shared_directory_keeps_its_mode(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: anyone may create, only owners may remove
    socket_path = shared / "flatpod.sock"
    monkeypatch.setattr(Daemon, "socket", property(lambda _: socket_path))
    with running_daemon(tmp_path, f'socket = "{socket_path}"'):
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_metrics_on_port_only_listens_on_every_interface() -> None:
    registry = CollectorRegistry()
    endpoint = MetricsEndpoint(registry, Histogram("x_seconds", "x", registry=registry))

    async def scenario() -> set[str]:
        await endpoint.start(":0")
        try:
            assert endpoint.server is not None
            return {sock.getsockname()[0] for sock in endpoint.server.sockets}
        finally:
            await endpoint.stop()
    bound = run(scenario())
    assert "0.0.0.0" in bound and ("::" in bound or not socket.has_ipv6)
