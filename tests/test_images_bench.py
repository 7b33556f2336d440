"""Pull time of a ~100 MB, 5-layer image (plus busybox) from the local registry."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.config import ImagesConfig
from sandbox.images.service import ImageService
from sandbox.store import Store
from tests.support.oci import big
from tests.support.plugin import push_definition
from tests.support.registry import Registry


@pytest.mark.slow
def test_pull_big_image(tmp_path: Path, registry: Registry) -> None:
    pushed = push_definition(registry.client(), big())
    store = Store(tmp_path / "state.db")
    try:
        service = ImageService(store, tmp_path / "root", ImagesConfig())
        started = time.monotonic()
        req = pb.PullImageRequest(image=pb.ImageSpec(image=pushed.reference))
        assert asyncio.run(service.PullImage(req)).image_ref == pushed.config_digest
        elapsed = time.monotonic() - started
        print(f"\npulled {pushed.reference} ({len(pushed.layer_digests)} layers) "
              f"in {elapsed:.2f}s")
        record = service.images.get(pushed.config_digest)
        assert record is not None and record.size > 100_000_000
    finally:
        store.close()
