"""PullImage, ListImages, ImageStatus, RemoveImage, GC and ImageFsInfo against the real registry."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.config import ImagesConfig
from sandbox.images.service import ImageService
from sandbox.images.snapshots import mount_overlay
from sandbox.images.store import ImageStore
from sandbox.mounts import unmount
from sandbox.store import Store
from tests.support.plugin import PushedImage, TestImages


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ImageService]:
    store = Store(tmp_path / "state.db")
    try:
        yield ImageService(store, tmp_path / "root", ImagesConfig())
    finally:
        store.close()


def pull(service: ImageService, ref: str) -> str:
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
    resp: pb.PullImageResponse = asyncio.run(service.PullImage(req))
    return resp.image_ref


def status(service: ImageService, ref: str, verbose: bool = False) -> pb.ImageStatusResponse:
    req = pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=verbose)
    resp = service.ImageStatus(req)
    # Answers are kept serialized (the gRPC server sends bytes as they are).
    return pb.ImageStatusResponse.FromString(resp) if isinstance(resp, bytes) else resp


def remove(service: ImageService, ref: str) -> None:
    """RemoveImage, then the collection it left running after its answer."""
    async def removed() -> None:
        await service.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
        await service.collected()

    asyncio.run(removed())


def blob_names(service: ImageService) -> set[str]:
    return {f"sha256:{p.name}" for p in service.content.blob_dir.iterdir()}


def snapshot_names(service: ImageService) -> set[str]:
    return {f"sha256:{p.name}" for p in service.snapshots.dir.iterdir()}


def test_pull_by_tag_records_tag_digest_and_layers(
    service: ImageService, test_images: TestImages
) -> None:
    busybox = test_images.busybox
    image_id = pull(service, busybox.reference)
    assert image_id == busybox.config_digest
    image = status(service, busybox.reference).image
    assert image.id == busybox.config_digest
    assert list(image.repo_tags) == [busybox.reference]
    assert list(image.repo_digests) == [busybox.digest_reference]
    assert image.size > 0
    assert set(busybox.layer_digests) <= blob_names(service)
    assert len(snapshot_names(service)) == len(busybox.layer_digests)
    # No leftovers from the downloads.
    assert list(service.content.ingest_dir.iterdir()) == []
    # The same image by id, by id without "sha256:", by a 12-digit prefix, by digest ref.
    hex_id = image_id.removeprefix("sha256:")
    for name in (image_id, hex_id, hex_id[:12], busybox.digest_reference):
        assert status(service, name).image.id == image_id, name
    listed = pb.ListImagesResponse.FromString(
        service.ListImages(pb.ListImagesRequest())).images
    assert [i.id for i in listed] == [image_id]


def test_pull_by_digest_has_no_tag(service: ImageService, test_images: TestImages) -> None:
    web = test_images.web
    assert pull(service, web.digest_reference) == web.config_digest
    image = status(service, web.digest_reference).image
    assert list(image.repo_tags) == []
    assert list(image.repo_digests) == [web.digest_reference]


def test_multiarch_index_selects_amd64(service: ImageService, test_images: TestImages) -> None:
    multi = test_images.multiarch
    assert pull(service, multi.reference) == multi.config_digest
    # The arm64 image's only layer was never fetched.
    arm64 = multi.definition.artifact.images[1]  # type: ignore[union-attr]
    assert arm64.layers[0].digest not in blob_names(service)
    assert list(status(service, multi.reference).image.repo_digests) == [
        multi.digest_reference
    ]


def test_shared_layer_stored_once(service: ImageService, test_images: TestImages) -> None:
    busybox, multi = test_images.busybox, test_images.multiarch
    assert busybox.layer_digests[0] == multi.layer_digests[0]  # the premise
    pull(service, busybox.reference)
    base_blob = service.content.path(busybox.layer_digests[0])
    inode = base_blob.stat().st_ino
    pull(service, multi.reference)
    assert base_blob.stat().st_ino == inode  # not downloaded again
    layer_blobs = blob_names(service) & (set(busybox.layer_digests) | set(multi.layer_digests))
    assert len(layer_blobs) == 2
    assert len(snapshot_names(service)) == 2


def test_concurrent_pulls_share_downloads(service: ImageService, test_images: TestImages) -> None:
    refs = [test_images.layered.reference, test_images.layered.digest_reference,
            test_images.busybox.reference]

    async def pull_all() -> list[str]:
        reqs = [pb.PullImageRequest(image=pb.ImageSpec(image=r)) for r in refs]
        resps = await asyncio.gather(*(service.PullImage(r) for r in reqs))
        return [r.image_ref for r in resps]

    ids = asyncio.run(pull_all())
    assert ids == [test_images.layered.config_digest] * 2 + [test_images.busybox.config_digest]
    assert len(snapshot_names(service)) == len(test_images.layered.layer_digests)


def check_expected_tree(rootfs: Path, image: PushedImage) -> None:
    definition = image.definition
    for rel, node in definition.expected.items():
        path = rootfs / rel
        st = os.lstat(path)
        if node.kind == "file":
            assert stat.S_ISREG(st.st_mode), rel
            if node.data is not None and len(node.data) < 4096:
                assert path.read_bytes() == node.data, rel
        elif node.kind == "dir":
            assert stat.S_ISDIR(st.st_mode), rel
        else:
            assert stat.S_ISLNK(st.st_mode), rel
            assert os.readlink(path) == node.target, rel
        if node.mode is not None:
            assert stat.S_IMODE(st.st_mode) == node.mode, rel
        assert (st.st_uid, st.st_gid) == (node.uid, node.gid), rel
        if node.hardlink_of is not None:
            assert st.st_ino == os.lstat(rootfs / node.hardlink_of).st_ino, rel
    for rel in definition.absent:
        assert not os.path.lexists(rootfs / rel), rel
    for top in definition.complete_under:
        found = {
            os.path.relpath(os.path.join(d, n), rootfs)
            for d, dirs, files in os.walk(rootfs / top) for n in (*dirs, *files)
        }
        listed = {rel for rel in definition.expected if rel.startswith(top + "/")}
        assert found == listed


@pytest.mark.parametrize("readonly", [False, True])
def test_layered_image_overlay_applies_whiteouts(
    service: ImageService, test_images: TestImages, tmp_path: Path, readonly: bool
) -> None:
    layered = test_images.layered
    image_id = pull(service, layered.reference)
    record = service.images.get(image_id)
    assert record is not None
    target = tmp_path / "rootfs"
    target.mkdir()
    lowers = [service.snapshots.path(c) for c in reversed(record.chain_ids)]
    mount_overlay(lowers, tmp_path / "upper", tmp_path / "work", target, readonly)
    try:
        check_expected_tree(target, layered)
        # The whiteouts themselves are overlay whiteouts in the snapshot of layer B.
        layer_b = service.snapshots.path(record.chain_ids[2])
        gone = os.lstat(layer_b / "data" / "gone")
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
        assert os.getxattr(layer_b / "data" / "dir", "trusted.overlay.opaque") == b"y"
        mounts = Path("/proc/self/mounts").read_text()
        assert f" {target} overlay " in mounts
    finally:
        unmount(target)
    assert f" {target} " not in Path("/proc/self/mounts").read_text()
    unmount(target)  # idempotent


def test_single_layer_readonly_is_bind_mount(
    service: ImageService, test_images: TestImages, tmp_path: Path
) -> None:
    image_id = pull(service, test_images.busybox.reference)
    record = service.images.get(image_id)
    assert record is not None and len(record.chain_ids) == 1
    target = tmp_path / "rootfs"
    target.mkdir()
    service.snapshots.mount_rootfs(record.chain_ids, None, None, target, readonly=True)
    try:
        out = subprocess.run(["chroot", str(target), "/bin/busybox", "echo", "hi"],
                             capture_output=True, check=True)
        assert out.stdout == b"hi\n"
        with pytest.raises(OSError):
            (target / "x").write_text("x")
    finally:
        unmount(target)


def test_image_status_user_verbose_and_missing(
    service: ImageService, test_images: TestImages
) -> None:
    user_image = test_images.busybox_user
    pull(service, user_image.reference)
    resp = status(service, user_image.reference, verbose=True)
    config = json.loads(user_image.definition.image.config.data)
    user = config["config"]["User"]
    if user.split(":")[0].isdigit():
        assert resp.image.HasField("uid") and resp.image.uid.value == int(user.split(":")[0])
    else:
        assert resp.image.username == user.split(":")[0]
    info = json.loads(resp.info["info"])
    assert info["imageSpec"]["config"]["User"] == user
    missing = status(service, "example.invalid/nothing:here")
    assert not missing.HasField("image")


def test_remove_by_tag_id_digest_and_gc(service: ImageService, test_images: TestImages) -> None:
    busybox, layered, web = test_images.busybox, test_images.layered, test_images.web
    pull(service, busybox.reference)
    pull(service, layered.reference)
    pull(service, web.reference)
    shared = busybox.layer_digests[0]
    # By tag: containerd's CRI removes the image with all its references.
    remove(service, layered.reference)
    assert not status(service, layered.digest_reference).HasField("image")
    assert shared in blob_names(service)
    assert not set(layered.layer_digests[1:]) & blob_names(service)
    assert len(snapshot_names(service)) == 2  # busybox base + web's layer
    # By digest reference.
    remove(service, web.digest_reference)
    assert not status(service, web.reference).HasField("image")
    assert shared in blob_names(service)
    # By id; removing something missing succeeds.
    remove(service, busybox.config_digest)
    remove(service, busybox.config_digest)
    assert blob_names(service) == set()
    assert snapshot_names(service) == set()


def test_gc_keeps_container_snapshots(tmp_path: Path, test_images: TestImages) -> None:
    live: set[str] = set()
    store = Store(tmp_path / "state.db")
    try:
        service = ImageService(store, tmp_path / "root", ImagesConfig(),
                               live_snapshots=lambda: live)
        image_id = pull(service, test_images.busybox.reference)
        record = service.images.get(image_id)
        assert record is not None
        live.add(record.chain_ids[0])
        remove(service, image_id)
        assert snapshot_names(service) == {record.chain_ids[0]}
        live.clear()
        asyncio.run(service.start())
        assert snapshot_names(service) == set()
    finally:
        store.close()


def test_image_fs_info(service: ImageService, test_images: TestImages) -> None:
    pull(service, test_images.busybox.reference)
    resp = asyncio.run(service.ImageFsInfo(pb.ImageFsInfoRequest()))
    [fs] = resp.image_filesystems
    assert fs.fs_id.mountpoint == str(service.root)
    assert fs.used_bytes.value > 500_000  # a static busybox
    assert fs.inodes_used.value > 3
    assert fs.timestamp > 0


def test_invalid_reference_is_invalid_argument(service: ImageService) -> None:
    from sandbox.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="UPPER"):
        pull(service, "127.0.0.1:5000/UPPER:tag")


def test_kept_records_follow_a_moved_tag_and_match_the_database(
    service: ImageService, test_images: TestImages, tmp_path: Path
) -> None:
    """Lookups answer from memory: a tag pulled again onto another image leaves the first
    image's record, removal forgets every reference, and a store opened afresh from
    state.db (a restart) holds the same records."""
    busybox, web = test_images.busybox, test_images.web
    moving = busybox.reference.rsplit(":", 1)[0] + ":moving"
    first = service.images.get(pull(service, busybox.reference))
    assert first is not None
    service.images.save(first, [moving])
    assert moving in status(service, busybox.config_digest).image.repo_tags
    second = service.images.get(pull(service, web.reference))
    assert second is not None
    service.images.save(second, [moving])
    assert status(service, moving).image.id == web.config_digest
    assert moving not in status(service, busybox.config_digest).image.repo_tags
    assert moving in status(service, web.config_digest).image.repo_tags

    reopened = ImageStore(service.images.store)
    assert reopened.list() == service.images.list()

    remove(service, web.config_digest)
    assert status(service, moving).image.id == ""
    assert service.images.resolve(moving) is None
    assert [r.id for r in ImageStore(service.images.store).list()] == [busybox.config_digest]


def test_a_pull_keeps_the_entry_image_status_answers(
    service: ImageService, test_images: TestImages
) -> None:
    """kubelet asks ImageStatus right after PullImage: the pull has already serialized the
    answer's entry (for the record as saved, with its references), so the lookup sends it."""
    image_id = pull(service, test_images.busybox.reference)
    saved = service.images.get(image_id)
    kept = service._entries.get(image_id)
    assert saved is not None and kept is not None and kept[0] is saved
    req = pb.ImageStatusRequest(image=pb.ImageSpec(image=test_images.busybox.reference))
    assert service.ImageStatus(req) is kept[1]


def image_files_present(service: ImageService, image_id: str) -> bool:
    record = service.images.get(image_id)
    assert record is not None
    return all(service.content.has(d) for d in record.blob_digests) and all(
        service.snapshots.has(c) for c in record.chain_ids
    )


def test_remove_answers_before_deleting_blobs_and_snapshots(
    service: ImageService, test_images: TestImages
) -> None:
    """The client waits only for the record: when RemoveImage answers, the image is gone from
    lookups and lists, its blobs and snapshots are still on disk, and the collection that
    runs after the answer deletes them."""
    image = test_images.layered
    image_id = pull(service, image.reference)
    record = service.images.get(image_id)
    assert record is not None

    async def remove_and_look() -> tuple[bool, set[str], set[str]]:
        await service.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
        gone = service.images.resolve(image.reference) is None and not service.list_entries(
            pb.ImageFilter())
        at_answer = blob_names(service), snapshot_names(service)
        await service.collected()
        return gone, *at_answer

    gone, blobs_at_answer, snapshots_at_answer = asyncio.run(remove_and_look())
    assert gone
    assert record.blob_digests <= blobs_at_answer
    assert set(record.chain_ids) <= snapshots_at_answer
    assert blob_names(service) == set()
    assert snapshot_names(service) == set()


def test_pulls_racing_the_collection_keep_whole_images(
    service: ImageService, test_images: TestImages
) -> None:
    """critest's loop: pull, remove, pull again at once, while the collection of the removed
    image deletes its files. Every pull ends with its blobs and snapshots all on disk, and
    after the last removal nothing is left."""
    image = test_images.layered
    spec = pb.ImageSpec(image=image.reference)

    async def cycles() -> list[bool]:
        whole = []
        for _ in range(6):
            await service.PullImage(pb.PullImageRequest(image=spec))
            await service.collected()  # the previous cycle's deletions are over
            whole.append(image_files_present(service, image.config_digest))
            await service.RemoveImage(pb.RemoveImageRequest(image=spec))
        await service.collected()
        return whole

    assert asyncio.run(cycles()) == [True] * 6
    assert blob_names(service) == set()
    assert snapshot_names(service) == set()


def test_a_removal_during_a_collection_is_collected_after_it(
    service: ImageService, test_images: TestImages
) -> None:
    """The second RemoveImage comes once the first one's collection has decided what to
    delete: that collection cannot see the second image's files, so it runs once more."""
    first, second = test_images.layered, test_images.web
    pull(service, first.reference)
    pull(service, second.reference)

    async def remove_both() -> None:
        await service.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=first.reference)))
        await asyncio.sleep(0)  # the collection's first step: its decision, then the deletions
        await service.RemoveImage(
            pb.RemoveImageRequest(image=pb.ImageSpec(image=second.reference))
        )
        await service.collected()

    asyncio.run(remove_both())
    assert blob_names(service) == set()
    assert snapshot_names(service) == set()


def test_pulled_bytes_count_only_what_was_downloaded(
    service: ImageService, test_images: TestImages
) -> None:
    """The flatpod_image_pulled_bytes metric: a layer an image already here shares is
    neither downloaded nor counted."""
    busybox, layered = test_images.busybox, test_images.layered
    pull(service, busybox.reference)
    before = service.pulled.total
    record = service.images.get(pull(service, layered.reference))
    assert record is not None
    own = [layer.size for layer in record.layers if layer.digest not in busybox.layer_digests]
    assert len(own) < len(record.layers)  # the premise: a shared base layer
    config_size = len(service.content.read(record.id))
    assert service.pulled.total - before == config_size + sum(own)
