"""Optional OpenTelemetry tracing on the client (extra `[otel]`): `TransformersModel(..., tracer_provider=...)`.

Every call to a worker gets a client span, a child of the caller's current span, and carries its
context (`traceparent` metadata) to the worker, whose server span (`twinkle-worker --trace-file`)
becomes its child: one training step in a span of the caller's is one trace across the client
and every rank. Used by twinkle_client.model (the coordinator's channels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def channel_wrapper(tracer_provider: Any) -> Callable[[grpc.Channel], grpc.Channel]:
    """A function that wraps a channel in OpenTelemetry's client interceptor for tracer_provider."""
    try:
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
    except ImportError as error:
        raise ImportError(f"tracer_provider needs OpenTelemetry: pip install 'twinkle-grpc[otel]' ({error})") from None
    interceptor = client_interceptor(tracer_provider=tracer_provider)

    def wrap(channel: grpc.Channel) -> grpc.Channel:
        return intercept_channel(channel, interceptor)  # type: ignore[no-any-return]

    return wrap
