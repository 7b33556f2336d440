"""The gRPC surface: RuntimeService and ImageService on one unix socket.

Thin by design: each RPC name maps to one function of the form
`async def rpc(runtime, request) -> response` (or an async iterator for streaming RPCs) in the
module that owns that RPC family. This file only decodes, dispatches, and turns exceptions into
gRPC statuses, so that no request, however malformed, takes the daemon down.

Two servers can carry the calls (config key `grpc_server`): flatpod's own HTTP/2 server
(sandbox/http2, the default) or grpcio's grpc.aio server. Both serve the same call functions,
which take and give serialized messages: what a call means is decided here, once.

A handler marked `Inline` is synchronous: on flatpod's server its call is made in the callback
that read the request, with no task (see `Inline` for which handlers may be).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextvars import copy_context
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message

from cri_api import api_pb2 as pb
from sandbox.creation import CALL_DEADLINE
from sandbox.errors import CriError, InvalidArgument, StepFailed, Unimplemented
from sandbox.http2.grpc_calls import (
    GrpcApplication,
    InlineMethod,
    Method,
    RpcError,
    Status,
    StreamMethod,
)
from sandbox.http2.grpc_calls import UnaryMethod as UnaryCall
from sandbox.http2.listener import Http2Server

log = logging.getLogger("flatpod.server")

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"

# kubelet sends and accepts messages up to 16 MiB; allow more than that both ways.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A handler answers (or, streaming, yields) messages, or bytes already serialized as the
# response message (see sandbox/wire.py: the list answers kubelet asks for every second).
UnaryHandler = Callable[[Any, Any], Awaitable[Message | bytes]]
StreamHandler = Callable[[Any, Any], AsyncIterator[Message | bytes]]
InlineHandler = Callable[[Any, Any], Message | bytes]


@dataclass(frozen=True, slots=True)
class Inline:
    """A synchronous unary handler, answered without a task: on flatpod's own server its call
    is made in the callback that read the request, so a lookup does not wait behind whatever
    else the event loop has ready (lifecycle calls, exits, other connections).

    It holds the event loop while it runs. Only a handler that answers from what the daemon
    keeps in memory, in time of the order of its answer, may be one: no file, database,
    thread, process or lock another thread holds for long (the lookups: Version, List*,
    *Status from kept entries). Anything that must wait stays an async handler.
    """

    func: InlineHandler


AsyncHandler = UnaryHandler | StreamHandler
Handler = AsyncHandler | Inline
RpcObserver = Callable[[str, float, grpc.StatusCode], None]


class RpcServer(Protocol):
    async def start(self, socket_path: Path) -> None: ...

    async def stop(self, grace: float) -> None: ...


def build_server(
    runtime: Any,
    handlers: Mapping[str, Handler],
    observe: RpcObserver | None = None,
    kind: str = "flatpod",
) -> RpcServer:
    """A server with a method for every RPC of both services, of the kind `grpc_server` names.

    `handlers` maps "Service/Method" to its function; RPCs without one answer UNIMPLEMENTED.
    """
    methods = rpc_methods(runtime, handlers, observe)
    if kind == "grpcio":
        return GrpcioServer(methods)
    return Http2Server(GrpcApplication(methods, MAX_MESSAGE_BYTES))


def rpc_methods(
    runtime: Any, handlers: Mapping[str, Handler], observe: RpcObserver | None
) -> dict[str, Method]:
    """{"/runtime.v1.RuntimeService/Version": its call, ...} for every RPC of both services."""
    methods: dict[str, Method] = {}
    for service_name in (RUNTIME_SERVICE, IMAGE_SERVICE):
        service = pb.DESCRIPTOR.services_by_name[service_name.split(".")[-1]]
        for method in service.methods:
            full_name = f"/{service_name}/{method.name}"
            key = f"{service.name}/{method.name}"
            parse = _message_class(method.input_type.name).FromString
            func = handlers.get(key) or _unimplemented(full_name, method.server_streaming)
            if isinstance(func, Inline):
                if method.server_streaming:
                    raise ValueError(f"{full_name} streams: its handler cannot be Inline")
                unary = _unary(runtime, full_name, parse, _awaitable(func.func), observe)
                methods[full_name] = Method(unary=unary, inline=_at_once(full_name, unary))
            elif method.server_streaming:
                stream = _stream(runtime, full_name, parse, func, observe)
                methods[full_name] = Method(stream=stream)
            else:
                methods[full_name] = Method(unary=_unary(runtime, full_name, parse, func, observe))
    return methods


def _message_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(pb, name)
    return cls


def _unimplemented(name: str, streaming: bool) -> Handler:
    """What answers an RPC flatpod has no function for."""
    message = f"{name} is not implemented by flatpod"

    async def unary(runtime: Any, request: Any) -> Message:
        raise Unimplemented(message)

    async def stream(runtime: Any, request: Any) -> AsyncIterator[Message]:
        raise Unimplemented(message)
        yield  # an async generator, like the streaming handlers

    return stream if streaming else unary


def _failure(name: str, err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and details that answer what a handler raised, logged.

    CriErrors carry their own status; anything else is INTERNAL, logged with its traceback,
    and the daemon goes on serving. A step that failed of an unexpected cause (StepFailed
    answering INTERNAL: an OSError, a runc failure) is logged with the cause's traceback too.
    """
    if isinstance(err, StepFailed) and err.code is grpc.StatusCode.INTERNAL:
        log.error("%s: %s", name, err, exc_info=err)
        return err.code, str(err)
    if isinstance(err, CriError):
        log.info("%s: %s: %s", name, err.code.name, err)
        return err.code, str(err)
    log.error("%s failed", name, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"{name}: internal error: {err}"


# The calls below spell out try/except/finally rather than share an async context
# manager: that one made every call create an async generator (which the running loop also
# tracks) and await it twice, ~0.01 ms of event-loop time per RPC.

Parser = Callable[[bytes], Message]


def _request(name: str, parse: Parser, message: bytes) -> Message:
    try:
        return parse(message)
    except DecodeError as err:
        raise InvalidArgument(f"{name}: the request is not a valid message: {err}") from None


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _status(code: grpc.StatusCode) -> Status:
    return Status(code.value[0])


def _cancelled(deadline: float | None) -> grpc.StatusCode:
    if deadline is not None and time.monotonic() >= deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# What _unary makes: a coroutine, so that _at_once can run it to its end itself.
CoroutineCall = Callable[[bytes, float | None], Coroutine[object, None, bytes]]


def _unary(
    runtime: Any, name: str, parse: Parser, func: AsyncHandler, observe: RpcObserver | None
) -> CoroutineCall:
    async def call(message: bytes, deadline: float | None) -> bytes:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        CALL_DEADLINE.set(deadline)
        try:
            request = _request(name, parse, message)
            result: Message | bytes = await func(runtime, request)  # type: ignore[misc]
            return _serialize(result)
        except asyncio.CancelledError:
            code = _cancelled(deadline)
            raise
        except Exception as err:
            code, details = _failure(name, err)
            raise RpcError(_status(code), details) from None
        finally:
            if observe is not None:
                observe(name, time.monotonic() - started, code)

    return call


def _awaitable(func: InlineHandler) -> UnaryHandler:
    async def handler(runtime: Any, request: Any) -> Message | bytes:
        return func(runtime, request)

    return handler


def _at_once(name: str, call: CoroutineCall) -> InlineMethod:
    """`call` made to its end at once, for an Inline handler: one home for parsing, statuses,
    CALL_DEADLINE and observing (_unary), without a task. Over a synchronous handler the
    coroutine never suspends, so one `send` runs all of it; it runs in a copy of the context,
    as a task's would, so the CALL_DEADLINE it sets stays its own."""

    def inline(message: bytes, deadline: float | None) -> bytes:
        coroutine = call(message, deadline)
        try:
            copy_context().run(coroutine.send, None)
        except StopIteration as done:
            answer: bytes = done.value
            return answer
        coroutine.close()  # a handler that was not synchronous after all
        log.error("%s: an inline call waited for something", name)
        raise RpcError(Status.INTERNAL, f"{name}: internal error: an inline call waited")

    return inline


def _stream(
    runtime: Any, name: str, parse: Parser, func: AsyncHandler, observe: RpcObserver | None
) -> StreamMethod:
    async def call(message: bytes, deadline: float | None) -> AsyncGenerator[bytes, None]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            request = _request(name, parse, message)
            async for item in func(runtime, request):  # type: ignore[union-attr]
                yield _serialize(item)
        except asyncio.CancelledError:
            code = _cancelled(deadline)
            raise
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code, details = _failure(name, err)
            raise RpcError(_status(code), details) from None
        finally:
            if observe is not None:
                observe(name, time.monotonic() - started, code)

    return call


# --- grpcio's server ------------------------------------------------------------------------


@dataclass
class GrpcioServer:
    """The same calls on grpc.aio (`grpc_server = "grpcio"`): messages pass through as bytes
    (no (de)serializers), so that parsing and statuses stay the calls' own."""

    methods: Mapping[str, Method]
    server: grpc.aio.Server | None = None

    async def start(self, socket_path: Path) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        for full_name, method in self.methods.items():
            service_name, method_name = full_name[1:].split("/")
            handlers = by_service.setdefault(service_name, {})
            if method.stream is not None:
                handlers[method_name] = grpc.unary_stream_rpc_method_handler(
                    _grpcio_stream(method.stream))
            elif method.unary is not None:
                handlers[method_name] = grpc.unary_unary_rpc_method_handler(
                    _grpcio_unary(method.unary))
        for service_name, handlers in by_service.items():
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service_name, handlers),))
        self.server.add_insecure_port(f"unix://{socket_path}")
        await self.server.start()

    async def stop(self, grace: float) -> None:
        if self.server is not None:
            await self.server.stop(grace)


GrpcioContext = grpc.aio.ServicerContext[bytes, bytes]


def _deadline(context: GrpcioContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _grpcio_code(status: Status) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status:
            return code
    return grpc.StatusCode.UNKNOWN


def _grpcio_unary(call: UnaryCall) -> Callable[[bytes, GrpcioContext], Awaitable[bytes]]:
    async def handle(message: bytes, context: GrpcioContext) -> bytes:
        try:
            return await call(message, _deadline(context))
        except RpcError as err:
            await context.abort(_grpcio_code(err.status), err.message)
            raise  # not reached: abort raises

    return handle


def _grpcio_stream(call: StreamMethod) -> Callable[[bytes, GrpcioContext], AsyncIterator[bytes]]:
    async def handle(message: bytes, context: GrpcioContext) -> AsyncIterator[bytes]:
        try:
            async for item in call(message, _deadline(context)):
                yield item
        except RpcError as err:
            await context.abort(_grpcio_code(err.status), err.message)

    return handle
