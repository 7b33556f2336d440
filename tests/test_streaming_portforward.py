"""Port-forward over SPDY, and SPDY tunnelled in WebSocket, to real local TCP servers."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import pytest
import websocket  # websocket-client: a real client nobody here wrote

from sandbox.streaming import spdy
from sandbox.streaming.server import PortForwardParams
from tests.support.registry import free_port
from tests.test_streaming_support import (
    ServerHarness,
    SpdyClient,
    run,
)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    writer.close()


@pytest.fixture
def ports(harness: ServerHarness) -> Iterator[tuple[int, int]]:
    """(echo port, http port): real TCP servers on the server's loop."""
    echo = harness.call(asyncio.start_server(_echo, "127.0.0.1", 0))
    http = harness.call(asyncio.start_server(_http, "127.0.0.1", 0))
    try:
        yield echo.sockets[0].getsockname()[1], http.sockets[0].getsockname()[1]
    finally:
        for server in (echo, http):
            server.close()
            harness.call(server.wait_closed())


def forward_url(harness: ServerHarness) -> str:
    url: str = harness.on_loop(harness.server.get_portforward_url, PortForwardParams("pod1"))
    return url


async def forward_once(client: SpdyClient, port: int, request_id: int,
                       payload: bytes) -> tuple[bytes, bytes]:
    """One forwarded connection: (data received, error stream text)."""
    common = {"port": str(port), "requestID": str(request_id)}
    error = await client.open_stream({"streamType": "error", **common})
    await client.send(error, b"", fin=True)
    data = await client.open_stream({"streamType": "data", **common})
    await client.send(data, payload, fin=True)
    received = await client.read_to_end(data, 10)
    error_text = await client.read_to_end(error, 10)
    return received, error_text


def test_two_ports_concurrent_connections(harness: ServerHarness,
                                          ports: tuple[int, int]) -> None:
    echo_port, http_port = ports

    async def scenario() -> list[tuple[bytes, bytes]]:
        client = await SpdyClient.connect(forward_url(harness), ["portforward.k8s.io"])
        try:
            assert client.negotiated() == "portforward.k8s.io"
            jobs = [forward_once(client, echo_port, i, f"payload {i}".encode() * 5000)
                    for i in range(8)]
            jobs += [forward_once(client, http_port, 100 + i, b"GET / HTTP/1.0\r\n\r\n")
                     for i in range(4)]
            return await asyncio.gather(*jobs)
        finally:
            await client.close()
    results = run(scenario())
    for i, (received, error_text) in enumerate(results[:8]):
        assert received == f"payload {i}".encode() * 5000
        assert error_text == b""
    for received, error_text in results[8:]:
        assert received.startswith(b"HTTP/1.0 200 OK") and received.endswith(b"ok")
        assert error_text == b""


def test_connection_failure_on_error_stream(harness: ServerHarness) -> None:
    closed_port = free_port()

    async def scenario() -> tuple[bytes, bytes]:
        client = await SpdyClient.connect(forward_url(harness), ["portforward.k8s.io"])
        try:
            return await forward_once(client, closed_port, 1, b"hello")
        finally:
            await client.close()
    received, error_text = run(scenario())
    assert received == b""
    assert f"error forwarding port {closed_port} to pod pod1".encode() in error_text


class TunnelledSpdyClient:
    """SPDY/3.1 carried in WebSocket binary messages (client side, synchronous)."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url.replace("http://", "ws://"),
                                              subprotocols=["SPDY/3.1+portforward.k8s.io"])
        self.deflate = spdy.HeaderCompressor()
        self.inflate = spdy.HeaderDecompressor()
        self.buffer = b""
        self.next_id = 1

    def open(self, headers: dict[str, str], fin: bool = False) -> int:
        stream_id, self.next_id = self.next_id, self.next_id + 2
        block = {name: [value] for name, value in headers.items()}
        self.ws.send_binary(spdy.encode_syn_stream(stream_id, block, self.deflate,
                                                   flags=spdy.FLAG_FIN if fin else 0))
        return stream_id

    def send(self, stream_id: int, data: bytes, fin: bool) -> None:
        frame = spdy.encode_data(stream_id, spdy.FLAG_FIN if fin else 0, data)
        # Split a frame across messages: message boundaries must not matter.
        self.ws.send_binary(frame[:5])
        self.ws.send_binary(frame[5:])

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = self.ws.recv()
            self.buffer += message if isinstance(message, bytes) else message.encode()
        chunk, self.buffer = self.buffer[:n], self.buffer[n:]
        return chunk

    def collect(self, streams: set[int]) -> dict[int, bytes]:
        """Read frames until every stream in `streams` has finished."""
        data = {stream_id: b"" for stream_id in streams}
        open_streams = set(streams)
        while open_streams:
            first, second = struct.unpack(">II", self._take(8))
            payload = self._take(second & 0xFFFFFF)
            flags = second >> 24
            if first & 0x80000000:
                frame = spdy.ControlFrame(first & 0xFFFF, flags, payload)
                if frame.frame_type == spdy.TYPE_SYN_REPLY:
                    spdy.parse_stream_headers(frame, self.inflate)
                elif frame.frame_type == spdy.TYPE_RST_STREAM:
                    open_streams.discard(spdy.parse_two_words(frame)[0])
                continue
            stream_id = first & 0x7FFFFFFF
            data[stream_id] += payload
            if flags & spdy.FLAG_FIN:
                open_streams.discard(stream_id)
        return data


def test_port_forward_tunnelled_in_websocket(harness: ServerHarness,
                                             ports: tuple[int, int]) -> None:
    echo_port, _ = ports
    closed_port = free_port()
    client = TunnelledSpdyClient(forward_url(harness))
    try:
        # websocket-client reports the subprotocol lower-cased.
        assert client.ws.subprotocol == "spdy/3.1+portforward.k8s.io"
        pairs = []
        for request_id, port in enumerate((echo_port, echo_port, closed_port)):
            headers = {"port": str(port), "requestID": str(request_id)}
            error = client.open({"streamType": "error", **headers}, fin=True)
            data = client.open({"streamType": "data", **headers})
            client.send(data, f"tunnel {request_id}".encode() * 1000, fin=True)
            pairs.append((error, data))
        got = client.collect({stream for pair in pairs for stream in pair})
    finally:
        client.ws.close()
    for request_id, (error, data) in enumerate(pairs[:2]):
        assert got[data] == f"tunnel {request_id}".encode() * 1000
        assert got[error] == b""
    assert b"error forwarding port" in got[pairs[2][0]]
