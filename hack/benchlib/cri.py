"""The bench's CRI client over the project's generated stubs, and the pod/container shapes
every runtime gets (the same bytes go to flatpod and containerd)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc

from cri_api import api_pb2 as pb
from cri_api import api_pb2_grpc as rpc

BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
# critest -benchmark's image (public.ecr.aws there), through the same mirror
LOOKUP_IMAGE = "registry.k8s.io/docker/library/busybox:1.35.0-glibc"
NAMESPACE = "fpbench"
CALL_TIMEOUT = 180.0


class Cri:
    """One channel per runtime, shared by every thread (as kubelet shares one connection)."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(
            f"unix://{socket}",
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self.runtime: Any = rpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.images: Any = rpc.ImageServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def version(self, timeout: float = 2.0) -> str:
        reply = self.runtime.Version(pb.VersionRequest(), timeout=timeout)
        return f"{reply.runtime_name} {reply.runtime_version}"

    def run_pod(self, config: pb.PodSandboxConfig) -> str:
        reply = self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config), timeout=CALL_TIMEOUT)
        return str(reply.pod_sandbox_id)

    def stop_and_remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
        self.runtime.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)

    def create_and_start(self, pod_id: str, pod: pb.PodSandboxConfig,
                         config: pb.ContainerConfig) -> str:
        reply = self.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod),
            timeout=CALL_TIMEOUT)
        ctr_id = str(reply.container_id)
        self.runtime.StartContainer(
            pb.StartContainerRequest(container_id=ctr_id), timeout=CALL_TIMEOUT)
        return ctr_id

    def kill_and_remove_container(self, ctr_id: str) -> None:
        self.runtime.StopContainer(
            pb.StopContainerRequest(container_id=ctr_id, timeout=0), timeout=CALL_TIMEOUT)
        self.runtime.RemoveContainer(
            pb.RemoveContainerRequest(container_id=ctr_id), timeout=CALL_TIMEOUT)

    def list_pods(self) -> list[Any]:
        reply = self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)
        return list(reply.items)

    def list_containers(self) -> list[Any]:
        reply = self.runtime.ListContainers(pb.ListContainersRequest(), timeout=CALL_TIMEOUT)
        return list(reply.containers)

    def list_container_stats(self) -> list[Any]:
        reply = self.runtime.ListContainerStats(
            pb.ListContainerStatsRequest(), timeout=CALL_TIMEOUT)
        return list(reply.stats)

    def pull(self, image: str) -> str:
        reply = self.images.PullImage(
            pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=600.0)
        return str(reply.image_ref)

    def has_image(self, image: str) -> bool:
        reply = self.images.ImageStatus(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=CALL_TIMEOUT)
        return bool(reply.image.id)

    def remove_image(self, image: str) -> None:
        """Removes `image`; absent is fine (containerd 1.6 and flatpod both say OK)."""
        try:
            self.images.RemoveImage(
                pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            if status_code(err) != grpc.StatusCode.NOT_FOUND:
                raise


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = err.code()
    return code


def describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        details = err.details()
        return f"{status_code(err).name}: {details}"
    return f"{type(err).__name__}: {err}"


def pod_config(cgroup_parent: str, log_root: Path) -> pb.PodSandboxConfig:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    log_dir = log_root / name
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=NAMESPACE),
        hostname=name,
        log_directory=str(log_dir),
        linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent),
    )


def sleeper_config(name: str = "") -> pb.ContainerConfig:
    name = name or f"sleep-{uuid.uuid4().hex[:8]}"
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=BUSYBOX),
        command=["sleep", "3600"],
        log_path=f"{name}.log",
        linux=pb.LinuxContainerConfig(),
    )
