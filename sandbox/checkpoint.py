"""Checkpoint and restore: CheckpointContainer, and CreateContainer from a checkpoint.

The archive is laid out as CRI-O lays out its own, so that checkpointctl and CRI-O's restore
read flatpod's (names from checkpoint-restore/checkpointctl's metadata package):

    checkpoint/                    CRIU's image files (runc checkpoint --image-path)
    dump.log, stats-dump           CRIU's log and statistics (its --work-path)
    config.dump                    who was checkpointed: id, name, rootfs image, runtime, times
    spec.dump                      the container's OCI spec (config.json), with its annotations
    rootfs-diff.tar                what the container wrote to its rootfs (its overlay upper
                                   dir, without mount points and bind-mount targets)
    deleted.files                  JSON list of the image's files it deleted (only when any)
    io.kubernetes.cri-o.LogPath    the container's CRI log, under CRI-O's name for it

Restore, as CRI-O does it: CreateContainer whose image is such an archive (a local path) or
an OCI image carrying the checkpoint annotation makes a container of the archive's rootfs
image, with its rootfs diff applied, that the shim creates without running anything; its
StartContainer then runs `runc restore` instead of `runc start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cri_api import api_pb2 as pb
from sandbox.config import Config
from sandbox.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from sandbox.images.snapshots import LayerError, extract_tar
from sandbox.records import ContainerRecord, PodRecord
from sandbox.runtime import Runtime
from shim.runc import RuncError, criu_errors, criu_log_errors

CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
DUMP_LOG = "dump.log"
STATS_DUMP = "stats-dump"
CONTAINER_LOG = "io.kubernetes.cri-o.LogPath"
# What marks an OCI image as a container checkpoint: CRI-O's annotation, and the one
# `checkpointctl build` writes.
CHECKPOINT_IMAGE_ANNOTATIONS = (
    "io.kubernetes.cri-o.annotations.checkpoint.name",
    "checkpointctl.annotation.checkpoint.name",
)
# kubelet passes its own timeout (its runtime request timeout, 2 minutes, by default); a
# client that sends none gets this.
DEFAULT_TIMEOUT = 120.0
CRIU_CHECK_TIMEOUT = 30.0
# Paths of the rootfs that runtime mounts cover: what the container "wrote" there is only
# the mount point runc made (podman's and CRI-O's list, plus flatpod's own bind mounts).
MOUNTED_PATHS = ("/dev", "/dev/shm", "/proc", "/sys", "/run/secrets", "/etc/hosts",
                 "/etc/hostname", "/etc/resolv.conf")
# Mounts a restore sets up anew for its own pod; every other bind mount of the checkpointed
# container must be given again in the restoring CreateContainer (CRI-O's rule: an archive
# cannot mount a host path nobody asked for).
POD_MOUNTS = frozenset({"/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
                        "/dev/shm", "/etc/resolv.conf", "/etc/hostname", "/etc/hosts",
                        "/etc/passwd", "/etc/group", "/run/secrets", "/dev/termination-log"})
# The spec.dump annotations checkpointctl shows for an archive that is not CRI-O's or
# Podman's (containerd's names), and the one CRI-O's restore reads the annotations from.
CONTAINERD_NAME_ANNOTATIONS = ("io.kubernetes.cri.container-name",
                               "io.kubernetes.cri.sandbox-name",
                               "io.kubernetes.cri.sandbox-namespace")
CRIO_ANNOTATIONS = "io.kubernetes.cri-o.Annotations"
# The spec annotation that names the CRIU configuration file runc (and crun) hand to CRIU, and
# the file runc hands it when no spec names one (its settings outrank runc's RPC options).
CRIU_CONFIG_ANNOTATION = "org.criu.config"
RUNC_CRIU_CONFIG = Path("/etc/criu/runc.conf")
RESTORE_CRIU_CONFIG = "criu-restore.conf"


# --- where archives may be -------------------------------------------------------------------


def allowed_path(config: Config, location: str, what: str) -> Path:
    """`location` made absolute and normal, if it lies inside one of the checkpoint dirs;
    else INVALID_ARGUMENT naming it and them. Symlinks are resolved by `confined`."""
    if not location or "\x00" in location or not os.path.isabs(location):
        raise InvalidArgument(f"{what} {location!r} must be an absolute path")
    path = Path(os.path.normpath(location))
    if not any(path.is_relative_to(d) and path != d for d in config.checkpoint_dirs):
        raise InvalidArgument(
            f"{what} {location!r} is outside the checkpoint directories "
            f"({', '.join(map(str, config.checkpoint_dirs))}; config key checkpoint_dir)"
        )
    return path


def confined(config: Config, path: Path, what: str) -> None:
    """INVALID_ARGUMENT when `path`'s real location (symlinks followed) leaves the dirs."""
    real = Path(os.path.realpath(path))
    dirs = [Path(os.path.realpath(d)) for d in config.checkpoint_dirs]
    if not any(real.is_relative_to(d) for d in dirs):
        raise InvalidArgument(f"{what} {str(path)!r} resolves to {str(real)!r}, outside the "
                              "checkpoint directories")


# --- CRIU -----------------------------------------------------------------------------------


@dataclass
class Criu:
    """The CRIU binary and what `criu check` said of this kernel, asked once per daemon."""

    path: str
    refusal: str | None = None  # None: not asked yet; "": CRIU works here
    version: str = ""

    def require_binary(self) -> None:
        if not os.access(self.path, os.X_OK):
            raise FailedPrecondition(
                f"checkpoint/restore needs CRIU: {self.path} (config key criu_path) is not an "
                "executable; install criu"
            )

    def require_kernel(self) -> None:
        """FAILED_PRECONDITION with CRIU's reason when it cannot work on this kernel."""
        self.require_binary()
        if self.refusal is None:
            self.refusal, self.version = _criu_check(self.path)
        if self.refusal:
            raise FailedPrecondition(
                f"CRIU ({self.path}{' ' + self.version if self.version else ''}) cannot "
                f"checkpoint on this kernel ({os.uname().release}): `criu check` says: "
                f"{self.refusal}"
            )


def _criu_check(path: str) -> tuple[str, str]:
    """What `criu check` refuses ("" when it passes), and CRIU's version."""
    version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=CRIU_CHECK_TIMEOUT).stdout
        version = out.partition("Version:")[2].split("\n")[0].strip()
    try:
        done = subprocess.run([path, "check"], capture_output=True, text=True,
                              timeout=CRIU_CHECK_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as err:
        return f"it could not run: {err}", version
    if done.returncode == 0:
        return "", version
    text = done.stdout + done.stderr
    return criu_errors(text) or text.strip()[-500:] or f"exit code {done.returncode}", version


# --- CheckpointContainer --------------------------------------------------------------------


@dataclass
class Checkpoints:
    """CheckpointContainer, with the daemon's one CRIU probe."""

    criu: dict[str, Criu] = field(default_factory=dict)

    def criu_of(self, config: Config) -> Criu:
        return self.criu.setdefault(config.criu_path, Criu(config.criu_path))

    async def checkpoint_container(
        self, rt: Runtime, req: pb.CheckpointContainerRequest
    ) -> pb.CheckpointContainerResponse:
        from sandbox.containers import running_container  # which imports this module

        ctr = running_container(rt, req.container_id)
        archive = allowed_path(rt.config, req.location, "checkpoint location")
        if ctr.config.tty:
            raise FailedPrecondition(
                f"container {ctr.id} has a terminal; flatpod checkpoints only containers "
                "without one"
            )
        await asyncio.to_thread(prepare_location, rt.config, archive)
        criu = self.criu_of(rt.config)
        await asyncio.to_thread(criu.require_kernel)
        deadline = time.monotonic() + (req.timeout if req.timeout > 0 else DEFAULT_TIMEOUT)
        async with rt.locks.hold(ctr.id):
            running_container(rt, ctr.id)  # it may have exited while we waited
            await asyncio.to_thread(_checkpoint, rt, ctr, archive, criu.path, deadline)
        return pb.CheckpointContainerResponse()


def prepare_location(config: Config, archive: Path) -> None:
    """The archive's directory made (flatpod's own dir too; kubelet makes its own), and
    checked to be inside the checkpoint dirs once symlinks are followed."""
    config.checkpoint_dirs[0].mkdir(parents=True, exist_ok=True, mode=0o700)
    archive.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    confined(config, archive.parent, "checkpoint location's directory")
    if archive.is_dir():
        raise InvalidArgument(f"checkpoint location {str(archive)!r} is a directory")


def _checkpoint(rt: Runtime, ctr: ContainerRecord, archive: Path, criu: str,
                deadline: float) -> None:
    """Blocking: the archive of a running container, written whole or not at all."""
    staging = archive.parent / f".{archive.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(mode=0o700)
    try:
        pod = rt.pod(ctr.pod_id)
        handler = rt.handlers.of_pod(pod)
        spec = json.loads((rt.paths.bundle_dir(ctr.id) / "config.json").read_text())
        write_dumps(staging, ctr, pod, spec, handler.name)
        runc = replace(handler.runc(), timeout=max(deadline - time.monotonic(), 1.0))
        try:
            runc.checkpoint(ctr.id, str(staging / CHECKPOINT_DIR), str(staging), criu=criu)
        except RuncError as err:
            if err.returncode == -1 and "timed out" in err.stderr:
                raise DeadlineExceeded(
                    f"checkpointing container {ctr.id}: not done within the request's timeout"
                ) from err
            criu_says = criu_log_errors(str(staging / DUMP_LOG))
            raise FailedPrecondition(
                f"checkpointing container {ctr.id}: {err}"
                + (f"; CRIU: {criu_says}" if criu_says else "")
            ) from err
        write_rootfs_diff(staging, rt.paths.writable_layers / ctr.id / "upper", spec)
        if ctr.log_path and os.path.isfile(ctr.log_path):
            shutil.copyfile(ctr.log_path, staging / CONTAINER_LOG)
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"checkpointing container {ctr.id}: not done within the "
                                   "request's timeout")
        write_tar(staging, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_dumps(dest: Path, ctr: ContainerRecord, pod: PodRecord, spec: dict[str, Any],
                runtime: str) -> None:
    """config.dump and spec.dump, as checkpointctl reads them."""
    config = {
        "id": ctr.id,
        "name": ctr.name,
        "rootfsImage": ctr.image_ref,
        "rootfsImageRef": ctr.image_id,
        "rootfsImageName": ctr.image_name,
        "runtime": runtime,
        "createdTime": go_time(ctr.created_at),
        "checkpointedTime": go_time(time.time_ns()),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": False,
    }
    annotations = dict(ctr.config.annotations)
    names = (ctr.config.metadata.name, pod.config.metadata.name, pod.config.metadata.namespace)
    annotations.update(zip(CONTAINERD_NAME_ANNOTATIONS, names, strict=True))
    annotations[CRIO_ANNOTATIONS] = json.dumps(dict(ctr.config.annotations))
    dumped = {**spec, "annotations": {**spec.get("annotations", {}), **annotations}}
    for name, doc in ((CONFIG_DUMP, config), (SPEC_DUMP, dumped)):
        (dest / name).write_text(json.dumps(doc, indent=2))
        os.chmod(dest / name, 0o600)


def go_time(ns: int) -> str:
    """RFC 3339 with nanoseconds in UTC, the way Go's time.Time marshals to JSON."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{moment:%Y-%m-%dT%H:%M:%S}{fraction}Z"


def write_rootfs_diff(dest: Path, upper: Path, spec: dict[str, Any]) -> None:
    """rootfs-diff.tar of what the container changed (its overlay upper dir) and
    deleted.files of what it deleted (the upper dir's whiteouts), minus mount points."""
    skipped = set(MOUNTED_PATHS) | {
        m["destination"] for m in spec.get("mounts", []) if m.get("type") == "bind"
    }
    deleted: list[str] = []
    with tarfile.open(dest / ROOTFS_DIFF, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, entry in _upper_entries(upper):
            if "/" + rel in skipped:
                continue
            if entry.is_char_device() and os.stat(entry, follow_symlinks=False).st_rdev == 0:
                deleted.append("/" + rel)  # overlayfs' whiteout: a file the image had is gone
                continue
            tar.add(entry, arcname=rel, recursive=False)
    os.chmod(dest / ROOTFS_DIFF, 0o600)
    if deleted:
        (dest / DELETED_FILES).write_text(json.dumps(deleted))


def _upper_entries(upper: Path) -> Iterator[tuple[str, Path]]:
    """(path relative to the rootfs, path on disk) of everything in the upper dir, parents
    before children; mount-point directories are not descended into."""
    for top, dirs, files in os.walk(upper):
        base = os.path.relpath(top, upper)
        for name in sorted(dirs + files):
            rel = name if base == "." else f"{base}/{name}"
            yield rel, Path(top, name)
        dirs[:] = sorted(d for d in dirs if "/" + (d if base == "." else f"{base}/{d}")
                         not in MOUNTED_PATHS)


def write_tar(source: Path, archive: Path) -> None:
    """The archive of `source`'s content (names relative to it), 0600 (it holds every memory
    page of the container), renamed into place once complete."""
    partial = archive.with_name(f".{archive.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for entry in sorted(source.iterdir()):
                    tar.add(entry, arcname=entry.name)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, archive)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


# --- restore --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreSource:
    """A checkpoint to restore: an archive file, or the dir holding an image's content."""

    what: str  # how the client named it, for messages
    archive: Path | None = None
    content: Path | None = None


@dataclass(frozen=True)
class Restore:
    """A checkpoint being restored into a new container: where its files were unpacked
    (dumps and, at unpack, CRIU's images) and the CRIU binary."""

    source: RestoreSource
    dumps: Path  # config.dump and spec.dump (an archive's whole content), removed at unpack
    criu: str

    def shim_request(self, layer: Path) -> dict[str, str]:
        return {"image_path": str(layer / CHECKPOINT_DIR), "work_path": str(layer),
                "criu": self.criu}


def restore_source(rt: Runtime, ref: str) -> RestoreSource | None:
    """The checkpoint that a CreateContainer's image names, or None for a plain image."""
    if ref.startswith("/"):
        path = allowed_path(rt.config, ref, "checkpoint archive")
        if not path.is_file():
            raise NotFound(f"checkpoint archive {ref!r} not found")
        confined(rt.config, path, "checkpoint archive")
        return RestoreSource(what=ref, archive=path)
    image = rt.images.images.resolve(ref)
    if image is None or not _is_checkpoint_image(rt, image):
        return None
    if not image.chain_ids:
        raise InvalidArgument(f"checkpoint image {ref!r} has no layers")
    # A checkpoint image is the archive's files as its one layer (podman, checkpointctl).
    return RestoreSource(what=ref, content=rt.images.snapshots.path(image.chain_ids[-1]))


def _is_checkpoint_image(rt: Runtime, image: Any) -> bool:
    try:
        manifest = json.loads(rt.images.content.read(image.manifest_digest))
    except (OSError, ValueError):
        return False
    annotations = manifest.get("annotations") if isinstance(manifest, dict) else None
    return isinstance(annotations, dict) and any(
        key in annotations for key in CHECKPOINT_IMAGE_ANNOTATIONS
    )


async def prepare_restore(
    rt: Runtime, req: pb.CreateContainerRequest, source: RestoreSource
) -> tuple[pb.CreateContainerRequest, Any, Restore]:
    """The CreateContainer request to run instead (the checkpoint's rootfs image and
    process), that image, and the restore to hand to the shim."""
    criu = Criu(rt.config.criu_path)
    criu.require_binary()
    dumps = rt.paths.writable_layers / f".restore-{uuid.uuid4().hex}"
    try:
        await asyncio.to_thread(_read_dumps, rt, source, dumps)
        config_dump = json.loads((dumps / CONFIG_DUMP).read_text())
        spec_dump = json.loads((dumps / SPEC_DUMP).read_text())
        image = _rootfs_image(rt, config_dump, source)
        restored = _restored_request(req, spec_dump, image, source)
    except BaseException:
        shutil.rmtree(dumps, ignore_errors=True)
        raise
    return restored, image, Restore(source, dumps, criu.path)


def _read_dumps(rt: Runtime, source: RestoreSource, dest: Path) -> None:
    """An archive is unpacked whole into `dest` (read once); of an image's content, which
    is unpacked already, only the dumps are copied."""
    dest.mkdir(mode=0o700)
    if source.content is None:
        _unpack_archive(rt, source, dest)
    for name in (CONFIG_DUMP, SPEC_DUMP):
        found = (source.content or dest) / name
        if not found.is_file():
            raise InvalidArgument(f"checkpoint {source.what!r} has no {name}")
        if source.content is not None:
            shutil.copyfile(found, dest / name)


def _unpack_archive(rt: Runtime, source: RestoreSource, dest: Path) -> None:
    assert source.archive is not None
    try:
        extract_tar(source.archive, dest, rt.images.snapshots.limits)
    except (LayerError, OSError) as err:
        raise InvalidArgument(f"checkpoint archive {source.what!r}: {err}") from err


def _rootfs_image(rt: Runtime, config_dump: dict[str, Any], source: RestoreSource) -> Any:
    for key in ("rootfsImageRef", "rootfsImageName", "rootfsImage"):
        ref = config_dump.get(key)
        image = rt.images.images.resolve(ref) if isinstance(ref, str) and ref else None
        if image is not None:
            return image
    raise NotFound(
        f"the image the checkpoint {source.what!r} was taken from "
        f"({config_dump.get('rootfsImageName') or config_dump.get('rootfsImage')!r}) is not "
        "present; pull it first"
    )


def _restored_request(req: pb.CreateContainerRequest, spec_dump: dict[str, Any], image: Any,
                      source: RestoreSource) -> pb.CreateContainerRequest:
    """The request with the checkpoint's rootfs image and process (CRIU restores the
    process, but the spec describes it: cwd, env, args)."""
    restored = pb.CreateContainerRequest()
    restored.CopyFrom(req)
    config = restored.config
    config.image.image = image.repo_tags[0] if image.repo_tags else image.id
    process = spec_dump.get("process") or {}
    del config.command[:]
    del config.args[:]
    config.args.extend(str(a) for a in process.get("args") or [])
    if not config.envs:
        for pair in process.get("env") or []:
            key, _, value = str(pair).partition("=")
            config.envs.add(key=key, value=value)
    config.working_dir = config.working_dir or str(process.get("cwd") or "")
    given = {m.container_path for m in config.mounts}
    missing = sorted(
        m["destination"] for m in spec_dump.get("mounts", [])
        if m.get("type") == "bind" and m["destination"] not in POD_MOUNTS
        and m["destination"] not in given
    )
    if missing:
        raise InvalidArgument(
            f"restoring {source.what!r} needs these bind mounts in the container config: "
            f"{', '.join(missing)}"
        )
    return restored


async def restore_into_own_cgroup(rt: Runtime, pod: PodRecord, spec: dict[str, Any],
                                  layer: Path, cgroup_path: str) -> None:
    """Makes CRIU restore the processes into the new container's cgroup (`cgroup_path`, below
    the hierarchy's root), not into the one they had at checkpoint time.

    runc 1.1 tells CRIU the new cgroup (its --cgroup-root) on cgroup v1 only; on v2 CRIU puts
    the processes back at the checkpointed container's path, making it as a plain directory
    when it is gone. The new container's own cgroup (the systemd scope that runc asked for
    with only CRIU in it) then empties when CRIU exits, systemd removes it, and the container
    can be neither stopped ("lstat ...scope: no such file") nor its stray cgroup cleaned up.
    runc 1.2 passes the root on v2 too. Here a CRIU configuration file names it, through the
    annotation runc reads, with the node's runc.conf kept ahead of it. Only for runc: crun
    gives CRIU the root itself, and refuses the annotation with a CRIU older than 4.2."""
    handler = rt.handlers.of_pod(pod).name if rt.handlers.is_configured(pod) else None
    features = await asyncio.to_thread(rt.handlers.features, handler or rt.handlers.default)
    if features.runc_version:
        await asyncio.to_thread(_write_restore_criu_config, spec, layer, cgroup_path)


def _write_restore_criu_config(spec: dict[str, Any], layer: Path, cgroup_path: str) -> None:
    config = layer / RESTORE_CRIU_CONFIG
    node_settings = RUNC_CRIU_CONFIG.read_text() if RUNC_CRIU_CONFIG.is_file() else ""
    if node_settings and not node_settings.endswith("\n"):
        node_settings += "\n"
    config.write_text(f"{node_settings}cgroup-root {cgroup_path}\n")
    spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(config)


async def unpack_restore(rt: Runtime, restore: Restore, layer: Path) -> None:
    """CRIU's images into <layer>/checkpoint, the rootfs diff into the (not yet mounted)
    upper dir, the deleted files as whiteouts there."""
    await asyncio.to_thread(_unpack_restore, rt, restore, layer)


def _unpack_restore(rt: Runtime, restore: Restore, layer: Path) -> None:
    source = restore.source
    unpacked = source.content or restore.dumps
    images = unpacked / CHECKPOINT_DIR
    if not images.is_dir():
        raise InvalidArgument(f"checkpoint {source.what!r} has no {CHECKPOINT_DIR}/ directory")
    if source.content is None:
        os.rename(images, layer / CHECKPOINT_DIR)
    else:
        shutil.copytree(images, layer / CHECKPOINT_DIR, copy_function=_link_or_copy)
    deleted: list[str] = []
    if (unpacked / DELETED_FILES).is_file():
        raw = json.loads((unpacked / DELETED_FILES).read_text())
        deleted = [str(p) for p in raw] if isinstance(raw, list) else []
    diff = unpacked / ROOTFS_DIFF
    if diff.is_file():
        try:
            extract_tar(diff, layer / "upper", rt.images.snapshots.limits, deleted)
        except (LayerError, OSError) as err:
            raise InvalidArgument(f"checkpoint {source.what!r}: {ROOTFS_DIFF}: {err}") from err
    shutil.rmtree(restore.dumps, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> object:
    """Image snapshots and writable layers share the root dir: a hard link costs nothing,
    and CRIU only reads its images."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def discard_images(rt: Runtime, ctr: ContainerRecord) -> None:
    """Once restored, the container's CRIU images (its memory pages) are not needed."""
    shutil.rmtree(rt.paths.writable_layers / ctr.id / CHECKPOINT_DIR, ignore_errors=True)
