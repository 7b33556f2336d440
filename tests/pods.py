"""Builders and checks for tests that run real pods and containers through the CRI."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.daemon import TIME_SCALE


def pod_config(name: str = "", log_dir: Path | None = None, **fields: Any) -> pb.PodSandboxConfig:
    name = name or f"pod-{uuid.uuid4().hex[:8]}"
    fields.setdefault("hostname", name[:60])
    fields.setdefault("log_directory", str(log_dir) if log_dir else "")
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="fpt"),
        **fields,
    )
    return config


@contextmanager
def a_pod(
    cri: CriClient, tmp_path: Path, **fields: Any
) -> Iterator[tuple[str, pb.PodSandboxConfig]]:
    """A running pod (logs under tmp_path), stopped and removed when the block ends, whatever
    happened in it."""
    config = pod_config(log_dir=tmp_path / "logs", **fields)
    pod_id = run_pod(cri, config)
    try:
        yield pod_id, config
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def container_config(image: str, name: str = "", **fields: Any) -> pb.ContainerConfig:
    name = name or f"ctr-{uuid.uuid4().hex[:8]}"
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
        log_path=f"{name}.log", **fields,
    )


def run_pod(cri: CriClient, config: pb.PodSandboxConfig) -> str:
    pod_id: str = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    return pod_id


def start_container(cri: CriClient, pod_id: str, pod: pb.PodSandboxConfig,
                    config: pb.ContainerConfig) -> str:
    ctr_id: str = cri.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    ).container_id
    cri.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
    return ctr_id


def remove_all_pods(cri: CriClient) -> None:
    for pod in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


def container_status(cri: CriClient, ctr_id: str) -> pb.ContainerStatus:
    status: pb.ContainerStatus = cri.ContainerStatus(
        pb.ContainerStatusRequest(container_id=ctr_id)
    ).status
    return status


def pod_state(cri: CriClient, pod_id: str) -> int:
    state: int = cri.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
    ).status.state
    return state


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout * TIME_SCALE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def wait_for_command(pid: int, cmdline: bytes) -> None:
    """Waits until `pid` runs `cmdline` (NUL-separated argv): StartContainer answers once
    runc's init is told to exec the command, which it may not have done yet."""
    wait_for(lambda: Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline,
             what=f"pid {pid} to exec {cmdline!r}")


def process_exited(pid: int) -> bool:
    """The process is gone, or a zombie (exited, its parent not yet told)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def exec_sync(cri: CriClient, ctr_id: str, *cmd: str, timeout: int = 10) -> pb.ExecSyncResponse:
    response: pb.ExecSyncResponse = cri.ExecSync(
        pb.ExecSyncRequest(container_id=ctr_id, cmd=list(cmd), timeout=timeout)
    )
    return response


def exec_url(cri: CriClient, ctr_id: str, cmd: list[str], *, tty: bool = False,
             stdin: bool = False) -> str:
    """The streaming URL of an Exec of `cmd` (its output on stdout, and stderr without tty)."""
    url: str = cri.Exec(pb.ExecRequest(container_id=ctr_id, cmd=cmd, tty=tty, stdin=stdin,
                                       stdout=True, stderr=not tty)).url
    return url


def attach_url(cri: CriClient, ctr_id: str, *, tty: bool = False) -> str:
    """The streaming URL of an Attach to the container's stdio (stderr without tty)."""
    url: str = cri.Attach(pb.AttachRequest(container_id=ctr_id, stdin=True, stdout=True,
                                           stderr=not tty, tty=tty)).url
    return url


def stdout_of(cri: CriClient, ctr_id: str, *cmd: str) -> str:
    """What `cmd` printed in the container; it must succeed."""
    result = exec_sync(cri, ctr_id, *cmd)
    assert result.exit_code == 0, (cmd, result.stderr)
    return bytes(result.stdout).decode()


def create_error(cri: CriClient, pod_id: str, pod: pb.PodSandboxConfig,
                 config: pb.ContainerConfig) -> grpc.RpcError:
    """The error CreateContainer answers `config` with; it must fail."""
    with pytest.raises(grpc.RpcError) as err:
        cri.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod))
    return err.value


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    prefix = str(path)
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(prefix)]


def host_traces(pod_id: str) -> list[str]:
    """What a pod may have left on the host: netns pins, veths, cgroups, processes."""
    traces = []
    if any(n.startswith(f"flatpod-{pod_id[:24]}") for n in os.listdir("/run/netns")
           if os.path.isdir("/run/netns")):
        traces.append("netns")
    roots = [Path("/sys/fs/cgroup") / c for c in ("memory", "cpu", "pids", "unified")]
    if (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():  # pure v2: one hierarchy
        roots = [Path("/sys/fs/cgroup")]
    for root in roots:
        controller = root.name
        for dirpath, dirnames, _ in os.walk(root):
            if any(pod_id in d for d in dirnames):
                traces.append(f"cgroup {controller} {dirpath}")
            if dirpath.count("/") > 8:
                dirnames.clear()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pod_id.encode() in cmdline:
                traces.append(f"process {pid} {cmdline[:80]!r}")
    return traces


def cleaned_up(pod_id: str) -> None:
    """Waits until none of host_traces(pod_id) is left: a removal answers before its shim,
    cgroup and dirs are gone (sandbox/removals.py)."""
    wait_for(lambda: host_traces(pod_id) == [], what=f"the cleanup after pod {pod_id[:12]}")


def http_get(url: str) -> list[str]:
    """argv that prints the body of `url`, exit 0 on any HTTP answer (the host's static
    busybox wget crashes here, so host-side clients are Python)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    sys.stdout.buffer.write(urllib.request.urlopen({url!r}, timeout=2).read())\n"
        "except urllib.error.HTTPError:\n"
        "    pass\n"
    )
    return [sys.executable, "-c", code]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie, or a pid reaped while we look, counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
