"""Exceptions shared by the worker (raised by the model) and the client (raised to callers).

One place maps them to gRPC status codes and back, so a training loop catches
`twinkle_client.errors.NotFound` whether the model runs in-process or remotely.
"""

from __future__ import annotations

import grpc


class TwinkleError(Exception):
    """Base of every error this project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(TwinkleError, ValueError):
    """The request is malformed: wrong dtype, shape, value or name."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(TwinkleError):
    """The call came in the wrong order or the worker cannot honour it (e.g. step before set_optimizer)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(TwinkleError, KeyError):
    """An adapter, checkpoint or name does not exist."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(TwinkleError):
    """A message or tensor is larger than allowed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(TwinkleError):
    """A path points outside the worker's output root, or remote code was not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(TwinkleError):
    """No valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(TwinkleError):
    """A worker or a peer rank cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(TwinkleError):
    """A collective failed because a peer rank went away; re-initialise the mesh."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(TwinkleError):
    """The call did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(TwinkleError):
    """A bug on the worker: it was logged with its traceback there."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TwinkleError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        Aborted,
        DeadlineExceeded,
        Internal,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> TwinkleError:
    """The exception a client raises for a gRPC status."""
    cls = _BY_CODE.get(code, TwinkleError)
    error = cls(message)
    if cls is TwinkleError:
        error.code = code
    return error
