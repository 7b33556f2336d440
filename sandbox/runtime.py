"""The daemon's state: configuration, store, in-memory indexes, locks and subsystems.

One `Runtime` lives for the life of `flatpod serve`; every RPC function takes it as its first
argument. It holds no behaviour of its own: the records and their rules are the registry's
(sandbox/registry.py), so each RPC family's module reads top to bottom as the steps of its RPCs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sized
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from sandbox.cgroups import HostCgroups
from sandbox.config import Config
from sandbox.faults import Faults
from sandbox.handlers import RuntimeHandlers
from sandbox.records import ContainerRecord, PodRecord
from sandbox.registry import Registry
from sandbox.removals import Removals
from sandbox.store import Store
from sandbox.wire import AnswerCache

if TYPE_CHECKING:  # attached by the daemon; this module imports none of them at run time
    from netns.network import PodNetwork
    from sandbox.events import EventHub
    from sandbox.images.service import ImageService
    from sandbox.shims import ShimRegistry
    from sandbox.streaming.server import StreamingServer

log = logging.getLogger("flatpod.runtime")


@dataclass(frozen=True)
class Paths:
    """Where everything lives on disk (see ARCHITECTURE.md, "On disk")."""

    root: Path
    state: Path

    @classmethod
    def from_config(cls, config: Config) -> Paths:
        return cls(Path(config.root_dir), Path(config.state_dir))

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def writable_layers(self) -> Path:
        """Containers' upper and work dirs: they hold data, so they survive reboots."""
        return self.root / "containers"

    @property
    def pods(self) -> Path:
        return self.state / "pods"

    @property
    def bundles(self) -> Path:
        return self.state / "containers"

    @property
    def pause_rootfs(self) -> Path:
        return self.state / "pause-rootfs"

    def pod_dir(self, pod_id: str) -> Path:
        return self.pods / pod_id

    def bundle_dir(self, container_id: str) -> Path:
        return self.bundles / container_id

    def create_dirs(self) -> None:
        for path in (self.root, self.state, self.writable_layers, self.pods, self.bundles):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)


class KeyedLocks:
    """One asyncio lock per key (a pod or container id), dropped when nobody holds it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Runtime:
    config: Config
    store: Store
    paths: Paths
    # The pods and containers, and every rule about them.
    registry: Registry = field(init=False)
    # Unfiltered ListPodSandbox / ListContainers answers (see list_answer).
    answers: AnswerCache = field(default_factory=AnswerCache)
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # Test-only crash and failure points (sandbox/faults.py); empty unless FLATPOD_CRASH_AT
    # or FLATPOD_FAIL_AT was set.
    faults: Faults = field(default_factory=Faults)
    # restrict_oom_score_adj: without CAP_SYS_RESOURCE nothing may go below our own value.
    oom_score_adj_floor: int = -1000
    network_kind: str = ""
    # The node's cgroup hierarchies, read once at start (sandbox/cgroups.py HostCgroups).
    host_cgroups: HostCgroups = field(default_factory=HostCgroups.read)
    # Subsystems, attached by the daemon at start (see daemon.py): they import this module.
    images: ImageService = field(init=False)
    network: PodNetwork = field(init=False)
    shims: ShimRegistry = field(init=False)
    streaming: StreamingServer = field(init=False)
    events: EventHub = field(init=False)
    started_at: float = 0.0
    # Work that follows an event but that no RPC waits for (held so it is not collected).
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Removed containers whose host traces are still being cleaned (sandbox/removals.py).
    removals: Removals = field(default_factory=Removals)

    def __post_init__(self) -> None:
        self.registry = Registry(self.store)

    @property
    def pods(self) -> dict[str, PodRecord]:
        """Every pod by id, also those being created (see registry.visible_pod)."""
        return self.registry.pods

    @property
    def containers(self) -> dict[str, ContainerRecord]:
        return self.registry.containers

    def in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background work failed: %s", task.exception())

    @functools.cached_property
    def version(self) -> str:
        """flatpod's version, read once: importlib.metadata scans the install for it, which
        took ~0.5 ms of every Version call."""
        from sandbox.info import flatpod_version

        return flatpod_version()

    @functools.cached_property
    def handlers(self) -> RuntimeHandlers:
        """The configured runtime handlers (sandbox/handlers.py)."""
        return RuntimeHandlers.from_config(self.config)

    # --- lookups shared by every RPC family (the registry's, here for brevity) ----------

    def pod(self, ref: str) -> PodRecord:
        return self.registry.pod(ref)

    def container(self, ref: str) -> ContainerRecord:
        return self.registry.container(ref)

    def find_pod(self, ref: str) -> PodRecord | None:
        return self.registry.find_pod(ref)

    def find_container(self, ref: str) -> ContainerRecord | None:
        return self.registry.find_container(ref)

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return self.registry.containers_of(pod_id)

    def list_answer(
        self, name: str, index: Sized, flt: Message, build: Callable[[], bytes]
    ) -> bytes:
        """A list answer of `index` (self.pods or self.containers): built for a filtered
        request, kept whole for kubelet's unfiltered relist.

        Every change to a record is saved to the store, which is also what empties the
        record's cached list entry, and records join or leave the index together with their
        insert or delete in the store. So the store's commit count changes whenever an answer
        could; the index's identity and size are there for an index changed without it.
        """
        if flt.ByteSize():
            return build()
        return self.answers.get(name, (self.store.commits, id(index), len(index)), build)

