"""A call refused for its loss inputs changes nothing, on every rank, within seconds.

ImportanceSamplingLoss needs `advantages` ([B] or [B, T]) and takes `old_logps` ([B, T]). Those
are checked with the batch, before the agreement vote: a batch without them is refused on every
rank, and a slice with a bad one on rank 1 only makes rank 0 answer ABORTED "refused" at the
vote instead of waiting in DDP's gradient all-reduce until the process-group timeout (60 s
here). Neither moves the accumulation window, and the mesh then trains exactly as a mesh that
never saw the refused calls.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
import pytest
from dist_reference import SEED, tiny_config

from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import InvalidArgument
from twinkle_protocol.mesh import DeviceMesh

ADAPTER = "pg"
TIMEOUT_SECONDS = 60
ANSWER_SECONDS = 20  # generous on 2 shared cores, and a third of the process-group timeout


def _rows(seed: int, rows: int = 4, length: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (rows, length)).astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": np.roll(ids, -1, axis=1),
        "advantages": rng.normal(size=rows).astype(np.float32),
    }


def _request(arrays: dict[str, np.ndarray]) -> worker_pb2.ForwardBackwardRequest:
    request = worker_pb2.ForwardBackwardRequest(adapter_name=ADAPTER, gradient_accumulation_steps=1)
    tensors.map_to_proto(arrays, request.inputs)
    return request


def _start(mesh_model):  # type: ignore[no-untyped-def]
    model = mesh_model(
        config=tiny_config(),
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        seed=SEED,
        rendezvous_timeout=TIMEOUT_SECONDS,
    )
    model.add_adapter_to_model(ADAPTER, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    model.set_optimizer("AdamW", lr=1e-2, adapter_name=ADAPTER)
    model.set_loss("ImportanceSamplingLoss", adapter_name=ADAPTER)
    return model


def _train(model) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    model.forward_backward(_rows(1), adapter_name=ADAPTER)
    step = model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=ADAPTER)
    assert step["applied"] and step["micro_step"] == 1 and step["optimizer_step"] == 1, step
    return float(step["grad_norm"]), model.forward_only(_rows(2), adapter_name=ADAPTER)["loss"]


def _refuse_on_rank_1(model, bad: dict[str, np.ndarray], match: str) -> None:  # type: ignore[no-untyped-def]
    good = _rows(0)
    half = {key: value[:2] for key, value in good.items()}
    started = time.monotonic()
    calls = model.coordinator.submit("ForwardBackward", [_request(half), _request(bad)])
    with pytest.raises(InvalidArgument, match=match):
        model.coordinator.gather("ForwardBackward", calls)
    rank0: Any = calls[0].outcome.exception(timeout=TIMEOUT_SECONDS * 2)
    assert rank0 is not None and rank0.code() == grpc.StatusCode.ABORTED, rank0
    assert "rank(s) [1] refused this call" in rank0.details()
    assert time.monotonic() - started < ANSWER_SECONDS


def test_bad_loss_inputs_are_refused_before_the_vote_and_change_nothing(mesh_model) -> None:  # type: ignore[no-untyped-def]
    first = _start(mesh_model)
    clean = _train(first)
    first.close()

    model = _start(mesh_model)
    missing = {key: value for key, value in _rows(0).items() if key != "advantages"}
    with pytest.raises(InvalidArgument, match="advantages"):
        model.forward_backward(missing, adapter_name=ADAPTER)
    wide = {**_rows(0), "advantages": np.ones((2, 11), dtype=np.float32)}
    wide = {key: value[:2] for key, value in wide.items()}
    _refuse_on_rank_1(model, wide, r"rank 1 .*advantages")
    old = {**{key: value[:2] for key, value in _rows(0).items()}, "old_logps": np.zeros((2, 3), dtype=np.float32)}
    _refuse_on_rank_1(model, old, r"rank 1 .*old_logps")
    assert "micro_step: 0" in model.get_train_configs(ADAPTER)  # the window did not move
    refused = _train(model)
    # Same seed, data and operations in fp32 as the clean run: the refusals left no trace.
    assert refused == pytest.approx(clean, rel=1e-6)
