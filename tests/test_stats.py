"""Container and pod stats through the CRI, against real cgroups, overlay layers and netns:
cpu rates, working sets, writable layers, network counters, cAdvisor-style metrics, OOM."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.pods import (
    a_pod,
    container_config,
    container_status,
    exec_sync,
    start_container,
    wait_for,
)
from tests.support.plugin import TestImages

MiB = 1024 * 1024
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
SLEEP = ["sleep", "1000"]




def ctr_stats(fp: CriClient, ctr_id: str) -> pb.ContainerStats:
    stats: pb.ContainerStats = fp.ContainerStats(
        pb.ContainerStatsRequest(container_id=ctr_id)
    ).stats
    return stats


def pod_stats(fp: CriClient, pod_id: str) -> pb.PodSandboxStats:
    stats: pb.PodSandboxStats = fp.PodSandboxStats(
        pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)
    ).stats
    return stats


def listed_ids(fp: CriClient, **fields: Any) -> list[str]:
    response = fp.ListContainerStats(
        pb.ListContainerStatsRequest(filter=pb.ContainerStatsFilter(**fields))
    )
    return [s.attributes.id for s in response.stats]


def pod_cgroup(fp: CriClient, pod_id: str) -> str:
    response = fp.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    cgroup: str = json.loads(response.info["info"])["cgroup"]
    return cgroup


def test_cpu_usage_and_rate_of_a_busy_container(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        burn = container_config(pulled.busybox.reference, labels={"role": "burn"},
                                annotations={"a": "b"},
                                command=["sh", "-c", "while :; do :; done"])
        ctr_id = start_container(fp, pod_id, pod, burn)
        first = ctr_stats(fp, ctr_id)
        time.sleep(1.5)  # longer than the sample cache's second
        second = ctr_stats(fp, ctr_id)

        assert second.attributes.id == ctr_id
        assert second.attributes.metadata == burn.metadata
        assert dict(second.attributes.labels) == {"role": "burn"}
        assert dict(second.attributes.annotations) == {"a": "b"}
        assert second.cpu.timestamp > first.cpu.timestamp > 0
        grew = second.cpu.usage_core_nano_seconds.value - first.cpu.usage_core_nano_seconds.value
        assert grew > 0.1 * 1.5e9
        # A core shared with the rest of the machine: a burner gets well over a tenth of one.
        assert second.cpu.HasField("usage_nano_cores")
        assert 0.1e9 < second.cpu.usage_nano_cores.value <= os.cpu_count() * 1.05e9  # type: ignore[operator]
        # Within the cache's lifetime the same sample comes back.
        assert ctr_stats(fp, ctr_id).cpu.timestamp == second.cpu.timestamp


def test_working_set_and_writable_layer(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        script = ("dd if=/dev/zero of=/dev/shm/big bs=1M count=50 && "
                  "dd if=/dev/zero of=/tmp/layer bs=1M count=20 && touch /done && sleep 1000")
        ctr_id = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", script]))
        wait_for(lambda: exec_sync(fp, ctr_id, "test", "-e", "/done").exit_code == 0,
                 what="the writes")

        def filled() -> pb.ContainerStats | None:
            s = ctr_stats(fp, ctr_id)
            return s if s.writable_layer.used_bytes.value >= 20 * MiB else None

        stats: pb.ContainerStats = wait_for(filled, what="the writable layer to show 20 MiB")
        memory = stats.memory
        assert memory.timestamp > 0
        # /dev/shm is tmpfs: charged to the writer and never inactive file cache.
        assert memory.working_set_bytes.value >= 50 * MiB
        assert memory.usage_bytes.value >= memory.working_set_bytes.value
        assert not memory.HasField("available_bytes")  # no limit
        assert stats.swap.timestamp > 0
        layer = stats.writable_layer
        assert layer.timestamp > 0 and layer.inodes_used.value >= 3
        assert layer.fs_id.mountpoint.endswith("/containers")


def test_memory_limit_gives_available_bytes(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        limited = container_config(
            pulled.busybox.reference, command=SLEEP,
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(memory_limit_in_bytes=64 * MiB)),
        )
        ctr_id = start_container(fp, pod_id, pod, limited)
        memory = ctr_stats(fp, ctr_id).memory
        assert memory.available_bytes.value == 64 * MiB - memory.working_set_bytes.value
        assert 0 < memory.working_set_bytes.value < 64 * MiB


def test_created_container_has_zero_stats_with_timestamps(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr_id = fp.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=pod,
            config=container_config(pulled.busybox.reference, command=SLEEP),
        )).container_id
        stats = ctr_stats(fp, ctr_id[:12])  # ids may be prefixes, as crictl users type them
        assert stats.attributes.id == ctr_id
        assert stats.cpu.timestamp > 0 and stats.memory.timestamp > 0
        assert stats.writable_layer.timestamp > 0
        assert listed_ids(fp, id=ctr_id) == [ctr_id]


def test_list_filters(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_a, config_a), a_pod(fp, tmp_path) as (pod_b, config_b):
        a1 = start_container(fp, pod_a, config_a, container_config(
            pulled.busybox.reference, command=SLEEP, labels={"app": "x"}))
        a2 = start_container(fp, pod_a, config_a, container_config(
            pulled.busybox.reference, command=SLEEP, labels={"app": "y"}))
        b1 = start_container(fp, pod_b, config_b, container_config(
            pulled.busybox.reference, command=SLEEP, labels={"app": "x"}))
        assert {a1, a2, b1} <= set(listed_ids(fp))
        assert sorted(listed_ids(fp, pod_sandbox_id=pod_a[:10])) == sorted([a1, a2])
        assert listed_ids(fp, pod_sandbox_id=pod_a, label_selector={"app": "x"}) == [a1]
        assert listed_ids(fp, id=b1[:16]) == [b1]
        assert listed_ids(fp, label_selector={"app": "nope"}) == []


def test_pod_stats_network_processes_and_containers(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pod(fp, tmp_path) as (web_id, web), a_pod(fp, tmp_path) as (client_id, client):
        web_ctr = start_container(fp, web_id, web, container_config(pulled.web.reference))
        client_ctr = start_container(fp, client_id, client, container_config(
            pulled.busybox.reference, command=SLEEP))
        web_ip = fp.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=web_id)).status.network.ip
        before = pod_stats(fp, web_id)
        assert before.attributes.id == web_id
        assert before.attributes.metadata == web.metadata
        net = before.linux.network
        assert net.timestamp > 0 and net.default_interface.name == "eth0"
        assert "lo" not in [i.name for i in net.interfaces]
        assert before.linux.process.process_count.value >= 2  # the pause and httpd
        assert [c.attributes.id for c in before.linux.containers] == [web_ctr]
        assert before.linux.cpu.timestamp > 0 and before.linux.memory.working_set_bytes.value > 0

        for _ in range(20):
            exec_sync(fp, client_ctr, "wget", "-qO/dev/null", f"http://{web_ip}/")
        time.sleep(1.1)  # past the sample cache
        after = pod_stats(fp, web_id).linux.network.default_interface
        assert after.rx_bytes.value > net.default_interface.rx_bytes.value + 1000
        assert after.tx_bytes.value > net.default_interface.tx_bytes.value + 1000

        listed = fp.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(id=client_id[:12]))).stats
        assert [s.attributes.id for s in listed] == [client_id]
        assert [c.attributes.id for c in listed[0].linux.containers] == [client_ctr]


def test_metric_descriptors_and_pod_metrics(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    descriptors = fp.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors
    keys = {d.name: list(d.label_keys) for d in descriptors}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_memory_usage_bytes", "container_network_receive_bytes_total"):
        assert name in keys
    # kubelet appends namespace, pod and container to these keys itself.
    assert keys["container_memory_working_set_bytes"] == ["id", "name", "image"]
    assert keys["container_network_receive_bytes_total"][-1] == "interface"

    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr_id = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=SLEEP))
        all_pods = fp.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
        mine = next(p for p in all_pods if p.pod_sandbox_id == pod_id)
        names = {m.name for m in mine.metrics}
        assert "container_network_transmit_bytes_total" in names
        assert [c.container_id for c in mine.container_metrics] == [ctr_id]
        for metric in [*mine.metrics, *mine.container_metrics[0].metrics]:
            assert len(metric.label_values) == len(keys[metric.name]), metric.name
            assert metric.timestamp > 0
        by_name = {m.name: m for m in mine.container_metrics[0].metrics}
        assert by_name["container_memory_working_set_bytes"].value.value > 0
        assert by_name["container_memory_working_set_bytes"].metric_type == pb.GAUGE
        assert by_name["container_cpu_usage_seconds_total"].metric_type == pb.COUNTER
        assert by_name["container_processes"].value.value == 1


def test_oom_kill_is_reported(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        # busybox tail keeps a line in memory: /dev/zero has no newline, so it grows forever.
        hog = container_config(pulled.busybox.reference, command=["tail", "/dev/zero"],
                               linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                                   memory_limit_in_bytes=16 * MiB,
                                   memory_swap_limit_in_bytes=16 * MiB)))
        ctr_id = start_container(fp, pod_id, pod, hog)

        def exited() -> pb.ContainerStatus | None:
            status = container_status(fp, ctr_id)
            return status if status.state == pb.CONTAINER_EXITED else None

        status: pb.ContainerStatus = wait_for(exited, 30, "the hog to be killed")
        assert status.reason == "OOMKilled", (status.reason, status.exit_code)
        assert status.exit_code == 137


def test_update_pod_sandbox_resources(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, _):
        fp.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod_id,
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=200 * MiB,
                                                 cpu_shares=512),
            overhead=pb.LinuxContainerResources(memory_limit_in_bytes=56 * MiB, cpu_shares=2),
        ))
        memory_dir = MEMORY_CGROUP / pod_cgroup(fp, pod_id).strip("/")
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 256 * MiB
        time.sleep(1.1)  # past a sample taken before the update
        limit = pod_stats(fp, pod_id).linux.memory
        assert limit.available_bytes.value == 256 * MiB - limit.working_set_bytes.value
        # ...and it is recorded with the pod: its status shows what is applied.
        info = json.loads(fp.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod_id, verbose=True)).info["info"])
        assert info["config"]["linux"]["resources"]["memoryLimitInBytes"] == str(200 * MiB)
        assert info["config"]["linux"]["overhead"]["cpuShares"] == "2"


@pytest.mark.slow
def test_list_container_stats_is_fast_with_many_containers(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    count = int(os.environ.get("FLATPOD_STATS_CONTAINERS", "30"))
    with a_pod(fp, tmp_path) as (pod_id, pod):
        for _ in range(count):
            start_container(fp, pod_id, pod, container_config(
                pulled.busybox.reference, command=SLEEP))
        timings = []
        for _ in range(3):
            time.sleep(1.1)  # past the cache: every call reads every cgroup and layer
            began = time.monotonic()
            stats = fp.ListContainerStats(pb.ListContainerStatsRequest(
                filter=pb.ContainerStatsFilter(pod_sandbox_id=pod_id))).stats
            timings.append(time.monotonic() - began)
            assert len(stats) == count
        print(f"ListContainerStats, {count} containers: {[round(t, 3) for t in timings]} s")
        assert min(timings) < 0.5
