"""Image records in state.db: `images` (id = config digest, doc = JSON) and `image_refs`.

An image carries any number of references: tags ("docker.io/library/busybox:latest") and
digests ("docker.io/library/busybox@sha256:..."), from any registries. A reference names one
image; pulling a tag that moved re-points it, and the old image keeps its other references.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
        refs = sorted(refs)
        return ImageRecord(
            id=image_id,
            manifest_digest=d["manifest_digest"],
            top_digest=d["top_digest"],
            media_type=d["media_type"],
            config=d["config"],
            layers=tuple(LayerRecord(**layer) for layer in d["layers"]),
            size=int(d["size"]),
            repo_tags=tuple(r for r in refs if "@" not in r),
            repo_digests=tuple(r for r in refs if "@" in r),
        )


class ImageStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def save(self, record: ImageRecord, refs: Iterable[str]) -> None:
        """Stores the image and points each reference at it (taking it from another image)."""
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

    def get(self, image_id: str) -> ImageRecord | None:
        rows = self.store.query("SELECT doc FROM images WHERE id = ?", (image_id,))
        if not rows:
            return None
        refs = self.store.query("SELECT ref FROM image_refs WHERE image_id = ?", (image_id,))
        return ImageRecord.from_doc(image_id, rows[0]["doc"], (r["ref"] for r in refs))

    def list(self) -> list[ImageRecord]:
        refs: dict[str, list[str]] = {}
        for row in self.store.query("SELECT ref, image_id FROM image_refs"):
            refs.setdefault(row["image_id"], []).append(row["ref"])
        return [
            ImageRecord.from_doc(row["id"], row["doc"], refs.get(row["id"], ()))
            for row in self.store.query("SELECT id, doc FROM images ORDER BY id")
        ]

    def resolve(self, ref_or_id: str) -> ImageRecord | None:
        """The image named by an id ("sha256:<hex>" or "<hex>"), a reference in any form
        ("busybox", a tag, a digest reference), or a unique id prefix of 12+ hex digits;
        tried in that order, as containerd's CRI does."""
        if is_image_id(ref_or_id):
            return self.get("sha256:" + ref_or_id.removeprefix("sha256:"))
        try:
            ref = str(parse_reference(ref_or_id))
        except InvalidReference:
            ref = None
        if ref is not None:
            rows = self.store.query("SELECT image_id FROM image_refs WHERE ref = ?", (ref,))
            if rows:
                return self.get(rows[0]["image_id"])
        return self._by_id_prefix(ref_or_id.removeprefix("sha256:"))

    def _by_id_prefix(self, prefix: str) -> ImageRecord | None:
        if len(prefix) < MIN_ID_PREFIX or not _HEX.fullmatch(prefix):
            return None
        # The prefix is hex only, so it holds no LIKE wildcards.
        rows = self.store.query(
            "SELECT id FROM images WHERE id LIKE ? LIMIT 2", (f"sha256:{prefix}%",)
        )
        if len(rows) != 1:
            return None  # none, or ambiguous
        return self.get(rows[0]["id"])

    def remove(self, image_id: str) -> None:
        """Deletes the image and every reference to it."""
        with self.store.tx() as conn:
            conn.execute("DELETE FROM image_refs WHERE image_id = ?", (image_id,))
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
