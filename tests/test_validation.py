"""Configs are hostile: a battery of invalid requests, each answered INVALID_ARGUMENT naming
the field, before anything touches the host (no pod, container, mount or cgroup is left),
and a daemon that keeps serving. Unknown enum values fail closed; a container cannot widen
its pod's namespaces; UpdateContainerResources checks the same ranges as CreateContainer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox import validate
from tests.cri import CriClient, status_code
from tests.daemon import Daemon
from tests.pods import a_pod, container_config, mounts_under, pod_config, start_container
from tests.support.oci import ImageConfig, ImageDef, build_image, busybox_layer
from tests.support.plugin import TestImages, push_definition
from tests.support.registry import Registry

PodEdit = Callable[[pb.PodSandboxConfig], None]
CtrEdit = Callable[[pb.ContainerConfig], None]
UNKNOWN = 99  # no CRI enum has this value


def _pod_sc(c: pb.PodSandboxConfig) -> pb.LinuxSandboxSecurityContext:
    return c.linux.security_context


def _ctr_sc(c: pb.ContainerConfig) -> pb.LinuxContainerSecurityContext:
    return c.linux.security_context


def _set(obj: object, **values: object) -> None:
    for name, value in values.items():
        setattr(obj, name, value)


BAD_PODS: dict[str, tuple[PodEdit, str]] = {
    "unknown pid mode": (lambda c: _set(_pod_sc(c).namespace_options, pid=UNKNOWN),
                         "namespace_options.pid"),
    "TARGET pid for a pod": (lambda c: _set(_pod_sc(c).namespace_options, pid=pb.TARGET),
                             "namespace_options.pid"),
    "unknown ipc mode": (lambda c: _set(_pod_sc(c).namespace_options, ipc=UNKNOWN),
                         "namespace_options.ipc"),
    "unknown network mode": (lambda c: _set(_pod_sc(c).namespace_options, network=UNKNOWN),
                             "namespace_options.network"),
    "unknown groups policy": (lambda c: _set(_pod_sc(c), supplemental_groups_policy=UNKNOWN),
                              "supplemental_groups_policy"),
    "unknown seccomp type": (lambda c: _set(_pod_sc(c).seccomp, profile_type=UNKNOWN),
                             "seccomp.profile_type"),
    "relative seccomp ref": (
        lambda c: _set(_pod_sc(c).seccomp, profile_type=pb.SecurityProfile.Localhost,
                       localhost_ref="profile.json"), "seccomp.localhost_ref"),
    "unknown apparmor type": (lambda c: _set(_pod_sc(c).apparmor, profile_type=UNKNOWN),
                              "apparmor.profile_type"),
    "localhost apparmor": (
        lambda c: _set(_pod_sc(c).apparmor, profile_type=pb.SecurityProfile.Localhost,
                       localhost_ref="/etc/apparmor.d/x"), "apparmor"),
    "unknown protocol": (
        lambda c: c.port_mappings.add(protocol=UNKNOWN, container_port=80, host_port=0),
        "port_mappings[0].protocol"),
    "negative run_as_user": (lambda c: _pod_sc(c).run_as_user.__setattr__("value", -1),
                             "run_as_user"),
    "huge supplemental group": (lambda c: _pod_sc(c).supplemental_groups.append(2**40),
                                "supplemental_groups"),
    "negative cpu_shares": (lambda c: _set(c.linux.resources, cpu_shares=-5),
                            "resources.cpu_shares"),
    "absurd cpu_period": (lambda c: _set(c.linux.resources, cpu_period=10**9),
                          "resources.cpu_period"),
    "negative overhead memory": (lambda c: _set(c.linux.overhead, memory_limit_in_bytes=-1),
                                 "overhead.memory_limit_in_bytes"),
    "oversized annotations": (
        lambda c: c.annotations.update({f"k{i}": "v" * 1000 for i in range(300)}),
        "annotations"),
    "oversized labels": (
        lambda c: c.labels.update({f"k{i}": "v" * 1000 for i in range(300)}), "labels"),
}


def _resources(**values: object) -> CtrEdit:
    return lambda c: c.linux.resources.MergeFrom(pb.LinuxContainerResources(**values))


BAD_RESOURCES: dict[str, tuple[dict[str, object], str]] = {
    "negative cpu_shares": ({"cpu_shares": -1}, "cpu_shares"),
    "cpu_shares above the kernel's": ({"cpu_shares": 10**6}, "cpu_shares"),
    "negative cpu_quota": ({"cpu_quota": -7}, "cpu_quota"),
    "cpu_quota below 1 ms": ({"cpu_quota": 10}, "cpu_quota"),
    "negative cpu_period": ({"cpu_period": -100000}, "cpu_period"),
    "negative memory": ({"memory_limit_in_bytes": -(2**40)}, "memory_limit_in_bytes"),
    "swap below memory": ({"memory_limit_in_bytes": 2**30, "memory_swap_limit_in_bytes": 2**20},
                          "memory_swap_limit_in_bytes"),
    "oom_score_adj below -1000": ({"oom_score_adj": -1001}, "oom_score_adj"),
    "oom_score_adj above 1000": ({"oom_score_adj": 5000}, "oom_score_adj"),
    "cpuset syntax": ({"cpuset_cpus": "0-1,x"}, "cpuset_cpus"),
    "cpuset reversed": ({"cpuset_cpus": "3-1"}, "cpuset_cpus"),
    "cpuset absent cpu": ({"cpuset_cpus": "4000"}, "cpuset_cpus"),
    "cpuset mems syntax": ({"cpuset_mems": "-1"}, "cpuset_mems"),
    "hugepage size": ({"hugepage_limits": [pb.HugepageLimit(page_size="3XB", limit=1)]},
                      "hugepage_limits[0].page_size"),
}

BAD_CONTAINERS: dict[str, tuple[CtrEdit, str]] = {
    **{f"resources: {k}": (_resources(**v), f"linux.resources.{f.split('[')[0]}")
       for k, (v, f) in BAD_RESOURCES.items()},
    "unknown pid mode": (lambda c: _set(_ctr_sc(c).namespace_options, pid=UNKNOWN),
                         "namespace_options.pid"),
    "TARGET without target_id": (lambda c: _set(_ctr_sc(c).namespace_options, pid=pb.TARGET),
                                 "namespace_options.target_id"),
    "TARGET ipc": (lambda c: _set(_ctr_sc(c).namespace_options, ipc=pb.TARGET),
                   "namespace_options.ipc"),
    "host ipc in a pod with its own": (
        lambda c: _set(_ctr_sc(c).namespace_options, ipc=pb.NODE), "namespace_options.ipc"),
    "host pid in a pod with its own": (
        lambda c: _set(_ctr_sc(c).namespace_options, pid=pb.NODE), "namespace_options.pid"),
    "host network in a pod with its own": (
        lambda c: _set(_ctr_sc(c).namespace_options, network=pb.NODE),
        "namespace_options.network"),
    "unknown groups policy": (lambda c: _set(_ctr_sc(c), supplemental_groups_policy=7),
                              "supplemental_groups_policy"),
    "unknown seccomp type": (lambda c: _set(_ctr_sc(c).seccomp, profile_type=UNKNOWN),
                             "seccomp.profile_type"),
    "unknown apparmor type": (lambda c: _set(_ctr_sc(c).apparmor, profile_type=UNKNOWN),
                              "apparmor.profile_type"),
    "unknown legacy apparmor": (lambda c: _set(_ctr_sc(c), apparmor_profile="bogus"),
                                "apparmor"),
    "unknown capability": (lambda c: _ctr_sc(c).capabilities.add_capabilities.append("CAP_NOPE"),
                           "capabilities.add_capabilities"),
    "unknown propagation": (
        lambda c: c.mounts.add(container_path="/mnt", host_path="/tmp", propagation=UNKNOWN),
        "mounts[0].propagation"),
    "unknown stop_signal": (lambda c: _set(c, stop_signal=UNKNOWN), "stop_signal"),
    "relative working_dir": (lambda c: _set(c, working_dir="tmp"), "working_dir"),
    "relative masked path": (lambda c: _ctr_sc(c).masked_paths.append("proc/kcore"),
                             "masked_paths"),
    "negative run_as_group": (lambda c: _ctr_sc(c).run_as_group.__setattr__("value", -3),
                              "run_as_group"),
    "argument over 128 KiB": (lambda c: c.args.append("a" * (validate.MAX_STRING_BYTES + 1)),
                              "args"),
    "arguments over 1 MiB": (lambda c: c.args.extend(["a" * 100_000] * 11), "command, args"),
    "too many arguments": (lambda c: c.args.extend(["a"] * (validate.MAX_LIST_ENTRIES + 1)),
                           "args"),
    "env over 1 MiB": (lambda c: [c.envs.add(key=f"K{i}", value="v" * 100_000)
                                  for i in range(11)], "envs"),
    "oversized annotations": (
        lambda c: c.annotations.update({f"k{i}": "v" * 1000 for i in range(300)}),
        "annotations"),
    "oversized labels": (
        lambda c: c.labels.update({f"k{i}": "v" * 1000 for i in range(300)}), "labels"),
}


def assert_invalid(call: Callable[[], object], field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert isinstance(err, grpc.RpcError)
    assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert field in (err.details() or ""), f"{field!r} not named in {err.details()!r}"


@pytest.fixture(scope="module")
def running(
    fp: CriClient, pulled: TestImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pb.PodSandboxConfig, str]]:
    """A pod with its own namespaces and a running container in it."""
    tmp = tmp_path_factory.mktemp("validation")
    with a_pod(fp, tmp) as (pod_id, pod):
        config = container_config(pulled.busybox.reference, command=["sleep", "3600"])
        ctr_id = start_container(fp, pod_id, pod, config)
        yield pod_id, pod, ctr_id


@pytest.mark.parametrize("case", list(BAD_PODS), ids=list(BAD_PODS))
def test_bad_pod_configs_are_invalid_arguments(
    fp: CriClient, shared_daemon: Daemon, tmp_path: Path, case: str
) -> None:
    edit, field = BAD_PODS[case]
    config = pod_config(log_dir=tmp_path / "logs")
    edit(config)
    pods_before = len(fp.ListPodSandbox(pb.ListPodSandboxRequest()).items)
    mounts_before = mounts_under(shared_daemon.state)
    assert_invalid(lambda: fp.RunPodSandbox(pb.RunPodSandboxRequest(config=config)), field)
    # Refused before anything touched the host.
    assert len(fp.ListPodSandbox(pb.ListPodSandboxRequest()).items) == pods_before
    assert mounts_under(shared_daemon.state) == mounts_before


@pytest.mark.parametrize("case", list(BAD_CONTAINERS), ids=list(BAD_CONTAINERS))
def test_bad_container_configs_are_invalid_arguments(
    fp: CriClient, pulled: TestImages, running: tuple[str, pb.PodSandboxConfig, str], case: str
) -> None:
    pod_id, pod, _ = running
    edit, field = BAD_CONTAINERS[case]
    config = container_config(pulled.busybox.reference, command=["true"])
    edit(config)
    before = len(fp.ListContainers(pb.ListContainersRequest()).containers)
    assert_invalid(lambda: fp.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod)), field)
    assert len(fp.ListContainers(pb.ListContainersRequest()).containers) == before


@pytest.mark.parametrize("case", list(BAD_RESOURCES), ids=list(BAD_RESOURCES))
def test_update_container_resources_checks_the_same_ranges(
    fp: CriClient, running: tuple[str, pb.PodSandboxConfig, str], case: str
) -> None:
    _, _, ctr_id = running
    values, field = BAD_RESOURCES[case]
    linux = pb.LinuxContainerResources(**values)  # type: ignore[arg-type]
    before = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id)).status.resources
    assert_invalid(lambda: fp.UpdateContainerResources(
        pb.UpdateContainerResourcesRequest(container_id=ctr_id, linux=linux)), f"linux.{field}")
    after = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id)).status.resources
    assert after == before


def test_update_pod_resources_checks_the_same_ranges(
    fp: CriClient, running: tuple[str, pb.PodSandboxConfig, str]
) -> None:
    pod_id, _, _ = running
    assert_invalid(lambda: fp.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, overhead=pb.LinuxContainerResources(cpu_quota=-9))),
        "overhead.cpu_quota")


def test_valid_update_still_applies(
    fp: CriClient, running: tuple[str, pb.PodSandboxConfig, str]
) -> None:
    """The checks refuse only what is out of range: kubelet's usual values pass."""
    _, _, ctr_id = running
    linux = pb.LinuxContainerResources(cpu_shares=2, cpu_period=100000, cpu_quota=-1,
                                       memory_limit_in_bytes=64 << 20, oom_score_adj=1000,
                                       cpuset_cpus="0")
    fp.UpdateContainerResources(pb.UpdateContainerResourcesRequest(container_id=ctr_id,
                                                                   linux=linux))
    status = fp.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr_id)).status
    assert status.resources.linux.memory_limit_in_bytes == 64 << 20


def test_target_pid_namespace_must_be_in_the_same_pod(
    fp: CriClient, pulled: TestImages, running: tuple[str, pb.PodSandboxConfig, str],
    tmp_path: Path
) -> None:
    _, _, other_pods_container = running
    with a_pod(fp, tmp_path) as (pod_id, pod):
        config = container_config(pulled.busybox.reference, command=["true"])
        opts = config.linux.security_context.namespace_options
        opts.pid, opts.target_id = pb.TARGET, other_pods_container
        assert_invalid(lambda: fp.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod)),
            "namespace_options.target_id")
        assert not fp.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers


def test_exec_sync_command_is_checked(
    fp: CriClient, running: tuple[str, pb.PodSandboxConfig, str]
) -> None:
    _, _, ctr_id = running
    assert_invalid(lambda: fp.ExecSync(pb.ExecSyncRequest(container_id=ctr_id, cmd=[])), "cmd")
    assert_invalid(lambda: fp.ExecSync(pb.ExecSyncRequest(
        container_id=ctr_id, cmd=["echo", "a\x00b"])), "cmd")
    # The streaming Exec checks the same way, before it hands out a URL.
    assert_invalid(lambda: fp.Exec(pb.ExecRequest(container_id=ctr_id, cmd=[])), "cmd")
    assert_invalid(lambda: fp.Exec(pb.ExecRequest(
        container_id=ctr_id, cmd=["echo", "x" * (2 << 20)])), "cmd")


def test_image_stop_signal_must_name_a_signal(
    fp: CriClient, registry: Registry, running: tuple[str, pb.PodSandboxConfig, str]
) -> None:
    """An image whose StopSignal names no signal is refused at CreateContainer (a stop would
    otherwise send some default the image's author did not ask for)."""
    pod_id, pod, _ = running
    image = build_image([busybox_layer()], ImageConfig(cmd=("sh",), stop_signal="SIGNOPE"))
    pushed = push_definition(registry.client(), ImageDef("bad-stop-signal", "latest", image, {}))
    fp.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=pushed.reference)))
    try:
        config = container_config(pushed.reference, command=["true"])
        assert_invalid(lambda: fp.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod)), "StopSignal")
    finally:
        fp.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=pushed.reference)))


@pytest.mark.parametrize(("text", "number"), [
    ("SIGTERM", 15), ("term", 15), ("9", 9), ("SIGRTMIN+3", validate.SIGRTMIN + 3),
    ("RTMAX-1", validate.SIGRTMAX - 1), ("SIGNOPE", None), ("0", None), ("65", None),
    ("SIGRTMIN+99", None), ("", None),
])
def test_parse_signal(text: str, number: int | None) -> None:
    assert validate.parse_signal(text) == number


def test_every_proto_signal_is_one_flatpod_can_send() -> None:
    config = pb.ContainerConfig()
    for value in pb.Signal.values():
        if value != pb.RUNTIME_DEFAULT:
            config.stop_signal = value
            name = validate.stop_signal(config, {})
            assert validate.parse_signal(name), name


def test_a_symlink_planted_in_the_log_directory_is_refused(
    fp: CriClient, pulled: TestImages, running: tuple[str, pb.PodSandboxConfig, str],
    tmp_path: Path
) -> None:
    """A link where a container's log goes (a tenant with the log directory in a hostPath
    volume could plant one) never turns the container's output onto a host file."""
    pod_id, pod, _ = running
    victim = tmp_path / "host-file"
    victim.write_text("host data\n")
    logs = Path(pod.log_directory)
    (logs / "planted.log").symlink_to(victim)
    (logs / "planted-dir").symlink_to(tmp_path)
    try:
        for log_path in ("planted.log", "planted-dir/host-file"):
            config = container_config(pulled.busybox.reference, command=["echo", "tenant"])
            config.log_path = log_path
            request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                                sandbox_config=pod)
            assert_invalid(lambda r=request: fp.CreateContainer(r), "log_path")
        assert victim.read_text() == "host data\n"
        assert not fp.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
            pod_sandbox_id=pod_id, state=pb.ContainerStateValue(state=pb.CONTAINER_CREATED),
        ))).containers
    finally:
        (logs / "planted.log").unlink()
        (logs / "planted-dir").unlink()
