"""gRPC server of one worker: WorkerService plus the standard health and reflection services,
behind an interceptor that checks the bearer token and the caller's session from the metadata
(before any request byte is read), reads requests under the receive deadline, and refuses calls
while the worker drains.

Used by the `twinkle-worker` command and by tests that start a server in-process.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twinkle_protocol import errors
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.metadata import SESSION_METADATA
from twinkle_protocol.streaming import frame_parser, serialize_frame
from twinkle_worker.metrics import MetricsEndpoint, MetricsInterceptor, WorkerMetrics
from twinkle_worker.options import WorkerOptions
from twinkle_worker.receive_deadline import ReceiveDeadlines
from twinkle_worker.servicer import WorkerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# The flow-control window of each call (see WorkerServer): 1 MiB in flight is 1-10 GB/s at 0.1-1 ms RTT.
STREAM_WINDOW_BYTES = 1 << 20
# The largest response message sent (a forward's outputs inline, ExportWeights chunks of up to 64 MiB).
MAX_SEND_MB = 256
# Handler threads: one runs each call's wait; pipelined and read-only calls need a few more than one.
HANDLER_THREADS = 32
# Methods served without a token: readiness probes and load balancers need no secret.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
STREAM_REQUESTS = {
    f"/{SERVICE_NAME}/ForwardBackwardStream": worker_pb2.ForwardBackwardStreamRequest,
    f"/{SERVICE_NAME}/ForwardOnlyStream": worker_pb2.ForwardOnlyStreamRequest,
}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate and key; with client_ca, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        with open(self.cert, "rb") as cert, open(self.key, "rb") as key:
            pair = (key.read(), cert.read())
        client_ca = None
        if self.client_ca:
            with open(self.client_ca, "rb") as handle:
                client_ca = handle.read()
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


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
        if isinstance(session, str) and details.method not in OPEN_TO_ANY_SESSION:
            return self._guarded(handler, functools.partial(self._admitted, session=session), frames_of)
        return self._guarded(handler, self._admitted, frames_of)

    @contextlib.contextmanager
    def _admitted(self, context: grpc.ServicerContext, session: str | None = None) -> Iterator[None]:
        with self._state:
            if self.draining:
                _abort(context, errors.Unavailable("the worker is shutting down", reason="SHUTTING_DOWN"), self._rank())
            self._in_progress += 1
        try:
            refusal = self._session_refusal(session) if session is not None else None
            if refusal is not None:
                _abort(context, errors.FailedPrecondition(refusal, reason="OWNED_BY_OTHER_SESSION"), self._rank())
            yield
        finally:
            with self._state:
                self._in_progress -= 1
                self._state.notify_all()

    def refuse_new_calls(self) -> None:
        with self._state:
            self.draining = True

    def drain(self, grace: float | None) -> bool:
        """Refuses new calls from now on; waits (up to grace seconds) until none is in progress."""
        with self._state:
            self.draining = True
            return self._state.wait_for(lambda: self._in_progress == 0, grace)

    def _guarded(self, handler: Any, guard: Callable[[grpc.ServicerContext], Any], frames_of: Any = None) -> Any:
        """`handler` whose behaviour runs inside guard(context), to the end of its response stream.

        Every method becomes one with a request stream on this side (the wire is the same), so the
        request is read by the behaviour, inside the guard and under the receive deadline, not by
        gRPC before it: a refused call is never read. Undecodable requests are INVALID_ARGUMENT;
        `frames_of`: the request type of a stream RPC whose messages go through streaming's frame codec.
        """
        deserializer = _lenient(frame_parser(frames_of) if frames_of is not None else handler.request_deserializer)
        serializer = serialize_frame if frames_of is not None else handler.response_serializer
        method = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
        deadlines = self._deadlines

        def requests(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            messages = deadlines.messages(request_iterator, context, "request")
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


def _tracing(trace_file: str | None) -> list[Any]:
    if not trace_file:
        return []
    from twinkle_worker.tracing import server_interceptor

    return [server_interceptor(trace_file)]


class WorkerServer:
    """A started server; `port` is the bound port (ask for port 0 to get a free one). With `metrics_port`
    (0: a free one) it serves Prometheus metrics over HTTP from start(); `metrics_port` is then the bound one.
    With `trace_file` it writes an OpenTelemetry span of every call there (twinkle_worker.tracing)."""

    def __init__(
        self,
        options: WorkerOptions,
        port: int,
        token: str | None = None,
        tls: TlsFiles | None = None,
        metrics_port: int | None = None,
        trace_file: str | None = None,
    ) -> None:
        self.servicer = WorkerServicer(options)
        self.gate = GateInterceptor(
            token,
            ReceiveDeadlines(options.receive_timeout_seconds),
            self.servicer.refusal_for_session,
            rank=lambda: self.servicer.rank,
        )
        self.metrics = WorkerMetrics(self.servicer.lease_state)
        self.metrics_port = metrics_port
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="grpc"),
            # metrics outermost: refused calls are counted too; tracing (optional) sees the gate's refusals
            interceptors=[MetricsInterceptor(self.metrics), *_tracing(trace_file), self.gate],
            options=[
                ("grpc.max_receive_message_length", options.max_message_mb << 20),
                ("grpc.max_send_message_length", max(MAX_SEND_MB, options.max_message_mb) << 20),
                # What a caller can make the worker buffer before its call is refused is its stream's
                # flow-control window: fixed at 1 MiB, not grown by BDP probing (measured: ~5 MiB per
                # refused 12 MiB request with it, ~1 MiB without; loopback throughput is not lower).
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
                ("grpc.so_reuseport", 0),  # a second worker on the same port fails instead of sharing it
            ],
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{options.host}:{port}"
        self.port = (
            self.server.add_secure_port(address, tls.credentials()) if tls else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.address = f"{options.host}:{self.port}"
        self.security = ("mutual TLS" if tls.client_ca else "TLS") if tls else "plaintext"
        self.security += ", bearer token required" if token else ", no token"

    def start(self) -> None:
        if self.metrics_port is not None:
            self._metrics_endpoint = MetricsEndpoint(self.metrics, self.servicer.options.host, self.metrics_port)
            self.metrics_port = self.servicer.metrics_port = self._metrics_endpoint.port
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (%s)", SERVICE_NAME, self.address, self.security)

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuses new calls (UNAVAILABLE), lets the ones in progress finish (up to `grace` seconds),
        waits for the model thread, leaves the process group, then stops."""
        self.gate.refuse_new_calls()
        self.health.enter_graceful_shutdown()  # probes see NOT_SERVING at once
        if not self.gate.drain(grace):
            log.warning("calls still in progress after %s s; stopping anyway", grace)
        self.server.stop(1.0).wait()
        self.servicer.close()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()

    def wait(self) -> None:
        self.server.wait_for_termination()
