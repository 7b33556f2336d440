"""Pod user namespaces (critest's "Security Context UserNamespaces" specs) against real runc.

Mode POD: flatpod makes the pod's user namespace (and the pod's netns inside it), pins it as
pods/<id>/ns/user, the pause and every container join it, and the container's rootfs layers
are idmapped with it. Mode NODE: no user namespace. CONTAINER, TARGET, several mappings, or
container ID 0 unmapped: INVALID_ARGUMENT before anything touches the host.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox import mounts
from sandbox.spec import (
    SandboxPaths,
    SpecDefaults,
    SpecError,
    build_container_spec,
    build_pause_spec,
    pod_userns,
)
from sandbox.users import UserDb
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import (
    cleaned_up,
    container_config,
    container_status,
    mounts_under,
    pod_config,
    wait_for,
)
from tests.support.plugin import TestImages

MAPPING = [pb.IDMapping(container_id=0, host_id=1000, length=100000)]  # critest's default


def userns_options(mode: pb.NamespaceMode, uids: list[pb.IDMapping] | None = None,
                   gids: list[pb.IDMapping] | None = None) -> pb.NamespaceOption:
    return pb.NamespaceOption(userns_options=pb.UserNamespace(
        mode=mode, uids=uids or [], gids=gids if gids is not None else uids or []))


def userns_pod(tmp_path: Path, opts: pb.NamespaceOption,
               sysctls: dict[str, str] | None = None) -> pb.PodSandboxConfig:
    return pod_config(log_dir=tmp_path / "logs", linux=pb.LinuxPodSandboxConfig(
        sysctls=sysctls or {},
        security_context=pb.LinuxSandboxSecurityContext(namespace_options=opts)))


@contextmanager
def running(fp: CriClient, config: pb.PodSandboxConfig) -> Iterator[str]:
    pod_id = fp.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    try:
        yield pod_id
    finally:
        fp.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        fp.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        cleaned_up(pod_id)


def run_to_exit(fp: CriClient, pod_id: str, pod: pb.PodSandboxConfig, image: str,
                script: str, tmp_path: Path) -> str:
    """Runs `sh -c script` in a container with the pod's namespace options (as critest's
    runUserNamespaceContainer); returns its log's text after a clean exit."""
    config = container_config(image, command=["sh", "-c", script], linux=pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pod.linux.security_context.namespace_options)))
    ctr_id = fp.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod)).container_id
    fp.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
    status = wait_for(lambda: (s := container_status(fp, ctr_id)).state == pb.CONTAINER_EXITED
                      and s, what="the container's exit")
    text = (tmp_path / "logs" / config.log_path).read_text()
    assert status.exit_code == 0, text
    return "".join(line.split(" ", 3)[3] + "\n" for line in text.splitlines())  # CRI log lines


# --- through the daemon, against real runc ---------------------------------------------------


def test_status_reports_user_namespaces(fp: CriClient) -> None:
    handlers = fp.Status(pb.StatusRequest()).runtime_handlers
    assert [h.name for h in handlers] == ["", "runc"]  # the default, under both its names
    for handler in handlers:  # kernel 6.18, ext4: idmapped mounts work
        assert handler.features.user_namespaces, handler.name


def test_pod_mode_maps_ids(fp: CriClient, pulled: TestImages, shared_daemon: Daemon,
                           tmp_path: Path) -> None:
    """critest "runtime should support NamespaceMode_POD", and what it rests on: the netns
    belongs to the pod's user namespace (net.* sysctls apply, /sys mounts, the pod has its IP),
    the rootfs is the pod root's own (idmapped), and every pin is gone after removal."""
    pod = userns_pod(tmp_path, userns_options(pb.POD, MAPPING),
                     sysctls={"net.ipv4.ip_unprivileged_port_start": "80"})
    with running(fp, pod) as pod_id:
        pod_dir = shared_daemon.state / "pods" / pod_id
        pin = pod_dir / "ns" / "user"
        status = fp.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert status.network.ip
        out = run_to_exit(fp, pod_id, pod, pulled.busybox.reference, (
            "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c 'owner %u' /bin/sh;"
            " touch /etc/written && echo wrote; cat /proc/sys/net/ipv4/ip_unprivileged_port_start;"
            " ls /sys/class/net; readlink /proc/self/ns/user"), tmp_path)
        assert re.search(r"\s+0\s+1000\s+100000\n\s+0\s+1000\s+100000\n0\n", out), out
        assert "owner 0\nwrote\n80\n" in out and "eth0" in out.split(), out
        # The container's user namespace is the pinned one.
        assert out.split()[-1] == f"user:[{os.stat(pin).st_ino}]"
        # The image's files are the pod root's through the idmapped layers; on the host, what
        # the container wrote belongs to host uid 1000, the pod's root.
        written = next(shared_daemon.root.glob("containers/*/upper/etc/written"))
        assert (written.stat().st_uid, written.stat().st_gid) == (1000, 1000)
        assert (pod_dir / "hostname").stat().st_uid == 1000
        # The idmapped layers were attached only while the overlay was mounted.
        assert not list(shared_daemon.state.glob("containers/*/.rootfs.layers"))
        assert [m for m in mounts_under(shared_daemon.state) if "/.rootfs.layers/" in m] == []
    assert not pin.exists() and not pod_dir.exists()


@contextmanager
def noexec_run() -> Iterator[Path]:
    """A tmpfs mounted as Debian's initramfs mounts /run (nosuid, nodev, noexec, 0755)."""
    where = Path(tempfile.mkdtemp(prefix="", dir="/run"))  # short: the state dir goes in
    try:
        mounts.mount_tmpfs(where, 16 << 20, mode=0o755)
        yield where
    finally:
        mounts.unmount(where)
        where.rmdir()


def test_pod_mode_with_the_state_dir_on_a_noexec_mount(test_images: TestImages,
                                                       tmp_path: Path) -> None:
    """Debian 12's /run is noexec. The pause's rootfs is a plain dir in the state dir: runc
    bind-mounts it as the pod's root, and from inside a user namespace cannot clear the
    noexec it inherits ("exec /catatonit: permission denied"). The pod gets a mount of it
    of its own that allows exec."""
    with noexec_run() as run, running_daemon(tmp_path, state_parent=run) as daemon:
        cri = daemon.client()
        try:
            cri.PullImage(pb.PullImageRequest(
                image=pb.ImageSpec(image=test_images.busybox.reference)))
            pod = userns_pod(tmp_path, userns_options(pb.POD, MAPPING))
            with running(cri, pod) as pod_id:
                out = run_to_exit(cri, pod_id, pod, test_images.busybox.reference,
                                  "id -u; cat /proc/self/uid_map", tmp_path)
                assert out.split()[:4] == ["0", "0", "1000", "100000"], out
        finally:
            cri.close()
        assert mounts_under(daemon.state) == []


def test_exec_joins_the_pod_userns(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    """runc exec enters the container's user namespace before the others it belongs to."""
    opts = userns_options(pb.POD, MAPPING)
    pod = userns_pod(tmp_path, opts)
    with running(fp, pod) as pod_id:
        config = container_config(pulled.busybox.reference, command=["sleep", "1000"],
                                  linux=pb.LinuxContainerConfig(
                                      security_context=pb.LinuxContainerSecurityContext(
                                          namespace_options=opts)))
        ctr_id = fp.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod)).container_id
        fp.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
        reply = fp.ExecSync(pb.ExecSyncRequest(
            container_id=ctr_id, cmd=["sh", "-c", "cat /proc/self/uid_map; id -u"], timeout=10))
        assert reply.exit_code == 0, reply.stderr
        assert reply.stdout.split() == [b"0", b"1000", b"100000", b"0"]


def test_node_mode_has_no_userns(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    """critest "runtime should support NamespaceMode_NODE": the host's mapping inside."""
    pod = userns_pod(tmp_path, userns_options(pb.NODE))
    with running(fp, pod) as pod_id:
        out = run_to_exit(fp, pod_id, pod, pulled.busybox.reference,
                          "cat /proc/self/uid_map; readlink /proc/self/ns/user", tmp_path)
    host = Path("/proc/self/uid_map").read_text().split()
    assert out.split()[:3] == host
    assert out.split()[3] == os.readlink("/proc/self/ns/user")


FAILURES = {
    "more than one mapping": userns_options(
        pb.POD, [*MAPPING, pb.IDMapping(container_id=0, host_id=2000, length=100000)]),
    "container ID 0 not mapped": userns_options(
        pb.POD, [pb.IDMapping(container_id=1, host_id=1000, length=100000)]),
    "mode CONTAINER": userns_options(pb.CONTAINER),
    "mode TARGET": userns_options(pb.TARGET),
    "mode POD without mappings": userns_options(pb.POD),
    "host network": pb.NamespaceOption(network=pb.NODE, userns_options=pb.UserNamespace(
        mode=pb.POD, uids=MAPPING, gids=MAPPING)),
}


@pytest.mark.parametrize("case", FAILURES)
def test_invalid_userns_options_fail(fp: CriClient, tmp_path: Path, case: str) -> None:
    """critest's four failure specs (and two more): INVALID_ARGUMENT naming the field, and no
    pod left behind."""
    before = fp.ListPodSandbox(pb.ListPodSandboxRequest()).items
    with pytest.raises(grpc.RpcError) as err:
        fp.RunPodSandbox(pb.RunPodSandboxRequest(config=userns_pod(tmp_path, FAILURES[case])))
    assert status_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "namespace_options." in str(err.value.details())
    assert fp.ListPodSandbox(pb.ListPodSandboxRequest()).items == before


# --- the specs flatpod hands runc -------------------------------------------------------------


def _pod(opts: pb.NamespaceOption) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        linux=pb.LinuxPodSandboxConfig(
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=opts)))


def test_pause_spec_joins_the_pinned_userns_first(tmp_path: Path) -> None:
    pin = tmp_path / "ns" / "user"
    spec = build_pause_spec(
        _pod(userns_options(pb.POD, MAPPING)), rootfs=tmp_path, netns_path=Path("/run/netns/x"),
        cgroups_path="/x", userns_path=pin)
    assert spec["linux"]["namespaces"][0] == {"type": "user", "path": str(pin)}
    assert spec["linux"]["namespaces"][2] == {"type": "network", "path": "/run/netns/x"}
    want = [{"containerID": 0, "hostID": 1000, "size": 100000}]
    assert spec["linux"]["uidMappings"] == want and spec["linux"]["gidMappings"] == want
    with pytest.raises(SpecError, match="userns_path"):
        build_pause_spec(_pod(userns_options(pb.POD, MAPPING)), rootfs=tmp_path,
                         netns_path=Path("/run/netns/x"), cgroups_path="/x")


def _container_spec(tmp_path: Path, pod_opts: pb.NamespaceOption, ctr_opts: pb.NamespaceOption,
                    run_as: int | None = None) -> dict[str, object]:
    for name in ("hostname", "resolv.conf", "hosts"):
        (tmp_path / name).write_text("x\n")
    sandbox = SandboxPaths(
        netns=Path("/run/netns/x"), ipc=tmp_path / "ipc", uts=tmp_path / "uts",
        pid=tmp_path / "pid", hostname=tmp_path / "hostname",
        resolv_conf=tmp_path / "resolv.conf", shm=None, hosts=tmp_path / "hosts",
        user=tmp_path / "user" if pod_userns(_pod(pod_opts).linux.security_context) else None)
    sc = pb.LinuxContainerSecurityContext(namespace_options=ctr_opts)
    if run_as is not None:
        sc.run_as_user.value = run_as
    ctr = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"), command=["sh"],
                             linux=pb.LinuxContainerConfig(security_context=sc))
    return build_container_spec(
        _pod(pod_opts), ctr, {}, rootfs=tmp_path, sandbox=sandbox, cgroups_path="/x",
        target_pid_ns=None, rootfs_users=UserDb((), ()), oom_score_adj_floor=-1000,
        defaults=SpecDefaults())


def test_container_spec_joins_the_pod_userns(tmp_path: Path) -> None:
    opts = userns_options(pb.POD, MAPPING)
    spec = _container_spec(tmp_path, opts, opts)
    linux = spec["linux"]
    assert isinstance(linux, dict)
    assert linux["namespaces"][0] == {"type": "user", "path": str(tmp_path / "user")}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 100000}]
    # No userns_options on the container: it follows the pod, as for the network.
    assert _container_spec(tmp_path, opts, pb.NamespaceOption())["linux"] == linux


@pytest.mark.parametrize(("ctr_opts", "run_as", "message"), [
    (userns_options(pb.NODE), None, "differs from the pod"),
    (userns_options(pb.CONTAINER), None, "CONTAINER is not supported"),
    (userns_options(pb.POD, [pb.IDMapping(container_id=0, host_id=5000, length=100000)]), None,
     "mappings differ"),
    (userns_options(pb.POD, MAPPING), 100000, "uid 100000 is not mapped"),
])
def test_container_userns_must_match_the_pod(tmp_path: Path, ctr_opts: pb.NamespaceOption,
                                             run_as: int | None, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _container_spec(tmp_path, userns_options(pb.POD, MAPPING), ctr_opts, run_as)
