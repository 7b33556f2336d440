"""OCI runtime configs (config.json as a dict) for flat pods: the pause and workload containers.

The builders are pure translations of CRI messages into what runc 1.1.5 accepts. The only I/O
is read-only inspection of inputs the caller names: host paths of CRI mounts and devices
(existence, symlinks, device numbers), the mount table (propagation of mount sources), /dev
for privileged containers, and Localhost seccomp profiles.

Flat pods: the pause owns the pod's namespaces; flatpod pins them as files and workload
containers join those files (SandboxPaths), never /proc/<pid>/ns.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_api import api_pb2 as pb
from sandbox import apparmor, cgroups, seccomp, users

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_PAUSE_ARGS: tuple[str, ...] = ("/catatonit", "-P")
# What kubelet/containerd give the pause: survive OOM killing almost last.
DEFAULT_PAUSE_OOM_SCORE_ADJ = -998
DEFAULT_SHM_SIZE = 64 * 1024 * 1024

# containerd's default capability set for CRI containers.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip

# Every capability up to CAP_CHECKPOINT_RESTORE (40), in kernel order.
ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip

# containerd's defaults, as kubelet also sends them for procMount: Default.
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)  # fmt: skip

# Sysctls that live in a namespace flatpod gives the pod (prefix match unless exact).
IPC_SYSCTL_PREFIXES: tuple[str, ...] = ("kernel.shm", "kernel.msg", "fs.mqueue.")
IPC_SYSCTLS_EXACT: tuple[str, ...] = ("kernel.sem",)
NET_SYSCTL_PREFIX = "net."

# /dev entries a privileged container must not get from the host (containerd skips them too).
HOST_DEV_SKIP_DIRS: frozenset[str] = frozenset(
    {"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"}
)
HOST_DEV_SKIP_FILES: frozenset[str] = frozenset({"console"})

PROPAGATION_OPTIONS: dict[int, str] = {
    pb.PROPAGATION_PRIVATE: "rprivate",
    pb.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    pb.PROPAGATION_BIDIRECTIONAL: "rshared",
}


class SpecError(ValueError):
    """The CRI config cannot be turned into a valid OCI spec; the message names the field."""


@dataclass(frozen=True)
class SpecDefaults:
    """Node-level defaults of every container's spec, the same for all (no config key sets
    them)."""

    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    # What "ALL" and privileged mean: every capability the daemon itself may pass on. runc
    # cannot grant one outside its bounding set (here root lacks CAP_SYS_RESOURCE), so, as
    # containerd does with the current process's caps, nothing outside it is asked for.
    available_capabilities: tuple[str, ...] = field(default_factory=lambda: bounding_set())
    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY_PATHS
    arch: str = "x86_64"
    # hugetlb is only on the v2 mount here; runc's v1 manager fails on limits it cannot place,
    # so hugepage limits go into the spec only when a v1 hugetlb hierarchy exists.
    hugetlb_available: bool = False
    # memory.memsw exists (swap accounting): then swap is limited like containerd does.
    swap_available: bool = True
    # The host is pure cgroup v2: CRI `unified` goes into the spec, and each container gets
    # its own cgroup namespace (as containerd does; not on v1, where runc would bind the
    # host's hierarchies anyway).
    cgroup_v2: bool = False
    pids_limit: int | None = None
    # RLIMIT_NOFILE (soft = hard); must not exceed the daemon's hard limit. None: runc's default.
    nofile_limit: int | None = None
    shm_size: int = DEFAULT_SHM_SIZE
    # Where AppArmor is enabled: the kernel's list of loaded profiles, which a Localhost
    # profile must be in; None: a node without AppArmor, where none can be applied.
    apparmor_profiles: Path | None = None
    mountinfo: Path = Path("/proc/self/mountinfo")
    dev_root: Path = Path("/dev")


@dataclass(frozen=True)
class SandboxPaths:
    """Where a pod's shared state lives; None where the pod uses the host's instead."""

    netns: Path | None
    ipc: Path | None
    uts: Path | None
    pid: Path | None  # None when pid=CONTAINER (no shared pod pid namespace) or NODE
    hostname: Path | None
    resolv_conf: Path | None
    shm: Path | None  # the pod's /dev/shm tmpfs dir; None for host IPC
    hosts: Path | None
    user: Path | None = None  # the pod's pinned user namespace; None: the host's


# ---------------------------------------------------------------------------------------------
# Process: args, env, identity, capabilities


def merge_args(
    command: Sequence[str], args: Sequence[str], entrypoint: Sequence[str], cmd: Sequence[str]
) -> list[str]:
    """kubelet/containerd: command replaces Entrypoint and drops Cmd; args replaces Cmd."""
    if command:
        result = [*command, *args]
    elif args:
        result = [*entrypoint, *args]
    else:
        result = [*entrypoint, *cmd]
    if not result:
        raise SpecError("no command specified: set command/args or the image's Entrypoint/Cmd")
    return result


def merge_env(*layers: Iterable[str]) -> list[str]:
    """KEY=VALUE lists, later layers replacing a key in place (first occurrence's position)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for item in layer:
            key = item.split("=", 1)[0]
            merged[key] = item
    return list(merged.values())


def normalise_cap(name: str, field_name: str) -> str:
    cap = name.strip().upper()
    cap = cap if cap.startswith("CAP_") else "CAP_" + cap
    if cap not in ALL_CAPABILITIES:
        raise SpecError(f"{field_name}: unknown capability {name!r}")
    return cap


def bounding_set(status: Path = Path("/proc/self/status")) -> tuple[str, ...]:
    """The capabilities in this process's bounding set, by name."""
    for line in status.read_text().splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split()[1], 16)
            return tuple(c for n, c in enumerate(ALL_CAPABILITIES) if mask >> n & 1)
    return ALL_CAPABILITIES


def effective_capabilities(
    defaults: Sequence[str],
    add: Sequence[str],
    drop: Sequence[str],
    privileged: bool,
    available: Sequence[str] = ALL_CAPABILITIES,
) -> list[str]:
    """containerd's order: "ALL" in add, then "ALL" in drop, then single adds, then drops.

    The result never holds a capability outside `available` (the daemon's bounding set).
    """
    if privileged:
        return list(available)
    caps = list(defaults)
    if any(a.upper() == "ALL" for a in add):
        caps = list(available)
    if any(d.upper() == "ALL" for d in drop):
        caps = []
    for name in add:
        if name.upper() != "ALL":
            cap = normalise_cap(name, "capabilities.add_capabilities")
            if cap not in caps:
                caps.append(cap)
    dropped = {
        normalise_cap(n, "capabilities.drop_capabilities") for n in drop if n.upper() != "ALL"
    }
    return [c for c in caps if c not in dropped and c in available]


def capabilities_object(caps: Sequence[str], ambient: Sequence[str]) -> dict[str, list[str]]:
    """The OCI capability sets. Inheritable stays empty (CVE-2022-24769) unless ambient is asked
    for: the kernel only keeps ambient capabilities that are permitted and inheritable."""
    amb = [normalise_cap(a, "capabilities.add_ambient_capabilities") for a in ambient]
    full = list(dict.fromkeys([*caps, *amb]))
    return {
        "bounding": full,
        "effective": full,
        "permitted": full,
        "inheritable": list(amb),
        "ambient": list(amb),
    }


def clamp_oom_score_adj(value: int, floor: int) -> int:
    """Like containerd's restrict_oom_score_adj: never below the daemon's own value."""
    return max(min(value, 1000), floor, -1000)


# ---------------------------------------------------------------------------------------------
# Mounts


def _mount(dest: str, mtype: str, source: str, options: Sequence[str]) -> dict[str, Any]:
    return {"destination": dest, "type": mtype, "source": source, "options": list(options)}


def _bind(
    dest: str, source: Path | str, readonly: bool, propagation: str = "rprivate"
) -> dict[str, Any]:
    return _mount(dest, "bind", str(source), ["rbind", propagation, "ro" if readonly else "rw"])


def default_mounts(*, privileged: bool, shm_size: int, with_cgroup: bool) -> list[dict[str, Any]]:
    """containerd's CRI defaults (no /run); sysfs and cgroupfs writable only when privileged."""
    sys_opt = [] if privileged else ["ro"]
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        _mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size // 1024}k"],
        ),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", *sys_opt]),
    ]
    if with_cgroup:
        mounts.append(
            _mount(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                ["nosuid", "noexec", "nodev", "relatime", *sys_opt],
            )
        )
    return mounts


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    propagation: frozenset[str]  # optional fields: "shared:N", "master:N", ...


def parse_mountinfo(text: str) -> list[MountInfo]:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        sep = fields.index("-")
        point = fields[4].replace("\\040", " ")
        entries.append(MountInfo(point, frozenset(f.split(":")[0] for f in fields[6:sep])))
    return entries


def mount_of(path: str, table: Sequence[MountInfo]) -> MountInfo | None:
    """The mount holding `path` (the last one on the longest matching mount point)."""
    best: MountInfo | None = None
    for entry in table:
        mp = entry.mount_point.rstrip("/") or "/"
        inside = path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/"
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = entry
    return best


def check_propagation(source: str, propagation: int, table: Sequence[MountInfo], dest: str) -> None:
    """As containerd/CRI-O: rshared needs a shared source mount, rslave a shared or slave one."""
    if propagation == pb.PROPAGATION_PRIVATE:
        return
    entry = mount_of(source, table)
    kinds = entry.propagation if entry else frozenset()
    if propagation == pb.PROPAGATION_BIDIRECTIONAL and "shared" not in kinds:
        raise SpecError(
            f"mount {dest}: host path {source!r} is not on a shared mount "
            f"(needed for bidirectional propagation)"
        )
    if propagation == pb.PROPAGATION_HOST_TO_CONTAINER and not kinds & {"shared", "master"}:
        raise SpecError(
            f"mount {dest}: host path {source!r} is not on a shared or slave mount "
            f"(needed for host-to-container propagation)"
        )


def cri_mount(m: pb.Mount, table: Sequence[MountInfo]) -> dict[str, Any]:
    """One CRI mount as an OCI bind mount, validated."""
    dest = m.container_path
    if not dest.startswith("/"):
        raise SpecError(f"mount {dest!r}: container_path must be absolute")
    if m.image.image:
        raise SpecError(f"mount {dest}: image volumes are not supported")
    if len(m.uidMappings) or len(m.gidMappings):
        raise SpecError(f"mount {dest}: idmapped mounts are not supported")
    if m.propagation not in PROPAGATION_OPTIONS:
        raise SpecError(f"mount {dest}: unknown propagation {m.propagation}")
    if not m.host_path:
        raise SpecError(f"mount {dest}: host_path is empty")
    source = os.path.realpath(m.host_path)
    if not os.path.exists(source):
        raise SpecError(f"mount {dest}: host path {m.host_path!r} does not exist")
    if m.recursive_read_only:
        if not m.readonly:
            raise SpecError(f"mount {dest}: recursive_read_only requires readonly")
        if m.propagation != pb.PROPAGATION_PRIVATE:
            raise SpecError(f"mount {dest}: recursive_read_only requires private propagation")
    check_propagation(source, m.propagation, table, dest)
    options = ["rbind", PROPAGATION_OPTIONS[m.propagation], "ro" if m.readonly else "rw"]
    if m.recursive_read_only:
        options.append("rro")
    # selinux_relabel is ignored: no SELinux on flatpod hosts.
    return _mount(os.path.normpath(dest), "bind", source, options)


def rootfs_propagation(mounts: Iterable[pb.Mount]) -> str | None:
    """The rootfs must propagate at least as much as the strongest CRI mount asks for."""
    kinds = {m.propagation for m in mounts}
    if pb.PROPAGATION_BIDIRECTIONAL in kinds:
        return "rshared"
    if pb.PROPAGATION_HOST_TO_CONTAINER in kinds:
        return "rslave"
    return None


def merge_mounts(
    defaults: list[dict[str, Any]], extra: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`extra` mounts replace defaults with the same destination; parents before children."""
    taken = {m["destination"] for m in extra}
    kept = [m for m in defaults if m["destination"] not in taken]
    ordered = sorted(extra, key=lambda m: len(Path(m["destination"]).parts))
    return kept + ordered


# ---------------------------------------------------------------------------------------------
# Devices


def device_entry(host_path: str, container_path: str) -> dict[str, Any] | None:
    """OCI device for a char/block node (symlinks followed); None for anything else."""
    st = os.stat(host_path)
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return {
        "path": container_path,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def host_devices(dev_root: Path) -> list[dict[str, Any]]:
    """Every char/block device under /dev for privileged containers (symlinks skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(dev_root):
        dirnames[:] = [d for d in dirnames if d not in HOST_DEV_SKIP_DIRS]
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name in HOST_DEV_SKIP_FILES or os.path.islink(path):
                continue
            try:
                dev = device_entry(path, "/dev/" + os.path.relpath(path, dev_root))
            except OSError:
                continue
            if dev is not None:
                found.append(dev)
    return found


def cri_devices(devices: Iterable[pb.Device]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CRI devices → (OCI devices, device cgroup allow rules). Directories are walked."""
    devs: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for d in devices:
        perms = d.permissions or "rwm"
        if set(perms) - set("rwm"):
            raise SpecError(f"device {d.host_path}: invalid permissions {d.permissions!r}")
        if not os.path.exists(d.host_path):
            raise SpecError(f"device {d.host_path!r} does not exist")
        if os.path.isdir(d.host_path):
            found = [
                dict(e, path=os.path.join(d.container_path, os.path.relpath(e["path"], "/dev")))
                for e in host_devices(Path(d.host_path))
            ]
        else:
            entry = device_entry(d.host_path, d.container_path)
            if entry is None:
                raise SpecError(f"device {d.host_path!r} is not a character or block device")
            found = [entry]
        for e in found:
            devs.append(e)
            rules.append(
                {"allow": True, "type": e["type"], "major": e["major"], "minor": e["minor"],
                 "access": perms}
            )  # fmt: skip
    return devs, rules


# ---------------------------------------------------------------------------------------------
# Sysctls, seccomp, resources


def validate_sysctls(sysctls: dict[str, str], *, host_network: bool, host_ipc: bool) -> None:
    for key in sysctls:
        ipc = key in IPC_SYSCTLS_EXACT or key.startswith(IPC_SYSCTL_PREFIXES)
        net = key.startswith(NET_SYSCTL_PREFIX)
        if ipc and host_ipc:
            raise SpecError(f"sysctl {key!r} is not allowed with host IPC")
        if net and host_network:
            raise SpecError(f"sysctl {key!r} is not allowed with host network")
        if not (ipc or net):
            raise SpecError(f"sysctl {key!r} is not namespaced and cannot be set for a pod")


def seccomp_profile(
    profile: pb.SecurityProfile | None, legacy_path: str, caps: Sequence[str], arch: str
) -> dict[str, Any] | None:
    """The seccomp object for a security context; None means unconfined.

    `profile` (the `seccomp` field) wins when set; else the deprecated seccomp_profile_path;
    neither set means unconfined, as kubelet asks for when SeccompDefault is off.
    """
    if profile is not None:
        if profile.profile_type == pb.SecurityProfile.RuntimeDefault:
            return seccomp.profile_for(caps, arch)
        if profile.profile_type == pb.SecurityProfile.Unconfined:
            return None
        return _localhost(profile.localhost_ref, "seccomp.localhost_ref", caps, arch)
    if legacy_path in ("", "unconfined"):
        return None
    if legacy_path in ("runtime/default", "docker/default"):
        return seccomp.profile_for(caps, arch)
    if legacy_path.startswith("localhost/"):
        return _localhost(legacy_path.removeprefix("localhost"), "seccomp_profile_path", caps, arch)
    raise SpecError(f"seccomp_profile_path: unknown profile {legacy_path!r}")


def _apparmor_profile(
    profile: pb.SecurityProfile | None, legacy: str, d: SpecDefaults, where: str
) -> str | None:
    try:
        return apparmor.profile_for(profile, legacy, d.apparmor_profiles, where)
    except apparmor.AppArmorError as err:
        raise SpecError(str(err)) from err


def _localhost(path: str, field_name: str, caps: Sequence[str], arch: str) -> dict[str, Any]:
    if not path.startswith("/"):
        raise SpecError(f"{field_name}: localhost profile {path!r} must be an absolute path")
    try:
        return seccomp.load_localhost_profile(path, caps, arch)
    except seccomp.SeccompError as e:
        raise SpecError(f"{field_name}: {e}") from None


def linux_resources(r: pb.LinuxContainerResources, defaults: SpecDefaults) -> dict[str, Any]:
    """The cgroup settings runc applies (v1 names; runc converts them for v2, then writes
    `unified`, which kubelet sends on v2 only and which is dropped on v1); hugepage limits only
    where runc can place them (see SpecDefaults)."""
    out: dict[str, Any] = {}
    cpu = {
        k: v
        for k, v in (
            ("shares", r.cpu_shares),
            ("quota", r.cpu_quota),
            ("period", r.cpu_period),
            ("cpus", r.cpuset_cpus),
            ("mems", r.cpuset_mems),
        )
        if v
    }
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, int] = {}
    if r.memory_limit_in_bytes:
        memory["limit"] = r.memory_limit_in_bytes
        if defaults.swap_available:
            # Equal limits forbid swapping, containerd's default when no swap limit is given.
            memory["swap"] = r.memory_swap_limit_in_bytes or r.memory_limit_in_bytes
    elif r.memory_swap_limit_in_bytes and defaults.swap_available:
        memory["swap"] = r.memory_swap_limit_in_bytes
    if memory:
        out["memory"] = memory
    if r.hugepage_limits and defaults.hugetlb_available:
        out["hugepageLimits"] = [
            {"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits
        ]
    if defaults.pids_limit:
        out["pids"] = {"limit": defaults.pids_limit}
    if r.unified and defaults.cgroup_v2:
        for key in r.unified:
            try:
                cgroups.check_unified_key(key)
            except cgroups.CgroupError as e:
                raise SpecError(f"resources.unified: {e}") from None
        out["unified"] = dict(sorted(r.unified.items()))
    return out


def _rlimits(defaults: SpecDefaults) -> list[dict[str, Any]]:
    if defaults.nofile_limit is None:
        return []
    n = defaults.nofile_limit
    return [{"type": "RLIMIT_NOFILE", "hard": n, "soft": n}]


# ---------------------------------------------------------------------------------------------
# User namespaces

MAX_ID = 2**32 - 1  # (uid_t)-1 is never a valid id
_MODE_NAMES = {pb.POD: "POD", pb.CONTAINER: "CONTAINER", pb.NODE: "NODE", pb.TARGET: "TARGET"}
_USERNS_FIELD = "namespace_options.userns_options"


@dataclass(frozen=True)
class IdMap:
    container_id: int
    host_id: int
    size: int

    def oci(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


@dataclass(frozen=True)
class PodUserns:
    """A pod's own user namespace (mode POD): one uid and one gid range, starting at 0."""

    uids: IdMap
    gids: IdMap

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the namespace's root."""
        return self.uids.host_id, self.gids.host_id

    def proc_map(self, kind: str) -> str:
        """What to write to /proc/<pid>/{uid,gid}_map."""
        m = self.uids if kind == "uid" else self.gids
        return f"{m.container_id} {m.host_id} {m.size}\n"

    def oci(self) -> dict[str, list[dict[str, int]]]:
        return {"uidMappings": [self.uids.oci()], "gidMappings": [self.gids.oci()]}


def _one_mapping(mappings: Sequence[pb.IDMapping], name: str) -> IdMap:
    where = f"{_USERNS_FIELD}.{name}"
    if len(mappings) != 1:
        raise SpecError(f"{where}: exactly one mapping is supported, got {len(mappings)}")
    m = mappings[0]
    if m.container_id != 0:
        raise SpecError(
            f"{where}: container ID 0 must be mapped (the mapping starts at {m.container_id})"
        )
    if m.length == 0 or m.host_id + m.length > MAX_ID:
        raise SpecError(
            f"{where}: host range {m.host_id}+{m.length} is empty or beyond {MAX_ID - 1}"
        )
    return IdMap(m.container_id, m.host_id, m.length)


def pod_userns(sc: pb.LinuxSandboxSecurityContext) -> PodUserns | None:
    """The pod's user namespace (None: the host's), validated as containerd and CRI-O do:
    POD needs exactly one uid and one gid mapping, with container ID 0 mapped; NODE takes no
    mappings; CONTAINER and TARGET are not modes a user namespace can have. A pod with its own
    user namespace cannot use the node's network, IPC or PID namespace (kubelet forbids it,
    and the kernel would refuse the pod's sysfs, mqueue or proc mounts)."""
    opts = sc.namespace_options
    if not opts.HasField("userns_options"):
        return None
    u = opts.userns_options
    mode = _MODE_NAMES.get(u.mode, str(u.mode))
    if u.mode == pb.NODE:
        if len(u.uids) or len(u.gids):
            raise SpecError(f"{_USERNS_FIELD}: mode NODE takes no uids or gids mappings")
        return None
    if u.mode != pb.POD:
        raise SpecError(f"{_USERNS_FIELD}.mode: {mode} is not supported (use POD or NODE)")
    userns = PodUserns(_one_mapping(u.uids, "uids"), _one_mapping(u.gids, "gids"))
    for name, value in (("network", opts.network), ("ipc", opts.ipc), ("pid", opts.pid)):
        if value == pb.NODE:
            raise SpecError(
                f"namespace_options.{name}: NODE cannot be combined with a pod user namespace"
            )
    return userns


def container_userns(sc: pb.LinuxContainerSecurityContext, pod: PodUserns | None) -> None:
    """A container shares its pod's user namespace. Its own userns_options, when given, must
    say the same: POD (with no mappings, or the pod's) in a POD pod, NODE in a NODE pod."""
    if not sc.namespace_options.HasField("userns_options"):
        return
    u = sc.namespace_options.userns_options
    mode = _MODE_NAMES.get(u.mode, str(u.mode))
    if u.mode not in (pb.POD, pb.NODE):
        raise SpecError(f"{_USERNS_FIELD}.mode: {mode} is not supported (use POD or NODE)")
    if (u.mode == pb.POD) != (pod is not None):
        raise SpecError(
            f"{_USERNS_FIELD}.mode: {mode} differs from the pod sandbox's user namespace "
            f"({'POD' if pod else 'NODE'})"
        )
    if pod is not None and (len(u.uids) or len(u.gids)):
        mine = PodUserns(_one_mapping(u.uids, "uids"), _one_mapping(u.gids, "gids"))
        if mine != pod:
            raise SpecError(f"{_USERNS_FIELD}: mappings differ from the pod sandbox's")


def _check_mapped(userns: PodUserns | None, uid: int, gids: Iterable[int], where: str) -> None:
    if userns is None:
        return
    if uid >= userns.uids.size:
        raise SpecError(f"{where}: uid {uid} is not mapped in the pod's user namespace")
    for gid in gids:
        if gid >= userns.gids.size:
            raise SpecError(f"{where}: gid {gid} is not mapped in the pod's user namespace")


# ---------------------------------------------------------------------------------------------
# Namespaces


def _ns(kind: str, path: Path | None = None) -> dict[str, str]:
    return {"type": kind, "path": str(path)} if path is not None else {"type": kind}


def _ns_options(sc: Any) -> pb.NamespaceOption:
    if sc is None or not sc.HasField("namespace_options"):
        return pb.NamespaceOption()
    opts: pb.NamespaceOption = sc.namespace_options
    return opts


def container_namespaces(
    opts: pb.NamespaceOption, sandbox: SandboxPaths, target_pid_ns: Path | None
) -> list[dict[str, str]]:
    """Join the pod's pinned files; new mount namespace (the cgroup namespace, on v2 only,
    is the caller's).

    The pod's user namespace comes first: runc joins it before the others (it orders the
    paths itself, user first), and the pod's netns, IPC, UTS and PID namespaces belong to it,
    so only a process inside it may join them with the capabilities it has there."""
    nss = [_ns("user", sandbox.user)] if sandbox.user is not None else []
    nss.append(_ns("mount"))
    if opts.network != pb.NODE:
        if sandbox.netns is None:
            raise SpecError("namespace_options.network: the pod has no network namespace")
        nss.append(_ns("network", sandbox.netns))
    if opts.ipc != pb.NODE:
        if sandbox.ipc is None:
            raise SpecError("namespace_options.ipc: the pod has no IPC namespace")
        nss.append(_ns("ipc", sandbox.ipc))
    if sandbox.uts is not None:
        nss.append(_ns("uts", sandbox.uts))
    if opts.pid == pb.POD:
        if sandbox.pid is None:
            raise SpecError("namespace_options.pid: the pod has no shared PID namespace")
        nss.append(_ns("pid", sandbox.pid))
    elif opts.pid == pb.CONTAINER:
        nss.append(_ns("pid"))
    elif opts.pid == pb.TARGET:
        if target_pid_ns is None:
            raise SpecError(f"namespace_options.target_id: no PID namespace for {opts.target_id!r}")
        nss.append(_ns("pid", target_pid_ns))
    return nss


# ---------------------------------------------------------------------------------------------
# Builders


def _security_masks(
    privileged: bool, masked: Sequence[str], readonly: Sequence[str]
) -> dict[str, list[str]]:
    if privileged:
        return {}
    return {"maskedPaths": list(masked), "readonlyPaths": list(readonly)}


def _pause_user(sc: pb.LinuxSandboxSecurityContext) -> dict[str, Any]:
    uid = sc.run_as_user.value if sc.HasField("run_as_user") else 0
    gid = sc.run_as_group.value if sc.HasField("run_as_group") else 0
    gids = list(dict.fromkeys([gid, *sc.supplemental_groups]))
    return {"uid": uid, "gid": gid, "additionalGids": gids}


def build_pause_spec(
    pod: pb.PodSandboxConfig,
    *,
    rootfs: Path,
    netns_path: Path | None,
    cgroups_path: str,
    args: Sequence[str] = DEFAULT_PAUSE_ARGS,
    oom_score_adj: int = DEFAULT_PAUSE_OOM_SCORE_ADJ,
    oom_score_adj_floor: int = -1000,
    shm_path: Path | None = None,
    defaults: SpecDefaults | None = None,
    userns_path: Path | None = None,
) -> dict[str, Any]:
    """The pause container: owns the pod's IPC/UTS/PID namespaces and sits in its netns.

    `netns_path` is None for host network. `shm_path` is the pod's /dev/shm dir to bind
    (else a private tmpfs). The pause needs no capabilities. `userns_path` is the pod's pinned
    user namespace (mode POD), which flatpod made with the netns inside it: the pause joins
    both and its new IPC, UTS and PID namespaces belong to that user namespace too.
    """
    d = defaults or SpecDefaults()
    sc = pod.linux.security_context
    opts = _ns_options(sc)
    userns = pod_userns(sc)
    if (userns is None) != (userns_path is None):
        raise SpecError(f"{_USERNS_FIELD}: userns_path must be given iff the mode is POD")
    host_net = opts.network == pb.NODE
    host_ipc = opts.ipc == pb.NODE
    if host_net != (netns_path is None):
        raise SpecError("namespace_options.network: netns_path must be given iff not host network")
    sysctls = dict(pod.linux.sysctls)
    validate_sysctls(sysctls, host_network=host_net, host_ipc=host_ipc)

    nss = [_ns("user", userns_path)] if userns_path is not None else []
    nss.append(_ns("mount"))
    if netns_path is not None:
        nss.append(_ns("network", netns_path))
    if not host_ipc:
        nss.append(_ns("ipc"))
    if not host_net:
        nss.append(_ns("uts"))
    if opts.pid != pb.NODE:
        nss.append(_ns("pid"))

    mounts = default_mounts(privileged=sc.privileged, shm_size=d.shm_size, with_cgroup=False)
    if shm_path is not None:
        mounts = merge_mounts(mounts, [_bind("/dev/shm", shm_path, readonly=False)])

    linux: dict[str, Any] = {
        "namespaces": nss,
        "cgroupsPath": cgroups_path,
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "sysctl": sysctls,
        **_security_masks(sc.privileged, d.masked_paths, d.readonly_paths),
        # runc 1.1.5 wants the mappings even for a joined user namespace (for the host ids of
        # its root: device nodes, /dev ownership); it writes them only to one it creates.
        **(userns.oci() if userns is not None else {}),
    }
    pause_user = _pause_user(sc)
    _check_mapped(userns, pause_user["uid"], pause_user["additionalGids"], "run_as_user")
    profile = seccomp_profile(
        sc.seccomp if sc.HasField("seccomp") else None, sc.seccomp_profile_path, [], d.arch
    )
    if profile is not None and not sc.privileged:
        linux["seccomp"] = profile
    apparmor_profile = None if sc.privileged else _apparmor_profile(
        sc.apparmor if sc.HasField("apparmor") else None, "", d, "linux.security_context")

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "root": {"path": str(rootfs), "readonly": True},
        "process": {
            "terminal": False,
            "user": pause_user,
            "args": list(args),
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": capabilities_object([], []),
            "noNewPrivileges": True,
            "oomScoreAdj": clamp_oom_score_adj(oom_score_adj, oom_score_adj_floor),
        },
        "mounts": mounts,
        "linux": linux,
    }
    if apparmor_profile is not None:
        spec["process"]["apparmorProfile"] = apparmor_profile
    if not host_net and pod.hostname:
        spec["hostname"] = pod.hostname
    return spec


def _image_list(image_config: dict[str, Any], key: str) -> list[str]:
    value = image_config.get(key) or []
    return [str(v) for v in value]


def _sandbox_file_mounts(sandbox: SandboxPaths, readonly: bool) -> list[dict[str, Any]]:
    files = (
        ("/etc/hostname", sandbox.hostname),
        ("/etc/resolv.conf", sandbox.resolv_conf),
        ("/etc/hosts", sandbox.hosts),
    )
    mounts = [_bind(dest, src, readonly) for dest, src in files if src is not None]
    if sandbox.shm is not None:
        mounts.append(_bind("/dev/shm", sandbox.shm, readonly=False))
    return mounts


def _container_user(
    ctr_sc: pb.LinuxContainerSecurityContext, image_user: str, db: users.UserDb
) -> users.ResolvedUser:
    try:
        return db.resolve(
            image_user,
            run_as_user=ctr_sc.run_as_user.value if ctr_sc.HasField("run_as_user") else None,
            run_as_username=ctr_sc.run_as_username,
            run_as_group=ctr_sc.run_as_group.value if ctr_sc.HasField("run_as_group") else None,
            supplemental_groups=list(ctr_sc.supplemental_groups),
            policy=users.GroupsPolicy(ctr_sc.supplemental_groups_policy),
        )
    except users.UserError as e:
        raise SpecError(f"security_context user: {e}") from None


def build_container_spec(
    pod: pb.PodSandboxConfig,
    ctr: pb.ContainerConfig,
    image_config: dict[str, Any],
    *,
    rootfs: Path,
    sandbox: SandboxPaths,
    cgroups_path: str,
    target_pid_ns: Path | None,
    rootfs_users: users.UserDb,
    oom_score_adj_floor: int,
    defaults: SpecDefaults,
) -> dict[str, Any]:
    """A workload container: a peer process joining the pod's pinned namespace files."""
    sc = ctr.linux.security_context
    privileged = sc.privileged
    if privileged and not pod.linux.security_context.privileged:
        raise SpecError("security_context.privileged: the pod sandbox is not privileged")
    opts = _ns_options(sc)
    pod_opts = _ns_options(pod.linux.security_context)
    userns = pod_userns(pod.linux.security_context)
    container_userns(sc, userns)
    if (userns is None) != (sandbox.user is None):
        raise SpecError(f"{_USERNS_FIELD}: the pod's user namespace is not pinned")

    args = merge_args(
        list(ctr.command),
        list(ctr.args),
        _image_list(image_config, "Entrypoint"),
        _image_list(image_config, "Cmd"),
    )
    hostname_env = [f"HOSTNAME={pod.hostname}"] if pod.hostname else []
    env = merge_env(
        [DEFAULT_PATH_ENV],
        hostname_env,
        ["TERM=xterm"] if ctr.tty else [],
        _image_list(image_config, "Env"),
        [f"{kv.key}={kv.value}" for kv in ctr.envs],
    )
    user = _container_user(sc, str(image_config.get("User") or ""), rootfs_users)
    _check_mapped(userns, user.uid, [user.gid, *user.additional_gids], "security_context user")

    caps = effective_capabilities(
        defaults.capabilities,
        list(sc.capabilities.add_capabilities),
        list(sc.capabilities.drop_capabilities),
        privileged,
        defaults.available_capabilities,
    )
    ambient = [] if privileged else list(sc.capabilities.add_ambient_capabilities)
    table = parse_mountinfo(defaults.mountinfo.read_text()) if ctr.mounts else []
    cri_mounts = [cri_mount(m, table) for m in ctr.mounts]
    mounts = merge_mounts(
        default_mounts(privileged=privileged, shm_size=defaults.shm_size, with_cgroup=True),
        _sandbox_file_mounts(sandbox, readonly=sc.readonly_rootfs),
    )
    mounts = merge_mounts(mounts, cri_mounts)

    sysctls = dict(pod.linux.sysctls)
    validate_sysctls(
        sysctls, host_network=pod_opts.network == pb.NODE, host_ipc=pod_opts.ipc == pb.NODE
    )
    devs, dev_rules = cri_devices(ctr.devices)
    if privileged:
        devs = host_devices(defaults.dev_root) + devs
        dev_rules = [{"allow": True, "access": "rwm"}]
    else:
        dev_rules = [{"allow": False, "access": "rwm"}, *dev_rules]
    resources = linux_resources(ctr.linux.resources, defaults)
    resources["devices"] = dev_rules

    # kubelet sends containerd's defaults for procMount Default and an empty list for Unmasked;
    # proto3 cannot tell empty from unset, so an empty list means "the defaults" (as containerd,
    # which only overrides on a non-nil list).
    masked = list(sc.masked_paths) or list(defaults.masked_paths)
    readonly = list(sc.readonly_paths) or list(defaults.readonly_paths)
    namespaces = container_namespaces(opts, sandbox, target_pid_ns)
    if defaults.cgroup_v2 and not privileged:  # a privileged container sees the host's tree
        namespaces.append(_ns("cgroup"))
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "devices": devs,
        "sysctl": sysctls,
        **_security_masks(privileged, masked, readonly),
        **(userns.oci() if userns is not None else {}),
    }
    propagation = rootfs_propagation(ctr.mounts)
    if propagation:
        linux["rootfsPropagation"] = propagation
    if not privileged:
        profile = seccomp_profile(
            sc.seccomp if sc.HasField("seccomp") else None,
            sc.seccomp_profile_path,
            caps,
            defaults.arch,
        )
        if profile is not None:
            linux["seccomp"] = profile
    apparmor_profile = None if privileged else _apparmor_profile(
        sc.apparmor if sc.HasField("apparmor") else None, sc.apparmor_profile, defaults,
        "linux.security_context")

    process: dict[str, Any] = {
        "terminal": ctr.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
        "args": args,
        "env": env,
        "cwd": ctr.working_dir or str(image_config.get("WorkingDir") or "") or "/",
        "capabilities": capabilities_object(caps, ambient),
        "noNewPrivileges": sc.no_new_privs,
        "oomScoreAdj": clamp_oom_score_adj(ctr.linux.resources.oom_score_adj, oom_score_adj_floor),
    }
    rlimits = _rlimits(defaults)
    if rlimits:
        process["rlimits"] = rlimits
    if apparmor_profile is not None:
        process["apparmorProfile"] = apparmor_profile
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": str(rootfs), "readonly": sc.readonly_rootfs},
        "process": process,
        "mounts": mounts,
        "linux": linux,
    }


def daemon_oom_score_adj() -> int:
    """The daemon's own oom_score_adj: the floor for every container (restrict_oom_score_adj)."""
    return int(Path("/proc/self/oom_score_adj").read_text().strip())
