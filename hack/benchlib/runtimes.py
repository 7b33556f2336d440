"""The runtimes under test: how each is started, stopped, and checked for leftovers.

Every pod the bench makes lives below a cgroup parent named after the runtime
(/fpbench-flatpod-<run>, /fpbench-ctrd), so "what is left" is a question about those cgroups,
plus each runtime's own traces (netns pins, mounts, shim processes, the bridge).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from benchlib import procs
from benchlib.cri import NAMESPACE, Cri, describe, pod_config
from cri_api import api_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
# The conformance harness (containerd, the stand-in registry) lives beside the checkout
# (CONFORMANCE_DIR overrides, as for hack/critest.sh: a worktree's parent is elsewhere).
CONFORMANCE = Path(os.environ.get("CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
CONTAINERD_SH = CONFORMANCE / "containerd.sh"
CONFORMANCE_WORK = Path(os.environ.get("CONFORMANCE_WORK", "/var/tmp/flatpod-conformance"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
PAUSE_COMMS = ("catatonit", "pause")
TEARDOWN_THREADS = 4


class Runtime:
    name = ""
    cgroup_parent = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.log_root = work / f"logs-{self.name}"
        self.socket = Path()
        self._cri: Cri | None = None
        self.created_pods: set[str] = set()

    @property
    def cri(self) -> Cri:
        if self._cri is None:
            self._cri = Cri(self.socket)
        return self._cri

    # ---- lifecycle, per runtime -------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Removes what the bench made, stops what it started; returns what was left behind
        (empty: clean)."""
        left: list[str] = []
        if self.socket == Path():  # it never started: nothing of the bench's to remove
            return left
        try:
            self.remove_bench_pods()
            self.restore_images()
        except Exception as err:  # still stop the daemon and look for what is left
            left.append(f"removing pods/images failed: {describe(err)}")
        self.close()
        left += self.stop_daemon()
        left += self._cgroup_leftovers()
        return left

    def restore_images(self) -> None:
        """Removes the images the bench pulled into a store that outlives it."""

    def stop_daemon(self) -> list[str]:
        """Stops the daemon if the bench started it; returns what it left behind."""
        raise NotImplementedError

    def daemon_pid(self) -> int:
        raise NotImplementedError

    def describe_processes(self, table: dict[int, procs.Proc], shims: set[int]) -> dict[str, int]:
        """Helper processes besides the daemon and the shims (flatpod's zygote), by role."""
        return {}

    # ---- shared -----------------------------------------------------------------------------

    def new_pod_config(self) -> pb.PodSandboxConfig:
        config = pod_config(self.cgroup_parent, self.log_root)
        os.makedirs(config.log_directory, exist_ok=True)  # kubelet makes it, so must we
        return config

    def run_pod(self, config: pb.PodSandboxConfig) -> str:
        pod_id = self.cri.run_pod(config)
        self.created_pods.add(pod_id)
        return pod_id

    def bench_pod_ids(self) -> list[str]:
        return [p.id for p in self.cri.list_pods() if p.metadata.namespace == NAMESPACE]

    def remove_bench_pods(self) -> None:
        """Stop and remove every pod the bench made, a few at a time."""
        ids = self.bench_pod_ids()
        with ThreadPoolExecutor(TEARDOWN_THREADS) as pool:
            list(pool.map(self.cri.stop_and_remove_pod, ids))

    def pauses_and_shims(self) -> list[tuple[int, int]]:
        """(pause pid, shim pid) of each bench pod: the pause is the catatonit/pause process
        in our cgroup parent, and its parent is the pod's shim, in both runtimes."""
        table = procs.snapshot()
        name = self.cgroup_parent.strip("/")
        pairs = []
        for proc in table.values():
            if proc.comm in PAUSE_COMMS and procs.in_cgroup_named(proc.pid, name):
                pairs.append((proc.pid, proc.ppid))
        return pairs

    def _cgroup_leftovers(self) -> list[str]:
        """Processes and cgroups still under our cgroup parent; removes the empty parents."""
        name = self.cgroup_parent.strip("/")
        left = [f"process {p.pid} {p.comm}" for p in procs.snapshot().values()
                if procs.in_cgroup_named(p.pid, name)]
        for controller in sorted(CGROUP_ROOT.iterdir()):
            parent = controller / name
            if not parent.is_dir():
                continue
            for dirpath, _dirnames, _files in os.walk(parent, topdown=False):
                with contextlib.suppress(OSError):  # pod cgroups should be gone already
                    os.rmdir(dirpath)
            if parent.exists():
                left.append(f"cgroup {parent}")
        return left

    def close(self) -> None:
        if self._cri is not None:
            self._cri.close()
            self._cri = None

    def restart(self) -> float | None:
        """Restarts the daemon with its pods running: seconds until it answers again; None
        where the bench cannot (containerd.sh stop removes every pod first)."""
        return None

    def wait_answering(self, deadline: float, poll: float = 0.1) -> None:
        last = ""
        while time.monotonic() < deadline:
            try:
                self.cri.version()
                return
            except grpc.RpcError as err:
                last = describe(err)
            time.sleep(poll)
        raise RuntimeError(f"{self.name} does not answer on {self.socket}: {last}")


# ---- flatpod ---------------------------------------------------------------------------------


class Flatpod(Runtime):
    name = "flatpod"
    def __init__(self, work: Path, event_loop: str = "", slot: int | None = None,
                 env: dict[str, str] | None = None,
                 settings: dict[str, str] | None = None, name: str = "") -> None:
        """event_loop: the config's `event_loop` ("": its default); two instances in one run
        (an A/B of the loops, of an environment variable `env`, or of top-level config keys
        `settings`, string values) are named by it and get different slots (subnets).
        `name`, if given, names it instead (the churn's idle flatpod)."""
        # Names of this run's own: benches of other checkouts may run at the same time on a
        # shared machine, and one's cleanup must not take another's bridge or cgroups.
        run = secrets.token_hex(3)
        self.event_loop = event_loop
        if event_loop:
            self.name = f"flatpod-{event_loop}"
        self.env = env or {}
        if self.env:
            self.name += "-" + ",".join(f"{k}={v}" for k, v in self.env.items())
        self.settings = settings or {}
        if self.settings:
            self.name += "-" + ",".join(f"{k}={v}" for k, v in self.settings.items())
        if name:
            self.name = name
        self.cgroup_parent = f"/fpbench-flatpod-{run}"
        self.bridge = f"fpb{run}"
        self.subnet = f"10.242.{64 * (secrets.randbelow(4) if slot is None else slot % 4)}.0/18"
        super().__init__(work)
        self.root = work / f"{self.name}-root"
        self.state = Path()
        self.log_path = work / f"{self.name}.log"
        self.config_path = work / f"{self.name}.toml"
        self.process: subprocess.Popen[bytes] | None = None

    def _config_text(self) -> str:
        # masquerade off: the bench needs no egress, and it keeps iptables untouched
        # (containerd's harness bridge has ipMasq false too).
        return (
            f'root_dir = "{self.root}"\n'
            f'state_dir = "{self.state}"\n'
            f'default_cgroup_parent = "{self.cgroup_parent}"\n'
            + (f'event_loop = "{self.event_loop}"\n' if self.event_loop else "")
            + "".join(f'{key} = "{value}"\n' for key, value in self.settings.items())
            + "[network]\n"
            f'bridge = "{self.bridge}"\n'
            f'subnet = "{self.subnet}"\n'
            "masquerade = false\n"
            f'cni_conf_dir = "{self.work / "no-cni"}"\n'
            "[images.mirrors]\n"
            '"registry.k8s.io" = ["http://127.0.0.1:5000"]\n'
        )

    def start(self) -> None:
        # Short, under /run as on a node: shim sockets below it must fit in sockaddr_un.
        self.state = Path(tempfile.mkdtemp(prefix="fpb-", dir="/run"))
        self.socket = self.state / "flatpod.sock"
        self.config_path.write_text(self._config_text())
        self._spawn()

    def restart(self) -> float:
        """SIGTERM (pods keep running), then `flatpod serve` again: seconds from its start
        to its first answered RPC (it recovers every pod before it serves)."""
        self.close()
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.socket.unlink(missing_ok=True)
        started = time.monotonic()
        self._spawn()
        return time.monotonic() - started

    def _spawn(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandbox", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists() and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flatpod serve exited: {self.log_tail()}")
            time.sleep(0.01)
        self.wait_answering(deadline, poll=0.01)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def daemon_pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def describe_processes(self, table: dict[int, procs.Proc], shims: set[int]) -> dict[str, int]:
        helpers = {}
        for proc in table.values():
            if proc.pid in shims or proc.pid == self.daemon_pid():
                continue
            if proc.mentions(str(self.state)) and proc.comm not in PAUSE_COMMS:
                role = "zygote" if proc.mentions("shim.zygote") else proc.argv0
                helpers[f"{role} {proc.pid}"] = proc.pid
        return helpers

    def stop_daemon(self) -> list[str]:
        left: list[str] = []
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                left.append("flatpod serve ignored SIGTERM for 30 s: killed")
                self.process.kill()
                self.process.wait()
        left += self._own_leftovers()
        self._remove_bridge()
        return left

    def _own_leftovers(self) -> list[str]:
        left = []
        for proc in procs.snapshot().values():
            if proc.mentions(str(self.state)) or proc.mentions(str(self.root)):
                left.append(f"process {proc.pid} {' '.join(proc.cmdline)[:100]}")
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mount in mounts:
            if mount.startswith((str(self.state), str(self.root))):
                left.append(f"mount {mount}")
        if NETNS_DIR.is_dir():
            for entry in os.listdir(NETNS_DIR):
                pinned = entry.removeprefix("flatpod-")
                if entry.startswith("flatpod-") and any(
                        p.startswith(pinned) for p in self.created_pods):
                    left.append(f"netns {entry}")
        if not any(item.startswith("mount") for item in left):
            shutil.rmtree(self.state, ignore_errors=True)
        return left

    def _remove_bridge(self) -> None:
        """flatpod keeps its bridge when it stops (as a node would); the bench's is its own."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "del", self.bridge], check=False)


# ---- containerd ------------------------------------------------------------------------------


class Containerd(Runtime):
    name = "containerd"
    cgroup_parent = "/fpbench-ctrd"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.started_here = False
        self.netns_before: set[str] = set()
        self.images_before: dict[str, bool] = {}

    def _script(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CONTAINERD_SH), action], capture_output=True, text=True,
                              check=False)

    def start(self) -> None:
        self.netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
        if self._script("status").returncode != 0:
            result = self._script("start")
            if result.returncode != 0:
                raise RuntimeError(f"containerd.sh start: {result.stdout}{result.stderr}")
            self.started_here = True
        self.socket = Path(self._script("socket").stdout.strip())
        self.wait_answering(time.monotonic() + 30)

    def remember_image(self, image: str) -> None:
        """containerd's store outlives the bench: note what was there, to restore it."""
        self.images_before.setdefault(image, self.cri.has_image(image))

    def daemon_pid(self) -> int:
        try:
            return int((CONFORMANCE_WORK / "containerd" / "containerd.pid").read_text())
        except (OSError, ValueError):
            return 0

    def restore_images(self) -> None:
        for image, was_there in self.images_before.items():
            if not was_there:
                self.cri.remove_image(image)

    def stop_daemon(self) -> list[str]:
        left: list[str] = []
        if self.started_here:
            result = self._script("stop")
            if result.returncode != 0:
                left.append(f"containerd.sh stop: {result.stdout}{result.stderr}")
            for proc in procs.snapshot().values():
                if proc.argv0 == "containerd-shim-runc-v2" and proc.mentions(str(self.socket)):
                    left.append(f"shim {proc.pid}")
            # with containerd started here, a new cni-* netns can only be ours
            netns_now = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
            left += [f"netns {n}" for n in sorted(netns_now - self.netns_before)
                     if n.startswith("cni-")]
        return left
