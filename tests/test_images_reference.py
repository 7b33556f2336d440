"""Reference normalisation, matched against Docker's and containerd's rules."""

from __future__ import annotations

import pytest

from sandbox.images.reference import InvalidReference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "normalised"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
    ("user/app:v1", "docker.io/user/app:v1"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
    ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
    (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
    (f"busybox:1.36@{D}", f"docker.io/library/busybox@{D}"),
    (f"localhost:5000/x:t@{D}", f"localhost:5000/x@{D}"),
    ("a__b/c.d-e:T_1.x", "docker.io/a__b/c.d-e:T_1.x"),
])
def test_normalise(text: str, normalised: str) -> None:
    assert str(parse_reference(text)) == normalised


@pytest.mark.parametrize("text", [
    "", "Busybox", "busybox:", "busybox@sha256:abc", "busybox@md5:" + "a" * 32, "a//b",
    "-a/b", "a/b:t:t", "ab" * 32, "host:port/x", "x/" + "a" * 260, "busybox:-tag", "UP/Down",
])
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReference) as failed:
        parse_reference(text)
    assert repr(text) in str(failed.value)
    assert isinstance(failed.value, ValueError)


def test_parts() -> None:
    ref = parse_reference("localhost:5000/team/app:v2")
    assert (ref.domain, ref.host, ref.path, ref.tag, ref.digest) == (
        "localhost:5000", "localhost", "team/app", "v2", None)
    assert ref.object == "v2"
    assert parse_reference("[::1]:5000/x").host == "[::1]"
