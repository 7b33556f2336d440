"""cgroupfs management against the host's real hierarchies (v1 + the v2 mount for hugetlb)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups, stats
from sandbox.cgroups import CgroupError, Resources

_counter = itertools.count()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
v1_only = pytest.mark.skipif(cgroups.is_unified_only(), reason="v1 or hybrid hierarchies only")
# The tests below that touch the real kernel read the files of the host's kind: v1 here,
# v2 in the VM (hack/vm-tests.txt); the test_v2_* ones run the v2 logic on any host.
UNIFIED = cgroups.is_unified_only()


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


@v1_only
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
    """The hierarchy `ctrl`'s files are in: its v1 one, or the v2 one on pure v2."""
    return next(h for h in cgroups.hierarchies()
                if ctrl in h.controllers and (h.version == 1 or UNIFIED))


def join(cg: str, pid: int) -> None:
    """Moves `pid` into `cg` in every hierarchy that has tasks of its own (v1; v2 when pure)."""
    for h in cgroups.hierarchies():
        if h.version == 1 or UNIFIED:
            (h.dir_for(cg) / "cgroup.procs").write_text(str(pid))


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
    cpu, mem, cpuset = hierarchy("cpu"), hierarchy("memory"), hierarchy("cpuset")
    if UNIFIED:
        assert read(cpu, child, "cpu.weight") == str(cgroups.shares_to_weight(512))
        assert read(cpu, child, "cpu.max") == "20000 50000"
        assert read(mem, child, "memory.max") == str(64 << 20)
        swap_file = (mem.dir_for(child) / "memory.swap.max").exists()
        if swap_file:  # v2 counts swap alone
            assert read(mem, child, "memory.swap.max") == str(64 << 20)
        # v2 cpuset files start empty (the parent's are used), as runc leaves them.
        assert read(cpuset, child, "cpuset.cpus.effective") == read(cpuset, "/",
                                                                    "cpuset.cpus.effective")
    else:
        assert read(cpu, child, "cpu.shares") == "512"
        assert read(cpu, child, "cpu.cfs_quota_us") == "20000"
        assert read(cpu, child, "cpu.cfs_period_us") == "50000"
        assert read(mem, child, "memory.limit_in_bytes") == str(64 << 20)
        assert read(mem, child, "memory.memsw.limit_in_bytes") == str(128 << 20)
        assert read(cpuset, child, "cpuset.cpus") == read(cpuset, "/", "cpuset.cpus") != ""
        assert read(cpuset, child, "cpuset.mems") != ""
    assert read(hierarchy("pids"), child, "pids.max") == "50"

    # Grow past the old memsw, then shrink below the old limit: both orders must work.
    cgroups.update(child, Resources(memory_limit=256 << 20, memory_swap=512 << 20))
    if UNIFIED:
        if swap_file:
            assert read(mem, child, "memory.swap.max") == str(256 << 20)
    else:
        assert read(mem, child, "memory.memsw.limit_in_bytes") == str(512 << 20)
    cgroups.update(child, Resources(memory_limit=32 << 20, memory_swap=32 << 20, cpuset_cpus="0"))
    assert read(mem, child, "memory.max" if UNIFIED else "memory.limit_in_bytes") == str(32 << 20)
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
        join(cg, proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"grown\n"
        assert cgroups.pids(cg) == [proc.pid]
        figures = stats.read_cgroup(cg, cgroups.hierarchies()).figures
        assert figures is not None
        mem = figures.memory
        assert mem.limit == 64 << 20 and 0 < mem.working_set <= mem.usage
        assert mem.page_faults > 0
        assert figures.oom_kills == 0
        with pytest.raises(OSError):
            cgroups.remove(cg, timeout_s=0.2)
    finally:
        proc.kill()
        proc.wait()
    assert cgroups.pids(cg) == []
    assert stats.read_cgroup(cg, cgroups.hierarchies()).cpu_ns >= 0
    cgroups.remove(cg)
    assert cgroups.pids(cg) == []


def test_cpu_usage_counts(cg: str) -> None:
    cgroups.create(cg)
    script = "read x; i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done"
    proc = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE)
    try:
        join(cg, proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert stats.read_cgroup(cg, cgroups.hierarchies()).cpu_ns > 1_000_000


def test_remove_refuses_root() -> None:
    with pytest.raises(CgroupError):
        cgroups.remove("/")


# --- drivers and placement (pure: the v2 and systemd logic, tested on any host) ---------------


def test_detect_driver_by_systemd_run_dir(tmp_path: Path) -> None:
    assert cgroups.detect_driver(tmp_path / "absent") is cgroups.Driver.CGROUPFS
    (tmp_path / "system").mkdir()
    assert cgroups.detect_driver(tmp_path / "system") is cgroups.Driver.SYSTEMD
    (tmp_path / "file").touch()  # sd_booted(3) wants a directory
    assert cgroups.detect_driver(tmp_path / "file") is cgroups.Driver.CGROUPFS


def test_expand_slice_as_systemd_nests_slices() -> None:
    assert cgroups.expand_slice("system.slice") == "/system.slice"
    assert cgroups.expand_slice("kubepods-burstable-pod12_ab.slice") == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_ab.slice"
    )
    assert cgroups.expand_slice("-.slice") == "/"
    for bad in ("kubepods", "a--b.slice", "-a.slice", "a-.slice", "a/b.slice", ".slice",
                "x:y.slice", "a.scope"):
        with pytest.raises(CgroupError):
            cgroups.expand_slice(bad)


def test_placement_cgroupfs() -> None:
    place = cgroups.placement(cgroups.Driver.CGROUPFS, "/kubepods/besteffort/pod1", "/flatpod",
                              "p1")  # fmt: skip
    assert place == cgroups.Placement(pod_path="/kubepods/besteffort/pod1/flatpod-p1")
    assert place.driver is cgroups.Driver.CGROUPFS
    assert place.container_path("c1") == "/kubepods/besteffort/pod1/flatpod-p1/c1"
    assert place.oci_cgroups_path("c1") == place.container_path("c1")
    default = cgroups.placement(cgroups.Driver.CGROUPFS, "", "/flatpod", "p1")
    assert default.pod_path == "/flatpod/flatpod-p1"
    with pytest.raises(CgroupError):
        cgroups.check_parent(cgroups.Driver.CGROUPFS, "kubepods-pod1.slice")


def test_placement_systemd() -> None:
    slice_name = "kubepods-burstable-pod1.slice"
    place = cgroups.placement(cgroups.Driver.SYSTEMD, slice_name, "system.slice", "p1")
    assert place.driver is cgroups.Driver.SYSTEMD
    assert place.pod_path == "/kubepods.slice/kubepods-burstable.slice/" + slice_name
    # runc's systemd form; the scope it makes sits in the slice's directory.
    assert place.oci_cgroups_path("c1") == f"{slice_name}:flatpod:c1"
    assert place.container_path("c1") == f"{place.pod_path}/flatpod-c1.scope"
    # A path ending in the slice is taken by its last part, as containerd does.
    as_path = cgroups.placement(cgroups.Driver.SYSTEMD, place.pod_path, "system.slice", "p1")
    assert as_path == place
    assert not cgroups.is_own_slice(slice_name, "p1")
    # crun puts the process in the scope itself, as runc does, only with the annotation.
    assert place.oci_annotations() == {"run.oci.systemd.subgroup": ""}
    assert cgroups.placement(cgroups.Driver.CGROUPFS, "", "/f", "p1").oci_annotations() == {}
    # No slice of kubelet's (crictl): a slice of the pod's own in the default slice, nested
    # by systemd right below it, so the pod has a cgroup of its own for its stats.
    own = cgroups.placement(cgroups.Driver.SYSTEMD, "", "system.slice", "p1")
    assert own.slice == "system-flatpod_p1.slice"
    assert own.pod_path == "/system.slice/system-flatpod_p1.slice"
    assert own.oci_cgroups_path("c1") == "system-flatpod_p1.slice:flatpod:c1"
    assert own.container_path("c1") == f"{own.pod_path}/flatpod-c1.scope"
    assert cgroups.is_own_slice(own.slice, "p1") and not cgroups.is_own_slice(own.slice, "p2")
    assert not cgroups.is_own_slice("system.slice", "p1")
    at_root = cgroups.placement(cgroups.Driver.SYSTEMD, "", "-.slice", "p1")
    assert (at_root.slice, at_root.pod_path) == ("flatpod_p1.slice", "/flatpod_p1.slice")
    nested = cgroups.placement(cgroups.Driver.SYSTEMD, "", "pods-node.slice", "p1")
    assert nested.pod_path == "/pods.slice/pods-node.slice/pods-node-flatpod_p1.slice"
    # Only a slice is ever asked to stop (systemd's own units are not flatpod's to stop).
    for not_a_slice in ("flatpod-c1.scope", "system.slice/x", "flatpod.service"):
        with pytest.raises(CgroupError):
            cgroups.stop_slice(not_a_slice)
    # A record made before own slices: the default slice, no pod-level cgroup.
    shared = cgroups.Placement(pod_path="", slice="system.slice")
    assert shared.container_path("c1") == "/system.slice/flatpod-c1.scope"
    for bad_parent in ("/kubepods/pod1", "a--b.slice"):
        with pytest.raises(CgroupError):
            cgroups.check_parent(cgroups.Driver.SYSTEMD, bad_parent)


def test_systemd_owned_cgroups_are_never_touched(tmp_path: Path) -> None:
    hs = [cgroups.Hierarchy(tmp_path, frozenset({"memory"}), 2)]
    for path in ("/kubepods.slice/kubepods-pod1.slice", "/system.slice/flatpod-c1.scope"):
        assert cgroups.systemd_owned(path)
        with pytest.raises(CgroupError, match="systemd"):
            cgroups.create(path, hs=hs)
        with pytest.raises(CgroupError, match="systemd"):
            cgroups.update(path, Resources(memory_limit=1 << 20), hs)
        with pytest.raises(CgroupError, match="systemd"):
            cgroups.remove(path, hs)
    assert list(tmp_path.iterdir()) == []
    assert not cgroups.systemd_owned("/flatpod/flatpod-p1/c1")


# --- v1 -> v2 mapping (runc's) ----------------------------------------------------------------


def test_v2_files_map_like_runc() -> None:
    r = Resources(cpu_shares=1024, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0-1",
                  cpuset_mems="0", memory_limit=64 << 20, memory_swap=96 << 20, pids_limit=-1,
                  hugepage_limits=(("2MB", 4 << 21),))  # fmt: skip
    assert cgroups.v2_files(r) == [
        ("cpu.weight", "39"),  # runc 1.1: 1 + (1024 - 2) * 9999 / 262142
        ("cpu.max", "50000 100000"),
        ("cpuset.cpus", "0-1"),
        ("cpuset.mems", "0"),
        ("memory.swap.max", str(32 << 20)),  # OCI swap is memory+swap; v2's is swap alone
        ("memory.max", str(64 << 20)),
        ("pids.max", "max"),
        ("hugetlb.2MB.max", str(4 << 21)),
    ]
    assert cgroups.v2_files(Resources()) == []
    assert cgroups.shares_to_weight(2) == 1 and cgroups.shares_to_weight(262144) == 10000


def test_cpu_max_and_swap_values() -> None:
    assert cgroups.cpu_max_value(0, 0) == ""
    assert cgroups.cpu_max_value(20000, 0) == "20000"  # the kernel keeps its period
    assert cgroups.cpu_max_value(-1, 50000) == "max 50000"
    assert cgroups.swap_max_value(0, 64) is None
    assert cgroups.swap_max_value(64, 64) == "0"  # equal: no swap, containerd's default
    assert cgroups.swap_max_value(-1, 64) == "max"
    assert cgroups.swap_max_value(0, -1) == "max"
    for swap, memory in ((32, 64), (64, 0)):
        with pytest.raises(CgroupError):
            cgroups.swap_max_value(swap, memory)


def fake_v2_root(root: Path, controllers: str) -> None:
    """A directory laid out like a v2 hierarchy's root (plain files: what the kernel's would
    hold), so the v2 write logic runs on a host without pure v2."""
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")


def test_v2_delegation_enables_every_level(tmp_path: Path) -> None:
    fake_v2_root(tmp_path, "cpu memory pids")
    (tmp_path / "kubepods").mkdir()
    fake_v2_root(tmp_path / "kubepods", "cpu memory pids")
    (tmp_path / "kubepods" / "cgroup.subtree_control").write_text("memory\n")
    (tmp_path / "kubepods" / "pod1").mkdir()
    cgroups.enable_controllers(tmp_path, "/kubepods/pod1")
    # Plain files keep the last write only; the kernel's add up. What matters: each missing
    # controller was written to each level above the target, and none below.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids"
    assert (tmp_path / "kubepods" / "cgroup.subtree_control").read_text() == "+pids"
    assert not (tmp_path / "kubepods" / "pod1" / "cgroup.subtree_control").exists()


def test_v2_update_writes_mapped_files_then_unified(tmp_path: Path) -> None:
    hs = [cgroups.Hierarchy(tmp_path, frozenset({"cpu", "memory", "pids"}), 2)]
    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "memory.swap.max").write_text("max")
    r = Resources(cpu_shares=512, memory_limit=64 << 20, memory_swap=64 << 20,
                  unified=(("memory.oom.group", "1"), ("memory.max", str(48 << 20))))
    cgroups.update("/pod", r, hs)
    assert (pod / "cpu.weight").read_text() == str(cgroups.shares_to_weight(512))
    assert (pod / "memory.swap.max").read_text() == "0"
    assert (pod / "memory.oom.group").read_text() == "1"
    assert (pod / "memory.max").read_text() == str(48 << 20)  # unified wins, as in runc
    assert not (pod / "hugetlb.2MB.max").exists()
    for bad in ("../escape", "cgroup.procs", ""):
        with pytest.raises(CgroupError, match="unified"):
            cgroups.update("/pod", Resources(unified=((bad, "1"),)), hs)
    with pytest.raises(CgroupError, match="not enabled"):
        cgroups.update("/missing", Resources(memory_limit=1 << 20), hs)


def test_v2_without_swap_accounting_skips_no_swap(tmp_path: Path) -> None:
    hs = [cgroups.Hierarchy(tmp_path, frozenset({"memory"}), 2)]
    (tmp_path / "pod").mkdir()
    cgroups.update("/pod", Resources(memory_limit=64 << 20, memory_swap=64 << 20), hs)
    assert sorted(p.name for p in (tmp_path / "pod").iterdir()) == ["memory.max"]


def test_cgroup_dir_and_oom_file_per_hierarchy(tmp_path: Path) -> None:
    v1 = [cgroups.Hierarchy(tmp_path / "memory", frozenset({"memory"}), 1)]
    v2 = [cgroups.Hierarchy(tmp_path, frozenset({"memory", "cpu"}), 2)]
    scope = "/system.slice/flatpod-c1.scope"
    on_disk = "system.slice/flatpod-c1.scope"
    assert cgroups.cgroup_dir(scope, "memory", v1) == tmp_path / "memory" / on_disk
    assert cgroups.oom_events_file(scope, v1).name == "memory.oom_control"
    assert cgroups.cgroup_dir(scope, "cpu", v2) == tmp_path / on_disk
    assert cgroups.oom_events_file(scope, v2) == tmp_path / on_disk / "memory.events"
    with pytest.raises(CgroupError):
        cgroups.cgroup_dir(scope, "cpu", v1)
