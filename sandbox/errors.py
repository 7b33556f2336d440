"""The runtime's error vocabulary.

Every failure that reaches a CRI client is one of these, and each carries the gRPC status code
the servicer answers with. The message names what was wrong (an id, a field, a path), because
kubelet logs it verbatim and an operator reads it there.
"""

from __future__ import annotations

from types import TracebackType

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


def describe(err: BaseException) -> str:
    """An error as one line of text; its type's name when it has no message."""
    return str(err) or type(err).__name__


class StepFailed(CriError):
    """A step of a request failed: `run pod <id>: network: <cause>`, as Go's `%w` wraps.

    It answers with the cause's status code (an InvalidArgument from the network step still
    answers INVALID_ARGUMENT; an OSError, INTERNAL), and keeps the cause (`cause`, and
    `__cause__` for the traceback), so kubelet's log names where a request failed and the
    daemon's log shows why.
    """

    where: str
    cause: BaseException
    pending: str  # what an undo could not take back, if anything

    def __init__(self, where: str, cause: BaseException, cleanup_pending: str = "") -> None:
        if isinstance(cause, StepFailed):  # it names its own step: prefix where it was
            where, cleanup_pending = f"{where}: {cause.where}", cleanup_pending or cause.pending
            cause = cause.cause
        pending = f" (not undone, kept for a later removal: {cleanup_pending})"
        super().__init__(f"{where}: {describe(cause)}{pending if cleanup_pending else ''}")
        self.where = where
        self.cause = cause
        self.pending = cleanup_pending
        self.code = cause.code if isinstance(cause, CriError) else grpc.StatusCode.INTERNAL


class Steps:
    """Where a request is: its name (`run pod <id>`) and the step it is at, so an error
    raised in the `with` block is reported from there (as StepFailed)."""

    def __init__(self, request: str) -> None:
        self.request = request
        self.step = ""

    def at(self, step: str) -> None:
        """The request is now at `step`: what fails from here on failed in it."""
        self.step = step

    def located(self, err: BaseException, cleanup_pending: str = "") -> StepFailed:
        if isinstance(err, StepFailed):  # it already names its step
            return StepFailed(self.request, err, cleanup_pending)
        where = f"{self.request}: {self.step}" if self.step else self.request
        return StepFailed(where, err, cleanup_pending)

    def __enter__(self) -> Steps:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(err, Exception):  # never a cancellation or an exit
            raise self.located(err) from err
