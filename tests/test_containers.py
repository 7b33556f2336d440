"""Containers through the CRI, against real runc and the kernel: logs, exits, stops, shared
namespaces, security contexts, ExecSync, the state machine, status, filters, resources, mounts."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient, status_code
from tests.daemon import Daemon
from tests.pods import (
    a_pod,
    container_config,
    container_status,
    exec_sync,
    mounts_under,
    start_container,
    wait_for,
    wait_for_command,
)
from tests.support.plugin import TestImages

# <RFC3339Nano> <stream> <F|P> <text>, as kubelet's log parser reads it.
RFC3339_NANO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)"
CRI_LOG_LINE = re.compile(rf"^({RFC3339_NANO}) (stdout|stderr) ([FP]) (.*)$")


def memory_dir(cgroup_path: str) -> Path:
    """A container's memory cgroup directory on this host (v1 memory hierarchy, or v2)."""
    return cgroups.cgroup_dir(cgroup_path, "memory")


def memory_limit_file(cgroup_path: str) -> Path:
    d = memory_dir(cgroup_path)
    return d / ("memory.max" if cgroups.is_unified_only() else "memory.limit_in_bytes")
SLEEP = ["sleep", "1000"]


# --- helpers ---------------------------------------------------------------------------------




def create(fp: CriClient, pod_id: str, pod: pb.PodSandboxConfig, config: pb.ContainerConfig,
           timeout: float | None = None) -> str:
    ctr_id: str = fp.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod),
        timeout=timeout,
    ).container_id
    return ctr_id


def security(**fields: Any) -> pb.LinuxContainerConfig:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**fields))


def pid_mode(mode: int) -> pb.NamespaceOption:
    return pb.NamespaceOption(pid=mode)


@contextmanager
def a_pid_pod(
    fp: CriClient, tmp_path: Path
) -> Iterator[tuple[str, pb.PodSandboxConfig, pb.LinuxContainerConfig]]:
    """A pod with one PID namespace for all its containers (as a_pod), and the containers'
    config that joins it."""
    pod_linux = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pid_mode(pb.POD)))
    with a_pod(fp, tmp_path, linux=pod_linux) as (pod_id, pod):
        yield pod_id, pod, security(namespace_options=pid_mode(pb.POD))


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def details(err: grpc.RpcError) -> str:
    text: str = err.details()  # type: ignore[attr-defined]
    return text


def exited(fp: CriClient, ctr_id: str, timeout: float = 15.0) -> pb.ContainerStatus:
    def status() -> pb.ContainerStatus | None:
        current = container_status(fp, ctr_id)
        return current if current.state == pb.CONTAINER_EXITED else None

    result: pb.ContainerStatus = wait_for(status, timeout, f"container {ctr_id[:12]} to exit")
    return result


def stop(fp: CriClient, ctr_id: str, timeout: int) -> float:
    """StopContainer; how long it took, in seconds."""
    began = time.monotonic()
    fp.StopContainer(pb.StopContainerRequest(container_id=ctr_id, timeout=timeout))
    return time.monotonic() - began


def verbose_info(fp: CriClient, ctr_id: str) -> dict[str, Any]:
    response = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id, verbose=True))
    info: dict[str, Any] = json.loads(response.info["info"])
    return info


def out(fp: CriClient, ctr_id: str, *cmd: str) -> str:
    result = exec_sync(fp, ctr_id, *cmd)
    assert result.exit_code == 0, (cmd, result.stderr)
    return bytes(result.stdout).decode().strip()


def succeeds(fp: CriClient, ctr_id: str, script: str) -> bool:
    return bool(exec_sync(fp, ctr_id, "sh", "-c", script).exit_code == 0)


def log_records(path: Path) -> list[tuple[str, str, str, str]]:
    records = []
    for line in path.read_text().splitlines():
        match = CRI_LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        stamp, stream, tag, text = match.groups()
        records.append((stamp, stream, tag, text))
    return records


def rfc3339_nano(stamp: str) -> datetime:
    whole, _, rest = stamp.partition(".")
    digits = re.match(r"\d*", rest)
    assert digits is not None
    zone = rest[digits.end():] if rest else whole[19:]
    micro = (digits.group() + "000000")[:6]
    return datetime.fromisoformat(f"{whole[:19]}.{micro}{'+00:00' if zone == 'Z' else zone}")


def host_commands_with(*needles: bytes) -> list[bytes]:
    """Host processes whose command line (spaces for NULs) holds one of `needles`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(cmdline)
    return found


def processes_in_cgroup(cgroup_path: str) -> list[str]:
    """Host-side command lines of every process in a container's memory cgroup (none when
    the cgroup is gone: runc deletes an exited container's cgroup, killing what is left)."""
    procs = memory_dir(cgroup_path) / "cgroup.procs"
    found = []
    try:
        pids = procs.read_text().split()
    except FileNotFoundError:
        return []
    for pid in pids:
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


# --- logs ------------------------------------------------------------------------------------


def test_log_format_and_reopen(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        # One line longer than max_log_line_size (16384): split into P records and a last F.
        script = ("echo out; echo err >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; "
                  "while true; do echo tick; sleep 0.1; done")
        config = container_config(pulled.busybox.reference, command=["sh", "-c", script])
        config.log_path = "nested/deeper/ctr.log"
        ctr = start_container(fp, pod_id, pod, config)
        log = tmp_path / "logs" / "nested" / "deeper" / "ctr.log"
        assert container_status(fp, ctr).log_path == str(log)
        wait_for(lambda: log.exists() and "tick" in log.read_text(), what="log lines")
        records = log_records(log)
        # stdout and stderr are separate pipes: their relative order is not defined.
        assert {("stdout", "F", "out"), ("stderr", "F", "err")} <= {r[1:] for r in records}
        long_line = [r for r in records if set(r[3]) == {"x"}]
        assert [r[2] for r in long_line] == ["P", "F"]
        assert sum(len(r[3]) for r in long_line) == 20000
        stamps = [rfc3339_nano(r[0]) for r in records]
        assert stamps == sorted(stamps)
        assert abs(stamps[0].timestamp() - time.time()) < 60

        rotated = log.with_name("ctr.log.1")
        log.rename(rotated)
        fp.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=ctr))
        wait_for(lambda: log.exists() and "tick" in log.read_text(), what="the reopened log")
        assert all(r[1:] == ("stdout", "F", "tick") for r in log_records(log))
        size = rotated.stat().st_size
        time.sleep(0.3)
        assert rotated.stat().st_size == size

        stop(fp, ctr, 0)
        err = rpc_error(fp.ReopenContainerLog, pb.ReopenContainerLogRequest(container_id=ctr))
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION


# --- exits -----------------------------------------------------------------------------------


def test_exit_codes_reasons_and_times(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        failing = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", "exit 3"]))
        done = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", "exit 0"]))
        hungry = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference,
            command=["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"],
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                memory_limit_in_bytes=16 * 1024 * 1024))))

        status = exited(fp, failing)
        assert (status.exit_code, status.reason) == (3, "Error")
        assert status.finished_at >= status.started_at > status.created_at > 0
        status = exited(fp, done)
        assert (status.exit_code, status.reason) == (0, "Completed")
        assert status.finished_at >= status.started_at > status.created_at > 0
        status = exited(fp, hungry)
        assert (status.exit_code, status.reason) == (137, "OOMKilled")


# --- StopContainer ---------------------------------------------------------------------------


def test_stop_escalates_to_kill(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        stubborn = container_config(
            pulled.busybox.reference, command=["sh", "-c", 'trap "" TERM; sleep 1000'])
        patient = start_container(fp, pod_id, pod, stubborn)
        stubborn.metadata.name = "stubborn-too"
        hasty = start_container(fp, pod_id, pod, stubborn)
        web = start_container(fp, pod_id, pod, container_config(pulled.web.reference))

        took = stop(fp, patient, 2)
        assert 2.0 <= took < 10.0
        assert exited(fp, patient, 0).exit_code == 137
        assert stop(fp, hasty, 0) < 2.0
        assert exited(fp, hasty, 0).exit_code == 137
        # httpd dies of the image's StopSignal, SIGINT, well before the timeout.
        assert stop(fp, web, 30) < 10.0
        assert exited(fp, web, 0).exit_code == 128 + 2

        stop(fp, web, 30)  # stopping twice is fine
        assert exited(fp, web, 0).exit_code == 128 + 2
        fp.StopContainer(pb.StopContainerRequest(container_id="f" * 64, timeout=1))


# --- namespaces ------------------------------------------------------------------------------


def test_containers_share_net_ipc_uts_not_mounts_or_pids(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    # pid=POD is the proto's zero value; kubelet sends CONTAINER unless shareProcessNamespace.
    own_pids = security(namespace_options=pid_mode(pb.CONTAINER))
    pod_linux = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pid_mode(pb.CONTAINER)))
    with a_pod(fp, tmp_path, linux=pod_linux) as (pod_id, pod):
        web = start_container(fp, pod_id, pod, container_config(
            pulled.web.reference, linux=own_pids))
        client = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=SLEEP, linux=own_pids))

        def fetch() -> bytes:
            result = exec_sync(fp, client, "wget", "-qO-", "http://127.0.0.1/")
            return bytes(result.stdout) if result.exit_code == 0 else b""

        assert wait_for(fetch, what="httpd over the pod's loopback") == b"flatpod web\n"
        for kind, shared in (("net", True), ("ipc", True), ("uts", True), ("mnt", False)):
            mine = out(fp, web, "readlink", f"/proc/self/ns/{kind}")
            theirs = out(fp, client, "readlink", f"/proc/self/ns/{kind}")
            assert (mine == theirs) is shared, (kind, mine, theirs)
        # pid=CONTAINER: neither sees the other.
        assert "httpd" not in out(fp, client, "ps", "-o", "args")
        assert "sleep" not in out(fp, web, "ps", "-o", "args")


def test_pid_pod_containers_see_each_other(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pid_pod(fp, tmp_path) as (pod_id, pod, shared):
        first = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sleep", "1001"], linux=shared))
        second = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sleep", "1002"], linux=shared))
        assert "sleep 1002" in out(fp, first, "ps", "-o", "args")
        assert "sleep 1001" in out(fp, second, "ps", "-o", "args")


# --- security contexts -----------------------------------------------------------------------


def test_readonly_rootfs_and_users(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    busybox = pulled.busybox.reference
    with a_pod(fp, tmp_path) as (pod_id, pod):
        readonly = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(readonly_rootfs=True)))
        assert not succeeds(fp, readonly, "touch /written")
        assert not succeeds(fp, readonly, "touch /etc/written")

        numeric = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(
                run_as_user=pb.Int64Value(value=1000), run_as_group=pb.Int64Value(value=2000),
                supplemental_groups=[3000])))
        assert out(fp, numeric, "id", "-u") == "1000"
        assert out(fp, numeric, "id", "-g") == "2000"
        assert "3000" in out(fp, numeric, "id", "-G").split()
        user = container_status(fp, numeric).user.linux
        assert (user.uid, user.gid) == (1000, 2000)
        assert 3000 in user.supplemental_groups

        named = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(run_as_username="flat")))
        assert out(fp, named, "id", "-un") == "flat"
        assert out(fp, named, "id", "-g") == "1000"
        assert "5000" in out(fp, named, "id", "-G").split()

        by_image = start_container(fp, pod_id, pod, container_config(
            pulled.busybox_user.reference, command=SLEEP))
        assert out(fp, by_image, "id", "-un") == "flat"
        assert container_status(fp, by_image).user.linux.uid == 1000

        err = rpc_error(create, fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(run_as_username="nosuchuser")))
        assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "nosuchuser" in details(err)


def test_a_create_that_fails_after_the_shim_holds_it_leaves_no_log_open(
        fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    """The shim is told of a container while its bundle is still made (it opens the log
    file then): a spec error after that must end the shim's hold, or each failed create
    would leave the shim an open log file for the pod's life."""
    with a_pod(fp, tmp_path) as (pod_id, pod):
        config = container_config(pulled.busybox.reference, command=SLEEP,
                                  linux=security(run_as_username="nosuchuser"))
        err = rpc_error(create, fp, pod_id, pod, config)
        assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT
        log_file = tmp_path / "logs" / config.log_path
        assert log_file.exists()  # made, and so opened by the shim, before the spec failed
        assert holders_of(log_file) == []


def holders_of(path: Path) -> list[int]:
    """The pids of the processes with `path` open."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if str(path) in links:
            holders.add(int(fd_dir.parent.name))
    return sorted(holders)


def test_capabilities_and_seccomp(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    busybox = pulled.busybox.reference
    ping = "ping -c1 -W1 127.0.0.1"
    mount = "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m"
    unconfined = pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
    runtime_default = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    with a_pod(fp, tmp_path) as (pod_id, pod):
        default = start_container(fp, pod_id, pod, container_config(busybox, command=SLEEP))
        assert succeeds(fp, default, ping)
        assert not succeeds(fp, default, mount)

        no_raw = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP,
            linux=security(capabilities=pb.Capability(drop_capabilities=["NET_RAW"]))))
        assert not succeeds(fp, no_raw, ping)

        admin = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP,
            linux=security(capabilities=pb.Capability(add_capabilities=["SYS_ADMIN"]))))
        assert succeeds(fp, admin, mount)

        # containerd's default profile lets only CAP_SYS_ADMIN holders make namespaces; the
        # kernel itself lets anyone make a user namespace.
        confined = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(seccomp=runtime_default)))
        free = start_container(fp, pod_id, pod, container_config(
            busybox, command=SLEEP, linux=security(seccomp=unconfined)))
        assert succeeds(fp, free, "unshare -U true")
        assert not succeeds(fp, confined, "unshare -U true")
        assert succeeds(fp, confined, "echo still works")


# --- ExecSync --------------------------------------------------------------------------------


def test_exec_sync_output_and_timeout(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sleep", "2000"]))
        result = exec_sync(fp, ctr, "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
        assert (result.stdout, result.stderr, result.exit_code) == (b"to-out\n", b"to-err\n", 7)
        # More than a pipe holds, on both streams at once.
        big = exec_sync(fp, ctr, "sh", "-c", "head -c 300000 /dev/zero | tee /dev/stderr")
        assert (len(big.stdout), len(big.stderr), big.exit_code) == (300000, 300000, 0)

        began = time.monotonic()
        err = rpc_error(exec_sync, fp, ctr, "sh", "-c", "sleep 1000 & sleep 1000", timeout=1)
        assert time.monotonic() - began < 5.0
        assert status_code(err) == grpc.StatusCode.DEADLINE_EXCEEDED

        # DEADLINE_EXCEEDED comes only once the exec's whole tree is dead: checked at once,
        # not waited for (a zombie left to the container's init has no cmdline).
        cgroup = verbose_info(fp, ctr)["cgroup"]
        assert not any("sleep 1000" in p for p in processes_in_cgroup(cgroup))
        assert "sleep 1000" not in out(fp, ctr, "ps", "-o", "args")
        assert any("sleep 2000" in p for p in processes_in_cgroup(cgroup))


# --- the state machine -----------------------------------------------------------------------


def leftovers(daemon: Daemon, ctr_id: str, cgroup: str) -> list[str]:
    traces = [f"mount {m}" for m in mounts_under(daemon.state / "containers" / ctr_id)]
    for path in (daemon.state / "containers" / ctr_id, daemon.root / "containers" / ctr_id,
                 memory_dir(cgroup)):
        if path.exists():
            traces.append(str(path))
    return traces


def test_state_machine_and_remove(
    fp: CriClient, shared_daemon: Daemon, pulled: TestImages, tmp_path: Path
) -> None:
    busybox = pulled.busybox.reference
    with a_pod(fp, tmp_path) as (pod_id, pod):
        running = start_container(fp, pod_id, pod, container_config(busybox, command=SLEEP))
        err = rpc_error(fp.StartContainer, pb.StartContainerRequest(container_id=running))
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION
        assert "running" in details(err)

        finished = start_container(fp, pod_id, pod, container_config(busybox, command=["true"]))
        exited(fp, finished)
        err = rpc_error(exec_sync, fp, finished, "true")
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION
        err = rpc_error(fp.StartContainer, pb.StartContainerRequest(container_id=finished))
        assert "exited" in details(err)

        created = create(fp, pod_id, pod, container_config(busybox, command=SLEEP))
        assert container_status(fp, created).state == pb.CONTAINER_CREATED
        # A container stopped before it started never ran: no started_at, and no grace period.
        never = create(fp, pod_id, pod, container_config(busybox, command=SLEEP))
        assert stop(fp, never, 5) < 3.0
        status = container_status(fp, never)
        assert status.state == pb.CONTAINER_EXITED
        assert status.started_at == 0 and status.finished_at > status.created_at
        err = rpc_error(fp.StartContainer, pb.StartContainerRequest(container_id=never))
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION
        for ctr in (created, running, finished):
            cgroup = verbose_info(fp, ctr)["cgroup"]
            if ctr != finished:  # made at start (one `runc run`): a created one has none yet
                assert memory_dir(cgroup).is_dir() == (ctr == running)
            fp.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr))
            # Gone at once from status and lists; its host traces are cleaned after the answer.
            err = rpc_error(container_status, fp, ctr)
            assert status_code(err) == grpc.StatusCode.NOT_FOUND
            listed = fp.ListContainers(pb.ListContainersRequest()).containers
            assert ctr not in {c.id for c in listed}
            wait_for(lambda: leftovers(shared_daemon, ctr, cgroup) == [],  # noqa: B023
                     what=f"the cleanup of {ctr[:12]}")
        fp.RemoveContainer(pb.RemoveContainerRequest(container_id="e" * 64))

        twin = container_config(busybox, command=SLEEP)
        first = create(fp, pod_id, pod, twin)
        err = rpc_error(create, fp, pod_id, pod, twin)
        assert status_code(err) == grpc.StatusCode.ALREADY_EXISTS
        assert first in details(err)

        impatient = container_config(busybox, command=SLEEP)
        err = rpc_error(create, fp, pod_id, pod, impatient, timeout=0.002)
        assert status_code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
        retried = create(fp, pod_id, pod, impatient)  # kubelet's retry, same metadata
        same = [c.id for c in fp.ListContainers(pb.ListContainersRequest()).containers
                if c.metadata.name == impatient.metadata.name]
        assert same == [retried]

        fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        err = rpc_error(create, fp, pod_id, pod, container_config(busybox, command=SLEEP))
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION


# --- ContainerStatus, ListContainers, UpdateContainerResources --------------------------------


def test_status_list_and_update(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    resources = pb.LinuxContainerResources(
        memory_limit_in_bytes=64 * 1024 * 1024, cpu_shares=512)
    with a_pod(fp, tmp_path) as (pod_id, pod):
        config = container_config(
            pulled.busybox.reference, command=SLEEP,
            labels={"app": "status", "tier": "a"}, annotations={"note": "kept"},
            mounts=[pb.Mount(container_path="/data", host_path=str(data), readonly=True)],
            linux=pb.LinuxContainerConfig(
                resources=resources,
                security_context=pb.LinuxContainerSecurityContext(
                    run_as_user=pb.Int64Value(value=1000), supplemental_groups=[4000])))
        ctr = start_container(fp, pod_id, pod, config)
        other = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["true"], labels={"app": "other"}))
        status = container_status(fp, ctr)
        assert status.state == pb.CONTAINER_RUNNING
        assert status.metadata == config.metadata
        assert status.image.image == pulled.busybox.reference
        assert status.image_ref == pulled.busybox.config_digest
        assert status.image_id == pulled.busybox.config_digest
        assert status.log_path == str(tmp_path / "logs" / config.log_path)
        assert list(status.mounts) == list(config.mounts)
        assert dict(status.labels) == {"app": "status", "tier": "a"}
        assert dict(status.annotations) == {"note": "kept"}
        assert (status.user.linux.uid, status.user.linux.gid) == (1000, 1000)
        assert {1000, 5000, 4000} <= set(status.user.linux.supplemental_groups)
        assert status.resources.linux.memory_limit_in_bytes == 64 * 1024 * 1024
        assert status.resources.linux.cpu_shares == 512
        info = verbose_info(fp, ctr)
        wait_for_command(int(info["pid"]), b"sleep\x001000\x00")

        def listed(**fields: Any) -> list[str]:
            response = fp.ListContainers(pb.ListContainersRequest(
                filter=pb.ContainerFilter(**fields)))
            return sorted(c.id for c in response.containers)

        exited(fp, other)
        assert listed(id=ctr[:12]) == [ctr]
        assert listed(pod_sandbox_id=pod_id) == sorted([ctr, other])
        assert listed(pod_sandbox_id=pod_id, state=pb.ContainerStateValue(
            state=pb.CONTAINER_EXITED)) == [other]
        assert listed(pod_sandbox_id=pod_id, state=pb.ContainerStateValue(
            state=pb.CONTAINER_RUNNING)) == [ctr]
        assert listed(label_selector={"app": "status", "tier": "a"}) == [ctr]
        assert listed(label_selector={"app": "status", "tier": "b"}) == []
        assert listed(pod_sandbox_id="0" * 64) == []

        limit = memory_limit_file(info["cgroup"])
        assert int(limit.read_text()) == 64 * 1024 * 1024
        fp.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=ctr, linux=pb.LinuxContainerResources(
                memory_limit_in_bytes=32 * 1024 * 1024, cpu_shares=512)))
        assert int(limit.read_text()) == 32 * 1024 * 1024
        assert container_status(fp, ctr).resources.linux.memory_limit_in_bytes == 32 << 20


def test_a_missing_command_fails_the_start(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    """Made at start (one `runc run`), as containerd makes its task: runc finds that the
    command does not exist at the start, which fails naming it, and the container is then
    exited with StartError, so kubelet shows it and makes a new one."""
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = create(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["/no/such/command"]))
        assert container_status(fp, ctr).state == pb.CONTAINER_CREATED
        err = rpc_error(fp.StartContainer, pb.StartContainerRequest(container_id=ctr))
        assert status_code(err) == grpc.StatusCode.FAILED_PRECONDITION
        assert "/no/such/command" in details(err)
        status = container_status(fp, ctr)
        assert (status.state, status.reason, status.exit_code) == (
            pb.CONTAINER_EXITED, "StartError", 128)
        fp.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr))


def test_update_between_create_and_start(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    """A created container is made at start (one `runc run`), so it has no cgroup to write
    yet: an update (kubelet's CPU manager sets the cpuset between create and start) goes
    into its spec, and the cgroup runc makes at start has it."""
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=512)
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = create(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=SLEEP,
            linux=pb.LinuxContainerConfig(resources=resources)))
        cgroup = verbose_info(fp, ctr)["cgroup"]
        assert not memory_dir(cgroup).exists()
        fp.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=ctr, linux=pb.LinuxContainerResources(memory_limit_in_bytes=32 << 20)))
        assert container_status(fp, ctr).resources.linux.memory_limit_in_bytes == 32 << 20
        fp.StartContainer(pb.StartContainerRequest(container_id=ctr))
        assert container_status(fp, ctr).state == pb.CONTAINER_RUNNING
        assert int(memory_limit_file(cgroup).read_text()) == 32 << 20
        # What the update left out stays as created.
        shares = cgroups.cgroup_dir(cgroup, "cpu")
        shares_file = shares / ("cpu.weight" if cgroups.is_unified_only() else "cpu.shares")
        if not cgroups.is_unified_only():
            assert int(shares_file.read_text()) == 512
        else:
            assert shares_file.exists()


# --- mounts ----------------------------------------------------------------------------------


def test_bind_mounts(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_text("from the host\n")
    link = tmp_path / "link"
    link.symlink_to(data)
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=SLEEP, mounts=[
                pb.Mount(container_path="/ro", host_path=str(data), readonly=True),
                pb.Mount(container_path="/linked", host_path=str(link)),
            ]))
        assert out(fp, ctr, "cat", "/ro/file") == "from the host"
        assert not succeeds(fp, ctr, "touch /ro/new")
        assert not (data / "new").exists()
        assert out(fp, ctr, "cat", "/linked/file") == "from the host"
        assert succeeds(fp, ctr, "touch /linked/through")
        assert (data / "through").exists()
        assert not (link / "through").is_symlink()

        missing = str(tmp_path / "not-there")
        err = rpc_error(create, fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=SLEEP,
            mounts=[pb.Mount(container_path="/gone", host_path=missing)]))
        assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert missing in details(err)
    assert os.path.islink(link)


def test_pid_pod_exit_leaves_no_orphans(
    fp: CriClient, shared_daemon: Daemon, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pid_pod(fp, tmp_path) as (pod_id, pod, shared):
        quitter = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", "sleep 1234 & sleep 0.3"],
            linux=shared))
        stopped = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", "sleep 1235 & wait"], linux=shared))
        cgroups = {ctr: verbose_info(fp, ctr)["cgroup"] for ctr in (quitter, stopped)}
        exited(fp, quitter)
        stop(fp, stopped, 5)
        for ctr, cgroup in cgroups.items():
            wait_for(lambda: not processes_in_cgroup(cgroup), timeout=5,  # noqa: B023
                     what=f"no process left in {ctr[:12]}'s cgroup")
            fp.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr))
            wait_for(lambda: leftovers(shared_daemon, ctr, cgroup) == [],  # noqa: B023
                     what=f"the cleanup of {ctr[:12]}")
        # Wherever they were, the orphaned sleeps are gone from the host.
        wait_for(lambda: not host_commands_with(b"sleep 1234", b"sleep 1235"), timeout=5,
                 what="the orphaned sleeps to be killed")


@pytest.mark.parametrize("pid", [pb.CONTAINER, pb.POD], ids=["own-pid-ns", "pod-pid-ns"])
def test_stop_now_kills_every_process_of_the_container(
    fp: CriClient, pulled: TestImages, tmp_path: Path, pid: int
) -> None:
    """StopContainer with timeout 0 is SIGKILL to everything in the container. The shim
    signals the init itself where that takes everything down (its own PID namespace: the
    kernel has killed the namespace before its init can be reaped, so nothing is left when
    the stop answers) and uses runc kill --all where it would not (the pod's namespace,
    whose init is the pause), then skips the leftovers kill at exit."""
    pod_linux = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pid_mode(pid)))
    with a_pod(fp, tmp_path, linux=pod_linux) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, container_config(
            pulled.busybox.reference, command=["sh", "-c", "sleep 1238 & sleep 1239 & wait"],
            linux=security(namespace_options=pid_mode(pid))))
        cgroup = verbose_info(fp, ctr)["cgroup"]
        sleeps = (b"sleep 1238", b"sleep 1239")
        wait_for(lambda: len([c for c in host_commands_with(*sleeps)
                              if c.startswith(b"sleep")]) == 2, what="both sleeps to run")
        stop(fp, ctr, 0)
        if pid == pb.CONTAINER:
            assert not host_commands_with(*sleeps)
        assert exited(fp, ctr).exit_code == 137
        # Bounded generously: a SIGKILLed process is gone once the kernel has torn it down.
        wait_for(lambda: not processes_in_cgroup(cgroup), timeout=5,
                 what="no process left in the container's cgroup")
        assert not host_commands_with(*sleeps)
