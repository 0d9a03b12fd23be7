"""Exceptions -> google.rpc.Status with an ErrorInfo detail (AIP-193) -> exceptions: the packing of
twinkle_protocol.errors.to_status and the decoding of from_status, and the closed list of reasons."""

from __future__ import annotations

import ast
import pathlib

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from twinkle_protocol import errors

ROOT = pathlib.Path(__file__).resolve().parents[2]


class _FailedCall(grpc.RpcError):  # type: ignore[misc]
    """What grpc raises on the client for a status a server sent: code, details, trailing metadata."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._status.trailing_metadata


def _info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    message = status_pb2.Status.FromString(value)
    assert message.code == status.code.value[0] and message.message == status.details
    (detail,) = message.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def test_default_reason_rank_and_the_field_from_the_message() -> None:
    error = errors.InvalidArgument("lora_config.r must be in [1, 4096], got 0")
    status = errors.to_status(error, "rank 1 (host, pid 7): lora_config.r must be in [1, 4096], got 0", rank=1)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    info = _info(status)
    assert (info.reason, info.domain) == ("INVALID_FIELD", "twinkle.worker.v1")
    assert dict(info.metadata) == {"rank": "1", "field": "lora_config.r"}


def test_a_message_that_names_no_field_gets_none() -> None:
    info = _info(errors.to_status(errors.FailedPrecondition("the worker is already initialised"), "x", rank=0))
    assert info.reason == "FAILED_PRECONDITION" and dict(info.metadata) == {"rank": "0"}


def test_explicit_reason_field_and_metadata() -> None:
    error = errors.NotFound("unknown adapter 'x'", reason="UNKNOWN_ADAPTER", field="adapter_name", adapter="x")
    info = _info(errors.to_status(error, "rank 2: unknown adapter 'x'", rank=2))
    assert info.reason == "UNKNOWN_ADAPTER"
    assert dict(info.metadata) == {"rank": "2", "field": "adapter_name", "adapter": "x"}


def test_an_unexpected_exception_is_internal() -> None:
    status = errors.to_status(KeyError("oops"), "rank 0: internal error (KeyError: 'oops')", rank=0)
    assert status.code == grpc.StatusCode.INTERNAL and _info(status).reason == "INTERNAL"


def test_round_trip_through_the_client() -> None:
    sent = errors.FailedPrecondition("sequence number 9 ...", reason="SEQUENCE_GAP", expected=4, got=9)
    status = errors.to_status(sent, "rank 1 (h): sequence number 9 ...", rank=1)
    received = errors.from_status(status.code, "Step failed on rank 1: ...", _FailedCall(status))
    assert type(received) is errors.FailedPrecondition and str(received) == "Step failed on rank 1: ..."
    assert (received.reason, received.rank, received.field) == ("SEQUENCE_GAP", 1, None)
    assert received.metadata == {"rank": "1", "expected": "4", "got": "9"}


def test_a_status_without_details_gets_the_code_default() -> None:
    bare = rpc_status._Status(grpc.StatusCode.ABORTED, "a peer died", ())  # e.g. from a proxy
    received = errors.from_status(bare.code, "a peer died", _FailedCall(bare))
    assert type(received) is errors.Aborted and received.reason == "PEER_FAILED" and received.rank is None


def test_in_process_errors_name_their_field_too() -> None:
    assert errors.InvalidArgument("optim_params.lr must be a finite number > 0, got 0").field == "optim_params.lr"
    assert errors.FailedPrecondition("the worker has no model").field is None


def test_metadata_keys_of_another_server_cannot_break_the_client() -> None:
    info = error_details_pb2.ErrorInfo(reason="X", domain="elsewhere", metadata={"message": "m", "reason": "r"})
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="gone")
    status.details.add().Pack(info)
    received = errors.from_status(grpc.StatusCode.NOT_FOUND, "gone", _FailedCall(rpc_status.to_status(status)))
    assert type(received) is errors.NotFound and received.reason == "X" and received.metadata["message"] == "m"


def test_every_reason_belongs_to_one_code() -> None:
    listed = [reason for reasons in errors.REASONS.values() for reason in reasons]
    assert len(listed) == len(set(listed))
    assert all(reason.isupper() and " " not in reason for reason in listed)


def _raised_reasons() -> list[tuple[str, str, str]]:
    """(file:line, exception class, reason) of every `SomeError(..., reason="X")` in the code."""
    found = []
    for path in [
        *ROOT.glob("twinkle_worker/**/*.py"),
        *ROOT.glob("twinkle_client/*.py"),
        *ROOT.glob("twinkle_protocol/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(
                node.func, "attr", None
            )  # Aborted(...), errors.Aborted(...)
            found_class = getattr(errors, name, None) if name else None
            if isinstance(found_class, type) and issubclass(found_class, errors.TwinkleError):
                for keyword in node.keywords:
                    if keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                        found.append((f"{path.name}:{node.lineno}", name, keyword.value.value))
    return found


def test_every_reason_raised_is_listed_for_its_code() -> None:
    raised = _raised_reasons()
    assert len(raised) > 20  # the scan finds the raise sites
    for where, name, reason in raised:
        assert reason in errors.REASONS[getattr(errors, name).code], (where, name, reason)


@pytest.mark.parametrize("reason", [r for reasons in errors.REASONS.values() for r in reasons[1:]])
def test_every_listed_reason_is_raised_somewhere(reason: str) -> None:
    """No dead entries: each reason but a code's default has a raise site (docs/protocol.md lists them)."""
    assert reason in {r for _, _, r in _raised_reasons()}
