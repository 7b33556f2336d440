"""The gRPC surface: RuntimeService and ImageService on one unix socket.

Thin by design: each RPC name maps to one function of the form
`async def rpc(runtime, request) -> response` (or an async iterator for streaming RPCs) in the
module that owns that RPC family. This file only decodes, dispatches, and turns exceptions into
gRPC statuses, so that no request, however malformed, takes the daemon down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from cri_api import api_pb2 as pb
from sandbox.creation import CALL_DEADLINE
from sandbox.errors import CriError, StepFailed, Unimplemented

log = logging.getLogger("flatpod.server")

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"

# kubelet sends and accepts messages up to 16 MiB; allow more than that both ways.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A handler answers (or, streaming, yields) messages, or bytes already serialized as the
# response message (see sandbox/wire.py: the list answers kubelet asks for every second).
UnaryHandler = Callable[[Any, Any], Awaitable[Message | bytes]]
StreamHandler = Callable[[Any, Any], AsyncIterator[Message | bytes]]
Handler = UnaryHandler | StreamHandler
RpcObserver = Callable[[str, float, grpc.StatusCode], None]


def build_server(
    runtime: Any,
    handlers: Mapping[str, Handler],
    observe: RpcObserver | None = None,
) -> grpc.aio.Server:
    """An aio server with a handler for every RPC of both services.

    `handlers` maps "Service/Method" to its function; RPCs without one answer UNIMPLEMENTED.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    for service_name in (RUNTIME_SERVICE, IMAGE_SERVICE):
        service = pb.DESCRIPTOR.services_by_name[service_name.split(".")[-1]]
        method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in service.methods:
            key = f"{service.name}/{method.name}"
            request_type = _message_class(method.input_type.name)
            full_name = f"/{service_name}/{method.name}"
            func = handlers.get(key) or _unimplemented(full_name, method.server_streaming)
            if method.server_streaming:
                method_handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    _stream(runtime, full_name, func, observe),
                    request_deserializer=request_type.FromString,
                    response_serializer=_serialize,
                )
            else:
                method_handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(runtime, full_name, func, observe),
                    request_deserializer=request_type.FromString,
                    response_serializer=_serialize,
                )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, method_handlers),)
        )
    return server


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


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


# The handlers below spell out try/except/finally rather than share an async context
# manager: that one made every call create an async generator (which the running loop also
# tracks) and await it twice, ~0.01 ms of event-loop time per RPC.


def _unary(
    runtime: Any, name: str, func: Handler, observe: RpcObserver | None
) -> Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message | bytes]]:
    async def handle(
        request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message | bytes:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        remaining = context.time_remaining()
        CALL_DEADLINE.set(None if remaining is None else started + remaining)
        try:
            result: Message | bytes = await func(runtime, request)  # type: ignore[misc]
            return result
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            code, details = _failure(name, err)
            await context.abort(code, details)
        finally:
            if observe is not None:
                observe(name, time.monotonic() - started, code)

    return handle


def _stream(
    runtime: Any, name: str, func: Handler, observe: RpcObserver | None
) -> Callable[[Message, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Message | bytes]]:
    async def handle(
        request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message | bytes]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            async for item in func(runtime, request):  # type: ignore[union-attr]
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            code, details = _failure(name, err)
            await context.abort(code, details)
        finally:
            if observe is not None:
                observe(name, time.monotonic() - started, code)

    return handle
