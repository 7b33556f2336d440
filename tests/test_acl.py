"""sandbox/acl.py against the real kernel: the xattr it writes is the ACL the kernel enforces,
on the filesystems a state dir lives on (this host's /run is ext4; a node's is tmpfs)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import acl, mounts

POD_GID, OTHER_POD_GID = 300000, 400000


@pytest.fixture(params=["disk", "tmpfs"])
def directory(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A 0700 dir with a 0755 one below; the dirs above it are searchable (pytest's tmp_path
    is below a 0700 dir)."""
    base = Path(tempfile.mkdtemp(prefix="fpt-acl-", dir="/run"))
    base.chmod(0o711)
    path = base / "shared"
    if request.param == "tmpfs":
        mounts.mount_tmpfs(path, 1 << 20)
    else:
        path.mkdir()
    path.chmod(0o700)
    (path / "below").mkdir(mode=0o755)
    try:
        yield path
    finally:
        if request.param == "tmpfs":
            mounts.unmount(path)
        shutil.rmtree(base)


def stat_as(host_id: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid", str(host_id), "--regid", str(host_id), "--clear-groups",
         "stat", str(path)], capture_output=True, text=True, timeout=30)


def test_round_trip() -> None:
    entries = [acl.Entry(acl.Tag.USER_OBJ, perm=7), acl.Entry(acl.Tag.GROUP, 5, 1),
               acl.Entry(acl.Tag.GROUP_OBJ), acl.Entry(acl.Tag.MASK, perm=1),
               acl.Entry(acl.Tag.OTHER)]
    assert acl.decode(acl.encode(entries)) == sorted(entries)
    with pytest.raises(ValueError, match="whole entries"):
        acl.decode(acl.encode(entries)[:-1])


def test_named_groups_traverse_and_nobody_else(directory: Path) -> None:
    acl.owner_only_but_traversable_by(directory, [OTHER_POD_GID, POD_GID, POD_GID])
    assert directory.stat().st_mode & 0o7777 == 0o710  # the group bits are the mask, --x
    assert acl.named_groups(directory) == {POD_GID, OTHER_POD_GID}
    for gid in (POD_GID, OTHER_POD_GID):
        assert stat_as(gid, directory / "below").returncode == 0
    denied = stat_as(65534, directory / "below")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    # A chmod (startup's) masks the entries; writing the set again restores them.
    directory.chmod(0o700)
    assert stat_as(POD_GID, directory / "below").returncode != 0
    acl.owner_only_but_traversable_by(directory, [OTHER_POD_GID])
    assert acl.named_groups(directory) == {OTHER_POD_GID}
    assert stat_as(POD_GID, directory / "below").returncode != 0
    assert stat_as(OTHER_POD_GID, directory / "below").returncode == 0


def test_no_groups_leaves_no_acl(directory: Path) -> None:
    acl.owner_only_but_traversable_by(directory, [POD_GID])
    acl.owner_only_but_traversable_by(directory, [])
    assert acl.read(directory) == []
    assert directory.stat().st_mode & 0o7777 == 0o700
    acl.owner_only_but_traversable_by(directory, [])  # and again: nothing to remove is fine
    assert acl.read(directory) == []
