"""CRI log line splitting and the shim's wire framing, without processes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shim import protocol
from shim.crilog import LineSplitter

MAX = 8


def split_all(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    splitter = LineSplitter(MAX)
    records = [r for chunk in chunks for r in splitter.feed(chunk)]
    return records + splitter.finish()


def test_long_line_is_partials_of_max_then_full() -> None:
    assert split_all([b"a" * 20 + b"\n"]) == [(b"P", b"a" * 8), (b"P", b"a" * 8),
                                              (b"F", b"a" * 4)]
    assert split_all([b"b" * 16 + b"\r\n"]) == [(b"P", b"b" * 8), (b"F", b"b" * 8)]


def test_unterminated_rest_at_eof_is_partial() -> None:
    assert split_all([b"one\ntw", b"o"]) == [(b"F", b"one"), (b"P", b"two")]


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_records_reassemble_the_stream(chunks: list[bytes]) -> None:
    records = split_all(chunks)
    assert all(len(content) <= MAX for _tag, content in records)
    assert all(b"\n" not in content for _tag, content in records)
    rebuilt = b"".join(content + (b"\n" if tag == b"F" else b"") for tag, content in records)
    assert rebuilt == b"".join(chunks).replace(b"\r\n", b"\n")


@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=50)), max_size=6),
       st.integers(1, 7))
def test_frames_decode_whatever_the_chunking(frames: list[tuple[int, bytes]],
                                             step: int) -> None:
    wire = b"".join(protocol.encode_frame(stream, data) for stream, data in frames)
    decoder = protocol.FrameDecoder()
    decoded = [f for i in range(0, len(wire), step) for f in decoder.feed(wire[i:i + step])]
    assert decoded == frames
