"""The CNI path through the daemon: a conflist in the CNI dir replaces the built-in bridge."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

from cri_api import api_pb2 as pb
from tests.daemon import running_daemon
from tests.pods import (
    cleaned_up,
    container_config,
    http_get,
    pod_config,
    remove_all_pods,
    run_pod,
    start_container,
    wait_for,
)
from tests.support.plugin import TestImages


def _conflist(bridge: str, subnet: str, data_dir: Path) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": f"{bridge}-net",
        "plugins": [
            {
                "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def test_pod_on_cni_network_with_host_port(tmp_path: Path, test_images: TestImages) -> None:
    bridge = f"fpc{secrets.token_hex(3)}"
    subnet = "10.246.7.0/24"
    conf_dir, data_dir = tmp_path / "net.d", tmp_path / "ipam"
    conf_dir.mkdir()
    (tmp_path / "d").mkdir()
    (conf_dir / "10-test.conflist").write_text(json.dumps(_conflist(bridge, subnet, data_dir)))
    extra = f'[network]\ncni_conf_dir = "{conf_dir}"\n'
    try:
        with running_daemon(tmp_path / "d", extra) as daemon:
            cri = daemon.client()
            try:
                web = test_images.web.reference
                cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=web)))
                config = pod_config(log_dir=tmp_path / "logs", port_mappings=[
                    pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=18181)])
                pod_id = run_pod(cri, config)
                status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
                pod_ip = status.status.network.ip
                assert pod_ip.startswith("10.246.7."), pod_ip
                start_container(cri, pod_id, config, container_config(web))

                def fetch(url: str) -> bytes:
                    result = subprocess.run(http_get(url), capture_output=True, timeout=10)
                    return result.stdout

                assert wait_for(lambda: fetch(f"http://{pod_ip}/")) == b"flatpod web\n"
                host_ip = subprocess.run(
                    ["ip", "-4", "-o", "addr", "show", bridge], capture_output=True, text=True
                ).stdout.split()[3].split("/")[0]
                assert wait_for(lambda: fetch(f"http://{host_ip}:18181/")) == b"flatpod web\n"
                assert any(data_dir.rglob(pod_ip)), "host-local holds the pod's lease"

                cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
                cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
                cleaned_up(pod_id)
                assert not any(data_dir.rglob(pod_ip)), "the lease is released"
                rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True,
                                       text=True).stdout
                assert pod_id not in rules and "18181" not in rules
                ports = subprocess.run(["ip", "-o", "link", "show", "master", bridge],
                                       capture_output=True, text=True).stdout
                assert ports.strip() == "", f"veths left on {bridge}: {ports}"
            finally:
                remove_all_pods(cri)
                cri.close()
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
