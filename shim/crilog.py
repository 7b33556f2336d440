"""CRI container log files: `<RFC3339Nano> <stdout|stderr> <P|F> <text>\\n` per record.

Splitting follows containerd's cri logger: a line whose content exceeds the max length
becomes P records of exactly max bytes and a last F record; a trailing "\\r\\n" or "\\n"
is dropped; an unterminated piece left at EOF is written as P.
"""

from __future__ import annotations

import os

from shim.protocol import rfc3339nano

DEFAULT_MAX_LINE = 16 * 1024
TAG_PARTIAL = b"P"
TAG_FULL = b"F"


class LineSplitter:
    """Turns a byte stream into (tag, content) records."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._pending += data
        records: list[tuple[bytes, bytes]] = []
        while True:
            newline = self._pending.find(b"\n")
            if newline < 0:
                break
            end = newline - 1 if newline > 0 and self._pending[newline - 1] == 0x0D else newline
            line = bytes(self._pending[:end])
            del self._pending[: newline + 1]
            records.extend(self._split_long(line))
            records.append((TAG_FULL, line[len(line) - self._tail_length(len(line)):]))
        while len(self._pending) > self.max_line:
            records.append((TAG_PARTIAL, bytes(self._pending[: self.max_line])))
            del self._pending[: self.max_line]
        return records

    def finish(self) -> list[tuple[bytes, bytes]]:
        """At EOF: the unterminated rest, if any, as a partial record."""
        rest = bytes(self._pending)
        self._pending.clear()
        return [(TAG_PARTIAL, rest)] if rest else []

    def _tail_length(self, length: int) -> int:
        if length <= self.max_line:
            return length
        tail = length % self.max_line
        return tail or self.max_line

    def _split_long(self, line: bytes) -> list[tuple[bytes, bytes]]:
        head = len(line) - self._tail_length(len(line))
        return [(TAG_PARTIAL, line[i: i + self.max_line]) for i in range(0, head, self.max_line)]


class CriLogFile:
    """An append-only CRI log file that can be reopened after rotation."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.open()

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        self.close()
        self.open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write_records(self, stream: bytes, records: list[tuple[bytes, bytes]]) -> None:
        if not records or self._fd < 0:
            return
        stamp = rfc3339nano().encode()
        chunk = b"".join(
            b"%s %s %s %s\n" % (stamp, stream, tag, content) for tag, content in records
        )
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
