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
    image = pb.ImageStatusResponse.FromString(asyncio.run(service.ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))))).image
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

    def tamper(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if not handler.path.endswith(f"/blobs/{bad_layer}"):
            return False
        data = bytearray(web.image.layers[-1].data)
        data[len(data) // 2] ^= 0xFF  # same size, wrong bytes
        reply(handler, 200, bytes(data))
        return True

    proxy.hook = tamper
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

    def stall(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if not handler.path.endswith(f"/blobs/{slow_layer}"):
            return False
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(web.image.layers[-1].data)))
        handler.end_headers()
        handler.wfile.write(web.image.layers[-1].data[:10])
        handler.wfile.flush()
        proxy.release.wait(30)
        return True

    proxy.hook = stall
    service = make_service(tmp_path, store, pull_progress_timeout_seconds=1)
    with pytest.raises(DeadlineExceeded, match="no progress for 1s"):
        pull(service, f"{proxy.host}/{web.repo_path}:latest")
    assert not service.content.path(slow_layer).exists()
