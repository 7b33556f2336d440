"""cgroupfs management for pods and containers (no systemd): cgroup v1, hybrid, or pure v2.

Layout: a pod's cgroup is `<cgroup_parent or /flatpod>/flatpod-<pod id>`; the pause and the
workload containers live below it as `<pod>/<container id>` (runc creates those from
`linux.cgroupsPath`). The pod cgroup is created here in every hierarchy so that pod-level
limits and stats have a home, and removed here depth first.

On v1 each controller is its own mount (found in /proc/self/mountinfo; cpu and cpuacct may be
separate mounts). v1 files are read and written through cgroupspy where it has a controller;
pids and v2 files are handled directly. A v2 mount next to v1 ones (hybrid) gets the pod's
directory too, because that is where hugetlb lives on such hosts.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgroupspy.nodes import Node

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PARENT = "/flatpod"
POD_PREFIX = "flatpod-"
# How long remove() waits for a cgroup's last tasks to leave (rmdir says EBUSY until then).
REMOVE_TIMEOUT_S = 5.0
REMOVE_POLL_S = 0.05
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_MOUNT_OPTIONS_NOT_CONTROLLERS = frozenset(
    {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "clone_children", "xattr"}
)


class CgroupError(ValueError):
    """A cgroup path or setting is invalid."""


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy; v2 has version 2 and the controllers it offers."""

    mount_point: Path
    controllers: frozenset[str]
    version: int

    def dir_for(self, path: str) -> Path:
        return self.mount_point / path.strip("/")


@dataclass(frozen=True)
class Resources:
    """Limits flatpod applies itself (v1 units; converted for v2). Zero / empty = unset."""

    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    memory_limit: int = 0
    memory_swap: int = 0  # memory+swap, as v1 memsw and OCI `swap`
    pids_limit: int = 0
    hugepage_limits: tuple[tuple[str, int], ...] = ()  # (page size like "2MB", bytes)

    @classmethod
    def from_cri(cls, r: Any) -> Resources:
        """From a runtime.v1 LinuxContainerResources message."""
        return cls(
            cpu_shares=r.cpu_shares,
            cpu_quota=r.cpu_quota,
            cpu_period=r.cpu_period,
            cpuset_cpus=r.cpuset_cpus,
            cpuset_mems=r.cpuset_mems,
            memory_limit=r.memory_limit_in_bytes,
            memory_swap=r.memory_swap_limit_in_bytes,
            hugepage_limits=tuple((h.page_size, h.limit) for h in r.hugepage_limits),
        )


@dataclass(frozen=True)
class MemoryStats:
    usage: int
    working_set: int  # usage - inactive_file, what kubelet evicts on
    rss: int
    page_faults: int
    major_page_faults: int
    limit: int | None  # None: unlimited


# --------------------------------------------------------------------------------------------
# Paths and hierarchies


def pod_cgroup_path(cgroup_parent: str, pod_id: str) -> str:
    """`<cgroup_parent or /flatpod>/flatpod-<pod_id>` (kubelet's cgroupfs parent is a path)."""
    parent = cgroup_parent or DEFAULT_PARENT
    if not parent.startswith("/") or ".." in parent.split("/"):
        raise CgroupError(f"cgroup_parent {cgroup_parent!r} must be an absolute path without ..")
    return f"{os.path.normpath(parent).rstrip('/')}/{POD_PREFIX}{_safe(pod_id, 'pod id')}"


def container_cgroup_path(pod_path: str, container_id: str) -> str:
    return f"{pod_path.rstrip('/')}/{_safe(container_id, 'container id')}"


def _safe(name: str, what: str) -> str:
    if not _SAFE_NAME.match(name):
        raise CgroupError(f"{what} {name!r} is not a valid cgroup name")
    return name


def parse_hierarchies(mountinfo: str) -> list[Hierarchy]:
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, superopts = fields[sep + 1], fields[sep + 3]
        point = Path(fields[4])
        if fstype == "cgroup":
            ctrls = frozenset(superopts.split(",")) - _MOUNT_OPTIONS_NOT_CONTROLLERS
            found.append(Hierarchy(point, ctrls, 1))
        elif fstype == "cgroup2":
            found.append(Hierarchy(point, _v2_controllers(point), 2))
    return found


def _v2_controllers(point: Path) -> frozenset[str]:
    try:
        return frozenset((point / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def hierarchies() -> list[Hierarchy]:
    """The host's cgroup hierarchies, from /proc/self/mountinfo."""
    return parse_hierarchies(Path("/proc/self/mountinfo").read_text())


def is_unified_only(root: Path = CGROUP_ROOT) -> bool:
    """Pure v2: /sys/fs/cgroup itself is the unified hierarchy."""
    return (root / "cgroup.controllers").exists()


def _v1(controller: str, hs: Sequence[Hierarchy]) -> Hierarchy | None:
    return next((h for h in hs if h.version == 1 and controller in h.controllers), None)


def _v2(hs: Sequence[Hierarchy]) -> Hierarchy | None:
    return next((h for h in hs if h.version == 2), None)


def _owner(controller: str, hs: Sequence[Hierarchy]) -> Hierarchy | None:
    """Where a controller is active: its v1 hierarchy, else the v2 one if it offers it."""
    h = _v1(controller, hs)
    if h is not None:
        return h
    v2 = _v2(hs)
    return v2 if v2 is not None and controller in v2.controllers else None


def _node(h: Hierarchy, path: str) -> Any:
    """A cgroupspy node for `path` in a v1 hierarchy (gives typed controller access)."""
    node = Node(h.mount_point.name.encode(), Node(str(h.mount_point.parent).encode()))
    for part in path.strip("/").split("/"):
        if part:
            node = Node(part.encode(), node)
    return node


# --------------------------------------------------------------------------------------------
# Create, update, remove


def create(path: str, resources: Resources | None = None, hs: Sequence[Hierarchy] | None = None
           ) -> None:  # fmt: skip
    """mkdir -p `path` in every hierarchy, then apply `resources`."""
    hs = list(hs) if hs is not None else hierarchies()
    for h in hs:
        _mkdir_levels(h, path)
    update(path, resources or Resources(), hs)


def _mkdir_levels(h: Hierarchy, path: str) -> None:
    current = h.mount_point
    for part in [p for p in path.strip("/").split("/") if p]:
        parent, current = current, current / part
        try:
            current.mkdir()
        except FileExistsError:
            continue
        if h.version == 1 and "cpuset" in h.controllers:
            # A v1 cpuset cgroup starts with empty cpus/mems and refuses tasks until filled.
            _inherit_cpuset(parent, current)
        if h.version == 2:
            _enable_subtree(parent, h.controllers)


def _inherit_cpuset(parent: Path, child: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not (child / name).read_text().strip():
            (child / name).write_text((parent / name).read_text().strip())


def _enable_subtree(parent: Path, controllers: Iterable[str]) -> None:
    """Hand the controllers down to the child (v2), ignoring those the kernel refuses here."""
    for c in controllers:
        try:
            (parent / "cgroup.subtree_control").write_text(f"+{c}")
        except OSError:
            continue


def update(path: str, resources: Resources, hs: Sequence[Hierarchy] | None = None) -> None:
    """Apply the set fields of `resources` to an existing cgroup."""
    hs = list(hs) if hs is not None else hierarchies()
    _apply_cpu(path, resources, hs)
    _apply_cpuset(path, resources, hs)
    _apply_memory(path, resources, hs)
    _apply_pids(path, resources, hs)
    _apply_hugetlb(path, resources, hs)


def _apply_cpu(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _owner("cpu", hs)
    if h is None or not (r.cpu_shares or r.cpu_quota or r.cpu_period):
        return
    if h.version == 1:
        ctl = _node(h, path).controller
        if r.cpu_shares:
            ctl.shares = r.cpu_shares
        if r.cpu_period:  # before the quota: a quota is checked against the current period
            ctl.cfs_period_us = r.cpu_period
        if r.cpu_quota:
            ctl.cfs_quota_us = r.cpu_quota
        return
    d = h.dir_for(path)
    if r.cpu_shares:
        (d / "cpu.weight").write_text(str(shares_to_weight(r.cpu_shares)))
    if r.cpu_quota or r.cpu_period:
        quota = str(r.cpu_quota) if r.cpu_quota > 0 else "max"
        (d / "cpu.max").write_text(f"{quota} {r.cpu_period or 100000}")


def shares_to_weight(shares: int) -> int:
    """runc's mapping of v1 cpu.shares [2, 262144] onto v2 cpu.weight [1, 10000]."""
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def _apply_cpuset(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _owner("cpuset", hs)
    if h is None:
        return
    d = h.dir_for(path)
    for name, value in (("cpuset.cpus", r.cpuset_cpus), ("cpuset.mems", r.cpuset_mems)):
        if value:
            (d / name).write_text(value)


def _apply_memory(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _owner("memory", hs)
    if h is None or not (r.memory_limit or r.memory_swap):
        return
    d = h.dir_for(path)
    if h.version == 2:
        if r.memory_limit:
            (d / "memory.max").write_text(str(r.memory_limit))
        if r.memory_swap and r.memory_limit:
            (d / "memory.swap.max").write_text(str(max(0, r.memory_swap - r.memory_limit)))
        return
    ctl = _node(h, path).controller
    swap_file = (d / "memory.memsw.limit_in_bytes").exists() and r.memory_swap
    if not swap_file:
        if r.memory_limit:
            ctl.limit_in_bytes = r.memory_limit
        return
    # memsw must stay >= the memory limit at every step: raise memsw first when growing.
    current = int((d / "memory.limit_in_bytes").read_text())
    if r.memory_limit and r.memory_limit <= current:
        ctl.limit_in_bytes = r.memory_limit
        ctl.memsw_limit_in_bytes = r.memory_swap
    else:
        ctl.memsw_limit_in_bytes = r.memory_swap
        if r.memory_limit:
            ctl.limit_in_bytes = r.memory_limit


def _apply_pids(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _owner("pids", hs)
    if h is not None and r.pids_limit:
        (h.dir_for(path) / "pids.max").write_text(str(r.pids_limit))


def _apply_hugetlb(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _owner("hugetlb", hs)
    if h is None or not r.hugepage_limits:
        return
    suffix = "limit_in_bytes" if h.version == 1 else "max"
    for size, limit in r.hugepage_limits:
        (h.dir_for(path) / f"hugetlb.{size}.{suffix}").write_text(str(limit))


def remove(path: str, hs: Sequence[Hierarchy] | None = None,
           timeout_s: float = REMOVE_TIMEOUT_S) -> None:  # fmt: skip
    """rmdir `path` and everything below it in every hierarchy, deepest first.

    Missing directories are fine. A cgroup whose tasks are still exiting answers EBUSY: retry
    until `timeout_s`, then raise (the caller should have killed the tasks).
    """
    hs = list(hs) if hs is not None else hierarchies()
    if not path.strip("/"):
        raise CgroupError("refusing to remove a hierarchy's root cgroup")
    for h in hs:
        top = h.dir_for(path)
        if not top.is_dir():
            continue
        dirs = [Path(dp) for dp, _, _ in os.walk(top)]
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            _rmdir_when_empty(d, timeout_s)


def _rmdir_when_empty(d: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(REMOVE_POLL_S)


# --------------------------------------------------------------------------------------------
# Readers


def pids(path: str, hs: Sequence[Hierarchy] | None = None) -> list[int]:
    """Pids in `path` and below it, from the pids (or memory, or v2) hierarchy."""
    hs = list(hs) if hs is not None else hierarchies()
    h = _v1("pids", hs) or _v1("memory", hs) or _v2(hs)
    if h is None or not h.dir_for(path).is_dir():
        return []
    found: list[int] = []
    for dp, _, _ in os.walk(h.dir_for(path)):
        try:
            text = (Path(dp) / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue
        found += [int(x) for x in text.split()]
    return sorted(set(found))


def read_cpu_usage_ns(path: str, hs: Sequence[Hierarchy] | None = None) -> int:
    hs = list(hs) if hs is not None else hierarchies()
    h = _v1("cpuacct", hs)
    if h is not None:
        return int(_node(h, path).controller.usage)
    v2 = _require(_v2(hs), "cpu")
    stat = _kv(v2.dir_for(path) / "cpu.stat")
    return stat["usage_usec"] * 1000


def read_memory(path: str, hs: Sequence[Hierarchy] | None = None) -> MemoryStats:
    hs = list(hs) if hs is not None else hierarchies()
    h = _require(_owner("memory", hs), "memory")
    if h.version == 1:
        ctl = _node(h, path).controller
        stat: dict[str, int] = {k: int(v) for k, v in ctl.stat.items()}
        usage = int(ctl.usage_in_bytes)
        limit = int(ctl.limit_in_bytes or 0)
        inactive = stat.get("total_inactive_file", 0)
        rss = stat.get("total_rss", 0)
        faults, major = stat.get("total_pgfault", 0), stat.get("total_pgmajfault", 0)
        # v1 reports "unlimited" as a huge page-aligned number.
        unlimited = limit >= 1 << 62 or limit == 0
    else:
        d = h.dir_for(path)
        stat = _kv(d / "memory.stat")
        usage = int((d / "memory.current").read_text())
        raw = (d / "memory.max").read_text().strip()
        limit, unlimited = (0, True) if raw == "max" else (int(raw), False)
        inactive, rss = stat.get("inactive_file", 0), stat.get("anon", 0)
        faults, major = stat.get("pgfault", 0), stat.get("pgmajfault", 0)
    return MemoryStats(
        usage=usage,
        working_set=max(0, usage - inactive),
        rss=rss,
        page_faults=faults,
        major_page_faults=major,
        limit=None if unlimited else limit,
    )


def oom_kill_count(path: str, hs: Sequence[Hierarchy] | None = None) -> int:
    """OOM kills in the cgroup (v1: memory.oom_control's oom_kill; v2: memory.events)."""
    hs = list(hs) if hs is not None else hierarchies()
    h = _require(_owner("memory", hs), "memory")
    name = "memory.oom_control" if h.version == 1 else "memory.events"
    return _kv(h.dir_for(path) / name).get("oom_kill", 0)


def _kv(file: Path) -> dict[str, int]:
    out = {}
    for line in file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _require(h: Hierarchy | None, controller: str) -> Hierarchy:
    if h is None:
        raise CgroupError(f"no cgroup hierarchy offers the {controller} controller")
    return h
