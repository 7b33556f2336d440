"""A preloaded process that forks pod shims, so each shim shares the interpreter and
its imported modules copy-on-write instead of paying for a fresh Python (~14 MiB USS).

`python -m shim.zygote --socket PATH [--log FILE]`; one JSON line per connection:
    -> {"v": 1, "op": "spawn", "pod_id": ..., "dir": ..., "runc_root": ...,
        "runc": ..., "log_level": ..., "max_log_line": ...}
    <- {"v": 1, "ok": true, "pid": <shim pid>}   (the shim's socket is listening)
    -> {"v": 1, "op": "ping"}   <- {"v": 1, "ok": true, "pid": <zygote pid>}
    -> {"v": 1, "op": "stop"}   <- {"v": 1, "ok": true}, then the zygote exits; the shims it
                                   forked are not its children and keep running
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import sys
from typing import Any

from shim import __main__ as shim_main
from shim import protocol
from shim.runc import DEFAULT_RUNC


def spawn_args(request: dict[str, Any]) -> argparse.Namespace:
    argv = ["--pod-id", str(request["pod_id"]), "--dir", str(request["dir"]),
            "--runc-root", str(request["runc_root"]),
            "--runc", str(request.get("runc") or DEFAULT_RUNC),
            "--log-level", str(request.get("log_level") or "info"),
            "--max-log-line", str(int(request.get("max_log_line") or 16 * 1024))]
    return shim_main.parse_args(argv)


def fork_shim(args: argparse.Namespace, inherited: list[socket.socket]) -> int:
    """Fork a detached shim; returns its pid once its socket is listening."""
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    listener = shim_main.bind_listener(os.path.join(args.dir, shim_main.SOCKET_NAME))
    pid_read, pid_write = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        _become_shim(args, listener, inherited, pid_read, pid_write)
    os.close(pid_write)
    listener.close()
    with os.fdopen(pid_read, "rb") as pid_pipe:
        shim_pid = int(pid_pipe.read() or b"0")
    os.waitpid(intermediate, 0)
    if shim_pid <= 0:
        raise OSError("shim fork failed")
    return shim_pid


def _become_shim(args: argparse.Namespace, listener: socket.socket,
                 inherited: list[socket.socket], pid_read: int, pid_write: int) -> None:
    """In the intermediate child: new session, fork the shim, report its pid, exit."""
    try:
        for sock in inherited:  # the zygote's listener and client connection
            sock.close()
        os.close(pid_read)
        os.setsid()
        shim_pid = os.fork()
        if shim_pid > 0:
            os.write(pid_write, str(shim_pid).encode())
            os._exit(0)
        os.close(pid_write)
        shim_main.redirect_stdio(os.path.join(args.dir, shim_main.LOG_NAME))
        shim_main.serve(args, listener)
        os._exit(0)
    except BaseException:
        os._exit(1)


def handle(conn: socket.socket, zygote_listener: socket.socket) -> None:
    with conn:
        conn.settimeout(30)
        buffer = b""
        while b"\n" not in buffer and len(buffer) < protocol.MAX_LINE:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
        stop = False
        try:
            request = protocol.decode_message(buffer.split(b"\n", 1)[0])
            op = request.get("op")
            if op == "spawn":
                shim_pid = fork_shim(spawn_args(request), [zygote_listener, conn])
                reply: dict[str, Any] = {"ok": True, "pid": shim_pid}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            elif op == "stop":
                reply, stop = {"ok": True}, True
            else:
                raise ValueError(f"unknown op {op!r}")
        except (OSError, ValueError, KeyError, SystemExit, protocol.ProtocolError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        with contextlib.suppress(OSError):
            conn.sendall(protocol.encode_message({"v": protocol.PROTOCOL_VERSION, **reply}))
        if stop:
            with contextlib.suppress(OSError):
                os.unlink(zygote_listener.getsockname())
            os._exit(0)


def _warm_up() -> None:
    """Run the shim's lazily initialised paths (codec caches, time formatting, the
    selector, subprocess) once, so their allocations sit in shared pages."""
    from shim.crilog import LineSplitter
    from shim.runc import Runc

    protocol.decode_message(protocol.encode_message({"v": 1, "ok": True}))
    protocol.rfc3339nano()
    LineSplitter().feed(b"warm\n")
    Runc(root="/nonexistent", binary="/bin/true").start("warm-up")
    import selectors

    selectors.DefaultSelector().close()


def serve_zygote(listener: socket.socket) -> None:
    # Import now what every shim needs later, so the pages are shared, not per shim.
    import ctypes  # noqa: F401
    import subprocess  # noqa: F401

    _warm_up()
    # Objects alive now are never collected: the cycle collector would otherwise
    # write to (and so un-share) every page of them in each forked shim.
    gc.collect()
    gc.freeze()
    while True:
        conn, _addr = listener.accept()
        handle(conn, listener)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shim.zygote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--foreground", action="store_true")
    args = parser.parse_args(argv)
    # Listening before detaching: when this command exits 0 the zygote is ready.
    listener = shim_main.bind_listener(args.socket)
    if not args.foreground:
        shim_main.detach(args.log)
    serve_zygote(listener)
    sys.exit(0)


if __name__ == "__main__":
    main()
