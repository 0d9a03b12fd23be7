"""Exceptions shared by the worker (raised by the model) and the client (raised to callers).

One place maps them to gRPC status codes and back, so a training loop catches
`twinkle_protocol.errors.NotFound` whether the model runs in-process or remotely. Every
status the worker sends carries a `google.rpc.ErrorInfo` detail (AIP-193) in its
`grpc-status-details-bin` trailer: a `reason` from REASONS, DOMAIN, and metadata with the
worker's `rank` and, where there is one, the request `field` (docs/protocol.md, "Errors"),
so a client in any language branches on a reason rather than on the message.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from twinkle_protocol._proto import worker_pb2

DOMAIN = "twinkle.worker.v1"
# The closed list of ErrorInfo reasons, by status code; the first of each code is its default
# (an error raised without a reason). docs/protocol.md lists them with their metadata keys.
REASONS: dict[grpc.StatusCode, tuple[str, ...]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ("INVALID_FIELD", "UNDECODABLE_REQUEST"),
    grpc.StatusCode.FAILED_PRECONDITION: (
        "FAILED_PRECONDITION",
        "NOT_INITIALIZED",
        "ALREADY_INITIALIZED",
        "OWNED_BY_OTHER_SESSION",
        "SEQUENCE_GAP",
        "SEQUENCE_EXPIRED",
        "SEQUENCE_RESET",
        "NO_OPTIMIZER",
        "WINDOW_MISMATCH",
        "CHECKPOINT_DAMAGED",
        "NOT_RANK0",
    ),
    grpc.StatusCode.NOT_FOUND: ("UNKNOWN_NAME", "UNKNOWN_ADAPTER", "CHECKPOINT_NOT_FOUND", "MODEL_NOT_FOUND"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("TOO_LARGE", "OUT_OF_MEMORY", "TOO_MANY_STREAMS"),
    grpc.StatusCode.PERMISSION_DENIED: ("PERMISSION_DENIED", "OUTSIDE_OUTPUT_ROOT", "REMOTE_CODE_NOT_ALLOWED"),
    grpc.StatusCode.UNAUTHENTICATED: ("UNAUTHENTICATED",),
    grpc.StatusCode.UNAVAILABLE: ("UNAVAILABLE", "SHUTTING_DOWN", "RENDEZVOUS_FAILED"),
    grpc.StatusCode.ABORTED: ("PEER_FAILED", "PEER_REFUSED"),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("DEADLINE_EXCEEDED",),
    grpc.StatusCode.INTERNAL: ("INTERNAL",),
    grpc.StatusCode.UNKNOWN: ("UNKNOWN",),
}
# A message that starts with a request field's path ("lora_config.r must be ...") names that field.
_LEADING_PATH = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)(?=[ :])")
MAX_METADATA_CHARS = 256
_FIELD_NAMES = frozenset(
    field.name for message in worker_pb2.DESCRIPTOR.message_types_by_name.values() for field in message.fields
)


class TwinkleError(Exception):
    """Base of every error this project raises on purpose.

    Args:
        message: what went wrong, naming the values.
        reason: one of REASONS[code] (default: the code's first).
        field: the request field at fault (default: the message's leading path, when it starts
            with a field name of worker.proto: "lora_config.r must be ...").
        metadata: more ErrorInfo metadata (adapter, expected, got, ...), as strings.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str = "", *, reason: str | None = None, field: str | None = None, **metadata: Any):
        super().__init__(message)
        self._reason = reason
        self.metadata: dict[str, str] = {key: str(value) for key, value in metadata.items()}
        if field is not None:
            self.metadata["field"] = field

    @property
    def reason(self) -> str:
        """The ErrorInfo reason: the one given, else the default of this error's code."""
        return self._reason or REASONS.get(self.code, ("UNKNOWN",))[0]

    @property
    def field(self) -> str | None:
        """The request field at fault, where the error names one."""
        if "field" in self.metadata:
            return self.metadata["field"]
        leading = _LEADING_PATH.match(str(self))
        return leading.group(1) if leading and leading.group(1).split(".")[0] in _FIELD_NAMES else None

    @property
    def rank(self) -> int | None:
        """The rank whose worker refused the call (from the status it sent)."""
        rank = self.metadata.get("rank")
        return int(rank) if rank is not None and rank.lstrip("-").isdigit() else None


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


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (UNKNOWN for one gRPC does not know)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, message: str, call: Any = None) -> TwinkleError:
    """The exception a client raises for a gRPC status; with the failed `call` (a grpc.RpcError),
    the reason and metadata of the ErrorInfo the worker attached."""
    cls = _BY_CODE.get(code, TwinkleError)
    info = error_info(call) if call is not None else None
    error = cls(message, reason=info.reason if info is not None and info.reason else None)
    if info is not None:
        error.metadata.update(info.metadata)
    if cls is TwinkleError:
        error.code = code
    return error


def error_info(call: Any) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call's status (None: the status carries none)."""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError, grpc.RpcError):  # not a call, or a status that contradicts its trailer
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def to_status(error: BaseException, message: str, rank: int) -> grpc.Status:
    """The status a worker answers for `error` with `message` (grpc.ServicerContext.abort_with_status):
    its code, and an ErrorInfo with its reason, DOMAIN, and metadata: `rank`, `field` (where the
    error names one) and the error's own keys.
    An exception that is not a TwinkleError is a bug: INTERNAL."""
    twinkle = error if isinstance(error, TwinkleError) else Internal(str(error))
    # Trailers share the 8 KiB header limit with the message: a value echoed from a request is cut.
    found = {"field": twinkle.field} if twinkle.field else {}
    metadata = {
        key: value[:MAX_METADATA_CHARS] for key, value in {**twinkle.metadata, **found, "rank": str(rank)}.items()
    }
    info = error_details_pb2.ErrorInfo(reason=twinkle.reason, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=twinkle.code.value[0], message=message)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)
