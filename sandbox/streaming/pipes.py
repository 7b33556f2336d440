"""Pipe (and pty) fds handed to the event loop's pipe transports, closed exactly once.

`loop.connect_read_pipe` and `connect_write_pipe` take a file object and own its fd from
then on. The standard loop closes the file object, once. uvloop's transport has libuv close
the fd, then closes the file object as well: a second close(2) of the same number, which the
daemon's other threads may have been given in between (an exec's fds arrive in a
`to_thread` worker, gRPC's threads open sockets). That closed a shim connection or an exec's
pipe under its owner (execs failed to start with EBADF or EEXIST under load), and once the
daemon stopped accepting CRI connections while its streaming server still served.
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Literal


def loop_closes_pipe_fds(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `loop`'s pipe transports close the fd themselves (uvloop's, through libuv)
    rather than through the file object they were given (the standard library's)."""
    return type(loop).__module__.partition(".")[0] == "uvloop"


def pipe_file(fd: int, mode: Literal["rb", "wb"]) -> io.FileIO:
    """`fd` as the file object for a pipe transport of the running loop ("rb" to read, "wb"
    to write): it closes the fd only where the transport does not."""
    loop = asyncio.get_running_loop()
    return os.fdopen(fd, mode, buffering=0, closefd=not loop_closes_pipe_fds(loop))
