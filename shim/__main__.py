"""`python -m shim --pod-id ID --dir DIR --runc-root ROOT [--runc BINARY] [--runc-arg=ARG]...`:
start a detached pod shim, which runs that OCI runtime for the pod's life.

The socket is bound and listening before the process detaches, so when this command
exits 0 the shim is ready for clients.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Mapping

from shim.runc import DEFAULT_RUNC, Runc
from shim.server import LOG_LEVELS, Logger, Shim, set_child_subreaper

SOCKET_NAME = "shim.sock"
LOG_NAME = "shim.log"
# Above any fd number (the kernel caps fs.nr_open at 2^30).
MAX_FD = 1 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shim")
    parser.add_argument("--pod-id", required=True)
    parser.add_argument("--dir", required=True, help="pod state dir; shim.sock lives here")
    parser.add_argument("--runc-root", required=True)
    parser.add_argument("--runc", default=DEFAULT_RUNC)
    parser.add_argument("--runc-arg", dest="runc_args", action="append", default=[],
                        help="a global option for every runc call (repeatable)")
    parser.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS))
    parser.add_argument("--max-log-line", type=int, default=16 * 1024)
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    return parser.parse_args(argv)


def bind_listener(path: str) -> socket.socket:
    """Listen on path with mode 0600; a stale socket from a dead shim is replaced, a
    live one is an error (two shims for one pod must never run)."""
    if os.access(path, os.F_OK, follow_symlinks=False):  # else no probe, no exception
        _replace_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def _replace_stale_socket(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if os.path.exists(path):
            os.unlink(path)
    else:
        raise SystemExit(f"a shim is already serving {path}")
    finally:
        probe.close()


def detach(log_path: str, listener: socket.socket) -> None:
    """Double fork into a new session; stdio to /dev/null and the shim log; of the other
    fds only the listener stays open."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    redirect_stdio(log_path)
    close_inherited_fds(listener.fileno())


def close_inherited_fds(keep: int) -> None:
    """Closes every fd above stdio but `keep`. Whoever started this process may have passed
    more: uvloop's subprocesses (unlike the standard library's, which close every other fd)
    keep the original fds of their stdio pipes and /dev/null, and any inheritable fd of the
    daemon's own parent. A detached process would hold them for its life, and the daemon,
    which waits for the end of the stderr pipe to know the process has detached, for ever.
    One close_range(2) call."""
    os.closerange(3, keep)
    os.closerange(keep + 1, MAX_FD)


def redirect_stdio(log_path: str) -> None:
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)


def serve(args: argparse.Namespace, listener: socket.socket,
          runc_environment: Mapping[str, str] | None = None) -> None:
    set_child_subreaper()
    runc = Runc(root=args.runc_root, binary=args.runc, log_dir=args.dir,
                extra_global_args=list(args.runc_args), environment=runc_environment)
    shim = Shim(args.pod_id, args.dir, runc, listener, Logger(LOG_LEVELS[args.log_level]),
                max_log_line=args.max_log_line)
    try:
        shim.run()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(args.dir, SOCKET_NAME))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    listener = bind_listener(os.path.join(args.dir, SOCKET_NAME))
    if not args.foreground:
        detach(os.path.join(args.dir, LOG_NAME), listener)
    serve(args, listener)
    sys.exit(0)


if __name__ == "__main__":
    main()
