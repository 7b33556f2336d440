"""The bound on lifecycle calls running at once (sandbox/slots.py), in process: handlers that
wait on events stand for calls in flight, so the test sees exactly which have started."""

from __future__ import annotations

import asyncio
import os

import pytest

from cri_api import api_pb2 as pb
from sandbox.daemon import rpc_handlers
from sandbox.slots import LifecycleSlots, _Lease, waits_for_exit

LIFECYCLE_RPCS = ("RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "CreateContainer",
                  "StartContainer", "StopContainer", "RemoveContainer")


class Calls:
    """Handlers that record their start and finish when told to."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    async def handler(self, rt: object, request: pb.StopContainerRequest) -> bytes:
        name = request.container_id
        self.started.append(name)
        await self.release.setdefault(name, asyncio.Event()).wait()
        return name.encode()

    def finish(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def stop_request(name: str, timeout: int = 0) -> pb.StopContainerRequest:
    return pb.StopContainerRequest(container_id=name, timeout=timeout)


def test_calls_past_the_bound_wait_their_turn_in_order() -> None:
    async def scenario() -> None:
        calls = Calls()
        bounded = LifecycleSlots(2).bounded(calls.handler)
        tasks = [asyncio.create_task(bounded(None, stop_request(n))) for n in "abcd"]
        await settle()
        assert calls.started == ["a", "b"]
        calls.finish("b")
        await settle()
        assert calls.started == ["a", "b", "c"]
        assert await tasks[1] == b"b"
        for name in "acd":
            calls.finish(name)
        assert await asyncio.gather(*tasks) == [b"a", b"b", b"c", b"d"]

    asyncio.run(scenario())


def test_a_call_cancelled_while_waiting_takes_no_slot() -> None:
    async def scenario() -> None:
        calls = Calls()
        bounded = LifecycleSlots(1).bounded(calls.handler)
        first = asyncio.create_task(bounded(None, stop_request("a")))
        waiting = asyncio.create_task(bounded(None, stop_request("b")))
        await settle()
        waiting.cancel()  # the client gave up (deadline, cancel)
        await settle()
        calls.finish("a")
        await first
        calls.finish("c")
        assert await bounded(None, stop_request("c")) == b"c"
        assert calls.started == ["a", "c"]

    asyncio.run(scenario())


def test_a_stop_with_a_grace_period_is_not_bounded() -> None:
    """It may wait the whole grace period for the container to exit: no other call may
    queue behind it, and it queues behind none."""

    async def scenario() -> None:
        calls = Calls()
        bounded = LifecycleSlots(1).bounded(calls.handler, unbounded_if=waits_for_exit)
        busy = asyncio.create_task(bounded(None, stop_request("kill", timeout=0)))
        graceful = asyncio.create_task(bounded(None, stop_request("graceful", timeout=30)))
        queued = asyncio.create_task(bounded(None, stop_request("queued", timeout=0)))
        await settle()
        assert calls.started == ["kill", "graceful"]
        calls.finish("kill")
        await settle()
        assert calls.started == ["kill", "graceful", "queued"]
        for name in ("graceful", "queued"):
            calls.finish(name)
        await asyncio.gather(busy, graceful, queued)

    asyncio.run(scenario())


def test_zero_means_the_cpus_this_process_may_use_at_least_two() -> None:
    assert LifecycleSlots(0).limit == max(2, len(os.sched_getaffinity(0)))
    assert LifecycleSlots(5).limit == 5


@pytest.mark.parametrize("rpc", LIFECYCLE_RPCS)
def test_the_daemon_bounds_every_lifecycle_rpc(rpc: str) -> None:
    handler = rpc_handlers(LifecycleSlots(2))[f"RuntimeService/{rpc}"]
    assert hasattr(handler, "__wrapped__"), f"{rpc} is not bounded"


@pytest.mark.parametrize("rpc", ("ListPodSandbox", "ListContainers", "ContainerStatus",
                                 "PodSandboxStatus", "Version", "ExecSync"))
def test_lookups_and_exec_are_not_bounded(rpc: str) -> None:
    handler = rpc_handlers(LifecycleSlots(2))[f"RuntimeService/{rpc}"]
    assert not hasattr(handler, "__wrapped__"), f"{rpc} waits for a lifecycle slot"



def test_a_call_past_its_lease_lets_the_next_one_run() -> None:
    """A stuck call (a hung CNI plugin) does not hold the node's other pods behind it."""
    async def started(calls: Calls, name: str) -> None:
        while name not in calls.started:
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        calls = Calls()
        bounded = LifecycleSlots(1, lease=0.05).bounded(calls.handler)
        stuck = asyncio.create_task(bounded(None, stop_request("stuck")))
        nxt = asyncio.create_task(bounded(None, stop_request("next")))
        await asyncio.wait_for(started(calls, "next"), timeout=30)
        calls.finish("next")
        calls.finish("stuck")
        assert await asyncio.gather(stuck, nxt) == [b"stuck", b"next"]

    asyncio.run(scenario())


def test_a_lease_gives_its_slot_back_once() -> None:
    """The lease's end and the call's end both give the slot back: only the first counts,
    or the bound would grow by one per slow call."""
    async def scenario() -> None:
        free = asyncio.Semaphore(1)
        await free.acquire()
        lease = _Lease(free)
        lease.give_back()  # the lease ended
        lease.give_back()  # then the call did
        await free.acquire()
        assert free.locked()

    asyncio.run(scenario())
