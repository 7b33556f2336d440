"""What a CRI request may ask for, checked before anything touches the host.

Pod specs are written by tenants, so every enum a request carries must be one flatpod knows
(an unknown value fails closed: it never falls back to a default, least of all "host"), every
number must be in the range the kernel and runc accept, and every list or map must be of a
size a real pod has. Each failure is INVALID_ARGUMENT naming the field. This module is the
one home of these rules; sandbox/spec.py keeps the checks that need the host's state (mount
sources, devices, seccomp profile contents), and pods.py/containers.py call in here.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from google.protobuf.descriptor import EnumDescriptor

from cri_api import api_pb2 as pb
from sandbox.apparmor import LEGACY_NO_PROFILE, LOCALHOST_PREFIX
from sandbox.errors import InvalidArgument
from sandbox.spec import PROPAGATION_OPTIONS, SpecError, normalise_cap

# Sizes a real pod stays far below; a request past them is an attack or a bug. execve(2)
# refuses more than about 2 MiB of arguments and environment together, and any one string
# over 128 KiB (MAX_ARG_STRLEN); Kubernetes caps a pod's annotations at 256 KiB in total.
MAX_STRING_BYTES = 128 * 1024  # one argument, one environment entry
MAX_EXEC_BYTES = 1024 * 1024  # command + args (+ env, for a container) together
MAX_LIST_ENTRIES = 4096  # args, env, mounts, devices, supplemental groups, masked paths
MAX_MAP_BYTES = 256 * 1024  # keys and values of labels, annotations, sysctls, unified
MAX_ID = 2**32 - 2  # (uid_t)-1 is never an id

# Kernel ranges: cpu.shares (2..262144), CFS period (1 ms..1 s) and quota (>= 1 ms, at most
# the kernel's max_cfs_runtime), oom_score_adj (-1000..1000).
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144
MIN_CFS_PERIOD, MAX_CFS_PERIOD = 1000, 1_000_000
MIN_CFS_QUOTA, MAX_CFS_QUOTA = 1000, 2**44 - 1
MAX_CPUSET_ID = 8191
_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_PAGE_SIZE = re.compile(r"^([1-9]\d*)(KB|MB|GB)$")
_PAGE_UNITS = {"KB": 1, "MB": 1024, "GB": 1024 * 1024}
HUGEPAGES_DIR = Path("/sys/kernel/mm/hugepages")
SIGRTMIN, SIGRTMAX = int(signal.SIGRTMIN), int(signal.SIGRTMAX)

_NET_IPC_MODES = (pb.POD, pb.NODE, pb.CONTAINER)  # CONTAINER: the pod's, as containerd does
_POD_PID_MODES = (pb.POD, pb.CONTAINER, pb.NODE)
_CONTAINER_PID_MODES = (pb.POD, pb.CONTAINER, pb.NODE, pb.TARGET)
_PROFILE_TYPES = (
    pb.SecurityProfile.RuntimeDefault, pb.SecurityProfile.Unconfined,
    pb.SecurityProfile.Localhost,
)


def _names(descriptor: EnumDescriptor) -> dict[int, str]:
    return {v.number: v.name for v in descriptor.values}


def _enum(value: int, allowed: Collection[int], where: str, names: Mapping[int, str]) -> None:
    """Fail closed: a value outside `allowed`, known to the proto or not, is refused."""
    if value not in allowed:
        shown = names.get(value, str(value))
        accepted = ", ".join(names[v] for v in allowed)
        raise InvalidArgument(f"{where}: {shown} is not supported (one of {accepted})")


_MODES = _names(pb.NamespaceMode.DESCRIPTOR)
_POLICIES = _names(pb.SupplementalGroupsPolicy.DESCRIPTOR)
_PROTOCOLS = _names(pb.Protocol.DESCRIPTOR)
_PROPAGATIONS = _names(pb.MountPropagation.DESCRIPTOR)
_PROFILES = _names(pb.SecurityProfile.ProfileType.DESCRIPTOR)
_SIGNALS = _names(pb.Signal.DESCRIPTOR)


# ---------------------------------------------------------------------------------------------
# RunPodSandbox


def sandbox_config(config: pb.PodSandboxConfig) -> None:
    """The parts of a pod's config that pods.validate_sandbox_config does not check."""
    sc = config.linux.security_context
    where = "linux.security_context"
    opts = sc.namespace_options
    _enum(opts.network, (pb.POD, pb.NODE), f"{where}.namespace_options.network", _MODES)
    _enum(opts.ipc, (pb.POD, pb.NODE), f"{where}.namespace_options.ipc", _MODES)
    _enum(opts.pid, _POD_PID_MODES, f"{where}.namespace_options.pid", _MODES)
    _identity_and_profiles(sc, "", where)
    for i, mapping in enumerate(config.port_mappings):
        _enum(mapping.protocol, tuple(_PROTOCOLS), f"port_mappings[{i}].protocol", _PROTOCOLS)
    _map(config.labels, "labels")
    _map(config.annotations, "annotations")
    _map(config.linux.sysctls, "linux.sysctls")
    pod_resources(config.linux, "linux.")


def pod_resources(linux: pb.LinuxPodSandboxConfig, prefix: str = "") -> None:
    """A pod's resources and overhead (RunPodSandbox, UpdatePodSandboxResources)."""
    resources(linux.resources, f"{prefix}resources")
    resources(linux.overhead, f"{prefix}overhead")


# ---------------------------------------------------------------------------------------------
# CreateContainer


def container_config(config: pb.ContainerConfig) -> None:
    """A container's config on its own (containers.validate_container_config calls this)."""
    if config.working_dir and not config.working_dir.startswith("/"):
        raise InvalidArgument(f"working_dir {config.working_dir[:200]!r} must be absolute")
    _strings(config.command, "command")
    _strings(config.args, "args")
    env = [f"{kv.key}={kv.value}" for kv in config.envs]
    _strings(env, "envs")
    total = sum(len(s.encode()) for s in (*config.command, *config.args, *env))
    if total > MAX_EXEC_BYTES:
        raise InvalidArgument(
            f"command, args and envs: {total} bytes together, more than {MAX_EXEC_BYTES}")
    _map(config.labels, "labels")
    _map(config.annotations, "annotations")
    _count(config.mounts, "mounts")
    _count(config.devices, "devices")
    for i, mount in enumerate(config.mounts):
        _enum(mount.propagation, tuple(PROPAGATION_OPTIONS), f"mounts[{i}].propagation",
              _PROPAGATIONS)
    _enum(config.stop_signal, tuple(_SIGNALS), "stop_signal", _SIGNALS)
    linux = config.linux
    resources(linux.resources, "linux.resources")
    sc = linux.security_context
    where = "linux.security_context"
    opts = sc.namespace_options
    _enum(opts.network, _NET_IPC_MODES, f"{where}.namespace_options.network", _MODES)
    _enum(opts.ipc, _NET_IPC_MODES, f"{where}.namespace_options.ipc", _MODES)
    _enum(opts.pid, _CONTAINER_PID_MODES, f"{where}.namespace_options.pid", _MODES)
    if opts.pid == pb.TARGET and not opts.target_id:
        raise InvalidArgument(f"{where}.namespace_options.target_id: required with pid TARGET")
    _identity_and_profiles(sc, sc.apparmor_profile, where)
    caps = sc.capabilities
    for field_name, names in (
        ("add_capabilities", caps.add_capabilities),
        ("drop_capabilities", caps.drop_capabilities),
        ("add_ambient_capabilities", caps.add_ambient_capabilities),
    ):
        _count(names, f"{where}.capabilities.{field_name}")
        for name in names:
            if name.upper() != "ALL" or field_name == "add_ambient_capabilities":
                try:
                    normalise_cap(name[:64], f"{where}.capabilities.{field_name}")
                except SpecError as err:
                    raise InvalidArgument(str(err)) from err
    for field_name, paths in (("masked_paths", sc.masked_paths),
                              ("readonly_paths", sc.readonly_paths)):
        _count(paths, f"{where}.{field_name}")
        for path in paths:
            if not path.startswith("/") or "\x00" in path:
                raise InvalidArgument(f"{where}.{field_name}: {path[:200]!r} is not absolute")


def container_in_pod(config: pb.ContainerConfig, pod: pb.PodSandboxConfig) -> None:
    """A container may not ask for a wider namespace than its pod has: the node's network,
    IPC or PID namespace inside a pod that has its own."""
    mine = config.linux.security_context.namespace_options
    pods = pod.linux.security_context.namespace_options
    for name, wanted, held in (("network", mine.network, pods.network),
                               ("ipc", mine.ipc, pods.ipc), ("pid", mine.pid, pods.pid)):
        if wanted == pb.NODE and held != pb.NODE:
            raise InvalidArgument(
                f"linux.security_context.namespace_options.{name}: NODE, but the pod sandbox "
                f"has its own {name} namespace ({_MODES.get(held, str(held))})")


def target_in_pod(target_id: str, target_pod_id: str, pod_id: str) -> None:
    """A TARGET PID namespace is that of a container of the same pod."""
    if target_pod_id != pod_id:
        raise InvalidArgument(
            f"linux.security_context.namespace_options.target_id: container {target_id!r} is "
            f"not in pod sandbox {pod_id}")


def stop_signal(config: pb.ContainerConfig, image_config: Mapping[str, object]) -> str:
    """The signal that stops the container, as recorded: the config's stop_signal if set,
    else the image's StopSignal (which must name a signal), else "" (SIGTERM)."""
    if config.stop_signal != pb.RUNTIME_DEFAULT:  # SIGRTMINPLUS1 in the proto is SIGRTMIN+1
        return _SIGNALS[config.stop_signal].replace("PLUS", "+").replace("MINUS", "-")
    name = str(image_config.get("StopSignal") or "")
    if name and parse_signal(name) is None:
        raise InvalidArgument(f"image config StopSignal {name[:64]!r} names no signal")
    return name


def parse_signal(name: str) -> int | None:
    """A signal number from "15", "TERM", "SIGTERM" or "SIGRTMIN+3"; None if it names none."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        return number if 0 < number <= SIGRTMAX else None
    text = text.removeprefix("SIG")
    for base, sign in (("RTMIN+", 1), ("RTMAX-", -1)):
        if text.startswith(base) and text[len(base):].isdigit():
            number = (SIGRTMIN if sign > 0 else SIGRTMAX) + sign * int(text[len(base):])
            return number if SIGRTMIN <= number <= SIGRTMAX else None
    try:
        return int(signal.Signals["SIG" + text])
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# ExecSync and Exec


def exec_command(cmd: Sequence[str]) -> None:
    if not cmd:
        raise InvalidArgument("cmd: the exec command is empty")
    _strings(cmd, "cmd")
    total = sum(len(s.encode()) for s in cmd)
    if total > MAX_EXEC_BYTES:
        raise InvalidArgument(f"cmd: {total} bytes, more than {MAX_EXEC_BYTES}")


# ---------------------------------------------------------------------------------------------
# Resources (CreateContainer, RunPodSandbox, UpdateContainerResources, UpdatePodSandbox...)


def resources(r: pb.LinuxContainerResources, where: str) -> None:
    """Ranges the kernel accepts; zero means unset for every field but oom_score_adj."""
    if r.cpu_shares and not MIN_CPU_SHARES <= r.cpu_shares <= MAX_CPU_SHARES:
        raise InvalidArgument(
            f"{where}.cpu_shares: {r.cpu_shares} is outside {MIN_CPU_SHARES}..{MAX_CPU_SHARES}")
    if r.cpu_period and not MIN_CFS_PERIOD <= r.cpu_period <= MAX_CFS_PERIOD:
        raise InvalidArgument(
            f"{where}.cpu_period: {r.cpu_period} is outside {MIN_CFS_PERIOD}..{MAX_CFS_PERIOD} µs")
    if r.cpu_quota not in (0, -1) and not MIN_CFS_QUOTA <= r.cpu_quota <= MAX_CFS_QUOTA:
        raise InvalidArgument(
            f"{where}.cpu_quota: {r.cpu_quota} is neither -1 (unlimited) nor within "
            f"{MIN_CFS_QUOTA}..{MAX_CFS_QUOTA} µs")
    if r.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"{where}.memory_limit_in_bytes: {r.memory_limit_in_bytes} < 0")
    swap = r.memory_swap_limit_in_bytes
    if swap < -1:
        raise InvalidArgument(f"{where}.memory_swap_limit_in_bytes: {swap} < -1")
    if swap > 0 and swap < r.memory_limit_in_bytes:
        raise InvalidArgument(
            f"{where}.memory_swap_limit_in_bytes: {swap} is below memory_limit_in_bytes "
            f"{r.memory_limit_in_bytes} (it limits memory and swap together)")
    if swap > 0 and not r.memory_limit_in_bytes:
        raise InvalidArgument(
            f"{where}.memory_swap_limit_in_bytes: set without memory_limit_in_bytes")
    if not -1000 <= r.oom_score_adj <= 1000:
        raise InvalidArgument(f"{where}.oom_score_adj: {r.oom_score_adj} is outside -1000..1000")
    _cpuset(r.cpuset_cpus, f"{where}.cpuset_cpus", Path("/sys/devices/system/cpu/online"))
    _cpuset(r.cpuset_mems, f"{where}.cpuset_mems", Path("/sys/devices/system/node/online"))
    _count(r.hugepage_limits, f"{where}.hugepage_limits")
    for i, limit in enumerate(r.hugepage_limits):
        _page_size(limit.page_size, f"{where}.hugepage_limits[{i}].page_size")
    _map(r.unified, f"{where}.unified")


def cpuset_ids(text: str) -> set[int] | None:
    """The ids of a cpuset list ("0-3,8"); None when it is not one."""
    if not _CPUSET.match(text):
        return None
    ids: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first > last or last > MAX_CPUSET_ID:
            return None
        ids.update(range(first, last + 1))
    return ids


def _cpuset(text: str, where: str, online: Path) -> None:
    if not text:
        return
    ids = cpuset_ids(text)
    if ids is None:
        raise InvalidArgument(f"{where}: {text[:100]!r} is not a list of ids like 0-3,8")
    try:
        present = cpuset_ids(online.read_text().strip())
    except OSError:
        return  # no such list on this host (no NUMA nodes): the kernel judges
    if present is not None and not ids <= present:
        raise InvalidArgument(f"{where}: {text!r} names ids this node does not have "
                              f"(online: {online.read_text().strip()})")


def _page_size(text: str, where: str) -> None:
    match = _PAGE_SIZE.match(text)
    if match is None:
        raise InvalidArgument(f"{where}: {text[:40]!r} is not a page size like 2MB or 1GB")
    kib = int(match.group(1)) * _PAGE_UNITS[match.group(2)]
    if HUGEPAGES_DIR.is_dir() and not (HUGEPAGES_DIR / f"hugepages-{kib}kB").is_dir():
        raise InvalidArgument(f"{where}: this node has no {text} huge pages")


# ---------------------------------------------------------------------------------------------
# Pieces


def _identity_and_profiles(
    sc: pb.LinuxSandboxSecurityContext | pb.LinuxContainerSecurityContext,
    legacy_apparmor: str, where: str,
) -> None:
    """What pod and container security contexts share: the identity, the groups policy, the
    seccomp and AppArmor profiles."""
    _identity(sc.run_as_user.value if sc.HasField("run_as_user") else 0,
              sc.run_as_group.value if sc.HasField("run_as_group") else 0,
              sc.supplemental_groups, where)
    _enum(sc.supplemental_groups_policy, tuple(_POLICIES), f"{where}.supplemental_groups_policy",
          _POLICIES)
    _profile(sc.seccomp if sc.HasField("seccomp") else None, f"{where}.seccomp")
    _apparmor(sc.apparmor if sc.HasField("apparmor") else None, legacy_apparmor,
              f"{where}.apparmor")


def _identity(uid: int, gid: int, groups: Iterable[int], where: str) -> None:
    if not 0 <= uid <= MAX_ID:
        raise InvalidArgument(f"{where}.run_as_user: {uid} is not a uid")
    if not 0 <= gid <= MAX_ID:
        raise InvalidArgument(f"{where}.run_as_group: {gid} is not a gid")
    groups = list(groups)
    _count(groups, f"{where}.supplemental_groups")
    for group in groups:
        if not 0 <= group <= MAX_ID:
            raise InvalidArgument(f"{where}.supplemental_groups: {group} is not a gid")


def _profile(profile: pb.SecurityProfile | None, where: str) -> None:
    if profile is None:
        return
    _enum(profile.profile_type, _PROFILE_TYPES, f"{where}.profile_type", _PROFILES)
    ref = profile.localhost_ref
    if profile.profile_type == pb.SecurityProfile.Localhost and (
        not ref.startswith("/") or "\x00" in ref
    ):
        raise InvalidArgument(
                f"{where}.localhost_ref: {profile.localhost_ref[:200]!r} must be an absolute path")


def _apparmor(profile: pb.SecurityProfile | None, legacy: str, where: str) -> None:
    """The shape of the AppArmor fields; whether a Localhost profile is loaded on this node
    is the spec's to check (sandbox/apparmor.py), when the container is created."""
    if profile is not None:
        _enum(profile.profile_type, _PROFILE_TYPES, f"{where}.profile_type", _PROFILES)
    if legacy not in LEGACY_NO_PROFILE and not legacy.startswith(LOCALHOST_PREFIX):
        raise InvalidArgument(f"{where}: unknown AppArmor profile {legacy[:200]!r}")


def _strings(values: Sequence[str], where: str) -> None:
    _count(values, where)
    for value in values:
        if "\x00" in value:
            raise InvalidArgument(f"{where}: an entry contains a NUL byte")
        if len(value) > MAX_STRING_BYTES or len(value.encode()) > MAX_STRING_BYTES:
            raise InvalidArgument(f"{where}: an entry is longer than {MAX_STRING_BYTES} bytes")


def _count(values: Collection[object], where: str) -> None:
    if len(values) > MAX_LIST_ENTRIES:
        raise InvalidArgument(f"{where}: {len(values)} entries, more than {MAX_LIST_ENTRIES}")


def _map(values: Mapping[str, str], where: str) -> None:
    total = 0
    for key, value in values.items():
        total += len(key.encode()) + len(value.encode())
        if total > MAX_MAP_BYTES:
            raise InvalidArgument(f"{where}: more than {MAX_MAP_BYTES} bytes of keys and values")
