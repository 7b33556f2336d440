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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri_api import api_pb2 as pb
from sandbox import apparmor, cgroups, checkpoint, validate
from sandbox.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Steps,
    describe,
)
from sandbox.exits import (
    apply_exit,
    delete_runc_state,
    forget_runc_state,
    publish,
    record_exit,
    runc_state_held,
)
from sandbox.handlers import Handler
from sandbox.mounts import unmount
from sandbox.records import (
    CREATED,
    EXITED,
    RUNNING,
    UNKNOWN,
    ContainerRecord,
    ContainerState,
    PodRecord,
    cri_container_state,
)
from sandbox.removals import Leftovers
from sandbox.runtime import Runtime
from sandbox.spec import (
    SandboxPaths,
    SpecDefaults,
    SpecError,
    build_container_spec,
    linux_resources,
    pod_userns,
)
from sandbox.users import UserDb, open_to_group
from sandbox.wire import list_entries, message_field, stream_pages, verbose_info_entry
from shim.client import ExecSyncResult, ProcessState, ShimClient, ShimError, ShimTimeout
from shim.crilog import open_beneath
from shim.runc import RuncError

log = logging.getLogger("flatpod.containers")

CONTAINER_CREATING = ContainerState.CREATING
# ListContainersResponse.containers
LIST_CONTAINERS_FIELD = pb.ListContainersResponse.DESCRIPTOR.fields_by_name["containers"].number
# ContainerStatusResponse.status
STATUS_FIELD = pb.ContainerStatusResponse.DESCRIPTOR.fields_by_name["status"].number
INFO_FIELD = pb.ContainerStatusResponse.DESCRIPTOR.fields_by_name["info"].number
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
    validate.container_in_pod(req.config, pod.config)
    restore = None
    source = checkpoint.restore_source(rt, req.config.image.image)
    if source is not None:  # the image is a checkpoint: restore it (sandbox/checkpoint.py)
        req, image, restore = await checkpoint.prepare_restore(rt, req, source)
        validate.container_in_pod(req.config, pod.config)  # what the checkpoint brought
    else:
        image = rt.images.images.resolve(req.config.image.image)
    if image is None:
        raise NotFound(f"image {req.config.image.image!r} not found; pull it first")
    name = container_name(req.config.metadata, pod)
    try:
        ctr_id = await rt.registry.create_once(
            "container", name, lambda: _create(rt, pod, name, req, image, restore),
            lambda ctr_id: _remove_leftover(rt, rt.registry.container(ctr_id)),
        )
    finally:
        if restore is not None:
            await asyncio.to_thread(shutil.rmtree, restore.dumps, True)
    return pb.CreateContainerResponse(container_id=ctr_id)


async def _create(
    rt: Runtime, pod: PodRecord, name: str, req: pb.CreateContainerRequest, image: Any,
    restore: checkpoint.Restore | None = None,
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
        stop_signal=validate.stop_signal(config, image.config.get("config") or {}),
        resources=config.linux.resources.SerializeToString(),
    )
    # 1. Reserve the name, before touching the host.
    rt.registry.reserve(ctr)
    rt.faults.point("create_container:after_reserve")
    async with rt.locks.hold(ctr.id), undo_on_failure(f"create container {ctr.id}",
                                                      rt.faults) as undo:
        undo.settle(forget=lambda: rt.registry.forget(ctr),
                    keep=lambda left: rt.registry.update(ctr, cleanup_error=left))
        # 2. The bundle: the rootfs (an overlay of the image's snapshots and a writable
        # layer), the OCI spec (it joins the pod's pinned namespaces) and the log file where
        # kubelet reads it. One worker-thread hop for the dirs, the mount, the spec (it reads
        # the rootfs's /etc/passwd), its file and the log file: each hop is a wakeup of a
        # worker and then of the loop, on the answer's path (they were four).
        undo.at("bundle")
        ctr.log_path = _log_path(pod, config)
        bundle = rt.paths.bundle_dir(ctr.id)
        layer = rt.paths.writable_layers / ctr.id
        rootfs = bundle / "rootfs"
        undo.push("dirs", lambda: _remove_dirs(bundle, layer))
        if restore is not None:  # CRIU's images, and the rootfs diff into the upper dir
            await asyncio.to_thread(_make_dirs, bundle, layer, rootfs)
            await checkpoint.unpack_restore(rt, restore, layer)
        undo.push("rootfs", lambda: unmount(rootfs))  # before: a failed hop may have mounted
        ctr.rootfs = str(rootfs)
        ctr.cgroup_path = pod_placement(pod).container_path(ctr.id)
        log_made = _signal_from_thread(asyncio.get_running_loop())
        making = asyncio.ensure_future(asyncio.to_thread(
            _make_bundle, rt, pod, ctr, image, made_dirs=restore is not None,
            write=restore is None, log_made=log_made.set,
        ))
        # 3. The shim holds it; nothing runs yet. StartContainer makes and starts it with one
        # `runc run --detach`, as containerd makes its task at start: `runc create` here and
        # `runc start` there were two runc processes (Go runtime start, state load) on the
        # client's path. A restore is made at start too (`runc restore`). The shim only
        # records such a container (it reads the bundle at start), so it is told while the
        # worker thread mounts the rootfs and writes the spec, once the log file it opens is
        # there: its round trip was ~0.8 ms after the thread's ~2 ms (timestamps, idle host).
        telling: asyncio.Future[int] | None = None
        if restore is None:
            waits: list[asyncio.Future[Any]] = [log_made.future, making]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if log_made.future.done():
                told = telling = asyncio.ensure_future(_tell_shim(rt, pod, ctr, bundle))
                undo.push_after("runc", told, lambda: _untell_shim(rt, pod, ctr, told))
        spec = await making
        rt.faults.point("create_container:after_rootfs")
        if restore is not None:
            await checkpoint.restore_into_own_cgroup(rt, pod, spec, layer, ctr.cgroup_path)
            _write_spec(pod, bundle, spec)
        user = spec["process"]["user"]
        ctr.uid, ctr.gid = int(user.get("uid", 0)), int(user.get("gid", 0))
        ctr.supplemental_groups = [int(g) for g in user.get("additionalGids", [])]
        undo.at("shim create")
        if telling is None:  # a restore: the shim reads its bundle and checkpoint now
            ctr.pid = await _tell_shim(rt, pod, ctr, bundle, restore.shim_request(layer)
                                       if restore is not None else None)
            undo.push("runc", lambda: delete_runc_state(rt, ctr.id))
        else:
            ctr.pid = await telling
        rt.faults.point("create_container:after_shim_create")
        undo.at("created")
        rt.registry.transition(ctr, CREATED)
    publish(rt, ctr, pb.CONTAINER_CREATED_EVENT)
    log.info("container %s (%s) created in pod %s", ctr.id[:12], name, pod.short)
    return ctr.id


async def _tell_shim(rt: Runtime, pod: PodRecord, ctr: ContainerRecord, bundle: Path,
                     restore: dict[str, str] | None = None) -> int:
    """The pod's shim holds the container (made at start: run, or restored); its pid, 0."""
    config = ctr.config
    oom_file, systemd = shim_cgroup_options(pod, ctr.id, rt.host_cgroups)
    return await shim_of(rt, pod.id).create(
        ctr.id, str(bundle), stdin=config.stdin, stdin_once=config.stdin_once,
        tty=config.tty, log_path=ctr.log_path or None,
        log_root=pod.config.log_directory or None,
        exit_file=str(bundle / "exit"), oom_file=oom_file, systemd_cgroup=systemd,
        restore=restore, run_at_start=restore is None,
    )


async def _untell_shim(rt: Runtime, pod: PodRecord, ctr: ContainerRecord,
                       told: asyncio.Future[int]) -> None:
    """Undoes `_tell_shim` for a container that never ran: the kill ends it in the shim at
    once (no runc), closing the log file the shim opened for it."""
    if not told.cancelled() and told.exception() is None:
        await shim_of(rt, pod.id).signal(ctr.id, signal.SIGKILL)
    await delete_runc_state(rt, ctr.id)


@dataclass
class _ThreadSignal:
    """A future that a worker thread completes (through the loop) while it goes on working."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]

    def set(self) -> None:
        self.loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _signal_from_thread(loop: asyncio.AbstractEventLoop) -> _ThreadSignal:
    return _ThreadSignal(loop, loop.create_future())


async def _remove_leftover(rt: Runtime, ctr: ContainerRecord) -> None:
    """Removes a container whose failed creation left a cleanup (its cleanup_error is set)."""
    async with rt.locks.hold(ctr.id):
        await remove_container_now(rt, ctr)


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
    validate.container_config(config)


def _image_name(image: Any, requested: str) -> str:
    tags = list(image.repo_tags)
    for tag in tags:
        if tag.endswith(requested) or requested in tag:
            return str(tag)
    return str(tags[0]) if tags else requested


def _make_bundle(
    rt: Runtime, pod: PodRecord, ctr: ContainerRecord, image: Any, *, made_dirs: bool,
    write: bool, log_made: Callable[[], None],
) -> dict[str, Any]:
    """The container's log file (then `log_made` is called: the shim may open it), its dirs
    (unless `made_dirs`), its rootfs mounted and its spec (written to config.json when
    `write`): blocking, on a worker thread."""
    if ctr.log_path:
        _prepare_log(pod.config.log_directory, ctr.config.log_path)
    log_made()
    bundle = rt.paths.bundle_dir(ctr.id)
    layer = rt.paths.writable_layers / ctr.id
    rootfs = bundle / "rootfs"
    if not made_dirs:
        _make_dirs(bundle, layer, rootfs)
    # In a pod with its own user namespace the layers are idmapped with it, so its root owns
    # what the host's root owns in the image (runc 1.1.5 cannot idmap mounts).
    userns = pod_userns(pod.config.linux.security_context)
    user_ns = Path(pod.namespaces["user"]) if userns is not None else None
    rt.images.snapshots.mount_rootfs(
        ctr.snapshots, layer / "upper", layer / "work", rootfs, False, user_ns,
        userns.root if userns is not None else None,
    )
    spec = _container_spec(rt, pod, ctr, image, rootfs)
    if write:
        _write_spec(pod, bundle, spec)
    return spec


def _write_spec(pod: PodRecord, bundle: Path, spec: dict[str, Any]) -> None:
    (bundle / "config.json").write_text(json.dumps(spec))
    userns = pod_userns(pod.config.linux.security_context)
    if userns is not None:  # runc reaches rootfs/ from inside the user namespace
        os.chmod(bundle / "config.json", 0o600)
        open_to_group(bundle, userns.root[1])


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
    target = _target_pid_ns(rt, pod.id, ctr.config)
    # A container cannot have a network of its own in a flat pod: it is the pod's, whatever
    # the container's options say (kubelet sends the pod's mode; crictl users often don't).
    config = pb.ContainerConfig()
    config.CopyFrom(ctr.config)
    pod_network_mode = pod.config.linux.security_context.namespace_options.network
    config.linux.security_context.namespace_options.network = pod_network_mode
    place = pod_placement(pod)
    try:
        spec = build_container_spec(
            pod.config, config, dict(image.config.get("config") or {}),
            rootfs=rootfs, sandbox=sandbox,
            cgroups_path=place.oci_cgroups_path(ctr.id),
            target_pid_ns=target, rootfs_users=UserDb.from_rootfs(rootfs),
            oom_score_adj_floor=rt.oom_score_adj_floor, defaults=spec_defaults(rt.host_cgroups),
        )
    except SpecError as err:
        raise InvalidArgument(str(err)) from err
    return with_cgroup_annotations(spec, place)


def _target_pid_ns(rt: Runtime, pod_id: str, config: pb.ContainerConfig) -> Path | None:
    opts = config.linux.security_context.namespace_options
    if opts.pid != pb.TARGET:
        return None
    target = rt.find_container(opts.target_id)
    if target is not None:
        validate.target_in_pod(opts.target_id, target.pod_id, pod_id)
    if target is None or target.state != RUNNING or not target.pid:
        raise NotFound(f"target container {opts.target_id!r} for the PID namespace is not running")
    return Path(f"/proc/{target.pid}/ns/pid")


def _prepare_log(log_directory: str, log_path: str) -> None:
    """Makes the log file (and its directories) beneath the pod's log directory as the shim
    will open it, following no symlink: a link planted there is the request's fault."""
    os.makedirs(log_directory, exist_ok=True)
    try:
        os.close(open_beneath(log_directory, log_path))
    except OSError as err:
        raise InvalidArgument(f"log_path: {err.strerror or err}") from err


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


def pod_placement(pod: PodRecord) -> cgroups.Placement:
    """Where the pod's cgroups are, by the driver it was made with."""
    return cgroups.Placement(pod_path=pod.cgroup_path, slice=pod.cgroup_slice)


def with_cgroup_annotations(spec: dict[str, Any], place: cgroups.Placement) -> dict[str, Any]:
    """The spec with the annotations its runtime needs for `place` (crun's systemd
    subgroup): the spec builders know no driver, only the `cgroupsPath` they are given."""
    annotations = place.oci_annotations()
    if annotations:
        spec["annotations"] = {**spec.get("annotations", {}), **annotations}
    return spec


def shim_cgroup_options(
    pod: PodRecord, container_id: str, host: cgroups.HostCgroups
) -> tuple[str | None, bool]:
    """What the shim needs of the cgroup of a container (or the pause) of `pod`: the file
    that counts its OOM kills (None: no memory controller), and whether runc makes it as a
    systemd scope. Reads nothing: the host's hierarchies were read at start."""
    place = pod_placement(pod)
    try:
        path = place.container_path(container_id)
        oom_file: str | None = str(cgroups.oom_events_file(path, host.hierarchies))
    except cgroups.CgroupError:
        oom_file = None
    return oom_file, place.driver is cgroups.Driver.SYSTEMD


def spec_defaults(host: cgroups.HostCgroups) -> SpecDefaults:
    """The node-level spec defaults that depend on the host's cgroups."""
    pure_v2 = host.unified_only
    # runc places hugetlb limits on v1's hugetlb hierarchy, or on pure v2; not on a hybrid
    # host's v2 mount.
    owner = cgroups.owner("hugetlb", host.hierarchies)
    return SpecDefaults(
        cgroup_v2=pure_v2,
        hugetlb_available=owner is not None and (owner.version == 1 or pure_v2),
        apparmor_profiles=apparmor.profiles_file_if_enabled(),
    )


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
        with Steps(f"start container {ctr.id}") as where:
            where.at("runc start")
            rt.faults.point("start_container:before_runc_start")
            try:
                view = await shim_of(rt, pod.id).start(ctr.id)
            except ShimError as err:
                rt.registry.transition(
                    ctr, EXITED, reason="StartError", message=str(err), exit_code=128,
                    finished_at=time.time_ns(),
                )
                raise FailedPrecondition(describe(err)) from err
            rt.faults.point("start_container:after_runc_start")
            changes: dict[str, object] = {"started_at": started_at}
            if not ctr.pid:  # made at start (runc run, or a restore): its process is new
                changes["pid"] = view.pid
                if (rt.paths.writable_layers / ctr.id / checkpoint.CHECKPOINT_DIR).is_dir():
                    where.at("checkpoint images")
                    await asyncio.to_thread(checkpoint.discard_images, rt, ctr)
            # Its exit may already have been reported: then it stays exited.
            where.at("record")
            state = RUNNING if ctr.state == CREATED else ctr.state
            rt.registry.transition(ctr, state, **changes)
    publish(rt, ctr, pb.CONTAINER_STARTED_EVENT)
    asyncio.get_running_loop().call_soon(keep_status, rt, ctr)
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
    with Steps(f"stop container {ctr.id}") as where:
        try:
            if timeout > 0 and ctr.state == RUNNING:
                where.at("stop signal")
                await shim.signal(ctr.id, _stop_signal(ctr))
                view = await _wait(shim, ctr.id, timeout)
                if view is not None:
                    await apply_exit(rt, ctr, view)
                    return
            where.at("SIGKILL")
            await shim.signal(ctr.id, signal.SIGKILL, all=True)
            view = await _wait(shim, ctr.id, KILL_WAIT)
            if view is None:
                raise DeadlineExceeded(f"it did not exit {KILL_WAIT}s after SIGKILL")
            await apply_exit(rt, ctr, view)
        except ShimError as err:
            view = await _shim_view(shim, ctr.id)
            if view is not None and view.exited:
                await apply_exit(rt, ctr, view)
                return
            raise FailedPrecondition(describe(err)) from err


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
    # Validated at CreateContainer; a record from before that check may still name none.
    return validate.parse_signal(ctr.stop_signal) or int(signal.SIGTERM)


# --- exits, from the shim --------------------------------------------------------------------


# --- RemoveContainer -------------------------------------------------------------------------


async def remove_container(
    rt: Runtime, req: pb.RemoveContainerRequest
) -> pb.RemoveContainerResponse:
    """Answers once the container is stopped, gone from every list and its name free; its
    host traces are cleaned after the answer, journalled (sandbox/removals.py)."""
    ctr = rt.find_container(req.container_id)
    if ctr is None:
        return pb.RemoveContainerResponse()
    async with rt.locks.hold(ctr.id):
        if rt.containers.get(ctr.id) is ctr:  # else a concurrent Remove got there first
            await remove_container_later(rt, ctr)
    return pb.RemoveContainerResponse()


async def remove_container_later(rt: Runtime, ctr: ContainerRecord) -> None:
    """Stops the container and deletes its record; its host traces are cleaned after,
    journalled (RemoveContainer, and RemovePodSandbox for the pod's containers)."""
    leftovers = await _retire(rt, ctr)
    rt.removals.start(leftovers, _clean_up(rt, leftovers))


async def remove_container_now(rt: Runtime, ctr: ContainerRecord) -> None:
    """Forcibly stops, then removes every trace: record, runc state, rootfs, cgroup, dirs
    (recovery, which waits for all of it)."""
    await _clean_up(rt, await _retire(rt, ctr))


async def _retire(rt: Runtime, ctr: ContainerRecord) -> Leftovers:
    """Stops the container and deletes its record, journalling what it left on the host."""
    await stop_container_now(rt, ctr, timeout=0)
    handler = rt.handlers.of_pod(rt.pods.get(ctr.pod_id))
    leftovers = Leftovers(ctr.id, ctr.pod_id, ctr.cgroup_path, tuple(ctr.snapshots),
                          handler.name)
    rt.registry.forget(ctr, leftovers.doc())
    publish(rt, ctr, pb.CONTAINER_DELETED_EVENT)
    log.info("container %s removed", ctr.id[:12])
    return leftovers


async def _clean_up(rt: Runtime, leftovers: Leftovers) -> None:
    """Deletes what a removed container left on the host, then its journal entry: one
    thread hop for all of it, so the event loop is woken once."""
    rt.faults.point("remove_container:before_cleanup")
    if leftovers.handler:
        handler = rt.handlers.named(leftovers.handler, leftovers.what)
    else:  # journalled before the handler was: its pod's record is still there
        handler = rt.handlers.of_pod(rt.pods.get(leftovers.pod_id))
    async with runc_state_held(rt, leftovers.container_id):
        await asyncio.to_thread(_clean_host, rt, handler, leftovers)


def _clean_host(rt: Runtime, handler: Handler, leftovers: Leftovers) -> None:
    ctr_id = leftovers.container_id
    forget_runc_state(handler, ctr_id)
    bundle = rt.paths.bundle_dir(ctr_id)
    unmount(bundle / "rootfs")
    cgroup = leftovers.cgroup_path
    if cgroup and not cgroups.systemd_owned(cgroup):  # runc stops scopes
        cgroups.remove(cgroup, rt.host_cgroups.hierarchies)
    _remove_dirs(bundle, rt.paths.writable_layers / ctr_id)
    rt.store.end_operation(ctr_id)


async def finish_removal(rt: Runtime, container_id: str, doc: dict[str, Any]) -> None:
    """Startup: cleans what a removal journalled and a crash left (sandbox/recovery.py).
    A failure is logged and its entry kept, for the next start to try again."""
    try:
        await _clean_up(rt, Leftovers.from_doc(container_id, doc))
    except (OSError, RuncError, cgroups.CgroupError) as err:
        log.warning("cleaning up after removed container %s failed: %s", container_id[:12], err)


# --- ContainerStatus and ListContainers -------------------------------------------------------


def container_status(rt: Runtime, req: pb.ContainerStatusRequest) -> bytes:
    """The record's kept status bytes, and verbose (critest's, crictl inspect's) its kept
    info entry (sandbox/wire.py)."""
    ctr = rt.registry.visible_container(req.container_id)
    answer = message_field(STATUS_FIELD, status_bytes(rt, ctr))
    if not req.verbose:
        return answer
    return answer + verbose_info(ctr)


def verbose_info(ctr: ContainerRecord) -> bytes:
    """The verbose answer's `info` entry, built once per change of the record (a save
    empties it too)."""
    if not ctr.verbose_info:
        ctr.verbose_info = verbose_info_entry(INFO_FIELD, {
            "pid": ctr.pid, "sandboxID": ctr.pod_id, "rootfs": ctr.rootfs,
            "snapshots": ctr.snapshots, "cgroup": ctr.cgroup_path,
        }, ctr.config)
    return ctr.verbose_info


def keep_status(rt: Runtime, ctr: ContainerRecord) -> None:
    """Builds the status answer's parts ahead of the lookup (kubelet and critest ask
    ContainerStatus right after StartContainer): building them took the first lookup from
    ~0.85 to ~1.4 ms. Called soon after the call returns, so its answer does not wait."""
    status_bytes(rt, ctr)
    verbose_info(ctr)


def status_bytes(rt: Runtime, ctr: ContainerRecord) -> bytes:
    """The container's ContainerStatus, serialized once per change of its record (a save
    empties it, as it does the list entry)."""
    if not ctr.status_bytes:
        ctr.status_bytes = container_status_message(rt, ctr).SerializeToString()
    return ctr.status_bytes


def container_status_message(rt: Runtime, ctr: ContainerRecord) -> pb.ContainerStatus:
    config = ctr.config
    resources = pb.LinuxContainerResources.FromString(ctr.resources)
    return pb.ContainerStatus(
        id=ctr.id,
        metadata=config.metadata,
        state=cri_container_state(ctr.state),
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


def list_containers(rt: Runtime, req: pb.ListContainersRequest) -> bytes:
    """A ListContainersResponse, assembled from each container's cached entry (sandbox/wire.py).
    Unfiltered, as kubelet's relist asks every second, the whole answer is cached too."""
    return rt.list_answer(
        "containers", rt.registry.containers, req.filter,
        lambda: b"".join(_entries(rt, req.filter)),
    )


def stream_containers(
    rt: Runtime, req: pb.StreamContainersRequest
) -> AsyncIterator[bytes]:
    """StreamContainersResponse messages: the entries ListContainers answers with, in pages
    (`containers` is field 1 in both responses)."""
    return stream_pages(_entries(rt, req.filter))


def _entries(rt: Runtime, flt: pb.ContainerFilter) -> list[bytes]:
    want_state = flt.state.state if flt.HasField("state") else None
    matching = rt.registry.containers_matching(
        flt.id, flt.pod_sandbox_id, flt.label_selector, want_state
    )
    return list_entries(matching, LIST_CONTAINERS_FIELD, _summary)


def _summary(ctr: ContainerRecord) -> pb.Container:
    config = ctr.config
    return pb.Container(
        id=ctr.id,
        pod_sandbox_id=ctr.pod_id,
        metadata=config.metadata,
        image=pb.ImageSpec(image=ctr.image_name or ctr.image_ref),
        image_ref=ctr.image_id,
        image_id=ctr.image_id,
        state=cri_container_state(ctr.state),
        created_at=ctr.created_at,
        labels=config.labels,
        annotations=config.annotations,
    )


# --- ExecSync, ReopenContainerLog, UpdateContainerResources -----------------------------------


async def exec_sync(rt: Runtime, req: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
    ctr = running_container(rt, req.container_id)
    validate.exec_command(req.cmd)
    process = exec_process(rt, ctr, list(req.cmd), tty=False)
    shim = shim_of(rt, ctr.pod_id)
    timeout = float(req.timeout) if req.timeout > 0 else None
    result = await exec_sync_in(shim, ctr.id, process, timeout)
    if result.timed_out:
        lingering = "" if result.tree_gone else "; some of its processes were not dead yet"
        raise DeadlineExceeded(
            f"command {list(req.cmd)[:8]!r} in container {ctr.id} timed out after "
            f"{req.timeout}s and was killed{lingering}"
        )
    return pb.ExecSyncResponse(
        stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
    )


async def exec_sync_in(shim: ShimClient, ctr_id: str, process: dict[str, Any],
                       timeout: float | None) -> ExecSyncResult:
    """The shim's exec_sync. A container that exits after the state check but before the
    shim starts the command (a probe racing an exit flatpod has not applied yet) is
    FAILED_PRECONDITION, the answer it gets once the exit is known, not an internal error."""
    try:
        return await shim.exec_sync(ctr_id, process, timeout)
    except ShimError as err:
        view = await _shim_view(shim, ctr_id)
        if view is not None and view.exited:
            raise FailedPrecondition(
                f"container {ctr_id} exited before the command started: {err}") from err
        raise


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
    validate.resources(req.linux, "linux")
    async with rt.locks.hold(ctr.id):
        try:
            if ctr.state == CREATED and not ctr.pid:  # made at start: nothing runs yet
                await asyncio.to_thread(_respec_resources, rt, ctr, req.linux)
            else:
                await asyncio.to_thread(_apply_resources, rt, ctr, req.linux)
        except cgroups.CgroupError as err:
            raise InvalidArgument(f"container {ctr.id} resources: {err}") from err
        except (OSError, RuncError) as err:  # e.g. a memory limit below what it uses now
            raise FailedPrecondition(f"updating container {ctr.id} cgroup: {err}") from err
        rt.registry.update(ctr, resources=req.linux.SerializeToString())
    return pb.UpdateContainerResourcesResponse()


def _respec_resources(
    rt: Runtime, ctr: ContainerRecord, linux: pb.LinuxContainerResources
) -> None:
    """A container made at start has no cgroup yet (kubelet's CPU manager sets a cpuset
    between create and start): its spec takes the new settings, as containerd updates the
    spec of a container without a task. Each setting given replaces the spec's; the rest
    (devices, and what the update leaves out) stays."""
    path = rt.paths.bundle_dir(ctr.id) / "config.json"
    spec = json.loads(path.read_bytes())
    resources = spec.setdefault("linux", {}).setdefault("resources", {})
    try:
        update = linux_resources(linux, spec_defaults(rt.host_cgroups))
    except SpecError as err:
        raise InvalidArgument(str(err)) from err
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(resources.get(key), dict):
            resources[key].update(value)
        else:
            resources[key] = value
    staged = path.with_name(path.name + ".new")
    staged.write_text(json.dumps(spec))
    os.chmod(staged, path.stat().st_mode & 0o777)
    os.replace(staged, path)


def _apply_resources(rt: Runtime, ctr: ContainerRecord, linux: pb.LinuxContainerResources) -> None:
    """cgroupfs: flatpod writes the files itself. systemd: the scope's limits are properties
    of its unit, so `runc update` asks systemd to change them (and writes what systemd has no
    property for), as containerd does."""
    if not cgroups.systemd_owned(ctr.cgroup_path):
        hs = rt.host_cgroups.hierarchies
        cgroups.update(ctr.cgroup_path, cgroups.Resources.from_cri(linux), hs)
        return
    resources = linux_resources(linux, spec_defaults(rt.host_cgroups))
    handler = rt.handlers.of_pod(rt.registry.pods.get(ctr.pod_id))
    handler.runc(systemd_cgroup=True).update(ctr.id, resources)

