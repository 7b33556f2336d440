"""GC's removals against pulls that want the same names back (sandbox/images/content.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sandbox.images.content import GcRemovals


def test_a_pull_spares_what_gc_has_not_reached_and_waits_for_the_rest(tmp_path: Path) -> None:
    """GC deletes "a" (held up in the middle of it) and then "b": a pull asking for "b" keeps
    it and does not wait; one asking for "a" waits until "a" is gone."""
    files = {name: tmp_path / name for name in ("a", "b")}
    for path in files.values():
        path.write_text(path.name)
    deleting_a = threading.Event()
    let_go = threading.Event()

    def remove(name: str) -> None:
        if name == "a":
            deleting_a.set()
            assert let_go.wait(10)
        files[name].unlink()

    async def scenario() -> tuple[set[str], bool, bool]:
        removals = GcRemovals()
        gc = asyncio.ensure_future(removals.remove(["a", "b"], remove))
        while not deleting_a.is_set():
            await asyncio.sleep(0.001)
        await asyncio.wait_for(removals.wait_for("b"), 1)  # spared: returns at once
        waiting_for_a = asyncio.ensure_future(removals.wait_for("a"))
        await asyncio.sleep(0.05)
        a_waited = not waiting_for_a.done()
        let_go.set()
        removed = await gc
        await waiting_for_a
        return removed, a_waited, files["a"].exists()

    removed, a_waited, a_exists = asyncio.run(scenario())
    assert removed == {"a"}
    assert a_waited and not a_exists
    assert files["b"].read_text() == "b"


def test_names_not_being_removed_need_no_wait(tmp_path: Path) -> None:
    async def scenario() -> set[str]:
        removals = GcRemovals()
        await asyncio.wait_for(removals.wait_for("x"), 1)
        return await removals.remove(["y"], lambda _: None)

    assert asyncio.run(scenario()) == {"y"}
