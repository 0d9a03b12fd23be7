"""OpenTelemetry tracing across the client and a real worker (`--trace-file`): one training step in a
span of the caller's is one trace, and each worker span is the child of the client span of its call.

A dedicated worker process (the pooled one serves no traces).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from plain_reference import counting_samples

from twinkle_client.local import LocalWorkers
from twinkle_client.model import TransformersModel

SERVICE = "/twinkle.worker.v1.WorkerService/"


def test_a_step_is_one_trace_across_client_and_worker(tmp_path: pathlib.Path, config: Any) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with LocalWorkers(1, output_root=tmp_path, threads=1, extra_args=["--trace-file", str(trace_file)]) as workers:
        model = TransformersModel(
            addresses=workers.addresses, config=config, mixed_precision="no", seed=0, tracer_provider=provider
        )
        try:
            model.set_optimizer("AdamW", lr=1e-3)
            batch = counting_samples(np.random.default_rng(0), 2, 8)
            with tracer.start_as_current_span("train step") as step:
                model.forward_backward(inputs=batch)
                model.clip_grad_and_step(max_grad_norm=1.0)
            timing = model.last_step_timing()  # the traced channels still deliver the trailing metadata
            assert timing is not None and timing.compute_seconds > 0
            logits = model.forward_only(inputs=batch, return_logits=True)["logits"]  # a stream RPC
            assert len(logits) == 2
        finally:
            model.close()
    # the worker wrote each span as it ended, and has exited
    worker_spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    client_spans = {span.name: span for span in exporter.get_finished_spans()}
    step_trace = f"0x{step.get_span_context().trace_id:032x}"
    for rpc in ("ForwardBackward", "ClipGradAndStep"):
        client = client_spans[SERVICE + rpc]
        assert client.parent is not None and client.parent.span_id == step.get_span_context().span_id
        (server,) = [span for span in worker_spans if span["name"] == SERVICE + rpc]
        assert server["context"]["trace_id"] == step_trace
        assert server["parent_id"] == f"0x{client.get_span_context().span_id:016x}"
        assert server["kind"] == "SpanKind.SERVER"
    # calls outside the step are traces of their own
    (init,) = [span for span in worker_spans if span["name"] == SERVICE + "Init"]
    assert init["context"]["trace_id"] != step_trace
    # streams keep plain channels on the client (docs/design.md, "Metrics"): traced on the worker only
    (stream,) = [span for span in worker_spans if span["name"] == SERVICE + "ForwardOnlyStream"]
    assert stream["parent_id"] is None and SERVICE + "ForwardOnlyStream" not in client_spans
