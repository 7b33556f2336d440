"""The spare shim (sandbox/shims.py): forked after a RunPodSandbox for the next pod, taken by
it with its id and dir, and stopped by a daemon's stop or, after a kill -9, its next start."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from cri_api import api_pb2 as pb
from netns.pin import is_pinned, pod_netns_path
from sandbox.shims import SPARE_MARKER
from tests import test_recovery
from tests.cri import CriClient
from tests.daemon import Daemon
from tests.pods import pod_config, pod_state, run_pod, wait_for
from tests.test_faults import assert_all_gone, shim_pids, spare_shims, traces_of

node = test_recovery.node  # the fixture: a daemon of its own, its pods removed after


def _spare(d: Daemon) -> tuple[Path, int]:
    """The one spare shim's dir and pid, once it is forked."""
    found = wait_for(lambda: spare_shims(d), what="a spare shim")
    assert len(found) == 1, found
    [(pod_dir, pid)] = found.items()
    return pod_dir, pid


def _plumbed(d: Daemon, pod_id: str) -> str:
    """Waits until the spare's netns has its veth and address, made ahead of its pod (the
    bridge network); the address."""
    short = pod_id[:12]
    wait_for(lambda: {f"veth of {short}", f"ip lease of {short}"} <= set(traces_of(d, {pod_id})),
             what="the spare's network")
    db = sqlite3.connect(d.root / "state.db")
    try:
        [(ip,)] = db.execute("SELECT ip FROM ip_leases WHERE owner = ?", (pod_id,)).fetchall()
    finally:
        db.close()
    return str(ip)


def test_the_next_pod_takes_the_spare(node: tuple[Daemon, CriClient], tmp_path: Path) -> None:
    d, cri = node
    assert spare_shims(d) == {}, "a daemon that ran no pod keeps no spare"
    first = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    spare_dir, spare_pid = _spare(d)
    assert spare_pid in shim_pids(d) and spare_dir.name != first
    spare_netns = pod_netns_path(spare_dir.name)
    wait_for(lambda: is_pinned(spare_netns), what="the spare's netns")  # made before the fork
    spare_netns_inode = spare_netns.stat().st_ino
    spare_ip = _plumbed(d, spare_dir.name)
    second = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    # The spare's id, dir and shim are the pod's now; its marker is gone.
    assert second == spare_dir.name
    assert not (spare_dir / SPARE_MARKER).exists()
    assert pod_state(cri, second) == pb.SANDBOX_READY
    pause = int(Path(f"/proc/{_pause_pid(cri, second)}/status").read_text()
                .split("PPid:")[1].split()[0])
    assert pause == spare_pid, "the pause is the spare shim's child"
    # ... and the spare's netns is the pod's: the pause is in it.
    assert os.stat(f"/proc/{_pause_pid(cri, second)}/ns/net").st_ino == spare_netns_inode
    # ... with the network plumbed in it ahead: the pod has the spare's address.
    status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=second)).status
    assert status.network.ip == spare_ip
    # Another spare is forked for the pod after.
    assert _spare(d)[0] != spare_dir
    assert_all_gone(d, cri, {first, second})


def test_a_killed_daemon_s_spare_is_stopped_at_its_next_start(
        node: tuple[Daemon, CriClient], tmp_path: Path) -> None:
    d, cri = node
    pod_id = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    spare_dir, spare_pid = _spare(d)
    _plumbed(d, spare_dir.name)
    d.kill()
    assert spare_pid in shim_pids(d), "a spare outlives a killed daemon, as shims do"
    assert is_pinned(pod_netns_path(spare_dir.name)), "a killed daemon's spare keeps its netns"
    d.start()
    wait_for(lambda: not os.path.exists(f"/proc/{spare_pid}"), what="the old spare's exit")
    assert not spare_dir.exists()
    assert not is_pinned(pod_netns_path(spare_dir.name))
    assert_all_gone(d, cri, {pod_id, spare_dir.name})  # its veth and lease too


def test_an_unmarked_spare_a_killed_daemon_left_is_removed_at_its_next_start(
        node: tuple[Daemon, CriClient], tmp_path: Path) -> None:
    """A kill between the spare dir's mkdir and its marker (or while a spare's dir is being
    removed, after the marker) leaves a pod dir that no record names: the next start removes
    it, with its shim and netns, whether the fork had happened or not."""
    d, cri = node
    pod_id = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    spare_dir, spare_pid = _spare(d)
    _plumbed(d, spare_dir.name)
    d.kill()
    (spare_dir / SPARE_MARKER).unlink()
    bare_dir = spare_dir.with_name(os.urandom(32).hex())
    (bare_dir / "ns").mkdir(parents=True)
    d.start()
    wait_for(lambda: not os.path.exists(f"/proc/{spare_pid}"), what="the old spare's exit")
    assert not spare_dir.exists() and not bare_dir.exists()
    assert not is_pinned(pod_netns_path(spare_dir.name))
    assert_all_gone(d, cri, {pod_id, spare_dir.name})


def test_a_stopped_daemon_leaves_no_spare(node: tuple[Daemon, CriClient], tmp_path: Path) -> None:
    d, cri = node
    pod_id = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    spare_dir, spare_pid = _spare(d)
    _plumbed(d, spare_dir.name)
    d.stop()
    assert not spare_dir.exists()
    assert not is_pinned(pod_netns_path(spare_dir.name))
    assert spare_pid not in shim_pids(d)
    assert traces_of(d, {spare_dir.name}) == [], "its veth and lease go with it"
    d.start()
    assert_all_gone(d, cri, {pod_id})


def test_a_host_network_pod_takes_the_spare_without_its_netns(
        node: tuple[Daemon, CriClient], tmp_path: Path) -> None:
    d, cri = node
    first = run_pod(cri, pod_config(log_dir=tmp_path / "logs"))
    spare_dir, _ = _spare(d)
    wait_for(lambda: is_pinned(pod_netns_path(spare_dir.name)), what="the spare's netns")
    _plumbed(d, spare_dir.name)  # the pod tears that down: its own network is the node's
    host = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.NODE)))
    second = run_pod(cri, pod_config(log_dir=tmp_path / "logs", linux=host))
    assert second == spare_dir.name
    assert not is_pinned(pod_netns_path(second)), "a host-network pod keeps no netns"
    assert os.stat(f"/proc/{_pause_pid(cri, second)}/ns/net").st_ino == \
        os.stat("/proc/self/ns/net").st_ino
    assert_all_gone(d, cri, {first, second})


def _pause_pid(cri: CriClient, pod_id: str) -> int:
    response = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                               verbose=True))
    return int(json.loads(response.info["info"])["pid"])
