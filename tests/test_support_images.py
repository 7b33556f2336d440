"""Checks the test-support images and registry against real things: the registry process,
real tar extraction with whiteouts, and busybox run in a chroot."""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.oci import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    ExpectedNode,
    LayerSpec,
    RegistryClient,
    RegistryError,
)
from tests.support.plugin import AuthRegistry, PushedImage, TestImages
from tests.support.registry import Registry, running_registry

IMAGE_NAMES = ("busybox", "busybox-user", "web", "layered", "multiarch")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp dir removed at the end of the test, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="flatpod-support-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reference layer applier (the real one lives in sandbox/images)
# ---------------------------------------------------------------------------------------------


def _inside(root: Path, name: str) -> Path:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert parts and ".." not in parts and not name.startswith("/"), f"unsafe tar path {name!r}"
    return root.joinpath(*parts)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _make(root: Path, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    dest = _inside(root, member.name)
    if member.isdir():
        if not (dest.is_dir() and not dest.is_symlink()):
            _remove(dest)
            dest.mkdir()
    else:
        _remove(dest)
        if member.isreg():
            src = tar.extractfile(member)
            assert src is not None
            dest.write_bytes(src.read())
        elif member.issym():
            os.symlink(member.linkname, dest)
        elif member.islnk():
            os.link(_inside(root, member.linkname), dest)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(dest, kind | member.mode, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(dest)
        else:
            raise AssertionError(f"unexpected tar entry type {member.type!r}")
    os.lchown(dest, member.uid, member.gid)
    if not member.issym():
        os.chmod(dest, member.mode)  # after chown, which clears setuid bits
        os.utime(dest, (member.mtime, member.mtime))


def apply_layer(root: Path, layer_tar: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = tar.getmembers()
        # Deletions first: whiteouts and opaque markers hide lower layers only, never
        # entries of this same layer, whatever their order in the tar.
        for m in members:
            parent, name = posixpath.split(m.name)
            if name == OPAQUE_MARKER:
                for child in _inside(root, parent).iterdir():
                    _remove(child)
            elif name.startswith(WHITEOUT_PREFIX):
                _remove(_inside(root, posixpath.join(parent, name[len(WHITEOUT_PREFIX) :])))
        for m in members:
            if not posixpath.basename(m.name).startswith(WHITEOUT_PREFIX):
                _make(root, m, tar)


def fetch_layer_tars(client: RegistryClient, repo: str, reference: str) -> list[bytes]:
    """The linux/amd64 layer tars as served by the registry, each digest and diff_id checked."""
    resp = client.get_manifest(repo, reference)
    doc = json.loads(resp.body)
    if doc["mediaType"] in (oci.OCI_INDEX, oci.DOCKER_LIST):
        (entry,) = [
            m
            for m in doc["manifests"]
            if m["platform"]["architecture"] == "amd64" and m["platform"]["os"] == "linux"
        ]
        doc = json.loads(client.get_manifest(repo, entry["digest"]).body)
    config = json.loads(client.get_blob(repo, doc["config"]["digest"]))
    tars = []
    for desc, diff_id in zip(doc["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = client.get_blob(repo, desc["digest"])
        assert oci.sha256_digest(blob) == desc["digest"]
        assert len(blob) == desc["size"]
        tar = oci.decompress(blob, desc["mediaType"])
        assert oci.sha256_digest(tar) == diff_id
        tars.append(tar)
    return tars


def unpack(client: RegistryClient, image: PushedImage, root: Path) -> Path:
    rootfs = root / "rootfs"
    rootfs.mkdir()
    for tar in fetch_layer_tars(client, image.repo_path, image.tag):
        apply_layer(rootfs, tar)
    return rootfs


def check_node(rootfs: Path, path: str, want: ExpectedNode) -> None:
    st = os.lstat(rootfs / path)
    kinds = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "symlink": stat.S_ISLNK}
    assert kinds[want.kind](st.st_mode), f"{path}: mode {oct(st.st_mode)} is not {want.kind}"
    if want.mode is not None:
        assert stat.S_IMODE(st.st_mode) == want.mode, f"{path}: {oct(st.st_mode)}"
    assert (st.st_uid, st.st_gid) == (want.uid, want.gid), path
    if want.data is not None:
        assert (rootfs / path).read_bytes() == want.data, path
    if want.target is not None:
        assert os.readlink(rootfs / path) == want.target, path
    if want.hardlink_of is not None:
        assert st.st_ino == os.lstat(rootfs / want.hardlink_of).st_ino, path


def tree(rootfs: Path, top: str) -> set[str]:
    found = {top}
    for dirpath, dirnames, filenames in os.walk(rootfs / top):
        rel = Path(dirpath).relative_to(rootfs)
        found.update(str(rel / n) for n in dirnames + filenames)
    return found


# ---------------------------------------------------------------------------------------------
# the registry serves what was pushed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_manifest_by_tag_and_digest(test_images: TestImages, registry: Registry, name: str) -> None:
    image = test_images.by_name(name)
    client = registry.client()
    by_tag = client.get_manifest(image.repo_path, image.tag)
    by_digest = client.get_manifest(image.repo_path, image.digest)
    assert by_tag.body == by_digest.body == image.definition.artifact.manifest.data
    assert oci.sha256_digest(by_tag.body) == image.digest
    assert by_tag.headers["Docker-Content-Digest"] == image.digest
    assert by_tag.headers["Content-Type"] == image.media_type
    assert image.reference == f"{registry.host}/flatpod-test/{name}:latest"
    assert image.digest_reference == f"{registry.host}/flatpod-test/{name}@{image.digest}"
    assert client.tags(image.repo_path) == ["latest"]


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_blobs_match_manifest(test_images: TestImages, registry: Registry, name: str) -> None:
    image = test_images.by_name(name)
    client = registry.client()
    manifest = json.loads(client.get_manifest(image.repo_path, image.manifest_digest).body)
    assert manifest["config"]["digest"] == image.config_digest
    config_blob = client.get_blob(image.repo_path, image.config_digest)
    assert oci.sha256_digest(config_blob) == image.config_digest
    config = json.loads(config_blob)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert tuple(config["rootfs"]["diff_ids"]) == image.diff_ids
    assert tuple(d["digest"] for d in manifest["layers"]) == image.layer_digests
    assert len(config["history"]) == len(image.layer_digests)
    for layer, built in zip(image.layer_digests, image.image.layers, strict=True):
        assert client.get_blob(image.repo_path, layer) == built.data


def test_unknown_blob_and_manifest_are_404(test_images: TestImages, registry: Registry) -> None:
    client = registry.client()
    missing = oci.sha256_digest(b"never pushed")
    assert not client.blob_exists(test_images.busybox.repo_path, missing)
    assert client.blob_exists(test_images.busybox.repo_path, test_images.busybox.config_digest)
    with pytest.raises(RegistryError, match="404"):
        client.get_manifest(test_images.busybox.repo_path, "no-such-tag")


def test_media_types_and_config_fields(test_images: TestImages, registry: Registry) -> None:
    client = registry.client()
    web = test_images.web
    manifest = json.loads(client.get_manifest(web.repo_path, web.tag).body)
    assert manifest["mediaType"] == oci.DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == oci.DOCKER_CONFIG
    assert {d["mediaType"] for d in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    config = json.loads(client.get_blob(web.repo_path, web.config_digest))["config"]
    assert config["Cmd"] == ["httpd", "-f", "-v", "-p", "80", "-h", "/www"]
    assert config["ExposedPorts"] == {"80/tcp": {}}
    assert config["StopSignal"] == "SIGINT"
    assert config["Labels"] == {"org.flatpod.test": "web"}
    assert config["Env"] == [oci.PATH_ENV]

    layered = test_images.layered
    manifest = json.loads(client.get_manifest(layered.repo_path, layered.tag).body)
    assert manifest["mediaType"] == oci.OCI_MANIFEST
    assert [d["mediaType"] for d in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
    ]
    config = json.loads(client.get_blob(layered.repo_path, layered.config_digest))["config"]
    assert config["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["WorkingDir"] == "/data"

    user = json.loads(
        client.get_blob(test_images.busybox_user.repo_path, test_images.busybox_user.config_digest)
    )["config"]
    assert user["User"] == "flat"
    assert test_images.busybox_user.layer_digests == test_images.busybox.layer_digests
    assert len({i.config_digest for i in test_images.all()}) == len(IMAGE_NAMES)


def test_multiarch_index_lists_both_platforms(test_images: TestImages, registry: Registry) -> None:
    client = registry.client()
    multi = test_images.multiarch
    index = json.loads(client.get_manifest(multi.repo_path, multi.tag).body)
    assert index["mediaType"] == oci.OCI_INDEX
    platforms = {
        "/".join(filter(None, (p["os"], p["architecture"], p.get("variant")))): m["digest"]
        for m in index["manifests"]
        for p in [m["platform"]]
    }
    assert platforms == dict(multi.platforms)
    assert set(platforms) == {"linux/amd64", "linux/arm64/v8"}
    assert platforms["linux/amd64"] == multi.manifest_digest
    arches = set()
    for digest in platforms.values():
        child = client.get_manifest(multi.repo_path, digest)
        assert oci.sha256_digest(child.body) == digest
        config_digest = json.loads(child.body)["config"]["digest"]
        arches.add(json.loads(client.get_blob(multi.repo_path, config_digest))["architecture"])
    assert arches == {"amd64", "arm64"}


# ---------------------------------------------------------------------------------------------
# determinism and the builder itself
# ---------------------------------------------------------------------------------------------


def test_builds_are_deterministic(test_images: TestImages) -> None:
    first, second = oci.build_all(), oci.build_all()
    for name in IMAGE_NAMES:
        a, b = first[name].artifact, second[name].artifact
        assert a.manifest.data == b.manifest.data, name
        assert a.digest == b.digest == test_images.by_name(name).digest, name


def test_layer_tar_metadata() -> None:
    entries = (
        oci.file("a/b/file", "x", mode=0o4755, uid=7, gid=8),
        oci.hardlink("a/hard", "a/b/file"),
        oci.device("dev/null", "char", 1, 3),
        oci.fifo("dev/fifo"),
        oci.whiteout("a/gone"),
        oci.whiteout("top"),
        oci.opaque("a/b"),
        oci.directory("a", mode=0o700),
    )
    with tarfile.open(fileobj=io.BytesIO(oci.layer_tar(entries))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    # parents come first, and an explicit directory entry is used where one is given
    assert names == [
        "a", "a/b", "a/b/file", "a/hard", "dev", "dev/null", "dev/fifo",
        "a/.wh.gone", ".wh.top", "a/b/.wh..wh..opq",
    ]  # fmt: skip
    assert members["a"].mode == 0o700
    f = members["a/b/file"]
    assert (f.mode, f.uid, f.gid, f.uname, f.mtime) == (0o4755, 7, 8, "", oci.FIXED_MTIME)
    assert members["a/hard"].islnk() and members["a/hard"].linkname == "a/b/file"
    null = members["dev/null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert members["dev/fifo"].isfifo()
    with pytest.raises(ValueError, match="before its target"):
        oci.layer_tar((oci.hardlink("l", "t"), oci.file("t", "")))
    with pytest.raises(ValueError, match="duplicate"):
        oci.layer_tar((oci.file("t", ""), oci.file("t", "")))
    with pytest.raises(ValueError, match="bad layer path"):
        oci.file("../escape", "")


def test_compression_formats() -> None:
    entries = (oci.file("f", "hello\n"),)
    plain = oci.build_layer(LayerSpec(entries, "none"))
    gz = oci.build_layer(LayerSpec(entries, "gzip"))
    zst = oci.build_layer(LayerSpec(entries, "zstd"))
    assert plain.digest == plain.diff_id == gz.diff_id == zst.diff_id
    assert gz.data[:2] == b"\x1f\x8b" and gz.data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert gzip.decompress(gz.data) == plain.data
    assert zst.data[:4] == b"\x28\xb5\x2f\xfd"
    assert oci.decompress(zst.data, zst.media_type("oci")) == plain.data
    with pytest.raises(ValueError, match="zstd"):
        zst.media_type("docker")


def test_big_image_is_incompressible_and_deterministic() -> None:
    size = 1 << 20
    first = oci.big(total_size=size, layers=5).image
    again = oci.big(total_size=size, layers=5).image
    assert first.digest == again.digest
    assert len(first.layers) == 6
    for layer in first.layers[1:]:
        assert len(layer.data) >= size // 5  # random data does not shrink
    assert len({la.digest for la in first.layers}) == 6


# ---------------------------------------------------------------------------------------------
# the images unpack to the documented trees, and busybox runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_unpacked_rootfs_matches_expected(
    test_images: TestImages, registry: Registry, scratch: Path, name: str
) -> None:
    image = test_images.by_name(name)
    rootfs = unpack(registry.client(), image, scratch)
    definition = image.definition
    for path, want in definition.expected.items():
        check_node(rootfs, path, want)
    for path in definition.absent:
        assert not os.path.lexists(rootfs / path), path
    for top in definition.complete_under:
        want_paths = {p for p in definition.expected if p == top or p.startswith(top + "/")}
        assert tree(rootfs, top) == want_paths


def test_layered_tree_is_documented(test_images: TestImages) -> None:
    # Guards the documented result itself: whiteouts and the opaque dir removed what they should.
    definition = test_images.layered.definition
    assert definition.absent == ("data/gone", "data/dir/old")
    assert sorted(p for p in definition.expected if p.startswith("data")) == sorted(
        oci.LAYERED_TREE
    )
    assert oci.LAYERED_TREE["data/suid"].mode == 0o4755


def test_busybox_rootfs_runs(test_images: TestImages, registry: Registry, scratch: Path) -> None:
    rootfs = unpack(registry.client(), test_images.busybox, scratch)
    env = {"PATH": oci.PATH_ENV.removeprefix("PATH=")}
    out = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", "ls / && id flat"],
        capture_output=True, text=True, timeout=30, env=env, check=True,
    )  # fmt: skip
    listing = set(out.stdout.split())
    assert {"bin", "etc", "tmp", "proc", "root", "home"} <= listing
    assert "uid=1000(flat) gid=1000(flat) groups=1000(flat),5000(extra)" in out.stdout
    as_user = subprocess.run(
        ["chroot", "--userspec=1000:1000", str(rootfs), "/bin/sh", "-c", "id -un; echo $0"],
        capture_output=True, text=True, timeout=30, env=env, check=True,
    )  # fmt: skip
    assert as_user.stdout.split() == ["flat", "/bin/sh"]


# ---------------------------------------------------------------------------------------------
# the registry process: auth, and cleanup
# ---------------------------------------------------------------------------------------------


def test_auth_registry_requires_credentials(auth_registry: AuthRegistry) -> None:
    reg = auth_registry.registry
    anonymous = reg.client(authenticated=False)
    assert anonymous.ping() == 401
    assert reg.client().ping() == 200
    wrong = RegistryClient(reg.host, (auth_registry.username, "wrong"))
    assert wrong.ping() == 401
    image = auth_registry.image
    with pytest.raises(RegistryError, match="401"):
        anonymous.get_manifest(image.repo_path, image.tag)
    with pytest.raises(RegistryError, match="401"):
        anonymous.push("flatpod-test/anonymous", "latest", image.image)
    assert reg.client().get_manifest(image.repo_path, image.tag).body == image.image.manifest.data
    assert image.reference == f"{reg.host}/flatpod-test/busybox:latest"


def test_registry_stop_cleans_up(scratch: Path) -> None:
    with running_registry(scratch) as reg:
        root, port = reg.root, reg.port
        client = reg.client()
        assert client.ping() == 200
        digest = client.push("x/y", "t", oci.busybox().image)
        client.delete_manifest("x/y", digest)  # deletion is enabled
        assert reg.root.is_dir() and reg.process.poll() is None
    assert reg.process.returncode is not None
    assert not root.exists()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    reg.stop()  # idempotent
