"""Kubernetes remote-command (exec/attach) semantics over SPDY streams or WebSocket channels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox.streaming.backend import OutputSource, ProcessStreams
from sandbox.streaming.limits import MAX_RESIZE_PENDING
from shim.protocol import TerminalSizeError, check_terminal_size

log = logging.getLogger(__name__)

PROTOCOL_V5 = "v5.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V1 = "channel.k8s.io"
PROTOCOL_V4_BASE64 = "v4.base64.channel.k8s.io"
PROTOCOL_V1_BASE64 = "base64.channel.k8s.io"
PROTOCOL_NONE = ""  # a WebSocket client that offers no subprotocol: binary, as channel.k8s.io
# Server preference order for SPDY negotiation.
SPDY_PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)
# Every subprotocol kubelet's WebSocket handler accepts; the client's order chooses.
WEBSOCKET_PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4, PROTOCOL_V4_BASE64, PROTOCOL_V1,
                       PROTOCOL_V1_BASE64, PROTOCOL_NONE)
WEBSOCKET_BASE64_PROTOCOLS = (PROTOCOL_V4_BASE64, PROTOCOL_V1_BASE64)
# Protocols whose error channel carries a JSON metav1.Status; the others carry only the
# text of an error, and nothing on success.
STATUS_AS_JSON = (PROTOCOL_V5, PROTOCOL_V4, PROTOCOL_V4_BASE64)

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
RESIZE_SLICE = 4096


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
    if protocol in STATUS_AS_JSON:
        return json.dumps(status, separators=(",", ":")).encode()
    if status["status"] == "Success":
        return b""
    return str(status["message"]).encode()


class ResizeError(ValueError):
    """A resize channel carried something that is not a terminal size."""


class ResizeParser:
    """The resize channel: a stream of JSON {"Width": w, "Height": h} objects, split
    anywhere. At most MAX_RESIZE_PENDING bytes wait for an object to complete, so each
    parse attempt is bounded; sizes must be integers in a terminal's range (uint16, as
    kubelet decodes them). Keys match case-insensitively, as Go's encoding/json."""

    def __init__(self, max_pending: int = MAX_RESIZE_PENDING) -> None:
        self._pending = ""
        self._max_pending = max_pending
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Complete sizes so far (zero sizes are skipped, as kubelet does). Objects are
        decoded in place from a moving offset, so a chunk of many costs linear time."""
        text = self._pending + data.decode("utf-8", "replace")
        events: list[tuple[int, int]] = []
        pos = 0
        while True:
            pos = _JSON_SPACE.match(text, pos).end()  # type: ignore[union-attr]
            if pos == len(text):
                self._pending = ""
                return events
            try:
                value, pos = self._decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if not _incomplete(exc):
                    raise ResizeError(f"resize event is not JSON: {exc.msg}") from exc
                if len(text) - pos > self._max_pending:
                    raise ResizeError(
                        f"resize event longer than {self._max_pending} bytes") from exc
                self._pending = text[pos:]
                return events
            except (ValueError, RecursionError) as exc:  # 4000 digits; [[[[...
                raise ResizeError(f"resize event: {exc!r}"[:200]) from exc
            width, height = _terminal_size(value)
            if width and height:
                events.append((width, height))


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _incomplete(exc: json.JSONDecodeError) -> bool:
    """Whether the decoder stopped only because the text ended (more may come)."""
    return exc.pos >= len(exc.doc) or exc.msg.startswith("Unterminated")


def _terminal_size(value: object) -> tuple[int, int]:
    if not isinstance(value, dict):
        raise ResizeError(f"resize event is a {type(value).__name__}, not an object")
    fields = {str(key).lower(): item for key, item in value.items()}
    width, height = fields.get("width", 0), fields.get("height", 0)
    for name, item in (("Width", width), ("Height", height)):
        if not isinstance(item, int) or isinstance(item, bool):
            raise ResizeError(f"resize event {name} {item!r} is not an integer")
    try:
        check_terminal_size(width, height)
    except TerminalSizeError as exc:
        raise ResizeError(str(exc)) from exc
    return width, height


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


async def _pump_output(source: OutputSource | None, channel: OutputChannel) -> None:
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
    """Applies each size; a bad event ends resizing for this session (the rest of the
    channel is read and dropped so it cannot stall the connection), nothing else."""
    parser = ResizeParser()
    while data := await channel.read():
        try:
            # Slices of a few KiB, with a yield between them: a 1 MiB message of tiny
            # events is ~0.2 s of parsing, which must not hold the event loop at once.
            events: list[tuple[int, int]] = []
            for start in range(0, len(data), RESIZE_SLICE):
                events += parser.feed(data[start:start + RESIZE_SLICE])
                await asyncio.sleep(0)
            # Only the last size of a batch matters to a terminal: one resize per read,
            # however many events a client packs into it.
            for width, height in events[-1:]:
                await process.resize(width, height)
        except (ResizeError, OSError) as exc:
            log.info("streaming: resize channel closed: %s", exc)
            while await channel.read():
                pass
            return


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
