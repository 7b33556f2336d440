"""Both cgroup drivers and both runtime handlers on the real kernel: a pod and a container with
a memory limit run, the limit is in the container's own cgroup (with systemd: its scope in the
pod's slice, which kubelet made and flatpod leaves alone), and removing them leaves no cgroup
and no scope behind.

cgroupfs + runc runs on any host (v1 here, v2 in the VM); the systemd driver needs systemd as
PID 1 and crun needs pure cgroup v2 (it refuses hybrid hierarchies): those run in the VM
(hack/vm-tests.txt).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient
from tests.daemon import Daemon, running_daemon
from tests.pods import container_config, pod_config, wait_for
from tests.support.plugin import TestImages

MiB = 1 << 20
CRUN = "/usr/bin/crun"
SYSTEMD = cgroups.detect_driver() is cgroups.Driver.SYSTEMD
UNIFIED = cgroups.is_unified_only()


@dataclass(frozen=True)
class Case:
    driver: str
    handler: str  # "" is the default handler, runc

    def skip_reason(self) -> str:
        if self.driver == "systemd" and not (SYSTEMD and UNIFIED):
            return "the systemd driver is tested with systemd as PID 1 on cgroup v2 (the VM)"
        if self.handler == "crun" and not (UNIFIED and Path(CRUN).exists()):
            return "crun runs on pure cgroup v2 only (the VM)"
        return ""


CASES = [Case("cgroupfs", ""), Case("systemd", ""), Case("systemd", "crun"),
         Case("cgroupfs", "crun")]


@dataclass
class Node:
    daemon: Daemon
    cri: CriClient
    case: Case
    parent: str  # the pod's cgroup_parent: a cgroupfs path, or a slice kubelet would make


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def _start_slice(name: str, memory_max: int) -> None:
    """The pod's slice with a limit, as kubelet makes it (a transient unit through D-Bus)."""
    subprocess.run(
        ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
         "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
         name, "fail", "1", "MemoryMax", "t", str(memory_max), "0"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    wait_for(lambda: (cgroups.CGROUP_ROOT / cgroups.expand_slice(name).strip("/")).is_dir(),
             what=f"systemd to make {name}")


@pytest.fixture(params=CASES, ids=lambda c: f"{c.driver}-{c.handler or 'runc'}")
def node(request: pytest.FixtureRequest, tmp_path: Path, test_images: TestImages
         ) -> Iterator[Node]:  # fmt: skip
    case: Case = request.param
    if reason := case.skip_reason():
        pytest.skip(reason)
    tag = secrets.token_hex(4)
    extra = f'cgroup_driver = "{case.driver}"\n'
    if case.driver == "cgroupfs":
        parent = f"/fpt-drv-{tag}"
        extra += f'default_cgroup_parent = "{parent}"\n'
    else:
        parent = f"system-fptdrv{tag}.slice"  # in system.slice: nothing new is left above it
        _start_slice(parent, 256 * MiB)
    if case.handler:
        extra += f'[runtimes.{case.handler}]\nruntime_path = "{shutil.which(case.handler)}"\n'
    try:
        with running_daemon(tmp_path, extra) as d:
            cri = d.client()
            cri.PullImage(pb.PullImageRequest(
                image=pb.ImageSpec(image=test_images.busybox.reference)))
            try:
                yield Node(d, cri, case, parent)
            finally:
                cri.close()
    finally:
        if case.driver == "cgroupfs":
            cgroups.remove(parent)
        else:
            _systemctl("stop", parent)


def _cgroup_of(cri: CriClient, ctr_id: str) -> str:
    info = json.loads(cri.ContainerStatus(
        pb.ContainerStatusRequest(container_id=ctr_id, verbose=True)).info["info"])
    path: str = info["cgroup"]
    return path


def _memory_limit(path: str) -> int:
    d = cgroups.cgroup_dir(path, "memory")
    return int((d / ("memory.max" if UNIFIED else "memory.limit_in_bytes")).read_text())


def _runtime_ids(node: Node) -> list[str]:
    """What the handler's binary lists under its root (the pause and the containers)."""
    binary = shutil.which(node.case.handler or "runc") or "runc"
    root = node.daemon.state / (node.case.handler or "runc")
    out = subprocess.run([binary, "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, timeout=120).stdout
    return sorted(c["id"] for c in json.loads(out or "null") or [])


def test_memory_limit_in_the_container_cgroup_and_nothing_left(
    node: Node, test_images: TestImages
) -> None:
    cri, systemd = node.cri, node.case.driver == "systemd"
    answered = cri.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver
    assert answered == (pb.SYSTEMD if systemd else pb.CGROUPFS)
    pod = pod_config(linux=pb.LinuxPodSandboxConfig(cgroup_parent=node.parent))
    pod_id = cri.RunPodSandbox(pb.RunPodSandboxRequest(
        config=pod, runtime_handler=node.case.handler)).pod_sandbox_id
    ctr_id = cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=pod,
        config=container_config(test_images.busybox.reference, command=["sleep", "1h"],
                                linux=pb.LinuxContainerConfig(
                                    resources=pb.LinuxContainerResources(
                                        memory_limit_in_bytes=64 * MiB))))).container_id
    cri.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
    path = _cgroup_of(cri, ctr_id)
    pod_info = json.loads(cri.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id, verbose=True)).info["info"])
    if systemd:
        slice_dir = cgroups.expand_slice(node.parent)
        assert path == f"{slice_dir}/flatpod-{ctr_id}.scope"
        assert pod_info["cgroup"] == slice_dir
        for unit in (f"flatpod-{ctr_id}.scope", f"flatpod-{pod_id}.scope"):
            assert _systemctl("is-active", unit).stdout.strip() == "active", unit
        # The slice's limit is kubelet's: flatpod wrote none (a resize only records).
        assert _memory_limit(slice_dir) == 256 * MiB
        cri.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod_id,
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=128 * MiB)))
        assert _memory_limit(slice_dir) == 256 * MiB
    else:
        assert path == f"{node.parent}/flatpod-{pod_id}/{ctr_id}"
    assert _memory_limit(path) == 64 * MiB
    assert sorted(_runtime_ids(node)) == sorted([pod_id, ctr_id])

    cri.StopContainer(pb.StopContainerRequest(container_id=ctr_id, timeout=10))
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr_id))
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    gone = [path, f"{path.rsplit('/', 1)[0]}/flatpod-{pod_id}.scope" if systemd
            else f"{node.parent}/flatpod-{pod_id}"]
    wait_for(lambda: not any(h.dir_for(p).exists() for h in cgroups.hierarchies() for p in gone),
             what=f"{gone} to be removed")
    assert _runtime_ids(node) == []
    if systemd:
        for unit in (f"flatpod-{ctr_id}.scope", f"flatpod-{pod_id}.scope"):
            state = _systemctl("show", "-p", "ActiveState", "--value", unit).stdout.strip()
            assert state in ("inactive", ""), (unit, state)
        # Only the scopes went: the slice is kubelet's to remove.
        assert (cgroups.CGROUP_ROOT / cgroups.expand_slice(node.parent).strip("/")).is_dir()
