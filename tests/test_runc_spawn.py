"""How the runc driver starts its child, both ways: os.posix_spawn (the shim's) and libc's
posix_spawn through ctypes (the daemon's, which releases the GIL while the child execs: a
documented property of ctypes' foreign calls, not tested here)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from netns import libc
from shim.runc import RESET_SIGNALS, PosixSpawn, Runc, RuncError, os_posix_spawn

SPAWNERS = [pytest.param(os_posix_spawn, id="os"), pytest.param(libc.posix_spawn, id="libc")]
SCRIPT = 'echo "$FLATPOD_T"; grep -E "^SigIgn" /proc/self/status; echo oops >&2; exit 3'


def _ignored_signals(status_line: str) -> set[int]:
    mask = int(status_line.split()[1], 16)
    return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}


@pytest.mark.parametrize("spawn", SPAWNERS)
def test_the_child_gets_its_fds_env_and_default_signals(spawn: PosixSpawn) -> None:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn("/bin/sh", ["sh", "-c", SCRIPT],
                    {"FLATPOD_T": "x y", "PATH": "/usr/bin:/bin"},
                    [(devnull, 0), (out_write, 1), (err_write, 2)], RESET_SIGNALS)
        os.close(out_write)
        os.close(err_write)
        _, status = os.waitpid(pid, 0)
        out = os.read(out_read, 65536).decode().splitlines()
        err = os.read(err_read, 65536).decode()
    finally:
        for fd in (out_read, err_read, devnull):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3
    assert out[0] == "x y"
    # Python ignores SIGPIPE and SIGXFSZ; the child has them back at their defaults.
    ours = next(line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("SigIgn"))
    assert signal.SIGPIPE in _ignored_signals(ours)
    assert not _ignored_signals(out[1]) & {signal.SIGPIPE, signal.SIGXFSZ}
    assert err == "oops\n"


def _fds_of_a_child(spawn: PosixSpawn) -> set[int]:
    out_read, out_write = os.pipe()
    try:
        pid = spawn("/bin/ls", ["ls", "/proc/self/fd"], {}, [(out_write, 1)], RESET_SIGNALS)
        os.close(out_write)
        os.waitpid(pid, 0)
        return {int(name) for name in os.read(out_read, 65536).split()}
    finally:
        os.close(out_read)


def test_the_daemons_spawn_passes_only_the_fds_it_places() -> None:
    """An inheritable fd of the daemon's (its own parent's, or one uvloop's subprocess spawn
    holds inheritable for an instant) never reaches runc."""
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        assert stray in _fds_of_a_child(os_posix_spawn)  # what a plain posix_spawn passes
        assert stray not in _fds_of_a_child(libc.posix_spawn)
    finally:
        os.close(stray)


def test_a_missing_binary_fails_with_its_errno() -> None:
    with pytest.raises(OSError) as failed:
        libc.posix_spawn("/nonexistent/runc", ["runc"], {}, [], RESET_SIGNALS)
    assert failed.value.errno == errno.ENOENT
    with pytest.raises(RuncError):
        Runc(root="/run/none", binary="/nonexistent/runc", posix_spawn=libc.posix_spawn)._run(
            "--version")
