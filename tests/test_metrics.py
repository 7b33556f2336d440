"""The opt-in Prometheus endpoint: RPC latency histograms, pods and containers by state, shims."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.metrics import split_address
from tests.daemon import running_daemon
from tests.pods import pod_config, remove_all_pods, run_pod
from tests.support.plugin import TestImages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
