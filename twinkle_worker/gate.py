"""The gate in front of WorkerService: decides on a call from its metadata alone (bearer token, the
caller's session, the drain), before any request byte is read, and reads every request message under
the receive deadline. Used by twinkle_worker.server."""

from __future__ import annotations

import contextlib
import functools
import hmac
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.metadata import SESSION_METADATA
from twinkle_protocol.streaming import frame_parser, serialize_frame
from twinkle_worker.call_stream import CALLS_METHOD
from twinkle_worker.receive_deadline import ReceiveDeadlines

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# Methods served without a token: readiness probes and load balancers need no secret.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
STREAM_REQUESTS = {
    f"/{SERVICE_NAME}/ForwardBackwardStream": worker_pb2.ForwardBackwardStreamRequest,
    f"/{SERVICE_NAME}/ForwardOnlyStream": worker_pb2.ForwardOnlyStreamRequest,
}
# Methods that only the owner's session may call (the others are read-only, or Reset, which may be forced).
OPEN_TO_ANY_SESSION = frozenset(f"/{SERVICE_NAME}/{name}" for name in ("GetStatus", "GetTrainConfigs", "Reset"))


class GateInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Decides on a call from its metadata alone, before one byte of its request is read:

    - without `authorization: Bearer <token>` (when a token is set): UNAUTHENTICATED;
    - with `twinkle-session-id` metadata naming a session that does not own the worker (while
      the owner's lease runs), on a method only the owner may call: FAILED_PRECONDITION;
    - once the worker drains for shutdown: UNAVAILABLE.

    Every request message is then read under the receive deadline (`deadlines`), so a caller
    that sends nothing holds a handler thread for at most that long. Calls in progress are
    counted so the drain can wait for them. Health checks pass always.
    """

    def __init__(
        self,
        token: str | None,
        deadlines: ReceiveDeadlines | None = None,
        session_refusal: Callable[[str], str | None] | None = None,
        rank: Callable[[], int] = lambda: 0,
    ) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._rank = rank  # the worker's rank now, for the refusals' ErrorInfo
        self._deadlines = deadlines or ReceiveDeadlines(0.0)
        self._session_refusal = session_refusal or (lambda session: None)
        self._state = threading.Condition()
        self._in_progress = 0
        self.draining = False

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if details.method.startswith(OPEN_PREFIXES) or handler is None:
            return handler
        frames_of = STREAM_REQUESTS.get(details.method)
        metadata = dict(details.invocation_metadata or ())
        if self._expected is not None:
            given = metadata.get("authorization", "")
            given_bytes = given.encode() if isinstance(given, str) else bytes(given)
            if not hmac.compare_digest(given_bytes, self._expected):  # constant time: no timing oracle
                return self._guarded(handler, self._refusal, frames_of)
        session = metadata.get(SESSION_METADATA)
        # The call stream (twinkle_worker.call_stream) carries calls that each pass this gate on their own: it
        # is decided on at its start like a call, then neither counted as a call in progress nor read under
        # the receive deadline (its idle time between calls is the client's, not a stalled request).
        carrier = details.method == CALLS_METHOD
        if isinstance(session, str) and details.method not in OPEN_TO_ANY_SESSION:
            guard = functools.partial(self._admitted, session=session, counted=not carrier)
            return self._guarded(handler, guard, frames_of, carrier)
        return self._guarded(handler, functools.partial(self._admitted, counted=not carrier), frames_of, carrier)

    @contextlib.contextmanager
    def _admitted(
        self, context: grpc.ServicerContext, session: str | None = None, counted: bool = True
    ) -> Iterator[None]:
        with self._state:
            if self.draining:
                _abort(context, errors.Unavailable("the worker is shutting down", reason="SHUTTING_DOWN"), self._rank())
            self._in_progress += counted
        try:
            refusal = self._session_refusal(session) if session is not None else None
            if refusal is not None:
                _abort(context, errors.FailedPrecondition(refusal, reason="OWNED_BY_OTHER_SESSION"), self._rank())
            yield
        finally:
            with self._state:
                self._in_progress -= counted
                self._state.notify_all()

    def refuse_new_calls(self) -> None:
        with self._state:
            self.draining = True

    def drain(self, grace: float | None) -> bool:
        """Refuses new calls from now on; waits (up to grace seconds) until none is in progress."""
        with self._state:
            self.draining = True
            return self._state.wait_for(lambda: self._in_progress == 0, grace)

    def _guarded(
        self, handler: Any, guard: Callable[[grpc.ServicerContext], Any], frames_of: Any = None, carrier: bool = False
    ) -> Any:
        """`handler` whose behaviour runs inside guard(context), to the end of its response stream.

        Every method becomes one with a request stream on this side (the wire is the same), so the
        request is read by the behaviour, inside the guard and under the receive deadline, not by
        gRPC before it: a refused call is never read. Undecodable requests are INVALID_ARGUMENT;
        `frames_of`: the request type of a stream RPC whose messages go through streaming's frame codec;
        `carrier`: the call stream, whose messages are read without the receive deadline.
        """
        deserializer = _lenient(frame_parser(frames_of) if frames_of is not None else handler.request_deserializer)
        serializer = serialize_frame if frames_of is not None else handler.response_serializer
        method = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
        deadlines = self._deadlines

        def requests(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            messages = request_iterator if carrier else deadlines.messages(request_iterator, context, "request")
            if handler.request_streaming:
                return (_checked(message, context, self._rank()) for message in messages)
            first = next(messages, None)
            if first is None:
                text = "the call ended without its request message"
                _abort(context, errors.InvalidArgument(text, reason="UNDECODABLE_REQUEST"), self._rank())
            return _checked(first, context, self._rank())

        if handler.response_streaming:

            def streaming(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                with guard(context):
                    yield from method(requests(request_iterator, context), context)

            return grpc.stream_stream_rpc_method_handler(streaming, deserializer, serializer)

        def unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with guard(context):
                return method(requests(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)

    @contextlib.contextmanager
    def _refusal(self, context: grpc.ServicerContext) -> Iterator[None]:
        _abort(context, errors.Unauthenticated(UNAUTHENTICATED), self._rank())
        yield  # not reached: abort raises


def _abort(context: grpc.ServicerContext, error: errors.TwinkleError, rank: int) -> None:
    """Ends the call with error's status and its ErrorInfo (the interceptor's refusals)."""
    context.abort_with_status(errors.to_status(error, str(error), rank))


UNAUTHENTICATED = "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'"


class _Undecodable:
    """A request whose bytes are not the expected message (kept so the handler can say so)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The message's deserializer, returning _Undecodable instead of raising (gRPC would answer INTERNAL)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return _Undecodable(error)

    return parse


def _checked(request: Any, context: grpc.ServicerContext, rank: int) -> Any:
    if isinstance(request, _Undecodable):
        text = f"the request is not a valid message of this RPC: {request.error}"
        _abort(context, errors.InvalidArgument(text, reason="UNDECODABLE_REQUEST"), rank)
    return request
