"""The runtime's error vocabulary.

Every failure that reaches a CRI client is one of these, and each carries the gRPC status code
the servicer answers with. The message names what was wrong (an id, a field, a path), because
kubelet logs it verbatim and an operator reads it there.
"""

from __future__ import annotations

import grpc


class CriError(Exception):
    """Base of all errors that map to a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CriError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CriError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(CriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(CriError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(CriError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CriError):
    code = grpc.StatusCode.INTERNAL
