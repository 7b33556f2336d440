"""The opt-in Prometheus endpoint (RPC latency histograms, pods and containers by state, shims),
and the cAdvisor-named CRI metrics kubelet serves at /metrics/cadvisor."""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from netns.enter import InterfaceCounters
from sandbox import cgroup_stats, metrics_cri
from sandbox.metrics import split_address
from tests.daemon import running_daemon
from tests.pods import pod_config, remove_all_pods, run_pod
from tests.support.plugin import TestImages
from tests.support.registry import free_port


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


def test_metrics_endpoint_serves_histograms_and_counts(
    tmp_path: Path, test_images: TestImages
) -> None:
    port = free_port()
    with running_daemon(tmp_path, f'metrics_address = "127.0.0.1:{port}"') as daemon:
        cri = daemon.client()
        try:
            for _ in range(3):
                cri.Version(pb.VersionRequest())
            pod_id = run_pod(cri, pod_config(log_dir=tmp_path))
            image = test_images.busybox
            cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image.reference)))
            text = scrape(f"http://127.0.0.1:{port}/metrics")
            version = 'method="/runtime.v1.RuntimeService/Version"'
            count = next(line for line in text.splitlines()
                         if line.startswith("flatpod_rpc_duration_seconds_count")
                         and version in line and 'code="OK"' in line)
            assert float(count.split()[-1]) >= 3
            assert "flatpod_rpc_duration_seconds_bucket{" in text
            assert 'flatpod_pod_sandboxes{state="ready"} 1.0' in text
            assert "flatpod_shims 1.0" in text
            assert "flatpod_containers" in text
            pulled = next(line for line in text.splitlines()
                          if line.startswith("flatpod_image_pulled_bytes_total "))
            assert float(pulled.split()[-1]) >= 1_000_000  # busybox's layer alone is ~1 MB
            with pytest.raises(urllib.error.HTTPError) as err:
                scrape(f"http://127.0.0.1:{port}/other")
            assert err.value.code == 404
            assert pod_id
        finally:
            remove_all_pods(cri)
            cri.close()


def test_split_address() -> None:
    assert split_address("127.0.0.1:9110") == ("127.0.0.1", 9110)
    assert split_address("[::1]:9110") == ("::1", 9110)
    with pytest.raises(ValueError):
        split_address("localhost")


# --- the CRI metrics (ListMetricDescriptors / ListPodSandboxMetrics): no daemon needed --------

# cAdvisor's container metrics as Kubernetes 1.36 vendors them
# (vendor/github.com/google/cadvisor/metrics/prometheus.go): name -> (counter, extra label
# keys). kubelet serves flatpod's under these names at /metrics/cadvisor when
# PodAndContainerStatsFromCRI is on, so a name, a type or a label key that drifts breaks
# dashboards and the node e2e ContainerMetrics spec without any error on flatpod's side.
C, G = True, False
CADVISOR: dict[str, tuple[bool, tuple[str, ...]]] = {
    "container_last_seen": (G, ()),
    "container_start_time_seconds": (G, ()),
    "container_cpu_user_seconds_total": (C, ()),
    "container_cpu_system_seconds_total": (C, ()),
    "container_cpu_usage_seconds_total": (C, ("cpu",)),
    "container_cpu_cfs_periods_total": (C, ()),
    "container_cpu_cfs_throttled_periods_total": (C, ()),
    "container_cpu_cfs_throttled_seconds_total": (C, ()),
    "container_spec_cpu_period": (G, ()),
    "container_spec_cpu_quota": (G, ()),
    "container_spec_cpu_shares": (G, ()),
    "container_memory_cache": (G, ()),
    "container_memory_rss": (G, ()),
    "container_memory_kernel_usage": (G, ()),
    "container_memory_mapped_file": (G, ()),
    "container_memory_swap": (G, ()),
    "container_memory_failcnt": (C, ()),
    "container_memory_usage_bytes": (G, ()),
    "container_memory_max_usage_bytes": (G, ()),
    "container_memory_working_set_bytes": (G, ()),
    "container_memory_total_active_file_bytes": (G, ()),
    "container_memory_total_inactive_file_bytes": (G, ()),
    "container_memory_failures_total": (C, ("failure_type", "scope")),
    "container_spec_memory_limit_bytes": (G, ()),
    "container_spec_memory_swap_limit_bytes": (G, ()),
    "container_spec_memory_reservation_limit_bytes": (G, ()),
    "container_oom_events_total": (C, ()),
    "container_processes": (G, ()),
    "container_file_descriptors": (G, ()),
    "container_sockets": (G, ()),
    "container_threads_max": (G, ()),
    "container_threads": (G, ()),
    "container_ulimits_soft": (G, ("ulimit",)),
    "container_fs_usage_bytes": (G, ("device",)),
    "container_fs_reads_bytes_total": (C, ("device",)),
    "container_fs_reads_total": (C, ("device",)),
    "container_fs_writes_bytes_total": (C, ("device",)),
    "container_fs_writes_total": (C, ("device",)),
    "container_blkio_device_usage_total": (C, ("device", "major", "minor", "operation")),
    "container_pressure_cpu_stalled_seconds_total": (C, ()),
    "container_pressure_cpu_waiting_seconds_total": (C, ()),
    "container_pressure_memory_stalled_seconds_total": (C, ()),
    "container_pressure_memory_waiting_seconds_total": (C, ()),
    "container_pressure_io_stalled_seconds_total": (C, ()),
    "container_pressure_io_waiting_seconds_total": (C, ()),
    **{f"container_network_{what}_total": (C, ("interface",)) for what in (
        "receive_bytes", "receive_packets", "receive_packets_dropped", "receive_errors",
        "transmit_bytes", "transmit_packets", "transmit_packets_dropped", "transmit_errors")},
}
# The labels kubelet's cAdvisor metrics carry on every row (containerPrometheusLabelsFunc).
KUBELET_CADVISOR_LABELS = ["container", "id", "image", "name", "namespace", "pod"]
# flatpod's own, with no cAdvisor counterpart: the writable layer's inodes.
OWN = {"container_fs_inodes_usage": (G, ("device",))}
# Every row name the node e2e ContainerMetrics spec (1.36) requires of a container.
E2E_REQUIRED = {
    "container_blkio_device_usage_total", "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total", "container_cpu_user_seconds_total",
    "container_file_descriptors", "container_fs_reads_bytes_total", "container_fs_reads_total",
    "container_fs_usage_bytes", "container_fs_writes_bytes_total", "container_fs_writes_total",
    "container_last_seen", "container_memory_cache", "container_memory_failcnt",
    "container_memory_failures_total", "container_memory_mapped_file",
    "container_memory_max_usage_bytes", "container_memory_rss", "container_memory_swap",
    "container_memory_usage_bytes", "container_memory_working_set_bytes",
    "container_oom_events_total", "container_processes", "container_sockets",
    "container_spec_cpu_period", "container_spec_cpu_shares",
    "container_spec_memory_limit_bytes", "container_spec_memory_reservation_limit_bytes",
    "container_spec_memory_swap_limit_bytes", "container_start_time_seconds",
    "container_threads", "container_threads_max", "container_ulimits_soft",
}


def test_descriptors_have_cadvisors_names_label_keys_and_types() -> None:
    described = {d.name: list(d.label_keys) for d in metrics_cri.descriptors()}
    assert len(described) == len(metrics_cri.METRICS)  # one descriptor per name
    expected = {**CADVISOR, **OWN}
    assert set(described) == set(expected)
    assert set(described) >= E2E_REQUIRED
    for name, (counter, extra) in expected.items():
        assert described[name] == [*KUBELET_CADVISOR_LABELS, *extra], name
        spec = next(m for m in metrics_cri.METRICS if m.name == name)
        assert spec.counter is counter, name


def figures() -> cgroup_stats.CgroupFigures:
    psi = cgroup_stats.Pressure(some=cgroup_stats.PsiData(3_400_000, 1.5, 0.8, 0.2),
                                full=cgroup_stats.PsiData(1_200_000, 0.1, 0.0, 0.0))
    return cgroup_stats.CgroupFigures(
        cpu=cgroup_stats.CpuFigures(usage_ns=2_900_000_000, user_ns=1_700_000_000,
                                    system_ns=1_200_000_000, periods=12, throttled_periods=3,
                                    throttled_ns=2_500_000_000),
        memory=cgroup_stats.MemoryFigures(usage=50 * 2**20, inactive_file=10 * 2**20,
                                          kernel=2**20, swap_usage=None, limit=80 * 2**20),
        spec=cgroup_stats.CgroupSpec(cpu_shares=2, cpu_period=100000, cpu_quota=50000,
                                     memory_limit=80 * 2**20),
        io=(cgroup_stats.DeviceIo(cgroup_stats.BlockDevice(8, 0, "/dev/sda"),
                                  {"Read": 4096, "Write": 8192, "Sync": 1},
                                  {"Read": 1, "Write": 2}),),
        cpu_pressure=psi, memory_pressure=psi, io_pressure=psi,
    )


def test_every_built_row_fits_its_descriptor_and_is_unique() -> None:
    keys = {d.name: list(d.label_keys) for d in metrics_cri.descriptors()}
    types = {m.name: pb.COUNTER if m.counter else pb.GAUGE for m in metrics_cri.METRICS}
    labels = metrics_cri.BaseLabels("web", "/kubepods/pod1/c1", "busybox", "c1", "ns", "pod1")
    t = 1_700_000_000_123_456_789
    counters = InterfaceCounters(1000, 10, 1, 2, 2000, 20, 3, 4)
    rows = [
        *metrics_cri.cgroup_metrics(labels, t, figures()),
        *metrics_cri.process_metrics(labels, t, 3, cgroup_stats.ProcessFigures(9, 2, 1048576)),
        *metrics_cri.io_metrics(labels, t, figures().io,
                                cgroup_stats.BlockDevice(8, 16, "/dev/sdb")),
        *metrics_cri.network_metrics(labels._replace(container="POD"), t,
                                     {"eth0": counters, "lo": counters}),
    ]
    seen = set()
    for row in rows:
        assert len(row.label_values) == len(keys[row.name]), row.name
        assert row.metric_type == types[row.name], row.name
        assert row.timestamp == t
        identity = (row.name, tuple(row.label_values))
        assert identity not in seen, identity  # kubelet drops a scrape's duplicate rows
        seen.add(identity)
    by_name: dict[str, list[pb.Metric]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)

    def value(name: str, *extra: str) -> int:
        [row] = [r for r in by_name[name] if list(r.label_values[6:]) == list(extra)]
        return int(row.value.value)

    # Whole seconds, as containerd and CRI-O report them (a CRI value is an integer).
    assert value("container_cpu_usage_seconds_total", "total") == 2
    assert (value("container_cpu_user_seconds_total"),
            value("container_cpu_system_seconds_total")) == (1, 1)
    assert value("container_cpu_cfs_throttled_seconds_total") == 2
    assert value("container_spec_cpu_quota") == 50000
    assert value("container_last_seen") == 1_700_000_000
    assert value("container_memory_working_set_bytes") == 40 * 2**20
    assert value("container_memory_failures_total", "pgfault", "hierarchy") == 0
    # PSI: stalled is `full`, waiting is `some`.
    assert value("container_pressure_io_stalled_seconds_total") == 1
    assert value("container_pressure_io_waiting_seconds_total") == 3
    assert value("container_ulimits_soft", "max_open_files") == 1048576
    assert value("container_blkio_device_usage_total", "/dev/sda", "8", "0", "Sync") == 1
    # The disk holding the writable layer has its rows even before any I/O on it.
    assert value("container_fs_writes_bytes_total", "/dev/sdb") == 0
    assert value("container_fs_reads_total", "/dev/sda") == 1
    assert value("container_network_receive_bytes_total", "eth0") == 1000
    assert all(r.label_values[-1] != "lo" for r in by_name["container_network_receive_bytes_total"])


def test_rows_without_a_figure_are_left_out() -> None:
    labels = metrics_cri.BaseLabels("", "/p", "", "p", "ns", "pod")
    assert metrics_cri.cgroup_metrics(labels, 1, None) == []  # no cgroup yet: no rows
    no_quota = dataclasses.replace(figures(), spec=cgroup_stats.CgroupSpec(), cpu_pressure=None,
                                   memory=cgroup_stats.MemoryFigures())
    names = {m.name for m in metrics_cri.cgroup_metrics(labels, 1, no_quota)}
    # Throttling and the quota exist only under a quota (as cAdvisor), kernel memory only
    # where the kernel reports it, PSI only where the cgroup has pressure files.
    assert not names & {"container_cpu_cfs_periods_total", "container_spec_cpu_quota",
                        "container_memory_kernel_usage",
                        "container_pressure_cpu_stalled_seconds_total"}
    assert "container_pressure_io_stalled_seconds_total" in names
    unlimited = cgroup_stats.ProcessFigures(4, 0, None)
    names = {m.name for m in metrics_cri.process_metrics(labels, 1, 1, unlimited)}
    assert "container_ulimits_soft" not in names and "container_file_descriptors" in names
