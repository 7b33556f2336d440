"""Kubernetes remote-command (exec/attach) semantics over SPDY streams or WebSocket channels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox.streaming.backend import ProcessStreams

log = logging.getLogger(__name__)

PROTOCOL_V5 = "v5.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V1 = "channel.k8s.io"
# Server preference order for SPDY negotiation.
SPDY_PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)
WEBSOCKET_PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4)

STREAM_STDIN = "stdin"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
STREAM_ERROR = "error"
STREAM_RESIZE = "resize"
STREAM_TYPES = (STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR, STREAM_ERROR, STREAM_RESIZE)

CHANNEL_STDIN = 0
CHANNEL_STDOUT = 1
CHANNEL_STDERR = 2
CHANNEL_ERROR = 3
CHANNEL_RESIZE = 4
CHANNEL_CLOSE = 255  # v5: [255, n] closes channel n

# After the process exits, how long to keep copying output a leaked
# descendant may still hold open.
OUTPUT_DRAIN_TIMEOUT = 5.0
READ_CHUNK = 32 * 1024


class InputChannel(Protocol):
    async def read(self) -> bytes: ...  # b"" at end of input


class OutputChannel(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass
class StreamOptions:
    """Which streams the CRI request asked for."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    def expected_stream_types(self) -> set[str]:
        """The streams a client opens for these options (a tty has no stderr)."""
        expected = {STREAM_ERROR}
        if self.stdin:
            expected.add(STREAM_STDIN)
        if self.stdout:
            expected.add(STREAM_STDOUT)
        if self.stderr and not self.tty:
            expected.add(STREAM_STDERR)
        if self.tty:
            expected.add(STREAM_RESIZE)
        return expected


@dataclass
class SessionChannels:
    error: OutputChannel
    stdin: InputChannel | None = None
    stdout: OutputChannel | None = None
    stderr: OutputChannel | None = None
    resize: InputChannel | None = None


def success_status() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exit_code_status(exit_code: int, description: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing "
                   f"{description}, exit code {exit_code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


def internal_error_status(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: dict[str, Any], protocol: str) -> bytes:
    """v4+ send a JSON Status; older protocols send only an error's text."""
    if protocol in (PROTOCOL_V4, PROTOCOL_V5):
        return json.dumps(status, separators=(",", ":")).encode()
    if status["status"] == "Success":
        return b""
    return str(status["message"]).encode()


def parse_resize_events(buffer: str) -> tuple[list[tuple[int, int]], str]:
    """Complete JSON {"Width","Height"} objects in buffer, and the unparsed rest."""
    decoder = json.JSONDecoder()
    events: list[tuple[int, int]] = []
    pos = 0
    while True:
        while pos < len(buffer) and buffer[pos].isspace():
            pos += 1
        if pos >= len(buffer):
            return events, ""
        try:
            value, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            return events, buffer[pos:]
        pos = end
        if isinstance(value, dict):
            events.append((int(value.get("Width", 0)), int(value.get("Height", 0))))


async def _pump_stdin(channel: InputChannel, process: ProcessStreams) -> None:
    target = process.stdin
    try:
        while data := await channel.read():
            if target is None:
                continue  # not requested: discard
            target.write(data)
            await target.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Client closed stdin: the process sees EOF.
        if target is not None:
            target.close()


async def _pump_output(source: asyncio.StreamReader | None, channel: OutputChannel) -> None:
    try:
        if source is not None:
            # A pty master reports EIO once the terminal's last user exits: that is EOF.
            with contextlib.suppress(OSError):
                while data := await source.read(READ_CHUNK):
                    await channel.write(data)
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            await channel.close()


async def _pump_resize(channel: InputChannel, process: ProcessStreams) -> None:
    pending = ""
    while data := await channel.read():
        pending += data.decode("utf-8", "replace")
        events, pending = parse_resize_events(pending)
        for width, height in events:
            await process.resize(width, height)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _finish_output(output_tasks: list[asyncio.Task[None]],
                         disconnected: asyncio.Event) -> None:
    """Let the output pumps reach EOF, bounded in time and by a disconnect."""
    if not output_tasks:
        return
    all_done = asyncio.ensure_future(asyncio.wait(output_tasks))
    gone = asyncio.ensure_future(disconnected.wait())
    try:
        await asyncio.wait([all_done, gone], timeout=OUTPUT_DRAIN_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        all_done.cancel()
        gone.cancel()
    await _cancel_all([t for t in output_tasks if not t.done()])


async def write_status(channel: OutputChannel, status: dict[str, Any], protocol: str) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        payload = encode_status(status, protocol)
        if payload:
            await channel.write(payload)
        await channel.close()


async def run_remote_command(channels: SessionChannels, protocol: str,
                             start: Callable[[], Awaitable[ProcessStreams]],
                             description: str, disconnected: asyncio.Event) -> None:
    """Run one exec/attach session to its end.

    Ends when the process exits (output drained, status sent on the error
    channel), or when the client disconnects (the process is killed via the
    backend so nothing leaks).
    """
    try:
        process = await start()
    except Exception as exc:  # the backend's failure goes to the client as a Status
        log.info("streaming: %s failed to start: %s", description, exc)
        await write_status(channels.error, internal_error_status(str(exc)), protocol)
        return
    outputs = [asyncio.create_task(_pump_output(source, channel))
               for source, channel in ((process.stdout, channels.stdout),
                                       (process.stderr, channels.stderr))
               if channel is not None]
    inputs: list[asyncio.Task[None]] = []
    if channels.stdin is not None:
        inputs.append(asyncio.create_task(_pump_stdin(channels.stdin, process)))
    if channels.resize is not None:
        inputs.append(asyncio.create_task(_pump_resize(channels.resize, process)))
    exit_task = asyncio.ensure_future(process.wait())
    gone = asyncio.ensure_future(disconnected.wait())
    ended_with_process = False
    try:
        await asyncio.wait([exit_task, gone], return_when=asyncio.FIRST_COMPLETED)
        if exit_task.done():
            exit_code = exit_task.result()
            ended_with_process = True
            await _finish_output(outputs, disconnected)
            status = (success_status() if exit_code == 0
                      else exit_code_status(exit_code, description))
            await write_status(channels.error, status, protocol)
        else:
            log.info("streaming: client left %s", description)
    finally:
        gone.cancel()
        if not exit_task.done():
            exit_task.cancel()
        await _cancel_all([*inputs, *outputs])
        if not ended_with_process:
            # Client gone, server stopping, or an error: nothing may outlive the session.
            await process.kill()
        if process.stdin is not None:
            process.stdin.close()
