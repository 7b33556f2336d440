"""cAdvisor's container metrics, made from the stats samples: ListMetricDescriptors and the
metrics of ListPodSandboxMetrics.

With the PodAndContainerStatsFromCRI gate, kubelet serves these at /metrics/cadvisor instead of
cAdvisor's own, so they carry cAdvisor's names, help texts, types and label keys (cAdvisor's
`metrics/prometheus.go`, as vendored by Kubernetes 1.36), and the values cAdvisor computes
from the same cgroup files (see cgroup_stats.py). kubelet 1.36 passes the label keys through
as they are (criDescToProm), so the keys include what kubelet's cAdvisor labels add:
`container`, `pod` and `namespace`, which dashboards and the node e2e ContainerMetrics spec
select on. A CRI Metric's value is an unsigned integer, so seconds are whole seconds (as
containerd and CRI-O report them).

Rows: each container's cgroup under its container name; the pod's cgroup with an empty
container name (cAdvisor's pod-level rows); the pod's network under "POD" (cAdvisor reports
it on the pause container, which owns the network namespace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from cri_api import api_pb2 as pb
from netns.enter import InterfaceCounters
from sandbox import cgroup_stats
from sandbox.cgroup_stats import NS_PER_S, BlockDevice, CgroupFigures, DeviceIo

US_PER_S = 1_000_000
POD_CONTAINER = "POD"  # the container name of the pod's pause, as kubelet labels it


class BaseLabels(NamedTuple):
    """Values of the label keys every metric starts with, in BASE_LABELS order."""

    container: str  # the container's name; "" for the pod's cgroup, "POD" for its network
    id: str  # the cgroup path
    image: str
    name: str  # the container id (the pod id for pod-level rows)
    namespace: str
    pod: str


BASE_LABELS: tuple[str, ...] = BaseLabels._fields


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    counter: bool
    extra: tuple[str, ...] = ()  # label keys after BASE_LABELS


DEVICE = ("device",)
INTERFACE = ("interface",)
METRICS = (
    MetricSpec("container_last_seen", "Last time a container was seen by the exporter", False),
    MetricSpec("container_start_time_seconds",
               "Start time of the container since unix epoch in seconds.", False),
    # cpu
    MetricSpec("container_cpu_user_seconds_total",
               "Cumulative user cpu time consumed in seconds.", True),
    MetricSpec("container_cpu_system_seconds_total",
               "Cumulative system cpu time consumed in seconds.", True),
    MetricSpec("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.",
               True, ("cpu",)),
    MetricSpec("container_cpu_cfs_periods_total",
               "Number of elapsed enforcement period intervals.", True),
    MetricSpec("container_cpu_cfs_throttled_periods_total",
               "Number of throttled period intervals.", True),
    MetricSpec("container_cpu_cfs_throttled_seconds_total",
               "Total time duration the container has been throttled.", True),
    MetricSpec("container_spec_cpu_period", "CPU period of the container.", False),
    MetricSpec("container_spec_cpu_quota", "CPU quota of the container.", False),
    MetricSpec("container_spec_cpu_shares", "CPU share of the container.", False),
    # memory
    MetricSpec("container_memory_cache", "Number of bytes of page cache memory.", False),
    MetricSpec("container_memory_rss", "Size of RSS in bytes.", False),
    MetricSpec("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.",
               False),
    MetricSpec("container_memory_mapped_file", "Size of memory mapped files in bytes.", False),
    MetricSpec("container_memory_swap", "Container swap usage in bytes.", False),
    MetricSpec("container_memory_failcnt", "Number of memory usage hits limits", True),
    MetricSpec("container_memory_usage_bytes",
               "Current memory usage in bytes, including all memory regardless of when it was "
               "accessed", False),
    MetricSpec("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes",
               False),
    MetricSpec("container_memory_working_set_bytes", "Current working set in bytes.", False),
    MetricSpec("container_memory_total_active_file_bytes",
               "Current total active file in bytes.", False),
    MetricSpec("container_memory_total_inactive_file_bytes",
               "Current total inactive file in bytes.", False),
    MetricSpec("container_memory_failures_total",
               "Cumulative count of memory allocation failures.", True,
               ("failure_type", "scope")),
    MetricSpec("container_spec_memory_limit_bytes", "Memory limit for the container.", False),
    MetricSpec("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.",
               False),
    MetricSpec("container_spec_memory_reservation_limit_bytes",
               "Memory reservation limit for the container.", False),
    MetricSpec("container_oom_events_total",
               "Count of out of memory events observed for the container", True),
    # processes
    MetricSpec("container_processes", "Number of processes running inside the container.",
               False),
    MetricSpec("container_file_descriptors",
               "Number of open file descriptors for the container.", False),
    MetricSpec("container_sockets", "Number of open sockets for the container.", False),
    MetricSpec("container_threads_max",
               "Maximum number of threads allowed inside the container, infinity if value is "
               "zero", False),
    MetricSpec("container_threads", "Number of threads running inside the container", False),
    MetricSpec("container_ulimits_soft",
               "Soft ulimit values for the container root process. Unlimited if -1, except "
               "priority and nice", False, ("ulimit",)),
    # disk usage and block I/O
    MetricSpec("container_fs_usage_bytes",
               "Number of bytes that are consumed by the container on this filesystem.", False,
               DEVICE),
    # Not cAdvisor's (it has no per-container inode count): the inodes of the writable layer.
    MetricSpec("container_fs_inodes_usage",
               "Number of inodes used by the container on this filesystem.", False, DEVICE),
    MetricSpec("container_fs_reads_bytes_total", "Cumulative count of bytes read", True, DEVICE),
    MetricSpec("container_fs_reads_total", "Cumulative count of reads completed", True, DEVICE),
    MetricSpec("container_fs_writes_bytes_total", "Cumulative count of bytes written", True,
               DEVICE),
    MetricSpec("container_fs_writes_total", "Cumulative count of writes completed", True,
               DEVICE),
    MetricSpec("container_blkio_device_usage_total", "Blkio Device bytes usage", True,
               ("device", "major", "minor", "operation")),
    # pressure stall information (cgroup v2)
    MetricSpec("container_pressure_cpu_stalled_seconds_total",
               "Total time duration no tasks in the container could make progress due to CPU "
               "congestion.", True),
    MetricSpec("container_pressure_cpu_waiting_seconds_total",
               "Total time duration tasks in the container have waited due to CPU congestion.",
               True),
    MetricSpec("container_pressure_memory_stalled_seconds_total",
               "Total time duration no tasks in the container could make progress due to "
               "memory congestion.", True),
    MetricSpec("container_pressure_memory_waiting_seconds_total",
               "Total time duration tasks in the container have waited due to memory "
               "congestion.", True),
    MetricSpec("container_pressure_io_stalled_seconds_total",
               "Total time duration no tasks in the container could make progress due to IO "
               "congestion.", True),
    MetricSpec("container_pressure_io_waiting_seconds_total",
               "Total time duration tasks in the container have waited due to IO congestion.",
               True),
    # network (the pod's)
    MetricSpec("container_network_receive_bytes_total", "Cumulative count of bytes received",
               True, INTERFACE),
    MetricSpec("container_network_receive_packets_total", "Cumulative count of packets received",
               True, INTERFACE),
    MetricSpec("container_network_receive_packets_dropped_total",
               "Cumulative count of packets dropped while receiving", True, INTERFACE),
    MetricSpec("container_network_receive_errors_total",
               "Cumulative count of errors encountered while receiving", True, INTERFACE),
    MetricSpec("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted",
               True, INTERFACE),
    MetricSpec("container_network_transmit_packets_total",
               "Cumulative count of packets transmitted", True, INTERFACE),
    MetricSpec("container_network_transmit_packets_dropped_total",
               "Cumulative count of packets dropped while transmitting", True, INTERFACE),
    MetricSpec("container_network_transmit_errors_total",
               "Cumulative count of errors encountered while transmitting", True, INTERFACE),
)
_COUNTERS = frozenset(m.name for m in METRICS if m.counter)


def descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=m.name, help=m.help, label_keys=[*BASE_LABELS, *m.extra])
            for m in METRICS]


def metric(name: str, timestamp: int, labels: BaseLabels, value: int,
           *extra: str) -> pb.Metric:  # fmt: skip
    return pb.Metric(
        name=name,
        timestamp=timestamp,
        metric_type=pb.COUNTER if name in _COUNTERS else pb.GAUGE,
        label_values=[*labels, *extra],
        value=pb.UInt64Value(value=max(0, value)),
    )


# --- from a cgroup sample --------------------------------------------------------------------


def cgroup_metrics(labels: BaseLabels, timestamp: int,
                   f: CgroupFigures | None) -> list[pb.Metric]:  # fmt: skip
    """Everything one cgroup's figures give; none for a cgroup that does not exist yet."""
    if f is None:
        return []
    return [
        metric("container_last_seen", timestamp, labels, timestamp // NS_PER_S),
        *_cpu(labels, timestamp, f),
        *_memory(labels, timestamp, f),
        *_spec(labels, timestamp, f.spec),
        *_pressure(labels, timestamp, f),
        metric("container_oom_events_total", timestamp, labels, f.oom_kills),
        metric("container_threads", timestamp, labels, f.threads),
        metric("container_threads_max", timestamp, labels, f.threads_max),
    ]


def _cpu(labels: BaseLabels, t: int, f: CgroupFigures) -> list[pb.Metric]:
    cpu = f.cpu
    metrics = [
        metric("container_cpu_usage_seconds_total", t, labels, cpu.usage_ns // NS_PER_S, "total"),
        metric("container_cpu_user_seconds_total", t, labels, cpu.user_ns // NS_PER_S),
        metric("container_cpu_system_seconds_total", t, labels, cpu.system_ns // NS_PER_S),
    ]
    if f.spec.cpu_quota is not None:  # as cAdvisor: throttling exists only under a quota
        metrics += [
            metric("container_cpu_cfs_periods_total", t, labels, cpu.periods),
            metric("container_cpu_cfs_throttled_periods_total", t, labels,
                   cpu.throttled_periods),
            metric("container_cpu_cfs_throttled_seconds_total", t, labels,
                   cpu.throttled_ns // NS_PER_S),
        ]
    return metrics


def _memory(labels: BaseLabels, t: int, f: CgroupFigures) -> list[pb.Metric]:
    m = f.memory
    metrics = [
        metric("container_memory_cache", t, labels, m.cache),
        metric("container_memory_rss", t, labels, m.rss),
        metric("container_memory_mapped_file", t, labels, m.mapped_file),
        metric("container_memory_swap", t, labels, m.swap_usage or 0),
        metric("container_memory_failcnt", t, labels, m.failcnt),
        metric("container_memory_usage_bytes", t, labels, m.usage),
        metric("container_memory_max_usage_bytes", t, labels, m.max_usage),
        metric("container_memory_working_set_bytes", t, labels, m.working_set),
        metric("container_memory_total_active_file_bytes", t, labels, m.active_file),
        metric("container_memory_total_inactive_file_bytes", t, labels, m.inactive_file),
    ]
    if m.kernel is not None:
        metrics.append(metric("container_memory_kernel_usage", t, labels, m.kernel))
    # cgroups count faults hierarchically only: both of cAdvisor's scopes get the same figure.
    for scope in ("container", "hierarchy"):
        metrics += [
            metric("container_memory_failures_total", t, labels, m.page_faults, "pgfault", scope),
            metric("container_memory_failures_total", t, labels, m.major_page_faults,
                   "pgmajfault", scope),
        ]
    return metrics


def _spec(labels: BaseLabels, t: int, spec: cgroup_stats.CgroupSpec) -> list[pb.Metric]:
    metrics = [
        metric("container_spec_cpu_period", t, labels, spec.cpu_period),
        metric("container_spec_cpu_shares", t, labels, spec.cpu_shares),
        metric("container_spec_memory_limit_bytes", t, labels, spec.memory_limit),
        metric("container_spec_memory_swap_limit_bytes", t, labels, spec.memory_swap_limit),
        metric("container_spec_memory_reservation_limit_bytes", t, labels,
               spec.memory_reservation),
    ]
    if spec.cpu_quota is not None:
        metrics.append(metric("container_spec_cpu_quota", t, labels, spec.cpu_quota))
    return metrics


def _pressure(labels: BaseLabels, t: int, f: CgroupFigures) -> list[pb.Metric]:
    """Stalled is PSI's `full` line, waiting its `some` line, in whole seconds."""
    metrics = []
    for kind, pressure in (("cpu", f.cpu_pressure), ("memory", f.memory_pressure),
                           ("io", f.io_pressure)):
        if pressure is None:
            continue
        for state, data in (("stalled", pressure.full), ("waiting", pressure.some)):
            if data is not None:
                metrics.append(metric(f"container_pressure_{kind}_{state}_seconds_total", t,
                                      labels, data.total_us // US_PER_S))
    return metrics


def process_metrics(labels: BaseLabels, timestamp: int, processes: int,
                    procs: cgroup_stats.ProcessFigures | None) -> list[pb.Metric]:  # fmt: skip
    metrics = [metric("container_processes", timestamp, labels, processes)]
    if procs is None:
        return metrics
    metrics += [
        metric("container_file_descriptors", timestamp, labels, procs.fds),
        metric("container_sockets", timestamp, labels, procs.sockets),
    ]
    if procs.open_files_soft_limit is not None:  # unlimited (-1) has no unsigned value
        metrics.append(metric("container_ulimits_soft", timestamp, labels,
                              procs.open_files_soft_limit, "max_open_files"))
    return metrics


def io_metrics(labels: BaseLabels, timestamp: int, devices: Sequence[DeviceIo],
               layer_disk: BlockDevice | None = None) -> list[pb.Metric]:  # fmt: skip
    """Block I/O per device. The kernel lists only devices the cgroup did I/O on: the disk
    holding the writable layer gets its zeros even so, so a container that has not touched
    the disk yet still has its rows (as it has on a containerd node, from the rootfs)."""
    devices = list(devices)
    if layer_disk is not None and not any(
        (d.device.major, d.device.minor) == (layer_disk.major, layer_disk.minor) for d in devices
    ):
        zeros = {"Read": 0, "Write": 0}
        devices.append(DeviceIo(layer_disk, zeros, zeros))
    metrics = []
    for d in devices:
        for name, table, op in (("container_fs_reads_bytes_total", d.bytes, "Read"),
                                ("container_fs_writes_bytes_total", d.bytes, "Write"),
                                ("container_fs_reads_total", d.ios, "Read"),
                                ("container_fs_writes_total", d.ios, "Write")):
            metrics.append(metric(name, timestamp, labels, table.get(op, 0), d.device.name))
        for op, value in sorted(d.bytes.items()):
            metrics.append(metric("container_blkio_device_usage_total", timestamp, labels, value,
                                  d.device.name, str(d.device.major), str(d.device.minor), op))
    return metrics


def network_metrics(labels: BaseLabels, timestamp: int,
                    interfaces: Mapping[str, InterfaceCounters]) -> list[pb.Metric]:  # fmt: skip
    metrics = []
    for name, c in sorted(interfaces.items()):
        if name == "lo":
            continue
        for metric_name, value in (
            ("container_network_receive_bytes_total", c.rx_bytes),
            ("container_network_receive_packets_total", c.rx_packets),
            ("container_network_receive_packets_dropped_total", c.rx_dropped),
            ("container_network_receive_errors_total", c.rx_errors),
            ("container_network_transmit_bytes_total", c.tx_bytes),
            ("container_network_transmit_packets_total", c.tx_packets),
            ("container_network_transmit_packets_dropped_total", c.tx_dropped),
            ("container_network_transmit_errors_total", c.tx_errors),
        ):
            metrics.append(metric(metric_name, timestamp, labels, value, name))
    return metrics
