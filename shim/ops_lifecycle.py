"""The shim's process lifecycle ops: create (runc create or run, or a container held for
start to make: `runc run --detach`, or a restore), start, signal, state, wait, subscribe and
shutdown."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from shim import protocol
from shim.crilog import CriLogFile, LineSplitter
from shim.runc import RuncError, StdioPipes, criu_log_errors
from shim.state import (
    ConsoleListener,
    Container,
    FdWriter,
    Op,
    OpError,
    Restore,
    owns_pid_namespace,
    parent_oom_events,
    read_oom_kills,
    read_oom_kills_if_present,
    read_pid,
    receive_console,
)

if TYPE_CHECKING:
    from shim.server import Connection, Shim

SIGKILL = int(signal.SIGKILL)
# How a signal request names SIGKILL (the daemon sends numbers; runc takes names too).
SIGKILL_NAMES = frozenset({SIGKILL, "KILL", "SIGKILL", str(SIGKILL)})


def create(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    container_id = str(request["container_id"])
    if container_id in shim.containers:
        raise OpError(f"container {container_id} already exists in this shim")
    if shim.shutting_down:
        raise OpError("shim is shutting down")
    bundle = str(request["bundle"])
    tty = bool(request.get("tty"))
    want_stdin = bool(request.get("stdin"))
    log_path = request.get("log_path")
    pid_file = os.path.join(bundle, "init.pid")
    log_root = request.get("log_root")
    log = CriLogFile(str(log_path), str(log_root) if log_root else None) if log_path else None
    oom_file = request.get("oom_file")
    oom_control = str(oom_file) if oom_file else None
    # "run_at_start": nothing runs until start, which makes and starts it with one `runc run
    # --detach` (one runc process instead of create's and start's). Its bundle is read then,
    # not now: the daemon sends this while it still makes the bundle (sandbox/containers.py).
    run_at_start = bool(request.get("run_at_start"))
    container = Container(
        id=container_id, bundle=bundle, pid=0, tty=tty,
        stdin_once=bool(request.get("stdin_once")),
        exit_file=str(request.get("exit_file") or os.path.join(bundle, "exit")),
        log=log, stdin=None, oom_control=oom_control,
        systemd_cgroup=bool(request.get("systemd_cgroup")),
        kill_all_on_exit=not run_at_start and not owns_pid_namespace(bundle),
        want_stdin=want_stdin,
        restore=Restore.from_request(request.get("restore")))
    # "start": run it at once (`runc run --detach`), for the pause: a pod's first process.
    start_now = bool(request.get("start"))
    if container.restore is not None and tty:
        raise OpError("a container with a terminal cannot be restored from a checkpoint")
    if container.restore is not None or run_at_start:
        if start_now:
            raise OpError("a container made at its start cannot be started now")
        # Nothing runs until start: runc restore, or runc run, makes the container then.
        shim.containers[container_id] = container
        shim.logger.log("info", f"created {container_id}, made at start")
        return {"pid": 0, "status": container.status}
    _run_container(shim, container, pid_file, start_now)
    if start_now:
        container.status = "running"
    return {"pid": container.pid, "status": container.status}


def _run_container(shim: Shim, container: Container, pid_file: str,
                   start_now: bool = False) -> None:
    """runc create (or restore, or with `start_now` run) with the container's stdio; then it
    is watched."""
    # The OOM counts before runc: once it has run (or restored) the container, the process
    # may have been OOM-killed already, and that kill must count as its own.
    kills_before = read_oom_kills(container.oom_control)
    parent_kills_before = (read_oom_kills_if_present(parent_oom_events(container.oom_control))
                           if container.systemd_cgroup else None)
    try:
        if container.tty:
            _create_with_pty(shim, container, pid_file, start_now)
        else:
            _create_with_pipes(shim, container, pid_file, container.want_stdin, start_now)
        container.pid = read_pid(pid_file)
    except BaseException:
        _release_stdio(shim, container)
        if container.log:
            container.log.close()
        raise
    container.oom_kills_at_create = kills_before
    container.oom_kills_seen = kills_before
    container.oom_parent_kills_at_create = parent_kills_before
    shim.watch_oom(container)
    shim.containers[container.id] = container
    shim.pids[container.pid] = container
    for fd in container.outputs:
        shim.loop.watch(fd, shim.output_reader(container, fd), None)
    shim.logger.log("info", f"created {container.id} pid {container.pid}")


def _create_with_pipes(shim: Shim, container: Container, pid_file: str, want_stdin: bool,
                       start_now: bool) -> None:
    pipes = StdioPipes.open(want_stdin)
    if want_stdin:
        container.stdin = FdWriter(shim.loop, pipes.stdin)
    container.outputs[pipes.stdout] = protocol.STREAM_STDOUT
    container.outputs[pipes.stderr] = protocol.STREAM_STDERR
    try:
        stdio = pipes.child
        restore = container.restore
        if restore is None:
            make = shim.runc.run if start_now else shim.runc.create
            make(container.id, container.bundle, pid_file, stdio=stdio,
                 systemd_cgroup=container.systemd_cgroup)
        else:
            shim.runc.restore(container.id, container.bundle, restore.image_path,
                              restore.work_path, pid_file, criu=restore.criu, stdio=stdio,
                              systemd_cgroup=container.systemd_cgroup)
    finally:
        pipes.close_child_ends()
    for fd in container.outputs:
        os.set_blocking(fd, False)
        container.splitters[fd] = LineSplitter(shim.max_log_line)


def _create_with_pty(shim: Shim, container: Container, pid_file: str, start_now: bool) -> None:
    socket_path = os.path.join(shim.state_dir, shim.next_name("c") + ".sock")
    make = shim.runc.run if start_now else shim.runc.create
    with ConsoleListener(socket_path) as listener:
        make(container.id, container.bundle, pid_file,
             console_socket=socket_path, systemd_cgroup=container.systemd_cgroup)
        master = receive_console(listener)
    container.pty_master = master
    os.set_blocking(master, False)
    container.outputs[master] = protocol.STREAM_STDOUT
    container.splitters[master] = LineSplitter(shim.max_log_line)
    container.stdin = FdWriter(shim.loop, os.dup(master))


def _release_stdio(shim: Shim, container: Container) -> None:
    for fd in list(container.outputs):
        shim.loop.forget(fd)
        os.close(fd)
    container.outputs.clear()
    if container.stdin is not None:
        container.stdin.close()


def start(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    container = shim.container_for(request)
    if never_ran(container):
        _make_at_start(shim, container)
        container.status = "running"
        return container.view()
    shim.runc.start(container.id)
    if container.status == "created":
        container.status = "running"
    return container.view()


def never_ran(container: Container) -> bool:
    """Created to be made at start (run, or restored), and not started: it has no process,
    no cgroup and no runc state."""
    return container.status == "created" and container.pid == 0


def _make_at_start(shim: Shim, container: Container) -> None:
    """`runc run --detach`, or `runc restore --detach` for a checkpoint, with the container's
    stdio: the process starts (or continues where its checkpoint left it) now."""
    pid_file = os.path.join(container.bundle, "init.pid")
    restore = container.restore
    if restore is None:
        container.kill_all_on_exit = not owns_pid_namespace(container.bundle)
        _run_container(shim, container, pid_file, start_now=True)
        return
    try:
        _run_container(shim, container, pid_file)
    except RuncError as exc:
        criu_says = criu_log_errors(os.path.join(restore.work_path, "restore.log"))
        raise OpError(f"{exc}; CRIU: {criu_says}" if criu_says else str(exc)) from exc
    container.restore = None


def signal_(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    container = shim.container_for(request)
    if never_ran(container):
        # No process, so a kill (a stop, a remove) ends it at once, as SIGKILL would have
        # ended its runc init; there is nothing left to kill.
        container.restore = None
        container.all_killed = True
        shim.container_exited(container, 128 + int(signal.SIGKILL))
        return container.view()
    if container.status == "exited":
        return container.view()
    signum, everything = request.get("signal", "TERM"), bool(request.get("all"))
    if signum in SIGKILL_NAMES:
        signum = int(SIGKILL)  # by number: the shim may then send it itself
    if _init_signal_suffices(container, signum, everything):
        os.kill(container.pid, signum)
        return container.view()
    shim.runc.kill(container.id, signum, all=everything)
    if everything and signum == int(SIGKILL):
        container.all_killed = True
    return container.view()


def _init_signal_suffices(container: Container, signum: object, everything: bool) -> bool:
    """Whether signalling the container's init ourselves does what `runc kill` would: without
    --all runc signals the init alone; with --all and SIGKILL, the init of a container
    with its own PID namespace takes every process in it down (the kernel kills a PID
    namespace whose init dies). The init is our child until we reap it, so its pid cannot
    have been reused while the container runs. Each runc exec saved is ~15 ms of CPU that
    grows with the host's mount table (runc reads /proc/self/mountinfo): a node's
    scale-down was half runc (perf)."""
    if container.status != "running" or container.pid <= 0 or type(signum) is not int:
        return False
    return not everything or (signum == int(signal.SIGKILL) and not container.kill_all_on_exit)


def state(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    if "container_id" in request:
        return shim.container_for(request).view()
    return {"pod_id": shim.pod_id, "pid": os.getpid(),
            "containers": [c.view() for c in shim.containers.values()]}


def wait(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
    container = shim.container_for(request)
    if container.status == "exited":
        return container.view()
    container.waiters.append((conn, request.get("id")))
    return None


def subscribe(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    conn.mode = "events"
    shim.subscribers.append(conn)
    return {}


def shutdown(shim: Shim, conn: Connection, request: dict[str, Any]) -> None:
    shim.shutting_down = True
    conn.send_message({"id": request.get("id"), "ok": True})
    shim.maybe_exit()
    return None


OPS: Mapping[str, Op] = MappingProxyType({
    "create": create, "start": start, "signal": signal_, "state": state, "wait": wait,
    "subscribe": subscribe, "shutdown": shutdown,
})
