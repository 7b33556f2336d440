"""flatpod under a real kubelet (standalone, static pods), through hack/kubelet-standalone.sh.

kubelet is not something this project builds or installs: the test runs where a kubelet
binary is found ($KUBELET, `kubelet` on PATH, or /var/tmp/kubelet-build/kubelet) and says why
it is skipped elsewhere. The node shape of most clusters (systemd as PID 1, cgroup v2, kubelet
with the systemd driver, flatpod as hack/flatpod.service) is tested where systemd runs:
`KUBELET=/path/to/kubelet hack/vm-test.sh` brings the binary into the VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tarfile
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient
from tests.daemon import REPO, START_TIMEOUT, TIME_SCALE, Daemon, running_daemon
from tests.pods import remove_all_pods, wait_for
from tests.support.plugin import TestImages
from tests.test_systemd_unit import Unit, installed_unit, needs_systemd, pid_of


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
    with urllib.request.urlopen(url, timeout=5 * TIME_SCALE, context=context) as response:
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
    def __init__(self, socket: Path, manifests: Path, work: Path, driver: str = "cgroupfs"
                 ) -> None:  # fmt: skip
        self.args = [str(REPO / "hack" / "kubelet-standalone.sh"),
                     f"unix://{socket}", str(manifests), str(work)]
        self.env = dict(os.environ, KUBELET=str(KUBELET), NODE_NAME="fptnode",
                        CGROUP_DRIVER=driver, **PORTS)
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
        kubelet = Kubelet(daemon.socket, manifests, tmp_path / "kubelet")
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


# --- systemd, cgroup v2, the systemd driver ----------------------------------------------------
# One node for the tests below (under an emulated CPU its start and the pod take minutes): the
# restart test comes last, it checks that nothing of the pod changed.


@dataclass
class SystemdNode:
    unit: Unit
    kubelet: Kubelet
    manifests: Path
    checkpoints: Path  # kubelet's <root-dir>/checkpoints


@pytest.fixture(scope="module")
def systemd_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdNode]:
    """flatpod as hack/flatpod.service (its own name, see test_systemd_unit) with the systemd
    driver, and kubelet with `cgroupDriver: systemd`."""
    if not cgroups.is_unified_only():
        pytest.skip("kubelet's systemd driver is tested on pure cgroup v2 (the VM)")
    base = tmp_path_factory.mktemp("systemd-node")
    manifests, work = base / "manifests", base / "kubelet"
    manifests.mkdir()
    (base / "unit").mkdir()
    # kubelet's checkpoint API writes below its --root-dir (the script's WORK_DIR/root).
    checkpoints = work / "root" / "checkpoints"
    extra = f'cgroup_driver = "systemd"\ncheckpoint_dir = "{checkpoints}"\n'
    with installed_unit(base / "unit", extra) as unit:
        kubelet = Kubelet(unit.state / "flatpod.sock", manifests, work, driver="systemd")
        kubelet.start()
        try:
            yield SystemdNode(unit, kubelet, manifests, checkpoints)
        finally:
            for manifest in manifests.iterdir():
                manifest.unlink()
            remove_all_pods(unit.client)
            kubelet.stop()  # stops kubelet's kubepods.slice once nothing runs in it
            remove_all_pods(unit.client)


@pytest.fixture(scope="module")
def ticker(systemd_node: SystemdNode, test_images: TestImages) -> dict[str, Any]:
    """The static pod running under kubelet: its /pods entry."""
    (systemd_node.manifests / "ticker.yaml").write_text(_manifest(test_images.busybox.reference))
    # kubelet's first sync, the pull and three runc runs (wait_for stretches this in the VM).
    pod: dict[str, Any] = wait_for(_every_second(lambda: _running("ticker-fptnode")),
                                   timeout=120, what="the static pod")
    return pod


def _every_second(condition: Callable[[], Any]) -> Callable[[], Any]:
    """`condition` for wait_for, asked once a second: kubelet's answers (JSON of every pod) cost
    CPU, which an emulated one has little of. A refused or failed request counts as not yet."""

    def check() -> Any:
        try:
            result = condition()
        except OSError:
            result = None
        if not result:
            time.sleep(1)
        return result

    return check


def _pids(unit: Unit) -> dict[str, int]:
    """Every sandbox's and container's pid, by id."""
    client = unit.client
    pids = {p.id: pid_of(client, pod_id=p.id)
            for p in client.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    pids.update({c.id: pid_of(client, ctr_id=c.id)
                 for c in client.ListContainers(pb.ListContainersRequest()).containers})
    return pids


def _cgroup_of_pid(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().split("::", 1)[1]


def _has_psi(stats: dict[str, Any]) -> bool:
    """cpu, memory and io each carry PSI (`some` and `full`), as kubelet's KubeletPSI has it."""
    return all("some" in (stats.get(k) or {}).get("psi", {}) for k in ("cpu", "memory", "io"))


LOGS_PATH = "/containerLogs/default/ticker-fptnode/tick"


@needs_systemd
def test_systemd_driver_pod_in_its_slice_with_logs_and_stats(
    systemd_node: SystemdNode, ticker: dict[str, Any]
) -> None:
    assert {c["name"] for c in ticker["status"]["containerStatuses"]} == {"tick", "web"}

    # The pause and the containers are scopes in the pod's slice, which kubelet made.
    pids = _pids(systemd_node.unit)
    assert len(pids) == 3, pids
    uid = ticker["metadata"]["uid"].replace("-", "_")
    for pid in pids.values():
        path = _cgroup_of_pid(pid)
        assert path.startswith("/kubepods.slice/"), path
        assert f"-pod{uid}.slice/" in path and path.endswith(".scope"), path

    # Logs through kubelet's API, from the CRI log files flatpod's shim writes.
    logs_url = f"https://127.0.0.1:{PORTS['KUBELET_PORT']}{LOGS_PATH}"
    assert wait_for(_every_second(lambda: b"tick 2" in _get(logs_url)), timeout=60,
                    what="logs via kubelet")

    # /stats/summary: the pod's and its containers' CPU and memory, and PSI (cgroup v2).
    summary_url = f"http://127.0.0.1:{PORTS['READ_ONLY_PORT']}/stats/summary"

    def pod_stats() -> dict[str, Any] | None:
        summary = json.loads(_get(summary_url))
        stats = {p["podRef"]["name"]: p for p in summary["pods"]}.get("ticker-fptnode")
        ready = stats and len(stats.get("containers") or []) == 2 and _has_psi(stats)
        return stats if ready else None

    stats = wait_for(_every_second(pod_stats), timeout=120, what="the pod's stats with PSI")
    assert stats is not None
    assert stats["cpu"]["usageCoreNanoSeconds"] > 0 and stats["memory"]["workingSetBytes"] > 0
    for container in stats["containers"]:
        assert container["cpu"]["usageCoreNanoSeconds"] > 0, container
        assert container["memory"]["workingSetBytes"] > 0, container
        assert _has_psi(container), container


def _criu_works() -> bool:
    done = subprocess.run(["criu", "check"], capture_output=True, text=True) \
        if shutil.which("criu") else None
    return done is not None and done.returncode == 0


@needs_systemd
@pytest.mark.skipif(not _criu_works(), reason="no criu, or `criu check` refuses this kernel")
def test_checkpoint_through_kubelet_api(systemd_node: SystemdNode, ticker: dict[str, Any]
                                        ) -> None:  # fmt: skip
    """kubelet's checkpoint API (ContainerCheckpoint, on by default) calls CheckpointContainer
    with a location below its root dir; the container runs on, with the same pid."""
    unit = systemd_node.unit
    before = _pids(unit)
    url = (f"https://127.0.0.1:{PORTS['KUBELET_PORT']}/checkpoint/default/ticker-fptnode/tick"
           "?timeout=600")  # seconds; CRIU under an emulated CPU
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=660, context=context) as response:
        answer = json.loads(response.read())
    archives = [Path(p) for p in answer["items"]]
    assert len(archives) == 1 and archives[0].parent == systemd_node.checkpoints, answer
    with tarfile.open(archives[0]) as tar:
        names = set(tar.getnames())
    assert {"config.dump", "spec.dump", "checkpoint/inventory.img"} <= names, sorted(names)
    assert _pids(unit) == before
    assert _running("ticker-fptnode") is not None
    archives[0].unlink()


@needs_systemd
def test_unit_restart_keeps_the_pod_under_kubelet(
    systemd_node: SystemdNode, ticker: dict[str, Any]
) -> None:
    """`systemctl restart` of flatpod's unit: flatpod comes back, every pause and container
    runs on with the same pid, kubelet keeps the pod Running without a container restart."""
    unit = systemd_node.unit
    pids = _pids(unit)
    before = unit.main_pid()
    unit.systemctl("restart")
    unit.wait_serving(not_pid=before, timeout=3 * START_TIMEOUT)  # recovery, emulated CPU
    assert _pids(unit) == pids
    time.sleep(30)  # kubelet's PLEG relists every second, its pod workers sync every 10 s
    pod = wait_for(_every_second(lambda: _running("ticker-fptnode")), timeout=60,
                   what="the pod again")
    assert all(c["restartCount"] == 0 for c in pod["status"]["containerStatuses"])
    assert _pids(unit) == pids
    logs_url = f"https://127.0.0.1:{PORTS['KUBELET_PORT']}{LOGS_PATH}?tailLines=1"
    assert wait_for(_every_second(lambda: b"tick" in _get(logs_url)), timeout=60)
