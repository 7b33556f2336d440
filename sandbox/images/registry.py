"""A blocking client for the OCI distribution API (what a pull needs: manifests and blobs).

Each request tries the registry's mirrors in order, then the origin. On 401 it answers the
`WWW-Authenticate` challenge: Basic gets the credentials, Bearer gets a token from the realm
(cached per realm, service and scope).

Credentials are the tenant's secret and a registry's answers are not trusted: they go only to
the registry they belong to (the AuthConfig's `server_address`, else the image's registry; a
mirror gets them only when server_address names it), and only over TLS unless that host is in
`insecure_registries`; a token realm must be https (or an insecure host's http); a redirect to
another scheme or host (a CDN for blobs) carries no Authorization; what a registry writes in
an error reaches the client only as a short printable excerpt.

Every manifest is checked against its digest here; blobs are streamed to the caller, who
hashes them while writing (content.py).
Call it from a worker thread: everything here blocks.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import platform
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sandbox.images.reference import Reference

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

DOCKER_HUB_HOST = "registry-1.docker.io"
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the limit containerd and the registry use
DEFAULT_INSECURE = ("localhost", "127.0.0.1", "[::1]")
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
MAX_EXCERPT = 200  # characters of a registry's own words that may reach a client
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class RegistryError(Exception):
    """A pull failed at a registry; the message names it, the reference and the cause."""

    def __init__(self, registry: str, reference: str, cause: str) -> None:
        super().__init__(f"pulling {reference} from {registry}: {cause}")
        self.registry = registry
        self.reference = reference
        self.cause = cause


class Unauthorized(RegistryError):
    """401/403: no or wrong credentials."""


class ManifestUnknown(RegistryError):
    """404 for the manifest or blob."""


class DigestMismatch(RegistryError):
    """The registry sent content that does not hash to what was asked for."""


@dataclass(frozen=True)
class Credentials:
    """The credentials of a CRI AuthConfig. `auth` is base64("user:password")."""

    username: str = ""
    password: str = ""
    auth: str = ""
    identity_token: str = ""
    registry_token: str = ""
    # The registry host they belong to (AuthConfig.server_address, normalized); empty: the
    # registry of the image being pulled.
    server: str = ""

    def user_password(self) -> tuple[str, str] | None:
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            decoded = base64.b64decode(self.auth).decode()
            user, _, password = decoded.partition(":")
            return user, password
        return None


@dataclass(frozen=True)
class RegistryHosts:
    """Where a registry host is reached: mirrors first, then the origin; plain HTTP or TLS."""

    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    insecure: Sequence[str] = DEFAULT_INSECURE
    timeout: float = 300.0  # socket timeout: a read that stalls this long fails

    def is_insecure(self, host: str) -> bool:
        return host in self.insecure or host.rsplit(":", 1)[0] in self.insecure

    def endpoints(self, domain: str, host: str) -> list[str]:
        """Base URLs for `domain` ("host[:port]"), in the order to try them."""
        insecure = domain in self.insecure or host in self.insecure
        origin_host = DOCKER_HUB_HOST if domain == "docker.io" else domain
        origin = f"{'http' if insecure else 'https'}://{origin_host}"
        return [url.rstrip("/") for url in self.mirrors.get(domain, ())] + [origin]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Mapping[str, Any] | None = None

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> Descriptor:
        return Descriptor(
            media_type=str(doc.get("mediaType", "")),
            digest=str(doc["digest"]),
            size=int(doc["size"]),
            platform=doc.get("platform"),
        )


@dataclass(frozen=True)
class Manifest:
    """An image manifest (never an index) and how it was reached."""

    digest: str  # of this manifest
    top_digest: str  # what the reference resolved to: this manifest, or the index above it
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    endpoint: str  # base URL that served it; blobs are fetched there first


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine, in OCI terms."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
    variant = {"aarch64": "v8", "armv7l": "v7"}
    return "linux", arch.get(machine, machine), variant.get(machine, "")


class TokenCache:
    """Bearer tokens per (credentials, realm, service, scope), until shortly before expiry.

    Shared by pulls running in worker threads, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def get(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            found = self._tokens.get(key)
            if found is None or found[1] < time.monotonic():
                return None
            return found[0]

    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None:
        with self._lock:
            # A little margin so a token is never sent in its last seconds.
            self._tokens[key] = (token, time.monotonic() + max(expires_in - 10, 1))


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: http.client.HTTPResponse
    connection: http.client.HTTPConnection


class RegistryClient:
    """Pulls from one repository (`ref`) with one set of credentials."""

    def __init__(
        self,
        ref: Reference,
        hosts: RegistryHosts,
        credentials: Credentials | None = None,
        tokens: TokenCache | None = None,
    ) -> None:
        self.ref = ref
        self.hosts = hosts
        self.credentials = credentials or Credentials()
        self.tokens = tokens or TokenCache()
        self.scope = f"repository:{ref.path}:pull"
        self.endpoints = hosts.endpoints(ref.domain, ref.host)
        self.credentials_host = registry_host(self.credentials.server or ref.domain)
        # Authorization header per endpoint host, learnt from its 401 challenge.
        self._auth: dict[str, str] = {}

    # ---- manifests ---------------------------------------------------------------------------

    def resolve(self) -> Manifest:
        """Fetches the reference's manifest, choosing this host's platform from an index."""
        errors: list[str] = []
        for endpoint in self.endpoints:
            try:
                return self._resolve_at(endpoint)
            except (RegistryError, OSError, http.client.HTTPException) as e:
                if endpoint == self.endpoints[-1]:
                    raise self._final_error(endpoint, e, errors) from e
                errors.append(f"mirror {endpoint}: {_cause(e)}")
                log.warning("pull %s: mirror %s failed (%s), trying the next", self.ref,
                            endpoint, _cause(e))
        raise AssertionError("no endpoints")  # endpoints always ends with the origin

    def _resolve_at(self, endpoint: str) -> Manifest:
        media_type, raw, digest = self._get_manifest(endpoint, self.ref.object)
        top_digest = digest
        for _ in range(3):  # an index may point at another index; not deeper than that
            if media_type not in INDEX_TYPES:
                break
            chosen = self._choose_platform(endpoint, json.loads(raw))
            media_type, raw, digest = self._get_manifest(endpoint, chosen.digest)
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                endpoint, str(self.ref), f"unsupported manifest type {media_type!r}"
            )
        doc = json.loads(raw)
        return Manifest(
            digest=digest,
            top_digest=top_digest,
            media_type=media_type,
            raw=raw,
            config=Descriptor.from_json(doc["config"]),
            layers=tuple(Descriptor.from_json(d) for d in doc.get("layers", ())),
            endpoint=endpoint,
        )

    def _get_manifest(self, endpoint: str, obj: str) -> tuple[str, bytes, str]:
        """(media type, bytes, digest) of /v2/<path>/manifests/<obj>, digest verified."""
        url = f"{endpoint}/v2/{self.ref.path}/manifests/{obj}"
        with self._get(url, {"Accept": ACCEPT}, what=f"manifest {obj}") as resp:
            raw = resp.body.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryError(endpoint, str(self.ref), "manifest larger than 4 MiB")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        expected = obj if obj.startswith("sha256:") else resp.headers.get("Docker-Content-Digest")
        if expected and expected.startswith("sha256:") and expected != digest:
            raise DigestMismatch(
                endpoint, str(self.ref), f"manifest digest mismatch: want {expected}, got {digest}"
            )
        media_type = resp.headers.get_content_type()
        declared = json.loads(raw).get("mediaType")
        if isinstance(declared, str) and declared:
            media_type = declared  # the document says what it is; servers' headers vary
        return media_type, raw, digest

    def _choose_platform(self, endpoint: str, index: Mapping[str, Any]) -> Descriptor:
        want_os, want_arch, want_variant = host_platform()
        candidates = []
        for entry in index.get("manifests", ()):
            plat = entry.get("platform") or {}
            if plat.get("os") == want_os and plat.get("architecture") == want_arch:
                candidates.append(Descriptor.from_json(entry))
        if not candidates:
            raise ManifestUnknown(
                endpoint, str(self.ref), f"no manifest for {want_os}/{want_arch} in the index"
            )
        for c in candidates:  # an exact variant first, then any
            if c.platform and c.platform.get("variant", "") == want_variant:
                return c
        return candidates[0]

    # ---- blobs -------------------------------------------------------------------------------

    @contextmanager
    def open_blob(
        self, digest: str, first: str | None = None
    ) -> Iterator[http.client.HTTPResponse]:
        """A readable response for the blob; the caller verifies the bytes. Tries `first` (the
        endpoint that served the manifest), then the other endpoints."""
        order = ([first] if first else []) + [e for e in self.endpoints if e != first]
        errors: list[str] = []
        for endpoint in order:
            url = f"{endpoint}/v2/{self.ref.path}/blobs/{digest}"
            try:
                resp = self._open(url, {}, what=f"blob {digest}")
            except (RegistryError, OSError, http.client.HTTPException) as e:
                if endpoint == order[-1]:
                    raise self._final_error(endpoint, e, errors) from e
                errors.append(f"{endpoint}: {_cause(e)}")
                continue
            try:
                yield resp.body
            finally:
                resp.connection.close()
            return

    def blob_error(self, cause: str) -> RegistryError:
        """An error for a blob that arrived wrong, naming the registry and the reference."""
        return DigestMismatch(self.ref.domain, str(self.ref), cause)

    # ---- HTTP with auth and redirects --------------------------------------------------------

    @contextmanager
    def _get(self, url: str, headers: Mapping[str, str], what: str) -> Iterator[_Response]:
        resp = self._open(url, headers, what)
        try:
            yield resp
        finally:
            resp.connection.close()

    def _open(self, url: str, headers: Mapping[str, str], what: str) -> _Response:
        """A 200 response (the caller closes it), or the error its status means."""
        resp = self._request_authenticated(url, headers)
        try:
            if resp.status == 404:
                raise ManifestUnknown(_origin(url), str(self.ref), f"{what} unknown (404)")
            if resp.status in (401, 403):
                raise Unauthorized(
                    _origin(url), str(self.ref), f"{what}: unauthorized ({resp.status})"
                )
            if resp.status != 200:
                detail = excerpt(resp.body.read(4 * MAX_EXCERPT))
                raise RegistryError(
                    _origin(url), str(self.ref), f"{what}: HTTP {resp.status} {detail}".strip()
                )
        except BaseException:
            resp.connection.close()
            raise
        return resp

    def _request_authenticated(self, url: str, headers: Mapping[str, str]) -> _Response:
        host = _origin(url)
        auth = self._auth.get(host)
        resp = self._request(url, headers, auth)
        if resp.status != 401:
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.body.read()
        resp.connection.close()
        auth = self._answer_challenge(url, challenge)
        if auth is None:
            raise Unauthorized(
                host, str(self.ref), "unauthorized (401): the registry requires credentials"
            )
        self._auth[host] = auth
        return self._request(url, headers, auth)

    def _request(self, url: str, headers: Mapping[str, str], auth: str | None) -> _Response:
        """GET following redirects; credentials go only to the scheme and host that asked for
        them (a blob redirected to a CDN is fetched without)."""
        first_host = _origin(url)
        first = _scheme_host(url)
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(headers)
            if auth and _scheme_host(url) == first:
                send["Authorization"] = auth
            resp = self._send("GET", url, send)
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.connection.close()
            url = urllib.parse.urljoin(url, location)
        raise RegistryError(first_host, str(self.ref), f"more than {MAX_REDIRECTS} redirects")

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> _Response:
        parts = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.netloc, timeout=self.hosts.timeout, context=ssl.create_default_context()
            )
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.hosts.timeout)
        else:
            raise RegistryError(parts.netloc, str(self.ref), f"unsupported URL scheme in {url}")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers={"User-Agent": "flatpod", **headers})
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        return _Response(resp.status, resp.headers, resp, conn)

    def credentials_for(self, url: str) -> Credentials:
        """The credentials a request to `url` may carry: none unless it goes to the host they
        belong to, over TLS or to a host the operator configured insecure."""
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc
        if registry_host(host) != self.credentials_host:
            return Credentials()
        if parts.scheme != "https" and not self.hosts.is_insecure(host):
            return Credentials()
        return self.credentials

    def _answer_challenge(self, url: str, challenge: str) -> str | None:
        host = _origin(url)
        creds = self.credentials_for(url)
        scheme, _, rest = challenge.strip().partition(" ")
        params = {m[0].lower(): m[1] or m[2] for m in _CHALLENGE_PARAM.findall(rest)}
        if scheme.lower() == "basic":
            user_password = creds.user_password()
            if user_password is None:
                return None
            return "Basic " + base64.b64encode(":".join(user_password).encode()).decode()
        if scheme.lower() == "bearer":
            if creds.registry_token:
                return f"Bearer {creds.registry_token}"
            return f"Bearer {self._bearer_token(host, creds, params)}"
        raise Unauthorized(
            host, str(self.ref), f"unsupported auth challenge {excerpt(challenge.encode())!r}"
        )

    def _bearer_token(self, host: str, creds: Credentials, params: Mapping[str, str]) -> str:
        realm = params.get("realm", "")
        service = params.get("service", "")
        scope = params.get("scope", self.scope)
        if not realm:
            raise Unauthorized(host, str(self.ref), "bearer challenge without a realm")
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme != "https" and not (
            realm_parts.scheme == "http" and self.hosts.is_insecure(realm_parts.netloc)
        ):
            raise Unauthorized(
                host, str(self.ref),
                f"token realm {excerpt(realm.encode())} is neither https nor an insecure "
                "registry's http: no credentials or token go there",
            )
        key = (repr(creds), realm, service, scope)
        cached = self.tokens.get(key)
        if cached is not None:
            return cached
        doc = self._fetch_token(host, creds, realm, service, scope)
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unauthorized(
                host, str(self.ref), f"token server {excerpt(realm.encode())} returned no token"
            )
        expires = doc.get("expires_in")
        lifetime = 60.0
        if isinstance(expires, int | float) and not isinstance(expires, bool):
            lifetime = float(expires)
        self.tokens.put(key, token, lifetime)
        return token

    def _fetch_token(
        self, host: str, creds: Credentials, realm: str, service: str, scope: str
    ) -> dict[str, Any]:
        query = {"service": service, "scope": scope} if service else {"scope": scope}
        headers: dict[str, str] = {}
        where = excerpt(realm.encode())
        if creds.identity_token:
            # An identity token is an OAuth2 refresh token (docker login against some clouds).
            form = urllib.parse.urlencode({
                **query, "grant_type": "refresh_token", "client_id": "flatpod",
                "refresh_token": creds.identity_token,
            }).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = self._send("POST", realm, headers, form)
        else:
            user_password = creds.user_password()
            if user_password is not None:
                basic = base64.b64encode(":".join(user_password).encode()).decode()
                headers["Authorization"] = f"Basic {basic}"
            sep = "&" if "?" in realm else "?"
            resp = self._send("GET", realm + sep + urllib.parse.urlencode(query), headers)
        try:
            body = resp.body.read(1024 * 1024)
        finally:
            resp.connection.close()
        if resp.status != 200:
            raise Unauthorized(
                host, str(self.ref), f"token server {where} answered {resp.status}"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise Unauthorized(host, str(self.ref), f"token server {where} sent no JSON object")
        return doc

    def _final_error(
        self, endpoint: str, e: BaseException, mirror_errors: list[str]
    ) -> RegistryError:
        tried = f" (after {'; '.join(mirror_errors)})" if mirror_errors else ""
        if isinstance(e, RegistryError):
            err = type(e)(e.registry, e.reference, e.cause + tried)
        else:
            err = RegistryError(_origin(endpoint), str(self.ref), _cause(e) + tried)
        return err


def _origin(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _scheme_host(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def registry_host(address: str) -> str:
    """A registry's host as credentials name it: an AuthConfig server_address may be a URL
    ("https://index.docker.io/v1/"); Docker Hub has several names for one registry."""
    if "://" in address:
        address = urllib.parse.urlsplit(address).netloc
    host = address.split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_NAMES else host


def excerpt(raw: bytes) -> str:
    """At most MAX_EXCERPT printable characters of what a registry wrote, on one line: its
    words may be shown to a client, never its markup, escapes or megabytes."""
    text = raw[: 4 * MAX_EXCERPT].decode("utf-8", errors="replace")
    printable = "".join(c if c.isprintable() else " " for c in text)
    short = " ".join(printable.split())
    return short if len(short) <= MAX_EXCERPT else short[: MAX_EXCERPT - 3] + "..."


def _cause(e: BaseException) -> str:
    if isinstance(e, RegistryError):
        return e.cause
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return excerpt(f"{type(e).__name__}: {e}".encode())
