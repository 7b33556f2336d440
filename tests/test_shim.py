"""The pod shim against real runc, real processes and real cgroups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shim import ksm, protocol
from shim.client import AttachStream, ProcessState, ShimClient, ShimError, spawn_shim
from shim.runc import Runc
from tests.pods import pid_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/runc"),
                                reason="needs root and runc")

PREFIX = "fpt-shim-"
APPLETS = ["sh", "sleep", "echo", "cat", "top", "yes", "dd", "head", "tr", "printf", "stty",
           "ps", "true"]
CRI_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([PF]) (.*)$")
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def cgroup_dirs(cgroup: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [c / cgroup.lstrip("/") for c in root.iterdir()
            if (c / cgroup.lstrip("/")).is_dir()]


def cgroup_pids(cgroup: str) -> list[int]:
    procs = Path("/sys/fs/cgroup/pids") / cgroup.lstrip("/") / "cgroup.procs"
    try:
        return [int(p) for p in procs.read_text().split()]
    except OSError:
        return []


def build_rootfs(path: Path) -> None:
    (path / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", path / "bin" / "busybox")
    shutil.copy2("/usr/bin/catatonit", path / "bin" / "catatonit")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    for name in ("proc", "dev", "sys", "tmp"):
        (path / name).mkdir()


def oci_config(rootfs: Path, args: list[str], cgroup: str, terminal: bool = False,
               join_pid_of: int | None = None) -> dict[str, Any]:
    """A config.json of runc spec's shape."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    pid_ns: dict[str, str] = {"type": "pid"}
    if join_pid_of is not None:
        pid_ns["path"] = f"/proc/{join_pid_of}/ns/pid"
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": "fpt-shim",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [pid_ns, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@dataclass
class Pod:
    base: Path
    runc: Runc
    client: ShimClient
    shim_pid: int
    containers: list[str] = field(default_factory=list)

    @property
    def shim_dir(self) -> Path:
        return self.base / "pod"

    def bundle(self, args: list[str], terminal: bool = False,
               join_pid_of: int | None = None) -> tuple[str, Path]:
        container_id = f"{PREFIX}{uuid.uuid4().hex[:12]}"
        bundle = self.base / container_id
        bundle.mkdir()
        build_rootfs(bundle / "rootfs")
        config = oci_config(bundle / "rootfs", args, f"/fpt-shim/{container_id}",
                            terminal, join_pid_of)
        (bundle / "config.json").write_text(json.dumps(config))
        self.containers.append(container_id)
        return container_id, bundle

    async def run_container(self, args: list[str], **create_args: Any) -> tuple[str, Path]:
        """Create and start a container logging to <bundle>/ctr.log."""
        terminal = bool(create_args.get("tty"))
        container_id, bundle = self.bundle(args, terminal=terminal)
        create_args.setdefault("log_path", str(bundle / "ctr.log"))
        pid = await self.client.create(container_id, str(bundle), **create_args)
        assert pid > 0
        await self.client.start(container_id)
        return container_id, bundle

    def cleanup(self) -> None:
        for container_id in self.containers:
            with contextlib.suppress(Exception):
                self.runc.delete(container_id, force=True)
        if self.shim_pid > 0 and pid_alive(self.shim_pid):  # the pid the shim reported
            os.kill(self.shim_pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not pid_alive(self.shim_pid), 5)
        for container_id in self.containers:
            for directory in cgroup_dirs(f"/fpt-shim/{container_id}"):
                with contextlib.suppress(OSError):
                    directory.rmdir()
        for directory in cgroup_dirs("/fpt-shim"):  # shared parent: only if now empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@contextlib.contextmanager
def foreground_zygote(*flags: str) -> Iterator[str]:
    """A shim zygote in the foreground, so the caller owns (and ends) its process."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    path = base / "zygote.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "shim.zygote", "--socket", str(path), "--foreground", *flags],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        wait_until(path.exists, 10, "zygote socket")
        yield str(path)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def zygote_socket() -> Iterator[str]:
    with foreground_zygote() as path:
        yield path


@pytest.fixture(params=["fresh", "zygote"])
def pod(request: pytest.FixtureRequest) -> Iterator[Pod]:
    zygote = request.getfixturevalue("zygote_socket") if request.param == "zygote" else None
    with shim_pod(zygote) as pod_:
        yield pod_


@contextlib.contextmanager
def shim_pod(zygote: str | None) -> Iterator[Pod]:
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    runc = Runc(root=str(base / "runc"))
    pod_ = Pod(base, runc, ShimClient(str(base / "pod")), shim_pid=-1)
    try:
        pod_.client = run(spawn_shim(base.name, str(pod_.shim_dir), runc.root,
                                     log_level="debug", zygote_socket=zygote))
        pod_.shim_pid = run(pod_.client.shim_state()).pid
        yield pod_
    finally:
        pod_.cleanup()


def read_log(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, content) per line, asserting every line has the CRI format."""
    records = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        match = CRI_LINE.match(line)
        assert match, f"not a CRI log line: {line[:120]!r}"
        records.append((match.group(2), match.group(3), match.group(4)))
    return records


async def wait_exit(client: ShimClient, container_id: str, timeout: float = 15) -> ProcessState:
    return await client.wait(container_id, timeout)


async def read_frames(stream: AttachStream, until: bytes, timeout: float = 10) -> bytes:
    received = b""
    async with asyncio.timeout(timeout):
        while until not in received:
            frame = await stream.read()
            assert frame is not None, f"attach ended early; got {received!r}"
            received += frame[1]
    return received


def test_stdout_and_stderr_become_cri_log_lines(pod: Pod) -> None:
    async def scenario() -> None:
        cid, bundle = await pod.run_container(
            ["sh", "-c", "echo out1; echo err1 >&2; echo out2; printf 'no newline'"])
        final = await wait_exit(pod.client, cid)
        assert final.exit_code == 0
        records = read_log(bundle / "ctr.log")
        stdout = [(tag, text) for stream, tag, text in records if stream == b"stdout"]
        stderr = [(tag, text) for stream, tag, text in records if stream == b"stderr"]
        assert stdout == [(b"F", b"out1"), (b"F", b"out2"), (b"P", b"no newline")]
        assert stderr == [(b"F", b"err1")]
    run(scenario())


def test_long_line_splits_into_partial_records(pod: Pod) -> None:
    async def scenario() -> None:
        script = "head -c 40000 /dev/zero | tr '\\0' a; echo; echo short"
        cid, bundle = await pod.run_container(["sh", "-c", script])
        await wait_exit(pod.client, cid)
        records = read_log(bundle / "ctr.log")
        assert [(tag, len(text)) for _s, tag, text in records] == [
            (b"P", 16384), (b"P", 16384), (b"F", 40000 - 2 * 16384), (b"F", 5)]
        assert b"".join(text for _s, _t, text in records[:3]) == b"a" * 40000
    run(scenario())


def test_reopen_log_after_rename_starts_a_new_file(pod: Pod) -> None:
    async def scenario() -> None:
        script = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"
        cid, bundle = await pod.run_container(["sh", "-c", script])
        log = bundle / "ctr.log"
        wait_until(lambda: log.exists() and log.stat().st_size > 0, what="first log lines")
        rotated = bundle / "ctr.log.1"
        log.rename(rotated)
        await pod.client.reopen_log(cid)
        size_after_reopen = rotated.stat().st_size
        wait_until(lambda: log.exists() and len(read_log(log)) >= 3, what="new log lines")
        assert rotated.stat().st_size == size_after_reopen
        old_last = int(read_log(rotated)[-1][2][4:])
        new_first = int(read_log(log)[0][2][4:])
        assert new_first == old_last + 1
        await pod.client.signal(cid, "KILL")
        await wait_exit(pod.client, cid)
    run(scenario())


def test_exit_code_is_recorded_in_file_state_and_event(pod: Pod) -> None:
    async def scenario() -> None:
        cid, bundle = pod.bundle(["sh", "-c", "sleep 0.2; exit 3"])
        events = pod.client.events()
        first_event = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.1)  # let the subscription reach the shim
        await pod.client.create(cid, str(bundle))
        await pod.client.start(cid)
        event = await asyncio.wait_for(first_event, 15)
        await events.aclose()
        assert event["event"] == "exit"
        assert event["container_id"] == cid
        assert event["exit_code"] == 3
        state = await pod.client.state(cid)
        assert state.status == "exited"
        assert state.exit_code == 3
        assert state.exited_at == event["exited_at"]
        record = json.loads((bundle / "exit").read_text())
        assert record["exit_code"] == 3
        assert record["exited_at"] == event["exited_at"]
        assert record["oom_killed"] is False
    run(scenario())


def test_sigterm_ends_sleep_in_a_flat_pod(pod: Pod) -> None:
    """The pause (catatonit) holds the pid namespace; `sleep` joins it as a peer, so it
    is not the namespace's init and SIGTERM's default action applies."""
    async def scenario() -> None:
        pause_id, pause_bundle = pod.bundle(["/bin/catatonit", "-P"])
        pause_pid = await pod.client.create(pause_id, str(pause_bundle))
        await pod.client.start(pause_id)
        cid, bundle = pod.bundle(["sleep", "1000"], join_pid_of=pause_pid)
        await pod.client.create(cid, str(bundle), log_path=str(bundle / "ctr.log"))
        await pod.client.start(cid)
        assert (await pod.client.state(cid)).status == "running"
        await pod.client.signal(cid, "TERM")
        final = await wait_exit(pod.client, cid, timeout=10)
        assert final.exit_code == 128 + signal.SIGTERM
        assert (await pod.client.state(pause_id)).status == "running"
        await pod.client.signal(pause_id, "KILL")
        assert (await wait_exit(pod.client, pause_id)).exit_code == 128 + signal.SIGKILL
    run(scenario())


def test_shim_survives_clients_going_away(pod: Pod) -> None:
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sleep", "1000"])
        events = pod.client.events()
        pending = asyncio.ensure_future(anext(events))
        attach = await pod.client.attach(cid)
        await asyncio.sleep(0.1)
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        attach.writer.transport.abort()
        await events.aclose()
    run(scenario())
    assert pid_alive(pod.shim_pid)

    async def new_client() -> None:
        from shim.client import connect
        client = await connect(str(pod.shim_dir))
        state = await client.state(pod.containers[0])
        assert state.status == "running"
        await client.signal(pod.containers[0], "KILL")
        assert (await client.wait(pod.containers[0], 10)).exit_code == 137
    run(new_client())


def test_exec_sync_returns_output_and_exit_code(pod: Pod) -> None:
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sleep", "1000"])
        process = {"args": ["sh", "-c", "echo hi; echo err >&2; exit 5"],
                   "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        result = await pod.client.exec_sync(cid, process, timeout=10)
        assert (result.exit_code, result.stdout, result.stderr) == (5, b"hi\n", b"err\n")
        assert not result.timed_out
    run(scenario())


def test_exec_sync_timeout_kills_the_whole_tree(pod: Pod) -> None:
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sh", "-c", "read line"], stdin=True)
        init_pid = (await pod.client.state(cid)).pid
        process = {"args": ["sh", "-c", "sleep 1000 & sleep 1000"], "env": ["PATH=/bin"],
                   "cwd": "/", "user": {"uid": 0, "gid": 0}}
        started = time.monotonic()
        result = await pod.client.exec_sync(cid, process, timeout=1)
        assert result.timed_out
        assert time.monotonic() - started < 5
        cgroup = f"/fpt-shim/{cid}"
        wait_until(lambda: cgroup_pids(cgroup) == [init_pid], 5, "exec tree to die")
        assert not any("sleep" in _cmdline(p) for p in cgroup_pids(cgroup))
    run(scenario())


def test_attach_two_readers_and_stdin(pod: Pod) -> None:
    async def scenario() -> None:
        cid, bundle = await pod.run_container(["cat"], stdin=True, stdin_once=True)
        writer = await pod.client.attach(cid, stdin=True)
        watcher = await pod.client.attach(cid)
        assert writer.has_stdin
        await writer.write_stdin(b"hello\n")
        assert await read_frames(writer, b"hello\n") == b"hello\n"
        assert await read_frames(watcher, b"hello\n") == b"hello\n"
        await writer.close()  # stdin_once: the first attacher leaving closes cat's stdin
        final = await wait_exit(pod.client, cid)
        assert final.exit_code == 0
        eofs = [await watcher.read(), await watcher.read()]
        assert sorted(eofs) == [(protocol.STREAM_STDOUT, b""), (protocol.STREAM_STDERR, b"")]
        assert await watcher.read() is None  # the shim ends the stream after the exit
        await watcher.close()
        assert read_log(bundle / "ctr.log") == [(b"stdout", b"F", b"hello")]
    run(scenario())


def test_tty_output_arrives_through_the_pty(pod: Pod) -> None:
    async def scenario() -> None:
        cid, bundle = await pod.run_container(
            ["sh", "-c", "sleep 0.5; stty size; echo tty-out"], tty=True)
        await pod.client.resize(cid, width=100, height=40)
        final = await wait_exit(pod.client, cid)
        assert final.exit_code == 0
        assert read_log(bundle / "ctr.log") == [(b"stdout", b"F", b"40 100"),
                                               (b"stdout", b"F", b"tty-out")]
    run(scenario())


def test_shutdown_leaves_no_process_behind(pod: Pod) -> None:
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sleep", "1000"])
        await pod.client.shutdown()
        assert pid_alive(pod.shim_pid), "shutdown must wait for running containers"
        await pod.client.signal(cid, "KILL")
    run(scenario())
    wait_until(lambda: not pid_alive(pod.shim_pid), 10, "shim to exit")
    assert not (pod.shim_dir / "shim.sock").exists()
    assert cgroup_pids(f"/fpt-shim/{pod.containers[0]}") == []
    with pytest.raises(ShimError):
        run(pod.client.shim_state())


def test_runc_driver_delete_is_idempotent_and_state_of_unknown_is_none(pod: Pod) -> None:
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sleep", "1000"])
        state = pod.runc.state(cid)
        assert state is not None and state.status == "running"
        assert cid in [s.id for s in pod.runc.list()]
        pod.runc.delete(cid, force=True)
        pod.runc.delete(cid, force=True)
        assert pod.runc.state(cid) is None
        await wait_exit(pod.client, cid)
    run(scenario())


def test_create_failure_reports_runc_error(pod: Pod) -> None:
    async def scenario() -> None:
        cid, bundle = pod.bundle(["/no/such/binary"])
        with pytest.raises(ShimError, match=r"no such file|not found|exec"):
            await pod.client.create(cid, str(bundle))
            await pod.client.start(cid)
    run(scenario())


def test_shim_reaps_orphans(pod: Pod) -> None:
    """Processes re-parented to the shim (runc's intermediates) must not stay zombies."""
    async def scenario() -> None:
        cid, _bundle = await pod.run_container(["sleep", "1000"])
        process = {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/"}
        for _ in range(3):
            assert (await pod.client.exec_sync(cid, process, 10)).exit_code == 0
    run(scenario())
    out = subprocess.run(["ps", "-o", "stat=", "--ppid", str(pod.shim_pid)],
                         capture_output=True, text=True, check=False).stdout
    assert "Z" not in out


def private_kib(pid: int) -> tuple[int, int]:
    """(USS, PSS) in KiB from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split()[:2]
        fields[name.rstrip(":")] = int(value)
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def test_shim_memory_with_one_running_container(pod: Pod, request: pytest.FixtureRequest
                                                ) -> None:
    """A zygote-forked shim shares the interpreter; a fresh one pays for all of it."""
    async def scenario() -> None:
        script = "while true; do echo tick; sleep 0.1; done"
        cid, bundle = await pod.run_container(["sh", "-c", script])
        wait_until(lambda: len(read_log(bundle / "ctr.log")) >= 3, what="log lines")
        await pod.client.exec_sync(cid, {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/"}, 10)
    run(scenario())
    uss, pss = private_kib(pod.shim_pid)
    print(f"{request.node.callspec.id}: shim USS {uss} KiB, PSS {pss} KiB")
    # Zygote-forked: ~1.8 MiB measured with debug logging, an exec and log lines (1.83 MiB
    # with the zygote's malloc heap filled)
    # (hack/shim-memory has the breakdown); the bound catches a regression such as
    # threading or subprocess slipping back into the zygote (+0.5 MiB).
    limit = 2816 if request.node.callspec.id == "zygote" else 16384
    assert uss < limit


def _vm_flags(pid: int, mapping: str) -> set[str]:
    flags: set[str] = set()
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
            current = line.split()[-1] if len(line.split()) > 5 else ""
        elif line.startswith("VmFlags:") and current == mapping:
            flags |= set(line.split()[1:])
    return flags


@contextlib.contextmanager
def fast_ksmd() -> Iterator[None]:
    """ksmd running and scanning fast for the test; put back as it was afterwards."""
    run_file, scan_file = ksm.KSM_RUN, ksm.KSM_RUN.with_name("pages_to_scan")
    if ksm.ksmd_state() is None:
        pytest.skip("no KSM in this kernel")
    run_before, scan_before = ksm.ksmd_state() or "0", scan_file.read_text().strip()
    try:
        scan_file.write_text("4000")
        ksm.set_ksmd_state("1")
        yield
    finally:
        scan_file.write_text(scan_before)
        if run_file.read_text().strip() != run_before:
            ksm.set_ksmd_state(run_before)


def test_merged_shim_memory_is_under_the_target() -> None:
    """With --merge-pages the memory a shim inherits is MADV_MERGEABLE (VmFlags "mg"), and
    once ksmd has merged the pages that CPython's reference counting copied, a shim running
    a container keeps under 1.5 MiB private (issue #5's target; ~0.25 MiB measured)."""
    with foreground_zygote("--merge-pages") as zygote, shim_pod(zygote) as one, \
            shim_pod(zygote) as two:
        for pod_ in (one, two):
            run(pod_.run_container(["sleep", "3600"]))
            assert "mg" in _vm_flags(pod_.shim_pid, "[heap]")
        with fast_ksmd():
            deadline = time.monotonic() + 60
            while max(private_kib(p.shim_pid)[0] for p in (one, two)) >= 1536:
                assert time.monotonic() < deadline, [private_kib(p.shim_pid) for p in (one, two)]
                time.sleep(0.5)


UNMERGED_SHIM_USS_LIMIT_KIB = 1632


def test_unmerged_shim_memory_is_under_the_bound() -> None:
    """Without KSM, a zygote-forked shim running a container keeps what it copied of the
    zygote's pages: 1528-1540 KiB here with the code a shim runs packed by the zygote,
    1604 KiB without (main at f57be80, same machine, interleaved; hack/shim-memory -n 12:
    1532 against 1584-1600; README "What a shim copies"). The bound leaves 6% (92 KiB,
    about three times the ~30 KiB by which layouts differ from one zygote to the next); it
    fails on threading back in the zygote (+0.5 MiB), the unfilled malloc heap (+0.13 MiB)
    or the old 2.2 MiB."""
    with foreground_zygote() as zygote, shim_pod(zygote) as one, shim_pod(zygote) as two, \
            shim_pod(zygote) as three:
        for pod_ in (one, two, three):
            cid, _bundle = run(pod_.run_container(["sleep", "3600"]))
            run(pod_.client.state(cid))
        time.sleep(0.5)
        # The last shim forked is spared what the zygote rewrites at the next spawn.
        uss = [private_kib(p.shim_pid)[0] for p in (one, two)]
        print(f"unmerged shims: USS {uss} KiB")
        assert max(uss) < UNMERGED_SHIM_USS_LIMIT_KIB, uss


def test_unmarked_zygote_offers_nothing_to_ksm(pod: Pod) -> None:
    assert "mg" not in _vm_flags(pod.shim_pid, "[heap]")
