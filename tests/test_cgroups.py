"""cgroupfs management against the host's real hierarchies (v1 + the v2 mount for hugetlb)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from sandbox.cgroups import CgroupError, Resources

_counter = itertools.count()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def cg() -> Iterator[str]:
    """A fresh top-level cgroup path, removed (in every hierarchy) whatever happens."""
    path = f"/fpt-spec-cg-{os.getpid()}-{next(_counter)}"
    try:
        yield path
    finally:
        cgroups.remove(path)
        assert not any(h.dir_for(path).exists() for h in cgroups.hierarchies())


def test_paths() -> None:
    assert cgroups.pod_cgroup_path("", "abc") == "/flatpod/flatpod-abc"
    assert cgroups.pod_cgroup_path("/kubepods/pod1/", "abc") == "/kubepods/pod1/flatpod-abc"
    assert cgroups.container_cgroup_path("/flatpod/flatpod-abc", "c1") == "/flatpod/flatpod-abc/c1"
    for parent, pod_id in (("relative", "a"), ("/x/../y", "a"), ("/x", "../a"), ("/x", "a/b")):
        with pytest.raises(CgroupError):
            cgroups.pod_cgroup_path(parent, pod_id)


def test_host_hierarchies_have_separate_cpu_and_cpuacct() -> None:
    hs = cgroups.hierarchies()
    by_ctrl = {c: h for h in hs if h.version == 1 for c in h.controllers}
    if "cpu" not in by_ctrl:
        pytest.skip("no v1 cpu hierarchy")
    assert by_ctrl["cpu"].mount_point == Path("/sys/fs/cgroup/cpu")
    assert by_ctrl["cpuacct"].mount_point == Path("/sys/fs/cgroup/cpuacct")
    assert "name=systemd" in by_ctrl
    assert cgroups.is_unified_only() is False


def read(h: cgroups.Hierarchy, path: str, name: str) -> str:
    return (h.dir_for(path) / name).read_text().strip()


def hierarchy(ctrl: str) -> cgroups.Hierarchy:
    return next(h for h in cgroups.hierarchies() if h.version == 1 and ctrl in h.controllers)


def test_create_update_remove_everywhere(cg: str) -> None:
    child = f"{cg}/pod/ctr"
    res = Resources(
        cpu_shares=512, cpu_quota=20000, cpu_period=50000, memory_limit=64 << 20,
        memory_swap=128 << 20, pids_limit=50,
    )  # fmt: skip
    cgroups.create(child, res)
    hs = cgroups.hierarchies()
    for h in hs:
        assert h.dir_for(child).is_dir(), h
    assert read(hierarchy("cpu"), child, "cpu.shares") == "512"
    assert read(hierarchy("cpu"), child, "cpu.cfs_quota_us") == "20000"
    assert read(hierarchy("cpu"), child, "cpu.cfs_period_us") == "50000"
    mem = hierarchy("memory")
    assert read(mem, child, "memory.limit_in_bytes") == str(64 << 20)
    assert read(mem, child, "memory.memsw.limit_in_bytes") == str(128 << 20)
    assert read(hierarchy("pids"), child, "pids.max") == "50"
    cpuset = hierarchy("cpuset")
    assert read(cpuset, child, "cpuset.cpus") == read(cpuset, "/", "cpuset.cpus") != ""
    assert read(cpuset, child, "cpuset.mems") != ""

    # Grow past the old memsw, then shrink below the old limit: both orders must work.
    cgroups.update(child, Resources(memory_limit=256 << 20, memory_swap=512 << 20))
    assert read(mem, child, "memory.memsw.limit_in_bytes") == str(512 << 20)
    cgroups.update(child, Resources(memory_limit=32 << 20, memory_swap=32 << 20, cpuset_cpus="0"))
    assert read(mem, child, "memory.limit_in_bytes") == str(32 << 20)
    assert read(cpuset, child, "cpuset.cpus") == "0"

    cgroups.remove(cg)
    assert not any(h.dir_for(cg).exists() for h in hs)
    cgroups.remove(cg)  # already gone: fine


def test_hugetlb_on_v2_mount(cg: str) -> None:
    v2 = next((h for h in cgroups.hierarchies() if h.version == 2), None)
    if v2 is None or "hugetlb" not in v2.controllers:
        pytest.skip("no hugetlb on a v2 mount")
    cgroups.create(cg, Resources(hugepage_limits=(("2MB", 4 << 21),)))
    assert read(v2, cg, "hugetlb.2MB.max") == str(4 << 21)


def test_from_cri() -> None:
    r = Resources.from_cri(
        pb.LinuxContainerResources(
            cpu_shares=2, memory_limit_in_bytes=5, memory_swap_limit_in_bytes=6,
            hugepage_limits=[pb.HugepageLimit(page_size="1GB", limit=7)],
        )
    )  # fmt: skip
    assert (r.cpu_shares, r.memory_limit, r.memory_swap) == (2, 5, 6)
    assert r.hugepage_limits == (("1GB", 7),)


def test_pids_stats_and_busy_remove(cg: str) -> None:
    cgroups.create(cg, Resources(memory_limit=64 << 20))
    # The shell allocates only after it was moved in (v1 does not move existing charges).
    script = (
        # dd's 1 MiB buffer is faulted in after the move, so the cgroup must count faults.
        "read go; dd if=/dev/zero of=/dev/null bs=1M count=8 2>/dev/null; "
        "echo grown; exec sleep 30"
    )
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for h in cgroups.hierarchies():
            if h.version == 1:
                (h.dir_for(cg) / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"grown\n"
        assert cgroups.pids(cg) == [proc.pid]
        mem = cgroups.read_memory(cg)
        assert mem.limit == 64 << 20 and 0 < mem.working_set <= mem.usage
        assert mem.page_faults > 0
        assert cgroups.oom_kill_count(cg) == 0
        with pytest.raises(OSError):
            cgroups.remove(cg, timeout_s=0.2)
    finally:
        proc.kill()
        proc.wait()
    assert cgroups.pids(cg) == []
    assert cgroups.read_cpu_usage_ns(cg) >= 0
    cgroups.remove(cg)
    assert cgroups.pids(cg) == []


def test_cpu_usage_counts(cg: str) -> None:
    cgroups.create(cg)
    script = "read x; i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done"
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE)
    try:
        (hierarchy("cpuacct").dir_for(cg) / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert cgroups.read_cpu_usage_ns(cg) > 1_000_000


def test_remove_refuses_root() -> None:
    with pytest.raises(CgroupError):
        cgroups.remove("/")
