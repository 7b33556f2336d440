"""A small CRI client for tests: the generated stubs plus a deadline on every call.

It is deliberately not built on flatpod's own code: it speaks the wire contract only, as
kubelet and crictl do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from cri_api import api_pb2_grpc as rpc


class CriClient:
    def __init__(self, socket: Path, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(
            f"unix://{socket}",
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ],
        )
        self.runtime = rpc.RuntimeServiceStub(self.channel)
        self.image = rpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def __getattr__(self, name: str) -> Any:
        """`client.Version(req)` calls whichever service has the method, with the deadline."""
        for stub in (self.runtime, self.image):
            method = getattr(stub, name, None)
            if method is not None:
                def call(request: Any, timeout: float | None = None, _m: Any = method) -> Any:
                    return _m(request, timeout=timeout or self.timeout)

                return call
        raise AttributeError(name)

    def close(self) -> None:
        self.channel.close()


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    return code
