"""Processes that ended: a container's exit, the pause's, a shim's death; and runc's leftovers.

The shims report these (sandbox/shims.py) and recovery finds them at startup; stopping and
removing a pod or a container end in them too. Both pods.py and containers.py use this
module and it uses neither, so neither needs the other for an exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager

from cri_api import api_pb2 as pb
from sandbox.handlers import Handler
from sandbox.records import ContainerRecord, ContainerState, PodRecord, PodState, PodStop
from sandbox.runtime import Runtime
from sandbox.shims import rfc3339_to_ns
from shim.client import ProcessState
from shim.runc import RuncError

log = logging.getLogger("flatpod.exits")

# How long after a container's exit its runc state is deleted in the background (see
# _delete_runc_state_later): a removal that comes first deletes it after its answer.
RUNC_DELETE_DELAY = 1.0


async def on_exit(rt: Runtime, pod_id: str, event: ProcessState) -> None:
    """The shim saw a process of this pod exit."""
    ctr_id = event.container_id
    if ctr_id == pod_id:
        pod = rt.pods.get(pod_id)
        if pod is not None:
            await on_pause_exit(rt, pod)
        return
    ctr = rt.containers.get(ctr_id)
    if ctr is not None:
        await apply_exit(rt, ctr, event)


async def on_pause_exit(rt: Runtime, pod: PodRecord) -> None:
    """The pause died (killed, OOM, or by a stop): the pod can no longer hold containers.
    Only a death no stop asked for is a warning."""
    if pod.state == PodState.READY:
        if pod.stop is not PodStop.NONE:
            log.debug("pause of pod %s exited (stopping)", pod.short)
        else:
            log.warning("pause of pod %s exited; the pod is not ready", pod.short)
        rt.registry.transition(pod, PodState.NOTREADY)


async def apply_exit(rt: Runtime, ctr: ContainerRecord, view: ProcessState) -> None:
    if ctr.state == ContainerState.EXITED:
        return
    reason = "OOMKilled" if view.oom_killed else ""
    record_exit(rt, ctr, view, reason)


def record_exit(
    rt: Runtime, ctr: ContainerRecord, view: ProcessState, reason: str, message: str = ""
) -> None:
    code = view.exit_code
    finished_at = rfc3339_to_ns(view.exited_at) or time.time_ns()
    started_at = ctr.started_at
    if not started_at:
        started_at = finished_at if ctr.state == ContainerState.RUNNING else 0
    rt.registry.transition(
        ctr, ContainerState.EXITED, exit_code=code, finished_at=finished_at,
        started_at=started_at, reason=reason or ("Completed" if code == 0 else "Error"),
        message=message,
    )
    publish(rt, ctr, pb.CONTAINER_STOPPED_EVENT)
    # The process is gone and reaped: runc's record of it is only work left for Remove.
    rt.in_background(_delete_runc_state_later(rt, ctr.id))


async def _delete_runc_state_later(rt: Runtime, container_id: str) -> None:
    """`runc delete` a while after the exit, unless a removal did it first. Why not at once:
    a RemoveContainer often follows a StopContainer straight away (critest, crictl rm -f),
    and a runc process started as the stop answers (~15 ms of CPU) ran beside it and
    doubled its time; the removal's own cleanup, after its answer, deletes the state then."""
    await asyncio.sleep(RUNC_DELETE_DELAY)
    await delete_runc_state(rt, container_id)


def on_shim_lost(rt: Runtime, pod_id: str) -> None:
    """The pod's shim died (killed, OOM): nobody reaps, logs or reports its containers any
    more, so they are UNKNOWN (kubelet then stops them, and a stop kills them through runc)
    and the pod is NOTREADY (kubelet makes a new one)."""
    log.warning("shim of pod %s is gone; its containers are unknown", pod_id[:12])
    for ctr in rt.containers_of(pod_id):
        if ctr.state in (ContainerState.CREATED, ContainerState.RUNNING):
            rt.registry.transition(
                ctr, ContainerState.UNKNOWN, reason="ShimLost",
                message="the pod's shim died; the container's state is unknown",
            )
    pod = rt.pods.get(pod_id)
    if pod is not None and pod.state == PodState.READY:
        rt.registry.transition(pod, PodState.NOTREADY)


async def delete_runc_state(rt: Runtime, container_id: str) -> None:
    """Forgets runc's record of a container (the pause too); nothing to do when it has none.

    Spawning runc costs milliseconds, so its state dir is looked at first: containers that
    exited on their own had it deleted in the background already (see record_exit).
    """
    ctr = rt.containers.get(container_id)  # else the pause, whose id is its pod's
    handler = rt.handlers.of_pod(rt.pods.get(ctr.pod_id if ctr else container_id))
    async with runc_state_held(rt, container_id):
        if (handler.root / container_id).exists():
            await asyncio.to_thread(forget_runc_state, handler, container_id)


def runc_state_held(rt: Runtime, container_id: str) -> AbstractAsyncContextManager[None]:
    """Held while runc's record of a container is deleted: an exit's background delete and
    the removal's cleanup, back to back in a pod's stop and removal, each looked before the
    other's `runc delete` had finished, and ran their own (an exec of ~15 ms of CPU)."""
    return rt.locks.hold(f"runc-state:{container_id}")


def forget_runc_state(handler: Handler, container_id: str) -> None:
    """`runc delete --force` of the container if runc has a record of it (blocking)."""
    if not (handler.root / container_id).exists():
        return
    try:
        handler.runc().delete(container_id, True)
    except RuncError as err:
        if not err.not_found:
            raise


def publish(rt: Runtime, ctr: ContainerRecord, kind: int) -> None:
    """Tells GetContainerEvents' subscribers (sandbox/events.py) what became of `ctr`."""
    rt.events.publish(rt, ctr, kind)
