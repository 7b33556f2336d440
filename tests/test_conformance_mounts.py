"""critest's "Container Mount Propagation" and "Container Mount Readonly" specs
(container_linux.go), against the real daemon, runc and kernel.

Propagation: a privileged container bind-mounts a hostPath at the same path, with
rprivate / rslave (HostToContainer) / rshared (Bidirectional). The host then mounts a
directory under it, and the container mounts /etc under it: each is seen, or not, on the
other side. Readonly: a read-only bind whose tmpfs submount stays writable, unless the mount is
recursively read-only (RRO), and the combinations RRO forbids."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.pods import (
    a_pod,
    container_config,
    create_error,
    exec_sync,
    start_container,
    stdout_of,
)
from tests.support.plugin import TestImages

PAUSE = ["sleep", "1000"]
PROPAGATION_MAKE: dict[int, str] = {
    pb.PROPAGATION_PRIVATE: "--make-rprivate",
    pb.PROPAGATION_HOST_TO_CONTAINER: "--make-rshared",
    pb.PROPAGATION_BIDIRECTIONAL: "--make-rshared",
}


def host_mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def host_unmount(path: Path) -> None:
    """Lazily, with everything below it; a path that is no mount point is fine."""
    subprocess.run(["umount", "--recursive", "--lazy", str(path)], capture_output=True)


def is_mount_point(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def privileged_pod(fp: CriClient, tmp_path: Path) -> AbstractContextManager[
        tuple[str, pb.PodSandboxConfig]]:
    return a_pod(fp, tmp_path, linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(privileged=True)))


def details(err: grpc.RpcError) -> str:
    return str(err.details())


# --- propagation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PropagationPaths:
    source: Path  # bind-mounted onto itself with the propagation under test; the volume
    host_side: Path  # source/propagationMnt: the host mounts flag_dir here after the start
    flag_dir: Path  # holds flagFile
    container_side: Path  # source/containerMntPoint: the container mounts /etc here


@contextmanager
def propagation_paths(tmp_path: Path, propagation: int) -> Iterator[PropagationPaths]:
    """critest's createHostPathForMountPropagation; everything is unmounted at the end."""
    source = tmp_path / "mnt"
    paths = PropagationPaths(source, source / "propagationMnt", tmp_path / "propagationSrcDir",
                             source / "containerMntPoint")
    paths.host_side.mkdir(parents=True)
    paths.flag_dir.mkdir()
    (paths.flag_dir / "flagFile").touch()
    host_mount("--rbind", str(source), str(source))
    try:
        host_mount(PROPAGATION_MAKE[propagation], str(source))
        yield paths
    finally:
        for path in (paths.container_side, paths.host_side, source):
            host_unmount(path)
        assert not is_mount_point(source)


@pytest.mark.parametrize("propagation", [
    pb.PROPAGATION_PRIVATE, pb.PROPAGATION_HOST_TO_CONTAINER, pb.PROPAGATION_BIDIRECTIONAL,
], ids=["rprivate", "rslave", "rshared"])
def test_mount_propagation(fp: CriClient, pulled: TestImages, tmp_path: Path,
                           propagation: int) -> None:
    to_container = propagation != pb.PROPAGATION_PRIVATE
    to_host = propagation == pb.PROPAGATION_BIDIRECTIONAL
    with propagation_paths(tmp_path, propagation) as paths, \
            privileged_pod(fp, tmp_path) as (pod_id, pod):
        volume = pb.Mount(host_path=str(paths.source), container_path=str(paths.source),
                          propagation=propagation)  # type: ignore[arg-type]
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=PAUSE, mounts=[volume],
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(privileged=True))))
        status = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr, verbose=True))
        assert list(status.status.mounts) == [volume]

        host_mount("--rbind", str(paths.flag_dir), str(paths.host_side))
        seen_inside = stdout_of(fp, ctr, "ls", "-A", str(paths.host_side)).split()
        assert seen_inside == (["flagFile"] if to_container else [])

        stdout_of(fp, ctr, "mkdir", "-p", str(paths.container_side))
        stdout_of(fp, ctr, "mount", "--bind", "/etc", str(paths.container_side))
        seen_on_host = sorted(p.name for p in paths.container_side.iterdir())
        assert ("passwd" in seen_on_host) is to_host, seen_on_host
        assert bool(seen_on_host) is to_host


# --- read-only and recursive read-only -------------------------------------------------------


@contextmanager
def volume_with_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """critest's createHostPathForRROMount: a directory with a tmpfs mounted at ./tmpfs."""
    volume = tmp_path / "volume"
    submount = volume / "tmpfs"
    submount.mkdir(parents=True)
    host_mount("-t", "tmpfs", "none", str(submount))
    try:
        yield volume
    finally:
        host_unmount(submount)
        assert not is_mount_point(submount)


def readonly_volume(host_path: Path, **fields: Any) -> pb.Mount:
    fields.setdefault("readonly", True)
    return pb.Mount(host_path=str(host_path), container_path="/mnt", selinux_relabel=True,
                    **fields)


@pytest.mark.parametrize("recursive", [False, True], ids=["ro", "rro"])
def test_readonly_volume_submount(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                  recursive: bool) -> None:
    with volume_with_tmpfs(tmp_path) as volume, privileged_pod(fp, tmp_path) as (pod_id, pod):
        mount = readonly_volume(volume, recursive_read_only=recursive)
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=PAUSE, mounts=[mount]))
        assert list(fp.ContainerStatus(pb.ContainerStatusRequest(
            container_id=ctr)).status.mounts) == [mount]
        on_volume = exec_sync(fp, ctr, "touch", "/mnt/file")
        assert on_volume.exit_code != 0
        assert b"Read-only file system" in on_volume.stderr
        on_submount = exec_sync(fp, ctr, "touch", "/mnt/tmpfs/file")
        if recursive:
            assert on_submount.exit_code != 0
            assert b"Read-only file system" in on_submount.stderr
        else:
            assert on_submount.exit_code == 0, on_submount.stderr
        assert (volume / "tmpfs" / "file").exists() is not recursive


@pytest.mark.parametrize("fields", [
    {"propagation": pb.PROPAGATION_HOST_TO_CONTAINER},
    {"propagation": pb.PROPAGATION_BIDIRECTIONAL},
    {"readonly": False},
], ids=["rslave", "rshared", "not-readonly"])
def test_recursive_readonly_rejects(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                    fields: dict[str, Any]) -> None:
    with volume_with_tmpfs(tmp_path) as volume, privileged_pod(fp, tmp_path) as (pod_id, pod):
        config = container_config(pulled.busybox.reference, command=PAUSE, mounts=[
            readonly_volume(volume, recursive_read_only=True, **fields)])
        err = create_error(fp, pod_id, pod, config)
        assert "recursive_read_only" in details(err)
        listed = fp.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
        assert list(listed) == []


def test_status_reports_recursive_readonly_support(fp: CriClient) -> None:
    handlers = fp.Status(pb.StatusRequest()).runtime_handlers
    default = [h for h in handlers if h.name == ""]
    assert len(default) == 1
    assert default[0].features.recursive_read_only_mounts is True
