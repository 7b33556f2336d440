"""The interface the streaming server needs from the runtime (implemented by the lead)."""

from __future__ import annotations

import asyncio
from typing import Protocol


class OutputSource(Protocol):
    """A process's output: an asyncio.StreamReader, or anything with its read()."""

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes; b"" at the end."""


class ProcessStreams(Protocol):
    """A running exec, or an attach session to a container's main process.

    stdin/stdout/stderr are None when not requested. For a tty session stdout
    carries the terminal output and stderr is None.
    """

    @property
    def stdin(self) -> asyncio.StreamWriter | None: ...

    @property
    def stdout(self) -> OutputSource | None: ...

    @property
    def stderr(self) -> OutputSource | None: ...

    async def resize(self, width: int, height: int) -> None:
        """Set the terminal size (tty sessions only)."""

    async def wait(self) -> int:
        """Exit code of the exec (attach: of the container, when it exits)."""

    async def kill(self) -> None:
        """The client went away. Exec: kill the process and reap it so nothing
        leaks. Attach: detach only; the container keeps running."""


class StreamBackend(Protocol):
    async def exec(self, container_id: str, cmd: list[str], tty: bool,
                   stdin: bool, stdout: bool, stderr: bool) -> ProcessStreams:
        """Start cmd in the container. Raise an exception (its text is sent to
        the client) if it cannot start."""

    async def attach(self, container_id: str, tty: bool, stdin: bool, stdout: bool,
                     stderr: bool) -> ProcessStreams:
        """Connect to the container's main process stdio."""

    async def port_forward(self, pod_sandbox_id: str,
                           port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to 127.0.0.1:port inside the pod's network namespace.
        Raise OSError (its text is sent to the client) on failure."""
