"""Stats: ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats, their
Stream* variants, ListMetricDescriptors, ListPodSandboxMetrics, UpdatePodSandboxResources.

Figures come straight from the kernel: the cgroup of each container and pod (cpu, memory,
swap, processes, OOM kills), the container's writable upper dir (disk), and /proc/net/dev
inside the pod's netns (network). kubelet reads them for its summary API and for eviction
(working set, available memory, writable layer bytes and inodes).

Every RPC takes its figures from one `Stats` object owned by the server, which keeps the
latest sample of each source: kubelet's summary API, its eviction manager, its metrics and
crictl may all ask within the same second, and none of them needs figures fresher than that.
The previous sample also gives usage_nano_cores, the cpu rate between two samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cri_api import api_pb2 as pb
from netns.enter import InterfaceCounters, interface_counters
from sandbox import cgroups
from sandbox.images.snapshots import tree_usage
from sandbox.records import SANDBOX_READY, ContainerRecord, PodRecord
from sandbox.runtime import Runtime

log = logging.getLogger("flatpod.stats")
T = TypeVar("T")

NS_PER_S = 1_000_000_000
# cgroup and netns counters: a second, because kubelet's callers (summary API, eviction,
# /metrics/cadvisor) poll every 10 s or more and often together, and cAdvisor's own
# resolution is about a second; the rate therefore spans at least this long.
CGROUP_TTL_NS = NS_PER_S
# Writable layers: walking an upper dir costs one lstat per file, so big layers are walked
# less often. kubelet's eviction compares disk usage against thresholds in the GB range, and
# cAdvisor itself refreshes disk usage only every minute or so: 5 s stale is harmless.
DISK_TTL_NS = 5 * NS_PER_S
DEFAULT_INTERFACE = "eth0"
# Items per message of the Stream* RPCs.
STREAM_PAGE = 100


# --- samples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupSample:
    """One reading of a cgroup. Zeros, with a timestamp, when the cgroup does not exist yet."""

    timestamp: int  # ns since the epoch, what the CRI reports
    monotonic: int  # ns, what the cpu rate and the cache age are measured with
    cpu_ns: int = 0
    memory: cgroups.MemoryStats | None = None
    swap_usage: int | None = None
    swap_limit: int | None = None  # swap alone (memsw - memory limit); None: unlimited
    processes: int = 0
    oom_kills: int = 0
    nano_cores: int | None = None  # None until there is a previous sample to compare with


@dataclass(frozen=True)
class DiskSample:
    timestamp: int
    monotonic: int
    used_bytes: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class NetSample:
    timestamp: int
    monotonic: int
    interfaces: Mapping[str, InterfaceCounters] = field(default_factory=dict)


@dataclass(frozen=True)
class Readings:
    """What one trip off the event loop read."""

    cgroups: dict[str, CgroupSample]
    disks: dict[str, DiskSample]
    nets: dict[str, NetSample]


def read_cgroup(path: str, hs: Sequence[cgroups.Hierarchy]) -> CgroupSample:
    now, mono = time.time_ns(), time.monotonic_ns()
    try:
        cpu = cgroups.read_cpu_usage_ns(path, hs)
        memory = cgroups.read_memory(path, hs)
    except (OSError, ValueError):  # no cgroup (yet, or any more): zeros, as critest expects
        return CgroupSample(now, mono)
    swap_usage, swap_limit = _read_swap(path, memory, hs)
    return CgroupSample(
        timestamp=now,
        monotonic=mono,
        cpu_ns=cpu,
        memory=memory,
        swap_usage=swap_usage,
        swap_limit=swap_limit,
        processes=len(cgroups.pids(path, hs)),
        oom_kills=_oom_kills(path, hs),
    )


def _read_swap(
    path: str, memory: cgroups.MemoryStats, hs: Sequence[cgroups.Hierarchy]
) -> tuple[int | None, int | None]:
    """(swap used, swap limit); v1 only counts memory+swap, so swap is the difference."""
    h = next((h for h in hs if "memory" in h.controllers), None)
    if h is None:
        return None, None
    d = h.dir_for(path)
    try:
        if h.version == 2:
            raw = (d / "memory.swap.max").read_text().strip()
            used = int((d / "memory.swap.current").read_text())
            return used, None if raw == "max" else int(raw)
        memsw = int((d / "memory.memsw.usage_in_bytes").read_text())
        memsw_limit = int((d / "memory.memsw.limit_in_bytes").read_text())
    except (OSError, ValueError):  # swap accounting is off (no memsw files)
        return None, None
    swap_limit = None
    if memsw_limit < 1 << 62 and memory.limit is not None:
        swap_limit = max(0, memsw_limit - memory.limit)
    return max(0, memsw - memory.usage), swap_limit


def _oom_kills(path: str, hs: Sequence[cgroups.Hierarchy]) -> int:
    try:
        return cgroups.oom_kill_count(path, hs)
    except (OSError, ValueError):
        return 0


def read_disk(upper: Path) -> DiskSample:
    now, mono = time.time_ns(), time.monotonic_ns()
    try:
        usage = tree_usage(upper)
    except FileNotFoundError:  # no layer yet, or removed just now
        return DiskSample(now, mono)
    return DiskSample(now, mono, usage.bytes, usage.inodes)


def read_net(netns_path: str) -> NetSample:
    now, mono = time.time_ns(), time.monotonic_ns()
    try:
        counters = interface_counters(Path(netns_path))
    except OSError:  # the pod was stopped: its netns is gone
        return NetSample(now, mono)
    return NetSample(now, mono, counters)


def read_all(cgroup_paths: Iterable[str], uppers: Mapping[str, Path],
             netns_paths: Iterable[str]) -> Readings:  # fmt: skip
    """Blocking: every stale source in one go, so that a list costs one thread hop."""
    hs = cgroups.hierarchies()
    return Readings(
        cgroups={p: read_cgroup(p, hs) for p in cgroup_paths},
        disks={cid: read_disk(upper) for cid, upper in uppers.items()},
        nets={n: read_net(n) for n in netns_paths},
    )


def with_rate(sample: CgroupSample, previous: CgroupSample | None) -> CgroupSample:
    """usage_nano_cores: cpu time used per second between the previous sample and this one."""
    if previous is None or previous.memory is None or sample.memory is None:
        return sample
    elapsed = sample.monotonic - previous.monotonic
    used = sample.cpu_ns - previous.cpu_ns
    if elapsed <= 0 or used < 0:  # a recreated cgroup starts again from zero
        return sample
    return dataclasses.replace(sample, nano_cores=used * NS_PER_S // elapsed)


# --- the sample cache, and the RPCs that read it ----------------------------------------------


def _fresh(sample: CgroupSample | DiskSample | NetSample | None, now: int, ttl: int) -> bool:
    return sample is not None and now - sample.monotonic < ttl


@dataclass
class Stats:
    """The stats RPCs and the latest sample of every source, for the life of the server."""

    cgroup_ttl_ns: int = CGROUP_TTL_NS
    disk_ttl_ns: int = DISK_TTL_NS
    cgroups: dict[str, CgroupSample] = field(default_factory=dict)  # by cgroup path
    disks: dict[str, DiskSample] = field(default_factory=dict)  # by container id
    nets: dict[str, NetSample] = field(default_factory=dict)  # by netns path
    # One refresh at a time: a second caller then finds fresh samples instead of reading
    # again a few ms later, which would also make the cpu rate span almost nothing.
    refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self, rt: Runtime, ctrs: Iterable[ContainerRecord],
                      pod_list: Iterable[PodRecord]) -> None:  # fmt: skip
        """Re-reads the sources of these containers and pods whose sample is too old."""
        ctrs, pod_list = list(ctrs), list(pod_list)
        async with self.refreshing:
            now = time.monotonic_ns()
            paths = {c.cgroup_path for c in ctrs} | {p.cgroup_path for p in pod_list}
            stale_cgroups = [
                p for p in paths if p and not _fresh(self.cgroups.get(p), now, self.cgroup_ttl_ns)
            ]
            stale_disks = {
                c.id: rt.paths.writable_layers / c.id / "upper"
                for c in ctrs
                if not _fresh(self.disks.get(c.id), now, self.disk_ttl_ns)
            }
            stale_nets = [
                p.netns_path for p in pod_list
                if p.netns_path and not _fresh(self.nets.get(p.netns_path), now,
                                               self.cgroup_ttl_ns)
            ]
            if not (stale_cgroups or stale_disks or stale_nets):
                self._forget_gone(rt)  # samples of what was removed since, even so
                return
            read = await asyncio.to_thread(read_all, stale_cgroups, stale_disks, stale_nets)
            for path, sample in read.cgroups.items():
                self.cgroups[path] = with_rate(sample, self.cgroups.get(path))
            self.disks.update(read.disks)
            self.nets.update(read.nets)
            self._forget_gone(rt)

    def _forget_gone(self, rt: Runtime) -> None:
        """Drops samples of removed containers and pods, so the cache stays runtime-sized."""
        live_paths = {c.cgroup_path for c in rt.containers.values()}
        live_paths |= {p.cgroup_path for p in rt.pods.values()}
        live_nets = {p.netns_path for p in rt.pods.values()}
        for cache, live in ((self.cgroups, live_paths), (self.disks, rt.containers.keys()),
                            (self.nets, live_nets)):
            for key in [k for k in cache if k not in live]:
                del cache[key]

    def cgroup(self, path: str) -> CgroupSample:
        return self.cgroups.get(path) or CgroupSample(time.time_ns(), time.monotonic_ns())

    def disk(self, ctr_id: str) -> DiskSample:
        return self.disks.get(ctr_id) or DiskSample(time.time_ns(), time.monotonic_ns())

    def net(self, netns_path: str) -> NetSample:
        return self.nets.get(netns_path) or NetSample(time.time_ns(), time.monotonic_ns())

    # --- ContainerStats, ListContainerStats, StreamContainerStats -----------------------------

    async def container_stats(
        self, rt: Runtime, req: pb.ContainerStatsRequest
    ) -> pb.ContainerStatsResponse:
        ctr = rt.registry.visible_container(req.container_id)
        await self.refresh(rt, [ctr], [])
        return pb.ContainerStatsResponse(stats=self.container_message(rt, ctr))

    async def list_container_stats(
        self, rt: Runtime, req: pb.ListContainerStatsRequest
    ) -> pb.ListContainerStatsResponse:
        flt = req.filter
        ctrs = rt.registry.containers_matching(flt.id, flt.pod_sandbox_id, flt.label_selector)
        await self.refresh(rt, ctrs, [])
        return pb.ListContainerStatsResponse(stats=[self.container_message(rt, c) for c in ctrs])

    async def stream_container_stats(
        self, rt: Runtime, req: pb.StreamContainerStatsRequest
    ) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        listed = await self.list_container_stats(
            rt, pb.ListContainerStatsRequest(filter=req.filter)
        )
        for page in _pages(list(listed.stats)):
            yield pb.StreamContainerStatsResponse(container_stats=page)

    def container_message(self, rt: Runtime, ctr: ContainerRecord) -> pb.ContainerStats:
        sample, disk = self.cgroup(ctr.cgroup_path), self.disk(ctr.id)
        return pb.ContainerStats(
            attributes=pb.ContainerAttributes(
                id=ctr.id, metadata=ctr.config.metadata, labels=ctr.config.labels,
                annotations=ctr.config.annotations,
            ),
            cpu=cpu_usage(sample),
            memory=memory_usage(sample),
            swap=swap_usage(sample),
            writable_layer=pb.FilesystemUsage(
                timestamp=disk.timestamp,
                fs_id=pb.FilesystemIdentifier(mountpoint=str(rt.paths.writable_layers)),
                used_bytes=pb.UInt64Value(value=disk.used_bytes),
                inodes_used=pb.UInt64Value(value=disk.inodes),
            ),
        )

    # --- PodSandboxStats, ListPodSandboxStats, StreamPodSandboxStats --------------------------

    async def pod_sandbox_stats(
        self, rt: Runtime, req: pb.PodSandboxStatsRequest
    ) -> pb.PodSandboxStatsResponse:
        pod = rt.registry.visible_pod(req.pod_sandbox_id)
        ctrs = rt.registry.visible_containers_of(pod.id)
        await self.refresh(rt, ctrs, [pod])
        return pb.PodSandboxStatsResponse(stats=self.pod_message(rt, pod, ctrs))

    async def list_pod_sandbox_stats(
        self, rt: Runtime, req: pb.ListPodSandboxStatsRequest
    ) -> pb.ListPodSandboxStatsResponse:
        by_pod = await self._sampled_ready_pods(
            rt, rt.registry.pods_matching(req.filter.id, labels=req.filter.label_selector)
        )
        return pb.ListPodSandboxStatsResponse(
            stats=[self.pod_message(rt, p, ctrs) for p, ctrs in by_pod]
        )

    async def stream_pod_sandbox_stats(
        self, rt: Runtime, req: pb.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        listed = await self.list_pod_sandbox_stats(
            rt, pb.ListPodSandboxStatsRequest(filter=req.filter)
        )
        for page in _pages(list(listed.stats)):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=page)

    async def _sampled_ready_pods(
        self, rt: Runtime, candidates: Iterable[PodRecord]
    ) -> list[tuple[PodRecord, list[ContainerRecord]]]:
        """The ready pods among `candidates` with their containers, all freshly sampled.

        Ready pods only (as containerd): a stopped pod has no process and no network left.
        """
        by_pod = [
            (p, rt.registry.visible_containers_of(p.id))
            for p in candidates if p.state == SANDBOX_READY
        ]
        await self.refresh(rt, [c for _, cs in by_pod for c in cs], [p for p, _ in by_pod])
        return by_pod

    def pod_message(
        self, rt: Runtime, pod: PodRecord, ctrs: Iterable[ContainerRecord]
    ) -> pb.PodSandboxStats:
        sample = self.cgroup(pod.cgroup_path)
        linux = pb.LinuxPodSandboxStats(
            cpu=cpu_usage(sample),
            memory=memory_usage(sample),
            process=pb.ProcessUsage(
                timestamp=sample.timestamp, process_count=pb.UInt64Value(value=sample.processes)
            ),
            containers=[self.container_message(rt, c) for c in ctrs],
        )
        if pod.netns_path:  # host-network pods share the node's counters: none of their own
            linux.network.CopyFrom(network_usage(self.net(pod.netns_path)))
        return pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(
                id=pod.id, metadata=pod.config.metadata, labels=pod.config.labels,
                annotations=pod.config.annotations,
            ),
            linux=linux,
        )

    # --- ListMetricDescriptors, ListPodSandboxMetrics, StreamPodSandboxMetrics ----------------

    async def list_metric_descriptors(
        self, rt: Runtime, req: pb.ListMetricDescriptorsRequest
    ) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(
            descriptors=[
                pb.MetricDescriptor(name=m.name, help=m.help, label_keys=[*BASE_LABELS, *m.extra])
                for m in METRICS
            ]
        )

    async def list_pod_sandbox_metrics(
        self, rt: Runtime, req: pb.ListPodSandboxMetricsRequest
    ) -> pb.ListPodSandboxMetricsResponse:
        by_pod = await self._sampled_ready_pods(rt, rt.pods.values())
        return pb.ListPodSandboxMetricsResponse(
            pod_metrics=[self.pod_metrics(rt, p, ctrs) for p, ctrs in by_pod]
        )

    async def stream_pod_sandbox_metrics(
        self, rt: Runtime, req: pb.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        listed = await self.list_pod_sandbox_metrics(rt, pb.ListPodSandboxMetricsRequest())
        for page in _pages(list(listed.pod_metrics)):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)

    def pod_metrics(
        self, rt: Runtime, pod: PodRecord, ctrs: Iterable[ContainerRecord]
    ) -> pb.PodSandboxMetrics:
        labels = (pod.cgroup_path, pod.id, "")
        sample = self.cgroup(pod.cgroup_path)
        metrics = cgroup_metrics(labels, sample)
        if pod.netns_path:
            metrics += network_metrics(labels, self.net(pod.netns_path))
        return pb.PodSandboxMetrics(
            pod_sandbox_id=pod.id,
            metrics=metrics,
            container_metrics=[
                pb.ContainerMetrics(container_id=c.id, metrics=self.container_metrics(rt, c))
                for c in ctrs
            ],
        )

    def container_metrics(self, rt: Runtime, ctr: ContainerRecord) -> list[pb.Metric]:
        labels = (ctr.cgroup_path, ctr.id, ctr.image_name or ctr.image_ref)
        disk = self.disk(ctr.id)
        device = str(rt.paths.writable_layers)
        return [
            *cgroup_metrics(labels, self.cgroup(ctr.cgroup_path)),
            _metric("container_fs_usage_bytes", disk.timestamp, labels, disk.used_bytes, device),
            _metric("container_fs_inodes_usage", disk.timestamp, labels, disk.inodes, device),
        ]


# --- CRI messages from samples ---------------------------------------------------------------


def _u64(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(0, value))


def cpu_usage(s: CgroupSample) -> pb.CpuUsage:
    cpu = pb.CpuUsage(timestamp=s.timestamp, usage_core_nano_seconds=_u64(s.cpu_ns))
    if s.nano_cores is not None:  # unset, not 0, until a rate exists (kubelet tells them apart)
        cpu.usage_nano_cores.CopyFrom(_u64(s.nano_cores))
    return cpu


def memory_usage(s: CgroupSample) -> pb.MemoryUsage:
    m = s.memory or cgroups.MemoryStats(0, 0, 0, 0, 0, None)
    usage = pb.MemoryUsage(
        timestamp=s.timestamp,
        working_set_bytes=_u64(m.working_set),
        usage_bytes=_u64(m.usage),
        rss_bytes=_u64(m.rss),
        page_faults=_u64(m.page_faults),
        major_page_faults=_u64(m.major_page_faults),
    )
    if m.limit is not None:  # eviction reads available against the limit; none if unlimited
        usage.available_bytes.CopyFrom(_u64(m.limit - m.working_set))
    return usage


def swap_usage(s: CgroupSample) -> pb.SwapUsage:
    swap = pb.SwapUsage(timestamp=s.timestamp, swap_usage_bytes=_u64(s.swap_usage or 0))
    if s.swap_limit is not None and s.swap_usage is not None:
        swap.swap_available_bytes.CopyFrom(_u64(s.swap_limit - s.swap_usage))
    return swap


def network_usage(n: NetSample) -> pb.NetworkUsage:
    interfaces = [
        pb.NetworkInterfaceUsage(
            name=name, rx_bytes=_u64(c.rx_bytes), rx_errors=_u64(c.rx_errors),
            tx_bytes=_u64(c.tx_bytes), tx_errors=_u64(c.tx_errors),
        )
        for name, c in sorted(n.interfaces.items())
        if name != "lo"
    ]
    usage = pb.NetworkUsage(timestamp=n.timestamp, interfaces=interfaces)
    default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), None)
    if default is not None:
        usage.default_interface.CopyFrom(default)
    return usage


# --- cAdvisor-style metrics ------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    counter: bool
    extra: tuple[str, ...] = ()  # label keys after BASE_LABELS


# cAdvisor's names and base labels ("id" the cgroup, "name" the container or pod id, "image").
# kubelet appends namespace, pod and container itself (criDescToProm), so they are not here.
BASE_LABELS = ("id", "name", "image")
METRICS = (
    MetricSpec("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.",
               True, ("cpu",)),
    MetricSpec("container_memory_usage_bytes",
               "Current memory usage in bytes, including all memory regardless of when it was "
               "accessed", False),
    MetricSpec("container_memory_working_set_bytes", "Current working set in bytes.", False),
    MetricSpec("container_memory_rss", "Size of RSS in bytes.", False),
    MetricSpec("container_memory_swap", "Container swap usage in bytes.", False),
    MetricSpec("container_memory_failures_total", "Cumulative count of memory allocation "
               "failures.", True, ("failure_type", "scope")),
    MetricSpec("container_spec_memory_limit_bytes", "Memory limit for the container.", False),
    MetricSpec("container_oom_events_total", "Count of out of memory events observed for the "
               "container", True),
    MetricSpec("container_processes", "Number of processes running inside the container.",
               False),
    MetricSpec("container_fs_usage_bytes", "Number of bytes that are consumed by the container "
               "on this filesystem.", False, ("device",)),
    MetricSpec("container_fs_inodes_usage", "Number of inodes used by the container on this "
               "filesystem.", False, ("device",)),
    MetricSpec("container_network_receive_bytes_total", "Cumulative count of bytes received",
               True, ("interface",)),
    MetricSpec("container_network_receive_packets_total", "Cumulative count of packets "
               "received", True, ("interface",)),
    MetricSpec("container_network_receive_packets_dropped_total", "Cumulative count of packets "
               "dropped while receiving", True, ("interface",)),
    MetricSpec("container_network_receive_errors_total", "Cumulative count of errors "
               "encountered while receiving", True, ("interface",)),
    MetricSpec("container_network_transmit_bytes_total", "Cumulative count of bytes "
               "transmitted", True, ("interface",)),
    MetricSpec("container_network_transmit_packets_total", "Cumulative count of packets "
               "transmitted", True, ("interface",)),
    MetricSpec("container_network_transmit_packets_dropped_total", "Cumulative count of "
               "packets dropped while transmitting", True, ("interface",)),
    MetricSpec("container_network_transmit_errors_total", "Cumulative count of errors "
               "encountered while transmitting", True, ("interface",)),
)
_COUNTERS = frozenset(m.name for m in METRICS if m.counter)


def _metric(name: str, timestamp: int, labels: tuple[str, str, str], value: int,
            *extra: str) -> pb.Metric:  # fmt: skip
    return pb.Metric(
        name=name,
        timestamp=timestamp,
        metric_type=pb.COUNTER if name in _COUNTERS else pb.GAUGE,
        label_values=[*labels, *extra],
        value=_u64(value),
    )


def cgroup_metrics(labels: tuple[str, str, str], s: CgroupSample) -> list[pb.Metric]:
    m = s.memory or cgroups.MemoryStats(0, 0, 0, 0, 0, None)
    t = s.timestamp
    metrics = [
        # A whole number of seconds: Metric values are integers.
        _metric("container_cpu_usage_seconds_total", t, labels, s.cpu_ns // NS_PER_S, "total"),
        _metric("container_memory_usage_bytes", t, labels, m.usage),
        _metric("container_memory_working_set_bytes", t, labels, m.working_set),
        _metric("container_memory_rss", t, labels, m.rss),
        _metric("container_memory_swap", t, labels, s.swap_usage or 0),
        _metric("container_memory_failures_total", t, labels,
                m.page_faults, "pgfault", "container"),
        _metric("container_memory_failures_total", t, labels, m.major_page_faults,
                "pgmajfault", "container"),
        _metric("container_oom_events_total", t, labels, s.oom_kills),
        _metric("container_processes", t, labels, s.processes),
    ]
    if m.limit is not None:
        metrics.append(_metric("container_spec_memory_limit_bytes", t, labels, m.limit))
    return metrics


def network_metrics(labels: tuple[str, str, str], n: NetSample) -> list[pb.Metric]:
    metrics = []
    for name, c in sorted(n.interfaces.items()):
        if name == "lo":
            continue
        for metric, value in (
            ("container_network_receive_bytes_total", c.rx_bytes),
            ("container_network_receive_packets_total", c.rx_packets),
            ("container_network_receive_packets_dropped_total", c.rx_dropped),
            ("container_network_receive_errors_total", c.rx_errors),
            ("container_network_transmit_bytes_total", c.tx_bytes),
            ("container_network_transmit_packets_total", c.tx_packets),
            ("container_network_transmit_packets_dropped_total", c.tx_dropped),
            ("container_network_transmit_errors_total", c.tx_errors),
        ):
            metrics.append(_metric(metric, n.timestamp, labels, value, name))
    return metrics


# --- streams ----------------------------------------------------------------------------------


def _pages(items: list[T]) -> Iterable[list[T]]:
    """At least one page, so a stream with nothing to list still answers once."""
    for start in range(0, max(len(items), 1), STREAM_PAGE):
        yield items[start:start + STREAM_PAGE]
