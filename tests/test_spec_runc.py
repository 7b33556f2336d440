"""Specs run by real runc: a pause owning the pod's namespaces, peers joining the pinned files."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cri_api import api_pb2 as pb
from sandbox import cgroups, spec, users
from sandbox.spec import SandboxPaths, SpecDefaults

RUNC = "/usr/sbin/runc"
APPLETS = ("sh", "echo", "id", "ping", "unshare", "mount", "touch", "cat", "hostname", "sleep")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nflat:x:1000:1000::/home/flat:/bin/sh\n"
GROUP = "root:x:0:\nflat:x:1000:\nextra:x:2000:flat\n"
_counter = itertools.count()

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(RUNC).exists(), reason="needs root and runc"
)


def busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "mnt").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


@dataclass
class Pod:
    name: str
    tmp: Path
    config: pb.PodSandboxConfig
    paths: SandboxPaths
    cgroup: str
    rootfs: Path


def _pin(pid: int, kind: str, target: Path) -> Path:
    target.touch()
    run("mount", "--bind", f"/proc/{pid}/ns/{kind}", str(target))
    return target


@contextlib.contextmanager
def running_pod(tmp: Path) -> Iterator[Pod]:
    """netns + pause (by runc, from build_pause_spec) + pinned ipc/uts/pid files, all undone."""
    name = f"fpt-spec-{os.getpid()}-{next(_counter)}"
    pod_cg = f"/{name}"
    pause_id = f"{name}-pause"
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="p", uid="u", namespace="n"), hostname="fpt-pod"
    )
    pinned: list[Path] = []
    netns_made = False
    try:
        run("ip", "netns", "add", name)
        netns_made = True
        run("ip", "-n", name, "link", "set", "lo", "up")
        cgroups.create(pod_cg)
        pause_root = tmp / "pause-rootfs"
        pause_root.mkdir()
        shutil.copy("/usr/bin/catatonit", pause_root / "catatonit")
        shm = tmp / "shm"
        shm.mkdir()
        pause = spec.build_pause_spec(
            config,
            rootfs=pause_root,
            netns_path=Path("/run/netns") / name,
            cgroups_path=f"{pod_cg}/{pause_id}",
            oom_score_adj_floor=spec.daemon_oom_score_adj(),
            shm_path=shm,
        )
        bundle = tmp / "pause"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(pause))
        # The pause keeps its stdio: give it a file, not a pipe we would wait on forever.
        with (tmp / "pause.log").open("w") as log:
            subprocess.run(
                [RUNC, "run", "-d", "--bundle", str(bundle), pause_id],
                check=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60,
            )  # fmt: skip
        pid = json.loads(run(RUNC, "state", pause_id).stdout)["pid"]
        ns_dir = tmp / "ns"
        ns_dir.mkdir()
        for kind in ("ipc", "uts", "pid"):
            pinned.append(_pin(pid, kind, ns_dir / kind))
        for fname, text in (("hostname", "fpt-pod\n"), ("resolv.conf", ""), ("hosts", "")):
            (tmp / fname).write_text(text)
        paths = SandboxPaths(
            netns=Path("/run/netns") / name,
            ipc=ns_dir / "ipc",
            uts=ns_dir / "uts",
            pid=ns_dir / "pid",
            hostname=tmp / "hostname",
            resolv_conf=tmp / "resolv.conf",
            shm=shm,
            hosts=tmp / "hosts",
        )
        yield Pod(name, tmp, config, paths, pod_cg, busybox_rootfs(tmp / "rootfs"))
    finally:
        run(RUNC, "delete", "-f", pause_id, check=False)
        for p in pinned:
            run("umount", str(p), check=False)
        if netns_made:
            run("ip", "netns", "del", name, check=False)
        cgroups.remove(pod_cg)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    with running_pod(tmp_path) as p:
        yield p


def run_container(
    pod: Pod, ctr: pb.ContainerConfig, image: dict[str, Any] | None = None
) -> tuple[int, str]:
    """runc run (foreground) of `ctr` in `pod`; returns (exit code, stdout+stderr)."""
    cid = f"{pod.name}-c{next(_counter)}"
    s = spec.build_container_spec(
        pod.config,
        ctr,
        image or {},
        rootfs=pod.rootfs,
        sandbox=pod.paths,
        cgroups_path=f"{pod.cgroup}/{cid}",
        target_pid_ns=None,
        rootfs_users=users.UserDb.from_rootfs(pod.rootfs),
        oom_score_adj_floor=spec.daemon_oom_score_adj(),
        defaults=SpecDefaults(),
    )
    bundle = pod.tmp / cid
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(s))
    try:
        p = subprocess.run(
            [RUNC, "run", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return p.returncode, p.stdout + p.stderr
    finally:
        run(RUNC, "delete", "-f", cid, check=False)


def sh(script: str, sc: pb.LinuxContainerSecurityContext | None = None, **kw: Any
       ) -> pb.ContainerConfig:  # fmt: skip
    linux = pb.LinuxContainerConfig(security_context=sc or pb.LinuxContainerSecurityContext())
    if "resources" in kw:
        linux.resources.CopyFrom(kw.pop("resources"))
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), command=["/bin/sh", "-c", script], linux=linux,
        **kw,
    )  # fmt: skip


RUNTIME_DEFAULT = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
UNCONFINED = pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)


def test_container_joins_pod_namespaces(pod: Pod) -> None:
    rc, out = run_container(pod, sh("echo hello; hostname; cat /etc/hostname"))
    assert rc == 0, out
    assert out.split() == ["hello", "fpt-pod", "fpt-pod"]


def test_pid_pod_shares_pause_pid_namespace(pod: Pod) -> None:
    rc, out = run_container(pod, sh("cat /proc/1/cmdline; echo; echo $$"))
    assert rc == 0, out
    lines = out.split()
    assert lines[0].startswith("/catatonit") and lines[1] != "1"


def test_runtime_default_seccomp_blocks_unshare(pod: Pod) -> None:
    script = "echo ok; unshare -U true && echo unshared"
    _, out = run_container(pod, sh(script, pb.LinuxContainerSecurityContext(seccomp=UNCONFINED)))
    assert "unshared" in out, out  # without seccomp, a user namespace is allowed
    sc = pb.LinuxContainerSecurityContext(seccomp=RUNTIME_DEFAULT)
    _, out = run_container(pod, sh(script, sc))
    assert "ok" in out and "unshared" not in out, out
    assert "Operation not permitted" in out


def test_runtime_default_seccomp_with_sys_admin_allows_mount(pod: Pod) -> None:
    caps = pb.Capability(add_capabilities=["SYS_ADMIN"])
    sc = pb.LinuxContainerSecurityContext(seccomp=RUNTIME_DEFAULT, capabilities=caps)
    rc, out = run_container(pod, sh("mount -t tmpfs t /mnt && echo mounted", sc))
    assert "mounted" in out, out
    sc = pb.LinuxContainerSecurityContext(seccomp=RUNTIME_DEFAULT)
    rc, out = run_container(pod, sh("mount -t tmpfs t /mnt && echo mounted", sc))
    assert rc != 0 and "mounted" not in out, out


def test_dropping_net_raw_breaks_ping(pod: Pod) -> None:
    rc, out = run_container(pod, sh("ping -c1 -W2 127.0.0.1"))
    assert rc == 0, out
    sc = pb.LinuxContainerSecurityContext(capabilities=pb.Capability(drop_capabilities=["NET_RAW"]))
    rc, out = run_container(pod, sh("ping -c1 -W2 127.0.0.1", sc))
    assert rc != 0, out


def test_readonly_rootfs_refuses_writes(pod: Pod) -> None:
    rc, out = run_container(pod, sh("touch /x && echo wrote"))
    assert rc == 0 and "wrote" in out, out
    (pod.rootfs / "x").unlink()
    sc = pb.LinuxContainerSecurityContext(readonly_rootfs=True)
    rc, out = run_container(pod, sh("touch /x && echo wrote", sc))
    assert rc != 0 and "wrote" not in out, out
    assert "Read-only file system" in out


def test_run_as_user_and_groups(pod: Pod) -> None:
    sc = pb.LinuxContainerSecurityContext(
        run_as_user=pb.Int64Value(value=1000), supplemental_groups=[3000]
    )
    rc, out = run_container(pod, sh("id -u; id -g; id -G", sc))
    assert rc == 0, out
    uid, gid, *groups = out.split()
    assert (uid, gid) == ("1000", "1000") and set(groups) == {"1000", "2000", "3000"}


def test_memory_limit_in_cgroup(pod: Pod) -> None:
    res = pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=256)
    if cgroups.is_unified_only():  # where /proc/self/cgroup says
        script = ('d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); '
                  'cat $d/memory.max $d/cpu.weight')
        shares = str(cgroups.shares_to_weight(256))
    else:
        script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.shares"
        shares = "256"
    rc, out = run_container(pod, sh(script, resources=res))
    assert rc == 0, out
    assert out.split() == [str(64 << 20), shares]
