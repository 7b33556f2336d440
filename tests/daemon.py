"""Runs the real `flatpod serve` for tests: temporary root and state dirs, a config file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from cri_api import api_pb2 as pb
from tests.cri import CriClient

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    root: Path
    state: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.state / "flatpod.sock"

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandbox", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flatpod serve exited early:\n{self.log()}")
            if self.socket.exists() and self._answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"flatpod serve did not answer within {timeout}s:\n{self.log()}")

    def _answers(self) -> bool:
        client = CriClient(self.socket, timeout=1)
        try:
            client.Version(pb.VersionRequest())
            return True
        except grpc.RpcError:
            return False
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def client(self) -> CriClient:
        return CriClient(self.socket)


# The test daemons' own network, apart from the real default (flatpod0, 10.88.0.0/16) and
# from the CNI configs a host may have.
TEST_BRIDGE = "fptest0"
TEST_SUBNET = "10.241.0.0/16"


def write_config(path: Path, root: Path, state: Path, extra: str = "") -> None:
    path.write_text(
        f'root_dir = "{root}"\n'
        f'state_dir = "{state}"\n'
        'log_level = "debug"\n'
        f"{extra}\n"
    )
    if "[network]" not in extra:
        with path.open("a") as f:
            f.write(
                f'[network]\nbridge = "{TEST_BRIDGE}"\nsubnet = "{TEST_SUBNET}"\n'
                f'cni_conf_dir = "{path.parent / "no-cni"}"\n'
            )


@contextmanager
def running_daemon(base: Path, extra_config: str = "") -> Iterator[Daemon]:
    """A daemon in `base`; on exit it is stopped (pods are the caller's to remove first)."""
    # The state dir is short, under /run as on a node: shim sockets live below it, and unix
    # socket paths must fit in 108 bytes (pytest's temp paths do not).
    root, state = base / "root", Path(tempfile.mkdtemp(prefix="fpt-", dir="/run"))
    config_path = base / "config.toml"
    write_config(config_path, root, state, extra_config)
    daemon = Daemon(root, state, config_path, base / "flatpod.log")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(state, ignore_errors=True)
