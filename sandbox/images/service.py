"""The CRI ImageService: PullImage, ListImages, ImageStatus, RemoveImage, ImageFsInfo.

Each method takes the request message and returns the response message; the gRPC servicer
around it maps CriError subclasses (sandbox.errors) to status codes.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence, Set
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from cri_api import api_pb2 as pb
from sandbox.config import ImagesConfig
from sandbox.errors import (
    CriError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from sandbox.faults import Faults
from sandbox.images.content import BlobDigestMismatch, ContentStore, Readable
from sandbox.images.gc import GcReport, Leases, collect_garbage, remove_leftovers
from sandbox.images.reference import InvalidReference, Reference, parse_reference
from sandbox.images.registry import (
    Credentials,
    Descriptor,
    Manifest,
    ManifestUnknown,
    RegistryClient,
    RegistryError,
    RegistryHosts,
    TokenCache,
    Unauthorized,
    registry_host,
)
from sandbox.images.snapshots import (
    LayerError,
    LayerLimits,
    LayerTooLarge,
    SnapshotStore,
    chain_ids,
    tree_usage,
)
from sandbox.images.store import ImageRecord, ImageStore, LayerRecord
from sandbox.images.tarreader import TarLimits
from sandbox.store import Store
from sandbox.wire import pages, repeated_entry

log = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL = 10.0
T = TypeVar("T")


class PullUnauthenticated(CriError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DiskFull(CriError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# A full disk (or quota) is the node's problem, not the registry's: kubelet's image GC acts on
# RESOURCE_EXHAUSTED, whereas UNAVAILABLE would only make it retry the same pull.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class PullProgress:
    """Bytes of a pull so far; worker threads add to it, the watchdog reads it."""

    total: int = 0
    done: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    def add(self, nbytes: int) -> None:
        if nbytes:
            self.done += nbytes
            self.last_progress = time.monotonic()


class ByteCount:
    """Bytes downloaded from registries since startup (a metric); worker threads add to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.total += nbytes


# ListImagesResponse.images, StreamImagesResponse.images and ImageStatusResponse.image.
IMAGE_FIELD = 1


class ImageService:
    def __init__(
        self,
        store: Store,
        root: Path,
        config: ImagesConfig,
        sandbox_image: str = "",
        containers_dir: Path | None = None,
        live_snapshots: Callable[[], Set[str]] = frozenset,
        faults: Faults | None = None,
    ) -> None:
        self.root = root
        self.pulled = ByteCount()
        self.gc_lock = asyncio.Lock()
        self.images = ImageStore(store)
        self.content = ContentStore(root, config.max_concurrent_downloads)
        self.snapshots = SnapshotStore(root, limits=LayerLimits(
            max_bytes=config.max_layer_bytes,
            tar=TarLimits(max_entries=config.max_layer_entries),
        ))
        self.stall_timeout = float(config.pull_progress_timeout_seconds)
        self.hosts = RegistryHosts(
            mirrors=config.mirrors,
            insecure=tuple(config.insecure_registries),
            timeout=self.stall_timeout,
        )
        self.tokens = TokenCache()
        self.leases = Leases()
        self.sandbox_image = _normalized_or_empty(sandbox_image)
        self.containers_dir = containers_dir
        self.live_snapshots = live_snapshots
        self.faults = faults or Faults()
        # Each image's serialized `Image`, with the record it was built from (see _entry).
        self._entries: dict[str, tuple[ImageRecord, bytes]] = {}
        # The collection RemoveImage asked for, run after its answer (see collect_soon).
        self._collection: asyncio.Task[None] | None = None
        self._collection_wanted = False

    async def start(self) -> GcReport:
        """At startup: drop crash leftovers, then what no image or container uses."""
        await asyncio.to_thread(remove_leftovers, self.content, self.snapshots)
        return await self.collect_garbage()

    async def collect_garbage(self) -> GcReport:
        # One collection at a time: two that overlap would both doom, and both remove, the
        # same blobs (simultaneous RemoveImage calls of one image do exactly that).
        async with self.gc_lock:
            return await collect_garbage(
                self.images, self.content, self.snapshots, self.leases, self.live_snapshots()
            )

    def collect_soon(self) -> None:
        """Collects garbage after the caller has answered. A request made before the pending
        collection decides is served by it; one made after makes it run once more."""
        self._collection_wanted = True
        if self._collection is None or self._collection.done():
            self._collection = asyncio.get_running_loop().create_task(self._collect_wanted())

    async def _collect_wanted(self) -> None:
        while self._collection_wanted:
            self._collection_wanted = False
            try:
                await self.collect_garbage()
            except Exception:  # what is left is unreferenced: the next collection takes it
                log.exception("image gc after RemoveImage failed")

    async def collected(self) -> None:
        """Waits for the collections RemoveImage asked for (tests; a caller that must see the
        disk freed)."""
        while (task := self._collection) is not None and not task.done():
            await asyncio.wait({task})

    # ---- PullImage ---------------------------------------------------------------------------

    async def PullImage(self, request: pb.PullImageRequest) -> pb.PullImageResponse:
        ref = _parse(request.image.image)
        credentials = _credentials(request.auth) if request.HasField("auth") else None
        client = RegistryClient(ref, self.hosts, credentials, self.tokens)
        progress = PullProgress()
        started = time.monotonic()
        record = await self._watch_progress(ref, progress, self._pull(ref, client, progress))
        log.info("pulled %s as %s: %d bytes in %.1fs", ref, record.id, progress.total,
                 time.monotonic() - started)
        # kubelet (and critest) ask ImageStatus right after a pull: its entry is built here,
        # where ~0.3 ms is a small part of the call, rather than in that lookup.
        saved = self.images.get(record.id)
        if saved is not None:
            self._entry(saved)
        return pb.PullImageResponse(image_ref=record.id)

    async def _pull(
        self, ref: Reference, client: RegistryClient, progress: PullProgress
    ) -> ImageRecord:
        manifest = await _registry_call(asyncio.to_thread(client.resolve))
        blobs = {manifest.digest, manifest.config.digest} | {d.digest for d in manifest.layers}
        progress.total = sum(layer.size for layer in manifest.layers)
        with self.leases.hold(blobs, set()), ExitStack() as snapshot_lease:
            # The manifest, the config and the layer blobs are fetched side by side, and each
            # layer is unpacked once its blob and the config (its diff id) are here. For a
            # small image (critest's, or one whose base layers are here) the registry's round
            # trips were most of the pull, one after the other.
            config = asyncio.ensure_future(self._fetch_config(client, manifest, progress))

            async def layout() -> tuple[list[str], list[str]]:
                diff_ids = _diff_ids(ref, await config, manifest)
                chains = chain_ids(diff_ids)
                snapshot_lease.enter_context(self.leases.hold(set(), set(chains)))
                return diff_ids, chains

            laid_out = asyncio.ensure_future(layout())
            stored = asyncio.ensure_future(self.content.put(manifest.digest, manifest.raw))
            layers = [
                asyncio.ensure_future(
                    self._fetch_and_unpack(client, manifest, index, laid_out, progress)
                )
                for index in range(len(manifest.layers))
            ]
            await _settled([config, laid_out, stored, *layers])
            diff_ids, chains = laid_out.result()
            record = _record(manifest, config.result(), diff_ids, chains)
            await asyncio.to_thread(self.images.save, record, _refs_of(ref, manifest))
        return record

    async def _fetch_config(
        self, client: RegistryClient, manifest: Manifest, progress: PullProgress
    ) -> dict[str, object]:
        path = await self._fetch_blob(client, manifest, manifest.config, progress)
        config = json.loads(await asyncio.to_thread(path.read_bytes))
        if not isinstance(config, dict):
            raise InvalidArgument(f"image config {manifest.config.digest} is not a JSON object")
        return config

    async def _fetch_and_unpack(
        self,
        client: RegistryClient,
        manifest: Manifest,
        index: int,
        laid_out: asyncio.Future[tuple[list[str], list[str]]],
        progress: PullProgress,
    ) -> None:
        layer = manifest.layers[index]
        # The blob even when the snapshot is here (then it is too, unless a collection that
        # reached one and not the other is deleting them): the record names both.
        blob = await self._fetch_blob(client, manifest, layer, progress)
        self.faults.point("pull_image:after_first_blob")
        diff_ids, chains = await asyncio.shield(laid_out)
        if await self.snapshots.present(chains[index]):
            return  # shared with an image already here
        try:
            await self.snapshots.ensure(chains[index], blob, diff_ids[index], progress.add)
        except LayerTooLarge as e:
            raise DiskFull(f"pulling {client.ref}: layer {layer.digest}: {e}") from e
        except LayerError as e:
            raise InvalidArgument(f"pulling {client.ref}: layer {layer.digest}: {e}") from e
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise DiskFull(f"unpacking {client.ref} layer {layer.digest}: {e}") from e
            raise

    async def _fetch_blob(
        self, client: RegistryClient, manifest: Manifest, blob: Descriptor, progress: PullProgress
    ) -> Path:
        def opener() -> AbstractContextManager[Readable]:
            return client.open_blob(blob.digest, first=manifest.endpoint)

        def downloaded(nbytes: int) -> None:
            progress.add(nbytes)
            self.pulled.add(nbytes)

        try:
            return await _registry_call(
                self.content.fetch(blob.digest, blob.size, opener, downloaded)
            )
        except BlobDigestMismatch as e:
            raise Internal(str(client.blob_error(str(e)))) from e

    async def _watch_progress(
        self, ref: Reference, progress: PullProgress, pull: Awaitable[T]
    ) -> T:
        """Runs the pull, cancelling it when no byte has moved for the stall timeout."""
        task = asyncio.ensure_future(pull)
        last_log = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, self.stall_timeout / 4))
                now = time.monotonic()
                if done:
                    try:
                        return task.result()
                    except TimeoutError as e:  # the socket timeout is the stall timeout
                        raise self._stalled(ref, progress) from e
                if now - progress.last_progress > self.stall_timeout:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise self._stalled(ref, progress)
                if now - last_log >= PROGRESS_LOG_INTERVAL:
                    last_log = now
                    log.info("pulling %s: %d of %d bytes", ref, progress.done, progress.total)
        finally:
            if not task.done():
                task.cancel()

    def _stalled(self, ref: Reference, progress: PullProgress) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"pulling {ref}: no progress for {self.stall_timeout:g}s "
            f"({progress.done} of {progress.total} bytes), cancelled"
        )

    # ---- ListImages, ImageStatus -------------------------------------------------------------

    def ListImages(self, request: pb.ListImagesRequest) -> bytes:
        """A ListImagesResponse, the concatenation of each image's kept entry."""
        return b"".join(self.list_entries(request.filter))

    def list_entries(self, flt: pb.ImageFilter) -> list[bytes]:
        """The images a filter selects, each as an `Image` entry of field 1 (ListImagesResponse
        and StreamImagesResponse both carry them there)."""
        wanted = flt.image.image
        if wanted:
            found = self.images.resolve(wanted)
            return [self._entry(found)] if found is not None else []
        return [self._entry(record) for record in self.images.list()]

    async def StreamImages(self, request: pb.StreamImagesRequest) -> AsyncIterator[bytes]:
        """StreamImagesResponse messages: ListImages' entries, in pages."""
        for page in pages(self.list_entries(request.filter)):
            yield page

    def ImageStatus(
        self, request: pb.ImageStatusRequest
    ) -> pb.ImageStatusResponse | bytes:
        record = self.images.resolve(request.image.image)
        if record is None:
            return pb.ImageStatusResponse()  # CRI: not found is an empty answer, not an error
        if not request.verbose:
            return self._entry(record)  # ImageStatusResponse.image is field 1 too
        # The shape containerd answers with, which crictl inspecti prints.
        info = {"info": json.dumps({"chainID": record.chain_ids[-1] if record.layers else "",
                                    "imageSpec": record.config})}
        return pb.ImageStatusResponse(image=self._cri_image(record), info=info)

    def _entry(self, record: ImageRecord) -> bytes:
        """The image's `Image` message as a field-1 entry, serialized once per record: a
        record is immutable, and a new one replaces it when its references change."""
        kept = self._entries.get(record.id)
        if kept is None or kept[0] is not record:
            kept = (record, repeated_entry(IMAGE_FIELD, self._cri_image(record)))
            self._entries[record.id] = kept
        return kept[1]

    def _cri_image(self, record: ImageRecord) -> pb.Image:
        uid, username = _user_of(record.config)
        image = pb.Image(
            id=record.id,
            repo_tags=record.repo_tags,
            repo_digests=record.repo_digests,
            size=record.size,
            username=username,
            spec=pb.ImageSpec(image=record.id),
            pinned=bool(self.sandbox_image)
            and self.sandbox_image in (*record.repo_tags, *record.repo_digests),
        )
        if uid is not None:
            image.uid.value = uid
        return image

    # ---- RemoveImage -------------------------------------------------------------------------

    async def RemoveImage(self, request: pb.RemoveImageRequest) -> pb.RemoveImageResponse:
        """Removes the image with all its references, however it is named (containerd's CRI
        does the same), then its blobs and snapshots no other image or container uses.

        The client waits only for the record's delete: the image is then gone from lists and
        lookups, and its names resolve to nothing. The blobs and snapshots are deleted after
        the answer (collect_soon). A crash in between loses nothing and leaks nothing: what
        no record names is swept at startup (start)."""
        record = self.images.resolve(request.image.image)
        if record is None:
            return pb.RemoveImageResponse()  # already gone: success, as CRI asks
        await asyncio.to_thread(self.images.remove, record.id)
        self._entries.pop(record.id, None)
        self.faults.point("remove_image:before_gc")
        self.collect_soon()
        return pb.RemoveImageResponse()

    # ---- ImageFsInfo -------------------------------------------------------------------------

    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest) -> pb.ImageFsInfoResponse:
        now = time.time_ns()
        used, inodes = await asyncio.to_thread(self._image_fs_usage)
        image_fs = _fs_usage(now, self.root, used, inodes)
        container_fs = []
        if self.containers_dir is not None and self.containers_dir.is_dir():
            usage = await asyncio.to_thread(tree_usage, self.containers_dir)
            container_fs.append(_fs_usage(now, self.containers_dir, usage.bytes, usage.inodes))
        return pb.ImageFsInfoResponse(
            image_filesystems=[image_fs], container_filesystems=container_fs
        )

    def _image_fs_usage(self) -> tuple[int, int]:
        used, inodes = self.content.usage()
        for chain_id in self.snapshots.chain_ids():
            try:
                usage = self.snapshots.usage(chain_id)
            except FileNotFoundError:
                continue  # removed by GC just now
            used += usage.bytes
            inodes += usage.inodes
        return used, inodes


# ---- helpers ---------------------------------------------------------------------------------


def _parse(text: str) -> Reference:
    try:
        return parse_reference(text)
    except InvalidReference as e:
        raise InvalidArgument(str(e)) from e


def _normalized_or_empty(text: str) -> str:
    return str(parse_reference(text)) if text else ""


def _credentials(auth: pb.AuthConfig) -> Credentials:
    if auth.auth:
        try:
            base64.b64decode(auth.auth, validate=True).decode()
        except ValueError as e:
            raise InvalidArgument("auth.auth is not base64 of \"user:password\"") from e
    return Credentials(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
        server=registry_host(auth.server_address) if auth.server_address else "",
    )


async def _settled(tasks: Sequence[Awaitable[object]]) -> None:
    """Waits for every task, failed or not, then raises the first failure in list order.

    A pull that answered while a sibling still writes would leave temp files behind its
    error (and a full disk full a little longer). Cancelled, it cancels them all."""
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _registry_call(call: Awaitable[T]) -> T:
    """Awaits a registry operation, turning its failures into CRI errors."""
    try:
        return await call
    except TimeoutError:
        raise  # a read stalled for the whole stall timeout: _watch_progress reports it
    except Unauthorized as e:
        raise PullUnauthenticated(str(e)) from e
    except ManifestUnknown as e:
        raise NotFound(str(e)) from e
    except RegistryError as e:
        raise Unavailable(str(e)) from e
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise DiskFull(f"writing a downloaded blob: {e}") from e
        raise Unavailable(f"registry I/O failed: {e}") from e


def _diff_ids(ref: Reference, config: dict[str, object], manifest: Manifest) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise InvalidArgument(
            f"pulling {ref}: config {manifest.config.digest} lists {len(diff_ids or [])} "
            f"diff ids for {len(manifest.layers)} layers"
        )
    return [str(d) for d in diff_ids]


def _record(
    manifest: Manifest, config: dict[str, object], diff_ids: list[str], chains: list[str]
) -> ImageRecord:
    layers = tuple(
        LayerRecord(d.digest, d.size, d.media_type, diff_id, chain)
        for d, diff_id, chain in zip(manifest.layers, diff_ids, chains, strict=True)
    )
    return ImageRecord(
        id=manifest.config.digest,
        manifest_digest=manifest.digest,
        top_digest=manifest.top_digest,
        media_type=manifest.media_type,
        config=config,
        layers=layers,
        size=len(manifest.raw) + manifest.config.size + sum(d.size for d in manifest.layers),
    )


def _refs_of(ref: Reference, manifest: Manifest) -> list[str]:
    """The tag pulled (if any) and the repo digest of what it resolved to."""
    refs = [f"{ref.repository}@{manifest.top_digest}"]
    if ref.tag is not None:
        refs.append(str(ref))
    return refs


def _user_of(config: object) -> tuple[int | None, str]:
    """(uid, username) from the config's User: "1000" or "1000:1000" -> uid 1000; a name ->
    username (containerd's rule)."""
    inner = config.get("config") if isinstance(config, dict) else None
    user = inner.get("User", "") if isinstance(inner, dict) else ""
    if not isinstance(user, str) or not user:
        return None, ""
    first = user.split(":", 1)[0]
    if first.isdigit():
        return int(first), ""
    return None, first


def _fs_usage(now: int, mountpoint: Path, used: int, inodes: int) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(
        timestamp=now,
        fs_id=pb.FilesystemIdentifier(mountpoint=str(mountpoint)),
        used_bytes=pb.UInt64Value(value=used),
        inodes_used=pb.UInt64Value(value=inodes),
    )
