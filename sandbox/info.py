"""Version, Status, RuntimeConfig and UpdateRuntimeConfig: what the runtime says about itself."""

from __future__ import annotations

import asyncio
import json
import os
import platform
from importlib import metadata

from cri_api import api_pb2 as pb
from sandbox import cgroups
from sandbox.pods import userns_supported
from sandbox.runtime import Runtime

RUNTIME_NAME = "flatpod"
CRI_API_VERSION = "v1"
POD_CIDR_SETTING = "pod_cidr"


def flatpod_version() -> str:
    try:
        return metadata.version("flatpod")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def version(rt: Runtime, req: pb.VersionRequest) -> pb.VersionResponse:
    return pb.VersionResponse(
        version="0.1.0",  # the kubelet-runtime API version, as containerd and CRI-O answer
        runtime_name=RUNTIME_NAME,
        runtime_version=rt.version,
        runtime_api_version=CRI_API_VERSION,
    )


async def status(rt: Runtime, req: pb.StatusRequest) -> pb.StatusResponse:
    runtime_ok, runtime_reason = _runtime_condition(rt)
    network_ok, network_reason = await _network_condition(rt)
    # Pods get user namespaces (mode POD) when the kernel makes them and the snapshots'
    # filesystem takes idmapped mounts (probed once; runc 1.1.5 joins the pinned namespace).
    userns = await asyncio.to_thread(userns_supported, rt.images.snapshots.dir)
    conditions = [
        pb.RuntimeCondition(
            type="RuntimeReady",
            status=runtime_ok,
            reason="" if runtime_ok else "RuntimeNotReady",
            message=runtime_reason,
        ),
        pb.RuntimeCondition(
            type="NetworkReady",
            status=network_ok,
            reason="" if network_ok else "NetworkPluginNotReady",
            message=network_reason,
        ),
    ]
    response = pb.StatusResponse(
        status=pb.RuntimeStatus(conditions=conditions),
        runtime_handlers=await _runtime_handlers(rt, userns),
        features=pb.RuntimeFeatures(supplemental_groups_policy=True),
    )
    if req.verbose:
        response.info["config"] = rt.config.to_json()
        response.info["pod_cidr"] = json.dumps(rt.store.get_setting(POD_CIDR_SETTING) or "")
    return response


def runtime_config(rt: Runtime, req: pb.RuntimeConfigRequest) -> pb.RuntimeConfigResponse:
    driver = pb.SYSTEMD if rt.config.driver is cgroups.Driver.SYSTEMD else pb.CGROUPFS
    return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))


async def update_runtime_config(
    rt: Runtime, req: pb.UpdateRuntimeConfigRequest
) -> pb.UpdateRuntimeConfigResponse:
    cidr = req.runtime_config.network_config.pod_cidr
    if cidr:
        rt.store.put_setting(POD_CIDR_SETTING, cidr)
    return pb.UpdateRuntimeConfigResponse()


async def _runtime_handlers(rt: Runtime, userns: bool) -> list[pb.RuntimeHandler]:
    """Every configured handler, and the default one again under the name "" (kubelet's
    name for it), as containerd 2.x answers. Recursive read-only mounts need the kernel's
    mount_setattr and the runtime's "rro" mount option; user namespaces need what flatpod
    probes (it makes the namespace and the idmapped mounts) and the runtime's "user"
    namespace."""
    kernel_rro = _kernel_supports_rro()
    answer = []
    for name in rt.handlers.by_name:
        features = await asyncio.to_thread(rt.handlers.features, name)
        answer.append(pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=kernel_rro and "rro" in features.mount_options,
            user_namespaces=userns and "user" in features.namespaces,
        )))
    default = next(h for h in answer if h.name == rt.handlers.default)
    answer.insert(0, pb.RuntimeHandler(name="", features=default.features))
    return answer


def _runtime_condition(rt: Runtime) -> tuple[bool, str]:
    runc = rt.handlers.default_handler.binary
    if not os.access(runc, os.X_OK):
        return False, f"OCI runtime {runc} (default handler) is not installed"
    if not os.access(rt.paths.state, os.W_OK):
        return False, f"state dir {rt.paths.state} is not writable"
    return True, ""


async def _network_condition(rt: Runtime) -> tuple[bool, str]:
    if rt.network is None:
        return False, "pod network is not initialised"
    # Netlink calls block: a worker thread, never the event loop.
    ready, reason = await asyncio.to_thread(rt.network.status)
    return bool(ready), str(reason)


def _kernel_supports_rro() -> bool:
    """Recursive read-only mounts need mount_setattr(2), Linux 5.12 and later."""
    release = platform.release().split("-")[0].split(".")
    try:
        major, minor = int(release[0]), int(release[1])
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (5, 12)
