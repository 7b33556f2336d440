"""Crash at any step: the daemon dies (os._exit(137), as kill -9) at each fault point of
sandbox/faults.py, restarts without it, and must have left nothing half made, nothing leaked,
and a kubelet retry of the same request must give a working object.

Fail at a step, and fail its undos: the record stays, and a removal, a restart or a retry
finishes the cleanup."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from netns.bridge import BridgeConfig
from sandbox.faults import ENV, FAIL_ENV, POINTS
from sandbox.shims import SPARE_MARKER
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import (
    container_config,
    container_status,
    exec_sync,
    mounts_under,
    pod_config,
    pod_state,
    remove_all_pods,
    run_pod,
    start_container,
    wait_for,
)
from tests.support.plugin import TestImages

SLEEP = ["sleep", "3600"]

# --- what a daemon may leave on the host ------------------------------------------------------


def known_ids(d: Daemon) -> set[str]:
    """Every pod and container id the store or the state and root dirs name (daemon down)."""
    ids: set[str] = set()
    for sub in (d.state / "pods", d.state / "containers", d.state / "runc",
                d.root / "containers"):
        if sub.is_dir():
            ids |= {p.name for p in sub.iterdir() if len(p.name) == 64}
    db = sqlite3.connect(d.root / "state.db")
    try:
        for table in ("pods", "containers"):
            ids |= {row[0] for row in db.execute(f"SELECT id FROM {table}")}
    finally:
        db.close()
    return ids


def traces_of(d: Daemon, ids: set[str]) -> list[str]:
    """Whatever names one of `ids`: files, mounts, netns, veths, rules, leases, cgroups."""
    found: list[str] = []
    bridge = BridgeConfig(name=d.bridge, subnet=d.subnet)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    mountinfo = Path("/proc/self/mountinfo").read_text()
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    leases = _leases(d)
    cgroups = _cgroup_dirs(d)
    for i in ids:
        for sub in (d.state / "pods", d.state / "containers", d.state / "runc",
                    d.root / "containers"):
            if (sub / i).exists():
                found.append(f"{sub / i}")
        if i in mountinfo:
            found.append(f"mount naming {i[:12]}")
        if f"flatpod-{i[:24]}" in netns:
            found.append(f"netns {i[:12]}")
        if f" {bridge.host_veth_name(i)}" in links.replace("@", " "):
            found.append(f"veth of {i[:12]}")
        if i in rules:
            found.append(f"iptables rule of {i[:12]}")
        if i in leases:
            found.append(f"ip lease of {i[:12]}")
        found += [f"cgroup {c}" for c in cgroups if i in c]
    return found


def _leases(d: Daemon) -> set[str]:
    db = sqlite3.connect(d.root / "state.db")
    try:
        return {row[0] for row in db.execute("SELECT owner FROM ip_leases")}
    finally:
        db.close()


def _cgroup_dirs(d: Daemon) -> list[str]:
    """The cgroups below a node's parent and below the test daemon's own (tests/daemon.py)."""
    dirs = []
    for controller in ("memory", "cpu,cpuacct", "pids", "devices", "freezer"):
        for parent in ("flatpod", d.state.name):
            top = Path("/sys/fs/cgroup") / controller / parent
            if top.is_dir():
                dirs += [dirpath for dirpath, _, _ in os.walk(top)]
    return dirs


def shim_pids(d: Daemon) -> list[int]:
    """The daemon's shims (forked from its zygote, so they share its command line)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if str(d.state).encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(pid))
    return pids


def assert_all_gone(d: Daemon, cri: CriClient, ids: set[str]) -> None:
    """Removes every pod, then nothing of `ids` (or anything else of this daemon) remains,
    once the cleanups that follow the removals' answers are done (sandbox/removals.py)."""
    remove_all_pods(cri)
    assert not cri.ListContainers(pb.ListContainersRequest()).containers
    wait_for(lambda: not _left_by(d, ids), what="the cleanups after the removals")
    left = set(shim_pids(d)) - set(spare_shims(d).values())
    assert len(left) <= 1, "shims left (only the zygote and a spare shim may remain)"


def _left_by(d: Daemon, ids: set[str]) -> list[str]:
    """What remains of `ids`, and of any other pod or container of this daemon."""
    spares = spare_shims(d)
    left = traces_of(d, ids)
    for sub in (d.state / "pods", d.state / "containers", d.root / "containers"):
        left += [str(p) for p in sub.iterdir() if p not in spares]
    left += [str(p) for p in (d.state / "runc").iterdir()]
    return left + mounts_under(d.state / "pods") + mounts_under(d.state / "containers") \
        + mounts_under(d.root)


def spare_shims(d: Daemon) -> dict[Path, int]:
    """The spare shim kept for the next pod (sandbox/shims.py): its dir, and its pid, once
    it is forked (a marker saying 0 is a fork under way)."""
    def forked() -> tuple[dict[Path, int]] | None:
        pods = d.state / "pods"
        found = {p: int((p / SPARE_MARKER).read_text() or 0) for p in pods.iterdir()
                 if (p / SPARE_MARKER).exists()}
        return (found,) if all(found.values()) else None

    spares: dict[Path, int] = wait_for(forked, what="the spare shim's fork")[0]
    return spares


# --- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """Before the crash, `setup` makes what the RPC needs; `crash` issues the RPC that dies;
    `retry` is kubelet's retry after the restart, and checks the result works."""

    setup: Callable[[CriClient, Path], dict[str, str]]
    crash: Callable[[CriClient, dict[str, str]], object]
    retry: Callable[[CriClient, dict[str, str]], None]


@dataclass
class World:
    daemon: Daemon
    images: TestImages
    logs: Path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, test_images: TestImages
) -> Iterator[World]:
    base = tmp_path_factory.mktemp("faults")
    with running_daemon(base) as d:
        cri = d.client()
        cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=test_images.busybox.reference)))
        cri.close()
        yield World(d, test_images, base / "logs")
        d.env = {}
        if d.process is None:
            d.start()
        cri = d.client()
        remove_all_pods(cri)
        cri.close()


def _pod(cri: CriClient, logs: Path, ctx: dict[str, str]) -> None:
    config = pod_config(log_dir=logs)
    ctx["pod_config"] = config.SerializeToString().hex()
    ctx["pod"] = run_pod(cri, config)


def _pod_config(ctx: dict[str, str]) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig.FromString(bytes.fromhex(ctx["pod_config"]))


def _ctr_config(ctx: dict[str, str]) -> pb.ContainerConfig:
    return pb.ContainerConfig.FromString(bytes.fromhex(ctx["ctr_config"]))


def _create(cri: CriClient, ctx: dict[str, str]) -> str:
    ctr_id: str = cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=ctx["pod"], config=_ctr_config(ctx), sandbox_config=_pod_config(ctx)
    )).container_id
    return ctr_id


def _works(cri: CriClient, ctr_id: str) -> None:
    assert exec_sync(cri, ctr_id, "echo", "alive").stdout == b"alive\n"






def run_pod_case(world: World) -> Case:
    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        config = pod_config(log_dir=logs)
        return {"pod_config": config.SerializeToString().hex()}

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        return cri.RunPodSandbox(pb.RunPodSandboxRequest(config=_pod_config(ctx)))

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert not cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
        pod_id = run_pod(cri, _pod_config(ctx))
        assert pod_state(cri, pod_id) == pb.SANDBOX_READY
        ctr = start_container(cri, pod_id, _pod_config(ctx),
                              container_config(world.images.busybox.reference, command=SLEEP))
        _works(cri, ctr)

    return Case(setup, crash, retry)


def create_case(world: World) -> Case:
    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        ctx: dict[str, str] = {}
        _pod(cri, logs, ctx)
        config = container_config(world.images.busybox.reference, command=SLEEP)
        ctx["ctr_config"] = config.SerializeToString().hex()
        return ctx

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert not cri.ListContainers(pb.ListContainersRequest()).containers
        ctr = _create(cri, ctx)
        cri.StartContainer(pb.StartContainerRequest(container_id=ctr))
        _works(cri, ctr)

    return Case(setup, _create, retry)


def start_case(world: World, started: bool) -> Case:
    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        ctx = create_case(world).setup(cri, logs)
        ctx["ctr"] = _create(cri, ctx)
        return ctx

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        return cri.StartContainer(pb.StartContainerRequest(container_id=ctx["ctr"]))

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        ctr = ctx["ctr"]
        if started:
            # It runs: the restart found it so; starting it again is a precondition error.
            assert container_status(cri, ctr).state == pb.CONTAINER_RUNNING
            with pytest.raises(grpc.RpcError) as err:
                crash(cri, ctx)
            assert status_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        else:
            assert container_status(cri, ctr).state == pb.CONTAINER_CREATED
            crash(cri, ctx)
        _works(cri, ctr)

    return Case(setup, crash, retry)


def stop_pod_case(world: World) -> Case:
    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        ctx = create_case(world).setup(cri, logs)
        ctx["ctr"] = _create(cri, ctx)
        cri.StartContainer(pb.StartContainerRequest(container_id=ctx["ctr"]))
        return ctx

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        return cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ctx["pod"]))

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        crash(cri, ctx)
        assert pod_state(cri, ctx["pod"]) == pb.SANDBOX_NOTREADY
        assert container_status(cri, ctx["ctr"]).state == pb.CONTAINER_EXITED

    return Case(setup, crash, retry)


def remove_pod_case(world: World) -> Case:
    """The daemon dies after RemovePodSandbox answered (or just before the answer got out),
    before or while it cleaned the pod's shim and host traces: the journal finishes them, and
    a pod of the same name can be made again."""
    stop = stop_pod_case(world)

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        d = world.daemon
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ctx["pod"]))
        assert d.process is not None and d.process.wait(20) == 137, d.log()
        # The crash came before the cleanup ended: the pod's dir is there.
        assert traces_of(d, {ctx["pod"]}) != []
        return cri.Version(pb.VersionRequest())  # the daemon is gone: UNAVAILABLE

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert traces_of(world.daemon, {ctx["pod"]}) == [], world.daemon.log()
        assert not cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
        with pytest.raises(grpc.RpcError) as err:
            pod_state(cri, ctx["pod"])
        assert status_code(err.value) == grpc.StatusCode.NOT_FOUND
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ctx["pod"]))
        pod_id = run_pod(cri, _pod_config(ctx))  # the name is free again
        assert pod_state(cri, pod_id) == pb.SANDBOX_READY

    return Case(stop.setup, crash, retry)


def remove_container_case(world: World) -> Case:
    """The daemon dies right after RemoveContainer answered (or just before the answer got
    out), before it cleaned the container's host traces: the journal finishes them."""
    start = start_case(world, started=True)

    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        ctx = start.setup(cri, logs)
        cri.StartContainer(pb.StartContainerRequest(container_id=ctx["ctr"]))
        return ctx

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        d = world.daemon
        cri.RemoveContainer(pb.RemoveContainerRequest(container_id=ctx["ctr"]))
        assert d.process is not None and d.process.wait(20) == 137, d.log()
        # The crash came before the cleanup: the rootfs, bundle, layer and cgroup are there.
        assert traces_of(d, {ctx["ctr"]}) != []
        return cri.Version(pb.VersionRequest())  # the daemon is gone: UNAVAILABLE

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert traces_of(world.daemon, {ctx["ctr"]}) == [], world.daemon.log()
        assert not cri.ListContainers(pb.ListContainersRequest()).containers
        ctr = _create(cri, ctx)  # the name is free again
        cri.StartContainer(pb.StartContainerRequest(container_id=ctr))
        _works(cri, ctr)

    return Case(setup, crash, retry)


def pull_case(world: World) -> Case:
    image = world.images.layered

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        return cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image.reference)))

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert list((world.daemon.root / "content" / "ingest").iterdir()) == []
        temp = [p for p in (world.daemon.root / "snapshots").iterdir() if p.name.startswith(".")]
        assert temp == []
        assert crash(cri, ctx).image_ref == image.config_digest  # type: ignore[attr-defined]
        cri.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image.reference)))

    return Case(lambda _c, _l: {}, crash, retry)


def remove_image_case(world: World) -> Case:
    """The daemon dies once RemoveImage has deleted the record, before the collection that
    runs after the answer: the next start deletes the image's blobs and snapshots (nothing
    names them any more), and the image can be pulled again."""
    image = world.images.layered
    spec = pb.ImageSpec(image=image.reference)

    def on_disk(d: Daemon) -> set[str]:
        return ({p.name for p in (d.root / "content" / "sha256").iterdir()}
                | {p.name for p in (d.root / "snapshots").iterdir()})

    def setup(cri: CriClient, logs: Path) -> dict[str, str]:
        before = on_disk(world.daemon)
        cri.PullImage(pb.PullImageRequest(image=spec))
        own = on_disk(world.daemon) - before
        assert own  # the premise: the image has files no other image shares
        return {"own": ",".join(sorted(own))}

    def crash(cri: CriClient, ctx: dict[str, str]) -> object:
        return cri.RemoveImage(pb.RemoveImageRequest(image=spec))

    def retry(cri: CriClient, ctx: dict[str, str]) -> None:
        assert not cri.ImageStatus(pb.ImageStatusRequest(image=spec)).HasField("image")
        assert on_disk(world.daemon) & set(ctx["own"].split(",")) == set()
        assert cri.PullImage(pb.PullImageRequest(image=spec)).image_ref == image.config_digest
        crash(cri, ctx)

    return Case(setup, crash, retry)


def case_for(point: str, world: World) -> Case:
    rpc, _, step = point.partition(":")
    if rpc == "run_pod":
        return run_pod_case(world)
    if rpc == "create_container":
        return create_case(world)
    if rpc == "start_container":
        return start_case(world, started=step.startswith("after"))
    if rpc == "stop_pod":
        return stop_pod_case(world)
    if rpc == "remove_pod":
        return remove_pod_case(world)
    if rpc == "remove_container":
        return remove_container_case(world)
    if rpc == "remove_image":
        return remove_image_case(world)
    return pull_case(world)


def test_every_point_is_covered() -> None:
    assert set(POINTS) == set(CRASH_POINTS)


CRASH_POINTS = sorted(POINTS)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at(point: str, world: World) -> None:
    d = world.daemon
    d.stop()
    d.env = {ENV: point}
    d.start()
    cri = d.client()
    try:
        case = case_for(point, world)
        ctx = case.setup(cri, world.logs)
        with pytest.raises(grpc.RpcError) as err:
            case.crash(cri, ctx)
        assert status_code(err.value) == grpc.StatusCode.UNAVAILABLE, err.value
        assert d.process is not None
        assert d.process.wait(20) == 137, d.log()
        d.stop()
        ids = known_ids(d) - set(ctx.values())
    finally:
        cri.close()
    d.env = {}
    d.start()
    cri = d.client()
    try:
        # The half-made object is gone with everything it touched; finished ones are whole.
        listed = {p.id for p in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items}
        listed |= {c.id for c in cri.ListContainers(pb.ListContainersRequest()).containers}
        assert traces_of(d, ids - listed) == [], d.log()
        case.retry(cri, ctx)
        all_ids = ids | listed | {v for v in ctx.values() if len(v) == 64}
        wait_for(lambda: len(shim_pids(d)) >= 1, what="the zygote")
        assert_all_gone(d, cri, all_ids)
    finally:
        cri.close()


# --- an undo that fails: the record stays until the cleanup is finished ------------------------

# RunPodSandbox fails once everything is made, and every undo that leaves something on the
# host fails too: the pause runs on, its namespaces stay pinned, the netns with its veth, the
# pod cgroup and the ip lease stay.
POD_UNDO_FAILS = "run_pod:after_pins,undo:pins,undo:pause,undo:network,undo:netns,undo:cgroup"
# CreateContainer fails once the shim holds the container, and its rootfs and runc undos fail:
# its overlay mount stays (nothing runs yet: StartContainer makes it with `runc run`), and the
# shim holds a container that never ran.
CTR_UNDO_FAILS = "create_container:after_shim_create,undo:runc,undo:rootfs"
FINISHES = ["remove", "restart", "retry"]


def processes_in(object_id: str) -> list[int]:
    """The live processes whose cgroup names `object_id` (a pod's: its pause and containers;
    a zombie holds nothing, and its reaper, init once the shim is gone, takes it soon)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            in_cgroup = object_id in Path(f"/proc/{pid}/cgroup").read_text()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if in_cgroup and state != "Z":
            pids.append(int(pid))
    return pids


def _restart(d: Daemon, env: dict[str, str]) -> None:
    d.stop()
    d.env = env
    d.start()


@dataclass
class Armed:
    """A daemon whose named steps fail once (FLATPOD_FAIL_AT), and a client of it."""

    daemon: Daemon
    cri: CriClient

    def restart_unarmed(self) -> None:
        self.cri.close()
        _restart(self.daemon, {})
        self.cri = self.daemon.client()


@contextmanager
def failing_at(d: Daemon, points: str) -> Iterator[Armed]:
    _restart(d, {FAIL_ENV: points})
    armed = Armed(d, d.client())
    try:
        yield armed
    finally:
        armed.cri.close()
        if d.env:
            _restart(d, {})


def _failed_with(err: grpc.RpcError, request: str, step: str, point: str) -> str:
    """The id the error names, after checking it says where the request failed, why, and
    what is kept for later."""
    details = err.details() or ""
    assert status_code(err) == grpc.StatusCode.INTERNAL, details
    found = re.match(
        rf"{request} ([0-9a-f]{{64}}): {step}: \[Errno 5\] injected failure at {point} "
        r"\(not undone, kept for a later removal: (.*)\)$", details,
    )
    assert found, details
    return found.group(1)


def _left_nothing(armed: Armed, object_id: str, others: set[str]) -> None:
    d = armed.daemon
    # A removal answers before the host traces are cleaned (sandbox/removals.py).
    with contextlib.suppress(AssertionError):
        wait_for(lambda: traces_of(d, {object_id}) == [], what="the cleanup")
    assert traces_of(d, {object_id}) == [], d.log()
    assert processes_in(object_id) == []
    assert_all_gone(d, armed.cri, {object_id} | others)


@pytest.mark.parametrize("finish", FINISHES)
def test_a_failed_undo_keeps_the_pod_until_its_cleanup_is_finished(
    finish: str, world: World
) -> None:
    d = world.daemon
    with failing_at(d, POD_UNDO_FAILS) as armed:
        config = pod_config(log_dir=world.logs)
        with pytest.raises(grpc.RpcError) as err:
            armed.cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
        pod_id = _failed_with(err.value, "run pod", "pins", "run_pod:after_pins")
        for what in ("pins", "pause", "network", "netns", "cgroup"):
            assert f"{what}: [Errno 5] injected failure at undo:{what}" in str(err.value.details())
        # Kept NOTREADY (kubelet stops and removes it), with everything it left.
        assert pod_state(armed.cri, pod_id) == pb.SANDBOX_NOTREADY
        left = " ".join(traces_of(d, {pod_id}))
        for trace in ("netns", "veth", "cgroup", "mount", "ip lease"):
            assert trace in left, left
        assert processes_in(pod_id), "the pause is not running"
        if finish == "remove":
            armed.cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            armed.cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        elif finish == "restart":
            armed.restart_unarmed()
        else:  # kubelet's retry, same name: the leftover goes first
            retried = run_pod(armed.cri, config)
            assert retried != pod_id and pod_state(armed.cri, retried) == pb.SANDBOX_READY
        listed = armed.cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert pod_id not in {p.id for p in listed}
        _left_nothing(armed, pod_id, set())


@pytest.mark.parametrize("finish", FINISHES)
def test_a_failed_undo_keeps_the_container_until_its_cleanup_is_finished(
    finish: str, world: World
) -> None:
    d = world.daemon
    with failing_at(d, CTR_UNDO_FAILS) as armed:
        ctx: dict[str, str] = {}
        _pod(armed.cri, world.logs, ctx)
        config = container_config(world.images.busybox.reference, command=SLEEP)
        ctx["ctr_config"] = config.SerializeToString().hex()
        with pytest.raises(grpc.RpcError) as err:
            _create(armed.cri, ctx)
        ctr_id = _failed_with(
            err.value, "create container", "shim create", "create_container:after_shim_create"
        )
        # Seen by nobody, and what it left is still there.
        assert not armed.cri.ListContainers(pb.ListContainersRequest()).containers
        left = " ".join(traces_of(d, {ctr_id}))
        assert "mount" in left, left
        if finish == "remove":
            armed.cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ctx["pod"]))
        elif finish == "restart":
            armed.restart_unarmed()
        else:  # kubelet's retry, same name: the leftover goes first
            retried = _create(armed.cri, ctx)
            assert retried != ctr_id
            armed.cri.StartContainer(pb.StartContainerRequest(container_id=retried))
            _works(armed.cri, retried)
        _left_nothing(armed, ctr_id, {ctx["pod"]})
