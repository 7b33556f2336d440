"""critest's "Security Context" specs (security_context_linux.go) that the rest of the suite
does not cover yet, through the daemon: NoNewPrivs, RunAsGroup, SupplementalGroupsPolicy,
Privileged, capabilities ALL, seccomp (Localhost, Unconfined, RuntimeDefault, nil, the
deprecated seccomp_profile_path, privileged), MaskedPaths and ReadonlyPaths."""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_api import api_pb2 as pb
from tests.cri import CriClient, status_code
from tests.pods import (
    a_pod as any_pod,
)
from tests.pods import (
    container_config,
    container_status,
    create_error,
    exec_sync,
    start_container,
    stdout_of,
    wait_for,
)
from tests.support.images_extra import ExtraImages, push_extra_images
from tests.support.plugin import TestImages
from tests.support.registry import Registry

PAUSE = ["sleep", "1000"]
BLOCK_SETHOSTNAME = {"defaultAction": "SCMP_ACT_ALLOW",
                     "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}
BLOCK_CHMOD = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}
UNCONFINED = pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
RUNTIME_DEFAULT = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)


@pytest.fixture(scope="module")
def extra_images(fp: CriClient, registry: Registry) -> ExtraImages:
    """The extra images, pushed and pulled into the module's daemon."""
    pushed = push_extra_images(registry.client())
    for reference in (pushed.nnp, pushed.hardlinked):
        if reference:
            fp.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=reference)))
    return pushed


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Localhost seccomp profiles as absolute host paths, as critest writes them."""
    directory = tmp_path_factory.mktemp("seccomp-tests")
    written = {}
    for name, profile in (("block-host-name", BLOCK_SETHOSTNAME), ("block-chmod", BLOCK_CHMOD)):
        written[name] = directory / f"{name}.json"
        written[name].write_text(json.dumps(profile))
    return written


def a_pod(
    fp: CriClient, tmp_path: Path, privileged: bool = False
) -> AbstractContextManager[tuple[str, pb.PodSandboxConfig]]:
    return any_pod(fp, tmp_path, linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(privileged=privileged)))


def secured(image: str, command: list[str] | None = None, **context: Any) -> pb.ContainerConfig:
    return container_config(image, command=command or PAUSE, linux=pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(**context)))


def status_field(fp: CriClient, ctr_id: str, name: str) -> str:
    """A field of /proc/self/status inside the container, e.g. "Seccomp" or "CapBnd"."""
    match = re.search(rf"^{name}:\s*(\S+)$", stdout_of(fp, ctr_id, "cat", "/proc/self/status"),
                      re.MULTILINE)
    assert match, name
    return match.group(1)


def log_output(fp: CriClient, ctr_id: str) -> str:
    """What an exited container wrote to stdout, from its CRI log."""
    wait_for(lambda: container_status(fp, ctr_id).state == pb.CONTAINER_EXITED,
             what="the container to exit")
    lines = Path(container_status(fp, ctr_id).log_path).read_text().splitlines()
    return "".join(line.split(" ", 3)[3] + "\n" for line in lines if " stdout " in line)


# --- users and groups ------------------------------------------------------------------------


@pytest.mark.parametrize(("no_new_privs", "expected"), [(True, 1000), (False, 0)])
def test_no_new_privs(fp: CriClient, extra_images: ExtraImages, tmp_path: Path,
                      no_new_privs: bool, expected: int) -> None:
    if extra_images.nnp is None:
        pytest.skip("no gcc to build the setuid test binary")
    with a_pod(fp, tmp_path) as (pod_id, pod):
        config = container_config(extra_images.nnp, linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                no_new_privs=no_new_privs, run_as_user=pb.Int64Value(value=1000))))
        ctr = start_container(fp, pod_id, pod, config)
        assert log_output(fp, ctr) == f"Effective uid: {expected}\n"


def test_run_as_group(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, ["sh", "-c", "echo $(id -u):$(id -g)"],
            run_as_user=pb.Int64Value(value=1001), run_as_group=pb.Int64Value(value=1002)))
        assert log_output(fp, ctr) == "1001:1002\n"
        err = create_error(fp, pod_id, pod, secured(
            pulled.busybox.reference, run_as_group=pb.Int64Value(value=1002)))
        assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("policy", "groups"), [
    (pb.Merge, [1000, 1234, 5000]), (pb.Strict, [1000, 1234]),
], ids=["Merge", "Strict"])
def test_supplemental_groups_policy(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                    policy: int, groups: list[int]) -> None:
    """The image's user flat (1000) is also in group extra (5000) in its /etc/group."""
    assert fp.Status(pb.StatusRequest()).features.supplemental_groups_policy
    with a_pod(fp, tmp_path) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, secured(
            pulled.busybox_user.reference, run_as_user=pb.Int64Value(value=1000),
            supplemental_groups=[1234], supplemental_groups_policy=policy))
        assert stdout_of(fp, ctr, "id", "-G").split() == [str(g) for g in groups]
        user = container_status(fp, ctr).user.linux
        assert (user.uid, user.gid) == (1000, 1000)
        assert sorted(user.supplemental_groups) == groups


# --- privileges and capabilities -------------------------------------------------------------


def test_privileged_versus_default(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    host_devices = {p.name for p in Path("/dev").iterdir()}
    with a_pod(fp, tmp_path, privileged=True) as (pod_id, pod):
        privileged = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, privileged=True))
        default = start_container(fp, pod_id, pod, secured(pulled.busybox.reference))
        seen = set(stdout_of(fp, privileged, "ls", "-A", "/dev").split())
        assert "kmsg" in host_devices & seen
        assert "kmsg" not in stdout_of(fp, default, "ls", "-A", "/dev").split()
        assert exec_sync(fp, privileged, "brctl", "addbr", "foobar").exit_code == 0
        assert exec_sync(fp, default, "brctl", "addbr", "foobaz").exit_code != 0
        mount = "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m"
        assert exec_sync(fp, privileged, "sh", "-c", mount).exit_code == 0
        assert exec_sync(fp, default, "sh", "-c", mount).exit_code != 0


def test_capabilities_all_and_net_admin(fp: CriClient, pulled: TestImages,
                                        tmp_path: Path) -> None:
    with a_pod(fp, tmp_path) as (pod_id, pod):
        everything = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, capabilities=pb.Capability(add_capabilities=["ALL"])))
        nothing = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, capabilities=pb.Capability(drop_capabilities=["ALL"])))
        net_admin = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, capabilities=pb.Capability(add_capabilities=["NET_ADMIN"])))
        assert int(status_field(fp, everything, "CapBnd"), 16) != 0
        assert status_field(fp, nothing, "CapBnd") == "0000000000000000"
        assert exec_sync(fp, net_admin, "brctl", "addbr", "foobar").exit_code == 0


# --- seccomp ---------------------------------------------------------------------------------


def test_seccomp_mode_of_each_profile(fp: CriClient, pulled: TestImages, tmp_path: Path) -> None:
    """/proc/self/status Seccomp: 0 is none, 2 is a filter. No profile at all is unconfined."""
    busybox = pulled.busybox.reference
    cases: list[tuple[dict[str, Any], str]] = [
        ({"seccomp": UNCONFINED}, "0"),
        ({"seccomp": RUNTIME_DEFAULT}, "2"),
        ({}, "0"),
        ({"seccomp_profile_path": "runtime/default"}, "2"),
        ({"seccomp_profile_path": "unconfined"}, "0"),
    ]
    with a_pod(fp, tmp_path) as (pod_id, pod):
        for context, mode in cases:
            ctr = start_container(fp, pod_id, pod, secured(busybox, **context))
            assert status_field(fp, ctr, "Seccomp") == mode, context


def test_seccomp_localhost_profiles(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                    profiles: dict[str, Path]) -> None:
    busybox = pulled.busybox.reference
    block_hostname = str(profiles["block-host-name"])
    sys_admin = pb.Capability(add_capabilities=["SYS_ADMIN"])
    with a_pod(fp, tmp_path) as (pod_id, pod):
        no_chmod = start_container(fp, pod_id, pod, secured(busybox, seccomp=pb.SecurityProfile(
            profile_type=pb.SecurityProfile.Localhost,
            localhost_ref=str(profiles["block-chmod"]))))
        denied = exec_sync(fp, no_chmod, "chmod", "400", "/")
        assert denied.exit_code != 0
        assert b"Operation not permitted" in denied.stderr

        blocked = start_container(fp, pod_id, pod, secured(
            busybox, capabilities=sys_admin, seccomp=pb.SecurityProfile(
                profile_type=pb.SecurityProfile.Localhost, localhost_ref=block_hostname)))
        legacy = start_container(fp, pod_id, pod, secured(
            busybox, capabilities=sys_admin, seccomp_profile_path=f"localhost/{block_hostname}"))
        free = start_container(fp, pod_id, pod, secured(
            busybox, capabilities=sys_admin, seccomp=UNCONFINED))
        assert exec_sync(fp, blocked, "hostname", "ANewHostName").exit_code != 0
        assert exec_sync(fp, legacy, "hostname", "ANewHostName").exit_code != 0
        assert exec_sync(fp, free, "hostname", "ANewHostName").exit_code == 0

        missing = secured(busybox, seccomp=pb.SecurityProfile(
            profile_type=pb.SecurityProfile.Localhost, localhost_ref=str(tmp_path / "none")))
        create_error(fp, pod_id, pod, missing)


def test_privileged_ignores_seccomp(fp: CriClient, pulled: TestImages, tmp_path: Path,
                                    profiles: dict[str, Path]) -> None:
    with a_pod(fp, tmp_path, privileged=True) as (pod_id, pod):
        ctr = start_container(fp, pod_id, pod, secured(
            pulled.busybox.reference, privileged=True, seccomp=pb.SecurityProfile(
                profile_type=pb.SecurityProfile.Localhost,
                localhost_ref=str(profiles["block-host-name"]))))
        assert exec_sync(fp, ctr, "hostname", "ANewHostName").exit_code == 0
        assert status_field(fp, ctr, "Seccomp") == "0"


# --- masked and read-only paths --------------------------------------------------------------


def test_masked_and_readonly_paths(fp: CriClient, extra_images: ExtraImages,
                                   tmp_path: Path) -> None:
    busybox = extra_images.hardlinked
    with a_pod(fp, tmp_path, privileged=True) as (pod_id, pod):
        masked = start_container(fp, pod_id, pod, secured(busybox, masked_paths=["/bin/ls"]))
        # critest runs `ls`; this busybox's sh runs a bare applet name without exec, so the
        # path is given to make it exec the masked file.
        listing = exec_sync(fp, masked, "/bin/sh", "-c", "/bin/ls")
        assert listing.exit_code != 0
        assert listing.stderr == b"/bin/sh: /bin/ls: Permission denied\n"

        readonly = start_container(fp, pod_id, pod, secured(busybox, readonly_paths=["/tmp"]))
        touched = exec_sync(fp, readonly, "touch", "/tmp/test")
        assert touched.exit_code != 0
        assert touched.stderr == b"touch: /tmp/test: Read-only file system\n"

        # Empty lists mean the defaults (containerd's): /proc/timer_list and /sys/firmware
        # masked (this kernel has no /proc/kcore), /proc/sys read-only.
        default = start_container(fp, pod_id, pod, secured(busybox))
        assert stdout_of(fp, default, "cat", "/proc/timer_list") == ""
        assert stdout_of(fp, default, "ls", "-A", "/sys/firmware") == ""
        write_sysctl = "echo 1 > /proc/sys/kernel/shm_rmid_forced"
        assert exec_sync(fp, default, "sh", "-c", write_sysctl).exit_code != 0
        assert exec_sync(fp, masked, "sh", "-c", write_sysctl).exit_code != 0
        # A privileged container gets neither.
        privileged = start_container(fp, pod_id, pod, secured(busybox, privileged=True))
        assert stdout_of(fp, privileged, "cat", "/proc/timer_list") != ""
        assert exec_sync(fp, privileged, "sh", "-c", write_sysctl).exit_code == 0


def test_seccomp_localhost_includes_and_excludes(fp: CriClient, pulled: TestImages,
                                                 tmp_path: Path) -> None:
    """A moby-format Localhost profile whose rules hinge on capabilities, as containerd and
    CRI-O judge them: a rule with includes.caps applies only when the container holds every
    cap listed, one with excludes.caps only when it holds none."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [
            # chmod is denied only to containers holding CAP_SYS_TIME ...
            {"names": ["chmod", "fchmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO",
             "includes": {"caps": ["CAP_SYS_TIME"]}, "comment": "only with SYS_TIME"},
            # ... mkdir to every container without it.
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
             "excludes": {"caps": ["CAP_SYS_TIME"]}},
            # A rule for another architecture and one for a future kernel never apply.
            {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["s390x"]}},
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO",
             "includes": {"minKernel": "99.0"}},
        ],
    }
    path = tmp_path / "conditional.json"
    path.write_text(json.dumps(profile))
    localhost = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                   localhost_ref=str(path))
    busybox = pulled.busybox.reference
    with a_pod(fp, tmp_path) as (pod_id, pod):
        with_time = start_container(fp, pod_id, pod, secured(
            busybox, seccomp=localhost, capabilities=pb.Capability(add_capabilities=["SYS_TIME"])))
        without = start_container(fp, pod_id, pod, secured(busybox, seccomp=localhost))
        assert exec_sync(fp, with_time, "chmod", "700", "/tmp").exit_code != 0
        assert exec_sync(fp, with_time, "mkdir", "/tmp/a").exit_code == 0
        assert exec_sync(fp, without, "chmod", "1777", "/tmp").exit_code == 0
        assert exec_sync(fp, without, "mkdir", "/tmp/a").exit_code != 0
        assert exec_sync(fp, without, "uname").exit_code == 0
        assert exec_sync(fp, without, "sh", "-c", "echo $$").exit_code == 0

        path.write_text(json.dumps({**profile, "unknownKnob": True}))
        err = create_error(fp, pod_id, pod, secured(busybox, seccomp=localhost))
        assert status_code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknownKnob" in (err.details() or "")
