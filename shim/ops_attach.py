"""The shim's attach and log ops: attach (the connection then carries stdio frames),
resize (the terminal) and reopen_log (the CRI log, after kubelet rotated it)."""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from shim import protocol
from shim.state import Op, OpError

if TYPE_CHECKING:
    from shim.server import Connection, Shim


def attach(shim: Shim, conn: Connection, request: dict[str, Any]) -> None:
    container = shim.container_for(request)
    if container.status == "exited":
        raise OpError(f"container {container.id} has exited")
    conn.send_message({"id": request.get("id"), "ok": True, "tty": container.tty,
                       "stdin": container.stdin is not None})
    conn.mode = "attach"
    conn.attached = container
    conn.attach_stdin = bool(request.get("stdin")) and container.stdin is not None
    container.attachers.append(conn)


def resize(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    container = shim.container_for(request)
    if container.pty_master < 0:
        raise OpError(f"container {container.id} has no terminal")
    # A size from a client: checked here too, so no request can make struct.pack
    # raise something the request loop does not turn into an error reply.
    width, height = request.get("width"), request.get("height")
    protocol.check_terminal_size(width, height)
    size = struct.pack("HHHH", height, width, 0, 0)
    fcntl.ioctl(container.pty_master, termios.TIOCSWINSZ, size)
    return {}


def reopen_log(shim: Shim, conn: Connection, request: dict[str, Any]) -> dict[str, Any]:
    container = shim.container_for(request)
    if container.log is None:
        raise OpError(f"container {container.id} has no log file")
    container.log.reopen()
    return {}


OPS: Mapping[str, Op] = MappingProxyType({
    "attach": attach, "resize": resize, "reopen_log": reopen_log,
})
