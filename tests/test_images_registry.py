"""Registry access: basic auth, bearer tokens, mirrors, tampered blobs, stalled pulls.

Bearer auth, tampering and stalling come from a small HTTP proxy in front of the real registry.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cri_api import api_pb2 as pb
from sandbox.config import ImagesConfig
from sandbox.errors import CriError, DeadlineExceeded, Internal
from sandbox.images.service import ImageService, PullUnauthenticated
from sandbox.store import Store
from tests.support.plugin import AuthRegistry, TestImages
from tests.support.registry import Registry, free_port

TOKEN = "flatpod-test-token"


@dataclass
class Proxy:
    """Forwards GETs to `upstream`; `hook(handler) -> bool` may answer a request itself."""

    upstream: str
    hook: Callable[[http.server.BaseHTTPRequestHandler], bool] = lambda _: False
    seen: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def proxy(registry: Registry) -> Iterator[Proxy]:
    state = Proxy(registry.host)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.seen.append(self.path)
            if state.hook(self):
                return
            conn = http.client.HTTPConnection(state.upstream, timeout=10)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept",)}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "docker-content-digest", "location"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            finally:
                conn.close()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def on_blob(
    digest: str, answer: Callable[[http.server.BaseHTTPRequestHandler], None]
) -> Callable[[http.server.BaseHTTPRequestHandler], bool]:
    """A proxy hook that answers the request for the blob `digest` itself, with `answer`,
    and passes every other request on."""
    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if not handler.path.endswith(f"/blobs/{digest}"):
            return False
        answer(handler)
        return True
    return hook


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def make_service(tmp_path: Path, store: Store, **config: object) -> ImageService:
    return ImageService(store, tmp_path / "root", ImagesConfig(**config))  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    try:
        yield s
    finally:
        s.close()


def pull(service: ImageService, ref: str, auth: pb.AuthConfig | None = None) -> str:
    req = pb.PullImageRequest(image=pb.ImageSpec(image=ref), auth=auth)
    resp: pb.PullImageResponse = asyncio.run(service.PullImage(req))
    return resp.image_ref


def blobs(service: ImageService) -> list[Path]:
    return list(service.content.blob_dir.iterdir()) + list(service.content.ingest_dir.iterdir())


def test_basic_auth(tmp_path: Path, store: Store, auth_registry: AuthRegistry) -> None:
    service = make_service(tmp_path, store)
    ref = auth_registry.image.reference
    with pytest.raises(PullUnauthenticated) as failed:
        pull(service, ref)
    assert auth_registry.registry.host in str(failed.value)
    assert "401" in str(failed.value)
    with pytest.raises(PullUnauthenticated):
        pull(service, ref, pb.AuthConfig(username=auth_registry.username, password="wrong"))
    assert pull(service, ref, pb.AuthConfig(username=auth_registry.username,
                                            password=auth_registry.password)) \
        == auth_registry.image.config_digest
    # The same with the base64 `auth` form.
    auth = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode())
    service2 = make_service(tmp_path / "2", store)
    assert pull(service2, auth_registry.image.digest_reference,
                pb.AuthConfig(auth=auth.decode())) == auth_registry.image.config_digest


def test_bearer_token_auth(
    tmp_path: Path, store: Store, proxy: Proxy, test_images: TestImages
) -> None:
    token_requests: list[str] = []

    def bearer(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if handler.path.startswith("/token"):
            token_requests.append(handler.path)
            want = "Basic " + base64.b64encode(b"alice:s3cret").decode()
            if handler.headers.get("Authorization") != want:
                reply(handler, 401, b"{}")
            else:
                reply(handler, 200, json.dumps({"token": TOKEN, "expires_in": 300}).encode())
            return True
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = (f'Bearer realm="http://{proxy.host}/token",service="test",'
                         f'scope="repository:flatpod-test/layered:pull"')
            reply(handler, 401, b"", {"WWW-Authenticate": challenge})
            return True
        return False

    proxy.hook = bearer
    service = make_service(tmp_path, store)
    ref = f"{proxy.host}/{test_images.layered.repo_path}:latest"
    with pytest.raises(PullUnauthenticated, match="token server"):
        pull(service, ref)
    assert pull(service, ref, pb.AuthConfig(username="alice", password="s3cret")) \
        == test_images.layered.config_digest
    # One token for the whole pull (manifest, config, five layers): it was cached.
    assert len(token_requests) == 2
    assert "scope=repository%3Aflatpod-test%2Flayered%3Apull" in token_requests[-1]
    assert "service=test" in token_requests[-1]


def test_mirror_down_falls_back_to_next(
    tmp_path: Path, store: Store, registry: Registry, test_images: TestImages
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    service = make_service(tmp_path, store,
                           mirrors={"mirrored.invalid": [dead, registry.url]})
    ref = f"mirrored.invalid/{test_images.busybox.repo_path}:latest"
    assert pull(service, ref) == test_images.busybox.config_digest
    image = pb.ImageStatusResponse.FromString(service.ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))).image
    assert list(image.repo_tags) == [ref]
    # All endpoints down: the error names the mirror's failure and the origin.
    service = make_service(tmp_path / "2", store, mirrors={"mirrored.invalid": [dead]})
    with pytest.raises(CriError) as failed:
        pull(service, ref)
    message = str(failed.value)
    assert "connection refused" in message and "mirrored.invalid" in message


def test_tampered_blob_rejected_and_not_stored(
    tmp_path: Path, store: Store, proxy: Proxy, test_images: TestImages
) -> None:
    web = test_images.web
    bad_layer = web.layer_digests[-1]

    def tamper(handler: http.server.BaseHTTPRequestHandler) -> None:
        data = bytearray(web.image.layers[-1].data)
        data[len(data) // 2] ^= 0xFF  # same size, wrong bytes
        reply(handler, 200, bytes(data))

    proxy.hook = on_blob(bad_layer, tamper)
    service = make_service(tmp_path, store)
    with pytest.raises(Internal) as failed:
        pull(service, f"{proxy.host}/{web.repo_path}:latest")
    assert "digest mismatch" in str(failed.value) and proxy.host in str(failed.value)
    assert service.content.path(bad_layer).exists() is False
    assert list(service.content.ingest_dir.iterdir()) == []
    assert service.images.list() == []


def test_stalled_pull_is_cancelled(
    tmp_path: Path, store: Store, proxy: Proxy, test_images: TestImages
) -> None:
    web = test_images.web
    slow_layer = web.layer_digests[-1]

    def stall(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(web.image.layers[-1].data)))
        handler.end_headers()
        handler.wfile.write(web.image.layers[-1].data[:10])
        handler.wfile.flush()
        proxy.release.wait(30)

    proxy.hook = on_blob(slow_layer, stall)
    service = make_service(tmp_path, store, pull_progress_timeout_seconds=1)
    with pytest.raises(DeadlineExceeded, match="no progress for 1s"):
        pull(service, f"{proxy.host}/{web.repo_path}:latest")
    assert not service.content.path(slow_layer).exists()


# ---- credentials go only where they belong (hostile registries, mirrors and realms) -----------


@dataclass
class Recorder:
    """A loopback HTTP server that records each request's path and Authorization header and
    answers with `answer(handler)` (default 404)."""

    address: str
    answer: Callable[[http.server.BaseHTTPRequestHandler], None] = \
        lambda h: reply(h, 404, b"")
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"


@contextmanager
def recording(address: str = "127.0.0.1") -> Iterator[Recorder]:
    state = Recorder(address)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.seen.append((self.path, self.headers.get("Authorization")))
            state.answer(self)

        do_POST = do_GET

    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def basic_challenge(handler: http.server.BaseHTTPRequestHandler) -> None:
    reply(handler, 401, b"", {"WWW-Authenticate": 'Basic realm="mirror"'})


def test_origin_credentials_never_reach_a_mirror(
    tmp_path: Path, store: Store, auth_registry: AuthRegistry
) -> None:
    """A mirror that asks for credentials gets none of the origin's; the pull falls back to
    the origin, which does. Only a server_address naming the mirror sends them there."""
    user, password = auth_registry.username, auth_registry.password
    origin = auth_registry.registry.host
    with recording() as mirror:
        mirror.answer = basic_challenge
        service = make_service(tmp_path, store, mirrors={origin: [f"http://{mirror.host}"]})
        auth = pb.AuthConfig(username=user, password=password)
        assert pull(service, auth_registry.image.reference, auth) \
            == auth_registry.image.config_digest
        assert mirror.seen and all(header is None for _, header in mirror.seen)
        mirror.seen.clear()
        service = make_service(tmp_path / "2", store, mirrors={origin: [f"http://{mirror.host}"]})
        auth = pb.AuthConfig(username=user, password=password, server_address=mirror.host)
        with pytest.raises(PullUnauthenticated):  # and the origin gets them no more
            pull(service, auth_registry.image.reference, auth)
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        assert (mirror.seen[-1][1]) == basic


def test_server_address_names_the_registry_credentials_belong_to(
    tmp_path: Path, store: Store, auth_registry: AuthRegistry
) -> None:
    ref = auth_registry.image.reference
    user, password = auth_registry.username, auth_registry.password
    service = make_service(tmp_path, store)
    elsewhere = pb.AuthConfig(username=user, password=password, server_address="other.example")
    with pytest.raises(PullUnauthenticated, match="401"):
        pull(service, ref, elsewhere)
    # A URL form of the right host is the right host.
    here = pb.AuthConfig(username=user, password=password,
                         server_address=f"http://{auth_registry.registry.host}/v2/")
    assert pull(service, ref, here) == auth_registry.image.config_digest


def test_plain_http_realm_of_a_secure_host_gets_nothing(
    tmp_path: Path, store: Store, proxy: Proxy, test_images: TestImages
) -> None:
    """127.0.0.2 is not in insecure_registries: a realm there over http is refused, and no
    request, with or without credentials, reaches it."""
    with recording("127.0.0.2") as realm:
        def bearer(handler: http.server.BaseHTTPRequestHandler) -> bool:
            challenge = f'Bearer realm="http://{realm.host}/token",service="test"'
            reply(handler, 401, b"", {"WWW-Authenticate": challenge})
            return True

        proxy.hook = bearer
        service = make_service(tmp_path, store)
        ref = f"{proxy.host}/{test_images.busybox.repo_path}:latest"
        with pytest.raises(PullUnauthenticated, match="neither https nor an insecure"):
            pull(service, ref, pb.AuthConfig(username="alice", password="s3cret"))
        assert realm.seen == []


def test_blob_redirect_to_another_host_carries_no_credentials(
    tmp_path: Path, store: Store, proxy: Proxy, registry: Registry, test_images: TestImages
) -> None:
    """The registry (requiring basic auth) sends blobs to a "CDN" on another host, which
    serves them from the real registry: they arrive, and the CDN never sees Authorization."""
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    with recording("127.0.0.2") as cdn:
        def serve_from_registry(handler: http.server.BaseHTTPRequestHandler) -> None:
            conn = http.client.HTTPConnection(registry.host, timeout=10)
            try:
                conn.request("GET", handler.path)
                resp = conn.getresponse()
                reply(handler, resp.status, resp.read())
            finally:
                conn.close()

        def auth_then_redirect(handler: http.server.BaseHTTPRequestHandler) -> bool:
            if handler.headers.get("Authorization") != basic:
                basic_challenge(handler)
                return True
            if "/blobs/" in handler.path:
                reply(handler, 307, b"", {"Location": f"http://{cdn.host}{handler.path}"})
                return True
            return False

        cdn.answer = serve_from_registry
        proxy.hook = auth_then_redirect
        service = make_service(tmp_path, store)
        ref = f"{proxy.host}/{test_images.busybox.repo_path}:latest"
        assert pull(service, ref, pb.AuthConfig(username="alice", password="s3cret")) \
            == test_images.busybox.config_digest
        assert cdn.seen and all(header is None for _, header in cdn.seen)


def test_registry_error_body_reaches_the_client_only_as_a_short_excerpt(
    tmp_path: Path, store: Store, proxy: Proxy, test_images: TestImages
) -> None:
    body = b"\x1b[31mmaintenance\r\nX-Injected: yes\x00" + b"A" * 100_000

    def broken(handler: http.server.BaseHTTPRequestHandler) -> bool:
        reply(handler, 500, body)
        return True

    proxy.hook = broken
    service = make_service(tmp_path, store)
    with pytest.raises(CriError) as failed:
        pull(service, f"{proxy.host}/{test_images.busybox.repo_path}:latest")
    message = str(failed.value)
    assert "HTTP 500 [31mmaintenance X-Injected: yes" in message
    assert len(message) < 500 and message.isprintable(), message
