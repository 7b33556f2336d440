"""pytest fixtures: a real registry and the test images pushed into it, once per session.

Load with `pytest_plugins = ["tests.support.plugin"]` in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

from tests.support.oci import Image, ImageDef, Index, RegistryClient, build_all, busybox
from tests.support.registry import Registry, running_registry

REPO_PREFIX = "flatpod-test"
AUTH_CREDENTIALS = ("flatpod", "flatpod-secret")


@dataclass(frozen=True)
class PushedImage:
    """One test image as it sits in the registry.

    For `multiarch`, `digest` is the index's and the rest describes the linux/amd64 image.
    """

    name: str  # "busybox"
    repository: str  # "127.0.0.1:PORT/flatpod-test/busybox"
    repo_path: str  # "flatpod-test/busybox", for the /v2/ API
    tag: str  # "latest"
    digest: str  # what the tag points at: manifest, or index for multiarch
    media_type: str  # media type of that manifest or index
    manifest_digest: str  # the linux/amd64 image manifest
    config_digest: str  # = the CRI image id, "sha256:..."
    layer_digests: tuple[str, ...]  # compressed blob digests, bottom layer first
    diff_ids: tuple[str, ...]  # uncompressed tar digests, as in rootfs.diff_ids
    platforms: Mapping[str, str]  # "linux/amd64" -> manifest digest, for every platform
    definition: ImageDef  # built artifact (all bytes) and the expected rootfs content

    @property
    def reference(self) -> str:
        """The tag reference: 127.0.0.1:PORT/flatpod-test/<name>:<tag>."""
        return f"{self.repository}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        """The tag target by digest: 127.0.0.1:PORT/flatpod-test/<name>@sha256:..."""
        return f"{self.repository}@{self.digest}"

    @property
    def image(self) -> Image:
        return self.definition.image


@dataclass(frozen=True)
class TestImages:
    """Every session image. Attribute names use '_' where image names use '-'."""

    __test__ = False  # not a test class, despite the name

    host: str
    busybox: PushedImage
    busybox_user: PushedImage
    web: PushedImage
    layered: PushedImage
    multiarch: PushedImage

    def all(self) -> tuple[PushedImage, ...]:
        return (self.busybox, self.busybox_user, self.web, self.layered, self.multiarch)

    def by_name(self, name: str) -> PushedImage:
        for image in self.all():
            if image.name == name:
                return image
        raise KeyError(name)


def push_definition(client: RegistryClient, definition: ImageDef) -> PushedImage:
    repo_path = f"{REPO_PREFIX}/{definition.name}"
    digest = client.push(repo_path, definition.tag, definition.artifact)
    images = definition.artifact.images if isinstance(definition.artifact, Index) else ()
    image = definition.image
    return PushedImage(
        name=definition.name,
        repository=f"{client.host}/{repo_path}",
        repo_path=repo_path,
        tag=definition.tag,
        digest=digest,
        media_type=definition.artifact.manifest.media_type,
        manifest_digest=image.digest,
        config_digest=image.config_digest,
        layer_digests=tuple(la.digest for la in image.layers),
        diff_ids=tuple(la.diff_id for la in image.layers),
        platforms={str(im.platform): im.digest for im in images or (image,)},
        definition=definition,
    )


def push_test_images(client: RegistryClient) -> TestImages:
    """Builds every session image (not `big`) and pushes it to `client`'s registry."""
    pushed = {name: push_definition(client, d) for name, d in build_all().items()}
    return TestImages(
        host=client.host,
        busybox=pushed["busybox"],
        busybox_user=pushed["busybox-user"],
        web=pushed["web"],
        layered=pushed["layered"],
        multiarch=pushed["multiarch"],
    )


@dataclass(frozen=True)
class AuthRegistry:
    """A registry that requires basic auth, with the busybox image pushed as `image`."""

    registry: Registry
    username: str
    password: str
    image: PushedImage


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry without auth on 127.0.0.1:<free port>, for the whole session."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def test_images(registry: Registry) -> TestImages:
    """busybox, busybox-user, web, layered, multiarch pushed to `registry` under
    flatpod-test/<name>:latest. Tests must not delete or overwrite them (they are shared)."""
    return push_test_images(registry.client())


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """A second registry requiring basic auth (AUTH_CREDENTIALS), holding
    flatpod-test/busybox:latest."""
    user, password = AUTH_CREDENTIALS
    with running_registry(
        tmp_path_factory.mktemp("auth-registry"), htpasswd=(user, password)
    ) as reg:
        pushed = push_definition(reg.client(), busybox())
        yield AuthRegistry(reg, user, password, pushed)
