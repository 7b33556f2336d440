"""Snapshots: each image layer unpacked once, alone, into <root>/snapshots/<chain id hex>/.

A snapshot is the layer's own diff in overlayfs form (OCI whiteouts become overlay whiteouts),
so a rootfs is an overlay of an image's snapshots with the topmost first. A layer is extracted
into a private temp dir and renamed into place only when complete; a layer that tries to reach
outside its directory is rejected whole.

Extraction never follows a symlink: every parent directory of an entry is checked with lstat
component by component, and a parent that is a symlink rejects the layer. Layers written by
image builders never go through symlinks (a diff lists real paths), and because each layer is
unpacked on its own, following one would resolve against the wrong tree anyway.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gzip
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from netns import libc
from sandbox.images.content import GcRemovals
from sandbox.images.tarreader import TarFormatError, TarLimitExceeded, TarLimits, TarReader

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
PAX_XATTR_PREFIX = "SCHILY.xattr."
TEMP_PREFIX = ".tmp-"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

Progress = Callable[[int], None]


class LayerError(ValueError):
    """The layer cannot be unpacked: corrupt, or not what its diff id says."""


class UnsafeLayer(LayerError):
    """The layer tries to write outside its snapshot directory."""


class LayerTooLarge(LayerError):
    """The layer passes a limit of LayerLimits: a bomb, or an image too big for this node."""


# 64 GiB: above the largest layers seen in practice (CUDA and ML framework layers reach
# 10-20 GiB), and what a node's image disk can take; a gzip layer of zeros expands ~1000x,
# so a 64 MiB download can never fill more than this. containerd has no such limit.
DEFAULT_MAX_LAYER_BYTES = 64 << 30


@dataclass(frozen=True)
class LayerLimits:
    """What one layer may expand to (the `images.max_layer_*` settings)."""

    max_bytes: int = DEFAULT_MAX_LAYER_BYTES  # the uncompressed tar stream
    tar: TarLimits = field(default_factory=TarLimits)


@dataclass(frozen=True)
class Usage:
    bytes: int
    inodes: int


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI image-spec ChainIDs: ChainID(L0) = DiffID(L0);
    ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            joined = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chains


class SnapshotStore:
    def __init__(
        self, root: Path, max_concurrent_unpacks: int = 2, limits: LayerLimits | None = None
    ) -> None:
        self.limits = limits or LayerLimits()
        self.dir = root / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._max_unpacks = max_concurrent_unpacks
        self._slots: asyncio.Semaphore | None = None
        self._unpacking: dict[str, asyncio.Future[None]] = {}
        self._removing = GcRemovals()  # snapshots by chain id
        self._usage: dict[str, Usage] = {}  # snapshots never change, so this never goes stale

    def path(self, chain_id: str) -> Path:
        hex_ = chain_id.removeprefix("sha256:")
        if len(hex_) != 64 or not all(c in "0123456789abcdef" for c in hex_):
            raise ValueError(f"invalid chain id {chain_id!r}")
        return self.dir / hex_

    def has(self, chain_id: str) -> bool:
        return self.path(chain_id).is_dir()

    def chain_ids(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.dir.iterdir() if not p.name.startswith(".")}

    def remove(self, chain_id: str) -> None:
        path = self.path(chain_id)
        # Renamed away first so a half-removed snapshot never sits under its real name.
        doomed = self.dir / f"{TEMP_PREFIX}rm-{path.name}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)
        self._usage.pop(chain_id, None)

    def remove_unused(self, doomed: set[str]) -> Coroutine[object, object, set[str]]:
        """Deletes snapshots GC found unused, once awaited; see ContentStore.remove_unused."""
        return self._removing.remove(
            [c for c in doomed if c not in self._unpacking], self.remove
        )

    def clear_temp(self) -> None:
        """Drops half-unpacked or half-removed snapshots left by a crash."""
        for entry in self.dir.iterdir():
            if entry.name.startswith(TEMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)

    def usage(self, chain_id: str) -> Usage:
        cached = self._usage.get(chain_id)
        if cached is None:
            cached = self._usage[chain_id] = tree_usage(self.path(chain_id))
        return cached

    async def present(self, chain_id: str) -> bool:
        """Whether the snapshot is there to use. The caller holds a lease on it: one GC is
        deleting either stays (spared) or is waited for, and is then absent."""
        await self._removing.wait_for(chain_id)
        return self.has(chain_id)

    async def ensure(self, chain_id: str, blob: Path, diff_id: str, progress: Progress) -> None:
        """Unpacks the layer unless its snapshot exists or another pull is unpacking it."""
        if await self.present(chain_id):
            return
        pending = self._unpacking.get(chain_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_future()
            self._unpacking[chain_id] = pending
            task = loop.create_task(self._unpack_task(chain_id, blob, diff_id, progress, pending))
            task.add_done_callback(lambda _: self._unpacking.pop(chain_id, None))
        await asyncio.shield(pending)

    async def _unpack_task(
        self, chain_id: str, blob: Path, diff_id: str, progress: Progress,
        done: asyncio.Future[None],
    ) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_unpacks)
        try:
            async with self._slots:
                await asyncio.to_thread(self.unpack, chain_id, blob, diff_id, progress)
        except BaseException as e:
            done.set_exception(e)
            done.exception()  # retrieved, even if every waiter is gone
        else:
            done.set_result(None)

    def unpack(
        self, chain_id: str, blob: Path, diff_id: str, progress: Progress | None = None
    ) -> None:
        """Blocking: extracts `blob` into the snapshot for `chain_id`, all or nothing."""
        final = self.path(chain_id)
        if final.is_dir():
            return
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.dir))
        try:
            os.chmod(tmp, 0o755)  # the rootfs' "/" unless the layer says otherwise
            unpack_layer(blob, tmp, diff_id, progress or (lambda _: None), self.limits)
            usage = tree_usage(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Someone else finished it first: theirs is as good as ours.
            self._usage[chain_id] = usage
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def mount_rootfs(
        self,
        lower_chain_ids_topmost_first: Sequence[str],
        upper: Path | None,
        work: Path | None,
        target: Path,
        readonly: bool,
        idmap: Path | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """`idmap`: a pinned user namespace; the layers are then idmapped with it (and the
        upper and work dirs owned by `owner`, the host ids of the namespace's root)."""
        lowers = [self.path(c) for c in lower_chain_ids_topmost_first]
        mount_overlay(lowers, upper, work, target, readonly, idmap=idmap, owner=owner)


# ---- extraction ------------------------------------------------------------------------------


class _HashingReader:
    """Hashes the uncompressed tar stream, to check it against the layer's diff id, reports
    its bytes as the pull's unpack progress, and stops it at `max_bytes` as it streams."""

    def __init__(self, inner: BinaryIO, progress: Progress, max_bytes: int) -> None:
        self.inner = inner
        self.progress = progress
        self.hasher = hashlib.sha256()
        self.max_bytes = max_bytes
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = CHUNK  # never the whole stream at once
        data = self.inner.read(n)
        self.total += len(data)
        if self.total > self.max_bytes:
            raise LayerTooLarge(
                f"layer expands to more than {self.max_bytes} bytes (images.max_layer_bytes)"
            )
        self.hasher.update(data)
        self.progress(len(data))
        return data

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return "sha256:" + self.hasher.hexdigest()


def _decompressed(
    raw: BinaryIO, progress: Progress, stack: ExitStack, max_bytes: int
) -> _HashingReader:
    magic = raw.read(4)
    raw.seek(0)
    stream: BinaryIO
    if magic.startswith(GZIP_MAGIC):
        stream = cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
    elif magic == ZSTD_MAGIC:
        stream = stack.enter_context(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        )
    else:
        stream = raw
    return _HashingReader(stream, progress, max_bytes)


def unpack_layer(
    blob: Path, dest: Path, diff_id: str, progress: Progress, limits: LayerLimits | None = None
) -> None:
    """Blocking: extracts the layer in `blob` (gzip, zstd or plain tar) into `dest`, within
    `limits`, checked as the stream is read (never after)."""
    actual = _extract(blob, dest, progress, limits or LayerLimits(), (), f"layer {blob.name}")
    if actual != diff_id:
        raise LayerError(
            f"layer {blob.name}: uncompressed digest {actual} does not match diff id {diff_id}"
        )


def extract_tar(archive: Path, dest: Path, limits: LayerLimits, deleted: Iterable[str] = ()
                ) -> None:
    """Blocking: a tar that is not an image layer (a checkpoint archive, its rootfs diff) into
    `dest` by a layer's rules: nothing escapes `dest`, within `limits`. Each of the `deleted`
    paths becomes an overlayfs whiteout in `dest`, as a layer's .wh. entry would."""
    _extract(archive, dest, lambda _: None, limits, deleted, str(archive))


def _extract(blob: Path, dest: Path, progress: Progress, limits: LayerLimits,
             deleted: Iterable[str], what: str) -> str:
    """Extracts `blob` into `dest` and whites out `deleted`; the uncompressed digest."""
    with ExitStack() as stack:
        raw = stack.enter_context(open(blob, "rb"))
        tar_stream = _decompressed(raw, progress, stack, limits.max_bytes)
        try:
            tar = TarReader(tar_stream, limits.tar)
            extractor = _Extractor(dest)
            for member in tar:
                extractor.apply(member, tar)
            for path in deleted:
                parent, _, base = clean_member_path(path).rpartition("/")
                if base:
                    extractor.whiteout(parent, WHITEOUT_PREFIX + base)
            extractor.finish()
            return tar_stream.drain()
        except TarLimitExceeded as e:
            raise LayerTooLarge(f"{what}: {e}") from e
        except (
            TarFormatError, EOFError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error
        ) as e:
            raise LayerError(f"{what} is not a valid tar stream: {e}") from e


def clean_member_path(name: str) -> str:
    """The entry's path relative to the snapshot ("" for the root). A leading "/" is dropped,
    as tar does; ".." anywhere is an error (Docker's and containerd's rule too)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer entry {name!r} has a '..' component")
    return "/".join(parts)


class _Extractor:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_dirs: set[str] = {""}  # relative dirs already checked to be real directories
        self.dir_mtimes: dict[str, float] = {}  # set last: extracting into a dir changes it

    def apply(self, member: tarfile.TarInfo, tar: TarReader) -> None:
        rel = clean_member_path(member.name)
        parent, _, base = rel.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(parent, base)
            return
        if rel == "":
            if not member.isdir():
                raise UnsafeLayer(f"layer entry {member.name!r} would replace the root directory")
            self._set_metadata(rel, member)
            return
        self._ensure_real_parents(parent)
        path = self._abs(rel)
        if member.isdir():
            if not _is_real_dir(path):
                self._remove(rel)
                os.mkdir(path, 0o700)
            self.real_dirs.add(rel)
        elif member.islnk():
            self._hardlink(rel, member)
            return  # the same inode as its target, with the target's metadata
        else:
            self._remove(rel)
            self._create(path, member, tar)
        self._set_metadata(rel, member)

    def finish(self) -> None:
        # Deepest first, so setting a child's mtime cannot disturb its parent's afterwards.
        for rel in sorted(self.dir_mtimes, key=lambda r: r.count("/"), reverse=True):
            mtime_ns = int(self.dir_mtimes[rel] * 1e9)
            os.utime(self._abs(rel), ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def _ensure_real_parents(self, parent: str) -> None:
        """Creates missing parents; a parent that is a symlink or a file rejects the layer."""
        if parent in self.real_dirs:
            return
        prefix = ""
        for component in parent.split("/"):
            prefix = f"{prefix}/{component}" if prefix else component
            if prefix in self.real_dirs:
                continue
            try:
                st = os.lstat(self._abs(prefix))
            except FileNotFoundError:
                os.mkdir(self._abs(prefix), 0o755)
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeLayer(f"layer writes through the symlink {prefix!r}")
                if not stat.S_ISDIR(st.st_mode):
                    raise LayerError(f"layer uses {prefix!r} as a directory, but it is a file")
            self.real_dirs.add(prefix)

    def _remove(self, rel: str) -> None:
        """Removes what is at `rel` (never following a symlink) so a new entry can go there."""
        path = self._abs(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self.real_dirs = {d for d in self.real_dirs if d != rel and not d.startswith(rel + "/")}
            self.dir_mtimes = {
                d: t for d, t in self.dir_mtimes.items() if d != rel and not d.startswith(rel + "/")
            }
        else:
            os.unlink(path)

    def whiteout(self, parent: str, base: str) -> None:
        self._ensure_real_parents(parent)
        if base == OPAQUE_MARKER:
            # Hides the lower layers' content of this directory, not this layer's.
            os.setxattr(self._abs(parent), OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise UnsafeLayer(f"layer has an invalid whiteout {base!r} in {parent or '/'!r}")
        rel = f"{parent}/{name}" if parent else name
        path = self._abs(rel)
        if os.path.lexists(path):
            return  # a whiteout hides lower layers only; this layer's own entry stays
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # overlayfs' whiteout

    def _hardlink(self, rel: str, member: tarfile.TarInfo) -> None:
        target_rel = clean_member_path(member.linkname)
        if not target_rel:
            raise UnsafeLayer(f"layer entry {member.name!r} hardlinks to the root directory")
        target_parent = target_rel.rpartition("/")[0]
        self._ensure_real_parents(target_parent)
        target = self._abs(target_rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise LayerError(
                f"layer entry {member.name!r} hardlinks to {member.linkname!r}, not in the layer"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer entry {member.name!r} hardlinks to a directory")
        if target_rel == rel:
            return
        self._remove(rel)
        os.link(target, self._abs(rel), follow_symlinks=False)

    def _create(self, path: str, member: tarfile.TarInfo, tar: TarReader) -> None:
        if member.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(member)
                if source is not None:
                    shutil.copyfileobj(source, out, CHUNK)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise LayerError(f"layer entry {member.name!r} has unsupported type {member.type!r}")

    def _set_metadata(self, rel: str, member: tarfile.TarInfo) -> None:
        path = self._abs(rel)
        os.lchown(path, member.uid, member.gid)
        if not member.issym():
            # After chown, which clears setuid and setgid bits.
            os.chmod(path, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if not key.startswith(PAX_XATTR_PREFIX):
                continue
            name = key[len(PAX_XATTR_PREFIX):]
            if name.startswith("trusted.overlay."):
                continue  # overlayfs' own bookkeeping: a layer must not forge it
            raw = value.encode("utf-8", "surrogateescape")  # tarfile decoded the raw bytes
            os.setxattr(path, name, raw, follow_symlinks=False)
        if member.isdir():
            self.dir_mtimes[rel] = member.mtime
        else:
            mtime_ns = int(member.mtime * 1e9)
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def tree_usage(root: Path) -> Usage:
    """Bytes on disk and inodes under `root`, each hardlinked inode counted once."""
    seen: set[int] = set()
    used = 0

    def visit(st: os.stat_result) -> None:
        nonlocal used
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            used += st.st_blocks * 512

    visit(os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            visit(os.lstat(os.path.join(dirpath, name)))
    return Usage(used, len(seen))


# ---- mounting --------------------------------------------------------------------------------


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc.mount(source, target, fstype or "", flags, data)


def mount_overlay(
    lowers_topmost_first: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    readonly: bool,
    *,
    idmap: Path | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    """Mounts the rootfs at `target`: an overlay of the lowers (and the upper unless readonly);
    a single readonly lower is a readonly bind mount (overlay wants two lowers without upper).

    Lower dirs are passed as /proc/self/fd/<n> of descriptors held open during mount(2): the
    kernel resolves them at mount time, and each costs ~17 bytes of the one-page option string,
    without a chdir that would race with other threads.

    With `idmap` (a pinned user namespace) each lower is an idmapped clone of its snapshot,
    attached for the time of mount(2) below `target`'s parent (overlayfs takes its own private
    copy of each layer then, so the clones are detached again and go away with their fds; a
    kernel before 6.15 refuses a layer that is not in the mount namespace, "failed to clone
    lowerpath", EINVAL: Debian 12's 6.1 does), and the upper and work
    dirs are chowned to `owner`: what the container writes is owned by its root on the host,
    and copied-up files keep the owner they have through the idmapped layer."""
    if not lowers_topmost_first:
        raise ValueError("a rootfs needs at least one layer")
    if idmap is not None and (readonly or owner is None):
        raise ValueError("an idmapped rootfs is writable and needs the owner of its upper dir")
    if readonly and len(lowers_topmost_first) == 1:
        source = str(lowers_topmost_first[0])
        _mount(source, str(target), None, MS_BIND, None)
        _mount(source, str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        return
    with ExitStack() as stack:
        attach_dir = target.parent / f".{target.name}.layers"
        if idmap is not None:  # rmdir, never rmtree: a point still mounted is a snapshot
            attach_dir.mkdir(mode=0o700, exist_ok=True)
            stack.callback(attach_dir.rmdir)

        def fd_path(path: Path, mapped: bool = False) -> str:
            if mapped and idmap is not None:
                fd = idmapped_clone(path, idmap)
                stack.callback(os.close, fd)
                point = attach_dir / str(fd)
                point.mkdir()
                stack.callback(point.rmdir)
                attach_mount(fd, point)
                stack.callback(libc.umount2, str(point), MNT_DETACH)
            else:
                fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
            return f"/proc/self/fd/{fd}"

        options = ["lowerdir=" + ":".join(fd_path(p, True) for p in lowers_topmost_first)]
        if not readonly:
            if upper is None or work is None:
                raise ValueError("a writable rootfs needs an upper and a work dir")
            for d in (upper, work):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
                if owner is not None:
                    os.chown(d, *owner)
            options += [f"upperdir={fd_path(upper)}", f"workdir={fd_path(work)}"]
        data = ",".join(options)
        if len(data) >= PAGE_SIZE:
            raise ValueError(
                f"{len(lowers_topmost_first)} layers do not fit the mount options page"
            )
        _mount("overlay", str(target), "overlay", MS_RDONLY if readonly else 0, data)


# ---- idmapped mounts (runc 1.1.5 cannot make them: flatpod does, before runc sees the paths) --

SYS_OPEN_TREE = 428  # x86_64 and aarch64 share these numbers (new syscalls are unified)
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
MOVE_MOUNT_F_EMPTY_PATH = 0x4
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_IDMAP = 0x00100000
AT_FDCWD = -100


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def idmapped_clone(source: Path, userns: Path, recursive: bool = False) -> int:
    """A detached clone of the mount at `source`, idmapped with the user namespace pinned at
    `userns`: files the host sees owned by k appear owned by map(k) through it, so a
    container whose root is host uid N sees the image's root-owned files as its own.

    Returns the clone's O_PATH fd (close it to drop the clone); usable as /proc/self/fd/<n>."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    tree = libc.syscall(
        SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), str(source).encode(), ctypes.c_uint(flags),
        what=f"open_tree {source}",
    )
    try:
        ns_fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=ns_fd)
            libc.syscall(
                SYS_MOUNT_SETATTR, ctypes.c_int(tree), b"",
                ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
                ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                what=f"mount_setattr idmap {source}",
            )
        finally:
            os.close(ns_fd)
    except BaseException:
        os.close(tree)
        raise
    return tree


def attach_mount(tree: int, point: Path) -> None:
    """Attaches the detached mount `tree` (an open_tree fd) at `point`; the fd then refers to
    the attached mount."""
    libc.syscall(
        SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD), str(point).encode(),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH), what=f"move_mount -> {point}",
    )


def idmap_supported(path: Path, userns: Path) -> bool:
    """True if the filesystem holding `path` accepts idmapped mounts (as critest probes)."""
    try:
        os.close(idmapped_clone(path, userns))
    except OSError as e:
        log.info("idmapped mounts unavailable on %s: %s", path, e)
        return False
    return True


def mounted_lowers(chain_ids_bottom_first: Iterable[str]) -> list[str]:
    """The lowerdir order for an image's chain ids: topmost first."""
    return list(reversed(list(chain_ids_bottom_first)))
