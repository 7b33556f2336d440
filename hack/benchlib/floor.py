"""The physical floors, runc alone with no CRI and no network setup:
- a pod's: `runc create` + `runc start` of a catatonit pause in a bundle with a minimal
  config.json;
- a container's (`ContainerFloor`): what CreateContainer + StartContainer cannot do without, an
  overlay rootfs mounted and one `runc run --detach` of busybox `sleep` joining a running
  pause's pid, ipc, uts and net namespaces, in a cgroup below the pause's, with the mounts,
  capabilities, masked paths and device rule of the spec flatpod writes for such a
  container."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from netns import libc

RUNC = "/usr/sbin/runc"
CATATONIT = "/usr/bin/catatonit"
BUSYBOX = "/bin/busybox"
CGROUP_PARENT = "fpbench-floor"


def _minimal_spec(cgroups_path: str) -> dict[str, object]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0},
            "args": ["/catatonit", "-P"], "env": ["PATH=/"], "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "floor",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            # the pause's own namespaces, as a pod's; the network one stays empty (loopback)
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        },
    }


def _run(args: list[str], errors: Path) -> None:
    """runc's stdio is inherited by the container, so it must never be a pipe we wait on:
    the pause would hold it open forever. stderr goes to a file instead."""
    with errors.open("wb") as err:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[3:5])}: {errors.read_text(errors='replace')[-500:]}")


def runc_floor(runs: int) -> list[float]:
    """Seconds per create+start; each container is deleted (untimed) before the next."""
    base = Path(tempfile.mkdtemp(prefix="fpb-floor-", dir="/run"))
    samples = []
    try:
        bundle, state = base / "bundle", base / "runc"
        for sub in ("proc", "dev"):
            (bundle / "rootfs" / sub).mkdir(parents=True)
        shutil.copy2(CATATONIT, bundle / "rootfs" / "catatonit")
        for i in range(runs):
            name = f"fpbench-floor-{os.getpid()}-{i}"
            spec = _minimal_spec(f"/{CGROUP_PARENT}/{name}")
            (bundle / "config.json").write_text(json.dumps(spec))
            root, errors = ["--root", str(state)], base / "runc.err"
            start = time.perf_counter()
            try:
                _run([RUNC, *root, "create", "--bundle", str(bundle), name], errors)
                _run([RUNC, *root, "start", name], errors)
                samples.append(time.perf_counter() - start)
            finally:
                subprocess.run([RUNC, *root, "delete", "--force", name], check=False,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _remove_cgroup_parent()
    return samples


def _remove_cgroup_parent() -> None:
    for controller in Path("/sys/fs/cgroup").iterdir():
        parent = controller / CGROUP_PARENT
        if parent.is_dir():
            for dirpath, _dirs, _files in os.walk(parent, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


# ---- the container floor -----------------------------------------------------------------------

# The capabilities a CRI container gets by default (containerd's and flatpod's list).
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]
JOINED = ("pid", "ipc", "uts", "net")  # the pause's; a container's mount namespace is its own


def _kernel_mounts() -> list[dict[str, object]]:
    """What runc mounts for every container flatpod makes (its spec's kernel filesystems)."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": NOSUID_NOEXEC_NODEV},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": NOSUID_NOEXEC_NODEV},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": [*NOSUID_NOEXEC_NODEV, "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*NOSUID_NOEXEC_NODEV, "relatime", "ro"]},
    ]


def _container_spec(rootfs: Path, pod_files: Path, pause_pid: int,
                    cgroups_path: str) -> dict[str, object]:
    """The spec flatpod writes for busybox `sleep 3600` in a pod (a real config.json's shape):
    the pod's hostname, resolv.conf, hosts and shm bound in, the pause's namespaces joined."""
    binds = [{"destination": target, "type": "bind", "source": str(pod_files / name),
              "options": ["rbind", "rprivate", "rw"]}
             for name, target in (("hostname", "/etc/hostname"), ("hosts", "/etc/hosts"),
                                  ("resolv.conf", "/etc/resolv.conf"), ("shm", "/dev/shm"))]
    return {
        "ociVersion": "1.0.2-dev",
        "root": {"path": str(rootfs), "readonly": False},
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0, "additionalGids": [0, 10]},
            "args": ["sleep", "3600"], "cwd": "/",
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOSTNAME=floor"],
            "capabilities": {"bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS,
                             "permitted": DEFAULT_CAPS, "inheritable": [], "ambient": []},
            "noNewPrivileges": False, "oomScoreAdj": 0,
        },
        "mounts": _kernel_mounts() + binds,
        "linux": {
            "namespaces": [{"type": "mount"}] + [
                {"type": "network" if ns == "net" else ns, "path": f"/proc/{pause_pid}/ns/{ns}"}
                for ns in JOINED],
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": MASKED, "readonlyPaths": READ_ONLY,
        },
    }


@dataclass
class ContainerSample:
    mount_s: float  # the writable layer's dirs and the overlay mount
    runc_s: float  # `runc run --detach`, until it returns (the process runs)

    @property
    def total_s(self) -> float:
        return self.mount_s + self.runc_s


class ContainerFloor:
    """A running pause (made once, untimed) and a busybox lower dir; each `sample()` makes one
    container in it as CreateContainer + StartContainer must, and deletes it again untimed.
    Use as a context manager: the pause, mounts, dirs and cgroups go at its end."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fpb-ctrfloor-", dir="/run"))
        self.state = self.base / "runc"
        self.errors = self.base / "runc.err"
        self.pod_cgroup = f"/{CGROUP_PARENT}/pod-{os.getpid()}"
        self.pause = f"fpbench-floor-pause-{os.getpid()}"
        self.pause_pid = 0
        self.count = 0

    def __enter__(self) -> ContainerFloor:
        try:
            self._make_lower()
            self._start_pause()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _make_lower(self) -> None:
        lower = self.base / "lower"
        for sub in ("bin", "etc", "dev", "proc", "sys", "tmp"):
            (lower / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, lower / "bin" / "busybox")
        (lower / "bin" / "sleep").symlink_to("busybox")
        (lower / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (lower / "etc" / "group").write_text("root:x:0:\nwheel:x:10:root\n")
        pod = self.base / "pod"
        (pod / "shm").mkdir(parents=True)
        for name in ("hostname", "resolv.conf", "hosts"):
            (pod / name).write_text("floor\n" if name == "hostname" else "")

    def _start_pause(self) -> None:
        bundle = self.base / "pause"
        for sub in ("proc", "dev"):
            (bundle / "rootfs" / sub).mkdir(parents=True)
        shutil.copy2(CATATONIT, bundle / "rootfs" / "catatonit")
        (bundle / "config.json").write_text(json.dumps(_minimal_spec(self.pod_cgroup + "/pause")))
        pid_file = self.base / "pause.pid"
        _run([RUNC, "--root", str(self.state), "run", "--detach", "--pid-file", str(pid_file),
              "--bundle", str(bundle), self.pause], self.errors)
        self.pause_pid = int(pid_file.read_text())

    def sample(self) -> ContainerSample:
        name = f"fpbench-floor-ctr-{os.getpid()}-{self.count}"
        self.count += 1
        bundle, layer = self.base / name, self.base / f"{name}-layer"
        rootfs = bundle / "rootfs"
        try:
            start = time.perf_counter()
            for path in (rootfs, layer / "upper", layer / "work"):
                path.mkdir(parents=True)
            libc.mount("overlay", str(rootfs), "overlay", 0,
                       f"lowerdir={self.base / 'lower'},upperdir={layer / 'upper'},"
                       f"workdir={layer / 'work'}")
            mounted = time.perf_counter()
            spec = _container_spec(rootfs, self.base / "pod", self.pause_pid,
                                   f"{self.pod_cgroup}/{name}")
            (bundle / "config.json").write_text(json.dumps(spec))
            _run([RUNC, "--root", str(self.state), "run", "--detach", "--bundle", str(bundle),
                  name], self.errors)
            return ContainerSample(mounted - start, time.perf_counter() - mounted)
        finally:
            self._delete(name)
            with contextlib.suppress(OSError):
                libc.umount2(str(rootfs), 0)
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.rmtree(layer, ignore_errors=True)

    def _delete(self, name: str) -> None:
        subprocess.run([RUNC, "--root", str(self.state), "delete", "--force", name], check=False,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def close(self) -> None:
        if self.pause_pid:
            self._delete(self.pause)
        shutil.rmtree(self.base, ignore_errors=True)
        _remove_cgroup_parent()
