"""Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, List.

A pod is a pause container (`catatonit -P` by runc, run by the pod's shim) that owns the pod's
namespaces. The network namespace is made and pinned before the pause starts; the pause's
IPC, UTS (and PID) namespaces are pinned as files right after. Containers join those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from google.protobuf.json_format import MessageToDict

from cri_api import api_pb2 as pb
from netns.enter import on_own_thread, run_in_netns
from netns.network import NetworkResult
from netns.pin import (
    NETNS_RUN_DIR,
    create_netns_here,
    ensure_shared_mount_dir,
    is_pinned,
    pin_namespace,
    pod_netns_path,
    touch_pin_target,
    unpin,
)
from netns.ports import PortMapping
from netns.rtnl import loopback_up
from sandbox import acl, cgroups, containers, mounts, validate
from sandbox.errors import FailedPrecondition, InvalidArgument, StepFailed, Steps
from sandbox.exits import delete_runc_state
from sandbox.images.snapshots import idmap_supported
from sandbox.records import (
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    PodRecord,
    PodState,
    PodStop,
    cri_pod_state,
)
from sandbox.removals import PodLeftovers
from sandbox.runtime import Runtime
from sandbox.shims import new_pod_id, shut_down
from sandbox.spec import IdMap, PodUserns, SpecError, build_pause_spec, pod_userns
from sandbox.undo import undo_on_failure
from sandbox.users import open_to_group
from sandbox.wire import (
    int_field,
    list_entries,
    message_field,
    stream_pages,
    verbose_info_entry,
)
from shim.client import ShimClient, ShimError

log = logging.getLogger("flatpod.pods")
T = TypeVar("T")

# A sandbox that is still being made: listed nowhere, found only by its own retry.
SANDBOX_CREATING = PodState.CREATING
SHM_SIZE = 64 * 1024 * 1024
PAUSE_STOP_TIMEOUT = 10.0
# In the dir of a pod with a user namespace: the pause's rootfs, mounted executable. runc
# bind-mounts a rootfs that is a plain dir with the flags of the mount it lies on, and clears
# a noexec (Debian's /run has it) only from the host's user namespace, not from a pod's.
POD_PAUSE_ROOTFS = "pause-rootfs"
# ListPodSandboxResponse.items
LIST_PODS_FIELD = pb.ListPodSandboxResponse.DESCRIPTOR.fields_by_name["items"].number
# PodSandboxStatusResponse's fields, for its answer assembled from kept bytes
_STATUS_FIELDS = pb.PodSandboxStatusResponse.DESCRIPTOR.fields_by_name
STATUS_FIELD = _STATUS_FIELDS["status"].number
CONTAINER_STATUSES_FIELD = _STATUS_FIELDS["containers_statuses"].number
TIMESTAMP_FIELD = _STATUS_FIELDS["timestamp"].number
INFO_FIELD = _STATUS_FIELDS["info"].number
_PROTOCOLS: dict[int, Literal["tcp", "udp", "sctp"]] = {
    pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"
}


def sandbox_name(meta: pb.PodSandboxMetadata) -> str:
    """The name kubelet's retries share: metadata identifies the pod and its attempt."""
    return f"{meta.name}_{meta.namespace}_{meta.uid}_{meta.attempt}"


# --- RunPodSandbox ---------------------------------------------------------------------------


@dataclass
class StepClock:
    """When each step of one RunPodSandbox ended, in ms from the request's start: logged at
    debug level (`flatpod serve --log-level debug`) to show what the call waits for. Off, a
    mark is one attribute test."""

    on: bool
    start: float = field(default_factory=time.perf_counter)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, step: str) -> None:
        if self.on:
            self.marks.append((step, time.perf_counter()))

    def mark_done(self, step: str, task: asyncio.Future[Any]) -> None:
        """Marks `step` when a branch that runs at once ends."""
        if self.on:
            task.add_done_callback(lambda _task: self.mark(step))

    def report(self) -> str:
        return " ".join(f"{step}={(at - self.start) * 1000:.1f}" for step, at in self.marks)


async def run_pod_sandbox(rt: Runtime, req: pb.RunPodSandboxRequest) -> pb.RunPodSandboxResponse:
    clock = StepClock(log.isEnabledFor(logging.DEBUG))
    validate_sandbox_config(req.config)
    try:
        cgroups.check_parent(rt.config.driver, req.config.linux.cgroup_parent)
    except cgroups.CgroupError as err:
        raise InvalidArgument(f"linux.cgroup_parent: {err}") from err
    rt.handlers.for_request(req.runtime_handler)
    name = sandbox_name(req.config.metadata)
    clock.mark("validated")
    pod_id = await _join_or_start(rt, name, req, clock)
    return pb.RunPodSandboxResponse(pod_sandbox_id=pod_id)


async def _join_or_start(
    rt: Runtime, name: str, req: pb.RunPodSandboxRequest, clock: StepClock
) -> str:
    return await rt.registry.create_once(
        "pod sandbox", name, lambda: _create_pod(rt, name, req, clock),
        lambda pod_id: remove_leftover(rt, rt.registry.pod(pod_id)),
    )


async def _create_pod(
    rt: Runtime, name: str, req: pb.RunPodSandboxRequest, clock: StepClock
) -> str:
    config = req.config
    handler = rt.handlers.for_request(req.runtime_handler)
    # A spare shim forked after the last RunPodSandbox (sandbox/shims.py) gives the pod its
    # id and dir, made with it. Taken from here to claim_spare without an await between.
    spare = rt.shims.spare_for(handler)
    pod_id = spare.pod_id if spare is not None else new_pod_id()
    host_net = config.linux.security_context.namespace_options.network == pb.NODE
    pod = PodRecord(
        id=pod_id,
        name=name,
        created_at=time.time_ns(),
        config=config,
        runtime_handler=req.runtime_handler,
        state=SANDBOX_CREATING,
    )
    # 1. Reserve the name and journal the operation before touching the host.
    rt.registry.reserve(pod)
    rt.store.begin_operation(f"run_pod:{pod_id}", "run_pod", pod_id, {})
    userns = pod_userns(config.linux.security_context)  # validated above
    # The spare's netns, plumbed ahead (sandbox/shims.py), unless this pod cannot use it.
    plumbed = spare.network if spare is not None and userns is None else None
    if spare is not None and (host_net or userns is not None):
        # The spare's netns is for a pod of the pod network; unpinned before the claim, as
        # nothing between the claim and the undo's set-up may raise (a crash here leaves an
        # interrupted run_pod under the spare's id, whose removal takes its shim). Its
        # network, if plumbed, is the pod's to tear down (below); a user-namespace pod's
        # own setup takes its address and replaces its veth.
        unpin(pod_netns_path(pod_id))
    claimed = rt.shims.claim_spare(spare) if spare is not None else None
    rt.faults.point("run_pod:after_reserve")
    clock.mark("reserved")
    async with rt.locks.hold(pod_id), undo_on_failure(f"run pod {pod_id}", rt.faults) as undo:
        undo.settle(forget=lambda: _forget(rt, pod), keep=lambda left: _keep(rt, pod, left))
        # Each branch below is one worker-thread hop (a hop costs a thread's and the loop's
        # wakeups, which a loaded node makes milliseconds), and the branches that need only
        # the pod dir run at once. Every undo is pushed before its step, as a step can be
        # left half done.
        # 2. The pod's dir, and the pod's shim: it needs only the dir, so the zygote forks
        # it while the rest is made.
        undo.at("pod dir")
        pod_dir = rt.paths.pod_dir(pod_id)
        undo.push("pod dir", lambda: shutil.rmtree(pod_dir, ignore_errors=True))
        shim_task: asyncio.Future[ShimClient]
        if claimed is None:
            _make_pod_dir(pod_dir)  # two mkdirs on tmpfs: not worth a thread's round trip
            shim_task = asyncio.ensure_future(rt.shims.spawn(pod_id, pod_dir, handler))
        else:
            shim_task = asyncio.get_running_loop().create_future()
            shim_task.set_result(claimed)
        undo.push_after("shim", shim_task, lambda: _shutdown_shim(rt, pod_id))
        clock.mark_done("shim", shim_task)
        # 3. In one thread's hop, what the pause's spec names: the network namespace,
        # pinned (made inside the pod's user namespace, if it has one, which is pinned
        # first), then the pod's files (hostname, resolv.conf, hosts, /dev/shm) and the
        # pause's bundle. One hop, not two side by side: most of it is Python holding the
        # GIL, and two threads and the loop passing it around took 6-7 ms where the work
        # alone takes about 3. A thread of its own, not a pooled one: it moves into the new
        # netns to make it.
        if userns is not None:  # on the loop: see share_state_dirs
            share_state_dirs(rt)  # the record is reserved: its group is in the set
        place = cgroups.placement(
            rt.config.driver, config.linux.cgroup_parent, rt.config.default_cgroup_parent, pod_id
        )
        pod.cgroup_path, pod.cgroup_slice = place.pod_path, place.slice
        shm, bundle = pod_dir / "shm", rt.paths.bundle_dir(pod_id)
        user_ns = pod_dir / "ns" / "user"
        netns = None
        if not host_net:  # the spec names them
            netns = pod_netns_path(pod_id)
            pod.netns_path = str(netns)
            if userns is not None:
                pod.namespaces["user"] = str(user_ns)
        undo.push("shm", lambda: mounts.unmount(shm))
        undo.push("pause rootfs", lambda: mounts.unmount(pod_dir / POD_PAUSE_ROOTFS))
        if place.driver is cgroups.Driver.CGROUPFS:
            hs = rt.host_cgroups.hierarchies
            undo.push("cgroup", lambda: cgroups.remove(pod.cgroup_path, hs))
        elif cgroups.is_own_slice(place.slice, pod_id):  # made by the pause's scope, if any
            undo.push("slice", lambda: cgroups.stop_slice(place.slice))
        undo.push("bundle", lambda: shutil.rmtree(bundle, ignore_errors=True))
        if netns is not None:
            if userns is not None:
                undo.push("userns", lambda: unpin(user_ns))
            undo.push("netns", lambda: unpin(netns))
        made = asyncio.ensure_future(on_own_thread(
            lambda: _make_pod_contents(rt, pod, netns, userns, claimed is not None, clock)))
        undo.push_after("pod files", made, lambda: None)  # the undos above wait for it
        undo.at("pod files")
        oom_file, systemd, spare_netns_kept = await made
        clock.mark("bundle")
        if netns is not None and not spare_netns_kept:  # its plumbing went with it
            plumbed = None
        # 4. While the pause starts: the pod cgroup, a worker-thread hop (runc makes the
        # pause's missing parents itself, and fills v1 cpusets; the pod's limits only need
        # to be set before a container joins, at READY), and the network in the netns
        # (veth, IPAM, routes, host ports): only the netns must exist before the pause.
        pod_cgroup = asyncio.ensure_future(_make_pod_cgroup(rt, pod, place))
        undo.push_after("pod cgroup", pod_cgroup, lambda: None)  # the cgroup's undo waits
        clock.mark_done("cgroup", pod_cgroup)
        network = None
        if netns is not None:
            network = asyncio.ensure_future(
                _in_step("network", _setup_network(rt, pod, netns, plumbed)))
            undo.push_after("network", network, lambda: _teardown_network(rt, pod))
            clock.mark_done("network", network)
        elif plumbed is not None:  # a host-network pod took a plumbed spare: not its network
            network = asyncio.ensure_future(_in_step("network", _drop_plumbed(rt, pod)))
            undo.push_after("network", network, lambda: _drop_plumbed(rt, pod))
        # 5. The pod's shim runs the pause: `runc run --detach`, create and start in one runc
        # process (nothing needs the pause between the two).
        undo.at("shim")
        shim = await shim_task
        rt.faults.point("run_pod:after_shim")
        undo.at("pause")
        undo.push("pause", lambda: delete_runc_state(rt, pod_id))
        pod.pause_pid = await shim.run(pod_id, str(bundle), exit_file=str(bundle / "exit"),
                                       oom_file=oom_file, systemd_cgroup=systemd)
        rt.faults.point("run_pod:after_pause_start")
        clock.mark("started")
        # 6. Pin the pause's namespaces: containers join these files, never /proc/<pid>/ns.
        # On the loop: a few bind mounts on tmpfs cost less than a thread's round trip.
        undo.at("pins")
        undo.push("pins", lambda: _unpin_namespaces(pod.namespaces.values(), pod_dir))
        pod.namespaces = _pin_namespaces(pod, pod_dir)
        rt.faults.point("run_pod:after_pins")
        clock.mark("pinned")
        # 7. Ready, once the pod cgroup and the network are.
        undo.at("cgroup")
        await pod_cgroup
        if network is not None:
            await network
        undo.at("ready")
        rt.registry.transition(pod, SANDBOX_READY)
        rt.store.end_operation(f"run_pod:{pod_id}")
    clock.mark("ready")
    # The next pod's shim, forked now that this one is answered (sandbox/shims.py).
    rt.shims.fork_spare(handler, _make_spare_pod_dir)
    log.info("pod %s (%s) ready, ip %s", pod_id[:12], name, pod.ip or "host")
    if clock.on:
        log.debug("pod %s steps, ms: %s", pod_id[:12], clock.report())
    return pod_id


async def _in_step(step: str, work: Awaitable[T]) -> T:
    """Awaits `work`, reporting its failure from `step`: for the branches that run at once,
    which the request's own "at" cannot name."""
    try:
        return await work
    except Exception as err:
        raise StepFailed(step, err) from err


def _make_pod_contents(
    rt: Runtime, pod: PodRecord, netns: Path | None, userns: PodUserns | None,
    spare_netns: bool, clock: StepClock,
) -> tuple[str | None, bool, bool]:
    """The pod's netns (unless host network); hostname, resolv.conf, hosts and the /dev/shm
    tmpfs in the pod's dir; the pause's bundle. Returns what the shim needs of the pause's
    cgroup, and whether the pod kept the spare's netns. Runs on a thread of its own
    (enter.on_own_thread), which ends in the pod's netns: nothing after the netns here may
    use the network. With `spare_netns`, the pod took a spare shim, whose netns was made
    with it (sandbox/shims.py)."""
    config = pod.config
    pod_dir = rt.paths.pod_dir(pod.id)
    opts = config.linux.security_context.namespace_options
    kept = False
    if netns is not None:
        with Steps("netns"):
            if userns is None:
                kept = spare_netns and is_pinned(netns)
                if not kept:
                    create_netns_here(netns)
            else:
                create_userns(userns, pod_dir / "ns" / "user", netns)
            rt.faults.point("run_pod:after_netns")
        clock.mark("netns")
    with Steps("pod files"):
        _write_pod_files(pod_dir, config, opts.network == pb.NODE)
        if opts.ipc != pb.NODE:
            mounts.mount_tmpfs(pod_dir / "shm", SHM_SIZE)
        rootfs = rt.paths.pause_rootfs
        if userns is not None:
            _share_with_userns(rt, pod_dir, userns)
            rootfs = pod_dir / POD_PAUSE_ROOTFS
            mounts.bind_executable_readonly(rt.paths.pause_rootfs, rootfs)
    clock.mark("files")
    with Steps("pause bundle"):
        _write_bundle(rt.paths.bundle_dir(pod.id), _pause_spec(rt, pod, pod_dir, rootfs))
        return (*containers.shim_cgroup_options(pod, pod.id, rt.host_cgroups), kept)


async def _make_pod_cgroup(rt: Runtime, pod: PodRecord, place: cgroups.Placement) -> None:
    """The pod cgroup with the pod's overhead and resources, on a worker thread (cgroupfs
    driver: with systemd the pod's slice and its limits are kubelet's, as with containerd,
    or the pod's own slice, which systemd makes with the pause's scope)."""
    with Steps("cgroup"):
        if place.driver is cgroups.Driver.CGROUPFS:
            hs = rt.host_cgroups.hierarchies
            resources = pod_resources(pod.config.linux)
            await asyncio.to_thread(cgroups.create, pod.cgroup_path, resources, hs)
        rt.faults.point("run_pod:after_cgroup")


async def _setup_network(rt: Runtime, pod: PodRecord, netns: Path,
                         plumbed: NetworkResult | None) -> None:
    """The pod network in the pinned netns (netlink on a worker thread, never the loop's).
    A netns `plumbed` ahead (a spare's) needs only its host ports, if it has any."""
    config = pod.config
    ahead = rt.shims.network_ahead
    if plumbed is None or ahead is None:
        result = await asyncio.to_thread(
            rt.network.setup, pod.id, netns, port_mappings(config),
            config.metadata.name, config.metadata.namespace,
        )
    else:
        result = plumbed
        if mappings := port_mappings(config):
            await asyncio.to_thread(ahead.add_host_ports, pod.id, result.ip, mappings)
    pod.network_kind = rt.network_kind
    pod.ip = result.ip
    pod.additional_ips = list(result.additional_ips)
    rt.faults.point("run_pod:after_network")


async def _drop_plumbed(rt: Runtime, pod: PodRecord) -> None:
    """The network plumbed in a spare's netns, which a host-network pod took: before READY,
    as its record names no network to tear down (recovery tears a leftover's down)."""
    if (ahead := rt.shims.network_ahead) is not None:
        await asyncio.to_thread(ahead.teardown, pod.id, None, False)


def _forget(rt: Runtime, pod: PodRecord) -> None:
    rt.registry.forget(pod)
    rt.store.end_operation(f"run_pod:{pod.id}")
    _unshare_state_dirs(rt, pod)


def _unshare_state_dirs(rt: Runtime, pod: PodRecord) -> None:
    """After a forgotten user-namespace pod: its group's entry goes (unless another pod still
    has that group); other pods never touch the dirs."""
    if pod_userns(pod.config.linux.security_context) is not None:
        try:
            share_state_dirs(rt)
        except FailedPrecondition as err:  # the pod is gone; the next pod or restart retries
            log.warning("pod %s: %s", pod.short, err)


def _keep(rt: Runtime, pod: PodRecord, left: str) -> None:
    """Keeps a pod whose failed creation could not be undone, NOTREADY (so kubelet stops and
    removes it, as containerd's sandbox with a cleanup error) and naming what is left; its
    journal entry stays, so recovery also removes it."""
    _name_leftovers(rt, pod)
    rt.registry.transition(pod, SANDBOX_NOTREADY, cleanup_error=left)


def validate_sandbox_config(config: pb.PodSandboxConfig) -> None:
    meta = config.metadata
    if not meta.name:
        raise InvalidArgument("sandbox config metadata.name is required")
    for field_name, value in (
        ("metadata.name", meta.name), ("metadata.namespace", meta.namespace),
        ("metadata.uid", meta.uid), ("hostname", config.hostname),
        ("log_directory", config.log_directory),
        ("linux.cgroup_parent", config.linux.cgroup_parent),
    ):
        _check_text(field_name, value)
    try:
        pod_userns(config.linux.security_context)
    except SpecError as err:
        raise InvalidArgument(str(err)) from err
    if config.log_directory and not os.path.isabs(config.log_directory):
        raise InvalidArgument(f"log_directory {config.log_directory!r} must be an absolute path")
    if len(config.hostname) > 64:
        raise InvalidArgument(f"hostname {config.hostname[:80]!r} is longer than 64 characters")
    dns = config.dns_config
    for field_name, values in (
        ("dns_config.servers", dns.servers), ("dns_config.searches", dns.searches),
        ("dns_config.options", dns.options),
    ):
        for value in values:
            _check_text(field_name, value)
            if not value or any(c.isspace() for c in value):
                raise InvalidArgument(f"{field_name} entry {value!r} is empty or has whitespace")
    for mapping in config.port_mappings:
        if not 0 < mapping.container_port < 65536 or not 0 <= mapping.host_port < 65536:
            raise InvalidArgument(f"port mapping {MessageToDict(mapping)} is out of range")
    validate.sandbox_config(config)  # enums, ids, sizes, resources


def _check_text(field_name: str, value: str) -> None:
    if "\x00" in value or "\n" in value:
        raise InvalidArgument(f"{field_name} contains a NUL or newline")
    if len(value) > 4096:
        raise InvalidArgument(f"{field_name} is longer than 4096 characters")


def port_mappings(config: pb.PodSandboxConfig) -> list[PortMapping]:
    return [
        PortMapping(
            # validate.sandbox_config refuses other protocols; "tcp" only for older records.
            protocol=_PROTOCOLS.get(m.protocol, "tcp"),
            container_port=m.container_port,
            host_port=m.host_port,
            host_ip=m.host_ip,
        )
        for m in config.port_mappings
        if m.host_port > 0
    ]


def pod_resources(linux: pb.LinuxPodSandboxConfig) -> cgroups.Resources:
    """The pod cgroup's limits: the pod's resources plus its overhead, where set."""
    res, over = linux.resources, linux.overhead

    def total(a: int, b: int) -> int:
        return a + b if a > 0 else 0

    return cgroups.Resources(
        cpu_shares=total(res.cpu_shares, over.cpu_shares),
        cpu_quota=total(res.cpu_quota, over.cpu_quota),
        cpu_period=res.cpu_period if res.cpu_quota > 0 else 0,
        memory_limit=total(res.memory_limit_in_bytes, over.memory_limit_in_bytes),
        unified=tuple(sorted(res.unified.items())),
    )


POD_FILES = ("hostname", "resolv.conf", "hosts")


def _make_pod_dir(pod_dir: Path) -> None:
    pod_dir.mkdir(parents=True, exist_ok=False, mode=0o700)
    (pod_dir / "ns").mkdir(mode=0o700)


def _make_spare_pod_dir(pod_dir: Path) -> None:
    """A spare's pod dir (sandbox/shims.py), with its files made ahead, empty: the pod then
    writes them, and the pins after the pause starts are mounts alone. On a /run that is not
    tmpfs (this host's is ext4) a create costs 0.15-0.35 ms: the pod files took ~2.5 ms
    before runc, 0.4 ms when made ahead. A pin target the pod does not use stays empty until
    its dir goes."""
    _make_pod_dir(pod_dir)
    for name in POD_FILES:
        (pod_dir / name).touch(mode=0o644)
    for kind in ("ipc", "uts", "pid"):
        touch_pin_target(pod_dir / "ns" / kind)


def _write_pod_files(pod_dir: Path, config: pb.PodSandboxConfig, host_net: bool) -> None:
    hostname = os.uname().nodename if host_net else (config.hostname or config.metadata.name)
    (pod_dir / "hostname").write_text(hostname + "\n")
    (pod_dir / "resolv.conf").write_text(resolv_conf(config.dns_config))
    (pod_dir / "hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )
    for name in POD_FILES:
        os.chmod(pod_dir / name, 0o644)


def resolv_conf(dns: pb.DNSConfig) -> str:
    """The pod's /etc/resolv.conf; the host's when the pod names no DNS config."""
    if not (dns.servers or dns.searches or dns.options):
        try:
            return Path("/etc/resolv.conf").read_text()
        except OSError:
            return ""
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def _pause_spec(rt: Runtime, pod: PodRecord, pod_dir: Path, rootfs: Path) -> dict[str, Any]:
    shm = pod_dir / "shm"
    place = containers.pod_placement(pod)
    try:
        spec = build_pause_spec(
            pod.config,
            rootfs=rootfs,
            netns_path=Path(pod.netns_path) if pod.netns_path else None,
            cgroups_path=place.oci_cgroups_path(pod.id),
            oom_score_adj_floor=rt.oom_score_adj_floor,
            shm_path=shm if shm.is_dir() else None,
            userns_path=Path(pod.namespaces["user"]) if "user" in pod.namespaces else None,
            defaults=containers.spec_defaults(rt.host_cgroups),
        )
    except SpecError as err:
        raise InvalidArgument(str(err)) from err
    return containers.with_cgroup_annotations(spec, place)


def _write_bundle(bundle: Path, spec: dict[str, Any]) -> None:
    bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(spec))
    tmp.rename(bundle / "config.json")


def ensure_pause_rootfs(rt: Runtime) -> None:
    """The built-in pause's rootfs: the host's static catatonit and empty mount points.

    Shared, read-only, by every pod; no pull and no network.
    """
    rootfs = rt.paths.pause_rootfs
    binary = rootfs / "catatonit"
    source = Path(rt.config.pause_binary)
    if binary.exists() and binary.stat().st_size == source.stat().st_size:
        return
    for sub in ("proc", "dev", "sys", "etc", "tmp"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, rootfs / "catatonit.tmp")
    os.rename(rootfs / "catatonit.tmp", binary)


def _pin_namespaces(pod: PodRecord, pod_dir: Path) -> dict[str, str]:
    opts = pod.config.linux.security_context.namespace_options
    wanted = []
    if opts.ipc != pb.NODE:
        wanted.append("ipc")
    if opts.network != pb.NODE:
        wanted.append("uts")
    if opts.pid == pb.POD:
        wanted.append("pid")
    pinned = dict(pod.namespaces)  # the user namespace, pinned before the pause started
    for kind in wanted:
        target = pod_dir / "ns" / kind
        pin_namespace(Path(f"/proc/{pod.pause_pid}/ns/{kind}"), target)
        pinned[kind] = str(target)
    return pinned


# --- user namespaces (mode POD) ----------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
# A single-threaded helper unshares (a threaded process such as flatpod cannot unshare a user
# namespace), says so, and lives until its stdin closes.
_UNSHARE_HELPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(int(sys.argv[1])) != 0:
    sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
sys.stdout.write("unshared\\n")
sys.stdout.flush()
sys.stdin.read()
"""
HELPER_TIMEOUT = 10.0


@contextmanager
def _unshared(flags: int, userns: PodUserns) -> Iterator[int]:
    """A helper process in new namespaces (`flags`), its user namespace mapped as `userns`
    says; yields its pid while it lives."""
    helper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _UNSHARE_HELPER, str(flags)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
    )
    assert helper.stdin is not None and helper.stdout is not None and helper.stderr is not None
    try:
        if helper.stdout.readline() != b"unshared\n":
            helper.wait(HELPER_TIMEOUT)
            raise OSError(f"user namespace helper failed: {helper.stderr.read().decode()!r}")
        for kind in ("uid", "gid"):  # flatpod has CAP_SETGID: no need to deny setgroups
            Path(f"/proc/{helper.pid}/{kind}_map").write_text(userns.proc_map(kind))
        yield helper.pid
    finally:
        helper.stdin.close()
        try:
            helper.wait(HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        helper.stdout.close()
        helper.stderr.close()


def create_userns(userns: PodUserns, user_pin: Path, netns_pin: Path) -> None:
    """Makes the pod's user namespace and, inside it, the pod's network namespace; pins both.

    The netns must belong to the pod's user namespace: the kernel lets a process mount sysfs,
    join the netns from inside the user namespace, or set net.* sysctls and configure the
    network with the capabilities it has there, only for a netns that namespace owns (one
    made by flatpod outside would refuse the pause's /sys and every container's setns).
    containerd lets runc create it and pins it afterwards; flatpod makes both before the pause
    (one unshare(CLONE_NEWUSER|CLONE_NEWNET): the netns belongs to the new user namespace),
    so the pod network is set up before the pause starts, as for any pod. flatpod itself
    (root of the initial user namespace) can still enter and configure that netns.
    """
    if netns_pin.parent == NETNS_RUN_DIR:
        ensure_shared_mount_dir(NETNS_RUN_DIR)
    if is_pinned(netns_pin):
        raise FileExistsError(f"a network namespace is already pinned at {netns_pin}")
    try:
        with _unshared(CLONE_NEWUSER | CLONE_NEWNET, userns) as pid:
            pin_namespace(Path(f"/proc/{pid}/ns/user"), user_pin)
            pin_namespace(Path(f"/proc/{pid}/ns/net"), netns_pin)
        run_in_netns(netns_pin, loopback_up)
    except BaseException:
        unpin(netns_pin)
        unpin(user_pin)
        raise


def _share_with_userns(rt: Runtime, pod_dir: Path, userns: PodUserns) -> None:
    """What runc and the pod's root (host ids userns.root) must reach from inside the user
    namespace, where flatpod's root has no power over host-owned files: the pod's dir (its
    root's group only: users.open_to_group) and the pod's own files, given to the pod's root as
    a normal pod's files belong to root. The dirs above are share_state_dirs'."""
    for parent in rt.paths.state.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise FailedPrecondition(
                f"{parent} is not searchable by others: a pod's user namespace cannot reach "
                f"the state dir {rt.paths.state} below it"
            )
    for name in ("hostname", "resolv.conf", "hosts", "shm"):
        if (pod_dir / name).exists():
            os.chown(pod_dir / name, *userns.root)
    open_to_group(pod_dir, userns.root[1])


def share_state_dirs(rt: Runtime) -> None:
    """The state, pods/ and bundles (containers/) dirs: 0700, plus an ACL entry that lets the
    host group of each user-namespace pod's root traverse them (--x), the path runc takes from
    inside the namespace down to the pause rootfs, the pod dirs and the bundles. Each pod is
    one entry (kubelet gives each pod its own host ids), made from the records that exist, so
    an entry goes with the last pod that needed it, also across restarts and crashes.

    Runs on the event loop, not in a worker thread: the set is read from the registry and
    written in one step, so two pods made or removed at once cannot overwrite each other's
    entry with an older set. It is three small xattr writes to a local filesystem."""
    gids = {
        userns.root[1] for pod in rt.pods.values()
        if (userns := pod_userns(pod.config.linux.security_context)) is not None
    }
    for path in (rt.paths.state, rt.paths.pods, rt.paths.bundles):
        try:
            acl.owner_only_but_traversable_by(path, gids)
        except acl.AclError as err:
            raise FailedPrecondition(
                f"pods with user namespaces need POSIX ACLs on the state dir: {err}"
            ) from err


# Host ids of the probe's user namespace: any range works for the probe (as critest's).
_PROBE_USERNS = PodUserns(IdMap(0, 65536, 65536), IdMap(0, 65536, 65536))
_userns_support: dict[Path, bool] = {}


def userns_supported(path: Path) -> bool:
    """True if pods can have user namespaces here: the kernel makes them and the filesystem
    holding `path` (the snapshots) takes idmapped mounts. Probed once per path."""
    if path not in _userns_support:
        try:
            with _unshared(CLONE_NEWUSER, _PROBE_USERNS) as pid:
                _userns_support[path] = idmap_supported(path, Path(f"/proc/{pid}/ns/user"))
        except OSError as err:
            log.warning("user namespaces are unavailable: %s", err)
            _userns_support[path] = False
    return _userns_support[path]


# The namespaces a pod pins in its dir's ns/ (the pause's, and the user namespace).
PINNED_KINDS = ("ipc", "uts", "pid", "user")


def _unpin_namespaces(pinned: Iterable[str], pod_dir: Path) -> None:
    """Unpins the pod's namespaces: those its record names (`pinned`), and any its dir holds
    (a half-made pod's record may not name them)."""
    for path in {*pinned, *(str(pod_dir / "ns" / k) for k in PINNED_KINDS)}:
        unpin(Path(path))


# --- StopPodSandbox --------------------------------------------------------------------------


async def stop_pod_sandbox(
    rt: Runtime, req: pb.StopPodSandboxRequest
) -> pb.StopPodSandboxResponse:
    pod = rt.find_pod(req.pod_sandbox_id)
    if pod is None:
        return pb.StopPodSandboxResponse()  # stopping what is not there is done
    async with rt.locks.hold(pod.id):
        await stop_pod(rt, pod)
    return pb.StopPodSandboxResponse()


async def stop_pod(rt: Runtime, pod: PodRecord) -> None:
    """Stops the pod's containers and its pause, and takes down its network. Idempotent.

    The containers are killed side by side, then the pause is killed while the network is
    taken down: each step waits on a shim or on runc, so a pod's stop is as long as its
    slowest container, not their sum (scale-down, hack/bench --pods)."""
    with Steps(f"stop pod {pod.id}") as where:
        where.at("containers")
        await _all_of([containers.stop_container_now(rt, ctr, timeout=0)
                       for ctr in rt.containers_of(pod.id)])
        rt.faults.point("stop_pod:after_containers")
        # The pause and the network at once: the network's teardown needs only the pinned
        # netns, not the pause gone (each is a worker thread's or a process's wait). Not
        # again once a stop has done them (RemovePodSandbox stops the pod first).
        where.at("pause, network")
        if pod.stop is not PodStop.DONE:
            await _all_of([_in_step("pause", _stop_pause(rt, pod)),
                           asyncio.to_thread(_take_down_network, rt, pod)])
            pod.stop = PodStop.DONE
        where.at("record")
        if pod.state != SANDBOX_NOTREADY:
            rt.registry.transition(pod, SANDBOX_NOTREADY)
    log.info("pod %s stopped", pod.short)


async def _stop_pause(rt: Runtime, pod: PodRecord) -> None:
    shim = rt.shims.get(pod.id)
    pod.stop = PodStop.KILLING  # its exit, reported by the shim, is this stop's (exits.py)
    if shim is not None:
        try:
            # An exited pause is not signalled: the answer says so, and nothing is waited for.
            view = await shim.signal(pod.id, signal.SIGKILL)
            if not view.exited:
                await shim.wait(pod.id, timeout=PAUSE_STOP_TIMEOUT)
        except (ShimError, OSError) as err:
            log.info("pause of pod %s: %s", pod.short, err)
    await delete_runc_state(rt, pod.id)
    rt.faults.point("stop_pod:after_pause")


def _take_down_network(rt: Runtime, pod: PodRecord) -> None:
    """The pod's network, then its netns: one worker-thread hop for both."""
    with Steps("network"):
        _teardown_network_now(rt, pod)
    rt.faults.point("stop_pod:after_network")
    with Steps("netns"):
        if pod.netns_path:
            unpin(Path(pod.netns_path))


async def _all_of(steps: Sequence[Awaitable[object]]) -> None:
    """Runs `steps` at once and waits for all of them, whatever their outcome (none is left
    running behind the request's answer); then raises the first one's error, if any."""
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def _teardown_network_now(rt: Runtime, pod: PodRecord) -> None:
    if pod.network_kind or pod.netns_path:
        netns = Path(pod.netns_path) if pod.netns_path else None
        # Host-port rules exist only for the port mappings of the pod's config (it never
        # changes): a pod without any needs no look at the nat table.
        rt.network.teardown(pod.id, netns if netns and netns.exists() else None,
                            host_ports=bool(port_mappings(pod.config)))


async def _teardown_network(rt: Runtime, pod: PodRecord) -> None:
    await asyncio.to_thread(_teardown_network_now, rt, pod)


async def _shutdown_shim(rt: Runtime, pod_id: str) -> None:
    """Asks the shim to exit (its processes are gone by now) and waits until it has."""
    shim = rt.shims.get(pod_id)
    await rt.shims.forget(pod_id)
    if shim is not None:
        await shut_down(shim, f"shim of pod {pod_id[:12]}")


# --- RemovePodSandbox ------------------------------------------------------------------------


async def remove_pod_sandbox(
    rt: Runtime, req: pb.RemovePodSandboxRequest
) -> pb.RemovePodSandboxResponse:
    """Answers once the pod is stopped, its containers removed, and it is gone from every
    list with its name free; its shim and host traces are cleaned after the answer,
    journalled (sandbox/removals.py)."""
    pod = rt.find_pod(req.pod_sandbox_id)
    if pod is None:
        return pb.RemovePodSandboxResponse()
    if pod.cleanup_error:
        await remove_leftover(rt, pod)
        return pb.RemovePodSandboxResponse()
    async with rt.locks.hold(pod.id):
        if rt.pods.get(pod.id) is pod:  # else a concurrent removal got there first
            leftovers = await _retire_pod(rt, pod)
            rt.removals.start(leftovers, _clean_up_pod(rt, leftovers))
    return pb.RemovePodSandboxResponse()


async def remove_pod_now(rt: Runtime, pod: PodRecord) -> None:
    """Forcibly stops the pod, then removes its containers and every trace of it (a
    leftover's removal and recovery, which wait for all of it)."""
    await _clean_up_pod(rt, await _retire_pod(rt, pod))


async def _retire_pod(rt: Runtime, pod: PodRecord) -> PodLeftovers:
    """Stops the pod (its network and netns go: an ip lease and host ports are not named by
    the pod's id, so none is left for later), removes its containers, and deletes its
    record, journalling what it left on the host."""
    with Steps(f"remove pod {pod.id}") as where:
        where.at("stop")
        await stop_pod(rt, pod)
        where.at("containers")
        # Their host traces are cleaned after, first thing in the pod's own cleanup.
        await _all_of([containers.remove_container_later(rt, ctr)
                       for ctr in rt.containers_of(pod.id)])
        where.at("record")
        leftovers = PodLeftovers(pod.id, pod.cgroup_path, pod.cgroup_slice,
                                 tuple(sorted(pod.namespaces.values())))
        rt.registry.forget(pod, leftovers.doc())
        if pod.cleanup_error:  # its RunPodSandbox's journal entry was kept (see _keep)
            rt.store.end_operation(f"run_pod:{pod.id}")
        _unshare_state_dirs(rt, pod)
    log.info("pod %s removed", pod.short)
    return leftovers


async def _clean_up_pod(rt: Runtime, leftovers: PodLeftovers) -> None:
    """Deletes what a removed pod left on the host, then its journal entry: its shim, then
    one thread hop for the rest (umount2 blocks), so the event loop is woken once."""
    pod_id = leftovers.pod_id
    with Steps(f"clean up after pod {pod_id}") as where:
        rt.faults.point("remove_pod:before_cleanup")
        where.at("containers")
        await rt.removals.of_pod(pod_id)  # their cgroups are below the pod's
        where.at("shim")
        if rt.shims.get(pod_id) is None:  # after a restart: the journal's cleanup
            await rt.shims.reconnect(pod_id, rt.paths.pod_dir(pod_id))
        await _shutdown_shim(rt, pod_id)
        rt.faults.point("remove_pod:midway")
        await asyncio.to_thread(_remove_host_traces, rt, leftovers, where)


def _remove_host_traces(rt: Runtime, leftovers: PodLeftovers, where: Steps) -> None:
    """The pod's pinned namespaces, mounts, cgroup and dirs, then its journal entry."""
    pod_id = leftovers.pod_id
    where.at("namespaces")
    pod_dir = rt.paths.pod_dir(pod_id)
    _unpin_namespaces(leftovers.namespaces, pod_dir)
    where.at("shm")
    mounts.unmount(pod_dir / "shm")
    where.at("pause rootfs")
    mounts.unmount(pod_dir / POD_PAUSE_ROOTFS)
    where.at("cgroup")
    place = cgroups.Placement(pod_path=leftovers.cgroup_path, slice=leftovers.cgroup_slice)
    if place.pod_path and place.driver is cgroups.Driver.CGROUPFS:
        cgroups.remove(place.pod_path, rt.host_cgroups.hierarchies)
    elif cgroups.is_own_slice(place.slice, pod_id):  # kubelet's slice is kubelet's
        cgroups.stop_slice(place.slice)
    rt.faults.point("remove_pod:after_cgroup")
    where.at("dirs")
    shutil.rmtree(pod_dir, True)
    shutil.rmtree(rt.paths.bundle_dir(pod_id), True)
    rt.store.end_operation(pod_id)


async def finish_removal(rt: Runtime, pod_id: str, doc: dict[str, Any]) -> None:
    """Startup: cleans what a pod's removal journalled and a crash left (sandbox/recovery.py).
    A failure is logged and its entry kept, for the next start to try again."""
    try:
        await _clean_up_pod(rt, PodLeftovers.from_doc(pod_id, doc))
    except StepFailed as err:
        log.warning("cleaning up after removed pod %s failed: %s", pod_id[:12], err)


async def remove_leftover(rt: Runtime, pod: PodRecord) -> None:
    """Removes a pod whose creation did not finish: interrupted by a crash (recovery), or
    failed with an undo that failed too (its cleanup_error is set; a removal, a retry with
    its name, or recovery). Its record may not name all it made, so every name derivable
    from its id is tried; removal is idempotent."""
    async with rt.locks.hold(pod.id):
        _name_leftovers(rt, pod)
        if rt.shims.get(pod.id) is None:
            await rt.shims.reconnect(pod.id, rt.paths.pod_dir(pod.id))
        await remove_pod_now(rt, pod)


def _name_leftovers(rt: Runtime, pod: PodRecord) -> None:
    """Fills in the record what a half-made pod may have made: the names are derived from
    its id and config, as RunPodSandbox derives them."""
    opts = pod.config.linux.security_context.namespace_options
    if opts.network != pb.NODE:
        pod.netns_path = pod.netns_path or str(pod_netns_path(pod.id))
    if opts.network != pb.NODE or rt.shims.network_ahead is not None:
        # A host-network pod that took a spare may hold the network plumbed in its netns
        # (sandbox/shims.py); tearing down one that was never made does nothing.
        pod.network_kind = pod.network_kind or rt.network_kind
    if not (pod.cgroup_path or pod.cgroup_slice):
        with contextlib.suppress(cgroups.CgroupError):
            place = cgroups.placement(rt.config.driver, pod.config.linux.cgroup_parent,
                                      rt.config.default_cgroup_parent, pod.id)  # fmt: skip
            pod.cgroup_path, pod.cgroup_slice = place.pod_path, place.slice


# --- PodSandboxStatus and ListPodSandbox ------------------------------------------------------


def pod_sandbox_status(rt: Runtime, req: pb.PodSandboxStatusRequest) -> bytes:
    """Assembled from the pod's and its containers' kept status bytes, the timestamp and,
    verbose (critest's and crictl inspectp's), the pod's kept info entry (sandbox/wire.py)."""
    pod = rt.registry.visible_pod(req.pod_sandbox_id)
    if not pod.status_bytes:
        pod.status_bytes = sandbox_status(pod).SerializeToString()
    parts = [message_field(STATUS_FIELD, pod.status_bytes)]
    if req.verbose:
        if not pod.verbose_info:
            pod.verbose_info = verbose_info_entry(INFO_FIELD, {
                "pid": pod.pause_pid, "netns": pod.netns_path, "namespaces": pod.namespaces,
                "cgroup": pod.cgroup_path, "network": pod.network_kind,
                "runtimeHandler": pod.runtime_handler,
            }, pod.config)
        parts.append(pod.verbose_info)
    parts += [
        message_field(CONTAINER_STATUSES_FIELD, containers.status_bytes(rt, c))
        for c in rt.registry.visible_containers_of(pod.id)
    ]
    parts.append(int_field(TIMESTAMP_FIELD, time.time_ns()))
    return b"".join(parts)


def sandbox_status(pod: PodRecord) -> pb.PodSandboxStatus:
    config = pod.config
    opts = config.linux.security_context.namespace_options
    return pb.PodSandboxStatus(
        id=pod.id,
        metadata=config.metadata,
        state=cri_pod_state(pod.state),
        created_at=pod.created_at,
        network=pb.PodSandboxNetworkStatus(
            ip=pod.ip, additional_ips=[pb.PodIP(ip=ip) for ip in pod.additional_ips]
        ),
        linux=pb.LinuxPodSandboxStatus(
            namespaces=pb.Namespace(
                options=pb.NamespaceOption(
                    network=opts.network, pid=opts.pid, ipc=opts.ipc, target_id=opts.target_id
                )
            )
        ),
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=pod.runtime_handler,
    )


def list_pod_sandbox(rt: Runtime, req: pb.ListPodSandboxRequest) -> bytes:
    """A ListPodSandboxResponse, assembled from each pod's cached entry (see sandbox/wire.py).
    Unfiltered, as kubelet's relist asks every second, the whole answer is cached too."""
    return rt.list_answer(
        "pods", rt.registry.pods, req.filter, lambda: b"".join(_entries(rt, req.filter))
    )


def stream_pod_sandboxes(
    rt: Runtime, req: pb.StreamPodSandboxesRequest
) -> AsyncIterator[bytes]:
    """StreamPodSandboxesResponse messages: the entries ListPodSandbox answers with, in pages
    (its `pod_sandboxes` is field 1, like ListPodSandboxResponse's `items`)."""
    return stream_pages(_entries(rt, req.filter))


def _entries(rt: Runtime, flt: pb.PodSandboxFilter) -> list[bytes]:
    want = flt.state.state if flt.HasField("state") else None
    matching = rt.registry.pods_matching(flt.id, want, flt.label_selector)
    return list_entries(matching, LIST_PODS_FIELD, _summary)


def _summary(pod: PodRecord) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=pod.id,
        metadata=pod.config.metadata,
        state=cri_pod_state(pod.state),
        created_at=pod.created_at,
        labels=pod.config.labels,
        annotations=pod.config.annotations,
        runtime_handler=pod.runtime_handler,
    )


# --- UpdatePodSandboxResources ---------------------------------------------------------------


async def update_pod_sandbox_resources(
    rt: Runtime, req: pb.UpdatePodSandboxResourcesRequest
) -> pb.UpdatePodSandboxResourcesResponse:
    """Applies the pod's new resources plus overhead to the pod cgroup (in-place resize) and
    records them in the pod's config, so status and a restarted daemon see what is applied.

    With the systemd driver the pod's slice is kubelet's, which sets its limits itself (the
    request is a notification, as containerd treats it), or the pod's own, which carries no
    limits (crictl): recorded, nothing written."""
    pod = rt.registry.visible_pod(req.pod_sandbox_id)
    owned = containers.pod_placement(pod).driver is cgroups.Driver.CGROUPFS
    if pod.state != SANDBOX_READY or (owned and not pod.cgroup_path):
        raise FailedPrecondition(f"pod sandbox {pod.id} is {pod.state}: nothing to update")
    linux = pb.LinuxPodSandboxConfig(resources=req.resources, overhead=req.overhead)
    validate.pod_resources(linux)
    async with rt.locks.hold(pod.id):
        try:
            if owned:
                await asyncio.to_thread(
                    cgroups.update, pod.cgroup_path, pod_resources(linux),
                    rt.host_cgroups.hierarchies,
                )
        except cgroups.CgroupError as err:
            raise InvalidArgument(f"pod sandbox {pod.id} resources: {err}") from err
        except OSError as err:  # e.g. a memory limit below what the pod uses now (EBUSY)
            raise FailedPrecondition(f"updating pod sandbox {pod.id} cgroup: {err}") from err
        pod.config.linux.resources.CopyFrom(req.resources)
        pod.config.linux.overhead.CopyFrom(req.overhead)
        rt.registry.save(pod)
    log.info("pod %s resources updated", pod.short)
    return pb.UpdatePodSandboxResourcesResponse()

