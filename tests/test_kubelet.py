"""flatpod under a real kubelet (standalone, static pods), through hack/kubelet-standalone.sh.

kubelet is not something this project builds or installs: the test runs where a kubelet
binary is found ($KUBELET, `kubelet` on PATH, or /var/tmp/kubelet-build/kubelet) and says why
it is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient
from tests.daemon import REPO, Daemon, running_daemon
from tests.pods import remove_all_pods, wait_for
from tests.support.plugin import TestImages


def _kubelet() -> str | None:
    for candidate in (os.environ.get("KUBELET"), shutil.which("kubelet"),
                      "/var/tmp/kubelet-build/kubelet"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


KUBELET = _kubelet()
pytestmark = pytest.mark.skipif(KUBELET is None, reason="no kubelet binary on this machine")
# Ports of kubelet's own, apart from the defaults a node's kubelet may hold.
PORTS = {"KUBELET_PORT": "10350", "READ_ONLY_PORT": "10355", "HEALTHZ_PORT": "10348"}


def _get(url: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        body: bytes = response.read()
        return body


def _pods() -> dict[str, Any]:
    try:
        listed: dict[str, Any] = json.loads(
            _get(f"http://127.0.0.1:{PORTS['READ_ONLY_PORT']}/pods")
        )
    except OSError:
        return {}
    return {p["metadata"]["name"]: p for p in listed.get("items") or []}


def _running(name: str) -> Any:
    pod = _pods().get(name)
    if pod is None or pod["status"].get("phase") != "Running":
        return None
    statuses = pod["status"].get("containerStatuses") or []
    return pod if statuses and all("running" in c["state"] for c in statuses) else None


class Kubelet:
    def __init__(self, daemon: Daemon, manifests: Path, work: Path) -> None:
        self.args = [str(REPO / "hack" / "kubelet-standalone.sh"),
                     f"unix://{daemon.socket}", str(manifests), str(work)]
        self.env = dict(os.environ, KUBELET=str(KUBELET), NODE_NAME="fptnode", **PORTS)
        self.log = work.parent / "kubelet.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def node(
    tmp_path: Path, test_images: TestImages
) -> Iterator[tuple[Daemon, CriClient, Kubelet, Path]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (tmp_path / "d").mkdir()
    with running_daemon(tmp_path / "d") as daemon:
        cri = daemon.client()
        kubelet = Kubelet(daemon, manifests, tmp_path / "kubelet")
        kubelet.start()
        try:
            yield daemon, cri, kubelet, manifests
        finally:
            # Pods first, so that kubelet's own exit cleanup finds its QoS cgroups empty.
            for manifest in manifests.iterdir():
                manifest.unlink()
            remove_all_pods(cri)
            kubelet.stop()
            remove_all_pods(cri)  # anything kubelet made in the meantime
            cri.close()
            cgroups.remove("/kubepods")


def _exec_via_kubelet(
    port: str, pod: str, container: str, command: list[str]
) -> tuple[bytes, dict[str, Any]]:
    """stdout and the v5 error-channel Status of an exec through kubelet's /exec endpoint."""
    import websocket  # the kubernetes client's WebSocket library

    query = "&".join(f"command={urllib.parse.quote(c)}" for c in command)
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{port}/exec/default/{pod}/{container}?{query}&output=1&error=1",
        subprotocols=["v5.channel.k8s.io"], sslopt={"cert_reqs": ssl.CERT_NONE}, timeout=30,
    )
    out, status = b"", b""
    try:
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if data[:1] == b"\x01":
                out += data[1:]
            elif data[:1] == b"\x03":
                status += data[1:]
    except websocket.WebSocketConnectionClosedException:
        pass
    finally:
        ws.close()
    parsed: dict[str, Any] = json.loads(status)
    return out, parsed


def _manifest(image: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: ticker
          namespace: default
        spec:
          containers:
          - name: tick
            image: {image}
            command: ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]
          - name: web
            image: {image}
            command: ["httpd", "-f", "-p", "8080", "-h", "/"]
        """)


def test_static_pod_logs_stats_and_restarts(
    node: tuple[Daemon, CriClient, Kubelet, Path], test_images: TestImages
) -> None:
    daemon, cri, kubelet, manifests = node
    (manifests / "ticker.yaml").write_text(_manifest(test_images.busybox.reference))
    pod = wait_for(lambda: _running("ticker-fptnode"), timeout=120, what="the static pod")
    assert {c["name"] for c in pod["status"]["containerStatuses"]} == {"tick", "web"}

    # Logs through kubelet's API, from the CRI log files flatpod's shim writes.
    port = PORTS["KUBELET_PORT"]
    logs_url = f"https://127.0.0.1:{port}/containerLogs/default/ticker-fptnode/tick"
    assert wait_for(lambda: b"tick 2" in _get(logs_url), timeout=30, what="logs via kubelet")

    # Exec through kubelet's streaming proxy (WebSocket, v5 channels) to flatpod's server.
    out, status = _exec_via_kubelet(port, "ticker-fptnode", "tick",
                                    ["sh", "-c", "echo hello from $(hostname); exit 3"])
    assert out == b"hello from ticker-fptnode\n"
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0]["message"] == "3"

    # /stats/summary is filled from flatpod's stats.
    summary = json.loads(_get(f"http://127.0.0.1:{PORTS['READ_ONLY_PORT']}/stats/summary"))
    pods = {p["podRef"]["name"]: p for p in summary["pods"]}
    assert "ticker-fptnode" in pods
    containers = {c["name"]: c for c in pods["ticker-fptnode"]["containers"]}
    assert containers["tick"]["memory"]["workingSetBytes"] > 0

    # The pod survives a flatpod restart and a kubelet restart: same containers, no restarts.
    before = sorted(c.id for c in cri.ListContainers(pb.ListContainersRequest()).containers)
    daemon.stop()
    daemon.start()
    kubelet.stop()
    kubelet.start()
    time.sleep(15)  # kubelet's PLEG and pod workers have relisted by now
    pod = wait_for(lambda: _running("ticker-fptnode"), timeout=60, what="the pod again")
    assert all(c["restartCount"] == 0 for c in pod["status"]["containerStatuses"])
    client = daemon.client()
    after = sorted(c.id for c in client.ListContainers(pb.ListContainersRequest()).containers)
    client.close()
    assert after == before
    assert wait_for(lambda: b"tick" in _get(logs_url + "?tailLines=1"), timeout=30)
