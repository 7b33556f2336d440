"""Where pods and containers sit in the cgroup tree, and the cgroupfs work flatpod does itself:
cgroup v1, hybrid, or pure v2; with either cgroup driver.

cgroupfs driver: a pod's cgroup is `<cgroup_parent or /flatpod>/flatpod-<pod id>`; the pause
and the workload containers live below it as `<pod>/<container id>` (runc creates those from
`linux.cgroupsPath`). The pod cgroup is created here in every hierarchy so that pod-level
limits and stats have a home, and removed here depth first.

systemd driver: kubelet's `cgroup_parent` is a slice (`kubepods-burstable-pod<uid>.slice`)
that kubelet made and owns. The pause and each container are transient scopes in it,
`<prefix>-<id>.scope`, which runc asks systemd for (`cgroupsPath` = `slice:prefix:id`) and
which `runc delete` stops. A pod that names no slice (crictl, critest; kubelet always names
one) gets a slice of its own, `<default slice>-flatpod_<pod id>.slice` (`own_slice`), so that
its stats have a cgroup that holds exactly the pod: systemd makes it when runc starts the
pause's scope in it, and flatpod asks systemd to stop it when the pod is removed
(`stop_slice`). flatpod never makes, writes or removes a slice's or a scope's cgroup itself:
those are systemd's (see `systemd_owned`). Every record keeps its cgroup's path below the
hierarchy root (`PodRecord.cgroup_path`, `ContainerRecord.cgroup_path`), whatever the driver,
and `cgroup_dir` turns it into a directory.

On v1 each controller is its own mount (found in /proc/self/mountinfo; cpu and cpuacct may be
separate mounts). v1 files are read and written through cgroupspy where it has a controller;
pids and v2 files are handled directly. A v2 mount next to v1 ones (hybrid) gets the pod's
directory too, because that is where hugetlb lives on such hosts.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgroupspy.nodes import Node

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PARENT = "/flatpod"
POD_PREFIX = "flatpod-"
# systemd is PID 1 when this exists (sd_booted(3); CRI-O and runc ask the same).
SYSTEMD_RUN_DIR = Path("/run/systemd/system")
# Where scopes go when the pod names no slice: runc's, containerd's and CRI-O's default.
DEFAULT_SLICE = "system.slice"
# Scopes are `flatpod-<id>.scope` (containerd's are `cri-containerd-<id>.scope`).
SCOPE_PREFIX = "flatpod"
# A pod without a slice of kubelet's gets `<default slice stem>-flatpod_<pod id>.slice`: an
# underscore, not a dash, so systemd nests it right below the default slice.
OWN_SLICE_TAG = "flatpod_"
# How long `systemctl stop` of a pod's own slice may take: its scopes are stopped by then, so
# systemd has only the empty slice to stop; the margin is for a node busy with other jobs.
STOP_SLICE_TIMEOUT_S = 60.0
# `systemctl stop` of a unit systemd has not loaded (already stopped and collected).
_SYSTEMCTL_NOT_LOADED = 5
# How long remove() waits for a cgroup's last tasks to leave (rmdir says EBUSY until then).
REMOVE_TIMEOUT_S = 5.0
REMOVE_POLL_S = 0.05
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_UNIFIED_KEY = re.compile(r"^[a-z_]+\.[A-Za-z0-9_.]+$")
_MOUNT_OPTIONS_NOT_CONTROLLERS = frozenset(
    {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "clone_children", "xattr"}
)


class CgroupError(ValueError):
    """A cgroup path or setting is invalid."""


class Driver(enum.Enum):
    """Who makes the cgroups of pods and containers: flatpod and runc (cgroupfs), or systemd."""

    CGROUPFS = "cgroupfs"
    SYSTEMD = "systemd"


def detect_driver(systemd_run_dir: Path = SYSTEMD_RUN_DIR) -> Driver:
    """systemd when it is PID 1 (kubeadm has defaulted kubelet to it since 1.22), else
    cgroupfs: as CRI-O chooses its default."""
    return Driver.SYSTEMD if systemd_run_dir.is_dir() else Driver.CGROUPFS


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
    # cgroup v2 files and values as given (CRI `unified`: kubelet's memory.oom.group,
    # memory.swap.max for LimitedSwap, memory.high...); written last, so they win, as in runc.
    unified: tuple[tuple[str, str], ...] = ()

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
            unified=tuple(sorted(r.unified.items())),
        )



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


def expand_slice(name: str) -> str:
    """A slice's cgroup path, as systemd nests slices by their dashes:
    `a-b-c.slice` is `/a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root `/`."""
    if name == "-.slice":
        return "/"
    stem = name.removesuffix(".slice")
    if stem == name or not _SAFE_NAME.match(name) or ":" in name:
        raise CgroupError(f"{name!r} is not a systemd slice name (like kubepods-pod1.slice)")
    parts = stem.split("-")
    if "" in parts:
        raise CgroupError(f"slice {name!r} has an empty part between dashes")
    return "".join(f"/{'-'.join(parts[: i + 1])}.slice" for i in range(len(parts)))


def systemd_owned(path: str) -> bool:
    """A slice's or a scope's cgroup: systemd makes, limits and removes it, never flatpod."""
    return path.rstrip("/").endswith((".slice", ".scope"))


@dataclass(frozen=True)
class Placement:
    """Where a pod's cgroups are. cgroupfs: `slice` is empty and `pod_path` is the pod cgroup
    flatpod makes. systemd: `slice` is where the scopes go and `pod_path` that slice on disk:
    kubelet's pod slice, or the pod's own (`own_slice`). Pods made before own slices existed
    may have the default slice and no `pod_path`: no pod-level cgroup."""

    pod_path: str
    slice: str = ""

    @property
    def driver(self) -> Driver:
        return Driver.SYSTEMD if self.slice else Driver.CGROUPFS

    def container_path(self, container_id: str) -> str:
        """The cgroup of the pause (its id is the pod's) or of a container, below the root."""
        if not self.slice:
            return container_cgroup_path(self.pod_path, container_id)
        return f"{expand_slice(self.slice).rstrip('/')}/{scope_unit(container_id)}"

    def oci_cgroups_path(self, container_id: str) -> str:
        """`linux.cgroupsPath` for runc: a path, or runc's systemd form `slice:prefix:name`."""
        if not self.slice:
            return container_cgroup_path(self.pod_path, container_id)
        return f"{self.slice}:{SCOPE_PREFIX}:{_safe(container_id, 'container id')}"

    def oci_annotations(self) -> dict[str, str]:
        """What the OCI runtime needs beside `cgroupsPath` to put the process in the scope
        itself. crun's systemd driver on v2 otherwise makes a `container` cgroup below the
        scope and puts the process and its limits there (crun(1): `run.oci.systemd.subgroup`,
        empty for none), where neither flatpod's stats and OOM watch nor kubelet look. runc
        ignores the annotation."""
        return {SYSTEMD_SUBGROUP_ANNOTATION: ""} if self.slice else {}


# crun's name for the cgroup it makes below a systemd scope (see Placement.oci_annotations).
SYSTEMD_SUBGROUP_ANNOTATION = "run.oci.systemd.subgroup"


def scope_unit(container_id: str) -> str:
    """The transient scope runc's systemd driver makes for `slice:prefix:id`."""
    return f"{SCOPE_PREFIX}-{_safe(container_id, 'container id')}.scope"


def placement(driver: Driver, cgroup_parent: str, default_parent: str, pod_id: str) -> Placement:
    """A new pod's placement. kubelet's cgroup_parent is a path with cgroupfs and a slice
    name with systemd (a path ending in a slice is taken by its last part, as containerd
    does). When it names none, `default_parent` stands in with cgroupfs; with systemd the pod
    gets its own slice in `default_parent` (`own_slice`)."""
    if driver is Driver.CGROUPFS:
        return Placement(pod_path=pod_cgroup_path(cgroup_parent or default_parent, pod_id))
    kubelets = os.path.basename(cgroup_parent.rstrip("/"))
    slice_name = kubelets or own_slice(default_parent or DEFAULT_SLICE, pod_id)
    return Placement(pod_path=expand_slice(slice_name), slice=slice_name)


def own_slice(default_slice: str, pod_id: str) -> str:
    """The slice of a pod that names none, in `default_slice`: `system-flatpod_<id>.slice`.

    Why a slice and not the pod's scopes straight in the default slice (as containerd and
    CRI-O place them): the pod's CPU, memory, process count and pressure are then read from
    one cgroup that holds the pod and nothing else, as with kubelet's pod slice; pressure
    cannot be summed from the scopes'. systemd makes it when the first scope names it.
    """
    expand_slice(default_slice)
    stem = "" if default_slice == "-.slice" else f"{default_slice.removesuffix('.slice')}-"
    return f"{stem}{OWN_SLICE_TAG}{_safe(pod_id, 'pod id')}.slice"


def is_own_slice(slice_name: str, pod_id: str) -> bool:
    """`slice_name` is the pod's own (`own_slice`), not one of kubelet's."""
    own = f"{OWN_SLICE_TAG}{pod_id}.slice"
    return slice_name == own or slice_name.endswith(f"-{own}")


def stop_slice(slice_name: str) -> None:
    """Asks systemd to stop a pod's own slice (and with it the cgroup systemd made for it),
    once its scopes are stopped. A slice systemd no longer has is fine. Blocking."""
    expand_slice(slice_name)
    try:
        done = subprocess.run(["systemctl", "stop", slice_name], capture_output=True,
                              text=True, timeout=STOP_SLICE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OSError(f"systemctl stop {slice_name}: {err}") from err
    if done.returncode not in (0, _SYSTEMCTL_NOT_LOADED):
        raise OSError(f"systemctl stop {slice_name} failed (exit {done.returncode}): "
                      f"{done.stderr.strip()[:300]}")


def check_parent(driver: Driver, parent: str) -> None:
    """Raises CgroupError unless `parent` can be a pod's cgroup_parent under `driver`."""
    placement(driver, parent, parent, "0")


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
    """The host's cgroup hierarchies, from /proc/self/mountinfo (read now: the daemon reads
    them once, as HostCgroups)."""
    return parse_hierarchies(Path("/proc/self/mountinfo").read_text())


def is_unified_only(root: Path = CGROUP_ROOT) -> bool:
    """Pure v2: /sys/fs/cgroup itself is the unified hierarchy."""
    return (root / "cgroup.controllers").exists()


@dataclass(frozen=True)
class HostCgroups:
    """The node's cgroup hierarchies, read once when the daemon starts (`rt.host_cgroups`)
    and passed to every operation. Why: reading /proc/self/mountinfo and the v2 root's
    controllers costs about 0.2 ms, and each pod and container operation needed it one to
    three times; cgroup filesystems are not remounted under a running node (runc likewise
    reads its cgroup mount info once per process)."""

    hierarchies: tuple[Hierarchy, ...]
    unified_only: bool

    @classmethod
    def read(cls) -> HostCgroups:
        return cls(tuple(hierarchies()), is_unified_only())


def _given_or_read(hs: Sequence[Hierarchy] | None) -> Sequence[Hierarchy]:
    """The hierarchies the caller holds (the daemon's HostCgroups), else the host's, read
    now (tests and one-off callers)."""
    return hs if hs is not None else hierarchies()


def _v1(controller: str, hs: Sequence[Hierarchy]) -> Hierarchy | None:
    return next((h for h in hs if h.version == 1 and controller in h.controllers), None)


def _v2(hs: Sequence[Hierarchy]) -> Hierarchy | None:
    return next((h for h in hs if h.version == 2), None)


def owner(controller: str, hs: Sequence[Hierarchy]) -> Hierarchy | None:
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
    _refuse_systemd_owned(path, "create")
    hs = _given_or_read(hs)
    for h in hs:
        _mkdir_levels(h, path)
        if h.version == 2:
            enable_controllers(h.mount_point, path)
    update(path, resources or Resources(), hs)


def _refuse_systemd_owned(path: str, what: str) -> None:
    if systemd_owned(path):
        raise CgroupError(f"refusing to {what} {path}: systemd owns slices and scopes")


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


def _inherit_cpuset(parent: Path, child: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not (child / name).read_text().strip():
            (child / name).write_text((parent / name).read_text().strip())


def enable_controllers(mount_point: Path, path: str) -> None:
    """v2 delegation: every controller a level has is enabled in its cgroup.subtree_control,
    from the root down to `path`'s parent, so that `path` has the files its limits go in.

    Only the missing ones are written, one at a time: a controller the kernel refuses at
    some level (a threaded subtree, a parent that has it off) is left off, as runc does, and
    the limit that needs it then fails naming its file. `path` itself gets none: its children
    are made by runc, which enables what they need.
    """
    current = mount_point
    for part in [p for p in path.strip("/").split("/") if p]:
        try:
            available = (current / "cgroup.controllers").read_text().split()
            enabled = set((current / "cgroup.subtree_control").read_text().split())
        except FileNotFoundError:
            return
        for controller in available:
            if controller not in enabled:
                try:
                    (current / "cgroup.subtree_control").write_text(f"+{controller}")
                except OSError:
                    continue
        current = current / part


def update(path: str, resources: Resources, hs: Sequence[Hierarchy] | None = None) -> None:
    """Apply the set fields of `resources` to an existing cgroup (cgroupfs driver only)."""
    _refuse_systemd_owned(path, "write limits into")
    hs = _given_or_read(hs)
    _apply_cpu(path, resources, hs)
    _apply_cpuset(path, resources, hs)
    _apply_memory(path, resources, hs)
    _apply_pids(path, resources, hs)
    _apply_hugetlb(path, resources, hs)
    v2 = _v2(hs)
    if v2 is not None and v2.controllers:
        _apply_v2(v2.dir_for(path), resources, v2, pure=all(h.version == 2 for h in hs))


def _apply_v2(d: Path, r: Resources, v2: Hierarchy, pure: bool) -> None:
    """The v2 files of the controllers v2 has (all of them on a pure v2 host; on a hybrid
    one, those no v1 hierarchy took, like hugetlb here), then the `unified` ones (pure v2
    only: on v1 they have no file, and kubelet sends them only on v2)."""
    for name, value in v2_files(r):
        if name.split(".", 1)[0] not in v2.controllers:
            continue
        if name == "memory.swap.max" and value in ("0", "max") and not (d / name).exists():
            continue  # no swap accounting: "no swap" and "any swap" need no file (runc)
        _write(d, name, value)
    for name, value in r.unified if pure else ():
        check_unified_key(name)
        _write(d, name, value)


def check_unified_key(name: str) -> None:
    """A CRI `unified` key must name a controller's file in the cgroup (`memory.high`), not
    a path or one of the cgroup core's own files (`cgroup.procs`)."""
    if not _UNIFIED_KEY.match(name) or name.startswith("cgroup."):
        raise CgroupError(f"unified key {name!r} is not a cgroup v2 resource file")


def _write(d: Path, name: str, value: str) -> None:
    try:
        (d / name).write_text(value)
    except FileNotFoundError:
        raise CgroupError(
            f"cgroup {d} has no {name}: its controller is not enabled there"
        ) from None
    except OSError as e:
        raise OSError(e.errno, f"writing {value!r} to {d / name}: {e.strerror}") from None


def v2_files(r: Resources) -> list[tuple[str, str]]:
    """The v2 files and values of `r`'s v1-unit fields, mapped as runc maps an OCI spec's:
    shares to cpu.weight, quota and period to cpu.max, memory+swap to the swap-only
    memory.swap.max. Written in this order; `unified` is applied after them."""
    files: list[tuple[str, str]] = []
    if r.cpu_shares:
        files.append(("cpu.weight", str(shares_to_weight(r.cpu_shares))))
    cpu_max = cpu_max_value(r.cpu_quota, r.cpu_period)
    if cpu_max:
        files.append(("cpu.max", cpu_max))
    files += [(n, v) for n, v in (("cpuset.cpus", r.cpuset_cpus), ("cpuset.mems", r.cpuset_mems))
              if v]  # fmt: skip
    swap = swap_max_value(r.memory_swap, r.memory_limit)
    if swap is not None:  # before memory.max, as runc writes them
        files.append(("memory.swap.max", swap))
    if r.memory_limit:
        files.append(("memory.max", _max_or(r.memory_limit)))
    if r.pids_limit:
        files.append(("pids.max", _max_or(r.pids_limit)))
    files += [(f"hugetlb.{size}.max", str(limit)) for size, limit in r.hugepage_limits]
    return files


def _max_or(value: int) -> str:
    return "max" if value < 0 else str(value)


def cpu_max_value(quota: int, period: int) -> str:
    """cpu.max from CFS quota and period (runc): no quota is "max"; without a period the
    kernel keeps the one it has. Empty when neither is set."""
    if not (quota or period):
        return ""
    value = str(quota) if quota > 0 else "max"
    return f"{value} {period}" if period else value


def swap_max_value(memory_swap: int, memory_limit: int) -> str | None:
    """memory.swap.max from OCI's memory+swap, as runc converts it: v2 limits swap alone.
    None: leave it. Equal limits mean no swap ("0"), as on v1."""
    if memory_limit == -1 and memory_swap == 0:
        return "max"  # unlimited memory, swap not given: both unlimited, as v1 does
    if memory_swap in (0, -1):
        return None if memory_swap == 0 else "max"
    if memory_limit <= 0:
        raise CgroupError("a swap limit needs a memory limit (memory_limit_in_bytes)")
    if memory_swap < memory_limit:
        raise CgroupError(
            f"memory_swap_limit_in_bytes {memory_swap} is below memory_limit_in_bytes "
            f"{memory_limit} (it counts memory plus swap)"
        )
    return str(memory_swap - memory_limit)


def _apply_cpu(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _v1("cpu", hs)
    if h is None or not (r.cpu_shares or r.cpu_quota or r.cpu_period):
        return
    ctl = _node(h, path).controller
    if r.cpu_shares:
        ctl.shares = r.cpu_shares
    if r.cpu_period:  # before the quota: a quota is checked against the current period
        ctl.cfs_period_us = r.cpu_period
    if r.cpu_quota:
        ctl.cfs_quota_us = r.cpu_quota


def shares_to_weight(shares: int) -> int:
    """runc's mapping of v1 cpu.shares [2, 262144] onto v2 cpu.weight [1, 10000]."""
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def _apply_cpuset(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _v1("cpuset", hs)
    if h is None:
        return
    d = h.dir_for(path)
    for name, value in (("cpuset.cpus", r.cpuset_cpus), ("cpuset.mems", r.cpuset_mems)):
        if value:
            (d / name).write_text(value)


def _apply_memory(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _v1("memory", hs)
    if h is None or not (r.memory_limit or r.memory_swap):
        return
    d = h.dir_for(path)
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
    h = _v1("pids", hs)
    if h is not None and r.pids_limit:
        (h.dir_for(path) / "pids.max").write_text(_max_or(r.pids_limit))


def _apply_hugetlb(path: str, r: Resources, hs: Sequence[Hierarchy]) -> None:
    h = _v1("hugetlb", hs)
    if h is None:
        return
    for size, limit in r.hugepage_limits:
        (h.dir_for(path) / f"hugetlb.{size}.limit_in_bytes").write_text(str(limit))


def remove(path: str, hs: Sequence[Hierarchy] | None = None,
           timeout_s: float = REMOVE_TIMEOUT_S) -> None:  # fmt: skip
    """rmdir `path` and everything below it in every hierarchy, deepest first.

    Missing directories are fine. A cgroup whose tasks are still exiting answers EBUSY: retry
    until `timeout_s`, then raise (the caller should have killed the tasks).
    """
    if not path.strip("/"):
        raise CgroupError("refusing to remove a hierarchy's root cgroup")
    _refuse_systemd_owned(path, "remove")
    hs = _given_or_read(hs)
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
    hs = _given_or_read(hs)
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


def cgroup_dir(cgroup_path: str, controller: str, hs: Sequence[Hierarchy] | None = None) -> Path:
    """The directory on disk of a pod's or container's cgroup for `controller`: its v1
    hierarchy's, else the v2 one's (on pure v2, the one directory for every controller).

    `cgroup_path` is the record's (`PodRecord.cgroup_path`, `ContainerRecord.cgroup_path`),
    the same for both drivers: with systemd it names the slice or scope as systemd nests it.
    Raises CgroupError when no hierarchy offers `controller`.
    """
    hs = _given_or_read(hs)
    return _require(owner(controller, hs), controller).dir_for(cgroup_path)


def oom_events_file(cgroup_path: str, hs: Sequence[Hierarchy] | None = None) -> Path:
    """The file whose `oom_kill` line counts the cgroup's OOM kills: v1's memory.oom_control,
    v2's memory.events (which counts the cgroup's descendants too)."""
    hs = _given_or_read(hs)
    h = _require(owner("memory", hs), "memory")
    name = "memory.oom_control" if h.version == 1 else "memory.events"
    return h.dir_for(cgroup_path) / name




def _require(h: Hierarchy | None, controller: str) -> Hierarchy:
    if h is None:
        raise CgroupError(f"no cgroup hierarchy offers the {controller} controller")
    return h
