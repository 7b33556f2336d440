"""Image references, normalised the way Docker and containerd do.

`busybox` means `docker.io/library/busybox:latest`; the first path component is a registry
host only when it looks like one (has a `.` or a `:`, or is `localhost`); a reference with a
digest names the content exactly, so a tag next to it is dropped (containerd's ParseDockerRef).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ID_HEX = re.compile(r"[0-9a-f]{64}")


class InvalidReference(ValueError):
    """The string is not a valid image reference; the message names it and says why."""

    def __init__(self, reference: str, why: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {why}")
        self.reference = reference


@dataclass(frozen=True)
class Reference:
    """A normalised reference: `domain/path` plus a tag, a digest, or (pulled by digest with a
    tag given too) only the digest kept."""

    domain: str  # "docker.io", "127.0.0.1:5000", "[::1]:5000"
    path: str  # "library/busybox"
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def repository(self) -> str:
        """"docker.io/library/busybox" """
        return f"{self.domain}/{self.path}"

    @property
    def host(self) -> str:
        """The registry host without the port, e.g. for matching insecure registries."""
        if self.domain.startswith("["):
            return self.domain[: self.domain.index("]") + 1]
        return self.domain.split(":", 1)[0]

    @property
    def object(self) -> str:
        """What /v2/<path>/manifests/<object> takes: the digest if any, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None  # parse_reference sets one of them
        return self.tag

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"


def parse_reference(text: str) -> Reference:
    """Parses and normalises `text`; raises InvalidReference."""
    if not text:
        raise InvalidReference(text, "empty")
    if _ID_HEX.fullmatch(text):
        # Docker refuses these as names: they would be ambiguous with image ids.
        raise InvalidReference(text, "a 64-character hex string is an image id, not a name")
    name, tag, digest = _split_tag_and_digest(text)
    domain, path = _split_domain(name)
    if not _PATH.fullmatch(path):
        raise InvalidReference(
            text, f"repository {path!r} must be lowercase components of [a-z0-9._-]"
        )
    if not _DOMAIN.fullmatch(domain):
        raise InvalidReference(text, f"registry host {domain!r} is not a valid host[:port]")
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidReference(text, f"repository name longer than {MAX_NAME_LENGTH} characters")
    if digest is None and tag is None:
        tag = DEFAULT_TAG
    if digest is not None:
        tag = None  # the digest names the content; a tag beside it adds nothing (containerd)
    return Reference(domain, path, tag, digest)


def _split_tag_and_digest(text: str) -> tuple[str, str | None, str | None]:
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise InvalidReference(text, f"digest {digest!r} is not sha256:<64 lowercase hex>")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > last_slash:  # a colon in the last component is a tag, not a port
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(text, f"tag {tag!r} is not valid")
    return name, tag, digest if at else None


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    looks_like_host = (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not slash or not looks_like_host:
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path


def is_image_id(text: str) -> bool:
    """True for "sha256:<64 hex>" or bare "<64 hex>"."""
    return bool(_DIGEST.fullmatch(text) or _ID_HEX.fullmatch(text))
