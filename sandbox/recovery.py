"""Startup: make the store agree with the host again.

flatpod may have stopped cleanly, been killed in the middle of an RPC, or the node may have
rebooted (the state dir is empty then). For each record this module asks the one who knows:
- the pod's shim, for its containers' states (it outlived us, or it did not);
- the exit file the shim wrote atomically, for containers that exited while we were away;
- the operations journal, for objects a crash left half made: those are cleaned away, so
  kubelet's retry of the same request starts from nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from sandbox import containers, exits, pods
from sandbox.records import (
    CREATED,
    EXITED,
    REMOVE_CONTAINER,
    REMOVE_POD,
    RUNNING,
    SANDBOX_READY,
    ContainerRecord,
    PodRecord,
)
from sandbox.runtime import Runtime
from shim.client import ProcessState, ShimState

log = logging.getLogger("flatpod.recovery")


# Pods recovered at once: each waits mostly on its shim's answers, so a node's pods are
# reconnected side by side (restart to first RPC, hack/bench --only restart); bounded so
# that a node of hundreds of pods does not open hundreds of sockets at once.
RECOVERY_CONCURRENCY = 32


async def recover(rt: Runtime) -> None:
    # The shared state dirs' ACL names the user-namespace pods that have records, no more
    # (a crash may have left a removed pod's entry) and no less (startup chmods them 0700).
    pods.share_state_dirs(rt)
    log.info("recovering %d pods and %d containers", len(rt.pods), len(rt.containers))
    await _finish_interrupted(rt)
    slots = asyncio.Semaphore(RECOVERY_CONCURRENCY)

    async def recover_in_slot(pod: PodRecord) -> None:
        async with slots:
            await _recover_pod(rt, pod)

    await asyncio.gather(*(recover_in_slot(pod) for pod in list(rt.pods.values())))
    orphans = [c for c in rt.containers.values() if c.pod_id not in rt.pods]
    for ctr in orphans:
        await containers.remove_container_now(rt, ctr)
    await rt.shims.remove_stray_pod_dirs(rt.pods.keys())
    log.info(
        "recovered %d pods and %d containers (%d running)",
        len(rt.pods), len(rt.containers),
        sum(1 for c in rt.containers.values() if c.state == RUNNING),
    )


async def _recover_pod(rt: Runtime, pod: PodRecord) -> None:
    """Reconnects the pod's shim and asks it (or the exit files) about its processes: one
    `state` answer holds them all (a call per process made four round trips per pod)."""
    if not rt.handlers.is_configured(pod):
        log.warning(
            "pod %s: its runtime handler %r is no longer configured; its shim keeps the "
            "runtime it started with, and the pod can still be stopped and removed",
            pod.short, pod.runtime_handler,
        )
    reconnected = await rt.shims.reconnect(pod.id, rt.paths.pod_dir(pod.id))
    view = reconnected[1] if reconnected is not None else None
    if view is None and pod.state == SANDBOX_READY:
        await exits.on_pause_exit(rt, pod)
    for ctr in rt.containers_of(pod.id):
        await _reconcile_container(rt, ctr, view)
    if view is not None:
        await _reconcile_pause(rt, pod.id, view)


async def _finish_interrupted(rt: Runtime) -> None:
    """Objects whose creation a crash interrupted, or whose failed creation could not be
    undone (their cleanup_error is set), are removed, with whatever they touched."""
    for op_id, kind, target, doc in rt.store.operations():
        log.warning("cleaning up after interrupted %s of %s", kind, target)
        pod = rt.pods.get(target)
        if kind == "run_pod" and pod is not None:
            await pods.remove_leftover(rt, pod)
        elif kind == REMOVE_CONTAINER:  # removed, but its host traces not yet all cleaned
            await containers.finish_removal(rt, target, doc)
            continue  # its entry ends with the cleanup, and stays if that failed
        elif kind == REMOVE_POD:  # the same for a pod (after its containers': rowid order)
            await pods.finish_removal(rt, target, doc)
            continue
        rt.store.end_operation(op_id)
    # A crash between reserving the name and journalling the operation leaves a record only.
    for pod in rt.registry.unfinished_pods():
        await pods.remove_leftover(rt, pod)
    for ctr in rt.registry.unfinished_containers():
        await containers.remove_container_now(rt, ctr)


async def _reconcile_container(
    rt: Runtime, ctr: ContainerRecord, shim_view: ShimState | None
) -> None:
    if ctr.state == EXITED:
        return
    view = shim_view.of(ctr.id) if shim_view is not None else None
    if view is None:
        view = _exit_file(rt, ctr)
    if view is None:
        # Neither the shim nor an exit file knows it: the node rebooted, or the shim died
        # before the process exited. Report it exited so kubelet makes a new one.
        exits.record_exit(
            rt, ctr, ProcessState("exited", exit_code=255), reason="Unknown",
            message="the container's shim is gone; its exit status is unknown",
        )
        return
    if view.exited:
        await exits.apply_exit(rt, ctr, view)
    elif view.status == "running" and ctr.state == CREATED:
        # Started, but the daemon died before it recorded so (StartContainer after `runc
        # start`): the shim reports "created" until start, so "running" means it started.
        rt.registry.transition(ctr, RUNNING, started_at=ctr.started_at or time.time_ns())


async def _reconcile_pause(rt: Runtime, pod_id: str, shim_view: ShimState) -> None:
    view = shim_view.of(pod_id) or ProcessState("exited")
    pod = rt.pods.get(pod_id)
    if pod is not None and view.exited:
        await exits.on_pause_exit(rt, pod)


def _exit_file(rt: Runtime, ctr: ContainerRecord) -> ProcessState | None:
    path = Path(rt.paths.bundle_dir(ctr.id)) / "exit"
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ProcessState.from_message("exit file", {**record, "status": "exited"})
