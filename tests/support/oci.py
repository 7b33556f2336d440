"""Deterministic OCI image builder and a minimal distribution-API push client for tests.

Everything is built in memory from fixed descriptions: fixed mtimes, owners and entry order,
and gzip headers with mtime 0. So the same host (same /bin/busybox, same zlib) always gives
byte-identical blobs and the same digests. No network access except the registry we push to.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Literal

import zstandard

FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z: any constant works, 0 upsets some tools
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_BUSYBOX = "/bin/busybox"

Compression = Literal["gzip", "zstd", "none"]
Format = Literal["oci", "docker"]
EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_media_type(fmt: Format, compression: Compression) -> str:
    if fmt == "oci":
        suffix = {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]
        return OCI_LAYER_TAR + suffix
    if compression == "zstd":
        raise ValueError("Docker schema 2 has no zstd layer media type; use the OCI format")
    return DOCKER_LAYER_TAR + (".gzip" if compression == "gzip" else "")


# ---------------------------------------------------------------------------------------------
# layer descriptions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry. `path` is relative to the rootfs, without a leading slash."""

    path: str
    kind: EntryKind
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME
    link: str = ""  # symlink target, or the rootfs-relative path a hardlink points at
    devmajor: int = 0
    devminor: int = 0


def _clean(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad layer path {path!r}")
    return "/".join(parts)


def file(path: str, data: bytes | str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    raw = data.encode() if isinstance(data, str) else data
    return Entry(_clean(path), "file", raw, mode, uid, gid)


def directory(path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(_clean(path), "dir", mode=mode, uid=uid, gid=gid)


def symlink(path: str, target: str) -> Entry:
    return Entry(_clean(path), "symlink", mode=0o777, link=target)


def hardlink(path: str, target: str) -> Entry:
    """A hardlink to `target`, which must be an earlier entry of the same layer."""
    return Entry(_clean(path), "hardlink", link=_clean(target))


def device(
    path: str, kind: Literal["char", "block"], major: int, minor: int, *, mode: int = 0o666
) -> Entry:
    return Entry(_clean(path), kind, mode=mode, devmajor=major, devminor=minor)


def fifo(path: str, *, mode: int = 0o644) -> Entry:
    return Entry(_clean(path), "fifo", mode=mode)


def whiteout(path: str) -> Entry:
    """Marks `path` (from a lower layer) as deleted: an empty `.wh.<name>` file beside it."""
    p = PurePosixPath(_clean(path))
    marker = WHITEOUT_PREFIX + p.name
    return Entry(marker if str(p.parent) == "." else f"{p.parent}/{marker}", "file", mode=0)


def opaque(dirpath: str) -> Entry:
    """Hides everything lower layers put in `dirpath`; this layer's own entries stay."""
    return Entry(_clean(dirpath) + "/" + OPAQUE_MARKER, "file", mode=0)


@dataclass(frozen=True)
class LayerSpec:
    entries: tuple[Entry, ...]
    compression: Compression = "gzip"
    comment: str = "flatpod test layer"  # becomes the history entry's created_by
    level: int = 6  # gzip or zstd level


def _ordered(entries: Iterable[Entry]) -> Iterator[Entry]:
    """Entries in the given order, each preceded by its missing parent directories.

    Insertion order (not sorted order) is kept on purpose: a hardlink must come after its
    target, which sorting would not guarantee.
    """
    given = list(entries)
    declared_dirs = {e.path: e for e in given if e.kind == "dir"}
    emitted: set[str] = set()
    for e in given:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in emitted:
                emitted.add(parent)
                yield declared_dirs.get(parent, directory(parent))
        if e.path in emitted:
            if e.kind == "dir":
                continue  # already emitted as a parent, using this very entry
            raise ValueError(f"duplicate layer entry {e.path!r}")
        if e.kind == "hardlink" and e.link not in emitted:
            raise ValueError(f"hardlink {e.path!r} before its target {e.link!r}")
        emitted.add(e.path)
        yield e


_TAR_TYPES: Mapping[str, bytes] = MappingProxyType(
    {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "char": tarfile.CHRTYPE,
        "block": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
)


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path)
    info.type = _TAR_TYPES[e.kind]
    info.mode = e.mode
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""  # names would leak the build host's user database
    info.mtime = e.mtime
    info.linkname = e.link
    info.devmajor, info.devminor = e.devmajor, e.devminor
    info.size = len(e.data) if e.kind == "file" else 0
    return info


def layer_tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in _ordered(entries):
            tar.addfile(_tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression, level: int = 6) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor(level=level).compress(data))
    return data


def decompress(data: bytes, media_type: str) -> bytes:
    """The layer tar inside a layer blob, by the blob's media type."""
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    if media_type.endswith("zstd"):
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


@dataclass(frozen=True)
class Layer:
    """A built layer blob. Its media type depends on the manifest format, see media_type()."""

    data: bytes
    digest: str
    diff_id: str
    compression: Compression
    comment: str

    def media_type(self, fmt: Format) -> str:
        return layer_media_type(fmt, self.compression)


def build_layer(spec: LayerSpec) -> Layer:
    tar = layer_tar(spec.entries)
    blob = compress(tar, spec.compression, spec.level)
    return Layer(blob, sha256_digest(blob), sha256_digest(tar), spec.compression, spec.comment)


# ---------------------------------------------------------------------------------------------
# images and indexes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    digest: str

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, data, sha256_digest(data))

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class ImageConfig:
    """The `config` object of the image config JSON; empty fields are left out."""

    env: tuple[str, ...] = (PATH_ENV,)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()  # "80/tcp"
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.user:
            out["User"] = self.user
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.env:
            out["Env"] = list(self.env)
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.labels:
            out["Labels"] = dict(sorted(self.labels.items()))
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        return out


def _json_bytes(doc: Mapping[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Platform:
    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Image:
    fmt: Format
    platform: Platform
    layers: tuple[Layer, ...]
    config: Blob
    manifest: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def config_digest(self) -> str:
        """The image id as CRI reports it."""
        return self.config.digest


def build_image(
    layers: Sequence[Layer],
    config: ImageConfig,
    *,
    fmt: Format = "oci",
    platform: Platform | None = None,
) -> Image:
    plat = platform or Platform()
    config_doc: dict[str, object] = {"created": CREATED, **plat.to_json()}
    config_doc["config"] = config.to_json()
    config_doc["rootfs"] = {"type": "layers", "diff_ids": [la.diff_id for la in layers]}
    config_doc["history"] = [{"created": CREATED, "created_by": la.comment} for la in layers]
    config_blob = Blob.of(OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG, _json_bytes(config_doc))
    manifest_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_blob.descriptor(),
        "layers": [
            {"mediaType": la.media_type(fmt), "digest": la.digest, "size": len(la.data)}
            for la in layers
        ],
    }
    manifest = Blob.of(manifest_type, _json_bytes(manifest_doc))
    return Image(fmt, plat, tuple(layers), config_blob, manifest)


@dataclass(frozen=True)
class Index:
    """An OCI image index or a Docker manifest list."""

    fmt: Format
    images: tuple[Image, ...]
    manifest: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def for_platform(self, platform: Platform) -> Image:
        for image in self.images:
            if image.platform == platform:
                return image
        raise KeyError(str(platform))


def build_index(images: Sequence[Image], *, fmt: Format = "oci") -> Index:
    index_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    doc = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            {**im.manifest.descriptor(), "platform": im.platform.to_json()} for im in images
        ],
    }
    return Index(fmt, tuple(images), Blob.of(index_type, _json_bytes(doc)))


Artifact = Image | Index


# ---------------------------------------------------------------------------------------------
# registry client (distribution API v2 over plain HTTP)
# ---------------------------------------------------------------------------------------------


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class RegistryClient:
    """Talks to one registry at `host` ("127.0.0.1:PORT"), optionally with basic auth."""

    host: str
    auth: tuple[str, str] | None = None
    timeout: float = 30.0
    # blob digest -> a repository known to hold it, for cross-repository mounts
    _holders: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request; any status is returned, never raised. `path` may be a full URL."""
        url = urllib.parse.urljoin(self.url, path)
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        # An empty ProxyHandler: an http_proxy in the environment must not catch loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                return Response(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            err.close()
            return Response(err.code, dict(err.headers.items()), body)

    def _expect(self, resp: Response, *ok: int, what: str) -> Response:
        if resp.status not in ok:
            raise RegistryError(f"{what}: HTTP {resp.status}: {resp.body[:500]!r}")
        return resp

    def ping(self) -> int:
        return self.request("GET", "/v2/").status

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}").status == 200

    def get_blob(self, repo: str, digest: str) -> bytes:
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        return self._expect(resp, 200, what=f"GET blob {repo}@{digest}").body

    def push_blob(self, repo: str, digest: str, data: bytes) -> None:
        if self.blob_exists(repo, digest):
            return
        start = f"/v2/{repo}/blobs/uploads/"
        holder = self._holders.get(digest)
        if holder is not None and holder != repo:
            query = urllib.parse.urlencode({"mount": digest, "from": holder})
            start += "?" + query
        resp = self._expect(self.request("POST", start), 201, 202, what=f"start upload {repo}")
        if resp.status == 202:  # no mount: upload monolithically to the session's Location
            location = resp.headers["Location"]
            sep = "&" if "?" in location else "?"
            put = location + sep + urllib.parse.urlencode({"digest": digest})
            headers = {"Content-Type": "application/octet-stream"}
            self._expect(
                self.request("PUT", put, data, headers), 201, what=f"PUT blob {repo}@{digest}"
            )
        self._holders[digest] = repo

    def put_manifest(self, repo: str, reference: str, blob: Blob) -> str:
        """PUT a manifest by tag or digest; returns the digest the registry computed."""
        resp = self.request(
            "PUT", f"/v2/{repo}/manifests/{reference}", blob.data, {"Content-Type": blob.media_type}
        )
        self._expect(resp, 201, what=f"PUT manifest {repo}:{reference}")
        digest = resp.headers.get("Docker-Content-Digest", "")
        if digest != blob.digest:
            raise RegistryError(f"registry says {digest!r}, we computed {blob.digest!r}")
        return digest

    def get_manifest(self, repo: str, reference: str) -> Response:
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        return self._expect(resp, 200, what=f"GET manifest {repo}:{reference}")

    def delete_manifest(self, repo: str, digest: str) -> None:
        resp = self.request("DELETE", f"/v2/{repo}/manifests/{digest}")
        self._expect(resp, 202, what=f"DELETE manifest {repo}@{digest}")

    def tags(self, repo: str) -> list[str]:
        resp = self._expect(self.request("GET", f"/v2/{repo}/tags/list"), 200, what="tags")
        tags = json.loads(resp.body).get("tags") or []
        return sorted(str(t) for t in tags)

    def push_image(self, repo: str, image: Image, reference: str | None = None) -> str:
        """Blobs, then the manifest by `reference` (default: by its digest)."""
        self.push_blob(repo, image.config.digest, image.config.data)
        for layer in image.layers:
            self.push_blob(repo, layer.digest, layer.data)
        return self.put_manifest(repo, reference or image.digest, image.manifest)

    def push(self, repo: str, tag: str, artifact: Artifact) -> str:
        """Pushes an image or an index (children first) under `tag`; returns its digest."""
        if isinstance(artifact, Image):
            return self.push_image(repo, artifact, tag)
        for image in artifact.images:
            self.push_image(repo, image)
        return self.put_manifest(repo, tag, artifact.manifest)


# ---------------------------------------------------------------------------------------------
# test image definitions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedNode:
    """What a path in the final rootfs must be. `mode` is st_mode & 0o7777 when given."""

    kind: Literal["file", "dir", "symlink"]
    data: bytes | None = None
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: str | None = None  # symlink target
    hardlink_of: str | None = None  # another expected path with the same inode


@dataclass(frozen=True)
class ImageDef:
    """A test image: what to push, and what its unpacked linux/amd64 rootfs must contain.

    `expected` is a subset of the rootfs (keys are rootfs-relative paths), except under the
    directories in `complete_under`, whose whole subtree is listed. `absent` paths must not exist.
    """

    name: str
    tag: str
    artifact: Artifact
    expected: Mapping[str, ExpectedNode]
    absent: tuple[str, ...] = ()
    complete_under: tuple[str, ...] = ()

    @property
    def image(self) -> Image:
        """The image a linux/amd64 node runs (the artifact itself unless it is an index)."""
        if isinstance(self.artifact, Image):
            return self.artifact
        return self.artifact.for_platform(Platform())


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "flat:x:1000:1000:flat:/home/flat:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "".join(
    line + "\n"
    for line in (
        "root:x:0:",
        "daemon:x:1:",
        "flat:x:1000:",
        "extra:x:5000:flat",
        "nogroup:x:65534:",
    )
)


def busybox_applets(busybox: str = HOST_BUSYBOX) -> list[str]:
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({a for a in out.split() if a and a != "busybox" and "/" not in a})


def busybox_layer(busybox: str = HOST_BUSYBOX) -> Layer:
    """The shared base: host busybox-static, an applet symlink per applet, users and dirs."""
    with open(busybox, "rb") as f:
        binary = f.read()
    entries = [
        directory("bin"),
        file("bin/busybox", binary, mode=0o755),
        *(symlink(f"bin/{applet}", "busybox") for applet in busybox_applets(busybox)),
        directory("dev"),
        directory("etc"),
        file("etc/passwd", PASSWD),
        file("etc/group", GROUP),
        directory("home"),
        directory("home/flat", uid=1000, gid=1000),
        directory("proc", mode=0o555),
        directory("root", mode=0o700),
        directory("sys", mode=0o555),
        directory("tmp", mode=0o1777),
        directory("usr/bin"),
        directory("usr/sbin"),
        directory("var/tmp", mode=0o1777),
    ]
    return build_layer(LayerSpec(tuple(entries), comment="busybox base"))


def _busybox_expected(busybox: str = HOST_BUSYBOX) -> dict[str, ExpectedNode]:
    with open(busybox, "rb") as f:
        binary = f.read()
    return {
        "bin/busybox": ExpectedNode("file", binary, 0o755),
        "bin/sh": ExpectedNode("symlink", target="busybox"),
        "bin/ls": ExpectedNode("symlink", target="busybox"),
        "bin/sleep": ExpectedNode("symlink", target="busybox"),
        "etc/passwd": ExpectedNode("file", PASSWD.encode(), 0o644),
        "etc/group": ExpectedNode("file", GROUP.encode(), 0o644),
        "home/flat": ExpectedNode("dir", mode=0o755, uid=1000, gid=1000),
        "root": ExpectedNode("dir", mode=0o700),
        "tmp": ExpectedNode("dir", mode=0o1777),
        "proc": ExpectedNode("dir", mode=0o555),
    }


def busybox(base: Layer | None = None) -> ImageDef:
    """OCI; Cmd ["sh"]. User resolution: root 0, daemon 1, flat 1000 (groups flat, extra 5000)."""
    layer = base or busybox_layer()
    image = build_image([layer], ImageConfig(cmd=("sh",)))
    return ImageDef("busybox", "latest", image, _busybox_expected())


def busybox_user(base: Layer | None = None) -> ImageDef:
    """The busybox layer with config User "flat" (uid 1000, gid 1000, also in group 5000)."""
    layer = base or busybox_layer()
    image = build_image([layer], ImageConfig(cmd=("sh",), user="flat"))
    return ImageDef("busybox-user", "latest", image, _busybox_expected())


def web(base: Layer | None = None) -> ImageDef:
    """Docker schema 2. busybox httpd serving /www/index.html ("flatpod web\\n") on TCP 80.

    StopSignal is SIGINT (not the default) and it has a label, so both can be checked.
    """
    www = build_layer(LayerSpec((file("www/index.html", "flatpod web\n"),), comment="web content"))
    config = ImageConfig(
        cmd=("httpd", "-f", "-v", "-p", "80", "-h", "/www"),
        exposed_ports=("80/tcp",),
        labels={"org.flatpod.test": "web"},
        stop_signal="SIGINT",
    )
    image = build_image([base or busybox_layer(), www], config, fmt="docker")
    expected = {**_busybox_expected(), "www/index.html": ExpectedNode("file", b"flatpod web\n")}
    return ImageDef("web", "latest", image, expected)


LAYERED_TREE: Mapping[str, ExpectedNode] = MappingProxyType(
    {
        "data": ExpectedNode("dir", mode=0o755),
        "data/keep": ExpectedNode("file", b"keep\n", 0o644),
        "data/keep-link": ExpectedNode("file", b"keep\n", 0o644, hardlink_of="data/keep"),
        "data/suid": ExpectedNode("file", b"#!/bin/sh\nid -u\n", 0o4755),
        "data/owned": ExpectedNode("file", b"owned\n", 0o640, uid=1000, gid=5000),
        "data/dir": ExpectedNode("dir", mode=0o755),
        "data/dir/new": ExpectedNode("file", b"new\n", 0o644),
        "data/sym": ExpectedNode("symlink", target="keep"),
        "data/zstd": ExpectedNode("file", b"zstd\n", 0o644),
        "data/plain": ExpectedNode("file", b"plain\n", 0o600),
    }
)


def layered(base: Layer | None = None) -> ImageDef:
    """OCI, five layers: busybox base, then

    A (gzip):  /data/keep, /data/keep-link (hardlink to keep), /data/gone, /data/dir/old,
               /data/suid (04755), /data/owned (1000:5000, 0640), /data/sym -> keep
    B (gzip):  /data/.wh.gone, /data/dir/.wh..wh..opq, /data/dir/new
    C (zstd):  /data/zstd
    D (plain tar, uncompressed): /data/plain (0600)

    The final /data is exactly LAYERED_TREE: gone and dir/old are absent.
    Config: Entrypoint ["/bin/sh", "-c"], Cmd ["ls /data"], WorkingDir /data.
    """
    layer_a = LayerSpec(
        (
            directory("data"),
            file("data/keep", "keep\n"),
            hardlink("data/keep-link", "data/keep"),
            file("data/gone", "gone\n"),
            file("data/dir/old", "old\n"),
            file("data/suid", "#!/bin/sh\nid -u\n", mode=0o4755),
            file("data/owned", "owned\n", mode=0o640, uid=1000, gid=5000),
            symlink("data/sym", "keep"),
        ),
        comment="layer A: files, hardlink, setuid",
    )
    layer_b = LayerSpec(
        (whiteout("data/gone"), opaque("data/dir"), file("data/dir/new", "new\n")),
        comment="layer B: whiteout and opaque dir",
    )
    layer_c = LayerSpec((file("data/zstd", "zstd\n"),), "zstd", "layer C: zstd")
    layer_d = LayerSpec((file("data/plain", "plain\n", mode=0o600),), "none", "layer D: plain")
    layers = [
        base or busybox_layer(),
        *(build_layer(s) for s in (layer_a, layer_b, layer_c, layer_d)),
    ]
    config = ImageConfig(entrypoint=("/bin/sh", "-c"), cmd=("ls /data",), working_dir="/data")
    return ImageDef(
        "layered",
        "latest",
        build_image(layers, config),
        {**_busybox_expected(), **LAYERED_TREE},
        absent=("data/gone", "data/dir/old"),
        complete_under=("data",),
    )


ARM64 = Platform("arm64", "linux", "v8")


def multiarch(base: Layer | None = None) -> ImageDef:
    """OCI index: linux/amd64 is busybox plus /etc/flatpod-arch ("amd64\\n"); linux/arm64/v8
    is one tiny layer with only /flatpod-arch ("arm64\\n") and cannot run anywhere."""
    amd64_marker = build_layer(LayerSpec((file("etc/flatpod-arch", "amd64\n"),), comment="amd64"))
    amd64 = build_image([base or busybox_layer(), amd64_marker], ImageConfig(cmd=("sh",)))
    arm64_layer = build_layer(LayerSpec((file("flatpod-arch", "arm64\n"),), comment="arm64"))
    arm64 = build_image([arm64_layer], ImageConfig(cmd=("/flatpod-arch",)), platform=ARM64)
    expected = {**_busybox_expected(), "etc/flatpod-arch": ExpectedNode("file", b"amd64\n")}
    return ImageDef(
        "multiarch", "latest", build_index([amd64, arm64]), expected, absent=("flatpod-arch",)
    )


def big(
    base: Layer | None = None, *, total_size: int = 100 * 1024 * 1024, layers: int = 5
) -> ImageDef:
    """For benchmarks: busybox plus `layers` layers of incompressible, deterministic data
    (SHAKE-256 streams), `total_size` bytes in all, gzip level 1 to keep building quick."""
    per_layer = total_size // layers
    built = [base or busybox_layer()]
    for i in range(layers):
        data = hashlib.shake_256(f"flatpod-big-{i}".encode()).digest(per_layer)
        spec = LayerSpec((file(f"big/layer-{i}.bin", data),), comment=f"big {i}", level=1)
        built.append(build_layer(spec))
    image = build_image(built, ImageConfig(cmd=("sh",)))
    return ImageDef("big", "latest", image, {"bin/busybox": _busybox_expected()["bin/busybox"]})


def build_all(base: Layer | None = None) -> dict[str, ImageDef]:
    """Every session test image (not `big`), sharing one busybox layer, keyed by name."""
    layer = base or busybox_layer()
    defs = [busybox(layer), busybox_user(layer), web(layer), layered(layer), multiarch(layer)]
    return {d.name: d for d in defs}
