"""critest's PodSandbox sysctl specs (pod_linux.go), the host-namespace specs of "Security
Context" (HostPID, HostIpc, HostNetwork is true / is false) and the Idempotence specs for
containers removed twice, through the daemon."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.pods import (
    a_pod,
    container_config,
    container_status,
    start_container,
    stdout_of,
)
from tests.support.plugin import TestImages

PAUSE = ["sleep", "1000"]


def namespaces(mode: int) -> pb.NamespaceOption:
    return pb.NamespaceOption(network=mode, pid=mode, ipc=mode)  # type: ignore[arg-type]


@contextmanager
def host_shm_segment() -> Iterator[str]:
    """A SysV shared memory segment made on the host with ipcmk; its id."""
    made = subprocess.run(["ipcmk", "-M", "1048576"], capture_output=True, text=True, check=True)
    shmid = made.stdout.strip().removeprefix("Shared memory id: ")
    try:
        yield shmid
    finally:
        subprocess.run(["ipcrm", "-m", shmid], check=True)


@contextmanager
def host_listener() -> Iterator[int]:
    """A TCP socket listening on the host; its port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@contextmanager
def host_process() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "4343"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def shm_ids(sysvipc_shm: str) -> set[str]:
    """The shmid column of /proc/sysvipc/shm."""
    return {line.split()[1] for line in sysvipc_shm.splitlines()[1:]}


def interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:]}


# --- sysctls ---------------------------------------------------------------------------------


def test_safe_and_unsafe_sysctls(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    host_msg_max = Path("/proc/sys/fs/mqueue/msg_max").read_text()
    sysctls = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}
    with a_pod(fp, tmp_path, linux=pb.LinuxPodSandboxConfig(sysctls=sysctls)) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=PAUSE))
        for name, value in sysctls.items():
            path = "/proc/sys/" + name.replace(".", "/")
            assert stdout_of(fp, ctr, "cat", path).strip() == value, name
    assert Path("/proc/sys/fs/mqueue/msg_max").read_text() == host_msg_max


# --- host namespaces -------------------------------------------------------------------------


@pytest.mark.parametrize("host", [True, False], ids=["host", "pod"])
def test_host_pid_ipc_and_network(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                  host: bool) -> None:
    mode = pb.NODE if host else pb.POD
    linux = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=namespaces(mode)))
    with host_shm_segment() as shmid, host_listener() as port, host_process() as pid, \
            a_pod(fp, tmp_path, linux=linux) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=PAUSE, linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=namespaces(mode)))))
        processes = stdout_of(fp, ctr, "ps", "-o", "pid,args")
        assert bool(re.search(rf"^\s*{pid}\s+sleep 4343$", processes, re.MULTILINE)) is host
        segments = shm_ids(stdout_of(fp, ctr, "cat", "/proc/sysvipc/shm"))
        assert (shmid in segments) is host
        listening = stdout_of(fp, ctr, "netstat", "-ln")
        assert (f"127.0.0.1:{port} " in listening) is host
        # Others' tests add and remove veths meanwhile: only those there throughout count.
        before = interfaces(Path("/proc/net/dev").read_text())
        inside = interfaces(stdout_of(fp, ctr, "cat", "/proc/net/dev"))
        host_interfaces = before & interfaces(Path("/proc/net/dev").read_text())
        if host:
            assert host_interfaces <= inside
        else:
            assert inside == {"lo", "eth0"}


# --- idempotence -----------------------------------------------------------------------------


def test_stop_and_remove_twice(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=PAUSE))
        for _ in range(2):
            fp.StopContainer(pb.StopContainerRequest(container_id=ctr, timeout=1))
            assert container_status(fp, ctr).state == pb.CONTAINER_EXITED
        for _ in range(2):
            fp.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr))
        assert not fp.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(id=ctr))).containers
        fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
