"""The daemon on either event loop (config key `event_loop`, uvloop by default), and what its
children inherit.

uvloop's subprocesses, unlike the standard library's, close no fd in the child: the zygote
(and a shim started without it) must close what it did not mean to keep, or it holds the
daemon's end of its stderr pipe and the daemon's wait for it to detach never ends.
"""

from __future__ import annotations

import asyncio
import os
import pty
import shutil
import tempfile
import time
import tty
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from cri_api import api_pb2 as pb
from sandbox.exec import pty_writer
from shim.client import spawn_shim, start_zygote, zygote_call
from tests.daemon import TIME_SCALE, running_daemon
from tests.pods import a_pod, process_exited, wait_for

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio"),
         pytest.param(uvloop.new_event_loop, id="uvloop")]


def _fds_above_stdio(pid: int) -> dict[int, str]:
    found = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if int(fd.name) > 2:
                found[int(fd.name)] = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile (a connection just answered)
            pass
    return found


async def _start_and_inspect(socket_path: str) -> tuple[int, dict[int, str]]:
    """The zygote's pid, and its fds above stdio once it has closed the connection of our
    ping."""
    await start_zygote(socket_path, timeout=30 * TIME_SCALE)
    pid = int((await zygote_call(socket_path, "ping", timeout=30 * TIME_SCALE))["pid"])
    try:
        deadline = time.monotonic() + 10 * TIME_SCALE  # generous: a loaded 2-core machine
        while len(fds := _fds_above_stdio(pid)) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return pid, fds
    finally:
        await zygote_call(socket_path, "stop", timeout=30 * TIME_SCALE)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_zygote_keeps_only_its_listener(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Started from either loop while this process holds an inheritable fd (as a daemon may,
    from its own parent), the zygote detaches in time and keeps stdio and its listener."""
    state = tempfile.mkdtemp(prefix="fpt-loop-", dir="/run")  # a short unix socket path
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            pid, fds = runner.run(_start_and_inspect(os.path.join(state, "zygote.sock")))
        # The stopped zygote removes its socket as it exits: not while the dir is removed.
        wait_for(lambda: process_exited(pid), what="the zygote's exit")
    finally:
        os.close(stray)
        shutil.rmtree(state)
    assert len(fds) == 1 and next(iter(fds.values())).startswith("socket:"), fds


async def _spawn_and_inspect(shim_dir: str) -> dict[int, str]:
    """A shim started without the zygote (`python -m shim`, the daemon's fallback)."""
    client = await spawn_shim("fd-test", shim_dir, os.path.join(shim_dir, "runc"),
                              timeout=30 * TIME_SCALE)
    try:
        return _fds_above_stdio((await client.shim_state()).pid)
    finally:
        await client.shutdown()


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_fresh_shim_keeps_only_its_own_fds(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Its listener, its epoll and the connection it answers: no /dev/null, pipe or fd of
    this process's."""
    shim_dir = tempfile.mkdtemp(prefix="fpt-loop-", dir="/run")
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            fds = runner.run(_spawn_and_inspect(shim_dir))
    finally:
        os.close(stray)
        shutil.rmtree(shim_dir)
    assert all(target.startswith(("socket:", "anon_inode:")) for target in fds.values()), fds


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_the_daemon_serves_pods_on_either_loop(tmp_path: Path, event_loop: str) -> None:
    """`event_loop`: the daemon runs on that loop (libuv's module is mapped or not), starts
    the zygote, runs a pod (netlink, runc, shim calls, pidfd waits) and stops; the zygote
    holds no fd of the daemon's."""
    with running_daemon(tmp_path, extra_config=f'event_loop = "{event_loop}"') as daemon:
        assert daemon.process is not None
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert ("/uvloop/loop." in maps) == (event_loop == "uvloop")
        zygote_pid = int((daemon.state / "zygote.pid").read_text())
        assert len(_fds_above_stdio(zygote_pid)) == 1
        cri = daemon.client()
        try:
            with a_pod(cri, tmp_path) as (pod_id, _config):
                status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
                assert status.status.state == pb.SANDBOX_READY
                assert status.status.network.ip
        finally:
            cri.close()


async def _through_a_pty(master: int, slave: int, data: bytes) -> bytes:
    writer = pty_writer(os.dup(master))
    writer.write(data)
    drained = asyncio.create_task(writer.drain())
    await asyncio.sleep(0.1)
    # Nobody reads the terminal: what it cannot hold waits, and so does the writer.
    assert writer.transport.get_write_buffer_size() > 0
    assert not drained.done()
    received = bytearray()
    deadline = time.monotonic() + 30 * TIME_SCALE
    while len(received) < len(data) and time.monotonic() < deadline:
        try:
            received += os.read(slave, 65536)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(drained, 30 * TIME_SCALE)
    writer.close()
    await asyncio.sleep(0)  # its fd closes on the next turn of the loop
    return bytes(received)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_terminal_input_waits_for_the_terminal_and_arrives_whole(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """An exec's tty stdin (sandbox/exec.py's pty_writer), on either loop: more than the
    terminal holds is kept until the process reads it, with the writer paused meanwhile."""
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)  # bytes pass as they are: no echo, no line editing
        os.set_blocking(slave, False)
        data = bytes(range(256)) * 1024  # 256 KiB: several times what a terminal buffers
        with asyncio.Runner(loop_factory=new_loop) as runner:
            assert runner.run(_through_a_pty(master, slave, data)) == data
    finally:
        os.close(master)
        os.close(slave)
