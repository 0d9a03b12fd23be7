"""Optional OpenTelemetry tracing of a worker (`twinkle-worker --trace-file PATH`, extra `[otel]`).

OpenTelemetry's gRPC server interceptor starts a span per call, as a child of the span whose
context the client sent (`traceparent` metadata: `TransformersModel(..., tracer_provider=...)`);
finished spans are written to PATH, one JSON object a line. Used by twinkle_worker.server.
"""

from __future__ import annotations

import json
import os
from typing import Any, TextIO


def server_interceptor(trace_file: str) -> Any:
    """The gRPC server interceptor of a tracer provider that appends each finished span to trace_file."""
    try:
        from opentelemetry.instrumentation.grpc import server_interceptor as otel_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError as error:
        raise SystemExit(
            f"twinkle-worker: --trace-file needs OpenTelemetry: pip install 'twinkle-grpc[otel]' ({error})"
        ) from None
    out: TextIO = open(trace_file, "a")  # noqa: SIM115 - open for the life of the process
    provider = TracerProvider(resource=Resource.create({"service.name": "twinkle-worker", "process.pid": os.getpid()}))
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: json.dumps(json.loads(span.to_json())) + "\n")
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # written when the span ends
    return otel_server_interceptor(tracer_provider=provider)
