"""Unit tests of the OCI spec builders, seccomp profile and user resolution (no runc)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cri_api import api_pb2 as pb
from sandbox import seccomp, spec, users
from sandbox.spec import SandboxPaths, SpecDefaults, SpecError

PASSWD = "root:x:0:0:root:/root:/bin/sh\nflat:x:1000:1000:flat:/home/flat:/bin/sh\n"
GROUP = "root:x:0:\nflat:x:1000:\nextra:x:2000:flat,other\nwheel:x:10:root\nvideo:x:44:flat\n"


def db() -> users.UserDb:
    return users.UserDb(tuple(users.parse_passwd(PASSWD)), tuple(users.parse_group(GROUP)))


def sandbox_paths(tmp: Path, *, host_net: bool = False, host_ipc: bool = False) -> SandboxPaths:
    for name in ("hostname", "resolv.conf", "hosts"):
        (tmp / name).write_text("x\n")
    (tmp / "shm").mkdir(exist_ok=True)
    return SandboxPaths(
        netns=None if host_net else Path("/run/netns/flatpod-p"),
        ipc=None if host_ipc else Path("/run/flatpod/pods/p/ns/ipc"),
        uts=None if host_net else Path("/run/flatpod/pods/p/ns/uts"),
        pid=Path("/run/flatpod/pods/p/ns/pid"),
        hostname=tmp / "hostname",
        resolv_conf=tmp / "resolv.conf",
        shm=None if host_ipc else tmp / "shm",
        hosts=tmp / "hosts",
    )


def pod_config(**linux: Any) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        hostname="podhost",
        linux=pb.LinuxPodSandboxConfig(**linux),
    )


def ctr_config(sc: pb.LinuxContainerSecurityContext | None = None, **kw: Any) -> pb.ContainerConfig:
    linux = pb.LinuxContainerConfig(security_context=sc or pb.LinuxContainerSecurityContext())
    if "resources" in kw:
        linux.resources.CopyFrom(kw.pop("resources"))
    kw.setdefault("command", ["/bin/sh"])
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"), linux=linux, **kw)


def build(
    tmp: Path,
    ctr: pb.ContainerConfig,
    image: dict[str, Any] | None = None,
    pod: pb.PodSandboxConfig | None = None,
    floor: int = -1000,
    paths: SandboxPaths | None = None,
    defaults: SpecDefaults | None = None,
    target: Path | None = None,
) -> dict[str, Any]:
    return spec.build_container_spec(
        pod or pod_config(),
        ctr,
        image or {},
        rootfs=tmp / "rootfs",
        sandbox=paths or sandbox_paths(tmp),
        cgroups_path="/fpt-spec-x/c",
        target_pid_ns=target,
        rootfs_users=db(),
        oom_score_adj_floor=floor,
        defaults=defaults or SpecDefaults(),
    )


def mounts_by_dest(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in s["mounts"]}


# ---------------------------------------------------------------------------- args and env

ARGS_TABLE = [
    # command, args, entrypoint, cmd, expected
    ([], [], ["/ep"], ["c1"], ["/ep", "c1"]),
    (["/cmd"], [], ["/ep"], ["c1"], ["/cmd"]),
    (["/cmd"], ["a"], ["/ep"], ["c1"], ["/cmd", "a"]),
    ([], ["a", "b"], ["/ep"], ["c1"], ["/ep", "a", "b"]),
    ([], ["/bin/x"], [], ["c1"], ["/bin/x"]),
    ([], [], [], ["/bin/c"], ["/bin/c"]),
]


@pytest.mark.parametrize(("command", "args", "ep", "cmd", "expected"), ARGS_TABLE)
def test_merge_args_follows_kubelet(
    command: list[str], args: list[str], ep: list[str], cmd: list[str], expected: list[str]
) -> None:
    assert spec.merge_args(command, args, ep, cmd) == expected


def test_empty_command_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no command specified"):
        build(tmp_path, ctr_config(command=[]), {"Entrypoint": None, "Cmd": None})


def test_env_config_wins_over_image(tmp_path: Path) -> None:
    ctr = ctr_config(envs=[pb.KeyValue(key="A", value="cfg"), pb.KeyValue(key="C", value="3")])
    s = build(tmp_path, ctr, {"Env": ["A=img", "B=2", "PATH=/img"]})
    env = s["process"]["env"]
    assert "A=cfg" in env and "A=img" not in env
    assert "B=2" in env and "C=3" in env and "PATH=/img" in env and "HOSTNAME=podhost" in env
    assert env.index("B=2") < env.index("C=3")


def test_cwd_precedence(tmp_path: Path) -> None:
    assert build(tmp_path, ctr_config())["process"]["cwd"] == "/"
    assert build(tmp_path, ctr_config(), {"WorkingDir": "/w"})["process"]["cwd"] == "/w"
    ctr = ctr_config(working_dir="/cfg")
    assert build(tmp_path, ctr, {"WorkingDir": "/w"})["process"]["cwd"] == "/cfg"


def test_tty_sets_terminal_and_term(tmp_path: Path) -> None:
    s = build(tmp_path, ctr_config(tty=True))
    assert s["process"]["terminal"] is True and "TERM=xterm" in s["process"]["env"]


# ---------------------------------------------------------------------------- users


@pytest.mark.parametrize(
    ("image_user", "expected"),
    [
        ("", (0, 0, (0, 10))),
        ("flat", (1000, 1000, (1000, 2000, 44))),
        ("1000", (1000, 1000, (1000, 2000, 44))),
        ("1000:1000", (1000, 1000, (1000, 2000, 44))),
        ("flat:extra", (1000, 2000, (2000, 44))),
        ("4242", (4242, 0, (0,))),
        ("4242:7", (4242, 7, (7,))),
    ],
)
def test_image_user_forms(image_user: str, expected: tuple[int, int, tuple[int, ...]]) -> None:
    r = db().resolve(image_user)
    assert (r.uid, r.gid, r.additional_gids) == expected


def test_run_as_user_overrides_image_and_merges_groups(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        run_as_user=pb.Int64Value(value=1000), supplemental_groups=[5555]
    )
    u = build(tmp_path, ctr_config(sc), {"User": "root"})["process"]["user"]
    assert u == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 2000, 44, 5555]}


def test_strict_policy_uses_only_primary_and_supplemental(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        run_as_user=pb.Int64Value(value=1000),
        run_as_group=pb.Int64Value(value=3000),
        supplemental_groups=[5555],
        supplemental_groups_policy=pb.Strict,
    )
    u = build(tmp_path, ctr_config(sc))["process"]["user"]
    assert u == {"uid": 1000, "gid": 3000, "additionalGids": [3000, 5555]}


def test_run_as_username_and_missing_username(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(run_as_username="flat")
    assert build(tmp_path, ctr_config(sc))["process"]["user"]["uid"] == 1000
    sc = pb.LinuxContainerSecurityContext(run_as_username="ghost")
    with pytest.raises(SpecError, match="ghost"):
        build(tmp_path, ctr_config(sc))


def test_run_as_group_without_user_is_an_error() -> None:
    with pytest.raises(users.UserError, match="run_as_group"):
        db().resolve("flat", run_as_group=5)


def test_missing_image_group_is_an_error() -> None:
    with pytest.raises(users.UserError, match="nogroup"):
        db().resolve("flat:nogroup")


def test_rootfs_passwd_symlink_cannot_escape(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("evil:x:0:0::/:/bin/sh\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(f"../../../../../../../..{secret}")
    (root / "etc" / "group").symlink_to(str(secret))
    assert users.UserDb.from_rootfs(root).users == ()
    # The same absolute target inside the rootfs is followed, re-rooted.
    inner = root / secret.relative_to("/")
    inner.parent.mkdir(parents=True)
    inner.write_text("inner:x:7:7::/:/bin/sh\n")
    assert [u.name for u in users.UserDb.from_rootfs(root).users] == ["inner"]


def test_rootfs_directory_symlink_is_rerooted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "real").mkdir(parents=True)
    (root / "real" / "passwd").write_text(PASSWD)
    (root / "etc").symlink_to("/real")
    assert users.read_in_root(root, "etc/passwd") == PASSWD


# ---------------------------------------------------------------------------- capabilities


def caps_of(s: dict[str, Any]) -> set[str]:
    return set(s["process"]["capabilities"]["bounding"])


def test_default_capabilities(tmp_path: Path) -> None:
    s = build(tmp_path, ctr_config())
    assert caps_of(s) == set(spec.DEFAULT_CAPABILITIES)
    assert s["process"]["capabilities"]["inheritable"] == []


def test_add_drop_with_and_without_prefix(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        capabilities=pb.Capability(add_capabilities=["sys_admin"], drop_capabilities=["CAP_KILL"])
    )
    caps = caps_of(build(tmp_path, ctr_config(sc)))
    assert "CAP_SYS_ADMIN" in caps and "CAP_KILL" not in caps


def test_all_add_and_drop(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        capabilities=pb.Capability(add_capabilities=["ALL"], drop_capabilities=["CHOWN"])
    )
    available = set(spec.bounding_set())
    assert caps_of(build(tmp_path, ctr_config(sc))) == available - {"CAP_CHOWN"}
    sc = pb.LinuxContainerSecurityContext(
        capabilities=pb.Capability(add_capabilities=["NET_BIND_SERVICE"], drop_capabilities=["ALL"])
    )
    assert caps_of(build(tmp_path, ctr_config(sc))) == {"CAP_NET_BIND_SERVICE"}


def test_unknown_capability_named(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(capabilities=pb.Capability(add_capabilities=["FLY"]))
    with pytest.raises(SpecError, match="FLY"):
        build(tmp_path, ctr_config(sc))


def test_ambient_capabilities_also_inheritable(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        capabilities=pb.Capability(add_ambient_capabilities=["NET_ADMIN"])
    )
    c = build(tmp_path, ctr_config(sc))["process"]["capabilities"]
    assert c["ambient"] == ["CAP_NET_ADMIN"] == c["inheritable"]
    assert "CAP_NET_ADMIN" in c["permitted"] and "CAP_NET_ADMIN" in c["effective"]


# ---------------------------------------------------------------------------- privileged


def privileged_pod() -> pb.PodSandboxConfig:
    return pod_config(security_context=pb.LinuxSandboxSecurityContext(privileged=True))


def test_privileged_container(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(
        privileged=True, seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    )
    s = build(tmp_path, ctr_config(sc), pod=privileged_pod())
    assert caps_of(s) == set(spec.bounding_set())
    assert "maskedPaths" not in s["linux"] and "readonlyPaths" not in s["linux"]
    assert "seccomp" not in s["linux"]
    assert s["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" for d in s["linux"]["devices"])
    assert "ro" not in mounts_by_dest(s)["/sys"]["options"]


def test_privileged_container_needs_privileged_pod(tmp_path: Path) -> None:
    sc = pb.LinuxContainerSecurityContext(privileged=True)
    with pytest.raises(SpecError, match="privileged"):
        build(tmp_path, ctr_config(sc))


# ---------------------------------------------------------------------------- masked paths


def test_masked_paths_default_and_explicit(tmp_path: Path) -> None:
    s = build(tmp_path, ctr_config())
    assert s["linux"]["maskedPaths"] == list(spec.DEFAULT_MASKED_PATHS)
    assert s["linux"]["readonlyPaths"] == list(spec.DEFAULT_READONLY_PATHS)
    sc = pb.LinuxContainerSecurityContext(masked_paths=["/proc/x"], readonly_paths=["/proc/y"])
    s = build(tmp_path, ctr_config(sc))
    assert s["linux"]["maskedPaths"] == ["/proc/x"] and s["linux"]["readonlyPaths"] == ["/proc/y"]
    d = SpecDefaults(masked_paths=("/proc/m",), readonly_paths=())
    s = build(tmp_path, ctr_config(), defaults=d)
    assert s["linux"]["maskedPaths"] == ["/proc/m"] and s["linux"]["readonlyPaths"] == []


# ---------------------------------------------------------------------------- namespaces


def ns_of(s: dict[str, Any]) -> dict[str, str | None]:
    return {n["type"]: n.get("path") for n in s["linux"]["namespaces"]}


def test_namespaces_join_pinned_files(tmp_path: Path) -> None:
    ns = ns_of(build(tmp_path, ctr_config()))
    assert ns == {
        "mount": None,
        "network": "/run/netns/flatpod-p",
        "ipc": "/run/flatpod/pods/p/ns/ipc",
        "uts": "/run/flatpod/pods/p/ns/uts",
        "pid": "/run/flatpod/pods/p/ns/pid",
    }
    assert not any("/proc/" in (p or "") for p in ns.values())


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(pb.CONTAINER, None), (pb.NODE, "absent"), (pb.TARGET, "/proc/ns/target")],
)
def test_pid_modes(tmp_path: Path, mode: pb.NamespaceMode, expected: str | None) -> None:
    opts = pb.NamespaceOption(pid=mode, target_id="t")
    sc = pb.LinuxContainerSecurityContext(namespace_options=opts)
    ns = ns_of(build(tmp_path, ctr_config(sc), target=Path("/proc/ns/target")))
    if expected == "absent":
        assert "pid" not in ns
    else:
        assert "pid" in ns and ns["pid"] == expected


def test_host_network_and_ipc(tmp_path: Path) -> None:
    opts = pb.NamespaceOption(network=pb.NODE, ipc=pb.NODE)
    sc = pb.LinuxContainerSecurityContext(namespace_options=opts)
    paths = sandbox_paths(tmp_path, host_net=True, host_ipc=True)
    s = build(tmp_path, ctr_config(sc), paths=paths)
    assert set(ns_of(s)) == {"mount", "pid"}
    shm = mounts_by_dest(s)["/dev/shm"]
    assert shm["type"] == "tmpfs"


def test_user_namespaces_refused(tmp_path: Path) -> None:
    opts = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.POD))
    sc = pb.LinuxContainerSecurityContext(namespace_options=opts)
    with pytest.raises(SpecError, match="userns"):
        build(tmp_path, ctr_config(sc))


# ---------------------------------------------------------------------------- mounts


def test_default_and_sandbox_mounts(tmp_path: Path) -> None:
    m = mounts_by_dest(build(tmp_path, ctr_config()))
    for dest in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup"):
        assert dest in m
    assert "ro" in m["/sys"]["options"] and "ro" in m["/sys/fs/cgroup"]["options"]
    assert m["/etc/hostname"]["source"] == str(tmp_path / "hostname")
    assert m["/etc/hosts"]["source"] == str(tmp_path / "hosts")
    assert m["/dev/shm"] == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": str(tmp_path / "shm"),
        "options": ["rbind", "rprivate", "rw"],
    }
    assert "/run" not in m


def test_cri_mount_replaces_default_and_orders_parents_first(tmp_path: Path) -> None:
    (tmp_path / "kubelet-hosts").write_text("h\n")
    (tmp_path / "vol" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "vol")
    ctr = ctr_config(
        mounts=[
            pb.Mount(container_path="/data/sub", host_path=str(tmp_path / "vol" / "sub")),
            pb.Mount(container_path="/etc/hosts", host_path=str(tmp_path / "kubelet-hosts")),
            pb.Mount(container_path="/data", host_path=str(tmp_path / "link"), readonly=True),
        ]
    )
    s = build(tmp_path, ctr)
    dests = [m["destination"] for m in s["mounts"]]
    assert dests.count("/etc/hosts") == 1
    m = mounts_by_dest(s)
    assert m["/etc/hosts"]["source"] == str(tmp_path / "kubelet-hosts")
    assert m["/data"]["source"] == str(tmp_path / "vol")  # symlink resolved
    assert m["/data"]["options"] == ["rbind", "rprivate", "ro"]
    assert dests.index("/data") < dests.index("/data/sub")


def test_missing_host_path_named(tmp_path: Path) -> None:
    ctr = ctr_config(mounts=[pb.Mount(container_path="/d", host_path=str(tmp_path / "nope"))])
    with pytest.raises(SpecError, match="nope"):
        build(tmp_path, ctr)


def test_rro_validation(tmp_path: Path) -> None:
    host = str(tmp_path)
    bad = [
        pb.Mount(container_path="/a", host_path=host, recursive_read_only=True),
        pb.Mount(
            container_path="/b",
            host_path=host,
            readonly=True,
            recursive_read_only=True,
            propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
        ),
    ]
    for m, dest in zip(bad, ("/a", "/b"), strict=True):
        with pytest.raises(SpecError, match=f"mount {dest}: recursive_read_only"):
            build(tmp_path, ctr_config(mounts=[m]))
    ok = pb.Mount(container_path="/c", host_path=host, readonly=True, recursive_read_only=True)
    opts = mounts_by_dest(build(tmp_path, ctr_config(mounts=[ok])))["/c"]["options"]
    assert "rro" in opts and "ro" in opts


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs marked shared, so propagation checks have a real shared mount to find."""
    d = tmp_path / "shared"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fpt-spec-shared", str(d)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(d)], check=True)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_propagation_needs_shared_source(tmp_path: Path, shared_dir: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    for prop in (pb.PROPAGATION_BIDIRECTIONAL, pb.PROPAGATION_HOST_TO_CONTAINER):
        m = pb.Mount(container_path="/p", host_path=str(private), propagation=prop)
        assert "shared" not in str(spec.mount_of(str(private), spec.parse_mountinfo(
            Path("/proc/self/mountinfo").read_text())))  # fmt: skip
        with pytest.raises(SpecError, match=str(private)):
            build(tmp_path, ctr_config(mounts=[m]))
    ctr = ctr_config(
        mounts=[
            pb.Mount(
                container_path="/b", host_path=str(shared_dir),
                propagation=pb.PROPAGATION_BIDIRECTIONAL,
            ),
            pb.Mount(
                container_path="/s", host_path=str(shared_dir),
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
        ]
    )  # fmt: skip
    s = build(tmp_path, ctr)
    by_dest = mounts_by_dest(s)
    assert "rshared" in by_dest["/b"]["options"] and "rslave" in by_dest["/s"]["options"]
    assert s["linux"]["rootfsPropagation"] == "rshared"


# ---------------------------------------------------------------------------- sysctls


def test_sysctl_validation(tmp_path: Path) -> None:
    ok = {"kernel.shmmax": "1", "kernel.sem": "1 2 3 4", "fs.mqueue.msg_max": "9",
          "net.ipv4.ip_forward": "1"}  # fmt: skip
    p = spec.build_pause_spec(
        pod_config(sysctls=ok), rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x"
    )
    assert p["linux"]["sysctl"] == ok
    with pytest.raises(SpecError, match=re.escape("vm.swappiness")):
        spec.build_pause_spec(
            pod_config(sysctls={"vm.swappiness": "1"}),
            rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x",
        )  # fmt: skip
    host_net = pod_config(
        sysctls={"net.core.somaxconn": "1"},
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.NODE)
        ),
    )
    with pytest.raises(SpecError, match=re.escape("net.core.somaxconn")):
        spec.build_pause_spec(host_net, rootfs=tmp_path, netns_path=None, cgroups_path="/x")
    host_ipc = pod_config(
        sysctls={"kernel.msgmax": "1"},
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(ipc=pb.NODE)
        ),
    )
    with pytest.raises(SpecError, match=re.escape("kernel.msgmax")):
        spec.build_pause_spec(host_ipc, rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x")


# ---------------------------------------------------------------------------- seccomp


def seccomp_names(s: dict[str, Any]) -> set[str]:
    return {n for r in s["linux"]["seccomp"]["syscalls"] for n in r["names"]
            if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r}  # fmt: skip


def sc_with(**kw: Any) -> pb.LinuxContainerSecurityContext:
    return pb.LinuxContainerSecurityContext(**kw)


RUNTIME_DEFAULT = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)


def test_seccomp_runtime_default(tmp_path: Path) -> None:
    s = build(tmp_path, ctr_config(sc_with(seccomp=RUNTIME_DEFAULT)))
    prof = s["linux"]["seccomp"]
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO" and prof["defaultErrnoRet"] == 1
    assert prof["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    names = seccomp_names(s)
    assert {"read", "write", "execve", "arch_prctl"} <= names
    assert not {"mount", "unshare", "setns", "reboot", "init_module", "io_uring_setup"} & names
    clone = [r for r in prof["syscalls"] if r["names"] == ["clone"]]
    assert clone[0]["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    clone3 = [r for r in prof["syscalls"] if r["names"] == ["clone3"]]
    assert clone3[0]["errnoRet"] == seccomp.ENOSYS


def test_seccomp_capability_rules(tmp_path: Path) -> None:
    sc = sc_with(
        seccomp=RUNTIME_DEFAULT,
        capabilities=pb.Capability(add_capabilities=["SYS_ADMIN", "SYS_BOOT", "SYS_MODULE"]),
    )
    s = build(tmp_path, ctr_config(sc))
    names = seccomp_names(s)
    assert {"mount", "umount2", "unshare", "setns", "clone", "reboot", "init_module"} <= names
    assert not [r for r in s["linux"]["seccomp"]["syscalls"] if r.get("errnoRet")]


def test_seccomp_variants(tmp_path: Path) -> None:
    assert "seccomp" not in build(tmp_path, ctr_config())["linux"]  # unset → unconfined
    unconf = pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
    assert "seccomp" not in build(tmp_path, ctr_config(sc_with(seccomp=unconf)))["linux"]
    for legacy in ("runtime/default", "docker/default"):
        s = build(tmp_path, ctr_config(sc_with(seccomp_profile_path=legacy)))
        assert "execve" in seccomp_names(s)
    s = build(tmp_path, ctr_config(sc_with(seccomp_profile_path="unconfined")))
    assert "seccomp" not in s["linux"]
    prof = {"defaultAction": "SCMP_ACT_LOG", "syscalls": [{"names": ["x"], "action": "A"}]}
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(prof))
    local = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=str(path))
    assert build(tmp_path, ctr_config(sc_with(seccomp=local)))["linux"]["seccomp"] == prof
    s = build(tmp_path, ctr_config(sc_with(seccomp_profile_path=f"localhost/{path}")))
    assert s["linux"]["seccomp"] == prof
    missing = pb.SecurityProfile(
        profile_type=pb.SecurityProfile.Localhost, localhost_ref=str(tmp_path / "gone.json")
    )
    with pytest.raises(SpecError, match=re.escape("gone.json")):
        build(tmp_path, ctr_config(sc_with(seccomp=missing)))
    with pytest.raises(SpecError, match="seccomp_profile_path"):
        build(tmp_path, ctr_config(sc_with(seccomp_profile_path="bogus")))


def apparmor_node(tmp_path: Path, *loaded: str) -> SpecDefaults:
    """Defaults of a node with AppArmor enabled and these profiles loaded, in the kernel's
    format (`/sys/kernel/security/apparmor/profiles`; the VM's critest run loads real ones)."""
    listing = tmp_path / "apparmor-profiles"
    listing.write_text("".join(f"{name} (enforce)\n" for name in loaded))
    return SpecDefaults(apparmor_profiles=listing)


def test_apparmor_localhost_profile_is_applied_when_loaded(tmp_path: Path) -> None:
    node = apparmor_node(tmp_path, "deny-write", "audit write")
    local = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                               localhost_ref="localhost/deny-write")
    s = build(tmp_path, ctr_config(sc_with(apparmor=local)), defaults=node)
    assert s["process"]["apparmorProfile"] == "deny-write"
    s = build(tmp_path, ctr_config(sc_with(apparmor_profile="localhost/audit write")),
              defaults=node)
    assert s["process"]["apparmorProfile"] == "audit write"
    # The apparmor field wins over the deprecated string, whatever the string names.
    s = build(tmp_path, ctr_config(sc_with(apparmor=local, apparmor_profile="localhost/gone")),
              defaults=node)
    assert s["process"]["apparmorProfile"] == "deny-write"
    # A pod-level profile confines the pause as well.
    pod = pod_config(security_context=pb.LinuxSandboxSecurityContext(apparmor=local))
    p = spec.build_pause_spec(pod, rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x",
                              defaults=node)
    assert p["process"]["apparmorProfile"] == "deny-write"


def test_apparmor_no_profile_for_default_unconfined_and_privileged(tmp_path: Path) -> None:
    node = apparmor_node(tmp_path, "deny-write")
    for sc in (
        sc_with(),
        sc_with(apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)),
        sc_with(apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined),
                apparmor_profile="localhost/deny-write"),
        sc_with(apparmor_profile="runtime/default"),
        sc_with(apparmor_profile="unconfined"),
    ):
        assert "apparmorProfile" not in build(tmp_path, ctr_config(sc), defaults=node)["process"]
    privileged_pod = pod_config(security_context=pb.LinuxSandboxSecurityContext(privileged=True))
    s = build(tmp_path, ctr_config(sc_with(apparmor_profile="localhost/deny-write",
                                           privileged=True)), pod=privileged_pod, defaults=node)
    assert "apparmorProfile" not in s["process"]


def test_apparmor_profile_that_cannot_be_applied_is_refused(tmp_path: Path) -> None:
    node = apparmor_node(tmp_path, "deny-write")
    gone = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                              localhost_ref="localhost/non-existent-profile")
    with pytest.raises(SpecError, match="'non-existent-profile' is not loaded"):
        build(tmp_path, ctr_config(sc_with(apparmor=gone)), defaults=node)
    with pytest.raises(SpecError, match="'non-existent-profile' is not loaded"):
        build(tmp_path, ctr_config(sc_with(apparmor_profile="localhost/non-existent-profile")),
              defaults=node)
    with pytest.raises(SpecError, match="needs a name"):
        build(tmp_path, ctr_config(sc_with(apparmor_profile="localhost/")), defaults=node)
    with pytest.raises(SpecError, match="unknown profile 'bogus'"):
        build(tmp_path, ctr_config(sc_with(apparmor_profile="bogus")), defaults=node)
    # A node without AppArmor cannot apply any: refused, never run unconfined.
    with pytest.raises(SpecError, match="AppArmor is not enabled on this node"):
        build(tmp_path, ctr_config(sc_with(apparmor_profile="localhost/deny-write")),
              defaults=SpecDefaults(apparmor_profiles=None))


# ---------------------------------------------------------------------------- resources, oom


def test_oom_score_adj_clamped_to_floor(tmp_path: Path) -> None:
    res = pb.LinuxContainerResources(oom_score_adj=-999)
    assert build(tmp_path, ctr_config(resources=res), floor=-500)["process"]["oomScoreAdj"] == -500
    res = pb.LinuxContainerResources(oom_score_adj=900)
    assert build(tmp_path, ctr_config(resources=res), floor=-500)["process"]["oomScoreAdj"] == 900
    p = spec.build_pause_spec(
        pod_config(), rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x",
        oom_score_adj=-998, oom_score_adj_floor=0,
    )  # fmt: skip
    assert p["process"]["oomScoreAdj"] == 0


def test_resources(tmp_path: Path) -> None:
    res = pb.LinuxContainerResources(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, memory_limit_in_bytes=1 << 26,
        cpuset_cpus="0", hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1 << 21)],
        unified={"memory.high": "1"},
    )  # fmt: skip
    r = build(tmp_path, ctr_config(resources=res))["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"}
    assert r["memory"] == {"limit": 1 << 26, "swap": 1 << 26}
    assert "hugepageLimits" not in r and "unified" not in r
    assert r["devices"][0] == {"allow": False, "access": "rwm"}
    res.memory_swap_limit_in_bytes = 1 << 27
    d = SpecDefaults(hugetlb_available=True, pids_limit=100)
    r = build(tmp_path, ctr_config(resources=res), defaults=d)["linux"]["resources"]
    assert r["memory"]["swap"] == 1 << 27 and r["pids"] == {"limit": 100}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]


def test_devices(tmp_path: Path) -> None:
    dev = pb.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
    s = build(tmp_path, ctr_config(devices=[dev]))
    d = s["linux"]["devices"][0]
    st = os.stat("/dev/null")
    assert (d["path"], d["type"], d["major"], d["minor"]) == (
        "/dev/mynull", "c", os.major(st.st_rdev), os.minor(st.st_rdev),
    )  # fmt: skip
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in s["linux"][
        "resources"
    ]["devices"]
    with pytest.raises(SpecError, match="/dev/nothing-here"):
        build(tmp_path, ctr_config(devices=[pb.Device(container_path="/x",
                                                      host_path="/dev/nothing-here")]))  # fmt: skip


def test_readonly_rootfs_and_nnp(tmp_path: Path) -> None:
    s = build(tmp_path, ctr_config(sc_with(readonly_rootfs=True, no_new_privs=True)))
    assert s["root"]["readonly"] is True and s["process"]["noNewPrivileges"] is True
    assert "ro" in mounts_by_dest(s)["/etc/hostname"]["options"]


# ---------------------------------------------------------------------------- pause


def test_pause_spec(tmp_path: Path) -> None:
    pod = pod_config(
        security_context=pb.LinuxSandboxSecurityContext(
            run_as_user=pb.Int64Value(value=65535), supplemental_groups=[7]
        )
    )
    p = spec.build_pause_spec(
        pod, rootfs=tmp_path, netns_path=Path("/run/netns/flatpod-p"), cgroups_path="/x/p",
        shm_path=tmp_path,
    )  # fmt: skip
    assert p["ociVersion"] == "1.0.2-dev"
    assert p["root"] == {"path": str(tmp_path), "readonly": True}
    assert p["process"]["args"] == ["/catatonit", "-P"]
    assert p["process"]["user"] == {"uid": 65535, "gid": 0, "additionalGids": [0, 7]}
    assert p["process"]["capabilities"]["bounding"] == []
    assert p["process"]["noNewPrivileges"] is True
    assert p["hostname"] == "podhost"
    assert ns_of(p) == {
        "mount": None, "network": "/run/netns/flatpod-p", "ipc": None, "uts": None, "pid": None,
    }  # fmt: skip
    assert mounts_by_dest(p)["/dev/shm"]["source"] == str(tmp_path)
    assert p["linux"]["cgroupsPath"] == "/x/p"


def test_pause_host_namespaces(tmp_path: Path) -> None:
    opts = pb.NamespaceOption(network=pb.NODE, ipc=pb.NODE, pid=pb.NODE)
    pod = pod_config(security_context=pb.LinuxSandboxSecurityContext(namespace_options=opts))
    p = spec.build_pause_spec(pod, rootfs=tmp_path, netns_path=None, cgroups_path="/x")
    assert ns_of(p) == {"mount": None}
    assert "hostname" not in p
    with pytest.raises(SpecError, match="netns_path"):
        spec.build_pause_spec(pod, rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x")


def test_all_means_the_daemons_bounding_set(tmp_path: Path) -> None:
    """runc cannot grant what the daemon lacks (root here has no CAP_SYS_RESOURCE)."""
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapBnd:\t0000000000000005\n")
    assert spec.bounding_set(status) == ("CAP_CHOWN", "CAP_DAC_READ_SEARCH")
    caps = spec.effective_capabilities([], ["ALL"], [], False, ("CAP_CHOWN",))
    assert caps == ["CAP_CHOWN"]
    assert spec.effective_capabilities(["CAP_KILL"], ["SYS_ADMIN"], [], False, ("CAP_KILL",)) == [
        "CAP_KILL"
    ]


# --- cgroup v2 --------------------------------------------------------------------------------


def test_cgroup_namespace_on_v2_only(tmp_path: Path) -> None:
    v2 = SpecDefaults(cgroup_v2=True)
    assert ns_of(build(tmp_path, ctr_config(), defaults=v2))["cgroup"] is None  # a new one
    assert "cgroup" not in ns_of(build(tmp_path, ctr_config()))  # v1 or hybrid
    # A privileged container sees the host's tree, as with containerd.
    privileged = ctr_config(pb.LinuxContainerSecurityContext(privileged=True))
    s = build(tmp_path, privileged, pod=privileged_pod(), defaults=v2)
    assert "cgroup" not in ns_of(s)
    pause = spec.build_pause_spec(
        pod_config(), rootfs=tmp_path, netns_path=Path("/n"), cgroups_path="/x", defaults=v2
    )
    assert "cgroup" not in {n["type"] for n in pause["linux"]["namespaces"]}


def test_unified_passed_through_on_v2(tmp_path: Path) -> None:
    res = pb.LinuxContainerResources(
        memory_limit_in_bytes=1 << 26, unified={"memory.oom.group": "1", "memory.high": "max"}
    )
    v2 = SpecDefaults(cgroup_v2=True)
    r = build(tmp_path, ctr_config(resources=res), defaults=v2)["linux"]["resources"]
    assert r["unified"] == {"memory.high": "max", "memory.oom.group": "1"}
    assert r["memory"] == {"limit": 1 << 26, "swap": 1 << 26}  # runc converts for v2
    res.unified["../../escape"] = "1"
    with pytest.raises(SpecError, match="unified"):
        build(tmp_path, ctr_config(resources=res), defaults=v2)


def test_systemd_cgroups_path_is_passed_as_given(tmp_path: Path) -> None:
    s = spec.build_container_spec(
        pod_config(), ctr_config(), {}, rootfs=tmp_path / "rootfs",
        sandbox=sandbox_paths(tmp_path), cgroups_path="kubepods-pod1.slice:flatpod:c1",
        target_pid_ns=None, rootfs_users=db(), oom_score_adj_floor=-1000,
        defaults=SpecDefaults(),
    )  # fmt: skip
    assert s["linux"]["cgroupsPath"] == "kubepods-pod1.slice:flatpod:c1"


# --- Localhost seccomp profiles in the moby format ------------------------------------------


def _render(profile: dict[str, Any], caps: tuple[str, ...] = (), arch: str = "x86_64",
            kernel: tuple[int, int] = (6, 1)) -> dict[str, Any]:
    return seccomp.moby_to_oci(profile, seccomp.ProfileTarget(frozenset(caps), arch, kernel))


def test_moby_profile_rules_follow_includes_and_excludes() -> None:
    rule = {"names": ["x"], "action": "SCMP_ACT_ALLOW"}
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {**rule, "names": ["caps"], "includes": {"caps": ["CAP_SYS_ADMIN", "CAP_BPF"]}},
        {**rule, "names": ["nocap"], "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {**rule, "names": ["amd64"], "includes": {"arches": ["amd64"]}},
        {**rule, "names": ["not-arm"], "excludes": {"arches": ["arm64", "aarch64"]}},
        {**rule, "names": ["new"], "includes": {"minKernel": "6.2"}},
        {**rule, "names": ["old"], "excludes": {"minKernel": "6.2"}},
        {"name": "single", "action": "SCMP_ACT_ALLOW", "comment": "moby's old spelling"},
    ]}

    def names(**target: Any) -> set[str]:
        return {n for r in _render(profile, **target)["syscalls"] for n in r["names"]}

    assert names() == {"nocap", "amd64", "not-arm", "old", "single"}
    assert names(caps=("CAP_SYS_ADMIN",)) == {"amd64", "not-arm", "old", "single"}
    assert "caps" in names(caps=("CAP_SYS_ADMIN", "CAP_BPF"))
    assert names(arch="aarch64") == {"nocap", "old", "single"}
    assert names(kernel=(6, 2)) == {"nocap", "amd64", "not-arm", "new", "single"}
    rendered = _render(profile)["syscalls"]
    assert all(set(r) <= {"names", "action", "errnoRet", "args"} for r in rendered)


def test_moby_arch_map_keeps_the_native_architecture() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}]}
    assert _render(profile)["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert "archMap" not in _render(profile)


@pytest.mark.parametrize(("profile", "named"), [
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrno": "EPERM"}, "defaultErrno"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["a"], "action": "x",
                                                       "priority": 1}]}, "priority"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["a"], "action": "x", "includes": {"caps": [], "kernel": "5"}}]}, "kernel"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["a"], "action": "x", "args": [{"index": 0, "value": 1, "mask": 3}]}]},
     "mask"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["a"], "action": "x", "includes": {"minKernel": "five"}}]}, "minKernel"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["a"], "name": "b", "action": "x"}]}, "name and names"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
      "archMap": []}, "archMap"),
])
def test_moby_profile_fields_are_never_silently_dropped(profile: dict[str, Any],
                                                       named: str) -> None:
    with pytest.raises(seccomp.SeccompError, match=named):
        _render(profile)
