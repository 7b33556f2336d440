"""The ~100 MB multi-layer pull image: tests/support/oci.py's big(), pushed once to the local
stand-in registry (a rerun finds the tag and pushes nothing)."""

from __future__ import annotations

from tests.support.oci import RegistryClient, big

REGISTRY = "127.0.0.1:5000"
REPOSITORY = "flatpod-bench/big"
TAG = "latest"
# Both runtimes mirror registry.k8s.io to the local registry, keeping the path.
PULL_REF = f"registry.k8s.io/{REPOSITORY}:{TAG}"


def ensure_pushed() -> str:
    """Pushes the image unless the registry has the tag; returns the reference to pull."""
    client = RegistryClient(REGISTRY, timeout=300.0)
    head = client.request("HEAD", f"/v2/{REPOSITORY}/manifests/{TAG}",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    if head.status != 200:
        client.push(REPOSITORY, TAG, big().artifact)
    return PULL_REF
