"""Pod sandboxes through the CRI: a pause holding the namespaces, the pod network, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient, status_code
from tests.daemon import Daemon
from tests.pods import (
    cleaned_up,
    container_config,
    exec_sync,
    host_traces,
    http_get,
    pod_config,
    run_pod,
    start_container,
    wait_for,
)
from tests.support.plugin import TestImages


def _status(fp: CriClient, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
    response: pb.PodSandboxStatusResponse = fp.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
    )
    return response


def _remove(fp: CriClient, pod_id: str) -> None:
    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_run_status_list_stop_remove(fp: CriClient, shared_daemon: Daemon) -> None:
    config = pod_config(labels={"app": "x", "tier": "a"}, annotations={"note": "kept"})
    pod_id = run_pod(fp, config)
    status = _status(fp, pod_id, verbose=True)
    assert status.status.state == pb.SANDBOX_READY
    assert status.status.metadata == config.metadata
    assert dict(status.status.labels) == {"app": "x", "tier": "a"}
    assert dict(status.status.annotations) == {"note": "kept"}
    assert status.status.network.ip.startswith("10.241.")
    info = json.loads(status.info["info"])
    pause_pid = info["pid"]
    assert Path(info["netns"]).exists()
    # The pause is catatonit (once runc's init has exec'd it), in the pod's pinned netns.
    wait_for(lambda: Path(f"/proc/{pause_pid}/cmdline").read_bytes().startswith(b"/catatonit"),
             what="the pause to exec catatonit")
    assert os.stat(f"/proc/{pause_pid}/ns/net").st_ino == os.stat(info["netns"]).st_ino
    for kind, pinned in info["namespaces"].items():
        assert os.stat(f"/proc/{pause_pid}/ns/{kind}").st_ino == os.stat(pinned).st_ino

    listed = fp.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id=pod_id[:10], label_selector={"app": "x"})
    )).items
    assert [p.id for p in listed] == [pod_id]
    assert not fp.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(label_selector={"app": "y"})
    )).items

    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent
    assert _status(fp, pod_id).status.state == pb.SANDBOX_NOTREADY
    assert not Path(f"/proc/{pause_pid}").exists()
    notready = fp.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)))).items
    assert pod_id in [p.id for p in notready]
    fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    # At the answer: gone from status and lists, its netns gone and its name free; its
    # shim, cgroup and dirs are cleaned after the answer (sandbox/removals.py).
    with pytest.raises(grpc.RpcError) as err:
        _status(fp, pod_id)
    assert status_code(err.value) == grpc.StatusCode.NOT_FOUND
    assert pod_id not in {p.id for p in fp.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    assert "netns" not in host_traces(pod_id)
    again = run_pod(fp, config)
    assert again != pod_id
    _remove(fp, again)
    cleaned_up(pod_id)
    cleaned_up(again)

    def dirs_left() -> list[Path]:
        # The dirs go after the cgroup, so cleaned_up (processes, cgroups) can return first.
        state = shared_daemon.state
        return [d for gone in (pod_id, again)
                for d in (state / "pods" / gone, state / "containers" / gone) if d.exists()]

    wait_for(lambda: dirs_left() == [], what="the removed pods' state dirs to go")


def test_unknown_ids_are_idempotent_for_stop_and_remove(fp: CriClient) -> None:
    fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="nope" * 16))
    fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id="nope" * 16))
    with pytest.raises(grpc.RpcError) as err:
        _status(fp, "0" * 64)
    assert status_code(err.value) == grpc.StatusCode.NOT_FOUND


def test_same_name_twice_is_already_exists(fp: CriClient) -> None:
    config = pod_config()
    pod_id = run_pod(fp, config)
    try:
        with pytest.raises(grpc.RpcError) as err:
            run_pod(fp, config)
        assert status_code(err.value) == grpc.StatusCode.ALREADY_EXISTS
        assert pod_id in err.value.details()  # type: ignore[attr-defined]
    finally:
        _remove(fp, pod_id)


def test_retry_after_client_timeout_gets_the_one_pod(fp: CriClient) -> None:
    config = pod_config()
    with pytest.raises(grpc.RpcError) as err:
        fp.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=0.01)
    assert status_code(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    pod_id = run_pod(fp, config)  # kubelet's retry, same metadata
    try:
        same = [p for p in fp.ListPodSandbox(pb.ListPodSandboxRequest()).items
                if p.metadata.name == config.metadata.name]
        assert [p.id for p in same] == [pod_id]
        assert _status(fp, pod_id).status.state == pb.SANDBOX_READY
    finally:
        _remove(fp, pod_id)


def test_bad_requests_get_invalid_argument(fp: CriClient) -> None:
    bad = [
        pb.RunPodSandboxRequest(),
        pb.RunPodSandboxRequest(config=pod_config(), runtime_handler="kata"),
        pb.RunPodSandboxRequest(config=pod_config(log_directory="relative/logs")),
        pb.RunPodSandboxRequest(config=pod_config(hostname="x\x00y")),
        pb.RunPodSandboxRequest(config=pod_config(
            dns_config=pb.DNSConfig(servers=["1.1.1.1\nnameserver 6.6.6.6"]))),
        pb.RunPodSandboxRequest(config=pod_config(
            linux=pb.LinuxPodSandboxConfig(cgroup_parent="../../escape"))),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as err:
            fp.RunPodSandbox(request)
        assert status_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT, request
    assert fp.Version(pb.VersionRequest()).runtime_name == "flatpod"


def test_two_pods_reach_each_other_over_the_bridge(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    web_pod = pod_config(log_dir=tmp_path)
    client_pod = pod_config(log_dir=tmp_path)
    web_id, client_id = run_pod(fp, web_pod), run_pod(fp, client_pod)
    try:
        start_container(fp, web_id, web_pod, container_config(pulled.web.reference))
        client = start_container(fp, client_id, client_pod, container_config(
            pulled.busybox.reference, command=["sleep", "1000"]))
        web_ip = _status(fp, web_id).status.network.ip
        assert web_ip != _status(fp, client_id).status.network.ip

        def fetch() -> bytes:
            result = exec_sync(fp, client, "wget", "-qO-", f"http://{web_ip}/")
            return bytes(result.stdout) if result.exit_code == 0 else b""

        assert wait_for(fetch, what="web pod over the bridge") == b"flatpod web\n"
    finally:
        _remove(fp, web_id)
        _remove(fp, client_id)


def test_process_joined_to_pod_netns_reaches_its_loopback(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    config = pod_config(log_dir=tmp_path)
    pod_id = run_pod(fp, config)
    try:
        start_container(fp, pod_id, config, container_config(
            pulled.busybox.reference, command=["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/"]))
        netns = json.loads(_status(fp, pod_id, verbose=True).info["info"])["netns"]

        def fetch() -> bool:
            result = subprocess.run(
                ["nsenter", f"--net={netns}", *http_get("http://127.0.0.1:8080/")],
                capture_output=True, timeout=10,
            )
            return result.returncode == 0

        assert wait_for(fetch, what="pod loopback from a joined process")
        # ...and the host's loopback is not the pod's.
        host = subprocess.run(http_get("http://127.0.0.1:8080/"), capture_output=True, timeout=10)
        assert host.returncode != 0
    finally:
        _remove(fp, pod_id)


def test_host_port_reachable_from_another_netns(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    config = pod_config(log_dir=tmp_path, port_mappings=[
        pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=18080)])
    pod_id = run_pod(fp, config)
    client_ns = f"fpt-client-{pod_id[:8]}"
    subprocess.run(["ip", "netns", "add", client_ns], check=True)
    veth = f"fptc{pod_id[:8]}"
    try:
        start_container(fp, pod_id, config, container_config(pulled.web.reference))
        # A client host: its own netns, a veth to the host, an address on a /30.
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth1",
                        "netns", client_ns], check=True)
        subprocess.run(["ip", "addr", "add", "10.242.9.1/30", "dev", veth], check=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        for cmd in (["ip", "addr", "add", "10.242.9.2/30", "dev", "eth1"],
                    ["ip", "link", "set", "eth1", "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", "10.242.9.1"]):
            subprocess.run(["ip", "netns", "exec", client_ns, *cmd], check=True)

        def fetch() -> bytes:
            result = subprocess.run(
                ["ip", "netns", "exec", client_ns, *http_get("http://10.242.9.1:18080/")],
                capture_output=True, timeout=10)
            return result.stdout

        assert wait_for(fetch, what="hostPort from another netns") == b"flatpod web\n"
        _remove(fp, pod_id)
        rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True)
        assert pod_id not in rules.stdout
    finally:
        _remove(fp, pod_id)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", client_ns], check=True)


def _pod_config_sharing(log_dir: Path, **modes: pb.NamespaceMode) -> pb.PodSandboxConfig:
    """A pod's config with these namespace modes (network=pb.NODE, pid=pb.POD...)."""
    return pod_config(log_dir=log_dir, linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(**modes))))


def test_host_network_pod(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    config = _pod_config_sharing(tmp_path, network=pb.NODE)
    pod_id = run_pod(fp, config)
    try:
        status = _status(fp, pod_id, verbose=True)
        assert status.status.network.ip == ""
        assert json.loads(status.info["info"])["netns"] == ""
        ctr = start_container(fp, pod_id, config, container_config(
            pulled.busybox.reference, command=["sleep", "1000"]))
        out = exec_sync(fp, ctr, "readlink", "/proc/self/ns/net").stdout
        assert out.strip() == os.readlink("/proc/self/ns/net").encode()
    finally:
        _remove(fp, pod_id)


def test_pid_pod_pause_is_pid_1(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    config = _pod_config_sharing(tmp_path, pid=pb.POD)
    pod_id = run_pod(fp, config)
    try:
        ctr = start_container(fp, pod_id, config, container_config(
            pulled.busybox.reference, command=["sleep", "1000"],
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(pid=pb.POD)))))
        cmdline = exec_sync(fp, ctr, "cat", "/proc/1/cmdline").stdout
        assert cmdline.startswith(b"/catatonit")
    finally:
        _remove(fp, pod_id)


def test_dns_and_hostname_files(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    config = pod_config(log_dir=tmp_path, dns_config=pb.DNSConfig(
        servers=["10.0.0.10"], searches=["ns.svc.cluster.local"], options=["ndots:5"]))
    pod_id = run_pod(fp, config)
    try:
        ctr = start_container(fp, pod_id, config, container_config(
            pulled.busybox.reference, command=["sleep", "1000"]))
        resolv = exec_sync(fp, ctr, "cat", "/etc/resolv.conf").stdout.decode()
        assert resolv.splitlines() == [
            "nameserver 10.0.0.10", "search ns.svc.cluster.local", "options ndots:5"]
        assert exec_sync(fp, ctr, "hostname").stdout.decode().strip() == config.hostname
        assert exec_sync(fp, ctr, "sh", "-c", "mount | grep ' /dev/shm '").exit_code == 0
    finally:
        _remove(fp, pod_id)
