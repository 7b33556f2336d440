"""A byte queue that makes its producer wait: the one place streaming data is buffered."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class ByteQueue:
    """Chunks in, bytes out. put() waits while `limit` bytes or more wait to be read, so a
    consumer that stops reading stops its producer instead of growing memory."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ended = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def ended(self) -> bool:
        return self._ended

    async def put(self, data: bytes) -> None:
        """Queue data (b"" is ignored); waits for room. Dropped once the queue ended."""
        while self._size >= self._limit and not self._ended:
            self._room.clear()
            await self._room.wait()
        if data and not self._ended:
            self._chunks.append(data)
            self._size += len(data)
            self._readable.set()

    def end(self) -> None:
        """No more data: read() returns b"" once the queue is empty; put() stops waiting."""
        self._ended = True
        self._readable.set()
        self._room.set()

    async def read(self, n: int = 64 * 1024) -> bytes:
        """Up to n bytes of the next chunk; b"" at the end."""
        chunk = await next_chunk(self._chunks, self._readable, lambda: self._ended, n)
        if not chunk:
            return chunk
        self._size -= len(chunk)
        if self._size < self._limit:
            self._room.set()
        return chunk


async def next_chunk(
    chunks: deque[bytes], readable: asyncio.Event, ended: Callable[[], bool], n: int
) -> bytes:
    """Up to n bytes of the first of `chunks` (what is left of it stays first), waiting on
    `readable` while there is none; b"" once there is none and `ended()`."""
    while not chunks:
        if ended():
            return b""
        readable.clear()
        await readable.wait()
    chunk = chunks.popleft()
    if len(chunk) > n:
        chunks.appendleft(chunk[n:])
        chunk = chunk[:n]
    return chunk
