"""CRI container log files: `<RFC3339Nano> <stdout|stderr> <P|F> <text>\\n` per record.

Splitting follows containerd's cri logger: a line whose content exceeds the max length
becomes P records of exactly max bytes and a last F record; a trailing "\\r\\n" or "\\n"
is dropped; an unterminated piece left at EOF is written as P.

A log file lives beneath its pod's log directory, which tenants may reach (a hostPath volume,
a shared node directory), so it is opened as openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
would open it, one component at a time from the directory's fd: no symlink is followed, no
".." is walked, and only a regular file with one link is written to. A link planted where
the log goes cannot turn the container's output onto a host file.
"""

from __future__ import annotations

import contextlib
import os
import stat

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted as the log file must not block the open.
_FILE_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
               | os.O_CLOEXEC)


def open_beneath(root: str, relative: str) -> int:
    """An append fd for `relative` (made, with its directories, if missing) beneath `root`.

    Raises OSError naming the offending component when the path has "..", an absolute start,
    a symlink anywhere, or ends at something that is not a regular file with one link."""
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OSError(0, f"log path {relative!r} must be relative, without '.', '..' or '//'")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            child = _enter(fd, part)
            os.close(fd)
            fd = child
        file_fd = os.open(parts[-1], _FILE_FLAGS, 0o640, dir_fd=fd)
    except OSError as err:
        raise OSError(err.errno, f"log path {relative!r} beneath {root}: {err.strerror} "
                      "(no symlinks are followed)") from None
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(file_fd)
        raise OSError(0, f"log path {relative!r} beneath {root} is not a regular file with "
                      "one link")
    os.set_blocking(file_fd, True)
    return file_fd


def _enter(dir_fd: int, name: str) -> int:
    """The directory `name` in dir_fd, made if missing."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        # FileExistsError: made meanwhile (or a dangling link, refused just below).
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class CriLogFile:
    """An append-only CRI log file beneath its pod's log directory, reopened after rotation."""

    def __init__(self, path: str, root: str | None = None) -> None:
        self.path = path
        # Without a root (an older daemon), the file's own directory: still no symlink at
        # the last component.
        self.root = root if root is not None else os.path.dirname(path)
        self.relative = os.path.relpath(path, self.root)
        self._fd = -1
        self.open()

    def open(self) -> None:
        self._fd = open_beneath(self.root, self.relative)

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
