"""Image content is hostile: every artefact is built here, pushed to the real local registry
and pulled by a real daemon.

- files flatpod reads from a rootfs (/etc/passwd, /etc/group): a FIFO, a device node, a file
  past the size cap, a symlink to the host's /etc/shadow;
- layers: a pax header bomb, a GNU long-name bomb, sparse entries, a gzip expansion bomb and
  too many entries, with the daemon's RSS measured around them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cri_api import api_pb2 as pb
from sandbox import acl, users
from sandbox.images.snapshots import LayerLimits, LayerTooLarge, unpack_layer
from sandbox.images.tarreader import (
    TarFormatError,
    TarLimitExceeded,
    TarLimits,
    TarReader,
)
from tests.cri import CriClient, status_code
from tests.daemon import Daemon, running_daemon
from tests.pods import a_pod, container_config
from tests.support import oci
from tests.support.oci import (
    Entry,
    ImageConfig,
    Layer,
    LayerSpec,
    build_image,
    build_layer,
    busybox_layer,
    device,
    fifo,
    file,
    symlink,
)
from tests.support.plugin import REPO_PREFIX
from tests.support.registry import Registry

GIB = 1 << 30
BOMB_CAP = 64 << 20  # the test daemon's images.max_layer_bytes
# A bomb must cost the daemon nothing it keeps. 50 MiB is far below any bomb here (each would
# take a GiB with an unbounded reader) and far above the noise of a pull (a few MiB).
RSS_GROWTH_LIMIT = 50 << 20
# "Within seconds": generous for a loaded 2-core machine; the work itself is milliseconds.
ANSWER_WITHIN = 20.0


# ---- artefacts --------------------------------------------------------------------------------


def header(name: str, kind: bytes, size: int, **fields: str) -> bytes:
    """One raw 512-byte ustar header, with whatever size it is told to declare."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(format=tarfile.GNU_FORMAT)[-512:]


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return f"{length}{body.decode()}".encode()


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def gzip_with_zeros(prefix: bytes, zeros: int) -> bytes:
    """gzip of `prefix` followed by `zeros` zero bytes, built without holding them."""
    out = io.BytesIO()
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    out.write(comp.compress(prefix))
    chunk = bytes(1 << 20)
    for _ in range(zeros // len(chunk)):
        out.write(comp.compress(chunk))
    out.write(comp.flush())
    return out.getvalue()


def raw_layer(blob: bytes, comment: str, diff_id: str | None = None) -> Layer:
    """A layer from raw bytes. A bomb's diff id need not be right: it is refused first."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return Layer(blob, digest, diff_id or "sha256:" + "0" * 64, "gzip", comment)


def pax_header_bomb() -> bytes:
    """A pax header declaring 1 GiB, and the GiB after it (tarfile would read it all)."""
    return gzip_with_zeros(header("PaxHeaders/x", tarfile.XHDTYPE, GIB), GIB)


def long_name_bomb() -> bytes:
    return gzip_with_zeros(header("././@LongLink", tarfile.GNUTYPE_LONGNAME, GIB), GIB)


def gnu_sparse_entry() -> bytes:
    return gzip.compress(header("sparse", tarfile.GNUTYPE_SPARSE, 0) + bytes(1024))


def pax_sparse_entry() -> bytes:
    records = pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
    tar = header("PaxHeaders/s", tarfile.XHDTYPE, len(records)) + padded(records)
    tar += header("sparse", tarfile.REGTYPE, 512) + bytes(512) + bytes(1024)
    return gzip.compress(tar)


def expansion_bomb() -> bytes:
    """A plain file of 1 GiB of zeros: a ~5 MiB blob."""
    return gzip_with_zeros(header("zeros", tarfile.REGTYPE, GIB), GIB)


# ---- the tar reader alone ---------------------------------------------------------------------


def read_all(tar: bytes, limits: TarLimits | None = None) -> list[tarfile.TarInfo]:
    reader = TarReader(io.BytesIO(tar), limits)
    members = []
    for member in reader:
        data = reader.extractfile(member)
        if data is not None:
            data.read()
        members.append(member)
    return members


class Counting(io.BytesIO):
    """Counts what the reader asks of the stream, to show it stops at the header."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.consumed += len(data)
        return data


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                                  tarfile.GNUTYPE_LONGLINK])
def test_extended_header_bomb_is_refused_before_it_is_read(kind: bytes) -> None:
    stream = Counting(header("bomb", kind, GIB) + bytes(4096))
    with pytest.raises(TarLimitExceeded, match="extended headers"):
        list(TarReader(stream))
    assert stream.consumed == 512


def test_many_small_extended_headers_add_up_to_the_limit() -> None:
    record = pax_record("comment", "x" * 1000)
    block = header("PaxHeaders/x", tarfile.XHDTYPE, len(record)) + padded(record)
    with pytest.raises(TarLimitExceeded):
        list(TarReader(io.BytesIO(block * 1100)))


@pytest.mark.parametrize("blob", [gnu_sparse_entry, pax_sparse_entry])
def test_sparse_entries_are_refused(blob: Callable[[], bytes]) -> None:
    with pytest.raises(TarFormatError, match="sparse"):
        read_all(gzip.decompress(blob()))


def test_entry_count_is_capped() -> None:
    tar = b"".join(header(f"f{i}", tarfile.REGTYPE, 0) for i in range(11)) + bytes(1024)
    assert len(read_all(tar, TarLimits(max_entries=11))) == 11
    with pytest.raises(TarLimitExceeded, match="more than 10 entries"):
        read_all(tar, TarLimits(max_entries=10))


def test_reader_agrees_with_tarfile_on_real_layers() -> None:
    """Names, types, sizes, links, ids, modes and xattrs as tarfile reads them, for pax and GNU
    archives with long names and links, devices, hardlinks, and a pax size override."""
    long = "d/" + "n" * 150 + "/" + "f" * 120
    entries = [
        tarfile.TarInfo(long), tarfile.TarInfo("link"), tarfile.TarInfo("hard"),
        tarfile.TarInfo("dev"), tarfile.TarInfo("dir/"),
    ]
    entries[0].size = 3
    entries[0].pax_headers = {"SCHILY.xattr.user.k": "v"}
    entries[1].type, entries[1].linkname = tarfile.SYMTYPE, "/" + "t" * 200
    entries[2].type, entries[2].linkname = tarfile.LNKTYPE, long
    entries[3].type, entries[3].devmajor, entries[3].devminor = tarfile.CHRTYPE, 1, 3
    entries[4].type, entries[4].mode, entries[4].uid = tarfile.DIRTYPE, 0o1777, 70000
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for entry in entries:
                tar.addfile(entry, io.BytesIO(b"abc") if entry.isreg() else None)
        ours = read_all(buf.getvalue())
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
            theirs = tar.getmembers()
        fields = ("name", "type", "size", "linkname", "uid", "gid", "mode", "mtime",
                  "devmajor", "devminor")
        assert [[getattr(m, f) for f in fields] for m in ours] == [
            [getattr(m, f) for f in fields] for m in theirs
        ]
        assert ours[0].pax_headers.get("SCHILY.xattr.user.k") == (
            "v" if fmt == tarfile.PAX_FORMAT else None
        )
    # A pax size replaces the header's, for the data that follows.
    record = pax_record("size", "5")
    tar = header("PaxHeaders/f", tarfile.XHDTYPE, len(record)) + padded(record)
    tar += header("f", tarfile.REGTYPE, 0) + padded(b"hello") + header("g", tarfile.REGTYPE, 0)
    reader = TarReader(io.BytesIO(tar + bytes(1024)))
    names = []
    for member in reader:
        data = reader.extractfile(member)
        names.append((member.name, data.read() if data else b""))
    assert names == [("f", b"hello"), ("g", b"")]


def test_expansion_is_stopped_while_it_streams(tmp_path: Path) -> None:
    blob = tmp_path / "bomb"
    blob.write_bytes(gzip_with_zeros(header("zeros", tarfile.REGTYPE, 256 << 20), 256 << 20))
    dest = tmp_path / "dest"
    dest.mkdir()
    seen: list[int] = []
    with pytest.raises(LayerTooLarge, match="more than 16777216 bytes"):
        unpack_layer(blob, dest, "sha256:" + "0" * 64, seen.append, LayerLimits(max_bytes=16 << 20))
    assert sum(seen) <= (16 << 20) + (1 << 20)  # stopped within one read of the cap


# ---- through the daemon -----------------------------------------------------------------------


def push(registry: Registry, layers: list[Layer], config: ImageConfig | None = None) -> str:
    repo = f"{REPO_PREFIX}/hostile-{uuid.uuid4().hex[:10]}"
    image = build_image(layers, config or ImageConfig(cmd=("sh",)))
    registry.client().push(repo, "latest", image)
    return f"{registry.host}/{repo}:latest"


def rss(daemon: Daemon) -> int:
    assert daemon.process is not None
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def pull_error(cri: CriClient, ref: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return caught.value


@pytest.fixture(scope="module")
def bomb_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("bombs")
    with running_daemon(base, f"[images]\nmax_layer_bytes = {BOMB_CAP}\n") as daemon:
        yield daemon


@pytest.mark.parametrize(("name", "build", "code", "message"), [
    ("pax header bomb", pax_header_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "extended headers"),
    ("long name bomb", long_name_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "extended headers"),
    ("expansion bomb", expansion_bomb, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_layer_bytes"),
    ("GNU sparse", gnu_sparse_entry, grpc.StatusCode.INVALID_ARGUMENT, "sparse"),
    ("pax sparse", pax_sparse_entry, grpc.StatusCode.INVALID_ARGUMENT, "sparse"),
])
def test_layer_bombs_fail_the_pull_and_cost_nothing(
    bomb_daemon: Daemon, registry: Registry, name: str, build: Callable[[], bytes],
    code: grpc.StatusCode, message: str,
) -> None:
    ref = push(registry, [busybox_layer(), raw_layer(build(), name)])
    cri = bomb_daemon.client()
    try:
        before = rss(bomb_daemon)
        started = time.monotonic()
        err = pull_error(cri, ref)
        took = time.monotonic() - started
        grown = rss(bomb_daemon) - before
        assert status_code(err) == code, err.details()
        assert message in (err.details() or "")
        assert took < ANSWER_WITHIN, took
        assert grown < RSS_GROWTH_LIMIT, f"{name}: RSS grew {grown >> 20} MiB"
        # Nothing half-unpacked stays, and the daemon keeps serving.
        snapshots = bomb_daemon.root / "snapshots"
        assert not [p.name for p in snapshots.iterdir() if p.name.startswith(".tmp-")]
        assert not cri.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))).image.id
        cri.Version(pb.VersionRequest())
    finally:
        cri.close()


def test_entry_count_cap_fails_the_pull(tmp_path: Path, registry: Registry) -> None:
    many = build_layer(LayerSpec(tuple(file(f"many/{i}", "") for i in range(50))))
    ref = push(registry, [many])
    with running_daemon(tmp_path, "[images]\nmax_layer_entries = 40\n") as daemon:
        cri = daemon.client()
        try:
            err = pull_error(cri, ref)
            assert status_code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "more than 40 entries" in (err.details() or "")
        finally:
            cri.close()


# ---- files read from the rootfs ---------------------------------------------------------------


HOSTILE_DBS: dict[str, tuple[list[Entry], str]] = {
    "fifo": ([fifo("etc/passwd")], "/etc/passwd is a FIFO"),
    "char device": ([device("etc/group", "char", 1, 5)], "/etc/group is a character device"),
    "block device": ([device("etc/passwd", "block", 7, 0)], "/etc/passwd is a block device"),
    "directory": ([file("etc/passwd/x", "")], "/etc/passwd is a directory"),
    "oversized": ([file("etc/group", b"g:x:1:\n" * (users.MAX_DB_BYTES // 7 + 1))],
                  f"more than the {users.MAX_DB_BYTES}"),
}


def hostile_db_image(registry: Registry, entries: list[Entry]) -> str:
    """busybox with a layer above it putting `entries` where its /etc/passwd or /etc/group
    were (in an overlay, an upper entry of any type hides the lower file)."""
    hostile = build_layer(LayerSpec(tuple(entries), comment="hostile db"))
    return push(registry, [busybox_layer(), hostile])


@pytest.mark.parametrize("case", sorted(HOSTILE_DBS))
def test_hostile_user_db_fails_create_container(
    cri: CriClient, registry: Registry, tmp_path: Path, case: str
) -> None:
    entries, message = HOSTILE_DBS[case]
    ref = hostile_db_image(registry, entries)
    cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    with a_pod(cri, tmp_path) as (pod_id, pod):
        config = container_config(ref, command=["true"])
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            cri.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod))
        assert time.monotonic() - started < ANSWER_WITHIN
        assert status_code(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert message in (caught.value.details() or "")
        # Nothing of the container is left, and the daemon keeps serving.
        assert not cri.ListContainers(pb.ListContainersRequest()).containers


def test_passwd_symlink_to_host_shadow_is_read_inside_the_image(
    cri: CriClient, registry: Registry, tmp_path: Path
) -> None:
    """/etc/passwd -> ../../../../etc/shadow: resolved inside the rootfs, where no shadow is.
    Read on the host, shadow's "root:<hash>:<days>:0:..." would make user root uid <days>."""
    ref = hostile_db_image(registry, [symlink("etc/passwd", "../../../../../../etc/shadow")])
    cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    with a_pod(cri, tmp_path) as (pod_id, pod):
        config = container_config(ref, command=["true"], linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(run_as_username="root")))
        with pytest.raises(grpc.RpcError) as caught:
            cri.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod))
        assert status_code(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert "user 'root' not found" in (caught.value.details() or "")


def test_user_db_checks_in_process(tmp_path: Path) -> None:
    """The same rules without a daemon: a FIFO never blocks, a sparse 10 GiB passwd is refused
    from its size without reading it."""
    import os

    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc" / "passwd")
    with pytest.raises(users.UnsafeImageFile, match="FIFO"):
        users.read_in_root(root, "etc/passwd")
    os.unlink(root / "etc" / "passwd")
    with open(root / "etc" / "passwd", "wb") as f:
        f.truncate(10 * GIB)
    started = time.monotonic()
    with pytest.raises(users.UnsafeImageFile, match="10737418240 bytes"):
        users.UserDb.from_rootfs(root)
    assert time.monotonic() - started < ANSWER_WITHIN


# ---- what a layer holds stays out of host users' reach ----------------------------------------

USERNS_HOST_ID = 300000  # no host account has it: only the pod's namespace is these ids
OTHER_USERNS_HOST_ID = 400000  # a second pod's
STALE_HOST_ID = 500000  # a pod a crash forgot to take out of the dirs' ACL


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return as_host_ids(65534, *argv)


def as_host_ids(host_id: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` as host uid and gid `host_id`, no supplementary groups (what a pod's root is on
    the host, or user nobody)."""
    return subprocess.run(
        ["setpriv", "--reuid", str(host_id), "--regid", str(host_id), "--clear-groups", *argv],
        capture_output=True, text=True, timeout=30,
    )


def assert_denied(*argv: str, host_id: int = 65534) -> None:
    denied = as_host_ids(host_id, *argv)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, (
        argv, denied.stdout, denied.stderr)


def hostile_devices_image(cri: CriClient, registry: Registry) -> str:
    """An image with a world-writable /dev/mem-like node, a block device, a setuid-root copy of
    busybox and a world-writable file, pulled."""
    with open(oci.HOST_BUSYBOX, "rb") as f:
        binary = f.read()
    hostile = build_layer(LayerSpec((
        device("opt/mem", "char", 1, 1, mode=0o666),
        device("opt/disk", "block", 7, 0, mode=0o666),
        file("opt/suid-sh", binary, mode=0o4755),
        file("opt/open", "anyone\n", mode=0o666),
    ), comment="devices and setuid"))
    ref = push(registry, [busybox_layer(), hostile])
    cri.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def userns_fields(host_id: int) -> dict[str, object]:
    mapping = [pb.IDMapping(container_id=0, host_id=host_id, length=65536)]
    opts = pb.NamespaceOption(userns_options=pb.UserNamespace(
        mode=pb.POD, uids=mapping, gids=mapping))
    return {"linux": pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(namespace_options=opts))}


def sleeper(cri: CriClient, ref: str, pod_id: str, pod: pb.PodSandboxConfig) -> str:
    """A running container of `ref` in the pod, with the pod's namespace options."""
    config = container_config(ref, command=["sleep", "1000"])
    config.linux.security_context.namespace_options.CopyFrom(
        pod.linux.security_context.namespace_options)
    ctr_id: str = cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod)).container_id
    cri.StartContainer(pb.StartContainerRequest(container_id=ctr_id))
    return ctr_id


def reads_its_rootfs(cri: CriClient, ctr_id: str) -> None:
    inside = cri.ExecSync(pb.ExecSyncRequest(
        container_id=ctr_id, cmd=["cat", "/opt/open"], timeout=10))
    assert inside.stdout == b"anyone\n", inside.stderr


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "no-userns"])
def test_layer_devices_and_setuid_files_are_out_of_host_users_reach(
    cri: CriClient, daemon: Daemon, registry: Registry, tmp_path: Path, userns: bool
) -> None:
    """The hostile image run in a pod (with and without a user namespace): the container
    works, and host user nobody reaches none of it, nor the pod's files or /dev/shm."""
    ref = hostile_devices_image(cri, registry)
    fields = userns_fields(USERNS_HOST_ID) if userns else {}
    with a_pod(cri, tmp_path, **fields) as (pod_id, pod):
        ctr_id = sleeper(cri, ref, pod_id, pod)
        reads_its_rootfs(cri, ctr_id)
        rootfs = daemon.state / "containers" / ctr_id / "rootfs"
        pod_dir = daemon.state / "pods" / pod_id
        assert (rootfs / "opt" / "suid-sh").stat().st_mode & 0o4000  # root sees it
        for target in ("opt/mem", "opt/disk", "opt/suid-sh", "opt/open"):
            assert_denied("stat", str(rootfs / target))
        run = as_nobody(str(rootfs / "opt" / "suid-sh"), "-c", "id -u")
        assert run.returncode != 0 and run.stdout == "", run.stdout  # never ran
        for target in (pod_dir / "shm", pod_dir / "hostname"):
            assert_denied("stat", str(target))
        for directory in (rootfs.parent, pod_dir, *shared_dirs(daemon)):
            assert directory.stat().st_mode & 0o007 == 0, oct(directory.stat().st_mode)


def shared_dirs(daemon: Daemon) -> tuple[Path, Path, Path]:
    """The dirs above every pod's files: the state dir, pods/ and the bundles (containers/)."""
    return daemon.state, daemon.state / "pods", daemon.state / "containers"


def pod_files(daemon: Daemon, pod_id: str, ctr_id: str) -> list[Path]:
    pod_dir, bundle = daemon.state / "pods" / pod_id, daemon.state / "containers" / ctr_id
    return [
        pod_dir, pod_dir / "hostname", pod_dir / "resolv.conf", pod_dir / "shm",
        pod_dir / "ns" / "user", pod_dir / "shim.sock", daemon.state / "containers" / pod_id,
        bundle, bundle / "config.json", bundle / "rootfs" / "opt" / "mem",
        bundle / "rootfs" / "opt" / "open", bundle / "rootfs" / "bin" / "sh",
    ]


def assert_closed(daemon: Daemon, pods: dict[int, tuple[str, str]]) -> None:
    """Host user nobody lists and traverses none of the shared dirs and reaches no file of
    any pod; each pod's root (its host ids) may traverse the shared dirs, list none of them,
    and reach only its own pod's dir."""
    for directory in shared_dirs(daemon):
        assert directory.stat().st_mode & 0o077 == 0o010, oct(directory.stat().st_mode)
        assert_denied("ls", str(directory))
    assert_denied("stat", str(daemon.state / "pods"))  # traversing the state dir
    for host_id, (pod_id, ctr_id) in pods.items():
        assert_denied("stat", str(daemon.state / "pods" / pod_id))  # traversing pods/
        for path in pod_files(daemon, pod_id, ctr_id):
            assert path.exists(), path
            assert_denied("stat", str(path))
        own = as_host_ids(host_id, "stat", str(daemon.state / "pods" / pod_id / "hostname"))
        assert own.returncode == 0, own.stderr
        assert_denied("ls", str(daemon.state / "pods"), host_id=host_id)
        for other_id, (other_pod, _ctr) in pods.items():
            if other_id != host_id:
                assert_denied("stat", str(daemon.state / "pods" / other_pod / "hostname"),
                              host_id=host_id)


def test_shared_state_dirs_stay_closed_with_userns_pods_and_across_restarts(
    cri: CriClient, daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    """Two user-namespace pods with different host ids: the state, pods/ and bundles dirs
    stay 0700 to host users (each pod's root group gets an ACL entry to traverse them, which
    runc needs from inside the namespace), before and after a daemon restart that must also
    drop a stale entry; after both pods go, no entry of theirs remains."""
    ref = hostile_devices_image(cri, registry)
    with (a_pod(cri, tmp_path, **userns_fields(USERNS_HOST_ID)) as (first, first_cfg),
          a_pod(cri, tmp_path, **userns_fields(OTHER_USERNS_HOST_ID)) as (second, second_cfg)):
        pods = {USERNS_HOST_ID: (first, sleeper(cri, ref, first, first_cfg)),
                OTHER_USERNS_HOST_ID: (second, sleeper(cri, ref, second, second_cfg))}
        for _pod_id, ctr_id in pods.values():
            reads_its_rootfs(cri, ctr_id)
        for directory in shared_dirs(daemon):
            assert acl.named_groups(directory) == set(pods), directory
        assert_closed(daemon, pods)

        daemon.stop()  # a crash left a removed pod's entry; startup chmods the dirs 0700
        for directory in shared_dirs(daemon):
            acl.owner_only_but_traversable_by(directory, {*pods, STALE_HOST_ID})
        daemon.start()
        for directory in shared_dirs(daemon):
            assert acl.named_groups(directory) == set(pods), directory
        assert_closed(daemon, pods)
        for _pod_id, ctr_id in pods.values():
            reads_its_rootfs(cri, ctr_id)
        # A new container after the restart: runc reaches its bundle from inside the userns.
        reads_its_rootfs(cri, sleeper(cri, ref, first, first_cfg))

        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=first))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=first))
        for directory in shared_dirs(daemon):
            assert acl.named_groups(directory) == {OTHER_USERNS_HOST_ID}, directory
        reads_its_rootfs(cri, pods[OTHER_USERNS_HOST_ID][1])
    for directory in shared_dirs(daemon):  # no ACL left at all: the dirs are plain 0700
        assert acl.read(directory) == [], directory
        assert directory.stat().st_mode & 0o7777 == 0o700, oct(directory.stat().st_mode)
