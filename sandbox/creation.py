"""Creating a named object exactly once, however often kubelet retries.

kubelet gives RunPodSandbox and CreateContainer a deadline. When the deadline passes first,
kubelet retries with the same name, and the runtime must end with one working object, not a
"name is reserved" dead end (containerd#12438). As CRI-O does, flatpod finishes the first
request anyway and hands its result to the retry:
- a retry that arrives while the first is still working waits for it and gets its id;
- an object finished after its client gave up is marked unclaimed, and the next request with
  that name claims it;
- an object whose creation failed and could not be fully undone (its `cleanup_error` is set,
  sandbox/undo.py) holds the name until it is removed: the next request with that name
  finishes that removal, then makes a new one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

from sandbox.errors import AlreadyExists, DeadlineExceeded

# The monotonic instant after which the current call's answer can no longer reach its client
# (sandbox/server.py sets it per call from the gRPC deadline; None: no deadline). A context
# variable: each call's task sees its own.
CALL_DEADLINE: ContextVar[float | None] = ContextVar("call_deadline", default=None)


class Claimable(Protocol):
    id: str
    unclaimed: bool
    cleanup_error: str

    @property
    def state(self) -> str: ...  # read only: a record's state is a str enum


@dataclass
class PendingCreate:
    task: asyncio.Task[str]
    waiters: int = 1


@dataclass
class Creations:
    """Creations in flight, by name."""

    pending: dict[str, PendingCreate] = field(default_factory=dict)

    async def create_once(
        self,
        name: str,
        what: str,
        holder: Claimable | None,
        make: Callable[[], Awaitable[str]],
        claim: Callable[[str], None],
        mark_unclaimed: Callable[[str], None],
        remove_leftover: Callable[[str], Awaitable[None]],
    ) -> str:
        """The id of the object called `name`: made by `make`, or the one already made.

        `holder` is the existing object with that name, if any; `claim` records, by id, that
        a request took an unclaimed one; `mark_unclaimed` records, by id, an object whose
        client went away before it was made; `remove_leftover` removes, by id, a holder that
        a failed creation left to clean up.
        """
        inflight = self.pending.get(name)
        if inflight is not None:
            inflight.waiters += 1
            try:
                return await asyncio.shield(inflight.task)
            finally:
                inflight.waiters -= 1
        if holder is not None and not holder.cleanup_error:
            if holder.unclaimed:
                claim(holder.id)
                return holder.id
            raise name_taken(what, name, holder.id, holder.state)
        if holder is None:
            task = asyncio.ensure_future(make())
        else:  # in the task, so that a retry arriving meanwhile waits for this one
            task = asyncio.ensure_future(_removed_then_made(holder.id, remove_leftover, make))
        entry = PendingCreate(task)
        self.pending[name] = entry
        task.add_done_callback(lambda _t: self.pending.pop(name, None))
        try:
            made = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Our client went away while the object is still being made: whoever asks for
            # this name next gets it.
            entry.waiters -= 1
            task.add_done_callback(lambda t: _unclaimed_if_nobody_waits(t, entry, mark_unclaimed))
            raise
        return _delivered_or_unclaimed(made, what, name, mark_unclaimed)


def _delivered_or_unclaimed(
    made: str, what: str, name: str, mark_unclaimed: Callable[[str], None]
) -> str:
    """`made`, unless the call's deadline passed while it was made: then its answer cannot
    reach the client, which will retry, and a cancellation that has not reached this task yet
    would come too late to mark it. Marked unclaimed here, the retry gets it."""
    deadline = CALL_DEADLINE.get()
    if deadline is not None and time.monotonic() >= deadline:
        mark_unclaimed(made)
        raise DeadlineExceeded(f"{what} {name!r} was made after the call's deadline; "
                               f"a retry with the same name gets it")
    return made


def name_taken(what: str, name: str, holder_id: str, holder_state: str) -> AlreadyExists:
    """The answer to a request for a name that another, delivered object holds."""
    state = f" ({holder_state})" if holder_state else ""
    return AlreadyExists(
        f"{what} name {name!r} is reserved by {what} {holder_id}{state}; remove it first"
    )


def _unclaimed_if_nobody_waits(
    task: asyncio.Task[str], entry: PendingCreate, mark: Callable[[str], None]
) -> None:
    if task.cancelled() or task.exception() is not None or entry.waiters > 0:
        return
    mark(task.result())


async def _removed_then_made(
    leftover_id: str, remove: Callable[[str], Awaitable[None]], make: Callable[[], Awaitable[str]]
) -> str:
    await remove(leftover_id)
    return await make()
