"""A small typed driver for the runc command line.

Dependency-free (stdlib only) so that both the shim and the flatpod daemon can import it.
Every call is synchronous; the daemon runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_RUNC = "/usr/sbin/runc"
DEFAULT_TIMEOUT = 60.0
RUNC_COMMANDS = ("create", "start", "state", "kill", "delete", "exec", "update", "list")
NOT_FOUND_MARKERS = ("does not exist", "not found", "no such file")


class RuncError(Exception):
    """runc exited non-zero (or could not run); carries its stderr / error log."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        command = next((a for a in argv[1:] if a in RUNC_COMMANDS), argv[0])
        super().__init__(f"runc {command} failed (rc={returncode}): {self.stderr}")

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


@dataclass
class Runc:
    root: str
    binary: str = DEFAULT_RUNC
    timeout: float = DEFAULT_TIMEOUT
    # Where runc's --log files go for calls whose stderr belongs to the container.
    log_dir: str = "/tmp"
    extra_global_args: list[str] = field(default_factory=list)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", self.root, *self.extra_global_args, *args]

    def _run(self, *args: str) -> str:
        argv = self._argv(*args)
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuncError(argv, -1, str(exc)) from exc
        if done.returncode != 0:
            raise RuncError(argv, done.returncode, done.stderr.decode(errors="replace"))
        return done.stdout.decode(errors="replace")

    def _run_with_stdio(self, stdio: Stdio, *args: str) -> None:
        """Run runc with the caller's fds as its stdio; errors come from a --log file
        because runc's stderr may be the container's stderr pipe."""
        log_path = os.path.join(self.log_dir, f".runc-{os.getpid()}-{time.monotonic_ns()}.log")
        argv = [self.binary, "--root", self.root, *self.extra_global_args,
                "--log", log_path, "--log-format", "json", *args]
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            done = subprocess.run(
                argv,
                stdin=stdio.stdin if stdio.stdin >= 0 else devnull,
                stdout=stdio.stdout if stdio.stdout >= 0 else devnull,
                stderr=stdio.stderr if stdio.stderr >= 0 else devnull,
                timeout=self.timeout,
            )
            if done.returncode != 0:
                raise RuncError(argv, done.returncode, _errors_from_log(log_path))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuncError(argv, -1, str(exc)) from exc
        finally:
            os.close(devnull)
            _unlink_quietly(log_path)

    def create(self, container_id: str, bundle: str, pid_file: str,
               console_socket: str | None = None, stdio: Stdio = Stdio()) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket is not None:
            args += ["--console-socket", console_socket]
        self._run_with_stdio(stdio, *args, container_id)

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
        argv = self._argv("update", "--resources", "-", container_id)
        try:
            done = subprocess.run(argv, input=json.dumps(resources).encode(),
                                  capture_output=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuncError(argv, -1, str(exc)) from exc
        if done.returncode != 0:
            raise RuncError(argv, done.returncode, done.stderr.decode(errors="replace"))

    def list(self) -> list[RuncState]:
        raw = json.loads(self._run("list", "--format", "json") or "null")
        return [_state_from_json(item) for item in raw or []]


def _state_from_json(raw: dict[str, Any]) -> RuncState:
    return RuncState(id=str(raw.get("id", "")), status=str(raw.get("status", "")),
                     pid=int(raw.get("pid", 0)), created=str(raw.get("created", "")),
                     bundle=str(raw.get("bundle", "")))


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


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
