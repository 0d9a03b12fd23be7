"""The call stream (WorkerService.Calls): unary calls as messages on one long-lived stream.

Python gRPC spends about twice as much per unary call as per message on an open stream (a new
HTTP/2 stream, its metadata, a trip through the server's thread pool: bench_training.py's
"bare gRPC" floors, docs/performance.md), which on a model of tens of ms a step is a large part of
the per-step overhead. The client sends its per-step calls this way instead.

Each CallsRequest is run as its unary call would be: its handler is the one the server's
interceptors (metrics, tracing, the gate) make for that method, given the stream's metadata and
the message's own; its request is decoded by that handler, it runs on this stream's handler
thread in arrival order (a call then waits for its sequence turn and the model thread as any
other), and its status, message and trailing metadata (the timing, the ErrorInfo) come back in
its CallsResponse instead of ending an RPC. The stream itself only carries calls: it is open to the
same callers as the calls (token, session), it needs no receive deadline between messages (a
client's idle time is not a stalled request), and at most MAX_STREAMS are open at once, so callers
cannot hold the server's handler threads. Used by twinkle_worker.server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.metadata import add_entries, pairs_of

log = logging.getLogger(__name__)

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]
CALLS_METHOD = f"/{SERVICE.full_name}/Calls"
# The methods a CallsRequest may name: the unary ones (the streaming RPCs and Calls itself are not calls).
UNARY_METHODS = frozenset(
    f"/{SERVICE.full_name}/{method.name}"
    for method in SERVICE.methods
    if not method.client_streaming and not method.server_streaming
)
# Open Calls streams per worker: each holds one of the server's handler threads while open.
MAX_STREAMS = 8


class HandlerCallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    """What an interceptor sees of a call (its method and metadata)."""

    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class Aborted(Exception):
    """Raised by MessageContext.abort*: ends the one call, not the stream."""


class MessageContext:
    """The ServicerContext of one call on the stream: its metadata, deadline, status and trailing
    metadata are the call's own; what belongs to the connection (peer, auth) is the stream's."""

    def __init__(self, stream: grpc.ServicerContext, metadata: tuple[tuple[str, Any], ...], timeout: float) -> None:
        self._stream = stream
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout if timeout > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, Any], ...] = ()

    # the call's own
    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise Aborted(details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self._trailing = (*self._trailing, *(status.trailing_metadata or ()))
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        pass  # a call on the stream has no initial metadata of its own

    def cancel(self) -> None:
        # May come from another thread (a watchdog): marks the call, raises nothing there.
        self._code, self._details = grpc.StatusCode.CANCELLED, "cancelled"

    def add_callback(self, callback: Callable[[], None]) -> bool:
        # gRPC runs these when the RPC ends: here, when the stream does
        return bool(self._stream.add_callback(callback))

    # the connection's
    def is_active(self) -> bool:
        return bool(self._stream.is_active())

    def peer(self) -> str:
        return str(self._stream.peer())

    def peer_identities(self) -> Any:
        return self._stream.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._stream.peer_identity_key()

    def auth_context(self) -> Any:
        return self._stream.auth_context()


class CallStream:
    """Serves Calls: resolves each message's handler through `interceptors` (outermost first) and the
    service's own `handlers` (method -> grpc.RpcMethodHandler), runs it, answers."""

    def __init__(
        self, interceptors: Sequence[grpc.ServerInterceptor], handlers: dict[str, Any], rank: Callable[[], int]
    ):
        self._interceptors = list(interceptors)
        self._handlers = handlers
        self._rank = rank
        self._open = 0
        self._lock = threading.Lock()

    def serve(self, messages: Iterator[worker_pb2.CallsRequest], context: grpc.ServicerContext) -> Iterator[Any]:
        with self._lock:
            if self._open >= MAX_STREAMS:
                refusal = errors.ResourceExhausted(
                    f"{MAX_STREAMS} call streams are open on this worker already; close one (a client needs one)",
                    reason="TOO_MANY_STREAMS",
                )
                context.abort_with_status(errors.to_status(refusal, str(refusal), self._rank()))
            self._open += 1
        try:
            stream_metadata = tuple(context.invocation_metadata() or ())
            cached: dict[str, Any] = {}  # method -> handler, for messages without metadata of their own
            for message in messages:
                yield self._answer(message, context, stream_metadata, cached)
        finally:
            with self._lock:
                self._open -= 1

    def _answer(
        self,
        message: worker_pb2.CallsRequest,
        stream: grpc.ServicerContext,
        stream_metadata: tuple[tuple[str, Any], ...],
        cached: dict[str, Any],
    ) -> worker_pb2.CallsResponse:
        own = pairs_of(message.metadata)
        metadata = (*stream_metadata, *own)
        context = MessageContext(stream, metadata, message.timeout_seconds)
        answer = worker_pb2.CallsResponse(id=message.id)
        try:
            handler = cached.get(message.method) if not own else None
            if handler is None:
                handler = self._resolve(message.method, metadata)
                if not own:
                    cached[message.method] = handler
            request = handler.request_deserializer(message.request) if handler.request_deserializer else message.request
            if handler.request_streaming:  # the gate reads every request as a stream of one message
                response = handler.stream_unary(iter((request,)), context)
            else:
                response = handler.unary_unary(request, context)
            answer.response = handler.response_serializer(response) if handler.response_serializer else response
            code = context.code() or grpc.StatusCode.OK
        except Aborted:
            code = context.code() or grpc.StatusCode.UNKNOWN
        except errors.TwinkleError as error:  # a refusal of the message itself (an unknown method)
            status = errors.to_status(error, f"rank {self._rank()}: {error}", self._rank())
            context.set_trailing_metadata(status.trailing_metadata)
            context.set_code(status.code)
            context.set_details(status.details)
            code = status.code
        except Exception as error:  # a bug: this call fails, the stream goes on
            log.exception("call stream: %s failed", message.method)
            context.set_details(f"internal error ({type(error).__name__}: {error}); see the worker log")
            code = grpc.StatusCode.INTERNAL
        answer.code = code.value[0]
        if code != grpc.StatusCode.OK:
            answer.response = b""
            details = context.details()
            answer.details = details.decode(errors="replace") if isinstance(details, bytes) else (details or "")
        add_entries(answer.trailing_metadata, context.trailing_metadata())
        return answer

    def _resolve(self, method: str, metadata: tuple[tuple[str, Any], ...]) -> Any:
        if method not in UNARY_METHODS:
            raise errors.InvalidArgument(
                f"method {method[:200]!r} is not a unary method of {SERVICE.full_name} (the streaming RPCs and Calls "
                "itself keep their own RPCs)",
                field="method",
            )
        details = HandlerCallDetails(method, metadata)

        def chain(index: int) -> Callable[[Any], Any]:
            if index == len(self._interceptors):
                return lambda call: self._handlers.get(call.method)
            return lambda call: self._interceptors[index].intercept_service(chain(index + 1), call)

        handler = chain(0)(details)
        if handler is None:
            raise errors.InvalidArgument(f"method {method!r} has no handler on this worker", field="method")
        return handler


class HandlerCapture:
    """Stands in for a grpc.Server to collect what add_WorkerServiceServicer_to_server registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler
