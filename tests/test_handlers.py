"""Runtime handlers ([runtimes.<name>]): a pod's handler runs the pod and its containers, with
that handler's binary, --root and global options, also across a daemon restart; an unknown
or uninstalled handler is refused clearly; Status lists every handler with its features.

The second handler is runc again (crun refuses this host's hybrid cgroups), reached through a
wrapper that records its command lines, with a root of its own: what ran through it shows in
the wrapper's record and in `runc --root <its root> list`, and nowhere else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox.faults import FAIL_ENV
from shim.runc import Runc, RuncError
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import (
    container_config,
    container_status,
    exec_sync,
    pod_config,
    pod_state,
    wait_for,
)
from tests.support.plugin import TestImages
from tests.test_faults import assert_all_gone, shim_pids

RUNC = "/usr/sbin/runc"
HANDLER = "test-handler"  # the name the Kubernetes node e2e PodOverhead spec uses
GLOBAL_ARG = "--rootless=false"  # harmless, and visible in the wrapper's record


@dataclass
class Node:
    daemon: Daemon
    cri: CriClient
    root: Path  # test-handler's runtime_root
    calls: Path  # one line per run of test-handler's binary: its arguments


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, test_images: TestImages) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("handlers")
    root, calls, wrapper = base / "test-handler-root", base / "calls", base / "runc-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {RUNC} "$@"\n')
    wrapper.chmod(0o755)
    extra = (f'[runtimes."{HANDLER}"]\nruntime_path = "{wrapper}"\nruntime_root = "{root}"\n'
             f'global_args = ["{GLOBAL_ARG}"]\n'
             '[runtimes.uninstalled]\nruntime_path = "/nonexistent/crun"\n')
    with running_daemon(base, extra) as d:
        cri = d.client()
        cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.busybox.reference)))
        try:
            yield Node(d, cri, root, calls)
        finally:
            if d.process is None:
                d.start()
            assert_all_gone(d, cri, set())
            _none_listed(root)
            cri.close()


def _none_listed(root: Path) -> None:
    """Waits until `runc --root root` knows no container: a removal deletes runc's state
    after its answer (sandbox/removals.py)."""
    wait_for(lambda: _listed(root) == [], what=f"runc's state under {root} to be deleted")


def _listed(root: Path) -> list[str]:
    """The ids `runc --root root list` knows."""
    out = subprocess.run([RUNC, "--root", str(root), "list", "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(c["id"] for c in json.loads(out or "null") or [])


def _run_pod(cri: CriClient, handler: str) -> tuple[str, pb.PodSandboxConfig]:
    config = pod_config()
    pod_id = cri.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=handler)).pod_sandbox_id
    return str(pod_id), config


def _sleeper(node: Node, pod_id: str, pod: pb.PodSandboxConfig, image: str) -> str:
    ctr_id = node.cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=pod,
        config=container_config(image, command=["sleep", "1h"]))).container_id
    node.cri.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
    return str(ctr_id)


def _remove(cri: CriClient, pod_id: str) -> None:
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def _pid(cri: CriClient, ctr_id: str) -> int:
    info = json.loads(cri.ContainerStatus(
        pb.ContainerStatusRequest(container_id=ctr_id, verbose=True)).info["info"])
    return int(info["pid"])


def test_status_lists_every_handler(node: Node) -> None:
    handlers = {h.name: h.features for h in node.cri.Status(pb.StatusRequest()).runtime_handlers}
    assert list(handlers) == ["", "runc", HANDLER, "uninstalled"]
    # runc 1.1.5 has "rro" and the user namespace; kernel 6.18 has mount_setattr, and the
    # snapshots' filesystem takes idmapped mounts.
    for name in ("", "runc", HANDLER):
        assert handlers[name].recursive_read_only_mounts, name
        assert handlers[name].user_namespaces, name
    # A runtime that cannot say what it supports supports nothing optional.
    assert not handlers["uninstalled"].recursive_read_only_mounts
    assert not handlers["uninstalled"].user_namespaces


def test_pod_and_containers_run_through_their_handler(node: Node,
                                                      test_images: TestImages) -> None:
    pod_id, pod = _run_pod(node.cri, HANDLER)
    default_pod, _ = _run_pod(node.cri, "")
    try:
        ctr_id = _sleeper(node, pod_id, pod, test_images.busybox.reference)
        status = node.cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        assert status.status.runtime_handler == HANDLER
        # The pause and the container are in the handler's root, and only there.
        assert _listed(node.root) == sorted([pod_id, ctr_id])
        default_root = _listed(node.daemon.state / "runc")
        assert default_pod in default_root
        assert pod_id not in default_root and ctr_id not in default_root
        # exec goes through the handler too.
        assert exec_sync(node.cri, ctr_id, "echo", "hi").stdout == b"hi\n"
        calls = node.calls.read_text().splitlines()
        # The pause and a container by `run --detach` (create and start at once; a
        # container at StartContainer).
        for command, target in (("run", pod_id), ("run", ctr_id), ("exec", ctr_id)):
            assert any(line.startswith(f"--root {node.root} {GLOBAL_ARG} ") and
                       f" {command} " in f" {line} " and line.endswith(target)
                       for line in calls), (command, target, calls)
        assert not any(default_pod in line for line in calls)
    finally:
        _remove(node.cri, pod_id)
        _remove(node.cri, default_pod)
    _none_listed(node.root)


def test_unknown_handler_is_invalid_argument(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _run_pod(node.cri, "kata")
    assert status_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    message = err.value.details()  # type: ignore[attr-defined]
    assert "'kata' is not configured" in message
    assert f"'{HANDLER}'" in message and "'runc'" in message
    assert node.cri.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_uninstalled_handler_is_failed_precondition(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _run_pod(node.cri, "uninstalled")
    assert status_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "/nonexistent/crun" in err.value.details()  # type: ignore[attr-defined]
    assert node.cri.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_restart_with_a_dead_shim_cleans_up_through_the_handler(
        node: Node, test_images: TestImages) -> None:
    """The daemon stops, the pod's shim is killed, the daemon starts again: the container is
    left to `runc delete --force` of the pod's handler, which only its root can find."""
    pod_id, pod = _run_pod(node.cri, HANDLER)
    ctr_id = _sleeper(node, pod_id, pod, test_images.busybox.reference)
    pid = _pid(node.cri, ctr_id)
    shim = int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])
    assert shim in shim_pids(node.daemon)
    node.daemon.stop()
    os.kill(shim, signal.SIGKILL)
    node.daemon.start()
    assert container_status(node.cri, ctr_id).state in (pb.CONTAINER_EXITED,
                                                       pb.CONTAINER_UNKNOWN)
    assert pod_state(node.cri, pod_id) == pb.SANDBOX_NOTREADY
    assert _listed(node.root) == sorted([pod_id, ctr_id])
    _remove(node.cri, pod_id)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the container killed")
    _none_listed(node.root)


def test_restart_keeps_a_handler_pod(node: Node, test_images: TestImages) -> None:
    pod_id, pod = _run_pod(node.cri, HANDLER)
    try:
        ctr_id = _sleeper(node, pod_id, pod, test_images.busybox.reference)
        node.daemon.stop()
        node.daemon.start()
        assert container_status(node.cri, ctr_id).state == pb.CONTAINER_RUNNING
        assert exec_sync(node.cri, ctr_id, "echo", "again").stdout == b"again\n"
        assert any(line.endswith(ctr_id) and " exec " in line
                   for line in node.calls.read_text().splitlines()[-3:])
    finally:
        _remove(node.cri, pod_id)
    _none_listed(node.root)


def test_a_removed_pods_container_is_cleaned_in_its_handlers_root(
    node: Node, test_images: TestImages
) -> None:
    """RemovePodSandbox deletes the pod's record before its containers' cleanups run, so a
    cleanup finished later (here: one that failed, finished by the next start) must know the
    handler whose root holds the container's runc state from its own journal entry."""
    d = node.daemon
    d.stop()
    d.env = {FAIL_ENV: "remove_container:before_cleanup"}
    d.start()
    pod_id, pod = _run_pod(node.cri, HANDLER)
    ctr_id = _sleeper(node, pod_id, pod, test_images.busybox.reference)
    _remove(node.cri, pod_id)
    assert pod_id not in {p.id for p in node.cri.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    wait_for(lambda: f"container {ctr_id[:12]} failed" in d.log(),
             what="the container's cleanup to fail")
    assert ctr_id in _listed(node.root)
    d.stop()
    d.env = {}
    d.start()
    _none_listed(node.root)
    assert_all_gone(d, node.cri, {pod_id, ctr_id})


def test_pod_of_a_removed_handler_can_be_removed(tmp_path: Path,
                                                 test_images: TestImages) -> None:
    """A handler dropped from the configuration while its pod runs: the daemon still starts,
    says so, and the pod is stopped and removed in the handler's (default) root."""
    with running_daemon(tmp_path, f'[runtimes.gone]\nruntime_path = "{RUNC}"\n') as d:
        cri = d.client()
        try:
            cri.PullImage(pb.PullImageRequest(
                image=pb.ImageSpec(image=test_images.busybox.reference)))
            node = Node(d, cri, d.state / "gone", tmp_path / "no-calls")
            pod_id, pod = _run_pod(cri, "gone")
            ctr_id = _sleeper(node, pod_id, pod, test_images.busybox.reference)
            assert _listed(node.root) == sorted([pod_id, ctr_id])
            d.stop()
            d.config_path.write_text(d.config_path.read_text().replace("[runtimes.gone]", "")
                                     .replace(f'runtime_path = "{RUNC}"\n', ""))
            d.start()
            assert "runtime handler 'gone' is no longer configured" in d.log()
            assert container_status(cri, ctr_id).state == pb.CONTAINER_RUNNING
            _remove(cri, pod_id)
            _none_listed(node.root)
            assert_all_gone(d, cri, {pod_id, ctr_id})
        finally:
            cri.close()


def test_runtime_errors_name_the_binary(tmp_path: Path) -> None:
    """A handler may be crun: its failures must not say runc."""
    with pytest.raises(RuncError, match=r"^crun features failed \(rc=-1\)"):
        Runc(root=str(tmp_path), binary="/nonexistent/crun").features()
