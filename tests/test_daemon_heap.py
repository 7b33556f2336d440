"""The daemon freezes its startup heap (sandbox/daemon.freeze_startup_heap): what startup built
stays out of the cyclic collector's full collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sandbox.daemon import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's heap goes back to the collector


@pytest.mark.usefixtures("unfrozen")
def test_startup_heap_is_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLATPOD_GC", raising=False)
    built_at_startup = [object() for _ in range(10)]
    freeze_startup_heap()
    # Everything alive then, this test's list among it, is in the permanent generation.
    assert gc.get_freeze_count() > len(built_at_startup)
    assert not any(obj is built_at_startup for obj in gc.get_objects())


@pytest.mark.usefixtures("unfrozen")
def test_gc_default_leaves_the_collector_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATPOD_GC", "default")
    freeze_startup_heap()
    assert gc.get_freeze_count() == 0
