"""Images the conformance tests need beyond the session set (tests/support/oci.py), and
`push_extra_images`, which pushes them to a registry.

- nnp: critest's "nnp" image: a setuid-root binary that prints its effective uid. busybox drops
  a setuid it was not built to keep, so this one is compiled from C (gcc, static); None when
  the host has no compiler.
- hardlinked: busybox whose /bin/ls is a hardlink of /bin/busybox, as in the Docker Hub
  image critest runs: masking /bin/ls must not mask busybox itself, as it would through a
  symlink.
- numeric-user: busybox with config User "1000:1000" (ImageStatus reports uid, no username).
- tagged: one image under three tags, for listing and removal by one tag.
- pause: one image, reachable as 127.0.0.1:PORT/... and as localhost:PORT/...: the same
  image from two registries, as critest's registry.k8s.io/pause:3.9 and k8s.gcr.io/pause:3.9.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.oci import (
    Image,
    ImageConfig,
    LayerSpec,
    RegistryClient,
    build_image,
    build_layer,
    busybox_layer,
    file,
    hardlink,
)
from tests.support.plugin import REPO_PREFIX

NNP_BINARY = "usr/local/bin/nnp"
NNP_SOURCE = """\
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\\n", (int)geteuid());
    return 0;
}
"""
TAGS = ("one", "two", "three")
HOST_BUSYBOX = "/bin/busybox"


@functools.cache
def nnp_binary() -> bytes | None:
    """A static binary printing "Effective uid: N"; None without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp, "nnp.c"), Path(tmp, "nnp")
        source.write_text(NNP_SOURCE)
        built = subprocess.run([gcc, "-static", "-O2", "-o", str(binary), str(source)],
                               capture_output=True)
        return binary.read_bytes() if built.returncode == 0 else None


@dataclass(frozen=True)
class ExtraImages:
    """References (host:port/repo:tag) and image ids of the pushed extra images."""

    nnp: str | None
    hardlinked: str
    numeric_user: str
    tagged: tuple[str, ...]  # the same image, one reference per tag
    tagged_id: str
    pause: tuple[str, str]  # one image by two registry names
    pause_id: str


def labelled_busybox(label: str, user: str = "") -> Image:
    """The busybox layer with a label of its own, so that its image id is its own too."""
    return build_image([busybox_layer()], ImageConfig(
        cmd=("sh",), user=user, labels={"org.flatpod.test": label}))


def nnp_image() -> Image | None:
    binary = nnp_binary()
    if binary is None:
        return None
    layer = build_layer(LayerSpec((file(NNP_BINARY, binary, mode=0o4755),),
                                  comment="setuid-root effective uid printer"))
    return build_image([busybox_layer(), layer], ImageConfig(cmd=(f"/{NNP_BINARY}",)))


def hardlinked_busybox() -> Image:
    with open(HOST_BUSYBOX, "rb") as f:
        binary = f.read()
    layer = build_layer(LayerSpec(
        (file("bin/busybox", binary, mode=0o755), hardlink("bin/ls", "bin/busybox")),
        comment="ls as a hardlink"))
    return build_image([busybox_layer(), layer], ImageConfig(cmd=("sh",)))


def push_extra_images(client: RegistryClient) -> ExtraImages:
    def push(name: str, tag: str, image: Image) -> str:
        client.push(f"{REPO_PREFIX}/{name}", tag, image)
        return f"{client.host}/{REPO_PREFIX}/{name}:{tag}"

    nnp = nnp_image()
    tagged = labelled_busybox("tagged")
    pause = labelled_busybox("pause")
    pause_reference = push("pause", "3.9", pause)
    port = client.host.rsplit(":", 1)[1]
    return ExtraImages(
        nnp=push("nnp", "latest", nnp) if nnp else None,
        hardlinked=push("hardlinked", "latest", hardlinked_busybox()),
        numeric_user=push("numeric-user", "latest", labelled_busybox("numeric", user="1000:1000")),
        tagged=tuple(push("tagged", tag, tagged) for tag in TAGS),
        tagged_id=tagged.config_digest,
        pause=(pause_reference, f"localhost:{port}/{REPO_PREFIX}/pause:3.9"),
        pause_id=pause.config_digest,
    )
