"""The physical floor: `runc create` + `runc start` of a catatonit pause alone, no network
setup and no CRI, in a bundle with a minimal config.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

RUNC = "/usr/sbin/runc"
CATATONIT = "/usr/bin/catatonit"
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
