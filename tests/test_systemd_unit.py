"""hack/flatpod.service under a real systemd: start, `systemctl restart` and `systemctl stop`
leave every pod running with the same pids, a crash (kill -9 of the main pid) is restarted.

The systemd tests need systemd as PID 1 and skip elsewhere; `hack/vm-test.sh` runs them in a VM.
The unit is installed under a name of its own (never over a node's flatpod.service), as a
runtime unit in /run/systemd/system, with ExecStart pointed at this tree and a test config.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient
from tests.daemon import (
    REPO,
    START_TIMEOUT,
    kill_stray_zygote,
    remove_bridge,
    remove_cgroup_parent,
    write_config,
)
from tests.daemon import test_network as a_test_network  # (not collected as a test)
from tests.pods import container_config, pid_alive, pod_config, remove_all_pods, run_pod
from tests.pods import start_container as start_ctr
from tests.support.plugin import TestImages

UNIT_FILE = REPO / "hack" / "flatpod.service"
RUNTIME_UNIT_DIR = Path("/run/systemd/system")
SLEEP = ["sleep", "100000"]


def pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


needs_systemd = pytest.mark.skipif(
    os.geteuid() != 0 or pid1() != "systemd" or shutil.which("systemctl") is None,
    reason=f"needs root and systemd as PID 1 (PID 1 here: {pid1()}); "
           "hack/vm-test.sh runs these in a systemd VM",
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of a key in order (sections ignored)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_keeps_pods_and_restarts() -> None:
    """What the systemd tests below prove at run time, checked in the file on every host."""
    settings = unit_settings(UNIT_FILE.read_text())
    assert settings["KillMode"] == ["process"]  # stop/restart kill only flatpod, not shims
    assert settings["Restart"] == ["always"]
    assert settings["Delegate"] == ["yes"]  # cgroupfs mode creates cgroups below the unit's
    setup = (REPO / "hack" / "setup.sh").read_text()
    assert "venv=${FLATPOD_VENV:-/opt/flatpod/venv}" in setup
    assert settings["ExecStart"] == ["/opt/flatpod/venv/bin/flatpod serve"]


# --- under systemd ---------------------------------------------------------------------------


@dataclass
class Unit:
    name: str
    state: Path
    client: CriClient

    def systemctl(self, *args: str) -> str:
        done = subprocess.run(["systemctl", *args, self.name], capture_output=True, text=True,
                              timeout=START_TIMEOUT)
        assert done.returncode == 0, f"systemctl {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    def show(self, prop: str) -> str:
        return self.systemctl("show", "--value", "-p", prop)

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def answers(self) -> bool:
        try:
            self.client.Version(pb.VersionRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def wait_serving(self, not_pid: int = 0, timeout: float = START_TIMEOUT) -> int:
        """Waits for the unit to be active with a main pid other than `not_pid` that answers
        on the socket; returns that pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.main_pid()
            if pid not in (0, not_pid) and self.show("ActiveState") == "active" and self.answers():
                return pid
            time.sleep(0.5)
        journal = subprocess.run(["journalctl", "--no-pager", "-n", "50", "-u", self.name],
                                 capture_output=True, text=True).stdout
        raise AssertionError(f"{self.name} did not serve within {timeout}s:\n{journal}")


def installed_unit_text(config: Path) -> str:
    """The shipped unit, with ExecStart running this tree with the test's config."""
    lines = []
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={sys.executable} -m sandbox serve --config {config}"
            lines += [line, f"Environment=PYTHONPATH={REPO}", f"WorkingDirectory={REPO}"]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


@contextmanager
def installed_unit(base: Path, extra_config: str = "") -> Iterator[Unit]:
    """The unit installed and started with its files in `base`; at the end every pod is
    removed, the unit stopped and uninstalled, and nothing of it is left running."""
    state = Path(tempfile.mkdtemp(prefix="fpt-", dir="/run"))
    bridge, subnet = a_test_network()
    config = base / "config.toml"
    write_config(config, base / "root", state, extra_config, network=(bridge, subnet))
    name = f"flatpod-test-{secrets.token_hex(3)}.service"
    unit_path = RUNTIME_UNIT_DIR / name
    RUNTIME_UNIT_DIR.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(installed_unit_text(config))
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    unit = Unit(name, state, CriClient(state / "flatpod.sock", timeout=START_TIMEOUT))
    try:
        unit.systemctl("start")
        # The first start also starts the shim zygote; under an emulated CPU that can outlast
        # flatpod's 10 s wait for it, flatpod exits 1 and Restart=always tries again.
        unit.wait_serving(timeout=3 * START_TIMEOUT)
        yield unit
    finally:
        try:
            if unit.answers():
                remove_all_pods(unit.client)
        finally:
            unit.client.close()
            subprocess.run(["systemctl", "stop", name], timeout=START_TIMEOUT)
            kill_stray_zygote(state)
            unit_path.unlink()
            subprocess.run(["systemctl", "daemon-reload"], check=True)
            subprocess.run(["systemctl", "reset-failed", name], capture_output=True)
            shutil.rmtree(state, ignore_errors=True)
            remove_bridge(bridge, subnet)
            remove_cgroup_parent(f"/{state.name}")


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unit]:
    with installed_unit(tmp_path_factory.mktemp("unit")) as installed:
        yield installed


@dataclass
class RunningPod:
    pod_id: str
    ctr_id: str
    pids: tuple[int, ...]  # pause, container


def pid_of(client: CriClient, *, ctr_id: str = "", pod_id: str = "") -> int:
    if ctr_id:
        info = client.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id,
                                                                verbose=True)).info["info"]
    else:
        info = client.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                                  verbose=True)).info["info"]
    pid = int(json.loads(info)["pid"])
    assert pid > 0
    return pid


@pytest.fixture(scope="module")
def pod(unit: Unit, test_images: TestImages,
        tmp_path_factory: pytest.TempPathFactory) -> RunningPod:
    image = test_images.busybox.reference
    unit.client.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    config = pod_config(log_dir=tmp_path_factory.mktemp("logs"))
    pod_id = run_pod(unit.client, config)
    ctr_id = start_ctr(unit.client, pod_id, config, container_config(image, command=SLEEP))
    pids = (pid_of(unit.client, pod_id=pod_id), pid_of(unit.client, ctr_id=ctr_id))
    return RunningPod(pod_id, ctr_id, pids)


def assert_still_running(unit: Unit, pod: RunningPod) -> None:
    assert all(pid_alive(p) for p in pod.pids), pod.pids
    status = unit.client.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod.pod_id))
    assert status.status.state == pb.SANDBOX_READY
    ctr = unit.client.ContainerStatus(pb.ContainerStatusRequest(container_id=pod.ctr_id))
    assert ctr.status.state == pb.CONTAINER_RUNNING
    now = (pid_of(unit.client, pod_id=pod.pod_id), pid_of(unit.client, ctr_id=pod.ctr_id))
    assert now == pod.pids


@needs_systemd
def test_unit_file_verifies() -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT_FILE)],
                          capture_output=True, text=True)
    # verify complains about an ExecStart binary that is not installed; nothing else may fail.
    problems = [line for line in done.stderr.splitlines()
                if line and "is not executable" not in line and "No such file" not in line]
    assert problems == [], done.stderr


@needs_systemd
def test_start_serves_and_runs_a_pod(unit: Unit, pod: RunningPod) -> None:
    assert unit.show("ActiveState") == "active"
    assert unit.show("KillMode") == "process" and unit.show("Delegate") == "yes"
    assert_still_running(unit, pod)


@needs_systemd
def test_restart_keeps_pods(unit: Unit, pod: RunningPod) -> None:
    before = unit.main_pid()
    unit.systemctl("restart")
    assert unit.wait_serving(not_pid=before) != before
    assert not pid_alive(before)
    assert_still_running(unit, pod)


@needs_systemd
def test_stop_leaves_pods_running(unit: Unit, pod: RunningPod) -> None:
    before = unit.main_pid()
    unit.systemctl("stop")
    assert unit.show("ActiveState") in ("inactive", "failed")
    assert not pid_alive(before)
    assert all(pid_alive(p) for p in pod.pids), pod.pids
    unit.systemctl("start")
    unit.wait_serving(not_pid=before)
    assert_still_running(unit, pod)


@needs_systemd
def test_crash_is_restarted(unit: Unit, pod: RunningPod) -> None:
    before, restarts = unit.main_pid(), int(unit.show("NRestarts"))
    os.kill(before, 9)
    after = unit.wait_serving(not_pid=before)
    assert int(unit.show("NRestarts")) == restarts + 1  # systemd's restart, not ours
    assert after != before
    assert_still_running(unit, pod)


@needs_systemd
def test_pods_removed_leave_nothing(unit: Unit, pod: RunningPod) -> None:
    remove_all_pods(unit.client)
    assert not unit.client.ListPodSandbox(pb.ListPodSandboxRequest()).items
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pod.pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in pod.pids), pod.pids
