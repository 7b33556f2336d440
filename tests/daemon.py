"""Runs the real `flatpod serve` for tests: temporary root and state dirs, a config file."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cri_api import api_pb2 as pb
from sandbox import cgroups
from tests.cri import CriClient

REPO = Path(__file__).resolve().parent.parent
# Stretches the tests' waits (never what they check) on slow machines: hack/vm-test.sh sets it
# under an emulated CPU, where a Python daemon alone takes tens of seconds to start.
TIME_SCALE = float(os.environ.get("FLATPOD_TEST_TIME_SCALE", "1"))
START_TIMEOUT = 20.0 * TIME_SCALE
# The event loop of every test daemon ("asyncio" or "uvloop"; empty: the config's default), so
# that the suite can run against either: FLATPOD_TEST_EVENT_LOOP=uvloop pytest ...
EVENT_LOOP = os.environ.get("FLATPOD_TEST_EVENT_LOOP", "")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop of that kind, for tests that run daemon code in-process (the streaming server)."""
    if EVENT_LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@dataclass
class Daemon:
    root: Path
    state: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # Extra environment for the next start(), e.g. {"FLATPOD_CRASH_AT": "run_pod:after_netns"}.
    env: dict[str, str] = field(default_factory=dict)
    # The daemon's own bridge network (see test_network).
    bridge: str = ""
    subnet: str = ""

    @property
    def socket(self) -> Path:
        return self.state / "flatpod.sock"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env.update(self.env)
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
        self.kill()  # not left serving (or starting) after the test has given up on it
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = START_TIMEOUT) -> int:
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


def test_network() -> tuple[str, str]:
    """A bridge and a /24 of a test daemon's own: apart from the real default (flatpod0,
    10.88.0.0/16), from the CNI configs a host may have, and from other test daemons that run
    at the same time (their leases live in other stores)."""
    n = random.randrange(256)
    return f"fpt{secrets.token_hex(3)}", f"10.241.{n}.0/24"


def write_config(
    path: Path, root: Path, state: Path, extra: str = "", network: tuple[str, str] | None = None
) -> None:
    # cgroupfs: a test daemon's pods, apart from a node's /flatpod. systemd: the default
    # slice (a slice of the test's own would outlive it as a unit of systemd's).
    own_parent = cgroups.detect_driver() is cgroups.Driver.CGROUPFS
    cgroup_parent = f"/{state.name}"
    path.write_text(
        f'root_dir = "{root}"\n'
        f'state_dir = "{state}"\n'
        'log_level = "debug"\n'
        # ksmd is the host's: tests only mark pages (test_server.py covers "on" and the default).
        + ('shim_page_merging = "advise"\n' if "shim_page_merging" not in extra else "")
        + (f'default_cgroup_parent = "{cgroup_parent}"\n'
           if "default_cgroup_parent" not in extra and own_parent else "")
        + (f'event_loop = "{EVENT_LOOP}"\n' if EVENT_LOOP and "event_loop" not in extra else "")
        + f"{extra}\n"
    )
    if "[network]" not in extra:
        bridge, subnet = network or test_network()
        with path.open("a") as f:
            f.write(
                f'[network]\nbridge = "{bridge}"\nsubnet = "{subnet}"\n'
                f'cni_conf_dir = "{path.parent / "no-cni"}"\n'
            )


@contextmanager
def running_daemon(
    base: Path, extra_config: str = "", env: dict[str, str] | None = None,
    state_parent: Path = Path("/run"),
) -> Iterator[Daemon]:
    """A daemon in `base`; on exit it is stopped (pods are the caller's to remove first)."""
    # The state dir is short, under /run as on a node: shim sockets live below it, and unix
    # socket paths must fit in 108 bytes (pytest's temp paths do not).
    root, state = base / "root", Path(tempfile.mkdtemp(prefix="fpt-", dir=state_parent))
    config_path = base / "config.toml"
    bridge, subnet = test_network()
    write_config(config_path, root, state, extra_config, (bridge, subnet))
    daemon = Daemon(
        root, state, config_path, base / "flatpod.log", env=dict(env or {}),
        bridge=bridge, subnet=subnet,
    )
    try:  # a daemon that failed to start may have started its zygote and bridge
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        kill_stray_zygote(state)
        shutil.rmtree(state, ignore_errors=True)
        remove_bridge(bridge, subnet)
        remove_cgroup_parent(f"/{state.name}")


def remove_cgroup_parent(path: str) -> None:
    """The (by now empty) parent cgroup of the daemon's pods, in every hierarchy."""
    from sandbox import cgroups

    cgroups.remove(path)


def remove_bridge(bridge: str, subnet: str) -> None:
    """The daemon's bridge and masquerade rule (a node keeps them; a test does not)."""
    from netns.bridge import BridgeConfig, BridgeNetwork
    from netns.ipam import JsonFileLeaseBook

    with tempfile.TemporaryDirectory() as tmp:
        book = JsonFileLeaseBook(Path(tmp) / "leases.json")
        BridgeNetwork(BridgeConfig(name=bridge, subnet=subnet), book).destroy()


def kill_stray_zygote(state: Path) -> None:
    """A daemon that a test killed (SIGKILL) leaves its shim zygote running, by design: the
    next daemon reuses it. When no next daemon comes, the test cleans it up."""
    try:
        pid = int((state / "zygote.pid").read_text())
        if b"shim.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
