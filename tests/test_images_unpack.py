"""Layer unpacking: hostile layers are rejected whole, without writing outside the snapshot."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from sandbox.images.snapshots import LayerError, SnapshotStore, chain_ids

Add = Callable[[tarfile.TarFile], None]


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
           mode: int = 0o644, pax: dict[str, str] | None = None) -> Add:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        info.mtime = 1704067200
        info.pax_headers = pax or {}
        tar.addfile(info, io.BytesIO(data) if info.size else None)
    return add


def layer(tmp_path: Path, *adds: Add, compress: str = "gzip") -> tuple[Path, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for add in adds:
            add(tar)
    raw = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    if compress == "gzip":
        raw = gzip.compress(raw)
    elif compress == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    blob = tmp_path / hashlib.sha256(raw).hexdigest()
    blob.write_bytes(raw)
    return blob, diff_id


@pytest.fixture
def fence(tmp_path: Path) -> Path:
    """A directory beside the store whose content must never change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    return outside


def assert_rejected(tmp_path: Path, fence: Path, *adds: Add) -> str:
    store = SnapshotStore(tmp_path / "root")
    blob, diff_id = layer(tmp_path, *adds)
    with pytest.raises(LayerError) as failed:
        store.unpack(diff_id, blob, diff_id)
    assert sorted(os.listdir(fence)) == ["keep"]
    assert os.listdir(store.dir) == []  # no partial snapshot, no temp dir
    assert not os.path.lexists("/evil") and not os.path.lexists("/etc/evil")
    return str(failed.value)


def test_dotdot_rejected(tmp_path: Path, fence: Path) -> None:
    message = assert_rejected(tmp_path, fence, member("ok"), member("../outside/x", data=b"x"))
    assert "'..'" in message


def test_symlink_escape_rejected(tmp_path: Path, fence: Path) -> None:
    message = assert_rejected(
        tmp_path, fence,
        member("link", tarfile.SYMTYPE, link="/"),
        member("link/etc/evil", data=b"evil"),
    )
    assert "symlink" in message
    assert_rejected(
        tmp_path, fence,
        member("up", tarfile.SYMTYPE, link=str(fence)),
        member("up/x", data=b"evil"),
    )


def test_hardlink_outside_rejected(tmp_path: Path, fence: Path) -> None:
    assert_rejected(tmp_path, fence, member("h", tarfile.LNKTYPE, link="../outside/keep"))
    assert_rejected(tmp_path, fence, member("h", tarfile.LNKTYPE, link=str(fence / "keep")))
    # Through a symlinked parent.
    assert_rejected(
        tmp_path, fence,
        member("up", tarfile.SYMTYPE, link=str(fence)),
        member("h", tarfile.LNKTYPE, link="up/keep"),
    )
    assert os.stat(fence / "keep").st_nlink == 1


def test_absolute_paths_are_made_relative(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "root")
    blob, diff_id = layer(tmp_path, member("/abs/file", data=b"x"), member("./rel", data=b"y"))
    store.unpack(diff_id, blob, diff_id)
    snap = store.path(diff_id)
    assert (snap / "abs" / "file").read_bytes() == b"x"
    assert (snap / "rel").read_bytes() == b"y"


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_metadata_kept(tmp_path: Path, compress: str) -> None:
    store = SnapshotStore(tmp_path / "root")
    blob, diff_id = layer(
        tmp_path,
        member("bin/", tarfile.DIRTYPE, mode=0o750),
        member("bin/su", data=b"#!", mode=0o4755,
               pax={"SCHILY.xattr.user.test": "v", "SCHILY.xattr.trusted.overlay.x": "no"}),
        member("bin/su2", tarfile.LNKTYPE, link="bin/su"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666),
        member("fifo", tarfile.FIFOTYPE),
        member("lnk", tarfile.SYMTYPE, link="/bin/su"),
        member(".wh.gone", data=b""),
        member("d/.wh..wh..opq", data=b""),
        compress=compress,
    )
    store.unpack(diff_id, blob, diff_id)
    snap = store.path(diff_id)
    su = os.lstat(snap / "bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert os.stat(snap / "bin/su2").st_ino == su.st_ino
    assert su.st_mtime == 1704067200
    assert stat.S_IMODE(os.lstat(snap / "bin").st_mode) == 0o750
    assert os.lstat(snap / "bin").st_mtime == 1704067200
    assert os.getxattr(snap / "bin/su", "user.test") == b"v"
    assert "trusted.overlay.x" not in os.listxattr(snap / "bin/su")
    assert stat.S_ISCHR(os.lstat(snap / "dev/null").st_mode)
    assert stat.S_ISFIFO(os.lstat(snap / "fifo").st_mode)
    assert os.readlink(snap / "lnk") == "/bin/su"
    gone = os.lstat(snap / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(snap / "d", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.lstat(snap).st_mode) == 0o755


def test_wrong_diff_id_leaves_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "root")
    blob, _ = layer(tmp_path, member("a", data=b"a"))
    wrong = "sha256:" + "0" * 64
    with pytest.raises(LayerError, match="does not match diff id"):
        store.unpack(wrong, blob, wrong)
    assert os.listdir(store.dir) == []


def test_chain_ids() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, expected]


def test_many_layers_fit_the_mount_page(tmp_path: Path) -> None:
    from sandbox.images.snapshots import mount_overlay
    from sandbox.mounts import unmount

    store = SnapshotStore(tmp_path / "root")
    diff_ids = []
    for i in range(120):
        blob, diff_id = layer(tmp_path, member(f"f{i}", data=str(i).encode()))
        diff_ids.append(diff_id)
        store.unpack(diff_id, blob, diff_id)
    target = tmp_path / "mnt"
    target.mkdir()
    lowers = [store.path(d) for d in reversed(diff_ids)]
    mount_overlay(lowers, tmp_path / "up", tmp_path / "work", target, readonly=False)
    try:
        assert (target / "f0").read_bytes() == b"0"
        assert (target / "f119").read_bytes() == b"119"
    finally:
        unmount(target)
