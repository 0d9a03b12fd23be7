"""Error classes <-> gRPC status codes: the client raises the same class the worker's model raised."""

from __future__ import annotations

import grpc
import pytest

from twinkle_protocol import errors

CODES = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


@pytest.mark.parametrize("cls,code", CODES.items(), ids=lambda item: getattr(item, "__name__", str(item)))
def test_status_code_round_trip(cls: type[errors.TwinkleError], code: grpc.StatusCode) -> None:
    assert cls.code == code
    error = errors.from_status(code, "rank 0: what to do")
    assert type(error) is cls
    assert str(error) == "rank 0: what to do"  # NotFound is a KeyError but must not quote its message


def test_unmapped_code_keeps_its_code() -> None:
    error = errors.from_status(grpc.StatusCode.CANCELLED, "cancelled")
    assert type(error) is errors.TwinkleError and error.code == grpc.StatusCode.CANCELLED


def test_familiar_python_bases() -> None:
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.NotFound, KeyError)
