"""Container lifecycle events: the EventHub, and GetContainerEvents that streams it.

kubelet's evented PLEG subscribes once and updates its pod cache from each event; when the
stream breaks it falls back to relisting. So a subscriber that falls behind is dropped (its
stream ends with UNAVAILABLE) rather than being waited for: publishing happens inside
CreateContainer, StartContainer, exits and removals, and must never block them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cri_api import api_pb2 as pb
from sandbox import containers, pods
from sandbox.errors import Unavailable
from sandbox.records import ContainerRecord
from sandbox.runtime import Runtime

log = logging.getLogger("flatpod.events")

# Events a subscriber may have unread before it is dropped: a burst of pod creations on a
# busy node is a few hundred events; a reader that is further behind than that is stuck.
QUEUE_SIZE = 1024


@dataclass
class Subscriber:
    number: int
    queue: asyncio.Queue[pb.ContainerEventResponse]
    dropped: bool = False


@dataclass
class EventHub:
    """Fans each container event out to every subscriber's own bounded queue."""

    queue_size: int = QUEUE_SIZE
    subscribers: list[Subscriber] = field(default_factory=list)
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def subscribe(self) -> Subscriber:
        sub = Subscriber(next(self.numbers), asyncio.Queue(self.queue_size))
        self.subscribers.append(sub)
        log.debug("event subscriber %d joined (%d now)", sub.number, len(self.subscribers))
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def publish(self, rt: Runtime, ctr: ContainerRecord, kind: int) -> None:
        """Called on the event loop by containers.py; never waits."""
        if not self.subscribers:
            return  # building the statuses costs something: only when someone listens
        event = container_event(rt, ctr, kind)
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.unsubscribe(sub)
                sub.dropped = True
                log.warning(
                    "event subscriber %d is %d events behind: dropped (it should relist)",
                    sub.number, sub.queue.qsize(),
                )


def container_event(rt: Runtime, ctr: ContainerRecord, kind: int) -> pb.ContainerEventResponse:
    """The event with the pod's status and its containers' statuses, as kubelet caches them.

    For a deletion the container is already gone from the runtime, so the statuses are those of
    the containers left in the pod (as containerd sends them).
    """
    event = pb.ContainerEventResponse(
        container_id=ctr.id, container_event_type=kind, created_at=time.time_ns()  # type: ignore[arg-type]
    )
    pod = rt.pods.get(ctr.pod_id)
    if pod is not None:
        event.pod_sandbox_status.CopyFrom(pods.sandbox_status(pod))
    event.containers_statuses.extend(
        containers.container_status_message(rt, c)
        for c in rt.registry.visible_containers_of(ctr.pod_id)
    )
    return event


async def get_container_events(
    rt: Runtime, req: pb.GetEventsRequest
) -> AsyncIterator[pb.ContainerEventResponse]:
    """Streams every event from now on until the client goes away or falls behind."""
    hub: EventHub = rt.events
    sub = hub.subscribe()
    try:
        while True:
            if sub.dropped:
                raise Unavailable("container event stream fell behind and was dropped; relist")
            yield await sub.queue.get()
    finally:
        hub.unsubscribe(sub)
        log.debug("event subscriber %d left", sub.number)
