"""gRPC server of one worker: WorkerService plus the standard health and reflection services,
behind the gate (twinkle_worker.gate: bearer token, the caller's session, the drain, the receive
deadline), with the metrics and tracing interceptors; the call stream (twinkle_worker.call_stream)
runs each call it carries through the same interceptors.

Used by the `twinkle-worker` command and by tests that start a server in-process.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twinkle_protocol._proto import worker_pb2_grpc
from twinkle_worker.call_stream import CallStream, HandlerCapture
from twinkle_worker.gate import SERVICE_NAME, GateInterceptor
from twinkle_worker.metrics import MetricsEndpoint, MetricsInterceptor, WorkerMetrics
from twinkle_worker.options import WorkerOptions
from twinkle_worker.receive_deadline import ReceiveDeadlines
from twinkle_worker.servicer import WorkerServicer

log = logging.getLogger(__name__)

# The flow-control window of each call (see WorkerServer): 1 MiB in flight is 1-10 GB/s at 0.1-1 ms RTT.
STREAM_WINDOW_BYTES = 1 << 20
# The largest response message sent (a forward's outputs inline, ExportWeights chunks of up to 64 MiB).
MAX_SEND_MB = 256
# Handler threads: one runs each call's wait; pipelined and read-only calls need a few more than one.
HANDLER_THREADS = 32


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
        # metrics outermost: refused calls are counted too; tracing (optional) sees the gate's refusals
        interceptors = [MetricsInterceptor(self.metrics), *_tracing(trace_file), self.gate]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="grpc"),
            interceptors=interceptors,
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
        # The call stream runs each of its calls through the same interceptors and handlers as the server.
        capture = HandlerCapture()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, capture)
        self.servicer.call_stream = CallStream(interceptors, capture.handlers, rank=lambda: self.servicer.rank)
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
