"""Undo stacks: each step that changes the host registers how to take it back.

When a later step fails, the undos run in reverse order, as containerd's deferred cleanups do,
and a failing undo is logged without hiding the error that started the unwinding.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flatpod.undo")

UndoStep = Callable[[], Awaitable[Any] | Any]


@dataclass
class Undo:
    steps: list[tuple[str, UndoStep]] = field(default_factory=list)

    def push(self, what: str, step: UndoStep) -> None:
        self.steps.append((what, step))

    async def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("undo %s failed", what)


@asynccontextmanager
async def undo_on_failure() -> AsyncIterator[Undo]:
    """Yields an Undo that runs if the block raises (cancellation included)."""
    undo = Undo()
    try:
        yield undo
    except BaseException:
        # Undo must finish even when the caller's task was cancelled mid-way.
        await asyncio.shield(undo.run())
        raise
