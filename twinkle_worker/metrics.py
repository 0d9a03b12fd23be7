"""Prometheus metrics of one worker: calls, latency phases, training progress, bytes moved, memory, lease.

Used by twinkle_worker.server: `MetricsInterceptor` (outermost, so it also sees refused calls)
counts each WorkerService call by status code, times it and reads the training figures off the
requests and responses (the model is not touched); `timed` is the servicer's one hook, timing a
call's wait for its turn on the model thread (queue) and its run there (compute). The endpoint
is served over HTTP by `MetricsEndpoint` (`twinkle-worker --metrics-port`). The names are listed
in docs/design.md ("Metrics"); deploy/grafana/ has a dashboard for them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from twinkle_protocol import tensors
from twinkle_protocol.metadata import COMPUTE_KEY, HANDLER_KEY, QUEUE_KEY
from twinkle_worker.agreement import COLLECTIVE_FAILED, agreed_rpcs
from twinkle_worker.call_stream import CALLS_METHOD
from twinkle_worker.model import TransformersModel

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/twinkle.worker.v1.WorkerService/"
# Seconds: a tiny model's step on a CPU is milliseconds, a checkpoint of a big one minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
FORWARD_RPCS = {"ForwardBackward", "ForwardBackwardStream", "ForwardOnly", "ForwardOnlyStream"}
# The RPCs that may run collectives (Init's rendezvous, the agreed calls and the forwards' stream twins);
# a collective failure is answered ABORTED with the marker in its message.
COLLECTIVE_RPCS = ("Init", *agreed_rpcs(TransformersModel), "ForwardBackwardStream", "ForwardOnlyStream")


@dataclass
class _Call:
    """Timestamps (perf_counter) of the call the current gRPC thread is handling."""

    started: float
    submitted: float | None = None
    compute_started: float | None = None
    compute_finished: float | None = None

    def phases(self, ended: float) -> tuple[float, float, float]:
        """(queue, compute, encode) seconds; encode is the handler's time outside the model thread."""
        queue = compute = 0.0
        if self.submitted is not None and self.compute_started is not None:
            queue = self.compute_started - self.submitted
            compute = (self.compute_finished or ended) - self.compute_started
        return queue, compute, max(0.0, ended - self.started - queue - compute)


_current = threading.local()  # .call: the _Call of the RPC this gRPC handler thread runs, if instrumented


def timed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, recording into the current call when it is submitted (now) and when it runs on the model thread."""
    call: _Call | None = getattr(_current, "call", None)
    if call is None:
        return fn
    call.submitted = time.perf_counter()

    def run() -> Any:
        call.compute_started = time.perf_counter()
        try:
            return fn()
        finally:
            call.compute_finished = time.perf_counter()

    return run


def _group(request: Any) -> str:
    name = getattr(request, "adapter_name", "")
    return name or "default"


def _tensor_bytes(tensor_map: Any) -> int:
    return sum(tensors.byte_size(tensor) for tensor in tensor_map.tensors.values())


class WorkerMetrics:
    """The metrics of one worker in a registry of their own (several workers may share a process in tests).

    `state` is read at each scrape: a callable returning (initialised, session owned, lease seconds left).
    """

    def __init__(self, state: Callable[[], tuple[bool, bool, float]]) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        registry = self.registry
        self.calls = Counter(
            "twinkle_worker_calls",
            "WorkerService calls answered, by RPC and status code",
            ["rpc", "code"],
            registry=registry,
        )
        self.call_seconds = Histogram(
            "twinkle_worker_call_seconds", "Handler time of a call", ["rpc"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.phase_seconds = Histogram(
            "twinkle_worker_call_phase_seconds",
            "A call's time by phase: queue (waiting for its turn on the model thread), compute (running there), "
            "encode (the handler decoding the request and encoding the response)",
            ["rpc", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.micro_steps = Counter(
            "twinkle_worker_micro_steps",
            "Forward-backward passes that succeeded, per group",
            ["group"],
            registry=registry,
        )
        self.optimizer_steps = Counter(
            "twinkle_worker_optimizer_steps", "Optimizer steps applied, per group", ["group"], registry=registry
        )
        self.tokens = Counter(
            "twinkle_worker_tokens",
            "Label tokens this rank computed a loss over (rate() gives tokens per second), per group and RPC",
            ["group", "rpc"],
            registry=registry,
        )
        self.loss = Gauge(
            "twinkle_worker_last_loss", "Loss of the last forward-backward, per group", ["group"], registry=registry
        )
        self.grad_norm = Gauge(
            "twinkle_worker_last_grad_norm",
            "Gradient norm before clipping of the last clip, per group",
            ["group"],
            registry=registry,
        )
        self.received = Counter(
            "twinkle_worker_received_bytes",
            "Request bytes received, by transport (message, stream, shared_memory)",
            ["transport"],
            registry=registry,
        )
        self.sent = Counter(
            "twinkle_worker_sent_bytes",
            "Response bytes sent, by transport (message, stream, shared_memory)",
            ["transport"],
            registry=registry,
        )
        self.collective_failures = Counter(
            "twinkle_worker_collective_failures",
            "Calls that failed because a collective with the other ranks failed (a peer died or timed out)",
            ["rpc"],
            registry=registry,
        )
        for transport in ("message", "stream", "shared_memory"):  # exported from the start, at 0
            self.received.labels(transport)
            self.sent.labels(transport)
        for rpc in COLLECTIVE_RPCS:
            self.collective_failures.labels(rpc)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        registry.register(_StateCollector(state))

    # ----------------------------------------------------------- per call

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), remembered: prometheus_client's lookup takes a lock and checks the
        labels every time (~3 µs, and a call makes about ten). Children are never removed here."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def finish(self, rpc: str, call: _Call, code: grpc.StatusCode, details: str) -> tuple[float, float, float, float]:
        """Records a finished call; returns (queue, compute, encode, handler) seconds."""
        ended = time.perf_counter()
        queue, compute, encode = call.phases(ended)
        self.child(self.calls, rpc, code.name).inc()
        self.child(self.call_seconds, rpc).observe(ended - call.started)
        for phase, seconds in (("queue", queue), ("compute", compute), ("encode", encode)):
            self.child(self.phase_seconds, rpc, phase).observe(seconds)
        if code == grpc.StatusCode.ABORTED and COLLECTIVE_FAILED in details:
            self.child(self.collective_failures, rpc).inc()
        return queue, compute, encode, ended - call.started

    def observe(self, rpc: str, request: Any, response: Any) -> None:
        """The training figures and shared-memory bytes of a call that succeeded (request: the header of a stream)."""
        if request is None or response is None:
            return
        group = _group(request)
        if rpc in FORWARD_RPCS:
            output = response.output
            kind = rpc.removesuffix("Stream")
            self.child(self.tokens, group, kind).inc(output.num_tokens)
            if kind == "ForwardBackward":
                self.child(self.micro_steps, group).inc()
                self.child(self.loss, group).set(output.loss)
                if response.HasField("step"):  # a fused step counts as its ClipGradAndStep would
                    self._stepped(group, response.step)
            if request.HasField("shared_inputs"):
                self.child(self.received, "shared_memory").inc(_tensor_bytes(request.inputs))
            if output.HasField("shared_outputs"):
                self.child(self.sent, "shared_memory").inc(_tensor_bytes(output.outputs))
        elif rpc == "ClipGradNorm" and response.applied:
            self.child(self.grad_norm, group).set(response.grad_norm)
        elif rpc == "Step" and response.applied:
            self.child(self.optimizer_steps, group).inc()
        elif rpc == "ClipGradAndStep":
            self._stepped(group, response)
        if rpc == "ExportWeights" and response.in_segment:
            self.child(self.sent, "shared_memory").inc(response.total_bytes)

    def _stepped(self, group: str, response: Any) -> None:
        """A ClipGradAndStep's figures (on its own, or fused into a ForwardBackward)."""
        if response.applied:
            self.child(self.grad_norm, group).set(response.grad_norm)
            self.child(self.optimizer_steps, group).inc()


class _StateCollector:
    """Gauges read at scrape time: the lease, and CUDA memory once CUDA is in use."""

    def __init__(self, state: Callable[[], tuple[bool, bool, float]]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        initialised, owned, lease_left = self._state()
        yield GaugeMetricFamily(
            "twinkle_worker_initialized", "1 once Init has built the model, 0 after Reset", initialised
        )
        yield GaugeMetricFamily("twinkle_worker_session_owned", "1 while a client session owns the worker", owned)
        yield GaugeMetricFamily(
            "twinkle_worker_lease_seconds_left",
            "Seconds until the owner's lease lapses without calls (+Inf: never; 0: no owner)",
            lease_left if not math.isnan(lease_left) else 0.0,
        )
        yield from _cuda_memory()


def _cuda_memory() -> Iterator[GaugeMetricFamily]:
    import sys

    torch = sys.modules.get("torch")  # a worker imports torch at start; never import it here
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    figures = {
        "twinkle_worker_cuda_memory_allocated_bytes": ("CUDA memory held by tensors", torch.cuda.memory_allocated),
        "twinkle_worker_cuda_memory_reserved_bytes": (
            "CUDA memory held by the caching allocator",
            torch.cuda.memory_reserved,
        ),
        "twinkle_worker_cuda_memory_max_allocated_bytes": (
            "Peak CUDA memory held by tensors",
            torch.cuda.max_memory_allocated,
        ),
    }
    for name, (text, read) in figures.items():
        family = GaugeMetricFamily(name, text, labels=["device"])
        for index in range(torch.cuda.device_count()):
            family.add_metric([str(index)], read(index))
        yield family


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every WorkerService call (health and reflection are left out), counts the bytes
    of its messages, puts its queue/compute/handler seconds into the trailing metadata of a call that
    succeeds, and passes requests and responses to WorkerMetrics.observe."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        # The call stream is left out: each of its calls is counted and timed as the unary call it carries.
        if handler is None or not details.method.startswith(SERVICE_PREFIX) or details.method == CALLS_METHOD:
            return handler
        return _Instrumented(self.metrics, details.method[len(SERVICE_PREFIX) :], handler).handler()


STREAM_REQUEST_RPCS = frozenset({"ForwardBackwardStream", "ForwardOnlyStream"})
STREAM_RESPONSE_RPCS = STREAM_REQUEST_RPCS | {"ExportWeights"}


class _Instrumented:
    """One RPC's handler wrapped: byte-counting codec, timing, status, trailing metadata."""

    def __init__(self, metrics: WorkerMetrics, rpc: str, handler: Any) -> None:
        self.metrics, self.rpc, self.inner = metrics, rpc, handler
        # By the RPC, not the handler: the token gate (gate.GateInterceptor) serves every method as a
        # request stream, so that it reads a request only once the caller is admitted.
        self.request_transport = "stream" if rpc in STREAM_REQUEST_RPCS else "message"
        self.response_transport = "stream" if rpc in STREAM_RESPONSE_RPCS else "message"

    def handler(self) -> Any:
        inner = self.inner
        codec = {"request_deserializer": self._reader(), "response_serializer": self._writer()}
        if inner.response_streaming:
            factory = (
                grpc.stream_stream_rpc_method_handler
                if inner.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return factory(self._streaming, **codec)
        factory = (
            grpc.stream_unary_rpc_method_handler if inner.request_streaming else grpc.unary_unary_rpc_method_handler
        )
        return factory(self._unary, **codec)

    def _reader(self) -> Callable[[bytes], Any] | None:
        parse = self.inner.request_deserializer
        if parse is None:
            return None
        counter = self.metrics.child(self.metrics.received, self.request_transport)

        def read(data: bytes) -> Any:
            counter.inc(len(data))
            return parse(data)

        return read

    def _writer(self) -> Callable[[Any], bytes] | None:
        serialize = self.inner.response_serializer
        if serialize is None:
            return None
        counter = self.metrics.child(self.metrics.sent, self.response_transport)

        def write(message: Any) -> bytes:
            data = serialize(message)
            counter.inc(len(data))
            return data

        return write

    def _requests(self, request: Any, seen: list[Any]) -> Any:
        """The request (or request stream), keeping the request or the stream's header in seen[0]."""
        if not self.inner.request_streaming:
            seen[0] = request
            return request

        def messages() -> Iterator[Any]:
            for message in request:
                if seen[0] is None:
                    if self.rpc not in STREAM_REQUEST_RPCS:  # a unary request the gate reads as a stream of one
                        seen[0] = message
                    elif _part(message) == "header":
                        seen[0] = message.header
                yield message

        return messages()

    def _unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        behaviour = self.inner.stream_unary if self.inner.request_streaming else self.inner.unary_unary
        seen: list[Any] = [None]
        call = _begin()
        try:
            response = behaviour(self._requests(request, seen), context)
        except BaseException:
            self._end(call, context, failed=True)
            raise
        self._end(call, context, failed=False)
        self._observe(seen[0], response)
        return response

    def _streaming(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        behaviour = self.inner.stream_stream if self.inner.request_streaming else self.inner.unary_stream
        seen: list[Any] = [None]
        call = _begin()
        try:
            for response in behaviour(self._requests(request, seen), context):
                if not isinstance(response, bytes):  # a raw data frame of a stream RPC carries no figures
                    self._observe(seen[0], response.header if _part(response) == "header" else response)
                yield response
        except BaseException:
            self._end(call, context, failed=True)
            raise
        self._end(call, context, failed=False)

    def _observe(self, request: Any, response: Any) -> None:
        try:
            self.metrics.observe(self.rpc, request, response)
        except Exception:  # a bug here must not fail a call that succeeded: log it
            log.exception("metrics of %s not recorded", self.rpc)

    def _end(self, call: _Call, context: grpc.ServicerContext, failed: bool) -> None:
        _current.call = None
        code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
        details = context.details() or b""  # gRPC keeps the status message encoded
        text = details.decode(errors="replace") if isinstance(details, bytes) else str(details)
        try:
            queue, compute, _, handler = self.metrics.finish(self.rpc, call, code, text)
        except Exception:  # a bug here must not change the call's outcome: log it
            log.exception("metrics of %s not recorded", self.rpc)
            return
        if not failed and code == grpc.StatusCode.OK:
            context.set_trailing_metadata(
                (
                    *(context.trailing_metadata() or ()),
                    (QUEUE_KEY, f"{queue:.6f}"),
                    (COMPUTE_KEY, f"{compute:.6f}"),
                    (HANDLER_KEY, f"{handler:.6f}"),
                )
            )


def _begin() -> _Call:
    call = _Call(time.perf_counter())
    _current.call = call
    return call


def _part(message: Any) -> str | None:
    which = getattr(message, "WhichOneof", None)
    if which is None:
        return None
    try:
        return which("part")
    except ValueError:  # a message without a `part` oneof
        return None


class MetricsEndpoint:
    """The registry served at http://HOST:PORT/metrics (port 0: a free one; `port` is the bound one)."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
