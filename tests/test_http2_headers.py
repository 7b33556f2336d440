"""sandbox/http2/headers.py against the `hpack` package's encoder: every representation,
Huffman or not, the dynamic table's evictions and size updates, and the limits."""

from __future__ import annotations

import random

import hpack
import pytest

from sandbox.http2.frames import ErrorCode, Http2Error
from sandbox.http2.headers import HeaderDecoder

GRPC_REQUEST = [(":method", "POST"), (":scheme", "http"),
                (":path", "/runtime.v1.RuntimeService/Version"), (":authority", "localhost"),
                ("content-type", "application/grpc"), ("user-agent", "grpc-go/1.72.0"),
                ("te", "trailers")]


def _as_bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


def test_blocks_of_a_long_connection_decode_as_encoded() -> None:
    """Thousands of requests on one connection: new grpc-timeout values fill the table and
    evict old entries; some fields go Huffman-coded, some never indexed, some change the
    table's size."""
    chooser = random.Random(7)
    encoder, decoder = hpack.Encoder(), HeaderDecoder(64 * 1024)
    for number in range(3000):
        headers = [*GRPC_REQUEST, ("grpc-timeout", f"{chooser.randrange(1, 10**8)}u")]
        if number % 7 == 0:
            headers.append((f"x-meta-{chooser.randrange(50)}", "v" * chooser.randrange(0, 300)))
        if number % 500 == 250:
            encoder.header_table_size = chooser.choice([0, 256, 4096])
        huffman = number % 2 == 0
        sensitive = [hpack.NeverIndexedHeaderTuple(n, v) if n.startswith("x-") else (n, v)
                     for n, v in headers]
        block = encoder.encode(sensitive, huffman=huffman)
        assert decoder.decode(block) == _as_bytes(headers), number


def test_an_index_beyond_the_tables_is_a_compression_error() -> None:
    with pytest.raises(Http2Error) as err:
        HeaderDecoder(1024).decode(bytes([0x80 | 70]))
    assert err.value.code is ErrorCode.COMPRESSION_ERROR


def test_a_truncated_block_is_a_compression_error() -> None:
    block = hpack.Encoder().encode(GRPC_REQUEST)
    with pytest.raises(Http2Error) as err:
        HeaderDecoder(1024).decode(block[:-3])
    assert err.value.code is ErrorCode.COMPRESSION_ERROR


def test_a_table_size_beyond_our_setting_is_refused() -> None:
    with pytest.raises(Http2Error) as err:
        HeaderDecoder(1024, max_table_bytes=4096).decode(b"\x3f\xe1\x3f")  # 8192
    assert err.value.code is ErrorCode.COMPRESSION_ERROR


def test_a_header_list_beyond_the_limit_is_refused() -> None:
    block = hpack.Encoder().encode([*GRPC_REQUEST, ("x-big", "v" * 2000)])
    with pytest.raises(Http2Error) as err:
        HeaderDecoder(1024).decode(block)
    assert err.value.code is ErrorCode.ENHANCE_YOUR_CALM
    assert len(HeaderDecoder(4096).decode(block)) == len(GRPC_REQUEST) + 1
