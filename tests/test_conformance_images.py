"""critest's Image Manager, Image Consistency, Image Identifier Consistency and RemoveImage
Idempotence specs (image.go, image_consistency.go, image_id_consistency.go, idempotence.go),
through the daemon, with images of our own in the session registry
(tests/support/images_extra.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.pods import container_config, pod_config, run_pod, start_container
from tests.support.images_extra import ExtraImages, push_extra_images
from tests.support.plugin import TestImages
from tests.support.registry import Registry

MISSING_IMAGE_ID = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def extra_images(registry: Registry) -> ExtraImages:
    return push_extra_images(registry.client())


@pytest.fixture
def cleanup_images(fp: CriClient) -> Iterator[list[str]]:
    """References a test pulls; each is removed (if still there) when the test ends."""
    pulled: list[str] = []
    yield pulled
    for reference in pulled:
        remove(fp, reference)


def pull(fp: CriClient, reference: str) -> str:
    image_ref: str = fp.PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=reference))).image_ref
    return image_ref


def remove(fp: CriClient, reference: str) -> None:
    fp.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=reference)))


def image_status(fp: CriClient, reference: str) -> pb.Image | None:
    response = fp.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=reference)))
    return response.image if response.HasField("image") else None


def listed(fp: CriClient, reference: str = "") -> list[pb.Image]:
    request = pb.ListImagesRequest(filter=pb.ImageFilter(image=pb.ImageSpec(image=reference)))
    return list(fp.ListImages(request).images)


def listed_ids(fp: CriClient) -> set[str]:
    return {image.id for image in listed(fp)}


def test_one_image_with_three_tags(fp: CriClient, extra_images: ExtraImages,
                                   cleanup_images: list[str]) -> None:
    """"should get exactly 3 repoTags in the result image", "should support all kinds of
    references", "removing image by one tag should remove all tags", "should not list or get
    image status immediately after removal"."""
    cleanup_images.extend(extra_images.tagged)
    for reference in extra_images.tagged:
        assert pull(fp, reference) == extra_images.tagged_id
    [image] = [i for i in listed(fp) if i.id == extra_images.tagged_id]
    assert sorted(image.repo_tags) == sorted(extra_images.tagged)
    assert listed(fp, extra_images.tagged[1]) == [image]
    by_id = image_status(fp, extra_images.tagged_id)
    by_digest = image_status(fp, image.repo_digests[0])
    assert by_id == by_digest == image
    assert all(image_status(fp, reference) == image for reference in extra_images.tagged)

    remove(fp, extra_images.tagged[0])
    assert extra_images.tagged_id not in listed_ids(fp)
    assert all(image_status(fp, reference) is None for reference in extra_images.tagged)
    assert image_status(fp, extra_images.tagged_id) is None


def test_image_user_is_uid_or_username(fp: CriClient, extra_images: ExtraImages,
                                       pulled: TestImages, cleanup_images: list[str]) -> None:
    cleanup_images.append(extra_images.numeric_user)
    pull(fp, extra_images.numeric_user)
    numeric = image_status(fp, extra_images.numeric_user)
    assert numeric is not None
    assert numeric.HasField("uid") and numeric.uid.value == 1000
    assert numeric.username == ""
    named = image_status(fp, pulled.busybox_user.reference)
    assert named is not None
    assert named.username == "flat" and not named.HasField("uid")


def test_same_image_from_two_registries(fp: CriClient, extra_images: ExtraImages,
                                        cleanup_images: list[str], tmp_path: Path) -> None:
    """"removing image from one registry should remove all tags from other registries" and
    "should return the same image identifier when pulled from different registries"."""
    first, second = extra_images.pause
    cleanup_images.append(first)
    assert pull(fp, first) == pull(fp, second) == extra_images.pause_id
    image = image_status(fp, second)
    assert image is not None and sorted(image.repo_tags) == sorted([first, second])
    assert image_status(fp, first) == image

    config = pod_config(log_dir=tmp_path)
    pod_id = run_pod(fp, config)
    try:
        ctr = start_container(fp, pod_id, config, container_config(second, command=["true"]))
        status = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr)).status
        assert status.image.image == second
        assert status.image_id == status.image_ref == extra_images.pause_id
        [summary] = fp.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(id=ctr))).containers
        assert summary.image_id == summary.image_ref == extra_images.pause_id
    finally:
        fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    remove(fp, second)
    assert image_status(fp, first) is None and image_status(fp, second) is None
    assert extra_images.pause_id not in listed_ids(fp)


def test_simultaneous_removals_all_succeed(fp: CriClient, extra_images: ExtraImages,
                                           cleanup_images: list[str]) -> None:
    reference = extra_images.tagged[2]
    cleanup_images.append(reference)
    image_id = pull(fp, reference)
    assert image_status(fp, reference) is not None  # visible as soon as the pull returns
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda _: remove(fp, image_id), range(5)))
    assert image_status(fp, image_id) is None
    assert image_id not in listed_ids(fp)


def test_removing_a_missing_image_succeeds(fp: CriClient) -> None:
    for _ in range(2):
        remove(fp, MISSING_IMAGE_ID)
    remove(fp, "127.0.0.1:1/flatpod-test/never-pulled:latest")
    assert image_status(fp, MISSING_IMAGE_ID) is None
