"""Garbage collection of blobs and snapshots that no image (and no container) uses.

Live = everything the image records name, plus the snapshots the caller says containers use,
plus whatever in-flight pulls have leased. The decision is taken in one event-loop step
(no await between reading the disk, the leases and the records). A pull that wants a doomed
blob or snapshot afterwards keeps it if the deletion has not reached it yet, else waits for
its removal and makes it again (content.GcRemovals).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass

from sandbox.images.content import ContentStore
from sandbox.images.snapshots import SnapshotStore
from sandbox.images.store import ImageStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    removed_blobs: frozenset[str]
    removed_snapshots: frozenset[str]


class Leases:
    """Blobs and snapshots an in-flight pull needs before its image record exists."""

    def __init__(self) -> None:
        self.blobs: Counter[str] = Counter()
        self.snapshots: Counter[str] = Counter()

    @contextmanager
    def hold(self, blobs: Set[str], snapshots: Set[str]) -> Iterator[None]:
        self.blobs.update(blobs)
        self.snapshots.update(snapshots)
        try:
            yield
        finally:
            self.blobs.subtract(blobs)
            self.snapshots.subtract(snapshots)
            self.blobs = +self.blobs  # drops the zero counts
            self.snapshots = +self.snapshots


async def collect_garbage(
    images: ImageStore,
    content: ContentStore,
    snapshots: SnapshotStore,
    leases: Leases,
    extra_live_snapshots: Set[str],
) -> GcReport:
    # One synchronous step: no pull can lease or record anything in between.
    on_disk_blobs = content.digests()
    on_disk_snapshots = snapshots.chain_ids()
    live_blobs = set(leases.blobs)
    live_snapshots = set(leases.snapshots) | set(extra_live_snapshots)
    for record in images.list():
        live_blobs |= record.blob_digests
        live_snapshots.update(record.chain_ids)
    doomed_blobs = on_disk_blobs - live_blobs
    doomed_snapshots = on_disk_snapshots - live_snapshots
    # Both stores mark their doomed names in this same step, before any pull can ask for
    # one: a snapshot marked only after the blobs were deleted could be taken as present by
    # a pull in between, and deleted under its new record.
    removing_blobs = content.remove_unused(doomed_blobs)
    removing_snapshots = snapshots.remove_unused(doomed_snapshots)
    removed_blobs, removed_snapshots = await asyncio.gather(removing_blobs, removing_snapshots)
    if removed_blobs or removed_snapshots:
        log.info("image gc: removed %d blobs, %d snapshots",
                 len(removed_blobs), len(removed_snapshots))
    return GcReport(frozenset(removed_blobs), frozenset(removed_snapshots))


def remove_leftovers(content: ContentStore, snapshots: SnapshotStore) -> None:
    """At startup, before any pull: half-written downloads and half-unpacked snapshots."""
    content.clear_ingest()
    snapshots.clear_temp()
