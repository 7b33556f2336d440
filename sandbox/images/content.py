"""The content store: blobs by digest under <root>/content/sha256/<hex>.

A blob appears there only whole and verified: it is written to content/ingest/, hashed as it
is written, fsynced, and renamed into place. A blob already present is never fetched again,
and concurrent pulls wanting the same blob share one download.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CHUNK = 1024 * 1024
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


Opener = Callable[[], AbstractContextManager[Readable]]
Progress = Callable[[int], None]


class BlobDigestMismatch(ValueError):
    """What was downloaded does not hash to (or is not the size of) the expected blob."""


def digest_hex(digest: str) -> str:
    """The hex of "sha256:<hex>"; ValueError for anything else (it becomes a file name)."""
    m = _DIGEST.fullmatch(digest)
    if m is None:
        raise ValueError(f"unsupported digest {digest!r}: only sha256:<64 hex> is accepted")
    return m.group(1)


@dataclass
class _Download:
    """One in-flight download, awaited by every pull that wants the blob."""

    future: asyncio.Future[Path]
    listeners: list[Progress] = field(default_factory=list)

    def report(self, nbytes: int) -> None:
        for listener in tuple(self.listeners):
            listener(nbytes)


class GcRemovals:
    """What GC is removing from a store (blobs by digest, snapshots by chain id), one name at
    a time in a worker thread. A pull that wants one of them meanwhile keeps it if the thread
    has not reached it yet (it is spared: a re-pull during a slow collection downloads and
    unpacks only what is already gone), else waits until it is gone and makes it again.

    The pull must hold its lease on the name (gc.Leases) before it asks, so that the next
    collection's decision sees it too."""

    def __init__(self) -> None:
        self._done: dict[str, asyncio.Event] = {}  # set once GC is through with it
        # Taken by the thread as it reaches a name and by a pull sparing one: either the
        # thread deletes the name and the pull waits, or the pull keeps it and the thread
        # passes it by; never both.
        self._lock = threading.Lock()
        self._reached: set[str] = set()
        self._spared: set[str] = set()

    async def wait_for(self, name: str) -> None:
        """Returns once `name` is either spared or gone (make it again then)."""
        done = self._done.get(name)
        if done is None:
            return
        with self._lock:
            if name not in self._reached:
                self._spared.add(name)
                return
        await done.wait()

    def remove(
        self, names: Iterable[str], remove: Callable[[str], None]
    ) -> Coroutine[object, object, set[str]]:
        """Marks `names` as being removed now, and returns what, awaited, calls `remove(name)`
        for each not spared meanwhile, all in one worker thread: the names removed. Await it:
        a name stays marked (and its pulls waiting) until then."""
        events = {n: asyncio.Event() for n in names}
        self._done.update(events)
        return self._remove(events, remove)

    async def _remove(
        self, events: dict[str, asyncio.Event], remove: Callable[[str], None]
    ) -> set[str]:
        try:
            return await asyncio.to_thread(self._remove_each, list(events), remove)
        finally:
            with self._lock:
                for name, event in events.items():
                    del self._done[name]
                    self._reached.discard(name)
                    self._spared.discard(name)
                    event.set()

    def _remove_each(self, names: list[str], remove: Callable[[str], None]) -> set[str]:
        removed = set()
        for name in names:
            with self._lock:
                if name in self._spared:
                    continue
                self._reached.add(name)
            remove(name)
            removed.add(name)
        return removed


class ContentStore:
    def __init__(self, root: Path, max_concurrent_downloads: int = 3) -> None:
        self.blob_dir = root / "content" / "sha256"
        self.ingest_dir = root / "content" / "ingest"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        self._max_downloads = max_concurrent_downloads
        self._slots: asyncio.Semaphore | None = None
        self._downloads: dict[str, _Download] = {}
        self._removing = GcRemovals()  # blobs by digest

    def path(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def digests(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.blob_dir.iterdir() if _DIGEST.fullmatch(
            f"sha256:{p.name}")}

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def remove_unused(self, doomed: set[str]) -> Coroutine[object, object, set[str]]:
        """Deletes blobs GC found unused, once awaited; the digests deleted. Decide `doomed` and
        call this in one event-loop step: from then on a pull asking for one of them keeps it
        if it is not deleted yet, else waits and downloads it again (GcRemovals)."""
        return self._removing.remove(
            [d for d in doomed if d not in self._downloads], self.remove
        )

    def clear_ingest(self) -> None:
        """Drops half-written downloads left by a crash (call before any pull starts)."""
        for entry in self.ingest_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    async def fetch(self, digest: str, size: int, opener: Opener, progress: Progress) -> Path:
        """The blob's path, downloading it with `opener` unless it is present or already
        being downloaded by another pull (then this waits for that one). `progress` gets the
        bytes downloaded."""
        digest_hex(digest)
        await self._removing.wait_for(digest)  # spared, or gone: then fetched again
        path = self.path(digest)
        if path.is_file():
            return path  # nothing downloaded, nothing counted
        download = self._downloads.get(digest)
        if download is None:
            loop = asyncio.get_running_loop()
            download = _Download(loop.create_future())
            self._downloads[digest] = download
            download.listeners.append(progress)
            # Its own task: a pull that gives up must not cancel a download others wait for.
            task = loop.create_task(self._download(digest, size, opener, download))
            task.add_done_callback(lambda _: self._downloads.pop(digest, None))
        else:
            download.listeners.append(progress)
        try:
            return await asyncio.shield(download.future)
        finally:
            if progress in download.listeners:
                download.listeners.remove(progress)

    async def _download(self, digest: str, size: int, opener: Opener, dl: _Download) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_downloads)
        try:
            async with self._slots:
                path = await asyncio.to_thread(self.write_from, digest, size, opener, dl.report)
        except BaseException as e:
            dl.future.set_exception(e)
            dl.future.exception()  # marks it retrieved: waiters may all have gone
        else:
            dl.future.set_result(path)

    def write_from(self, digest: str, size: int, opener: Opener, progress: Progress) -> Path:
        """Blocking: streams the blob into ingest/, verifies size and digest, fsyncs, renames."""
        want_hex = digest_hex(digest)
        final = self.path(digest)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{want_hex[:16]}-", dir=self.ingest_dir)
        tmp = Path(tmp_name)
        try:
            hasher = hashlib.sha256()
            written = 0
            with os.fdopen(fd, "wb") as out, opener() as source:
                while chunk := source.read(CHUNK):
                    written += len(chunk)
                    if written > size:
                        raise BlobDigestMismatch(
                            f"blob {digest} is larger than its descriptor's {size} bytes"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                    progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if written != size:
                raise BlobDigestMismatch(f"blob {digest}: got {written} of {size} bytes")
            if hasher.hexdigest() != want_hex:
                raise BlobDigestMismatch(
                    f"blob {digest} digest mismatch: got sha256:{hasher.hexdigest()}"
                )
            os.rename(tmp, final)
            _fsync_dir(self.blob_dir)
            return final
        finally:
            tmp.unlink(missing_ok=True)

    async def put(self, digest: str, data: bytes) -> Path:
        """Stores a small blob already in memory (see write_bytes); the caller holds a lease on
        it, as for fetch: a blob GC is deleting is either spared or written again."""
        await self._removing.wait_for(digest)
        return await asyncio.to_thread(self.write_bytes, digest, data)

    def write_bytes(self, digest: str, data: bytes) -> Path:
        """Blocking: stores a small blob already in memory (a manifest, a config), verified."""
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BlobDigestMismatch(f"content does not match {digest}")
        final = self.path(digest)
        if final.is_file():
            return final

        class _Bytes:
            def __init__(self) -> None:
                self.sent = False

            def read(self, n: int = -1, /) -> bytes:
                if self.sent:
                    return b""
                self.sent = True
                return data

            def __enter__(self) -> _Bytes:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

        return self.write_from(digest, len(data), _Bytes, lambda _: None)

    def usage(self) -> tuple[int, int]:
        """(bytes on disk, inodes) of all blobs."""
        used = inodes = 0
        for entry in os.scandir(self.blob_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # collected by GC between the listing and the stat
            used += st.st_blocks * 512
            inodes += 1
        return used, inodes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
