"""Containers: Create, Start, Stop, Remove, Status, List, ExecSync, ReopenLog, UpdateResources.

A container is a peer process on the host: its OCI spec joins the pod's pinned namespace
files, its rootfs is an overlay of the image's snapshots, and the pod's shim runs it, holds its
stdio, writes its CRI log and records its exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from cri_api import api_pb2 as pb
from sandbox import cgroups
from sandbox.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from sandbox.exits import apply_exit, delete_runc_state, publish, record_exit
from sandbox.mounts import unmount
from sandbox.records import (
    CREATED,
    EXITED,
    RUNNING,
    UNKNOWN,
    ContainerRecord,
    ContainerState,
    PodRecord,
)
from sandbox.runtime import Runtime
from sandbox.spec import (
    SandboxPaths,
    SpecDefaults,
    SpecError,
    build_container_spec,
    pod_userns,
)
from sandbox.users import UserDb
from sandbox.wire import repeated_entry
from shim.client import ProcessState, ShimClient, ShimError, ShimTimeout

log = logging.getLogger("flatpod.containers")

CONTAINER_CREATING = ContainerState.CREATING
_STATES = {
    CREATED: pb.CONTAINER_CREATED,
    RUNNING: pb.CONTAINER_RUNNING,
    EXITED: pb.CONTAINER_EXITED,
    UNKNOWN: pb.CONTAINER_UNKNOWN,
}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
# ListContainersResponse.containers
LIST_CONTAINERS_FIELD = pb.ListContainersResponse.DESCRIPTOR.fields_by_name["containers"].number
# How long a stop waits for the shim to see the exit after SIGKILL.
KILL_WAIT = 10.0


def container_name(meta: pb.ContainerMetadata, pod: PodRecord) -> str:
    pod_meta = pod.config.metadata
    return (
        f"{meta.name}_{pod_meta.name}_{pod_meta.namespace}_{pod_meta.uid}_{meta.attempt}"
    )


# --- CreateContainer -------------------------------------------------------------------------


async def create_container(
    rt: Runtime, req: pb.CreateContainerRequest
) -> pb.CreateContainerResponse:
    validate_container_config(req.config)
    pod = rt.registry.ready_pod(req.pod_sandbox_id)
    image = rt.images.images.resolve(req.config.image.image)
    if image is None:
        raise NotFound(f"image {req.config.image.image!r} not found; pull it first")
    name = container_name(req.config.metadata, pod)
    ctr_id = await rt.registry.create_once(
        "container", name, lambda: _create(rt, pod, name, req, image)
    )
    return pb.CreateContainerResponse(container_id=ctr_id)


async def _create(
    rt: Runtime, pod: PodRecord, name: str, req: pb.CreateContainerRequest, image: Any
) -> str:
    from sandbox.undo import undo_on_failure

    config = req.config
    ctr = ContainerRecord(
        id=uuid.uuid4().hex + uuid.uuid4().hex,
        pod_id=pod.id,
        name=name,
        created_at=time.time_ns(),
        config=config,
        image_ref=config.image.image,
        image_id=image.id,
        image_name=_image_name(image, config.image.image),
        state=CONTAINER_CREATING,
        snapshots=list(reversed(image.chain_ids)),
        stop_signal=str(image.config.get("config", {}).get("StopSignal") or ""),
        resources=config.linux.resources.SerializeToString(),
    )
    # 1. Reserve the name, before touching the host.
    rt.registry.reserve(ctr)
    rt.faults.point("create_container:after_reserve")
    async with rt.locks.hold(ctr.id), undo_on_failure() as undo:
        undo.push("record", lambda: rt.registry.forget(ctr))
        # 2. The rootfs: an overlay of the image's snapshots and a writable layer.
        bundle = rt.paths.bundle_dir(ctr.id)
        layer = rt.paths.writable_layers / ctr.id
        rootfs = bundle / "rootfs"
        undo.push("dirs", lambda: _remove_dirs(bundle, layer))
        await asyncio.to_thread(_make_dirs, bundle, layer, rootfs)
        # In a pod with its own user namespace the layers are idmapped with it, so its root
        # owns what the host's root owns in the image (runc 1.1.5 cannot idmap mounts).
        userns = pod_userns(pod.config.linux.security_context)
        user_ns = Path(pod.namespaces["user"]) if userns is not None else None
        await asyncio.to_thread(
            rt.images.snapshots.mount_rootfs, ctr.snapshots, layer / "upper", layer / "work",
            rootfs, False, user_ns, userns.root if userns is not None else None,
        )
        undo.push("rootfs", lambda: unmount(rootfs))
        rt.faults.point("create_container:after_rootfs")
        ctr.rootfs = str(rootfs)
        # 3. The OCI spec: joins the pod's pinned namespaces.
        ctr.cgroup_path = cgroups.container_cgroup_path(pod.cgroup_path, ctr.id)
        spec = await asyncio.to_thread(_container_spec, rt, pod, ctr, image, rootfs)
        user = spec["process"]["user"]
        ctr.uid, ctr.gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        ctr.supplemental_groups = [int(g) for g in user.get("additionalGids", [])]
        (bundle / "config.json").write_text(json.dumps(spec))
        if userns is not None:  # runc reaches rootfs/ from inside the user namespace
            os.chmod(bundle / "config.json", 0o600)
            os.chmod(bundle, 0o711)
        # 4. The log file, where kubelet reads it.
        ctr.log_path = _log_path(pod, config)
        if ctr.log_path:
            Path(ctr.log_path).parent.mkdir(parents=True, exist_ok=True)
        # 5. The shim creates it: the process waits in runc's init until StartContainer.
        shim = shim_of(rt, pod.id)
        ctr.pid = await shim.create(
            ctr.id, str(bundle), stdin=config.stdin, stdin_once=config.stdin_once,
            tty=config.tty, log_path=ctr.log_path or None, exit_file=str(bundle / "exit"),
        )
        undo.push("runc", lambda: delete_runc_state(rt, ctr.id))
        rt.faults.point("create_container:after_shim_create")
        rt.registry.transition(ctr, CREATED)
    publish(rt, ctr, pb.CONTAINER_CREATED_EVENT)
    log.info("container %s (%s) created in pod %s", ctr.id[:12], name, pod.short)
    return ctr.id


def validate_container_config(config: pb.ContainerConfig) -> None:
    if not config.metadata.name:
        raise InvalidArgument("container config metadata.name is required")
    if not config.image.image:
        raise InvalidArgument("container config image.image is required")
    for field_name, value in (
        ("metadata.name", config.metadata.name), ("image.image", config.image.image),
        ("log_path", config.log_path), ("working_dir", config.working_dir),
    ):
        if "\x00" in value:
            raise InvalidArgument(f"{field_name} contains a NUL byte")
    if config.log_path and (
        os.path.isabs(config.log_path) or ".." in Path(config.log_path).parts
    ):
        raise InvalidArgument(
            f"log_path {config.log_path!r} must be relative to the pod's log_directory, "
            "without '..'"
        )
    for mount in config.mounts:
        if not os.path.isabs(mount.container_path):
            raise InvalidArgument(f"mount container_path {mount.container_path!r} is not absolute")
        if "\x00" in mount.container_path or "\x00" in mount.host_path:
            raise InvalidArgument("mount paths must not contain NUL bytes")
    for env in config.envs:
        if "\x00" in env.key or "\x00" in env.value or "=" in env.key or not env.key:
            raise InvalidArgument(f"environment variable name {env.key!r} is invalid")


def _image_name(image: Any, requested: str) -> str:
    tags = list(image.repo_tags)
    for tag in tags:
        if tag.endswith(requested) or requested in tag:
            return str(tag)
    return str(tags[0]) if tags else requested


def _make_dirs(bundle: Path, layer: Path, rootfs: Path) -> None:
    bundle.mkdir(parents=True, mode=0o700)
    rootfs.mkdir()
    (layer / "upper").mkdir(parents=True)
    (layer / "work").mkdir()


def _remove_dirs(bundle: Path, layer: Path) -> None:
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(layer, ignore_errors=True)


def _container_spec(
    rt: Runtime, pod: PodRecord, ctr: ContainerRecord, image: Any, rootfs: Path
) -> dict[str, Any]:
    pod_dir = rt.paths.pod_dir(pod.id)
    ns = pod.namespaces
    sandbox = SandboxPaths(
        netns=Path(pod.netns_path) if pod.netns_path else None,
        ipc=Path(ns["ipc"]) if "ipc" in ns else None,
        uts=Path(ns["uts"]) if "uts" in ns else None,
        pid=Path(ns["pid"]) if "pid" in ns else None,
        hostname=pod_dir / "hostname",
        resolv_conf=pod_dir / "resolv.conf",
        shm=pod_dir / "shm" if (pod_dir / "shm").is_dir() else None,
        hosts=pod_dir / "hosts",
        user=Path(ns["user"]) if "user" in ns else None,
    )
    target = _target_pid_ns(rt, ctr.config)
    # A container cannot have a network of its own in a flat pod: it is the pod's, whatever
    # the container's options say (kubelet sends the pod's mode; crictl users often don't).
    config = pb.ContainerConfig()
    config.CopyFrom(ctr.config)
    pod_network_mode = pod.config.linux.security_context.namespace_options.network
    config.linux.security_context.namespace_options.network = pod_network_mode
    try:
        return build_container_spec(
            pod.config, config, dict(image.config.get("config") or {}),
            rootfs=rootfs, sandbox=sandbox, cgroups_path=ctr.cgroup_path,
            target_pid_ns=target, rootfs_users=UserDb.from_rootfs(rootfs),
            oom_score_adj_floor=rt.oom_score_adj_floor, defaults=SpecDefaults(),
        )
    except SpecError as err:
        raise InvalidArgument(str(err)) from err


def _target_pid_ns(rt: Runtime, config: pb.ContainerConfig) -> Path | None:
    opts = config.linux.security_context.namespace_options
    if opts.pid != pb.TARGET:
        return None
    target = rt.find_container(opts.target_id)
    if target is None or target.state != RUNNING or not target.pid:
        raise NotFound(f"target container {opts.target_id!r} for the PID namespace is not running")
    return Path(f"/proc/{target.pid}/ns/pid")


def _log_path(pod: PodRecord, config: pb.ContainerConfig) -> str:
    if not pod.config.log_directory or not config.log_path:
        return ""
    return os.path.join(pod.config.log_directory, config.log_path)


def shim_of(rt: Runtime, pod_id: str) -> ShimClient:
    """The shim of a pod (containers, exec and attach all go through it)."""
    shim: ShimClient | None = rt.shims.get(pod_id)
    if shim is None:
        raise FailedPrecondition(f"the shim of pod {pod_id} is gone; stop and remove the pod")
    return shim


# --- StartContainer --------------------------------------------------------------------------


async def start_container(rt: Runtime, req: pb.StartContainerRequest) -> pb.StartContainerResponse:
    ctr = rt.registry.visible_container(req.container_id)
    async with rt.locks.hold(ctr.id):
        if ctr.state != CREATED:
            raise FailedPrecondition(f"container {ctr.id} is {ctr.state}, not created")
        pod = rt.pod(ctr.pod_id)
        # Taken before `runc start`: a quick process may exit (and its finished_at be recorded)
        # before the shim's reply arrives, and started_at must not come after finished_at.
        started_at = time.time_ns()
        rt.faults.point("start_container:before_runc_start")
        try:
            await shim_of(rt, pod.id).start(ctr.id)
        except ShimError as err:
            rt.registry.transition(
                ctr, EXITED, reason="StartError", message=str(err), exit_code=128,
                finished_at=time.time_ns(),
            )
            raise FailedPrecondition(f"starting container {ctr.id}: {err}") from err
        rt.faults.point("start_container:after_runc_start")
        # Its exit may already have been reported: then it stays exited.
        state = RUNNING if ctr.state == CREATED else ctr.state
        rt.registry.transition(ctr, state, started_at=started_at)
    publish(rt, ctr, pb.CONTAINER_STARTED_EVENT)
    return pb.StartContainerResponse()


# --- StopContainer ---------------------------------------------------------------------------


async def stop_container(rt: Runtime, req: pb.StopContainerRequest) -> pb.StopContainerResponse:
    ctr = rt.find_container(req.container_id)
    if ctr is None:
        return pb.StopContainerResponse()
    async with rt.locks.hold(ctr.id):
        await stop_container_now(rt, ctr, req.timeout)
    return pb.StopContainerResponse()


async def stop_container_now(rt: Runtime, ctr: ContainerRecord, timeout: int) -> None:
    """The stop signal, then SIGKILL after `timeout` seconds (0: at once). Idempotent."""
    if ctr.state not in (RUNNING, CREATED, UNKNOWN):
        return
    shim = rt.shims.get(ctr.pod_id)
    if shim is None:
        # Nobody holds it (its shim died, or the node rebooted): runc still can kill it.
        await delete_runc_state(rt, ctr.id)
        record_exit(
            rt, ctr, ProcessState("exited", exit_code=255), reason="Unknown",
            message=ctr.message or "the container's shim is gone; its exit status is unknown",
        )
        return
    try:
        if timeout > 0 and ctr.state == RUNNING:
            await shim.signal(ctr.id, _stop_signal(ctr))
            view = await _wait(shim, ctr.id, timeout)
            if view is not None:
                await apply_exit(rt, ctr, view)
                return
        await shim.signal(ctr.id, signal.SIGKILL, all=True)
        view = await _wait(shim, ctr.id, KILL_WAIT)
        if view is None:
            raise DeadlineExceeded(f"container {ctr.id} did not exit {KILL_WAIT}s after SIGKILL")
        await apply_exit(rt, ctr, view)
    except ShimError as err:
        view = await _shim_view(shim, ctr.id)
        if view is not None and view.exited:
            await apply_exit(rt, ctr, view)
            return
        raise FailedPrecondition(f"stopping container {ctr.id}: {err}") from err


async def _wait(shim: ShimClient, ctr_id: str, timeout: float) -> ProcessState | None:
    try:
        view = await shim.wait(ctr_id, timeout=timeout)
    except ShimTimeout:
        # The shim answers a wait only when the container exits: the client's deadline
        # passing first means "still running".
        return None
    return view if view.exited else None


async def _shim_view(shim: ShimClient, ctr_id: str) -> ProcessState | None:
    try:
        return await shim.state(ctr_id)
    except (ShimError, OSError):
        return None


def _stop_signal(ctr: ContainerRecord) -> int:
    name = ctr.stop_signal.upper()
    if not name:
        return int(signal.SIGTERM)
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    return int(getattr(signal, name, signal.SIGTERM))


# --- exits, from the shim --------------------------------------------------------------------


# --- RemoveContainer -------------------------------------------------------------------------


async def remove_container(
    rt: Runtime, req: pb.RemoveContainerRequest
) -> pb.RemoveContainerResponse:
    ctr = rt.find_container(req.container_id)
    if ctr is None:
        return pb.RemoveContainerResponse()
    async with rt.locks.hold(ctr.id):
        await remove_container_now(rt, ctr)
    return pb.RemoveContainerResponse()


async def remove_container_now(rt: Runtime, ctr: ContainerRecord) -> None:
    """Forcibly stops, then removes every trace: runc state, rootfs, cgroup, dirs, record."""
    await stop_container_now(rt, ctr, timeout=0)
    await delete_runc_state(rt, ctr.id)
    bundle = rt.paths.bundle_dir(ctr.id)
    await asyncio.to_thread(unmount, bundle / "rootfs")
    if ctr.cgroup_path:
        await asyncio.to_thread(cgroups.remove, ctr.cgroup_path)
    await asyncio.to_thread(_remove_dirs, bundle, rt.paths.writable_layers / ctr.id)
    rt.registry.forget(ctr)
    publish(rt, ctr, pb.CONTAINER_DELETED_EVENT)
    log.info("container %s removed", ctr.id[:12])


# --- ContainerStatus and ListContainers -------------------------------------------------------


async def container_status(
    rt: Runtime, req: pb.ContainerStatusRequest
) -> pb.ContainerStatusResponse:
    ctr = rt.registry.visible_container(req.container_id)
    response = pb.ContainerStatusResponse(status=container_status_message(rt, ctr))
    if req.verbose:
        response.info["info"] = json.dumps(
            {
                "pid": ctr.pid,
                "sandboxID": ctr.pod_id,
                "rootfs": ctr.rootfs,
                "snapshots": ctr.snapshots,
                "cgroup": ctr.cgroup_path,
                "config": MessageToDict(ctr.config),
            }
        )
    return response


def container_status_message(rt: Runtime, ctr: ContainerRecord) -> pb.ContainerStatus:
    config = ctr.config
    resources = pb.LinuxContainerResources.FromString(ctr.resources)
    return pb.ContainerStatus(
        id=ctr.id,
        metadata=config.metadata,
        state=_STATES.get(ctr.state, pb.CONTAINER_UNKNOWN),
        created_at=ctr.created_at,
        started_at=ctr.started_at,
        finished_at=ctr.finished_at,
        exit_code=ctr.exit_code,
        image=pb.ImageSpec(
            image=ctr.image_name or ctr.image_ref, annotations=config.image.annotations
        ),
        image_ref=ctr.image_id,
        image_id=ctr.image_id,
        reason=ctr.reason,
        message=ctr.message,
        labels=config.labels,
        annotations=config.annotations,
        mounts=config.mounts,
        log_path=ctr.log_path,
        resources=pb.ContainerResources(linux=resources),
        user=pb.ContainerUser(
            linux=pb.LinuxContainerUser(
                uid=ctr.uid, gid=ctr.gid, supplemental_groups=ctr.supplemental_groups
            )
        ),
    )


async def list_containers(rt: Runtime, req: pb.ListContainersRequest) -> bytes:
    """A ListContainersResponse, assembled from each container's cached entry (sandbox/wire.py).
    Unfiltered, as kubelet's relist asks every second, the whole answer is cached too."""
    return rt.list_answer(
        "containers", rt.registry.containers, req.filter, lambda: _answer(rt, req.filter)
    )


def _answer(rt: Runtime, flt: pb.ContainerFilter) -> bytes:
    return b"".join([c.list_entry or _list_entry(c) for c in _filtered(rt, flt)])


def _list_entry(ctr: ContainerRecord) -> bytes:
    if not ctr.list_entry:
        ctr.list_entry = repeated_entry(LIST_CONTAINERS_FIELD, _summary(ctr))
    return ctr.list_entry


def _filtered(rt: Runtime, flt: pb.ContainerFilter) -> list[ContainerRecord]:
    want_state = _STATE_NAMES.get(flt.state.state) if flt.HasField("state") else None
    return rt.registry.containers_matching(
        flt.id, flt.pod_sandbox_id, flt.label_selector, want_state
    )


def _summary(ctr: ContainerRecord) -> pb.Container:
    config = ctr.config
    return pb.Container(
        id=ctr.id,
        pod_sandbox_id=ctr.pod_id,
        metadata=config.metadata,
        image=pb.ImageSpec(image=ctr.image_name or ctr.image_ref),
        image_ref=ctr.image_id,
        image_id=ctr.image_id,
        state=_STATES.get(ctr.state, pb.CONTAINER_UNKNOWN),
        created_at=ctr.created_at,
        labels=config.labels,
        annotations=config.annotations,
    )


# --- ExecSync, ReopenContainerLog, UpdateContainerResources -----------------------------------


async def exec_sync(rt: Runtime, req: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
    ctr = running_container(rt, req.container_id)
    if not req.cmd:
        raise InvalidArgument("exec command is empty")
    process = exec_process(rt, ctr, list(req.cmd), tty=False)
    shim = shim_of(rt, ctr.pod_id)
    timeout = float(req.timeout) if req.timeout > 0 else None
    result = await shim.exec_sync(ctr.id, process, timeout)
    if result.timed_out:
        raise DeadlineExceeded(
            f"command {list(req.cmd)!r} in container {ctr.id} timed out after {req.timeout}s"
        )
    return pb.ExecSyncResponse(
        stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
    )


def exec_process(rt: Runtime, ctr: ContainerRecord, cmd: list[str], tty: bool) -> dict[str, Any]:
    """The container's own process settings (user, env, cwd, caps) with another command."""
    spec = json.loads((rt.paths.bundle_dir(ctr.id) / "config.json").read_text())
    process: dict[str, Any] = spec["process"]
    process["args"] = cmd
    process["terminal"] = tty
    process.pop("consoleSize", None)
    return process


def running_container(rt: Runtime, ref: str) -> ContainerRecord:
    ctr = rt.registry.visible_container(ref)
    if ctr.state != RUNNING:
        raise FailedPrecondition(f"container {ctr.id} is {ctr.state}, not running")
    return ctr


async def reopen_container_log(
    rt: Runtime, req: pb.ReopenContainerLogRequest
) -> pb.ReopenContainerLogResponse:
    ctr = running_container(rt, req.container_id)
    await shim_of(rt, ctr.pod_id).reopen_log(ctr.id)
    return pb.ReopenContainerLogResponse()


async def update_container_resources(
    rt: Runtime, req: pb.UpdateContainerResourcesRequest
) -> pb.UpdateContainerResourcesResponse:
    ctr = rt.registry.visible_container(req.container_id)
    if ctr.state not in (CREATED, RUNNING):
        raise FailedPrecondition(f"container {ctr.id} is {ctr.state}: nothing to update")
    async with rt.locks.hold(ctr.id):
        resources = cgroups.Resources.from_cri(req.linux)
        await asyncio.to_thread(cgroups.update, ctr.cgroup_path, resources)
        rt.registry.update(ctr, resources=req.linux.SerializeToString())
    return pb.UpdateContainerResourcesResponse()

