"""Container and pod removals the client does not wait for.

RemoveContainer answers once the container is gone from every list and its name is free
(the record's delete, one transaction that also journals what is left on the host). Its
runc state, rootfs mount, cgroup, bundle and writable layer are cleaned after the answer;
until then the journal entry (store `operations`, kind "remove_container") names them, so
a crash loses nothing: startup finishes the cleanup (sandbox/recovery.py).

RemovePodSandbox does the same (kind "remove_pod"): it answers once the pod is stopped (its
network, ip lease, host ports and netns gone), its containers removed as RemoveContainer
removes them and its record deleted; its containers' host traces, then its shim, pinned
namespaces, mounts, cgroup and dirs are cleaned after the answer.
Each of those is named by the pod's id, which a new pod never has, so a new pod of the same
name cannot share one (kubelet's cgroup_parent and slice are never removed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flatpod.removals")


@dataclass(frozen=True)
class Leftovers:
    """What a removed container may still have on the host, as journalled."""

    container_id: str
    pod_id: str
    cgroup_path: str = ""
    snapshots: tuple[str, ...] = ()  # still mounted as lower dirs until the rootfs is gone
    # The runtime handler whose root holds its runc state: the pod's record, which names
    # it, may be deleted before this cleanup runs (RemovePodSandbox does not wait for it).
    handler: str = ""

    @property
    def key(self) -> str:
        return self.container_id

    @property
    def what(self) -> str:
        return f"container {self.container_id[:12]}"

    def doc(self) -> dict[str, object]:
        return {"pod_id": self.pod_id, "cgroup_path": self.cgroup_path,
                "snapshots": list(self.snapshots), "handler": self.handler}

    @classmethod
    def from_doc(cls, container_id: str, doc: dict[str, Any]) -> Leftovers:
        return cls(container_id, str(doc.get("pod_id", "")), str(doc.get("cgroup_path", "")),
                   tuple(map(str, doc.get("snapshots") or ())), str(doc.get("handler", "")))


@dataclass(frozen=True)
class PodLeftovers:
    """What a removed pod may still have on the host, as journalled: its shim, and what its
    id names (dirs, mounts, pins) or its record did (cgroup or own slice, namespace pins)."""

    pod_id: str
    cgroup_path: str = ""
    cgroup_slice: str = ""
    namespaces: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.pod_id

    @property
    def what(self) -> str:
        return f"pod {self.pod_id[:12]}"

    def doc(self) -> dict[str, object]:
        return {"cgroup_path": self.cgroup_path, "cgroup_slice": self.cgroup_slice,
                "namespaces": list(self.namespaces)}

    @classmethod
    def from_doc(cls, pod_id: str, doc: dict[str, Any]) -> PodLeftovers:
        return cls(pod_id, str(doc.get("cgroup_path", "")), str(doc.get("cgroup_slice", "")),
                   tuple(map(str, doc.get("namespaces") or ())))


@dataclass
class Removals:
    """The cleanups in flight, by container or pod id."""

    pending: dict[str, tuple[Leftovers | PodLeftovers, asyncio.Task[None]]] = field(
        default_factory=dict)

    def start(self, leftovers: Leftovers | PodLeftovers,
              cleanup: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(cleanup)
        self.pending[leftovers.key] = (leftovers, task)
        task.add_done_callback(lambda t: self._done(leftovers, t))

    def _done(self, leftovers: Leftovers | PodLeftovers, task: asyncio.Task[None]) -> None:
        self.pending.pop(leftovers.key, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cleaning up after %s failed (the next start retries): %s",
                        leftovers.what, task.exception())

    async def of_pod(self, pod_id: str) -> None:
        """Waits for the cleanups of the pod's removed containers (a pod is removed after
        them: their cgroups are below its own)."""
        tasks = [task for left, task in self.pending.values()
                 if isinstance(left, Leftovers) and left.pod_id == pod_id]
        if tasks:  # wait, not gather: a cancelled caller must not cancel them
            await asyncio.wait(tasks)

    async def drain(self, timeout: float) -> None:
        """Waits up to `timeout` for every cleanup (the daemon stopping: what is left is
        finished by the next start, from the journal)."""
        tasks = [task for _, task in self.pending.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def snapshots(self) -> set[str]:
        """Snapshots still mounted under a removed container's rootfs."""
        return {s for left, _ in self.pending.values() if isinstance(left, Leftovers)
                for s in left.snapshots}
