"""A small typed driver for the runc command line.

Dependency-free (stdlib only) so that both the shim and the flatpod daemon can import it.
Every call is synchronous; the daemon runs them in a worker thread.

runc is started with os.posix_spawn (a vfork in glibc) and awaited through a pidfd, not with
subprocess: Popen's Python machinery is large, and in a zygote-forked shim every page of it
that runs (code objects, their constants, the objects they allocate) becomes a private copy
(~0.1 MiB of USS per shim, hack/shim-memory). Above all, the shim zygote then need not
import subprocess, which imports threading; see shim/zygote.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_RUNC = "/usr/sbin/runc"
DEFAULT_TIMEOUT = 60.0
RUNC_COMMANDS = ("create", "run", "start", "state", "kill", "delete", "exec", "update", "list",
                 "features", "checkpoint", "restore")
NOT_FOUND_MARKERS = ("does not exist", "not found", "no such file")
READ_SIZE = 65536
# Python ignores SIGPIPE (and SIGXFSZ); an ignored signal stays ignored across exec, so runc
# gets them back at their defaults, as subprocess's restore_signals does.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

# posix_spawn(path, argv, env, [(fd, target fd)...], signals to reset): the child's pid.
PosixSpawn = Callable[[str, Sequence[str], Mapping[str, str], Sequence[tuple[int, int]],
                       Sequence[int]], int]


def os_posix_spawn(path: str, argv: Sequence[str], env: Mapping[str, str],
                   dup2: Sequence[tuple[int, int]], default_signals: Sequence[int]) -> int:
    """os.posix_spawn, which holds the GIL until the child has exec'd: right for a shim (one
    thread); the daemon passes netns.libc.posix_spawn, which releases it."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in dup2]
    return os.posix_spawn(path, list(argv), env, file_actions=actions,
                          setsigdef=default_signals)


class RuncError(Exception):
    """runc exited non-zero (or could not run); carries its stderr / error log."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        command = next((a for a in argv[1:] if a in RUNC_COMMANDS), "")
        # Named after the binary: a pod's handler may be crun or another runc-compatible one.
        runtime = os.path.basename(argv[0]) if argv else "runc"
        what = f"{runtime} {command}" if command else runtime
        super().__init__(f"{what} failed (rc={returncode}): {self.stderr}")

    @property
    def not_found(self) -> bool:
        lowered = self.stderr.lower()
        return any(marker in lowered for marker in NOT_FOUND_MARKERS)


@dataclass(frozen=True)
class RuncState:
    id: str
    status: str
    pid: int
    created: str
    bundle: str


@dataclass(frozen=True)
class Stdio:
    """File descriptors handed to runc as its fds 0/1/2; -1 means /dev/null.

    For `create` and detached `exec` without a terminal runc passes its own stdio
    straight to the container process, so these are the container's stdio.
    """

    stdin: int = -1
    stdout: int = -1
    stderr: int = -1


@dataclass(frozen=True)
class StdioPipes:
    """Pipes for a process's stdio: `child` holds the ends runc hands on (close them once
    runc has), the caller keeps `stdin` (the write end; -1 without stdin), `stdout` and
    `stderr` (the read ends)."""

    child: Stdio
    stdin: int
    stdout: int
    stderr: int

    @classmethod
    def open(cls, want_stdin: bool) -> StdioPipes:
        made: list[int] = []
        try:
            stdin_read = stdin_write = -1
            if want_stdin:
                stdin_read, stdin_write = os.pipe()
                made += (stdin_read, stdin_write)
            out_read, out_write = os.pipe()
            made += (out_read, out_write)
            err_read, err_write = os.pipe()
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        return cls(Stdio(stdin_read, out_write, err_write), stdin_write, out_read, err_read)

    def close_child_ends(self) -> None:
        _close_open(self.child.stdin, self.child.stdout, self.child.stderr)

    def close_parent_ends(self) -> None:
        _close_open(self.stdin, self.stdout, self.stderr)


def _close_open(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


@dataclass
class Runc:
    root: str
    binary: str = DEFAULT_RUNC
    timeout: float = DEFAULT_TIMEOUT
    # Where runc's --log files go for calls whose stderr belongs to the container.
    log_dir: str = "/tmp"
    extra_global_args: list[str] = field(default_factory=list)
    # runc's environment; None: this process's os.environ, read at each call. A
    # zygote-forked shim is given a copy made in the zygote: reading os.environ runs
    # os._Environ's Python code, and decodes every variable, in each shim (~60 KiB of USS).
    environment: Mapping[str, str] | None = None
    posix_spawn: PosixSpawn = os_posix_spawn

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", self.root, *self.extra_global_args, *args]

    def _run(self, *args: str, input: bytes = b"") -> str:
        """Run runc with stdout and stderr captured (and input on its stdin)."""
        argv = self._argv(*args)
        ours: list[int] = []  # stdin's write end, stdout's and stderr's read ends
        theirs: list[int] = []
        try:
            for index in range(3):
                read_end, write_end = os.pipe()
                ours.append(write_end if index == 0 else read_end)
                theirs.append(read_end if index == 0 else write_end)
            pid = _spawn(self.posix_spawn, argv, self.environment, *theirs)
            for fd in theirs:
                os.close(fd)
            theirs.clear()
            _write_input(ours.pop(0), input)
            returncode, (stdout, stderr) = _wait(pid, self.timeout, ours)
        except OSError as exc:
            raise RuncError(argv, -1, str(exc)) from exc
        finally:
            for fd in ours + theirs:
                os.close(fd)
        if returncode != 0:
            raise RuncError(argv, returncode, stderr.decode(errors="replace"))
        return stdout.decode(errors="replace")

    def _run_with_stdio(self, stdio: Stdio, *args: str) -> None:
        """Run runc with the caller's fds as its stdio; errors come from a --log file
        because runc's stderr may be the container's stderr pipe."""
        log_path = os.path.join(self.log_dir, f".runc-{os.getpid()}-{time.monotonic_ns()}.log")
        argv = [self.binary, "--root", self.root, *self.extra_global_args,
                "--log", log_path, "--log-format", "json", *args]
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            pid = _spawn(self.posix_spawn, argv, self.environment, *(fd if fd >= 0 else devnull
                                 for fd in (stdio.stdin, stdio.stdout, stdio.stderr)))
            returncode, _output = _wait(pid, self.timeout, [])
            if returncode != 0:
                raise RuncError(argv, returncode, _errors_from_log(log_path))
        except OSError as exc:
            raise RuncError(argv, -1, str(exc)) from exc
        finally:
            os.close(devnull)
            _unlink_quietly(log_path)

    def create(self, container_id: str, bundle: str, pid_file: str,
               console_socket: str | None = None, stdio: Stdio = Stdio(),
               systemd_cgroup: bool = False) -> None:
        """`systemd_cgroup`: cgroupsPath is `slice:prefix:name` and systemd makes the scope
        (later calls need no flag: runc keeps the cgroup manager in the container's state)."""
        self._create_or_run(["create"], container_id, bundle, pid_file, console_socket, stdio,
                            systemd_cgroup)

    def run(self, container_id: str, bundle: str, pid_file: str,
            console_socket: str | None = None, stdio: Stdio = Stdio(),
            systemd_cgroup: bool = False) -> None:
        """`runc run --detach`: create and start in one runc process (one Go runtime start and
        state load fewer than create + start); runc exits once the process runs, which is
        re-parented to the nearest subreaper (the shim)."""
        self._create_or_run(["run", "--detach"], container_id, bundle, pid_file,
                            console_socket, stdio, systemd_cgroup)

    def _create_or_run(self, command: list[str], container_id: str, bundle: str,
                       pid_file: str, console_socket: str | None, stdio: Stdio,
                       systemd_cgroup: bool) -> None:
        runc = self
        if systemd_cgroup:
            runc = replace(self, extra_global_args=[*self.extra_global_args, "--systemd-cgroup"])
        args = [*command, "--bundle", bundle, "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--console-socket", console_socket]
        runc._run_with_stdio(stdio, *args, container_id)

    def start(self, container_id: str) -> None:
        self._run("start", container_id)

    def state(self, container_id: str) -> RuncState | None:
        """The container's state, or None when runc does not know it."""
        try:
            raw = json.loads(self._run("state", container_id))
        except RuncError as exc:
            if exc.not_found:
                return None
            raise
        return _state_from_json(raw)

    def kill(self, container_id: str, signal: int | str, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [container_id, str(signal)]
        self._run(*args)

    def delete(self, container_id: str, force: bool = False) -> None:
        """Delete the container; a container runc does not know is already deleted."""
        try:
            self._run("delete", *(["--force"] if force else []), container_id)
        except RuncError as exc:
            if not exc.not_found:
                raise

    def exec(self, container_id: str, process_json: str, pid_file: str,
             console_socket: str | None = None, stdio: Stdio = Stdio()) -> None:
        """`runc exec --detach`: the process is re-parented to the nearest subreaper
        (the shim), which reaps it; no runc process lingers per exec."""
        args = ["exec", "--detach", "--process", process_json, "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--console-socket", console_socket]
        self._run_with_stdio(stdio, *args, container_id)

    def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply an OCI linux.resources object (passed on stdin as `-r -`)."""
        self._run("update", "--resources", "-", container_id,
                  input=json.dumps(resources).encode())

    def list(self) -> list[RuncState]:
        raw = json.loads(self._run("list", "--format", "json") or "null")
        return [_state_from_json(item) for item in raw or []]

    def checkpoint(self, container_id: str, image_path: str, work_path: str, *,
                   criu: str, leave_running: bool = True) -> None:
        """`runc checkpoint`: CRIU's image files go to image_path, its dump.log and
        stats-dump to work_path. `criu` is the CRIU binary runc runs (its --criu)."""
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        if leave_running:
            args.append("--leave-running")
        replace(self, extra_global_args=[*self.extra_global_args, "--criu", criu])._run(
            *args, container_id)

    def restore(self, container_id: str, bundle: str, image_path: str, work_path: str,
                pid_file: str, *, criu: str, stdio: Stdio = Stdio(),
                systemd_cgroup: bool = False) -> None:
        """`runc restore --detach`: the process continues from image_path's CRIU images in
        the bundle's container. runc exits once it runs, so the process is re-parented to
        the nearest subreaper (the shim). The pipes of `stdio` replace the ones it had at
        checkpoint time (runc maps them by descriptors.json)."""
        extra = [*self.extra_global_args, "--criu", criu]
        if systemd_cgroup:
            extra.append("--systemd-cgroup")
        replace(self, extra_global_args=extra)._run_with_stdio(
            stdio, "restore", "--detach", "--bundle", bundle, "--image-path", image_path,
            "--work-path", work_path, "--pid-file", pid_file, container_id)

    def features(self) -> dict[str, Any]:
        """`runc features`: what this runtime supports (the OCI runtime-spec's features
        document: mountOptions, linux.namespaces...). runc 1.1 and crun 1.8 have it."""
        try:
            raw = json.loads(self._run("features"))
        except ValueError as exc:
            raise RuncError(self._argv("features"), 0, f"not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise RuncError(self._argv("features"), 0, "not a JSON object")
        return raw


def _state_from_json(raw: dict[str, Any]) -> RuncState:
    return RuncState(id=str(raw.get("id", "")), status=str(raw.get("status", "")),
                     pid=int(raw.get("pid", 0)), created=str(raw.get("created", "")),
                     bundle=str(raw.get("bundle", "")))


def _spawn(posix_spawn: PosixSpawn, argv: list[str], environment: Mapping[str, str] | None,
           stdin: int, stdout: int, stderr: int) -> int:
    """Start argv with the given fds as its 0, 1, 2 and nothing else: every other fd a
    Python process opens is close-on-exec (PEP 446), so it does not reach runc."""
    duplicates: list[int] = []
    try:
        sources = []
        for fd in (stdin, stdout, stderr):
            if fd < 3:  # keep dup2 onto 0..2 from clobbering a source not yet copied
                fd = os.dup(fd)
                duplicates.append(fd)
            sources.append(fd)
        env = os.environ if environment is None else environment
        return posix_spawn(argv[0], argv, env, list(zip(sources, range(3), strict=True)),
                           RESET_SIGNALS)
    finally:
        for fd in duplicates:
            os.close(fd)


def _write_input(fd: int, data: bytes) -> None:
    """All of data to the child's stdin (runc reads it whole), then EOF. A runc that
    exits without reading it is reported by its exit code, so EPIPE is not an error."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _wait(pid: int, timeout: float, outputs: list[int]) -> tuple[int, list[bytes]]:
    """Wait for pid (by pidfd: a waitpid(-1) elsewhere, the shim's reaper, never sees it
    first because the caller runs before the reaper) while reading outputs; returns its
    exit code (-N for signal N) and what each output held. Past timeout the process is
    killed and OSError raised."""
    deadline = time.monotonic() + timeout
    chunks: list[list[bytes]] = [[] for _ in outputs]
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        open_fds = {fd: index for index, fd in enumerate(outputs)}
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        exited = False
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise OSError(f"timed out after {timeout:g}s")
            for fd, _events in poller.poll(remaining * 1000):
                if fd == pidfd:
                    exited = True
                elif not _read_into(fd, chunks[open_fds[fd]]):
                    poller.unregister(fd)
                    del open_fds[fd]
        # Whatever it wrote before it exited is in the pipes; a descendant still holding
        # them open must not keep us waiting, so the rest is read without blocking.
        for fd, index in open_fds.items():
            os.set_blocking(fd, False)
            while _read_into(fd, chunks[index]):
                pass
    finally:
        os.close(pidfd)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), [b"".join(c) for c in chunks]


def _read_into(fd: int, chunks: list[bytes]) -> bool:
    """One read into chunks; False at EOF (or, non-blocking, when nothing is left)."""
    try:
        data = os.read(fd, READ_SIZE)
    except BlockingIOError:
        return False
    chunks.append(data)
    return bool(data)


def _errors_from_log(log_path: str) -> str:
    """The error messages of a runc --log-format json file."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as log_file:
            lines = log_file.read().splitlines()
    except OSError:
        return "(no runc log)"
    messages = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "fatal"):
            messages.append(str(record.get("msg", "")))
    return "; ".join(messages) or "\n".join(lines[-3:])


def criu_errors(text: str) -> str:
    """The messages of CRIU's `Error (file:line): message` lines (its log, or `criu check`'s
    output), in order and without repeats; "" when it has none."""
    messages: list[str] = []
    for line in text.splitlines():
        _, marker, rest = line.partition("Error (")
        message = rest.partition("): ")[2].strip() if marker else ""
        if message and message not in messages:
            messages.append(message)
    return "; ".join(messages)


def criu_log_errors(log_path: str) -> str:
    """criu_errors of a CRIU log file (dump.log, restore.log); "" when it is unreadable."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as log_file:
            return criu_errors(log_file.read())
    except OSError:
        return ""


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
