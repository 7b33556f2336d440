"""Runs Debian's docker-registry (distribution v2) as a real process for tests."""

from __future__ import annotations

import ctypes
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.oci import RegistryClient

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
BCRYPT_COST = 5  # low on purpose: the registry checks the hash on every request


class RegistryStartError(RuntimeError):
    pass


def bcrypt_hash(password: str) -> str:
    """A bcrypt ($2b$) hash from glibc's libcrypt (libxcrypt, always on Debian): no extra
    package is needed, and the registry's htpasswd support accepts only bcrypt."""
    lib = ctypes.CDLL("libcrypt.so.1", use_errno=True)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", BCRYPT_COST, None, 0)
    if not salt:
        raise OSError(ctypes.get_errno(), "crypt_gensalt failed")
    hashed = lib.crypt(password.encode(), salt)
    if not hashed or not hashed.startswith(b"$2b$"):
        raise OSError(ctypes.get_errno(), "crypt failed")
    return str(hashed.decode())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now. Racy by nature (the port is
    free now, not later); the registry's start() retries when bind fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_yaml(root: Path, port: int, htpasswd: Path | None) -> str:
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: flatpod-test\n    path: {htpasswd}\n"
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        "  redirect:\n    disable: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )


@dataclass
class Registry:
    """A running registry. `host` is "127.0.0.1:PORT"; `root` is its private temp dir."""

    host: str
    root: Path
    process: subprocess.Popen[bytes]
    credentials: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    def client(self, *, authenticated: bool = True) -> RegistryClient:
        return RegistryClient(self.host, self.credentials if authenticated else None)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate, wait, kill if needed; then remove the temp dir. Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_ready(registry: Registry, deadline: float) -> bool:
    """True once GET /v2/ answers (200, or 401 with auth); False if the process died."""
    client = RegistryClient(registry.host, timeout=1.0)
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        try:
            if client.ping() in (200, 401):
                return True
        except OSError:
            pass  # not listening yet
        time.sleep(0.05)
    raise RegistryStartError(f"registry not ready in {START_TIMEOUT}s:\n{registry.log()}")


def start_registry(tmp: Path, *, htpasswd: tuple[str, str] | None = None) -> Registry:
    """Starts a registry in a new temp dir under `tmp`; the caller must stop() it."""
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=tmp))
    try:
        htpasswd_path = None
        if htpasswd is not None:
            htpasswd_path = root / "htpasswd"
            htpasswd_path.write_text(f"{htpasswd[0]}:{bcrypt_hash(htpasswd[1])}\n")
        for _attempt in range(3):
            port = free_port()
            config = root / "config.yml"
            config.write_text(_config_yaml(root, port, htpasswd_path))
            with open(root / "registry.log", "ab") as log:
                proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            registry = Registry(f"127.0.0.1:{port}", root, proc, htpasswd)
            try:
                if _wait_ready(registry, time.monotonic() + START_TIMEOUT):
                    return registry
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.wait()  # it exited: most likely someone took the port; try another
        raise RegistryStartError(f"registry did not start:\n{(root / 'registry.log').read_text()}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


@contextmanager
def running_registry(tmp: Path, *, htpasswd: tuple[str, str] | None = None) -> Iterator[Registry]:
    """A registry on 127.0.0.1:<free port>, stopped and its temp dir removed on exit.

    With `htpasswd=(user, password)` it requires basic auth; `Registry.credentials` and
    `Registry.client()` carry them.
    """
    registry = start_registry(tmp, htpasswd=htpasswd)
    try:
        yield registry
    finally:
        registry.stop()
