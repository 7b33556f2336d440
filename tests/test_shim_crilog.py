"""CRI log line splitting and the shim's wire framing, without processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import protocol
from shim.crilog import CriLogFile, LineSplitter, open_beneath

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


# --- opening beneath the pod's log directory -------------------------------------------------


def test_log_file_and_its_directories_are_made_beneath_the_root(tmp_path: Path) -> None:
    fd = open_beneath(str(tmp_path), "ctr/0.log")
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert (tmp_path / "ctr" / "0.log").read_bytes() == b"x"
    assert stat.S_IMODE((tmp_path / "ctr" / "0.log").stat().st_mode) == 0o640


@pytest.mark.parametrize("plant", ["file link", "dangling link", "directory link"])
def test_a_planted_symlink_never_redirects_the_log(tmp_path: Path, plant: str) -> None:
    """A link where the log or its directory goes, pointing at a host file or directory
    outside the log directory: refused, and the host file keeps its content."""
    logs, host = tmp_path / "logs", tmp_path / "host"
    logs.mkdir()
    host.mkdir()
    victim = host / "0.log"
    victim.write_text("host data\n")
    if plant == "file link":
        (logs / "ctr").mkdir()
        (logs / "ctr" / "0.log").symlink_to(victim)
    elif plant == "dangling link":
        (logs / "ctr").mkdir()
        (logs / "ctr" / "0.log").symlink_to(host / "new.log")
    else:
        (logs / "ctr").symlink_to(host)
    with pytest.raises(OSError, match="no symlinks are followed"):
        open_beneath(str(logs), "ctr/0.log")
    assert victim.read_text() == "host data\n"
    assert not (host / "new.log").exists()


@pytest.mark.parametrize("relative", ["../0.log", "ctr/../../0.log", "/etc/0.log", "a//b", "."])
def test_paths_leaving_the_root_are_refused(tmp_path: Path, relative: str) -> None:
    with pytest.raises(OSError, match="must be relative"):
        open_beneath(str(tmp_path), relative)


def test_fifo_and_hard_link_are_refused(tmp_path: Path) -> None:
    """A FIFO does not block the open; a hard link to a host file is not appended to."""
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(OSError, match=r"fifo\.log"):  # ENXIO: nobody reads it
        open_beneath(str(tmp_path), "fifo.log")
    victim = tmp_path / "victim"
    victim.write_text("host data\n")
    os.link(victim, tmp_path / "linked.log")
    with pytest.raises(OSError, match="regular file with one link"):
        open_beneath(str(tmp_path), "linked.log")
    assert victim.read_text() == "host data\n"


def test_reopen_after_rotation_refuses_a_link_planted_meanwhile(tmp_path: Path) -> None:
    log = CriLogFile(str(tmp_path / "0.log"), str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("host data\n")
    (tmp_path / "0.log").rename(tmp_path / "0.log.1")
    (tmp_path / "0.log").symlink_to(victim)
    with pytest.raises(OSError):
        log.reopen()
    log.write_records(b"stdout", [(b"F", b"tenant output")])
    assert victim.read_text() == "host data\n"
