"""Daemon restarts (SIGTERM, kill -9), a killed shim, a killed pause, a reboot, a full disk,
and a short load run: nothing is lost and nothing is leaked."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import (
    container_config,
    container_status,
    exec_sync,
    mounts_under,
    pod_config,
    pod_state,
    process_exited,
    remove_all_pods,
    run_pod,
    start_container,
    wait_for,
    wait_for_command,
)
from tests.support.oci import big
from tests.support.plugin import TestImages, push_definition
from tests.support.registry import Registry
from tests.test_faults import assert_all_gone, shim_pids
from tests.test_streaming_support import RemoteCommand, run

TICKER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"]


@pytest.fixture
def node(tmp_path: Path, test_images: TestImages) -> Iterator[tuple[Daemon, CriClient]]:
    with running_daemon(tmp_path) as d:
        cri = d.client()
        cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.busybox.reference)))
        try:
            yield d, cri
        finally:
            if d.process is None:
                d.start()
            remove_all_pods(cri)
            cri.close()


def _info(cri: CriClient, ctr_id: str) -> dict[str, object]:
    response = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id, verbose=True))
    info: dict[str, object] = json.loads(response.info["info"])
    return info


def _pod_info(cri: CriClient, pod_id: str) -> dict[str, object]:
    response = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    info: dict[str, object] = json.loads(response.info["info"])
    return info




def _attach_echo(cri: CriClient, ctr_id: str) -> bytes:
    url = cri.Attach(pb.AttachRequest(container_id=ctr_id, stdin=True, stdout=True)).url

    async def scenario() -> bytes:
        command = await RemoteCommand.open(url, stdin=True, stderr=False)
        try:
            assert command.stdin is not None and command.stdout is not None
            await command.client.send(command.stdin, b"ping\n")
            await command.client.wait_for_data(command.stdout, b"ping")
            return b"ping"
        finally:
            await command.client.close()

    return run(scenario())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_restart_keeps_containers(
    node: tuple[Daemon, CriClient], test_images: TestImages, tmp_path: Path, sig: int
) -> None:
    d, cri = node
    busybox = test_images.busybox.reference
    config = pod_config(log_dir=tmp_path / "logs")
    pod_id = run_pod(cri, config)
    ticker = start_container(cri, pod_id, config, container_config(busybox, command=TICKER))
    cat = start_container(cri, pod_id, config,
                          container_config(busybox, command=["cat"], stdin=True))
    quitter = start_container(cri, pod_id, config, container_config(
        busybox, command=["sh", "-c", "sleep 1; exit 7"]))
    pids = {c: _info(cri, c)["pid"] for c in (ticker, cat)}
    log = Path(container_status(cri, ticker).log_path)
    wait_for(lambda: log.exists() and "tick 3" in log.read_text(), what="ticks")

    stopped_at = time.time_ns()
    assert d.stop(sig) in (0, -signal.SIGKILL)
    time.sleep(1.5)  # the quitter exits while nobody listens
    d.start()
    restarted_at = time.time_ns()

    for ctr in (ticker, cat):
        assert container_status(cri, ctr).state == pb.CONTAINER_RUNNING
        assert _info(cri, ctr)["pid"] == pids[ctr]
    status = container_status(cri, quitter)
    assert status.state == pb.CONTAINER_EXITED and status.exit_code == 7
    assert stopped_at < status.finished_at < restarted_at
    assert status.reason == "Error"
    assert pod_state(cri, pod_id) == pb.SANDBOX_READY
    lines = log.read_text().count("\n")
    wait_for(lambda: log.read_text().count("\n") > lines + 3, what="ticks after the restart")
    assert exec_sync(cri, ticker, "echo", "still").stdout == b"still\n"
    assert _attach_echo(cri, cat) == b"ping"
    assert_all_gone(d, cri, {pod_id, ticker, cat, quitter})


def test_restart_keeps_a_created_container(
    node: tuple[Daemon, CriClient], test_images: TestImages
) -> None:
    """A created container is made at start (`runc run` in the shim): nothing runs yet, and
    after a daemon restart its shim still holds it, so it starts; a second one is stopped and
    removed without ever running."""
    d, cri = node
    config = pod_config()
    pod_id = run_pod(cri, config)
    created = [cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config,
        config=container_config(test_images.busybox.reference, command=["sleep", "1h"]),
    )).container_id for _ in range(2)]
    assert all(_info(cri, c)["pid"] == 0 for c in created)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d.start()
    for ctr in created:
        assert container_status(cri, ctr).state == pb.CONTAINER_CREATED
    started, never = created
    cri.StartContainer(pb.StartContainerRequest(container_id=started))
    assert container_status(cri, started).state == pb.CONTAINER_RUNNING
    pid = int(str(_info(cri, started)["pid"]))
    wait_for_command(pid, b"sleep\x001h\x00")
    cri.StopContainer(pb.StopContainerRequest(container_id=never, timeout=10))
    status = container_status(cri, never)
    assert (status.state, status.exit_code, status.started_at) == (pb.CONTAINER_EXITED, 137, 0)
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=never))
    shim = int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])
    assert shim in shim_pids(d)
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    wait_for(lambda: shim not in shim_pids(d), what="the shim's exit, after the answer")
    assert_all_gone(d, cri, {pod_id, *created})


def _pod_with_a_sleeper(cri: CriClient, test_images: TestImages) -> tuple[str, str]:
    """A pod and the id of its one container, which sleeps."""
    config = pod_config()
    pod_id = run_pod(cri, config)
    return pod_id, start_container(cri, pod_id, config, container_config(
        test_images.busybox.reference, command=["sleep", "1h"]))


def test_killed_shim(node: tuple[Daemon, CriClient], test_images: TestImages) -> None:
    d, cri = node
    pod_id, ctr = _pod_with_a_sleeper(cri, test_images)
    pid = int(str(_info(cri, ctr)["pid"]))
    shim = int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])
    assert shim in shim_pids(d)
    os.kill(shim, signal.SIGKILL)

    def unknown() -> bool:
        return container_status(cri, ctr).state in (pb.CONTAINER_UNKNOWN, pb.CONTAINER_EXITED)

    wait_for(unknown, what="the container reported unknown")
    status = container_status(cri, ctr)
    assert status.reason and status.message
    assert pod_state(cri, pod_id) == pb.SANDBOX_NOTREADY
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert process_exited(pid)
    assert container_status(cri, ctr).state == pb.CONTAINER_EXITED
    assert_all_gone(d, cri, {pod_id, ctr})


def test_killed_pause(node: tuple[Daemon, CriClient], test_images: TestImages) -> None:
    d, cri = node
    pod_id, ctr = _pod_with_a_sleeper(cri, test_images)
    os.kill(int(str(_pod_info(cri, pod_id)["pid"])), signal.SIGKILL)
    wait_for(lambda: pod_state(cri, pod_id) == pb.SANDBOX_NOTREADY, what="NOTREADY")
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert container_status(cri, ctr).state == pb.CONTAINER_EXITED
    assert_all_gone(d, cri, {pod_id, ctr})


def _pause_warnings(d: Daemon, pod_id: str) -> list[str]:
    return [line for line in d.log().splitlines() if "level=warning" in line
            and f"pause of pod {pod_id[:12]} exited" in line]


def test_only_an_unexpected_pause_death_warns(
    node: tuple[Daemon, CriClient], tmp_path: Path
) -> None:
    """StopPodSandbox kills the pause while the pod is READY: that exit is the stop's, not a
    warning; a pause killed by anyone else is."""
    d, cri = node
    stopped = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    killed = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=stopped))
    os.kill(int(str(_pod_info(cri, killed)["pid"])), signal.SIGKILL)
    wait_for(lambda: pod_state(cri, killed) == pb.SANDBOX_NOTREADY, what="NOTREADY")
    # Both exits were reported by now (the stop's came first): only the kill warned.
    wait_for(lambda: _pause_warnings(d, killed), what="the killed pause's warning")
    assert _pause_warnings(d, stopped) == []
    assert pod_state(cri, stopped) == pb.SANDBOX_NOTREADY


def _kill_cgroup_tree(top: Path) -> None:
    for dirpath, _, _ in os.walk(top):
        for pid in (Path(dirpath) / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _simulate_reboot(d: Daemon, pod_ids: list[str]) -> None:
    """What a reboot leaves: the root dir only. Every process, mount and pin is gone."""
    d.stop()
    for pid in shim_pids(d):
        os.kill(pid, signal.SIGKILL)
    # The pods' cgroups, in every mounted hierarchy, under the test daemon's own parent.
    tops = [h.dir_for(cgroups.pod_cgroup_path(f"/{d.state.name}", pod_id))
            for pod_id in pod_ids for h in cgroups.hierarchies()]
    for top in tops:
        if top.is_dir():
            _kill_cgroup_tree(top)
    time.sleep(0.3)
    for top in tops:
        if top.is_dir():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                wait_for(functools.partial(_rmdir, dirpath), what=f"rmdir {dirpath}")
    for pod_id in pod_ids:
        pin = Path(f"/run/netns/flatpod-{pod_id[:24]}")
        if pin.exists():
            subprocess.run(["umount", "-l", str(pin)], check=False)
            pin.unlink()
    for target in sorted(mounts_under(d.state), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(d.state)], check=True)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_reboot(node: tuple[Daemon, CriClient], test_images: TestImages) -> None:
    d, cri = node
    pods = []
    ctrs = []
    for _ in range(2):
        config = pod_config()
        pod_id = run_pod(cri, config)
        pods.append(pod_id)
        ctrs.append(start_container(cri, pod_id, config, container_config(
            test_images.busybox.reference, command=["sleep", "1h"])))
    _simulate_reboot(d, pods)
    d.start()
    listed = cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert sorted(p.id for p in listed) == sorted(pods)
    assert all(p.state == pb.SANDBOX_NOTREADY for p in listed)
    for ctr in ctrs:
        status = container_status(cri, ctr)
        assert status.state == pb.CONTAINER_EXITED and status.reason == "Unknown"
    assert len(list((d.root / "containers").iterdir())) == 2
    assert_all_gone(d, cri, set(pods + ctrs))


def test_disk_full_during_pull(tmp_path: Path, registry: Registry) -> None:
    pushed = push_definition(registry.client(), big(total_size=12 * 1024 * 1024, layers=2))
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], check=True)
    try:
        with running_daemon(tmp_path) as d:
            cri = d.client()
            with pytest.raises(grpc.RpcError) as err:
                cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=pushed.reference)))
            code = status_code(err.value)
            assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
            assert "No space left" in str(err.value.details())
            assert list((root / "content" / "ingest").iterdir()) == []
            assert [p for p in (root / "snapshots").iterdir() if p.name.startswith(".")] == []
            assert not cri.ListImages(pb.ListImagesRequest()).images
            assert cri.Version(pb.VersionRequest()).runtime_name
            cri.close()
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_short_soak(node: tuple[Daemon, CriClient], test_images: TestImages) -> None:
    """hack/soak for 20 s against this daemon: no failure, nothing leaked."""
    d, _ = node
    result = subprocess.run(
        [str(Path(__file__).resolve().parent.parent / "hack" / "soak"),
         "--socket", str(d.socket), "--image", test_images.busybox.reference,
         "--seconds", "20", "--clients", "3", "--root", str(d.root),
         "--daemon-pid", str(d.process.pid if d.process else 0)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
