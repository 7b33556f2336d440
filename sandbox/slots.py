"""How many lifecycle RPCs run at once (config `max_concurrent_lifecycle_calls`).

Why a bound: every RPC is answered on one event loop, and the lifecycle ones (run, create,
start, stop, remove) are long chains of short steps on it, each taking the GIL back after
its syscalls and worker-thread handoffs. With 8 clients cycling pods on 2 cores, a dozen
lifecycle calls in flight kept the loop's queue long, and kubelet's relist (two answers
from kept bytes, ~0.02 ms of handler time each) waited behind it: p50 35 ms, p95 126 ms.
Two at a time left the lifecycles completed per second unchanged (the CPU was the bound
already) and the relist at p50 ~5 ms, p95 ~15 ms (ARCHITECTURE.md, "Inside flatpod serve").

The calls past the bound wait, in arrival order, before their handler starts: nothing is
held while they wait, so no lock order can deadlock. Calls that wait on a workload rather
than work are not bounded: StopContainer with a grace period waits as long as the container
takes to exit. A slot is a lease: a call still running after `SLOT_LEASE_SECONDS` gives its
slot to the next and goes on unbounded, so a call stuck on something outside flatpod (a CNI
plugin that hangs, runc waiting on a frozen cgroup, a large checkpoint restore) never holds
the node's other pods behind it. Under churn a lifecycle call takes 50-200 ms; the lease only
ends calls that are slow for a reason the bound cannot help.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from cri_api import api_pb2 as pb

UnaryHandler = Callable[[Any, Any], Awaitable[Message | bytes]]
# At least this many when the bound follows the CPUs: one call's worker-thread step overlaps
# another's loop step.
MIN_AUTO_SLOTS = 2
# How long a call holds its slot at most (see above): several times a lifecycle call under
# churn on a loaded node, far below kubelet's 2-4 minute call timeouts.
SLOT_LEASE_SECONDS = 1.0


def auto_limit() -> int:
    """The bound when the config says 0: the CPUs this process may run on, at least 2."""
    return max(MIN_AUTO_SLOTS, len(os.sched_getaffinity(0)))


class _Lease:
    """One call's slot, given back once: when the lease ends or when the call does."""

    def __init__(self, free: asyncio.Semaphore) -> None:
        self._free: asyncio.Semaphore | None = free

    def give_back(self) -> None:
        if self._free is not None:
            self._free.release()
            self._free = None


class LifecycleSlots:
    """At most `limit` bounded calls run their handler at the same time, each for at most
    `lease` seconds before it goes on without its slot."""

    def __init__(self, limit: int, lease: float = SLOT_LEASE_SECONDS) -> None:
        self.limit = limit if limit > 0 else auto_limit()
        self.lease = lease
        self._free = asyncio.Semaphore(self.limit)  # binds to the serving loop at first wait

    def bounded(self, handler: UnaryHandler,
                unbounded_if: Callable[[Any], bool] | None = None) -> UnaryHandler:
        """`handler`, run once a slot is free (at once if `unbounded_if(request)`)."""

        @functools.wraps(handler)
        async def call(rt: Any, request: Any) -> Message | bytes:
            if unbounded_if is not None and unbounded_if(request):
                return await handler(rt, request)
            await self._free.acquire()
            lease = _Lease(self._free)
            expiry = asyncio.get_running_loop().call_later(self.lease, lease.give_back)
            try:
                return await handler(rt, request)
            finally:
                expiry.cancel()
                lease.give_back()

        return call


def waits_for_exit(request: pb.StopContainerRequest) -> bool:
    """A StopContainer that gives the container time to exit (it may take the whole grace
    period, which no other call should wait behind)."""
    return request.timeout > 0
