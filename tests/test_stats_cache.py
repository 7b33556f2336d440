"""The stats sample cache: holds only what is alive, and reads what a caller needs (no daemon
needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from types import SimpleNamespace

from sandbox import cgroups
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


def test_a_metrics_read_rereads_a_fresh_sample_for_its_process_details() -> None:
    """ListPodSandboxMetrics needs fds and limits that the stats RPCs do not read: a sample
    taken without them is read again, keeping the cpu rate of the sample it replaces (a rate
    over a few ms would be noise)."""
    path = f"/fpt-stats-cache-{os.getpid()}"
    hs = cgroups.hierarchies()
    cgroups.create(path, hs=hs)
    try:
        st = Stats()
        ctr = SimpleNamespace(id="c1", cgroup_path=path, pid=os.getpid())
        rt = SimpleNamespace(pods={}, containers={"c1": ctr},
                             paths=SimpleNamespace(writable_layers=Path("/nonexistent")),
                             host_cgroups=cgroups.HostCgroups.read())
        asyncio.run(st.refresh(rt, [ctr], []))  # type: ignore[arg-type]
        first = st.cgroups[path]
        assert first.figures is not None and first.procs is None
        st.cgroups[path] = dataclasses.replace(first, nano_cores=12345)
        asyncio.run(st.refresh(rt, [ctr], [], detail=True))  # type: ignore[arg-type]
        detailed = st.cgroups[path]
        assert detailed.procs is not None and detailed.monotonic > first.monotonic
        assert detailed.procs.fds == 0  # no process in the cgroup; the limit is the root pid's
        assert detailed.procs.open_files_soft_limit is not None
        assert detailed.nano_cores == 12345
        asyncio.run(st.refresh(rt, [ctr], [], detail=True))  # type: ignore[arg-type]
        assert st.cgroups[path] is detailed  # fresh, and detailed: not read again
    finally:
        cgroups.remove(path, hs)
