"""Prometheus metrics of a real worker (embedded default, `metrics=True`), scraped after a few steps.

The counts the steps imply are computed here from the calls the test makes and the samples it
sends; the Grafana dashboard in deploy/grafana/ may use only names the worker exports.
"""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from plain_reference import VOCAB, counting_samples
from prometheus_client.parser import text_string_to_metric_families

from twinkle_client.model import TransformersModel
from twinkle_protocol._proto import worker_pb2, worker_pb2_grpc
from twinkle_protocol.errors import NotFound

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "twinkle-workers.json"
# Exported only once CUDA is in use (twinkle_worker.metrics._cuda_memory); a CPU worker has none.
CUDA_NAMES = {
    "twinkle_worker_cuda_memory_allocated_bytes",
    "twinkle_worker_cuda_memory_reserved_bytes",
    "twinkle_worker_cuda_memory_max_allocated_bytes",
}


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sample's value; a sample that is not exported fails the test (0 is not assumed)."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exported"
    return samples[key]


def label_tokens(samples: list[dict[str, np.ndarray]]) -> int:
    return sum(int((sample["labels"] != -100).sum()) for sample in samples)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, module_config: Any) -> Any:
    """4 micro-batches with 2-step accumulation (2 optimizer steps), a refused call, a forward_only
    with logits back (through shared memory), a call without the embedded workers' token, then one scrape."""
    model = TransformersModel(
        config=module_config,
        mixed_precision="no",
        seed=0,
        metrics=True,
        output_root=str(tmp_path_factory.mktemp("metrics-out")),
    )
    try:
        rng = np.random.default_rng(0)
        model.set_optimizer("AdamW", lr=1e-3)
        batches = [counting_samples(rng, 3, [9, 6, 12], prompt=2) for _ in range(4)]
        losses, norms = [], []
        for batch in batches:
            losses.append(model.forward_backward(inputs=batch)["loss"])
            stepped = model.clip_grad_and_step(max_grad_norm=1.0, gradient_accumulation_steps=2)
            if stepped["applied"]:
                norms.append(stepped["grad_norm"])
        timing = model.last_step_timing()
        with pytest.raises(NotFound):
            model.forward_backward(inputs=batches[0], adapter_name="no-such-adapter")
        probe = counting_samples(rng, 2, 8)
        model.forward_only(inputs=probe, return_logits=True)
        with grpc.insecure_channel(model.coordinator.addresses[0]) as channel:  # no token: refused by the gate
            with pytest.raises(grpc.RpcError) as refused:
                worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        urls = model.metrics_urls()
        samples = scrape(urls[0])
        yield {
            "samples": samples,
            "urls": urls,
            "batches": batches,
            "losses": losses,
            "norms": norms,
            "probe": probe,
            "timing": timing,
            "shared": bool(model.shared_ranks),
        }
    finally:
        model.close()


def test_calls_are_counted_by_rpc_and_code(trained: Any) -> None:
    samples = trained["samples"]
    assert value(samples, "twinkle_worker_calls_total", rpc="ForwardBackward", code="OK") == 4
    assert value(samples, "twinkle_worker_calls_total", rpc="ForwardBackward", code="NOT_FOUND") == 1
    assert value(samples, "twinkle_worker_calls_total", rpc="ClipGradAndStep", code="OK") == 4
    assert value(samples, "twinkle_worker_calls_total", rpc="SetOptimizer", code="OK") == 1
    assert value(samples, "twinkle_worker_calls_total", rpc="Init", code="OK") == 1
    # the metrics interceptor is outermost: a call the token gate refuses is counted too
    assert value(samples, "twinkle_worker_calls_total", rpc="GetStatus", code="UNAUTHENTICATED") == 1
    assert value(samples, "twinkle_worker_calls_total", rpc="ForwardOnlyStream", code="OK") == 1  # logits: streamed
    # every call is timed, by phase too, refused ones included
    assert value(samples, "twinkle_worker_call_seconds_count", rpc="ForwardBackward") == 5
    for phase in ("queue", "compute", "encode"):
        assert value(samples, "twinkle_worker_call_phase_seconds_count", rpc="ForwardBackward", phase=phase) == 5
    total = value(samples, "twinkle_worker_call_seconds_sum", rpc="ForwardBackward")
    compute = value(samples, "twinkle_worker_call_phase_seconds_sum", rpc="ForwardBackward", phase="compute")
    assert 0 < compute <= total
    assert value(samples, "twinkle_worker_collective_failures_total", rpc="ForwardBackward") == 0


def test_training_progress_per_group(trained: Any) -> None:
    samples = trained["samples"]
    assert value(samples, "twinkle_worker_micro_steps_total", group="default") == 4
    assert value(samples, "twinkle_worker_optimizer_steps_total", group="default") == 2
    expected_tokens = sum(label_tokens(batch) for batch in trained["batches"])
    assert value(samples, "twinkle_worker_tokens_total", group="default", rpc="ForwardBackward") == expected_tokens
    assert value(samples, "twinkle_worker_tokens_total", group="default", rpc="ForwardOnly") == label_tokens(
        trained["probe"]
    )
    assert value(samples, "twinkle_worker_last_loss", group="default") == pytest.approx(trained["losses"][-1], rel=1e-6)
    assert len(trained["norms"]) == 2
    assert value(samples, "twinkle_worker_last_grad_norm", group="default") == pytest.approx(
        trained["norms"][-1], rel=1e-6
    )


def test_bytes_memory_and_lease(trained: Any) -> None:
    samples = trained["samples"]
    assert value(samples, "twinkle_worker_received_bytes_total", transport="message") > 0
    assert value(samples, "twinkle_worker_sent_bytes_total", transport="message") > 0
    # same host and user: forward_only with logits goes through the client's segments both ways
    assert trained["shared"]
    rows, width = len(trained["probe"]), len(trained["probe"][0]["input_ids"])
    int64, float32 = 8, 4
    inputs = int64 * rows * width * 3  # input_ids, labels and the attention_mask the client adds
    assert value(samples, "twinkle_worker_received_bytes_total", transport="shared_memory") == inputs
    logps_and_logits = float32 * rows * width * (1 + VOCAB)
    assert value(samples, "twinkle_worker_sent_bytes_total", transport="shared_memory") == logps_and_logits
    assert value(samples, "twinkle_worker_sent_bytes_total", transport="stream") > 0  # its header
    assert value(samples, "process_resident_memory_bytes") > 50 << 20  # torch + a model
    assert value(samples, "twinkle_worker_initialized") == 1
    assert value(samples, "twinkle_worker_session_owned") == 1
    assert 0 < value(samples, "twinkle_worker_lease_seconds_left") <= 900


def test_endpoint_is_found_through_get_status(trained: Any) -> None:
    (url,) = trained["urls"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url


def test_last_step_timing_splits_the_last_step(trained: Any) -> None:
    timing = trained["timing"]
    assert timing is not None
    assert timing.calls == 4  # the step's window: 2 forward_backward + 2 clip_grad_and_step
    assert timing.compute_seconds > 0
    parts = (
        timing.client_seconds,
        timing.wire_seconds,
        timing.queue_seconds,
        timing.worker_codec_seconds,
        timing.merge_seconds,
    )
    assert all(part >= 0 for part in parts)
    # the worker computed at least this long over all its training calls
    samples = trained["samples"]
    worker_compute = sum(
        value(samples, "twinkle_worker_call_phase_seconds_sum", rpc=rpc, phase="compute")
        for rpc in ("ForwardBackward", "ClipGradAndStep")
    )
    assert timing.compute_seconds <= worker_compute


def test_grafana_dashboard_uses_only_exported_names(trained: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b((?:twinkle_worker|process)_[a-z_]+)\b", expr)}
    exported = {name for name, _ in trained["samples"]} | CUDA_NAMES
    assert used, "the dashboard queries no metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
