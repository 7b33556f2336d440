"""The shim's exec ops: exec (runc exec, its stdio fds handed to the caller), exec_state,
exec_wait and exec_kill (the exec's whole process tree, through pidfds)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from shim import protocol
from shim.runc import StdioPipes
from shim.state import (
    Callback,
    ConsoleListener,
    Container,
    ExecSession,
    Op,
    OpError,
    read_pid,
    receive_console,
    unlink_quietly,
)

if TYPE_CHECKING:
    from shim.server import Connection, Shim

KEEP_EXITED_EXECS = 256

def exec_(shim: Shim, conn: Connection, request: dict[str, Any]) -> None:
    container = shim.container_for(request)
    if container.status != "running":
        raise OpError(f"container {container.id} is {container.status}, not running")
    tty = bool(request.get("tty"))
    process = dict(request["process"])
    process["terminal"] = tty
    exec_id = str(request.get("exec_id") or shim.next_name(f"{os.getpid()}-exec"))
    if exec_id in shim.execs:
        raise OpError(f"exec {exec_id} already exists")
    container.all_killed = False  # a process joins after any kill --all
    name = shim.next_name("e")
    process_path = os.path.join(shim.state_dir, name + ".json")
    pid_file = os.path.join(shim.state_dir, name + ".pid")
    with open(process_path, "w", encoding="utf-8") as process_file:
        json.dump(process, process_file)
    try:
        if tty:
            caller_fds, names = _exec_with_pty(shim, container, process_path, pid_file)
        else:
            caller_fds, names = _exec_with_pipes(shim,
                container, process_path, pid_file, bool(request.get("stdin")))
        pid = read_pid(pid_file)
    finally:
        for path in (process_path, pid_file):
            unlink_quietly(path)
    session = ExecSession(id=exec_id, container_id=container.id, pid=pid)
    shim.execs[exec_id] = session
    shim.pids[pid] = session
    reply = {"v": protocol.PROTOCOL_VERSION, "id": request.get("id"), "ok": True,
             "exec_id": exec_id, "pid": pid, "fds": names}
    try:
        conn.flush()
        conn.sock.setblocking(True)
        protocol.send_with_fds(conn.sock, protocol.encode_message(reply), caller_fds)
        conn.sock.setblocking(False)
    except OSError:
        conn.close()
    finally:
        for fd in caller_fds:
            os.close(fd)
    _forget_old_execs(shim)


def _exec_with_pipes(shim: Shim, container: Container, process_path: str, pid_file: str,
                     want_stdin: bool) -> tuple[list[int], list[str]]:
    pipes = StdioPipes.open(want_stdin)
    try:
        shim.runc.exec(container.id, process_path, pid_file, stdio=pipes.child)
    except BaseException:
        pipes.close_parent_ends()
        raise
    finally:
        pipes.close_child_ends()
    if not want_stdin:
        return [pipes.stdout, pipes.stderr], ["stdout", "stderr"]
    return [pipes.stdin, pipes.stdout, pipes.stderr], ["stdin", "stdout", "stderr"]


def _exec_with_pty(shim: Shim, container: Container, process_path: str,
                   pid_file: str) -> tuple[list[int], list[str]]:
    socket_path = os.path.join(shim.state_dir, shim.next_name("c") + ".sock")
    with ConsoleListener(socket_path) as listener:
        shim.runc.exec(container.id, process_path, pid_file, console_socket=socket_path)
        master = receive_console(listener)
    return [master], ["pty"]


def _forget_old_execs(shim: Shim) -> None:
    exited = [s.id for s in shim.execs.values() if s.exit_code is not None]
    for exec_id in exited[: max(0, len(exited) - KEEP_EXITED_EXECS)]:
        del shim.execs[exec_id]


def _session(shim: Shim, request: dict[str, Any]) -> ExecSession:
    exec_id = str(request["exec_id"])
    session = shim.execs.get(exec_id)
    if session is None:
        raise OpError(f"exec {exec_id} not found")
    return session


def exec_state(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    return _session(shim, request).view()


def exec_wait(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
    session = _session(shim, request)
    if session.exit_code is not None:
        return session.view()
    session.waiters.append((conn, request.get("id")))
    return None


def exec_kill(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any] | None:
    """SIGKILL the exec's process tree. With "wait", the answer comes only once every
    process of the tree is dead and the exec's own process is reaped (ExecSync's timeout
    must not answer while the command still runs)."""
    session = _session(shim, request)
    pidfds = kill_tree(session.pid) if session.exit_code is None else []
    if not request.get("wait"):
        for pidfd in pidfds:
            os.close(pidfd)
        return session.view()
    for pidfd in pidfds:
        session.dying.add(pidfd)
        shim.loop.watch(pidfd, _dead_reader(shim, session, pidfd), None)
    session.kill_waiters.append((conn, request.get("id")))
    answer_kill_waiters(shim, session)
    return None


def _dead_reader(shim: Shim, session: ExecSession, pidfd: int) -> Callback:
    return lambda: _tree_member_died(shim, session, pidfd)


def _tree_member_died(shim: Shim, session: ExecSession, pidfd: int) -> None:
    shim.loop.forget(pidfd)
    os.close(pidfd)
    session.dying.discard(pidfd)
    answer_kill_waiters(shim, session)


def answer_kill_waiters(shim: Shim, session: ExecSession) -> None:
    if session.dying or session.exit_code is None:
        return
    view = session.view()
    for conn, request_id in session.kill_waiters:
        conn.send_message({"id": request_id, "ok": True, **view})
    session.kill_waiters.clear()



def children_of(pid: int) -> list[int]:
    """pid's children, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as file:
                found.extend(int(child) for child in file.read().split())
        except (OSError, ValueError):
            continue
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL pid and all its descendants; returns a pidfd of each (the caller closes them),
    readable once that process is dead. Everything is SIGSTOPped while the tree is walked
    (so nothing forks behind our back and orphans are not re-parented away before we see
    them), then the whole set is killed. Signals go through the pidfds, so a pid that dies
    and is reused meanwhile is never signalled."""
    pidfds: dict[int, int] = {}
    frontier = [pid]
    try:
        while frontier:
            for member in frontier:
                _stop(pidfds, member)
            frontier = [c for m in frontier for c in children_of(m) if c not in pidfds]
        # A fork racing the SIGSTOP shows up only now.
        for child in [c for m in list(pidfds) for c in children_of(m) if c not in pidfds]:
            _stop(pidfds, child)
        for pidfd in pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except BaseException:
        for pidfd in pidfds.values():
            os.close(pidfd)
        raise
    return list(pidfds.values())


def _stop(pidfds: dict[int, int], pid: int) -> None:
    """Opens a pidfd for pid (kept in pidfds) and SIGSTOPs it; nothing if it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    pidfds[pid] = pidfd
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)


OPS: Mapping[str, Op] = MappingProxyType({
    "exec": exec_, "exec_state": exec_state, "exec_wait": exec_wait, "exec_kill": exec_kill,
})
