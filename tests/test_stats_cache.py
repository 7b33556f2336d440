"""The stats sample cache holds only what is alive (no daemon needed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

from sandbox.stats import CgroupSample, DiskSample, NetSample, Stats


def test_samples_of_removed_objects_are_dropped_even_when_nothing_is_stale() -> None:
    st = Stats()
    now, mono = time.time_ns(), time.monotonic_ns()
    st.cgroups["/flatpod/gone"] = CgroupSample(now, mono)
    st.disks["gone"] = DiskSample(now, mono)
    st.nets["/run/netns/gone"] = NetSample(now, mono)
    rt = SimpleNamespace(pods={}, containers={}, paths=SimpleNamespace(writable_layers=Path("/")))
    asyncio.run(st.refresh(rt, [], []))  # type: ignore[arg-type]
    assert (st.cgroups, st.disks, st.nets) == ({}, {}, {})
