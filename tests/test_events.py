"""GetContainerEvents: every subscriber sees every lifecycle event, in order, and a subscriber
that does not read never holds the runtime up (it is dropped, so kubelet relists)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox.config import Config
from sandbox.errors import Unavailable
from sandbox.events import EventHub, get_container_events
from sandbox.records import RUNNING, ContainerRecord, PodRecord
from sandbox.runtime import Paths, Runtime
from tests.cri import CriClient
from tests.daemon import Daemon
from tests.pods import container_config, pod_config, run_pod, start_container
from tests.support.plugin import TestImages

SLEEP = ["sleep", "1000"]
LIFECYCLE = [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT, pb.CONTAINER_STOPPED_EVENT,
             pb.CONTAINER_DELETED_EVENT]


class Reader:
    """A thread that reads GetContainerEvents into a queue, as kubelet's evented PLEG does."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = daemon.client()
        self.call = self.client.runtime.GetContainerEvents(pb.GetEventsRequest())
        self.events: queue.Queue[pb.ContainerEventResponse] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as err:
            self.error = err

    def kinds_for(self, ctr_id: str, count: int, timeout: float = 15.0) -> list[Any]:
        """The event types of `ctr_id`, until `count` of them arrived."""
        seen: list[pb.ContainerEventResponse] = []
        deadline = time.monotonic() + timeout
        while len(seen) < count:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event.container_id == ctr_id:
                seen.append(event)
        self.last = seen
        return [e.container_event_type for e in seen]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.client.close()


@contextmanager
def readers(daemon: Daemon, n: int) -> Iterator[list[Reader]]:
    started = [Reader(daemon) for _ in range(n)]
    time.sleep(0.3)  # the streams are open on the daemon's side before anything happens
    try:
        yield started
    finally:
        for r in started:
            r.close()


def life_of_a_container(fp: CriClient, pulled: TestImages, tmp_path: Path) -> tuple[str, str]:
    config = pod_config(log_dir=tmp_path)
    pod_id = run_pod(fp, config)
    ctr_id = start_container(fp, pod_id, config, container_config(
        pulled.busybox.reference, command=SLEEP))
    fp.StopContainer(pb.StopContainerRequest(container_id=ctr_id, timeout=0))
    fp.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr_id))
    return pod_id, ctr_id


def remove_pod(fp: CriClient, pod_id: str) -> None:
    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_lifecycle_events_in_order_with_statuses(
    fp: CriClient, pulled: TestImages, shared_daemon: Daemon, tmp_path: Path
) -> None:
    with readers(shared_daemon, 1) as (reader,):
        pod_id, ctr_id = life_of_a_container(fp, pulled, tmp_path)
        try:
            assert reader.kinds_for(ctr_id, 4) == LIFECYCLE
            created, started, stopped, deleted = reader.last
            assert created.created_at <= started.created_at <= stopped.created_at
            assert created.pod_sandbox_status.id == pod_id
            assert created.pod_sandbox_status.state == pb.SANDBOX_READY
            states = {s.id: s.state for s in started.containers_statuses}
            assert states[ctr_id] == pb.CONTAINER_RUNNING
            exited = next(s for s in stopped.containers_statuses if s.id == ctr_id)
            assert exited.state == pb.CONTAINER_EXITED
            assert ctr_id not in [s.id for s in deleted.containers_statuses]
        finally:
            remove_pod(fp, pod_id)


def test_every_subscriber_sees_every_event(
    fp: CriClient, pulled: TestImages, shared_daemon: Daemon, tmp_path: Path
) -> None:
    with readers(shared_daemon, 2) as (one, two):
        pod_id, ctr_id = life_of_a_container(fp, pulled, tmp_path)
        try:
            assert one.kinds_for(ctr_id, 4) == LIFECYCLE
            assert two.kinds_for(ctr_id, 4) == LIFECYCLE
        finally:
            remove_pod(fp, pod_id)


def test_a_subscriber_that_never_reads_blocks_nothing(
    fp: CriClient, pulled: TestImages, shared_daemon: Daemon, tmp_path: Path
) -> None:
    idle = shared_daemon.client()
    stuck = idle.runtime.GetContainerEvents(pb.GetEventsRequest())  # opened, never read
    try:
        with readers(shared_daemon, 1) as (reader,):
            config = pod_config(log_dir=tmp_path)
            pod_id = run_pod(fp, config)
            try:
                began = time.monotonic()
                ids = [start_container(fp, pod_id, config, container_config(
                    pulled.busybox.reference, command=SLEEP)) for _ in range(10)]
                assert time.monotonic() - began < 30
                for ctr_id in ids:
                    assert reader.kinds_for(ctr_id, 2) == LIFECYCLE[:2]
            finally:
                remove_pod(fp, pod_id)
    finally:
        stuck.cancel()
        idle.close()


# --- the hub on its own: overflow drops the subscriber ---------------------------------------


def tiny_runtime(tmp_path: Path) -> tuple[Runtime, ContainerRecord]:
    rt = Runtime(config=Config(), store=None, paths=Paths(tmp_path, tmp_path))  # type: ignore[arg-type]
    pod = PodRecord(id="p" * 64, name="pod", created_at=1, config=pod_config("pod"))
    ctr = ContainerRecord(id="c" * 64, pod_id=pod.id, name="ctr", created_at=2,
                          config=container_config("img"), state=RUNNING)
    rt.pods[pod.id], rt.containers[ctr.id] = pod, ctr
    return rt, ctr


def test_overflow_drops_only_the_slow_subscriber(tmp_path: Path) -> None:
    rt, ctr = tiny_runtime(tmp_path)
    rt.events = EventHub(queue_size=3)

    async def scenario() -> None:
        slow = get_container_events(rt, pb.GetEventsRequest())
        fast = get_container_events(rt, pb.GetEventsRequest())
        first_slow = asyncio.ensure_future(anext(slow))
        first_fast = asyncio.ensure_future(anext(fast))
        await asyncio.sleep(0)  # both subscribed
        assert len(rt.events.subscribers) == 2
        rt.events.publish(rt, ctr, pb.CONTAINER_STARTED_EVENT)
        assert (await first_slow).container_event_type == pb.CONTAINER_STARTED_EVENT
        assert (await first_fast).container_event_type == pb.CONTAINER_STARTED_EVENT
        got = []
        for _ in range(5):  # the fast one keeps up; the slow one reads nothing more
            rt.events.publish(rt, ctr, pb.CONTAINER_STOPPED_EVENT)
            got.append(await anext(fast))
        assert len(got) == 5
        assert len(rt.events.subscribers) == 1  # the slow one overflowed and was dropped
        with pytest.raises(Unavailable):
            await anext(slow)
        await fast.aclose()  # type: ignore[attr-defined]
        assert rt.events.subscribers == []

    asyncio.run(scenario())
