"""Undo stacks: each step that changes the host registers how to take it back.

When a later step fails, the undos run in reverse order, as containerd's deferred cleanups do.
An undo that fails never hides the error that started the unwinding, and never loses track of
what it left: the record of the object being made is forgotten only when every undo worked;
otherwise it is kept, marked with what is left (`cleanup_error`, as containerd keeps a sandbox
while its cleanup error is set), so a later removal, a retry of the request or recovery at
startup finishes the cleanup. The error that reaches the client names the request and the
step it failed at (`run pod <id>: network: <cause>`, sandbox/errors.py), and what was not
undone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from sandbox.errors import Steps, describe
from sandbox.faults import Faults

log = logging.getLogger("flatpod.undo")

T = TypeVar("T")
UndoStep = Callable[[], Awaitable[object] | object]


@dataclass
class Undo:
    """The undos of one request, and where it is (`at`), for its error."""

    where: Steps
    faults: Faults = field(default_factory=Faults)
    steps: list[tuple[str, UndoStep]] = field(default_factory=list)
    # What ends the unwinding: the record is forgotten when everything was undone, else kept
    # with what was not (see settle).
    forget: Callable[[], None] | None = None
    keep: Callable[[str], None] | None = None

    def at(self, step: str) -> None:
        """The request is now at `step`: an error from here on is reported as failing in it."""
        self.where.at(step)

    def push(self, what: str, step: UndoStep) -> None:
        self.steps.append((what, step))

    def push_after(self, what: str, task: asyncio.Future[T], step: UndoStep) -> None:
        """Undoes work that runs concurrently in `task`: the undo first waits for the task to
        end, whatever its outcome, so it never races the step it takes back."""

        async def after_task() -> None:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                # Retrieved here: the request reports the error it met first.
                log.info("%s: %s", what, describe(task.exception() or Exception()))
            await _call(step)

        self.push(what, after_task)

    def settle(self, forget: Callable[[], None], keep: Callable[[str], None]) -> None:
        """How the unwinding ends: `forget` the record when every undo worked, else `keep` it,
        given what was not undone."""
        self.forget, self.keep = forget, keep

    async def run(self) -> str:
        """Runs the undos in reverse order, then settles the record; returns what could not
        be undone ("" when everything was)."""
        failed: list[str] = []
        while self.steps:
            what, step = self.steps.pop()
            try:
                self.faults.point(f"undo:{what}")
                await _call(step)
            except Exception as err:
                log.exception("%s: undo %s failed", self.where.request, what)
                failed.append(f"{what}: {describe(err)}")
        left = "; ".join(failed)
        try:
            if left and self.keep is not None:
                log.warning("%s: kept for a later cleanup of %s", self.where.request, left)
                self.keep(left)
            elif not left and self.forget is not None:
                self.forget()
        except Exception:
            log.exception("%s: settling the record failed", self.where.request)
        return left


async def _call(step: UndoStep) -> None:
    result = step()
    if asyncio.iscoroutine(result):
        await result


@asynccontextmanager
async def undo_on_failure(request: str, faults: Faults | None = None) -> AsyncIterator[Undo]:
    """Yields an Undo that runs if the block raises (cancellation included); an error is then
    reported from the step it happened in, with what was left (sandbox/errors.StepFailed)."""
    undo = Undo(Steps(request), faults or Faults())
    try:
        yield undo
    except BaseException as err:
        # Undo must finish even when the caller's task was cancelled mid-way.
        left = await asyncio.shield(undo.run())
        if isinstance(err, Exception):
            raise undo.where.located(err, left) from err
        raise
