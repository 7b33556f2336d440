"""Stats: ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats, their
Stream* variants, ListMetricDescriptors, ListPodSandboxMetrics, UpdatePodSandboxResources.

Figures come straight from the kernel: the cgroup of each container and pod (cpu, memory,
swap, block I/O, pressure, processes, OOM kills; read by cgroup_stats.py), the container's
writable upper dir (disk), and /proc/net/dev inside the pod's netns (network). The metrics
made of them are in metrics_cri.py. kubelet reads them for its summary API and for eviction
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
from sandbox import cgroup_stats, cgroups, metrics_cri
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
    """One reading of a cgroup. No figures, with a timestamp, when the cgroup does not exist yet."""

    timestamp: int  # ns since the epoch, what the CRI reports
    monotonic: int  # ns, what the cpu rate and the cache age are measured with
    figures: cgroup_stats.CgroupFigures | None = None
    processes: int = 0
    # Open fds, sockets and the open-files limit: only read for the metrics, which alone
    # report them, since they cost a readlink per open file.
    procs: cgroup_stats.ProcessFigures | None = None
    nano_cores: int | None = None  # None until there is a previous sample to compare with

    @property
    def cpu_ns(self) -> int:
        return self.figures.cpu.usage_ns if self.figures else 0

    @property
    def memory(self) -> cgroup_stats.MemoryFigures:
        return self.figures.memory if self.figures else cgroup_stats.MemoryFigures()


@dataclass(frozen=True)
class DiskSample:
    timestamp: int
    monotonic: int
    used_bytes: int = 0
    inodes: int = 0
    device: cgroup_stats.BlockDevice | None = None  # holding the writable layers; None: virtual
    disk: cgroup_stats.BlockDevice | None = None  # the whole disk of `device` (I/O is per disk)


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


def cgroup_dirs(path: str, hs: Sequence[cgroups.Hierarchy]) -> Path | cgroup_stats.V1Dirs:
    """Where the cgroup `path` is on disk: its v2 directory, or its directory per v1 controller.

    The one place the stats find a cgroup's directories; the readers take directories only.
    """
    v2 = next((h for h in hs if h.version == 2), None)
    if v2 is not None and not any(h.version == 1 for h in hs):
        return v2.dir_for(path)
    by_controller = {c: h.dir_for(path) for h in hs if h.version == 1 for c in h.controllers}
    return cgroup_stats.V1Dirs(by_controller, v2.dir_for(path) if v2 is not None else None)


def read_cgroup(path: str, hs: Sequence[cgroups.Hierarchy],
                root_pid: int | None = None) -> CgroupSample:  # fmt: skip
    """A sample of the cgroup `path`; with `root_pid`, also its processes' fds and limits."""
    now, mono = time.time_ns(), time.monotonic_ns()
    dirs = cgroup_dirs(path, hs)
    try:
        if isinstance(dirs, Path):
            figures = cgroup_stats.read_v2(dirs)
        else:
            figures = cgroup_stats.read_v1(dirs)
        pids = cgroups.pids(path, hs)
    except OSError:  # no cgroup (yet, or any more): zeros, as critest expects
        return CgroupSample(now, mono)
    procs = None if root_pid is None else cgroup_stats.read_processes(pids, root_pid)
    return CgroupSample(now, mono, figures, len(pids), procs)


def read_disk(upper: Path, device: cgroup_stats.BlockDevice | None = None,
              disk: cgroup_stats.BlockDevice | None = None) -> DiskSample:  # fmt: skip
    now, mono = time.time_ns(), time.monotonic_ns()
    try:
        usage = tree_usage(upper)
    except FileNotFoundError:  # no layer yet, or removed just now
        return DiskSample(now, mono, device=device, disk=disk)
    return DiskSample(now, mono, usage.bytes, usage.inodes, device, disk)


def read_net(netns_path: str) -> NetSample:
    now, mono = time.time_ns(), time.monotonic_ns()
    try:
        counters = interface_counters(Path(netns_path))
    except OSError:  # the pod was stopped: its netns is gone
        return NetSample(now, mono)
    return NetSample(now, mono, counters)


def read_all(cgroup_paths: Mapping[str, int | None], uppers: Mapping[str, Path],
             netns_paths: Iterable[str], layers: Path,
             hs: Sequence[cgroups.Hierarchy]) -> Readings:  # fmt: skip
    """Blocking: every stale source in one go, so that a list costs one thread hop.

    `cgroup_paths` maps each cgroup to the pid whose processes' details to read, or None.
    """
    device = cgroup_stats.filesystem_device(layers) if uppers else None
    disk = cgroup_stats.whole_disk(device) if device else None
    return Readings(
        cgroups={p: read_cgroup(p, hs, pid) for p, pid in cgroup_paths.items()},
        disks={cid: read_disk(upper, device, disk) for cid, upper in uppers.items()},
        nets={n: read_net(n) for n in netns_paths},
    )


def with_rate(sample: CgroupSample, previous: CgroupSample | None) -> CgroupSample:
    """usage_nano_cores: cpu time used per second between the previous sample and this one."""
    if previous is None or previous.figures is None or sample.figures is None:
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
                      pod_list: Iterable[PodRecord], detail: bool = False) -> None:  # fmt: skip
        """Re-reads the sources of these containers and pods whose sample is too old.

        `detail`: the cgroup samples must include their processes' fds and limits (metrics).
        """
        ctrs, pod_list = list(ctrs), list(pod_list)
        async with self.refreshing:
            now = time.monotonic_ns()
            # Each cgroup, with the pid whose process details to read (containers' metrics).
            wanted: dict[str, int | None] = {p.cgroup_path: None for p in pod_list}
            wanted |= {c.cgroup_path: c.pid if detail else None for c in ctrs}
            stale_cgroups = {
                path: pid for path, pid in wanted.items()
                if path and self._stale(path, now, pid is not None)
            }
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
            read = await asyncio.to_thread(read_all, stale_cgroups, stale_disks, stale_nets,
                                           rt.paths.writable_layers,
                                           rt.host_cgroups.hierarchies)
            for path, sample in read.cgroups.items():
                previous = self.cgroups.get(path)
                if _fresh(previous, now, self.cgroup_ttl_ns) and previous is not None:
                    # Read again for its process details only: a rate over a few ms would be
                    # noise, so the last one stands.
                    sample = dataclasses.replace(sample, nano_cores=previous.nano_cores)
                else:
                    sample = with_rate(sample, previous)
                self.cgroups[path] = sample
            self.disks.update(read.disks)
            self.nets.update(read.nets)
            self._forget_gone(rt)

    def _stale(self, path: str, now: int, detail: bool) -> bool:
        sample = self.cgroups.get(path)
        if detail and sample is not None and sample.figures is not None and sample.procs is None:
            return True
        return not _fresh(sample, now, self.cgroup_ttl_ns)

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
            io=io_usage(sample),
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
        self, rt: Runtime, candidates: Iterable[PodRecord], detail: bool = False
    ) -> list[tuple[PodRecord, list[ContainerRecord]]]:
        """The ready pods among `candidates` with their containers, all freshly sampled.

        Ready pods only (as containerd): a stopped pod has no process and no network left.
        """
        by_pod = [
            (p, rt.registry.visible_containers_of(p.id))
            for p in candidates if p.state == SANDBOX_READY
        ]
        await self.refresh(rt, [c for _, cs in by_pod for c in cs], [p for p, _ in by_pod],
                           detail)
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
            io=io_usage(sample),
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

    def list_metric_descriptors(
        self, rt: Runtime, req: pb.ListMetricDescriptorsRequest
    ) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(descriptors=metrics_cri.descriptors())

    async def list_pod_sandbox_metrics(
        self, rt: Runtime, req: pb.ListPodSandboxMetricsRequest
    ) -> pb.ListPodSandboxMetricsResponse:
        by_pod = await self._sampled_ready_pods(rt, rt.pods.values(), detail=True)
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
        meta = pod.config.metadata
        labels = metrics_cri.BaseLabels(container="", id=pod.cgroup_path, image="", name=pod.id,
                                        namespace=meta.namespace, pod=meta.name)
        sample = self.cgroup(pod.cgroup_path)
        metrics = [
            *metrics_cri.cgroup_metrics(labels, sample.timestamp, sample.figures),
            *metrics_cri.process_metrics(labels, sample.timestamp, sample.processes, None),
            metrics_cri.metric("container_start_time_seconds", sample.timestamp, labels,
                               pod.created_at // NS_PER_S),
        ]
        if sample.figures is not None:
            metrics += metrics_cri.io_metrics(labels, sample.timestamp, sample.figures.io)
        if pod.netns_path:  # on the pause, which holds the netns, as cAdvisor reports it
            net = self.net(pod.netns_path)
            metrics += metrics_cri.network_metrics(
                labels._replace(container=metrics_cri.POD_CONTAINER), net.timestamp,
                net.interfaces)
        return pb.PodSandboxMetrics(
            pod_sandbox_id=pod.id,
            metrics=metrics,
            container_metrics=[
                pb.ContainerMetrics(container_id=c.id, metrics=self.container_metrics(rt, pod, c))
                for c in ctrs
            ],
        )

    def container_metrics(self, rt: Runtime, pod: PodRecord,
                          ctr: ContainerRecord) -> list[pb.Metric]:  # fmt: skip
        labels = metrics_cri.BaseLabels(
            container=ctr.config.metadata.name, id=ctr.cgroup_path,
            image=ctr.image_name or ctr.image_ref, name=ctr.id,
            namespace=pod.config.metadata.namespace, pod=pod.config.metadata.name,
        )
        sample, disk = self.cgroup(ctr.cgroup_path), self.disk(ctr.id)
        t = sample.timestamp
        # cAdvisor names the filesystem's device; a virtual one (overlay, tmpfs) has none.
        fs = disk.device.name if disk.device else str(rt.paths.writable_layers)
        metrics = [
            *metrics_cri.cgroup_metrics(labels, t, sample.figures),
            *metrics_cri.process_metrics(labels, t, sample.processes, sample.procs),
            metrics_cri.metric("container_start_time_seconds", t, labels,
                               (ctr.started_at or ctr.created_at) // NS_PER_S),
            metrics_cri.metric("container_fs_usage_bytes", disk.timestamp, labels,
                               disk.used_bytes, fs),
            metrics_cri.metric("container_fs_inodes_usage", disk.timestamp, labels, disk.inodes,
                               fs),
        ]
        if sample.figures is not None:
            metrics += metrics_cri.io_metrics(labels, t, sample.figures.io, disk.disk)
        return metrics


# --- CRI messages from samples ---------------------------------------------------------------


def _u64(value: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(0, value))


def psi_stats(p: cgroup_stats.Pressure | None) -> pb.PsiStats | None:
    """cri-api's PsiStats from a `*.pressure` file; None where the kernel has none (v1)."""
    if p is None:
        return None

    def data(d: cgroup_stats.PsiData | None) -> pb.PsiData | None:
        if d is None:
            return None
        return pb.PsiData(Total=d.total_us, Avg10=d.avg10, Avg60=d.avg60, Avg300=d.avg300)

    return pb.PsiStats(Full=data(p.full), Some=data(p.some))


def cpu_usage(s: CgroupSample) -> pb.CpuUsage:
    cpu = pb.CpuUsage(timestamp=s.timestamp, usage_core_nano_seconds=_u64(s.cpu_ns),
                      psi=psi_stats(s.figures.cpu_pressure if s.figures else None))
    if s.nano_cores is not None:  # unset, not 0, until a rate exists (kubelet tells them apart)
        cpu.usage_nano_cores.CopyFrom(_u64(s.nano_cores))
    return cpu


def memory_usage(s: CgroupSample) -> pb.MemoryUsage:
    m = s.memory
    usage = pb.MemoryUsage(
        timestamp=s.timestamp,
        working_set_bytes=_u64(m.working_set),
        usage_bytes=_u64(m.usage),
        rss_bytes=_u64(m.rss),
        page_faults=_u64(m.page_faults),
        major_page_faults=_u64(m.major_page_faults),
        psi=psi_stats(s.figures.memory_pressure if s.figures else None),
    )
    if m.limit is not None:  # eviction reads available against the limit; none if unlimited
        usage.available_bytes.CopyFrom(_u64(m.limit - m.working_set))
    return usage


def io_usage(s: CgroupSample) -> pb.IoUsage | None:
    """Only I/O pressure has a CRI field: unset where the kernel has no PSI for the cgroup."""
    psi = psi_stats(s.figures.io_pressure if s.figures else None)
    return None if psi is None else pb.IoUsage(timestamp=s.timestamp, psi=psi)


def swap_usage(s: CgroupSample) -> pb.SwapUsage:
    m = s.memory
    swap = pb.SwapUsage(timestamp=s.timestamp, swap_usage_bytes=_u64(m.swap_usage or 0))
    if m.swap_limit is not None and m.swap_usage is not None:
        swap.swap_available_bytes.CopyFrom(_u64(m.swap_limit - m.swap_usage))
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


# --- streams ----------------------------------------------------------------------------------


def _pages(items: list[T]) -> Iterable[list[T]]:
    """At least one page, so a stream with nothing to list still answers once."""
    for start in range(0, max(len(items), 1), STREAM_PAGE):
        yield items[start:start + STREAM_PAGE]
