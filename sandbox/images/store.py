"""Image records in state.db: `images` (id = config digest, doc = JSON) and `image_refs`.

An image carries any number of references: tags ("docker.io/library/busybox:latest") and
digests ("docker.io/library/busybox@sha256:..."), from any registries. A reference names one
image; pulling a tag that moved re-points it, and the old image keeps its other references.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sandbox.images.reference import InvalidReference, is_image_id, parse_reference
from sandbox.store import Store

MIN_ID_PREFIX = 12
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class LayerRecord:
    digest: str  # compressed blob in the content store
    size: int
    media_type: str
    diff_id: str
    chain_id: str  # snapshot name


@dataclass(frozen=True)
class ImageRecord:
    id: str  # "sha256:<config digest hex>"
    manifest_digest: str  # the platform manifest
    top_digest: str  # what was pulled: that manifest or the index above it
    media_type: str
    config: Mapping[str, Any]  # the image config document
    layers: tuple[LayerRecord, ...]
    size: int  # manifest + config + compressed layers, as containerd counts it
    repo_tags: tuple[str, ...] = field(default=())
    repo_digests: tuple[str, ...] = field(default=())

    @property
    def chain_ids(self) -> list[str]:
        return [layer.chain_id for layer in self.layers]

    @property
    def refs(self) -> tuple[str, ...]:
        return (*self.repo_tags, *self.repo_digests)

    @property
    def blob_digests(self) -> set[str]:
        return {self.id, self.manifest_digest, self.top_digest} | {
            layer.digest for layer in self.layers
        }

    def to_doc(self) -> str:
        return json.dumps({
            "manifest_digest": self.manifest_digest,
            "top_digest": self.top_digest,
            "media_type": self.media_type,
            "config": self.config,
            "layers": [vars(layer) for layer in self.layers],
            "size": self.size,
        })

    @staticmethod
    def from_doc(image_id: str, doc: str, refs: Iterable[str]) -> ImageRecord:
        d = json.loads(doc)
        record = ImageRecord(
            id=image_id,
            manifest_digest=d["manifest_digest"],
            top_digest=d["top_digest"],
            media_type=d["media_type"],
            config=d["config"],
            layers=tuple(LayerRecord(**layer) for layer in d["layers"]),
            size=int(d["size"]),
        )
        return _with_refs(record, refs)


class ImageStore:
    """The image records of state.db, also kept in memory.

    This store's `save` and `remove` are the only writers of the two tables, so the memory
    copy is loaded once and kept in step by them. Lookups (ListImages, ImageStatus,
    CreateContainer's resolve) then read no database and need no worker thread: a thread hop
    was most of an ImageStatus answer. Pulls save from worker threads, hence the lock.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._records: dict[str, ImageRecord] = {}
        self._image_of_ref: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        refs: dict[str, list[str]] = {}
        for row in self.store.query("SELECT ref, image_id FROM image_refs"):
            refs.setdefault(row["image_id"], []).append(row["ref"])
            self._image_of_ref[row["ref"]] = row["image_id"]
        for row in self.store.query("SELECT id, doc FROM images"):
            self._records[row["id"]] = ImageRecord.from_doc(
                row["id"], row["doc"], refs.get(row["id"], ())
            )

    def save(self, record: ImageRecord, refs: Iterable[str]) -> None:
        """Stores the image and points each reference at it (taking it from another image)."""
        refs = list(refs)
        with self._lock:
            with self.store.tx() as conn:
                conn.execute(
                    "INSERT INTO images (id, doc) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    (record.id, record.to_doc()),
                )
                for ref in refs:
                    conn.execute(
                        "INSERT INTO image_refs (ref, image_id) VALUES (?, ?) "
                        "ON CONFLICT(ref) DO UPDATE SET image_id = excluded.image_id",
                        (ref, record.id),
                    )
            old = self._records.get(record.id)
            taken_from = {self._image_of_ref.get(ref) for ref in refs} - {None, record.id}
            self._image_of_ref.update((ref, record.id) for ref in refs)
            self._records[record.id] = _with_refs(
                record, [*(old.refs if old else ()), *refs]
            )
            for image_id in taken_from:
                self._refresh_refs(str(image_id))

    def _refresh_refs(self, image_id: str) -> None:
        record = self._records.get(image_id)
        if record is not None:
            kept = [ref for ref in record.refs if self._image_of_ref.get(ref) == image_id]
            self._records[image_id] = _with_refs(record, kept)

    def get(self, image_id: str) -> ImageRecord | None:
        return self._records.get(image_id)

    def list(self) -> list[ImageRecord]:
        with self._lock:
            return [self._records[image_id] for image_id in sorted(self._records)]

    def resolve(self, ref_or_id: str) -> ImageRecord | None:
        """The image named by an id ("sha256:<hex>" or "<hex>"), a reference in any form
        ("busybox", a tag, a digest reference), or a unique id prefix of 12+ hex digits;
        tried in that order, as containerd's CRI does."""
        if is_image_id(ref_or_id):
            return self.get("sha256:" + ref_or_id.removeprefix("sha256:"))
        ref = _normalized(ref_or_id)
        if ref is not None:
            image_id = self._image_of_ref.get(ref)
            if image_id is not None:
                return self.get(image_id)
        return self._by_id_prefix(ref_or_id.removeprefix("sha256:"))

    def _by_id_prefix(self, prefix: str) -> ImageRecord | None:
        if len(prefix) < MIN_ID_PREFIX or not _HEX.fullmatch(prefix):
            return None
        with self._lock:
            found = [r for i, r in self._records.items() if i.startswith(f"sha256:{prefix}")]
        return found[0] if len(found) == 1 else None  # none, or ambiguous

    def remove(self, image_id: str) -> None:
        """Deletes the image and every reference to it."""
        with self._lock:
            with self.store.tx() as conn:
                conn.execute("DELETE FROM image_refs WHERE image_id = ?", (image_id,))
                conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            record = self._records.pop(image_id, None)
            for ref in record.refs if record else ():
                if self._image_of_ref.get(ref) == image_id:
                    del self._image_of_ref[ref]


@lru_cache(maxsize=1024)
def _normalized(ref: str) -> str | None:
    """The reference's full form ("busybox" -> "docker.io/library/busybox:latest"), None if it
    is not one. Memoized (a pure function of the text): kubelet and critest ask ImageStatus
    by the same few names over and over, and parsing took ~20-45 us of the event loop each."""
    try:
        return str(parse_reference(ref))
    except InvalidReference:
        return None


def _with_refs(record: ImageRecord, refs: Iterable[str]) -> ImageRecord:
    unique = sorted(set(refs))
    return dataclasses.replace(
        record,
        repo_tags=tuple(r for r in unique if "@" not in r),
        repo_digests=tuple(r for r in unique if "@" in r),
    )
